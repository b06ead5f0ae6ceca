"""Test-wide settings: offline hubs, no telemetry, one Prefect test server per worker process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# pytest-xdist runs one worker per core: more intra-op threads per worker only oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect server and database for the session; request it in tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path):
    """A fresh workspace folder (as a string path, the way the CLI receives it)."""
    from polite.workspace import Workspace

    return Workspace.resolve(str(tmp_path / "ws")).ensure()


@pytest.fixture
def started_workspace(workspace):
    """A workspace with its (empty) lineage database, as ingest leaves it: stages other than ingest need one."""
    from lineage.store import LineageStore

    LineageStore(workspace.db_path).migrate()
    return workspace


@pytest.fixture
def bench_script():
    """Load a script of bench/ as a module by name (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
