"""Settings of the rewrite stage (issue 5 owns and grows this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RewriteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
