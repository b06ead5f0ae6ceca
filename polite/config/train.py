"""Settings of rewriter training (issue 4 owns and grows this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
