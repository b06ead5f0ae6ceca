"""Malformed lines of local JSON Lines and CSV files: each fails its own row instead of the whole load.

`datasets` reads a JSON Lines or CSV file in blocks and stops at the first line it cannot parse, so one
missing ``}`` or one unquoted comma would stop the whole source. When a load fails, ``set_aside_bad_lines``
finds the malformed lines and writes a copy of the split's files in which each of them is a row holding only
its reason, in the column ``LINE_ERROR`` (``build_samples`` turns that row into a failed sample). Every other
line keeps its row index, so row-keyed sample ids stay the same once the line is fixed. The copies live in the
datasets cache, named by the files' names, sizes and modification times: the original files are never touched.

A JSON file that is one document (``[...]`` or a pretty-printed object) cannot be read past its first error:
that stops before any work with the file, line and column to fix.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from tasks.sources.loading import SourceError, cause

LINE_ERROR = "__polite_line_error__"
_VERSION = 1  # part of the copies' folder name: bump when what a copy holds changes


def _is_document(path: str) -> bool:
    """A JSON file holding one document (an array, or an object spread over lines) rather than JSON Lines."""
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.removeprefix(codecs.BOM_UTF8).strip()
            if line:
                return line.startswith(b"[") or line == b"{"
    return False


def _json_problems(path: str) -> dict[int, str] | None:
    """``{line number: reason}`` for a JSON Lines file; None for a JSON document that parses."""
    name = Path(path).name
    if _is_document(path):
        try:
            with open(path, encoding="utf-8-sig") as handle:
                json.load(handle)
        except ValueError as exc:
            where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else exc
            raise SourceError(
                f"{path}: JSON parse error at {where}. The file is one JSON document, so nothing in it can be "
                "read past this error: fix it (or write one record per line, JSON Lines, so a bad line fails alone)"
            ) from None
        return None
    problems = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.strip())
            except json.JSONDecodeError as exc:
                problems[number] = f"{name} line {number}: JSON parse error: {exc.msg} at column {exc.colno}"
                continue
            except ValueError as exc:  # not UTF-8
                problems[number] = f"{name} line {number}: {exc}"
                continue
            if not isinstance(value, dict):
                problems[number] = f"{name} line {number}: not a JSON object ({type(value).__name__})"
    return problems


def _csv_rows(path: str, sep: str):
    """``(first line number, fields)`` of each record after the header, and the header."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=sep)
        yield 1, next(reader, [])
        start = reader.line_num + 1
        for row in reader:
            yield start, row
            start = reader.line_num + 1


def _csv_problems(path: str, sep: str) -> dict[int, str]:
    rows = _csv_rows(path, sep)
    _, header = next(rows)
    name = Path(path).name
    return {
        number: f"{name} line {number}: {len(row)} fields where the header has {len(header)} "
                f"(quote a field that holds {sep!r})"
        for number, row in rows if len(row) > len(header)
    }


def _write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_json(path: str, problems: dict[int, str], target: Path) -> None:
    def write(tmp: Path) -> None:
        marked = False  # the first record names the column, so `datasets` infers it from the first block
        with open(path, "rb") as src, open(tmp, "wb") as out:
            for number, raw in enumerate(src, start=1):
                raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
                if not raw.strip():
                    out.write(raw)
                    continue
                if number in problems:
                    record = {LINE_ERROR: problems[number]}
                elif not marked:
                    record = {**json.loads(raw), LINE_ERROR: ""}
                else:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    continue
                marked = True
                out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    _write_atomic(target, write)


def _copy_csv(path: str, problems: dict[int, str], target: Path, sep: str) -> None:
    def write(tmp: Path) -> None:
        rows = _csv_rows(path, sep)
        _, header = next(rows)
        with open(tmp, "w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out, delimiter=sep)
            writer.writerow([*header, LINE_ERROR])
            for number, row in rows:
                if not row:  # a blank line is no row, for pandas too
                    continue
                if number in problems:
                    writer.writerow([""] * len(header) + [problems[number]])
                else:  # a short row is padded, as pandas pads it
                    writer.writerow(row + [""] * (len(header) - len(row)) + [""])

    _write_atomic(target, write)


def set_aside_bad_lines(builder: str, files: list[str], sep: str, folder: str, error: BaseException) -> list[str]:
    """Copies of ``files`` in which each malformed line is a row holding its reason in ``LINE_ERROR``.

    ``error`` is what the load of the originals raised: when no line is malformed, it is reported as the
    reason, as a ``SourceError`` naming the files.
    """
    try:
        problems = {f: _json_problems(f) if builder == "json" else _csv_problems(f, sep) for f in files}
    except UnicodeDecodeError as exc:
        raise SourceError(f"cannot read {', '.join(files)}: not UTF-8 text ({exc})") from None
    first = next((reason for found in problems.values() if found for reason in found.values()), None)
    if first is None:
        raise SourceError(f"cannot read {', '.join(files)}: {cause(error)}")
    if any(found is None for found in problems.values()):  # a JSON document among JSON Lines files
        raise SourceError(f"{first}: fix this line (and any other malformed one) and ingest again")
    signature = [(f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)]]
    digest = hashlib.blake2b(repr((_VERSION, sep, signature)).encode(), digest_size=12).hexdigest()
    target = Path(folder) / "polite-malformed-lines" / digest
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, path in enumerate(files):
        copy = target / f"{i:05d}-{Path(path).name}"
        if not copy.exists():  # reused: its name changes with the originals
            if builder == "json":
                _copy_json(path, problems[path], copy)
            else:
                _copy_csv(path, problems[path], copy, sep)
        copies.append(str(copy))
    return copies
