"""`polite rewrite`, `polite rerun` and `polite run` (given a rewriter) in a real process while another process
holds the rewrite's lock: one line and exit code 75 (busy) before any flow run, not Prefect's traceback of a failed flow
run first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_rewrite_fixtures import hold_rewrite_lock, make_samples, register_model, tiny_model

from lineage.store import LineageStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("models"))


def test_a_held_rewrite_lock_is_one_line_from_the_command_without_a_flow_run(workspace, model_path, tmp_path):
    make_samples(workspace, n=4)
    holder = hold_rewrite_lock(workspace, register_model(workspace, model_path))  # the settings of `sets` below
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    sets = ["--set", "rewrite.overrides.max_new_tokens=12"]
    try:
        # `polite run` with a rewriter given (nothing to train) knows the key before its first stage too
        for args in (["rewrite"], ["rerun", "--where", "source = 'gqa'"], ["run", "--model", model_path]):
            done = subprocess.run(
                [str(BIN / "polite"), *args, "-w", workspace.root, *sets],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            output = done.stdout + done.stderr
            assert done.returncode == 75, output  # EX_TEMPFAIL: busy, try again later
            assert f"already running in this workspace (pid {holder.pid} on " in output, output
            assert "Traceback" not in output and "Flow run" not in output, output
            assert len(output.strip().splitlines()) == 1, output
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert LineageStore(workspace.db_path).query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]


def test_a_flow_stopped_by_the_lock_logs_one_line_not_prefects_traceback(workspace, model_path, tmp_path):
    """Where the flow itself meets the lock (inside `polite run`, training first, the key is known only after
    training), Prefect logs the failed run: the line stays, at ERROR, with the reason; the traceback does not."""
    make_samples(workspace, n=4)
    holder = hold_rewrite_lock(workspace, register_model(workspace, model_path))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    script = (
        "import sys; from flows.rewrite import rewrite_flow\n"
        "rewrite_flow(config={'rewrite': {'overrides': {'max_new_tokens': 12}}}, workspace=sys.argv[1])\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, workspace.root],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait(timeout=30)
    logged = [line for line in done.stderr.splitlines() if "Encountered exception during execution" in line]
    assert len(logged) == 1 and "| ERROR" in logged[0], done.stderr
    assert f"already running in this workspace (pid {holder.pid} on " in logged[0], done.stderr
    # the process itself still ends with the exception (its own traceback, from Python, is the last thing printed)
    assert done.returncode == 1 and done.stderr.count("Traceback") == 1, done.stderr
    assert done.stderr.index("Traceback") > done.stderr.index(logged[0]), done.stderr


def test_only_user_errors_lose_their_traceback_and_every_flow_level_keeps_its_error_record(prefect_harness):
    """A bug inside a flow must keep its traceback; a deliberate stop (polite/errors.py) must not bury its
    message under one, at any depth of nested flows."""
    import logging

    from prefect import flow

    from polite.config import ConfigError

    @flow
    def stage(error: str) -> None:
        raise ConfigError("rewrite.device: 'cuda' but no GPU; set rewrite.device: cpu") if error == "user" \
            else RuntimeError("a bug")  # fmt: skip

    @flow
    def factory(error: str) -> None:
        stage(error)

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            if "Encountered exception" in record.getMessage():
                self.records.append(record)

    run_logger = logging.getLogger("prefect.flow_runs")
    seen: dict[str, list[logging.LogRecord]] = {}
    for error in ("user", "bug"):
        keep = Keep()
        run_logger.addHandler(keep)
        try:
            with pytest.raises(ConfigError if error == "user" else RuntimeError):
                factory(error)
        finally:
            run_logger.removeHandler(keep)
        seen[error] = keep.records
    assert [r.levelno for r in seen["user"]] == [logging.ERROR, logging.ERROR]  # the stage, then the factory
    assert all(r.exc_info is None and "set rewrite.device: cpu" in r.getMessage() for r in seen["user"])
    assert len(seen["bug"]) == 2 and all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in seen["bug"])
