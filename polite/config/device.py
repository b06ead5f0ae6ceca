"""The ``device`` settings: a torch device name, checked when the config loads. A misspelt device ("gpu") would
otherwise fail every shard at model load, after the work shards were written. Only the spelling is checked: the
process reading the config may run where the workers' GPUs are not, and importing torch here would slow every
command."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

_DEVICE = re.compile(r"cpu|mps|(?:cuda|xpu)(?::\d+)?")


def _named(value: str, auto: bool) -> str:
    if (auto and value == "auto") or _DEVICE.fullmatch(value):
        return value
    choices = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
    raise ValueError(f"{value!r} is not a torch device; use {choices}")


# A device for a stage that has no automatic choice.
Device = Annotated[str, AfterValidator(lambda v: _named(v, auto=False))]
# "auto" or a device; the stage picks CUDA when it is there.
DeviceOrAuto = Annotated[str, AfterValidator(lambda v: _named(v, auto=True))]
# None (or "auto", the same): CUDA when available, else the CPU.
OptionalDevice = Annotated[
    str | None,
    BeforeValidator(lambda v: None if v == "auto" else v),
    AfterValidator(lambda v: v if v is None else _named(v, auto=True)),
]
