"""The filter flow: score the latest rewrites through the chain, decide, and show the funnel.

Only wires: picks the work from the lineage (rewrites without a decision under today's settings), writes
work shards, runs one task per shard (scores + decisions parquet), ingests each as it completes.
``rethreshold=True`` re-decides from stored scores in one SQL statement, without loading any model.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task

from flows.common import logger, map_shards, stage_run
from polite.config import ConfigError, resolve_config


@task(name="filter-shard")
def filter_shard(work_url: str, spec: dict, out_dir: str, run_id: str | None, full_scoring: bool) -> dict:
    from filters.shard import score_shard

    return score_shard(work_url, spec, out_dir, run_id=run_id, full_scoring=full_scoring)


def _write_work_shards(
    work, shard_size: int, folder: str, settings_hash: str, full_scoring: bool
) -> list[str]:
    from polite.ids import stable_hash
    from polite.shards import write_table_atomic

    urls = []
    for start in range(0, work.num_rows, shard_size):
        part = work.slice(start, shard_size)
        ids = part.column("rewrite_id").to_pylist()
        name = "w_" + stable_hash("filter-work", settings_hash, full_scoring, ids)
        urls.append(write_table_atomic(part, f"{folder}/{name}.parquet"))
    return urls


def _publish(summary: dict[str, Any], rows: list[dict], rewards: list[dict], skipped: list[dict]) -> None:
    from filters.funnel import render

    render(rows, rewards, skipped)
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            table=rows, key="filter-funnel", description="Filter funnel per source and scorer"
        )
        if rewards:
            create_table_artifact(
                table=rewards, key="filter-rewards", description="Reward: raw vs rewritten vs kept"
            )
    except Exception as exc:  # an artifact needs the API; the funnel is in the summary regardless
        logger().warning("could not store the funnel artifact: %s", exc)


@flow(name="filter")
def filter_flow(
    config: dict | str | None = None,
    workspace: str | None = None,
    parent_run_id: str | None = None,
    rethreshold: bool = False,
    full_scoring: bool = False,
) -> dict:
    """Filter the latest ok rewrites; resumable (decided rewrites and stored scores are never redone).

    ``rethreshold``: re-decide every filtered rewrite from stored scores with the config's thresholds.
    ``full_scoring``: score every applicable scorer even after an earlier scorer dropped the rewrite.
    """
    from filters.chain import build_chain
    from filters.funnel import funnel, reward_distribution
    from filters.sql import preview, record_settings, returning_sql, work_sql
    from filters.sql import rethreshold as redecide

    cfg = resolve_config(config)
    chain = build_chain(cfg.filters)  # a scorer enabled without its model: ScorerUnavailableError, a UserError
    if cfg.filters.enabled and not chain.scorers:
        raise ConfigError(
            "every scorer is disabled: enable at least one under `filters:` (e.g. filters.length.enabled: true)"
        )
    log = logger()
    with stage_run("filter", cfg.model_dump(mode="json"), workspace, parent_run_id) as run:
        if not cfg.filters.enabled:
            run.summary["skipped"] = "filters.enabled is false"
            return dict(run.summary)
        store, h = run.store, chain.settings_hash
        run.summary.update(settings_hash=h, scorers=chain.versions(), skipped=chain.skipped)
        for s in chain.skipped:
            log.warning("skipping %s: %s; enable with `%s`", s["scorer"], s["why"], s["enable_with"])
        if rethreshold:
            started = time.perf_counter()
            with store.writer() as con:
                result = redecide(con, chain, run.run_id)
            run.summary["rethreshold"] = {**result, "seconds": round(time.perf_counter() - started, 4)}
        else:
            work = run.workspace.locate_paths(store.query(work_sql(chain, full_scoring)), "image_paths")
            run.summary["rewrites"] = work.num_rows
            with store.writer() as con:  # the decisions' thresholds, before any decision refers to them
                record_settings(con, chain)
            folder = run.workspace.stage_dir("filter")
            urls = _write_work_shards(work, cfg.filters.shard_size, f"{folder}/work", h, full_scoring)
            run.summary["shards"] = len(urls)
            counts: dict[str, dict[str, int]] = {}

            def ingest(result: dict) -> None:
                with store.writer() as con:
                    # replace: a retried score that errored before overwrites its error row
                    store.ingest_parquet("scores", result["scores"], con=con, replace=True)
                    store.ingest_parquet("decisions", result["decisions"], con=con, replace=True)
                for scorer, c in result.get("counts", {}).items():
                    mine = counts.setdefault(scorer, {})
                    for k, v in c.items():
                        mine[k] = mine.get(k, 0) + v

            map_shards(
                filter_shard,
                urls,
                ingest,
                "filter",
                stage=run,
                spec=chain.spec(),
                out_dir=f"{folder}/out",
                run_id=run.run_id,
                full_scoring=full_scoring,
            )
            run.summary["scored"] = counts
            # Rewrites decided under these settings before, then re-decided with others (A -> B -> A): the
            # config is what decides, so its settings become their latest decision again, from stored scores.
            # The CLI says so: it undoes a `--rethreshold --set` that was never put in the config.
            returning = returning_sql(chain)
            with store.writer() as con:
                kept_before = preview(con, chain, scope=returning)["kept_now"]
                back = redecide(con, chain, run.run_id, scope=returning)
            run.summary["refreshed"] = back["decided"]
            run.summary["refreshed_kept"] = {"before": kept_before, "after": back["kept"]}
        rows = funnel(store, h)
        rewards = reward_distribution(store, h)
        kept = next((r for r in rows if r["source"] == "(all)" and r["scorer"] == "final"), None)
        run.summary.update(
            decided=kept["entered"] if kept else 0,
            kept=kept["kept"] if kept else 0,
            funnel=rows,
            rewards=rewards,
        )
        _publish(run.summary, rows, rewards, chain.skipped)
        return dict(run.summary)
