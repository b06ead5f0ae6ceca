"""Settings of the export stage (issue 7 owns and grows this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ExportSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
