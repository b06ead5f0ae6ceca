"""The generic adapter: any `datasets` dataset, mapped onto the record by a ``ColumnMapping`` in config."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from polite.config.ingest import ColumnMapping
from polite.images import BadImageError
from tasks.sources.base import Adapter, Draft, RowError, text_list
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
    version = "2"  # 2: a string in `images` is one image; `options` must be a list; numbers are text

    def __init__(self, spec, workspace_root=None):
        super().__init__(spec, workspace_root)
        if spec.mapping is None:
            raise SourceError(f"source {spec.label!r}: the generic adapter needs a `mapping` (see docs/ingest.md)")
        self.mapping: ColumnMapping = spec.mapping
        self.task_type = self.mapping.task_type
        m = self.mapping
        if m.task_type == "multiple_choice" and not m.options and not m.instruction_verbatim:
            raise SourceError(
                f"source {spec.label!r}: task_type multiple_choice templates list the options: map `options` "
                "to a list column, or give the whole instruction with `instruction` and `instruction_verbatim: true`"
            )

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
            items = [as_text(item, f"{m.response}[{i}]") for i, item in enumerate(response)]
            if None in items:
                raise RowError(f"{m.response}[{items.index(None)}] is missing (null)")
            response = m.response_join.join(item.strip() for item in items if item.strip())
        instruction = get_path(row, m.instruction) if m.instruction else None
        if instruction is not None and not isinstance(instruction, str):
            raise RowError(f"{m.instruction} is not a string ({type(instruction).__name__})")
        if m.instruction and instruction is None:
            raise RowError(f"{m.instruction} is missing (null)")
        verbatim = m.instruction_verbatim and instruction is not None
        yield Draft(
            raw=as_text(response, m.response), task_type=m.task_type, images=self._images(row),
            question=None if verbatim else instruction, instruction=instruction if verbatim else None,
            options=self._options(row) if m.options else None,
            meta={path: get_path(row, path) for path in m.meta},
        )

    def _images(self, row: dict) -> list[Any]:
        m = self.mapping
        images: list[Any] = []
        if m.image:
            images.append(get_path(row, m.image))  # null fails the row in build_samples, as "image missing"
        if m.images:
            value = get_path(row, m.images)
            if value is None or value == []:  # like a null `image`: a row without its image fails
                raise BadImageError(f"{m.images} holds no image ({'null' if value is None else 'empty list'})")
            # a single value (one path, one image struct) is one image, not a sequence of characters or keys
            images.extend(value if isinstance(value, list) else [value])
        return images

    def _options(self, row: dict) -> list[str]:
        name = self.mapping.options
        value = get_path(row, name)
        if isinstance(value, list):
            value = [as_text(option, f"{name}[{i}]") for i, option in enumerate(value)]
        return text_list(value, name)  # a string is not a list of options: "red or blue" would be r, e, d, ...


def as_text(value: Any, what: str) -> Any:
    """A mapped text value: a number counts as the text it was written as (a JSON answer ``3`` is "3");
    null and empty strings pass through, for the record's own checks to name; any other type fails the row."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if value is not None and not isinstance(value, str):
        raise RowError(f"{what} is not a string ({type(value).__name__}: {str(value)[:40]})")
    return value
