"""Settings of the filter chain (issue 6 owns and grows this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FilterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
