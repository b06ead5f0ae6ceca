"""The filter funnel: per source and scorer, how many entered, were dropped and kept; and the reward
distribution of raw annotations, rewrites and kept rewrites. Read from the lineage's latest decisions."""

from __future__ import annotations

from typing import Any

from filters.base import sql_str
from filters.chain import CHAIN_ORDER, SCORER_CLASSES

FUNNEL_SCORERS = [n for n in CHAIN_ORDER if n != "reward_raw"]  # reward_raw never drops


def _decided(settings_hash: str | None) -> str:
    where = f"AND d.settings_hash = {sql_str(settings_hash)}" if settings_hash else ""
    return f"""
        SELECT s.source, s.task_type, len(coalesce(s.images, [])) AS n_images, r.rewrite_id, d.kept, d.dropped_by
        FROM latest_rewrites r
        JOIN samples s ON s.sample_id = r.sample_id
        JOIN latest_decisions d ON d.rewrite_id = r.rewrite_id
        WHERE r.status = 'ok' {where}"""


def funnel(store: Any, settings_hash: str | None = None) -> list[dict[str, Any]]:
    """Rows ``{source, step, scorer, entered, dropped, kept}`` in chain order, plus an ``(all)`` source and a
    ``final`` step per source. A scorer "enters" the rewrites it applies to that no earlier scorer dropped.
    ``settings_hash`` limits it to decisions made under those settings (default: each rewrite's latest)."""
    present = {r["scorer"] for r in store.query("SELECT DISTINCT scorer FROM scores").to_pylist()}
    rank = " ".join(f"WHEN {sql_str(n)} THEN {i}" for i, n in enumerate(FUNNEL_SCORERS))
    selects = []
    for i, name in enumerate(FUNNEL_SCORERS):
        if name not in present:
            continue
        applies = SCORER_CLASSES[name].applies_sql("task_type", "n_images")
        selects.append(
            f"SELECT coalesce(source, '(all)') AS source, {i} AS step, {sql_str(name)} AS scorer, "
            f"count(*) FILTER (WHERE ({applies}) AND drop_rank >= {i}) AS entered, "
            f"count(*) FILTER (WHERE drop_rank = {i}) AS dropped "
            f"FROM ranked GROUP BY GROUPING SETS ((source), ())"
        )
    selects.append(
        f"SELECT coalesce(source, '(all)') AS source, {len(FUNNEL_SCORERS)} AS step, 'final' AS scorer, "
        "count(*) AS entered, count(*) FILTER (WHERE NOT kept) AS dropped "
        "FROM ranked GROUP BY GROUPING SETS ((source), ())"
    )
    sql = f"""
        WITH decided AS ({_decided(settings_hash)}),
        ranked AS (SELECT *, CASE dropped_by {rank} ELSE 1000 END AS drop_rank FROM decided)
        SELECT source, step, scorer, entered, dropped, entered - dropped AS kept
        FROM ({" UNION ALL ".join(selects)})
        WHERE entered > 0 OR dropped > 0
        ORDER BY source = '(all)', source, step"""
    rows = store.query(sql).to_pylist()
    return [{k: v for k, v in r.items() if k != "step"} for r in rows]


def reward_distribution(store: Any, settings_hash: str | None = None) -> list[dict[str, Any]]:
    """Per source (and ``(all)``): n, mean, p10, median, p90 of reward for raw, rewritten and kept."""
    stats = []
    for label, column, cond in (
        ("raw", "raw_reward", "TRUE"),
        ("rewritten", "reward", "TRUE"),
        ("kept", "reward", "kept"),
    ):
        stats.append(
            f"SELECT coalesce(source, '(all)') AS source, '{label}' AS which, count({column}) AS n, "
            f"avg({column}) AS mean, quantile_cont({column}, 0.1) AS p10, median({column}) AS median, "
            f"quantile_cont({column}, 0.9) AS p90 FROM joined WHERE {cond} GROUP BY GROUPING SETS ((source), ())"
        )
    sql = f"""
        WITH decided AS ({_decided(settings_hash)}),
        joined AS (SELECT d.*, sc.reward, sc.raw_reward FROM decided d LEFT JOIN score_columns sc USING (rewrite_id))
        SELECT * FROM ({" UNION ALL ".join(stats)}) WHERE n > 0
        ORDER BY source = '(all)', source, which"""
    rows = store.query(sql).to_pylist()
    for r in rows:
        for k in ("mean", "p10", "median", "p90"):
            r[k] = None if r[k] is None else round(float(r[k]), 4)
    return rows


def render(
    rows: list[dict[str, Any]], rewards: list[dict[str, Any]], skipped: list[dict[str, str]] | None = None
) -> None:
    """Print the funnel (and reward distribution, and skipped scorers) on the terminal with rich."""
    from rich.console import Console
    from rich.table import Table

    from polite.printing import print_wide

    console = Console()
    table = Table(title="filter funnel")
    for col in ("source", "scorer", "entered", "dropped", "kept"):
        table.add_column(col, justify="right" if col in ("entered", "dropped", "kept") else "left")
    for r in rows:
        table.add_row(r["source"], r["scorer"], str(r["entered"]), str(r["dropped"]), str(r["kept"]))
    print_wide(table, console)
    if rewards:
        rt = Table(title="reward: raw vs rewritten vs kept")
        for col in ("source", "which", "n", "mean", "p10", "median", "p90"):
            rt.add_column(col)
        for r in rewards:
            rt.add_row(*[str(r[c]) for c in ("source", "which", "n", "mean", "p10", "median", "p90")])
        print_wide(rt, console)
    # also in the flow's log warnings, but those do not reach every console a command prints to (a deployment's
    # logs go to its worker): under the funnel they always do
    for s in skipped or []:
        console.print(f"[yellow]skipped[/] {s['scorer']}: {s['why']}; enable with `{s['enable_with']}`")
