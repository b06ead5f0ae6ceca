"""Task runners: threads in the flow process, or Ray (prefect-ray) across a cluster.

Why Ray rather than Dask: the heavy stages are GPU model servers, and Ray schedules on fractional GPU
resources (``num_gpus=0.5`` puts two filter workers on one card) and keeps worker processes - and so the
per-process model caches - alive between tasks, with one ``ray start`` per node. Dask can express GPUs only as
free-form worker "resources" and does neither as directly.

The flow process stays the only DuckDB writer: a Ray task reads and writes shard files (on storage every
node can reach: a shared filesystem or an fsspec URL) and returns their paths; the flow ingests them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from polite.config import ConfigError
from polite.config.runner import RunnerSettings

# Environment a Ray worker needs to behave like the flow process (offline hubs, no telemetry, no proxy
# for the local Prefect API). Values come from the driver's environment when set there.
_FORWARDED_ENV = (
    "PREFECT_API_URL",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "DO_NOT_TRACK",
    "NO_PROXY",
    "no_proxy",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "POLITE_WORKSPACE",
    "PREFECT_LOGGING_LEVEL",
)

STAGE_GPU_SETTING = {"rewrite": "gpus_per_rewrite_task", "filter": "gpus_per_filter_task"}
RAY_MISSING = (
    "runner.kind = ray needs prefect-ray and ray (the project's `ray` extra): pip install prefect-ray ray"
)


def uses_ray(settings: RunnerSettings, stage: str | None = None) -> bool:
    return settings.kind == "ray" and (stage is None or stage in settings.ray_stages)


def ray_init_kwargs(settings: RunnerSettings) -> dict[str, Any]:
    """Arguments of ``ray.init``: a small local instance, or just the environment for a cluster."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
    if settings.ray_address is None:  # a local instance: only then may we size it
        kwargs["include_dashboard"] = False
        if settings.ray_num_cpus is not None:
            kwargs["num_cpus"] = settings.ray_num_cpus
        if settings.ray_object_store_mb is not None:
            kwargs["object_store_memory"] = settings.ray_object_store_mb * 1024 * 1024
    return kwargs


def task_runner_for(settings: RunnerSettings, stage: str | None = None):
    """The Prefect task runner for ``stage`` (``None``: any stage) under these runner settings."""
    if not uses_ray(settings, stage):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:  # the `ray` extra is optional: a config this install cannot run
        raise ConfigError(f"{RAY_MISSING}: {exc}") from None
    return RayTaskRunner(address=settings.ray_address, init_kwargs=ray_init_kwargs(settings))


def remote_resources(settings: RunnerSettings, stage: str) -> dict[str, float]:
    """Ray resource annotations of one shard task of ``stage`` (GPUs for rewrite/filter, CPUs for all)."""
    resources: dict[str, float] = {"num_cpus": settings.cpus_per_task}
    gpus = getattr(settings, STAGE_GPU_SETTING[stage]) if stage in STAGE_GPU_SETTING else 0.0
    if gpus:
        resources["num_gpus"] = gpus
    return resources


def stage_resources(settings: RunnerSettings, stage: str):
    """Context in which ``stage``'s task submissions carry their Ray resource annotations.

    prefect-ray reads the annotations from a context variable at submit time, and a subflow submits from
    the caller's thread, so wrapping the subflow call is enough: stage flows need no Ray code.
    """
    if not uses_ray(settings, stage):
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(**remote_resources(settings, stage))


@contextmanager
def ray_session(settings: RunnerSettings) -> Iterator[None]:
    """Start (or join) Ray once for a whole factory run, so each stage's runner reuses it.

    Without this every Ray-run subflow would start and stop its own local instance (~10 s each).
    """
    if settings.kind != "ray":
        yield
        return
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"{RAY_MISSING}: {exc}") from None

    owned = not ray.is_initialized()
    if owned:
        address = settings.ray_address
        ray.init(address=address, namespace="prefect", **ray_init_kwargs(settings))
    try:
        yield
    finally:
        if owned:
            ray.shutdown()
