"""What every source adapter shares: the adapter contract, draft samples, and turning drafts into records.

An adapter only knows its dataset's layout: ``map_row`` turns one row into ``Draft`` samples (or raises).
``build_samples`` does the rest the same way for every source: ids, instruction templates, image storage
and the bad-input policy (a bad row or image becomes a failed sample with the reason; the run goes on).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from polite.config.ingest import SourceSpec
from polite.ids import sample_id
from polite.images import BadImageError, ImageStore
from polite.record import IMAGE_MARKER, Sample
from tasks.sources.lines import LINE_ERROR
from tasks.sources.loading import SourceError, load_source, looks_local
from tasks.sources.templates import render_instruction


class SkipRow(Exception):  # noqa: N818 - a signal, not an error
    """The row is out of scope for this source (e.g. a text-only ScienceQA question): counted, not failed."""


class RowError(ValueError):
    """The row cannot become a sample (empty or non-string annotation, missing field): it fails, the run goes on."""


@dataclass(slots=True)
class Draft:
    """One sample as the adapter sees it, before ids, templates and image storage."""

    raw: Any
    task_type: str
    question: str | None = None  # templated into the instruction; None = caption-style template
    instruction: str | None = None  # used verbatim (plus image markers) instead of a template
    options: list[str] | None = None
    images: list[Any] = field(default_factory=list)  # image column values, bytes, or file paths
    turn: int = 0
    split: str | None = None  # override the source split (the demo's hq/raw)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RowContext:
    """What ``build_samples`` needs beyond the row: where images go and where relative paths resolve."""

    label: str
    split: str
    revision: str
    store: ImageStore
    image_roots: list[Path]
    images: dict[str, dict] = field(default_factory=dict)  # image_id -> images-table row, for this shard


class Adapter:
    """Base class of a source adapter. Subclasses set the class attributes and implement ``map_row``."""

    name: ClassVar[str]
    hub_id: ClassVar[str | None] = None
    default_split: ClassVar[str | None] = None
    default_config: ClassVar[str | None] = None
    task_type: ClassVar[str] = "vqa"
    columns: ClassVar[tuple[str, ...]] = ()
    key_column: ClassVar[str | None] = None
    summary: ClassVar[str] = ""
    version: ClassVar[str] = "1"  # bump when the mapping of rows changes: shard paths depend on it
    # the options this adapter reads, besides `image_folder`, which every adapter takes (docs/ingest.md)
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: SourceSpec, workspace_root: str | None = None):
        self.spec = spec
        self.workspace_root = workspace_root
        self.options = dict(spec.options)
        self.check_options()

    def check_options(self) -> None:
        """Fail before any work on an option this adapter does not read (a typo would be silently ignored)
        or on an unusable value. Subclasses extend it to check their values."""
        known = [*self.option_names, "image_folder"]
        for name in self.options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                raise SourceError(
                    f"source {self.spec.label!r} ({self.name} adapter): unknown option {name!r}"
                    + (f"; did you mean {close[0]!r}?" if close else "") + f" (options: {', '.join(known)})"
                )
        folder = self.options.get("image_folder")
        if folder is not None and (not isinstance(folder, str) or not Path(os.path.expanduser(folder)).is_dir()):
            raise SourceError(
                f"source {self.spec.label!r}: option image_folder {folder!r} is not a folder; "
                "pass -o image_folder=DIR, the folder that relative image paths resolve against"
            )

    # -- where the data is ---------------------------------------------------------------------------
    @property
    def source(self) -> str:
        origin = self.spec.from_ or self.hub_id
        if not origin:
            raise SourceError(f"source {self.spec.label!r}: give --from (a Hub id or a local folder)")
        return origin

    @property
    def split(self) -> str | None:
        return self.spec.split or self.default_split

    @property
    def config_name(self) -> str | None:
        return self.spec.config_name or self.default_config

    @property
    def cache_dir(self) -> str | None:
        if self.workspace_root and "://" not in self.workspace_root:
            return os.path.join(self.workspace_root, "cache", "datasets")
        return None

    def load(self):
        """The dataset this adapter reads (cached per process)."""
        return load_source(self.source, self.split, self.config_name, self.spec.revision, self.cache_dir)

    def image_roots(self) -> list[Path]:
        """Folders that relative image paths are resolved against."""
        roots = []
        if self.options.get("image_folder"):
            roots.append(Path(os.path.expanduser(self.options["image_folder"])))
        if self.spec.from_ and looks_local(self.spec.from_):
            src = Path(os.path.expanduser(self.spec.from_)).resolve()
            roots.append(src if src.is_dir() else src.parent)
        return roots

    # -- checks before any work ----------------------------------------------------------------------
    def required_columns(self) -> list[str]:
        return list(self.columns)

    def check_columns(self, found: list[str]) -> None:
        missing = [c for c in self.required_columns() if c.split(".")[0].split("[")[0] not in found]
        if missing:
            raise SourceError(
                f"source {self.spec.label!r} ({self.name} adapter, {self.source}): "
                f"column(s) {missing} not found; columns found: {sorted(found)}"
            )

    def prepare(self, dataset) -> None:
        """Build per-process lookups the rows need (e.g. a join table). Default: nothing."""

    # -- mapping ---------------------------------------------------------------------------------------
    def row_key(self, row: dict, index: int) -> str:
        if self.key_column and row.get(self.key_column) not in (None, ""):
            return str(row[self.key_column])
        return str(index)

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        raise NotImplementedError


# -- helpers adapters share ---------------------------------------------------------------------------------
def text(value: Any, what: str) -> str:
    """A non-empty string annotation, or ``RowError`` saying what was wrong."""
    if value is None:
        raise RowError(f"{what} is missing (null)")
    if not isinstance(value, str):
        raise RowError(f"{what} is not a string ({type(value).__name__})")
    if not value.strip():
        raise RowError(f"{what} is empty")
    return value.strip()


def text_list(value: Any, what: str) -> list[str]:
    if value is None:
        raise RowError(f"{what} is missing (null)")
    if not isinstance(value, list):
        raise RowError(f"{what} is not a list ({type(value).__name__})")
    items = [text(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if not items:
        raise RowError(f"{what} is empty")
    return items


def most_common(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one seen first (deterministic)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def image_bytes(value: Any, roots: list[Path]) -> bytes:
    """Bytes of an image column value (``{"bytes", "path"}`` storage, raw bytes, or a file path)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if value is None or value == "":
        raise BadImageError("image missing (null)")
    if not isinstance(value, str):
        raise BadImageError(f"image value of unexpected type {type(value).__name__}")
    candidates = [Path(os.path.expanduser(value))] + [root / value for root in roots]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate.read_bytes()
        except OSError as exc:  # unreadable (permissions, an I/O error): this sample fails, not its shard
            raise BadImageError(f"cannot read image file {candidate}: {exc.strerror or exc}") from exc
    raise BadImageError(f"image file not found: {value}")


# -- drafts -> records -------------------------------------------------------------------------------------
def _instruction(draft: Draft, sid: str) -> str:
    n = len(draft.images)
    if draft.instruction is not None:
        body = draft.instruction.replace(IMAGE_MARKER, "").strip()
        return IMAGE_MARKER * n + body
    return render_instruction(draft.task_type, sid, draft.question, draft.options, n_images=n)


def failed_sample(
    adapter: Adapter, ctx: RowContext, key: str, turn: int, reason: str, split: str | None = None,
    task_type: str | None = None,
) -> Sample:
    split = split or ctx.split
    return Sample(
        sample_id=sample_id(ctx.label, split, key, turn), source=ctx.label, split=split,
        task_type=task_type or adapter.task_type, instruction="", raw_response="", source_revision=ctx.revision,
        source_key=key, status="failed", error=reason,
    )


def build_samples(adapter: Adapter, row: dict, index: int, ctx: RowContext) -> tuple[list[Sample], int]:
    """The records of one row, and 1 if the row was skipped. Never raises for bad input."""
    if row.get(LINE_ERROR):  # a line of the file that could not be parsed (tasks/sources/lines.py)
        return [failed_sample(adapter, ctx, str(index), 0, row[LINE_ERROR])], 0
    try:
        key = adapter.row_key(row, index)
    except Exception as exc:  # a broken key column still leaves a traceable record
        key = str(index)
        return [failed_sample(adapter, ctx, key, 0, f"row {index}: bad key: {exc}")], 0
    try:
        drafts = list(adapter.map_row(row, index))
    except SkipRow:
        return [], 1
    except BadImageError as exc:
        return [failed_sample(adapter, ctx, key, 0, f"bad image: {exc}")], 0
    except RowError as exc:
        return [failed_sample(adapter, ctx, key, 0, str(exc))], 0
    except Exception as exc:
        return [failed_sample(adapter, ctx, key, 0, f"row {index} does not map: {type(exc).__name__}: {exc}")], 0
    samples = []
    seen: dict[int, Any] = {}  # drafts of one row share image values: decode and store each once

    def store(value: Any):
        if id(value) not in seen:
            try:
                seen[id(value)] = ctx.store.put(image_bytes(value, ctx.image_roots))
            except BadImageError as exc:
                seen[id(value)] = exc
        if isinstance(seen[id(value)], BadImageError):
            raise seen[id(value)]
        return seen[id(value)]

    for draft in drafts:
        split = draft.split or ctx.split
        sid = sample_id(ctx.label, split, key, draft.turn)
        try:
            raw = text(draft.raw, "annotation")
            if draft.question is not None:
                text(draft.question, "question")
            if draft.instruction is not None:  # a verbatim instruction of image markers alone asks nothing
                text(draft.instruction.replace(IMAGE_MARKER, ""), "instruction")
            stored = [store(v) for v in draft.images]
        except (RowError, BadImageError) as exc:
            reason = f"bad image: {exc}" if isinstance(exc, BadImageError) else str(exc)
            samples.append(failed_sample(adapter, ctx, key, draft.turn, reason, split, draft.task_type))
            continue
        for image in stored:
            ctx.images.setdefault(image.image_id, image.to_row())
        samples.append(
            Sample(
                sample_id=sid, source=ctx.label, split=split, task_type=draft.task_type,
                instruction=_instruction(draft, sid), raw_response=raw, images=[i.image_id for i in stored],
                source_revision=ctx.revision, source_key=key, meta=draft.meta,
            )
        )
    return samples, 0
