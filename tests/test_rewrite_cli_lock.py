"""`polite rewrite`, `polite rerun` and `polite run` (given a rewriter) in a real process while another process
holds the rewrite's lock: one line and exit code 2 before any flow run, not Prefect's traceback of a failed flow
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
            assert done.returncode == 2, output
            assert f"already running in this workspace (pid {holder.pid} on " in output, output
            assert "Traceback" not in output and "Flow run" not in output, output
            assert len(output.strip().splitlines()) == 1, output
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert LineageStore(workspace.db_path).query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]
