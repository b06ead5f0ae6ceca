"""Orchestration overhead of the factory: time in Prefect machinery vs time in stage work.

Runs the factory (default: the offline demo) in a fresh workspace with a private Prefect home, then reads
every flow run and task run back from the Prefect API and prints, per stage flow:
  wall        the subflow's run time (Prefect's own start/end)
  in tasks    time during which at least one shard task was running (the union of task intervals)
  task sum    the sum of task run times (> in-tasks when tasks overlap)
  flow-side   wall - in tasks: picking work in DuckDB, ingesting results, and Prefect's bookkeeping
It then measures Prefect's fixed costs with no-op work: per task (submit + run + result) and per subflow.

    .venv/bin/python bench/orchestration.py                 # the demo (several minutes on 2 cores)
    .venv/bin/python bench/orchestration.py --config configs/demo.yaml --set ingest.sources.0.options.scenes=20
    .venv/bin/python bench/orchestration.py --micro-only    # just the fixed costs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _ts(value) -> float:
    return value.timestamp()


def micro(n_tasks: int, n_flows: int) -> dict[str, float]:
    """Per-task and per-subflow fixed costs of Prefect with no work inside."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    @task
    def noop(i: int) -> int:
        return i

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def many_tasks(n: int) -> int:
        return sum(f.result() for f in [noop.submit(i) for i in range(n)])

    @flow
    def child() -> int:
        return 1

    @flow
    def many_flows(n: int) -> int:
        return sum(child() for _ in range(n))

    many_tasks(2)  # warm up: imports, API client, registration
    started = time.perf_counter()
    many_tasks(n_tasks)
    per_task = (time.perf_counter() - started) / n_tasks
    many_flows(1)
    started = time.perf_counter()
    many_flows(n_flows)
    per_flow = (time.perf_counter() - started) / n_flows
    return {"per_task_ms": per_task * 1000, "per_subflow_ms": per_flow * 1000}


def read_runs() -> tuple[list, list]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = client.read_flow_runs(limit=200)
        tasks = []
        offset = 0
        while True:
            batch = client.read_task_runs(limit=200, offset=offset)
            tasks += batch
            if len(batch) < 200:
                break
            offset += 200
        names = {f.id: client.read_flow(f.flow_id).name for f in flows}
    return [(names[f.id], f) for f in flows], tasks


def factory_breakdown(config_path: str | None, sets: list[str], workspace: str) -> list[dict]:
    from flows.factory import factory_flow
    from polite.cli.factory import read_config

    cfg = read_config(config_path, sets, None, None, None)
    started = time.perf_counter()
    try:
        factory_flow(config=cfg.model_dump(mode="json", by_alias=True), workspace=workspace)
    except Exception as exc:  # a held export gate still leaves every run to measure
        print(f"factory ended with {type(exc).__name__}: {str(exc).splitlines()[0]}")
    wall_total = time.perf_counter() - started
    flows, tasks = read_runs()
    rows = []
    for name, fr in flows:
        if fr.start_time is None or fr.end_time is None:
            continue
        mine = [t for t in tasks if t.flow_run_id == fr.id and t.start_time and t.end_time]
        intervals = [(_ts(t.start_time), _ts(t.end_time)) for t in mine]
        wall = _ts(fr.end_time) - _ts(fr.start_time)
        in_tasks = _union(intervals)
        rows.append(
            {
                "flow": name,
                "wall_s": wall,
                "tasks": len(mine),
                "in_tasks_s": in_tasks,
                "task_sum_s": sum(b - a for a, b in intervals),
                "flow_side_s": wall - in_tasks,
            }
        )
    rows.sort(key=lambda r: (r["flow"] != "factory", r["flow"]))
    rows.append(
        {
            "flow": "(process, incl. start-up)",
            "wall_s": wall_total,
            "tasks": 0,
            "in_tasks_s": 0.0,
            "task_sum_s": 0.0,
            "flow_side_s": 0.0,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--tasks", type=int, default=100, help="no-op tasks for the per-task cost")
    parser.add_argument("--flows", type=int, default=20, help="no-op subflows for the per-subflow cost")
    parser.add_argument("--micro-only", action="store_true")
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="polite-bench-")
    os.environ["PREFECT_HOME"] = os.path.join(home, "prefect")  # a private API database: only this run
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    print(f"machine: {os.cpu_count()} CPUs; workspace and Prefect home under {home}")
    if not args.micro_only:
        rows = factory_breakdown(args.config, args.sets, os.path.join(home, "ws"))
        print("\n(factory: its tasks are the stage subflows; in tasks = time inside stage flows)")
        print(
            f"\n{'flow':<28}{'wall s':>9}{'tasks':>7}{'in tasks s':>12}{'task sum s':>12}{'flow-side s':>13}"
        )
        for r in rows:
            print(
                f"{r['flow']:<28}{r['wall_s']:>9.1f}{r['tasks']:>7}{r['in_tasks_s']:>12.1f}"
                f"{r['task_sum_s']:>12.1f}{r['flow_side_s']:>13.1f}"
            )
        factory = next(r for r in rows if r["flow"] == "factory")
        stages = [r for r in rows if r["flow"] not in ("factory",) and not r["flow"].startswith("(")]
        in_tasks = sum(r["in_tasks_s"] for r in stages)
        flow_side = sum(r["flow_side_s"] for r in stages)
        glue = factory["wall_s"] - sum(r["wall_s"] for r in stages)
        print(
            f"\nfactory wall {factory['wall_s']:.1f} s = stage tasks {in_tasks:.1f} s "
            f"+ stage flow-side {flow_side:.1f} s + factory glue between stages {glue:.1f} s"
        )
    costs = micro(args.tasks, args.flows)
    print(
        f"\nPrefect fixed costs (no-op work, thread runner): {costs['per_task_ms']:.1f} ms per task, "
        f"{costs['per_subflow_ms']:.1f} ms per subflow"
    )


if __name__ == "__main__":
    main()
