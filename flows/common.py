"""What every stage flow shares: run bookkeeping in the lineage, and fanning shards out to tasks.

Flows only wire: they pick the work (from the lineage), submit one task per shard, and ingest each finished
shard's result files into DuckDB as it completes (the flow process is the only writer).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lineage.store import LineageLockedError, LineageStore
from polite.errors import UserError
from polite.processes import stop_servers_on_sigterm, this_host, watch_temporary_servers
from polite.workspace import Workspace


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs the exception that ends a flow or task run with its traceback. A ``UserError`` is raised on
    purpose and its message says what to do (polite/errors.py): keep the record and its level, so the run
    still reads as failed in the terminal, the UI and any alert on errors, but drop the traceback that would
    bury the message under screens of engine frames (once per flow level: a stage stopped inside ``polite run``
    printed two)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors() -> None:
    """Install the filter on Prefect's run loggers (once per process; every flow module imports this one, so a
    worker serving a deployment gets it too)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in run_logger.filters):
            run_logger.addFilter(_NoTracebackForUserErrors())


quiet_user_errors()
# a SIGTERM'd flow process stops Prefect's temporary API server before it ends (polite/processes.py); set here,
# at import, so it is the handler Prefect finds when a flow run starts
stop_servers_on_sigterm()


@functools.cache
def code_version() -> str:
    """The git SHA of this checkout when there is one, else the package version. Read once per process, at its
    first stage: a commit made while a factory run works must not relabel its later stages, whose code was
    imported before it."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from polite import __version__

    return __version__


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        value = flow_run.id
        return str(value) if value else None
    except Exception:  # outside a flow run
        return None


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def logger():
    """Prefect's run logger inside a flow or task, a plain logger elsewhere."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("polite")


@dataclass
class StageRun:
    """One flow run of one stage: where it works, where it records, and what it counted."""

    flow: str
    workspace: Workspace
    store: LineageStore
    run_id: str
    parent_run_id: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    _progress_written: float = field(default=0.0, repr=False)

    def count(self, key: str, n: int = 1) -> None:
        total = self.summary.get(key, 0) + n
        # seconds add up as floats: keep the summary free of 0.14200000000000002
        self.summary[key] = round(total, 6) if isinstance(total, float) else total

    def progress(self, done: int, total: int) -> None:
        """Shards finished so far, into the run's row while it runs (``polite runs`` shows them and the time
        left), at most every ``PROGRESS_EVERY_S``: a PF-1M rewrite runs for days, and another terminal should
        see how far it is without reading Prefect's UI."""
        self.summary.update(shards_done=done, shards_total=total)
        now = time.monotonic()
        if now - self._progress_written < PROGRESS_EVERY_S:
            return
        self._progress_written = now
        try:  # a short wait: a reader holding the file (up to 60 s) must not stall the shards behind a progress note
            with self.store.writer(timeout_s=PROGRESS_WAIT_S) as con:
                con.execute("UPDATE runs SET summary = ? WHERE run_id = ?",
                            [_summary_json(self.workspace, self.summary), self.run_id])  # fmt: skip
        except LineageLockedError as exc:  # a progress note never fails the run: the next one catches up
            logger().warning("progress not recorded this time: %s", exc)


PROGRESS_EVERY_S = 10.0
PROGRESS_WAIT_S = 5.0


def _summary_json(ws: Workspace, summary: dict[str, Any]) -> str:
    return json.dumps(_stored_paths_in(ws, summary), default=str, sort_keys=True)


def _stored_paths_in(ws: Workspace, value: Any) -> Any:
    """``value`` (a run's summary) with every path inside the workspace as the lineage stores paths, relative to
    it: the runs of a moved or copied workspace say where things are in it (polite/workspace.py)."""
    if isinstance(value, dict):
        return {k: _stored_paths_in(ws, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_stored_paths_in(ws, v) for v in value]
    if isinstance(value, str | Path) and str(value).startswith(ws.root + "/"):
        return ws.stored(value)
    return value


def _mark_interrupted(con, host: str) -> None:
    """Runs of this host still marked running whose process is gone become 'interrupted' (polite/processes.py)."""
    from polite.processes import INTERRUPTED, has_ended

    rows = con.execute("SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", [host]).fetchall()
    ended = [run_id for run_id, pid in rows if has_ended(host, pid)]
    if ended:
        con.execute(
            "UPDATE runs SET status = 'interrupted', error = coalesce(error, ?) WHERE run_id IN "
            "(SELECT unnest(?::VARCHAR[]))",
            [INTERRUPTED, ended],
        )


@contextmanager
def stage_run(
    flow: str, config: dict[str, Any], workspace: str | Workspace | None, parent_run_id: str | None = None,
    starts_workspace: bool = False,
) -> Iterator[StageRun]:  # fmt: skip
    """Record a ``runs`` row around a stage: ``running`` now, ``completed``/``failed`` (with the error) at the end.

    The row names its host and process, and first marks this host's runs whose process died as interrupted.
    Only a stage that ``starts_workspace`` (ingest, the factory) makes the database; the others stop with
    ``NoLineageError`` on a folder without one (a mistyped --workspace), before writing anything there."""
    watch_temporary_servers()  # the server this flow runs against, if Prefect started one: stopped after a kill -9
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    store = LineageStore(ws.db_path)
    if not starts_workspace:
        store.require()
    ws.ensure()
    store.migrate()
    prefect_id = _prefect_flow_run_id()
    run_id = "run_" + (prefect_id.replace("-", "")[:16] if prefect_id else uuid.uuid4().hex[:16])
    run = StageRun(flow=flow, workspace=ws, store=store, run_id=run_id, parent_run_id=parent_run_id)
    host = this_host()
    with store.writer() as con:
        _mark_interrupted(con, host)
        con.execute(
            "INSERT OR REPLACE INTO runs (run_id, flow, status, started_at, config, code_version, "
            "prefect_flow_run_id, parent_run_id, host, pid) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
            [run_id, flow, utcnow(), json.dumps(config, default=str, sort_keys=True), code_version(), prefect_id,
             parent_run_id, host, os.getpid()],
        )  # fmt: skip
    status, error = "failed", None
    try:
        yield run
        status = "completed"
    except BaseException as exc:  # Ctrl-C included: the row says what ended the run
        if isinstance(exc, ShardFailures):
            exc.summary = run.summary  # what landed before the failure, for the command to print
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM (Prefect's TerminationSignal): stopped, not broken
            status = "interrupted"
            error = str(exc) or f"{type(exc).__name__}: stopped (Ctrl-C or a termination signal)"
        raise
    finally:
        if status == "completed":  # every shard is done: the progress says nothing more; a failed run keeps it
            for key in ("shards_done", "shards_total"):
                run.summary.pop(key, None)
        with store.writer() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, summary = ?, error = ? WHERE run_id = ?",
                [status, utcnow(), _summary_json(ws, run.summary), error, run_id],
            )


class ShardFailures(UserError, RuntimeError):
    """Some shards failed as a whole (not sample by sample); the rest were ingested. Re-run to resume.

    ``summary``: the stage run's summary (what landed before the failure), filled in by ``stage_run``.
    """

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary: dict = summary if summary is not None else {}


def map_shards(
    task: Any,
    items: Sequence[Any],
    ingest: Callable[[Any], None],
    description: str,
    stage: StageRun | None = None,
    **task_kwargs: Any,
) -> list[Any]:
    """Submit ``task(item, **task_kwargs)`` per shard; ingest each result in the flow as it completes.

    Shows progress on the terminal, as a Prefect progress artifact and, given the ``stage`` run, in its row of
    ``runs``. A shard whose task raised does not stop the others: every finished shard is ingested first, then
    ``ShardFailures`` names the rest.
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.futures import as_completed
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not items:
        return []
    futures = [task.submit(item, **task_kwargs) for item in items]
    artifact_id = None
    try:
        artifact_id = create_progress_artifact(progress=0.0, description=description)
    except Exception:  # artifacts need an API; never fail the work for want of a progress bar
        artifact_id = None
    results: list[Any] = []
    failures: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(description, total=len(futures))
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                result = future.result()
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                logger().error("shard failed in %s: %s", description, exc)
            else:
                ingest(result)
                results.append(result)
            progress.update(bar, advance=1)
            if stage is not None:
                stage.progress(done, len(futures))
            if artifact_id is not None:
                try:
                    update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / len(futures))
                except Exception:
                    artifact_id = None
    if failures:
        raise ShardFailures(
            f"{len(failures)} of {len(futures)} shards failed in {description} (the rest were recorded; "
            f"run the same command again to resume): " + "; ".join(failures[:5])
        )
    return results
