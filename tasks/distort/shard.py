"""The distortion stage over one shard: selected sample rows in, pair rows out (one parquet file each).

The output path is chosen by the flow from the shard's samples and the variant, so a repeated task finds its
output and does nothing. Bad samples become failed pairs with a reason; only a broken shard file raises.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from polite.config.distort import DistortSettings
from polite.shards import exists, read_table, write_table_atomic
from tasks.distort.record import Pair, pairs_to_table


def distort_shard(job: dict[str, Any], settings: dict[str, Any], run_seed: int) -> str:
    """Make the pairs of one work shard. ``job``: ``{"method", "variant", "work", "out"}`` (URLs)."""
    out = job["out"]
    if exists(out):
        return out
    rows = read_table(job["work"]).to_pylist()
    distort = DistortSettings.model_validate(settings)
    method, variant = job["method"], job["variant"]
    pairs: list[Pair]
    if method == "augment":
        from tasks.distort.augment import distort_augment

        pairs = distort_augment(rows, distort.augment, variant, run_seed)
    elif method == "retrieve":
        from tasks.distort.retrieve import distort_retrieve

        pairs = distort_retrieve(rows, variant, run_seed)
    elif method == "llm":
        from tasks.distort.backends import get_backend
        from tasks.distort.llm import distort_llm

        assert distort.llm is not None, "the flow validates that an llm mix entry has llm settings"
        pairs = distort_llm(rows, distort.llm, get_backend(distort.llm), variant, run_seed)
    else:
        raise ValueError(f"unknown distortion method {method!r}")
    return write_table_atomic(pairs_to_table(pairs), out)


@task(name="distort-shard", task_run_name="distort-{job[method]}-{job[key]}")
def distort_shard_task(job: dict[str, Any], settings: dict[str, Any], run_seed: int) -> str:
    return distort_shard(job, settings, run_seed)
