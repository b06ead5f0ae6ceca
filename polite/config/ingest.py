"""Settings of the ingest stage: which sources, from where, and how rows map onto the sample record."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polite.record import TASK_TYPES

# The adapters in tasks/sources (a test keeps this list and the registry equal; config never imports tasks).
ADAPTER_NAMES = (
    "demo", "generic", "vqav2", "gqa", "aokvqa", "okvqa", "textvqa", "ocrvqa", "scienceqa", "clevr",
    "coco_captions", "flickr30k", "textcaps", "llava_instruct",
)


class ColumnMapping(BaseModel):
    """Declarative mapping from a dataset's columns onto the sample record (the generic adapter).

    Column names may use dots for struct fields and ``[i]`` for list items, e.g. ``answers[0].answer``.
    ``response`` may name a list column: ``response_join`` then joins its items (default one per line).
    ``instruction`` is the question that the task type's templates wrap, or, with ``instruction_verbatim``,
    the instruction itself; without it a template of the task type is used.
    """

    model_config = ConfigDict(extra="forbid")
    task_type: str
    key: str | None = None  # column holding a stable row key; default: the row index
    image: str | None = None  # column holding an image (datasets Image feature, bytes, or a path)
    images: str | None = None  # column holding a list of images
    instruction: str | None = None  # column holding the question/instruction; default: a template
    instruction_verbatim: bool = False
    options: str | None = None  # list column of answer options (multiple_choice templates)
    response: str
    response_join: str = "\n"
    meta: list[str] = Field(default_factory=list)  # extra columns copied into meta

    @model_validator(mode="after")
    def _known_task_type(self) -> ColumnMapping:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type {self.task_type!r} is not one of {list(TASK_TYPES)}")
        return self


class SourceSpec(BaseModel):
    """One dataset to ingest. ``adapter`` names a built-in adapter (``polite ingest --list`` names them)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    adapter: str
    name: str | None = None  # label in the lineage's ``source`` column; default: the adapter name
    from_: str | None = Field(default=None, alias="from")  # Hub id or local folder/files
    split: str | None = None
    config_name: str | None = None  # Hub dataset config (e.g. GQA's testdev_balanced_instructions)
    revision: str | None = None
    limit: int | None = Field(default=None, ge=1)
    mapping: ColumnMapping | None = None  # required by the ``generic`` adapter
    options: dict = Field(default_factory=dict)  # adapter-specific extras, documented per adapter

    @property
    def label(self) -> str:
        return self.name or self.adapter

    @model_validator(mode="after")
    def _known_adapter(self) -> SourceSpec:
        if self.adapter not in ADAPTER_NAMES:
            raise ValueError(f"unknown adapter {self.adapter!r}; known: {', '.join(ADAPTER_NAMES)}")
        if self.adapter == "generic" and self.mapping is None:
            raise ValueError("the generic adapter needs a `mapping` (task_type, response, ...)")
        return self


class IngestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(adapter="demo")])
    shard_size: int = Field(default=2000, ge=1, le=100_000)
