"""Where tasks run: threads in the flow process (default), or a Ray cluster (flows/runners.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RunnerSettings(BaseModel):
    """Task runner of the shard-parallel stages (rewrite, filter; ingest/distort/export use threads).

    With ``kind: ray`` each shard task becomes a Ray task annotated with the resources below; the flow
    process stays the only DuckDB writer, so the workspace must be on storage every Ray node can reach
    (a shared filesystem path or an fsspec URL such as ``s3://bucket/ws``).
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["threads", "ray"] = "threads"
    max_workers: int = Field(default=2, ge=1)  # threads runner: concurrent shard tasks
    ray_address: str | None = None  # None starts a local Ray; "auto" or "ray://host:10001" joins a cluster
    ray_num_cpus: int | None = Field(default=None, ge=1)  # local Ray only: CPUs it may use (None: all)
    ray_object_store_mb: int | None = Field(default=None, ge=75)  # local Ray only: object store size
    gpus_per_rewrite_task: float = Field(default=0.0, ge=0)
    gpus_per_filter_task: float = Field(default=0.0, ge=0)
    cpus_per_task: float = Field(default=1.0, gt=0)
    ray_stages: list[Literal["ingest", "distort", "rewrite", "filter", "export"]] = Field(
        default_factory=lambda: ["rewrite", "filter"]
    )
