"""The generic adapter: any `datasets` dataset, mapped onto the record by a ``ColumnMapping`` in config."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from polite.config.ingest import ColumnMapping
from tasks.sources.base import Adapter, Draft, RowError
from tasks.sources.loading import SourceError

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@lru_cache(maxsize=256)
def parse_path(path: str) -> tuple[str | int, ...]:
    """``"answers[0].answer"`` -> ``("answers", 0, "answer")``."""
    parts: list[str | int] = []
    for name, index in _TOKEN.findall(path):
        parts.append(int(index) if index else name)
    if not parts or not isinstance(parts[0], str):
        raise ValueError(f"column path {path!r} must start with a column name")
    return tuple(parts)


def get_path(row: dict, path: str) -> Any:
    value: Any = row
    for part in parse_path(path):
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError) as exc:
            raise RowError(f"{path}: no {part!r} in this row") from exc
        if value is None:
            return None
    return value


class Generic(Adapter):
    """Any dataset `datasets` can open (Hub id, folder, parquet/json/csv file, ``save_to_disk`` output).

    The source's ``mapping`` says which columns hold the key, image(s), instruction/question and response;
    a list-valued response is joined with ``response_join``. Without an instruction column, the task type's
    templates supply one; with ``instruction_verbatim`` the column is used as is, else it is the question the
    templates wrap.
    """

    name = "generic"
    summary = "any dataset, mapped by a ColumnMapping in config (--mapping FILE on the CLI)"

    def __init__(self, spec, workspace_root=None):
        super().__init__(spec, workspace_root)
        if spec.mapping is None:
            raise SourceError(f"source {spec.label!r}: the generic adapter needs a `mapping` (see docs/ingest.md)")
        self.mapping: ColumnMapping = spec.mapping
        self.task_type = self.mapping.task_type

    @property
    def split(self) -> str | None:
        return self.spec.split

    def required_columns(self) -> list[str]:
        m = self.mapping
        named = [m.key, m.image, m.images, m.instruction, m.response, m.options, *m.meta]
        return [c for c in named if c]

    def row_key(self, row: dict, index: int) -> str:
        if self.mapping.key:
            value = get_path(row, self.mapping.key)
            if value in (None, ""):
                raise RowError(f"key column {self.mapping.key} is empty")
            return str(value)
        return str(index)

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        m = self.mapping
        response = get_path(row, m.response)
        if isinstance(response, list):
            if not all(isinstance(item, str) for item in response):
                raise RowError(f"{m.response} holds non-string items")
            response = m.response_join.join(item.strip() for item in response if item.strip())
        images: list[Any] = []
        if m.image:
            images.append(get_path(row, m.image))
        if m.images:
            images.extend(get_path(row, m.images) or [])
        instruction = get_path(row, m.instruction) if m.instruction else None
        if instruction is not None and not isinstance(instruction, str):
            raise RowError(f"{m.instruction} is not a string ({type(instruction).__name__})")
        if m.instruction and instruction is None:
            raise RowError(f"{m.instruction} is missing (null)")
        options = get_path(row, m.options) if m.options else None
        verbatim = m.instruction_verbatim and instruction is not None
        yield Draft(
            raw=response, task_type=m.task_type, images=images,
            question=None if verbatim else instruction, instruction=instruction if verbatim else None,
            options=[str(o) for o in options] if options else None,
            meta={path: get_path(row, path) for path in m.meta},
        )
