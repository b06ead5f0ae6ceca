"""Open a source dataset through the `datasets` library, once per process, memory-mapped.

``--from`` may be a Hub id, a local folder of a dataset's files as the Hub serves them
(``data/<split>-00000-of-00001.parquet``, ``<config>/<split>-....parquet``), a single parquet/json/csv
file, or the output of ``Dataset.save_to_disk``. Rows are always read in Arrow form, a slice at a time,
so memory stays flat however large the dataset is.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from polite.errors import UserError

DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}

_cache: dict[tuple, Any] = {}
_lock = threading.Lock()


class SourceError(UserError, ValueError):
    """The source cannot be opened or does not have the columns its adapter maps: fix the command or config."""


def cause(error: BaseException) -> str:
    """The innermost cause of a loading error, on one line (`datasets` wraps it in a generic message)."""
    while True:  # a context hidden by `raise ... from None` stays hidden
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def looks_local(from_: str) -> bool:
    return from_.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(from_))


def cached(key: tuple, build):
    """Per-process memo for datasets and adapter-side lookups (shared by the tasks a worker runs)."""
    with _lock:
        if key in _cache:
            return _cache[key]
    value = build()
    with _lock:
        return _cache.setdefault(key, value)


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _split_files(base: Path, split: str | None) -> list[str]:
    files = sorted(
        p for p in base.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(base).parts)
    )
    if not files:
        raise SourceError(f"no data files ({', '.join(sorted(DATA_SUFFIXES))}) under {base}")
    if split is None:
        return [str(p) for p in files]
    chosen = [str(p) for p in files if p.name == f"{split}{p.suffix}" or p.name.startswith((f"{split}-", f"{split}_", f"{split}."))]
    if not chosen:
        found = sorted({p.name.split("-")[0].split(".")[0] for p in files})
        raise SourceError(f"no files for split {split!r} under {base}; file name prefixes found: {found}")
    return chosen


def _builder_for(files: list[str]) -> str:
    kinds = {DATA_SUFFIXES[Path(f).suffix] for f in files}
    if len(kinds) != 1:
        raise SourceError(f"mixed data file kinds {sorted(kinds)}: point --from at one kind")
    return kinds.pop()


def _load_local(path: Path, split: str | None, config_name: str | None, cache_dir: str | None, data_files: str | None):
    import datasets

    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            chosen = split or next(iter(loaded))
            if chosen not in loaded:
                raise SourceError(f"split {chosen!r} not in {path}; splits found: {list(loaded)}")
            return loaded[chosen]
        return loaded
    if path.is_file():
        files = [str(path)]
    else:
        base = path / config_name if config_name and (path / config_name).is_dir() else path
        files = [str(base / data_files)] if data_files else _split_files(base, split)
    builder = _builder_for(files)
    sep = "\t" if files[0].endswith(".tsv") else ","
    try:
        with _quiet("datasets.packaged_modules"):  # its error line would read as fatal: we say what happened
            return _load_files(builder, files, sep, cache_dir)
    except datasets.exceptions.DatasetGenerationError as exc:
        if builder not in ("json", "csv"):
            raise SourceError(f"cannot read {', '.join(files)}: {cause(exc)}") from None
        from tasks.sources.lines import set_aside_bad_lines

        # one malformed line fails its own row (tasks/sources/lines.py), not the whole source
        copies = set_aside_bad_lines(builder, files, sep, cache_dir or str(datasets.config.HF_DATASETS_CACHE), exc)
    try:
        return _load_files(builder, copies, sep, cache_dir)
    except datasets.exceptions.DatasetGenerationError as exc:
        raise SourceError(f"cannot read {', '.join(files)}: {cause(exc)}") from None


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_files(builder: str, files: list[str], sep: str, cache_dir: str | None):
    import datasets

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # Every field as the text it was written as: pandas would guess types per column, so an answer "3"
        # becomes the number 3 (3.0 in a column with an empty cell), "007" becomes 7 and "None" or "NA" null.
        # An empty field is the empty string.
        try:
            with open(files[0], newline="", encoding="utf-8-sig") as handle:
                width = len(next(csv.reader(handle, delimiter=sep), []))
        except UnicodeDecodeError as exc:
            raise SourceError(f"cannot read {files[0]}: not UTF-8 text ({exc})") from None
        kwargs = {"sep": sep, "converters": dict.fromkeys(range(width), str), "keep_default_na": False}
    return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)


def local_state(from_: str) -> str | None:
    """A signature of a local source's data files (names, sizes, modification times); None for a Hub id.

    Part of the per-process cache key, so a long-lived worker (``polite serve`` running a nightly schedule over a
    growing or repaired local dataset) reloads it when its files change instead of reading a stale copy.
    It is computed on every load (once per shard), so only data files count, as ``_split_files`` picks them:
    an image folder beside the data (LLaVA's ``images/``) or a ``.git`` is not walked file by file.
    """
    if not looks_local(from_):
        return None
    path = Path(os.path.expanduser(from_))
    if not path.exists():
        return None
    if path.is_file():
        files = [path]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix in DATA_SUFFIXES]
        files.sort()
    signature = [(str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    return hashlib.blake2b(repr(signature).encode(), digest_size=12).hexdigest()


def load_source(
    from_: str,
    split: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    data_files: str | None = None,
):
    """The dataset (one split) behind ``from_``, cached per process. Raises ``SourceError`` with what to fix."""
    key = ("dataset", from_, split, config_name, revision, cache_dir, data_files, local_state(from_))

    def build():
        import datasets

        datasets.disable_progress_bars()
        if looks_local(from_):
            path = Path(os.path.expanduser(from_)).resolve()
            if not path.exists():
                raise SourceError(f"--from {from_}: no such file or folder")
            return _load_local(path, split, config_name, cache_dir, data_files)
        kwargs: dict[str, Any] = {"split": split or "train", "revision": revision, "cache_dir": cache_dir}
        if data_files:
            kwargs["data_files"] = data_files
        try:
            return datasets.load_dataset(from_, config_name, **kwargs)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise SourceError(
                f"cannot load {from_!r} (config {config_name!r}, split {split!r}) from the Hub: {exc}. "
                "Offline? Point --from at a local copy of its files."
            ) from exc

    return cached(key, build)


def _has_json(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, dict):
        return any(_has_json(f) for f in feature.values())
    if isinstance(feature, list | tuple):
        return any(_has_json(f) for f in feature)
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return inner is not None and _has_json(inner)


def arrow_rows(dataset, start: int, stop: int, columns: list[str] | None = None, batch: int = 512):
    """Yield ``(row_index, row_dict)`` for rows ``[start, stop)``, decoding a small Arrow slice at a time.

    Image columns come back as their storage (``{"bytes": ..., "path": ...}``), never decoded by `datasets`:
    we check images ourselves so a bad one fails its row instead of the whole shard.

    A JSON file whose field holds different JSON types in different rows (a number among strings, a list in
    one row) gets a `Json` feature for that field, stored as JSON text: its values are decoded the way
    `datasets` decodes them, so each row gets back the value it was written with, and only the mistyped row
    fails, naming the field and the type it has.
    """
    from datasets.features.features import decode_nested_example

    table_view = dataset.with_format("arrow")
    if columns:
        table_view = table_view.select_columns(columns)
    features = dataset.features or {}
    json_columns = {c: f for c, f in features.items() if (not columns or c in columns) and _has_json(f)}
    for lo in range(start, stop, batch):
        hi = min(lo + batch, stop)
        for offset, row in enumerate(table_view[lo:hi].to_pylist()):
            for column, feature in json_columns.items():
                row[column] = decode_nested_example(feature, row[column])
            yield lo + offset, row
