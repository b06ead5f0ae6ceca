"""Settings of the distortion stage (issue 3 owns and grows this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DistortSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
