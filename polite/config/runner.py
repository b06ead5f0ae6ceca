"""Where tasks run: threads in the flow process (default), or a Ray cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RunnerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["threads", "ray"] = "threads"
    max_workers: int = Field(default=2, ge=1)
    ray_address: str | None = None  # None starts a local Ray; "auto" or "ray://host:10001" joins a cluster
    gpus_per_rewrite_task: float = Field(default=0.0, ge=0)
    gpus_per_filter_task: float = Field(default=0.0, ge=0)
