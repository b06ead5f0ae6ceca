"""deployments/prefect.yaml against a real Prefect server: `polite serve` runs a triggered export, and
`polite deploy` registers deployments with the process work pool and their cron schedules."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.apply import DEFAULT_FILE, load_specs

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_every_deployment_names_a_flow_file_and_valid_schedules():
    specs = load_specs(DEFAULT_FILE)
    names = {s.name for s in specs}
    assert {
        "factory",
        "nightly",
        "ingest",
        "distort",
        "train-rewriter",
        "rewrite",
        "filter",
        "export",
    } <= names
    for spec in specs:
        assert spec.entrypoint.startswith("flows/") and spec.work_pool["name"] == "polite-process"
        spec.prefect_schedules()  # cron expressions parse
        flow = spec.load_flow()  # the entrypoint names a real flow whose parameters take the YAML's
        assert set(spec.parameters) <= set(flow.parameters.properties), (spec.name, spec.parameters)
    nightly = next(s for s in specs if s.name == "nightly")
    assert nightly.schedules[0]["cron"] == "0 2 * * *" and nightly.parameters == {
        "config": "configs/nightly.yaml"
    }
    with pytest.raises(ValueError, match="no deployment named"):
        load_specs(DEFAULT_FILE, only=["nope"])


def test_scheduled_runs_do_not_pile_up_and_triggered_rewrites_queue():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from deployments.apply import DeploymentSpec

    specs = {s.name: s for s in load_specs(DEFAULT_FILE)}
    for name in ("nightly", "rewrite-retry-failed", "weekly-export"):  # scheduled: skip a run while one is going
        config = specs[name].prefect_concurrency()
        assert (config.limit, config.collision_strategy) == (1, ConcurrencyLimitStrategy.CANCEL_NEW), name
    for name in ("factory", "rewrite"):  # triggered by hand: wait for the running one
        config = specs[name].prefect_concurrency()
        assert (config.limit, config.collision_strategy) == (1, ConcurrencyLimitStrategy.ENQUEUE), name
    assert specs["export"].prefect_concurrency() is None
    assert DeploymentSpec(name="x", entrypoint="flows/x.py:f", concurrency_limit=2).prefect_concurrency() == 2
    for bad in (0, True, {"limit": 1, "collision_strategy": "SKIP"}, "one"):
        with pytest.raises(ValueError, match="deployment x: concurrency_limit must be"):
            DeploymentSpec(name="x", entrypoint="flows/x.py:f", concurrency_limit=bad).prefect_concurrency()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: process {proc.args[:3]} exited with {proc.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started: server/serve and their children
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_serve_runs_a_triggered_export_and_deploy_registers_schedules(tmp_path):
    import httpx
    from test_export_flow import populate

    from lineage.store import LineageStore
    from polite.workspace import Workspace

    ws = Workspace.resolve(str(tmp_path / "ws")).ensure()
    populate(ws)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=open(logs / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    serving = None
    try:
        http = httpx.Client(base_url=api, timeout=10)

        def healthy():
            try:
                return http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 180, "the Prefect server", [server])
        serving = subprocess.Popen(
            [str(BIN / "polite"), "serve", "--only", "export"],
            env=env,
            cwd=REPO,
            start_new_session=True,
            stdout=open(logs / "serve.log", "w"),
            stderr=subprocess.STDOUT,
        )

        def deployment():
            r = http.get("/deployments/name/export/export")
            return r.json() if r.status_code == 200 else None

        dep = _wait(deployment, 120, "the served deployment", [serving])
        replies: list[str] = []

        def trigger():
            # The API can answer an error for a moment right after the deployment appears (seen once on a
            # clean-clone CI run): retry, and name the replies if it never accepts the run.
            r = http.post(
                f"/deployments/{dep['id']}/create_flow_run",
                json={"parameters": {"workspace": ws.root, "formats": ["pf1m"]}},
            )
            if r.status_code in (200, 201) and "id" in r.json():
                return r.json()
            replies.append(f"{r.status_code}: {r.text[:300]}")
            return None

        try:
            run = _wait(trigger, 60, "the API to accept a flow run", [serving])
        except AssertionError as exc:
            raise AssertionError(f"{exc}; replies: {replies[-3:]}") from None

        def finished():
            state = http.get(f"/flow_runs/{run['id']}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(finished, 180, "the triggered flow run", [serving])
        assert state["type"] == "COMPLETED", (state, (logs / "serve.log").read_text()[-3000:])
        store = LineageStore(ws.db_path)
        assert store.query("SELECT count(*) AS n FROM export_items").column("n")[0].as_py() == 5
        runs = store.query("SELECT flow, status, prefect_flow_run_id FROM runs").to_pylist()
        assert runs == [{"flow": "export", "status": "completed", "prefect_flow_run_id": run["id"]}]

        # `polite deploy`: the process work pool and the deployments, with their schedules
        deployed = subprocess.run(
            [str(BIN / "polite"), "deploy", "--only", "export", "--only", "nightly"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert http.get("/work_pools/polite-process").json()["type"] == "process"
        nightly = http.get("/deployments/name/factory/nightly").json()
        assert nightly["work_pool_name"] == "polite-process"
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert nightly["parameters"] == {"config": "configs/nightly.yaml"}
        assert nightly["global_concurrency_limit"]["limit"] == 1  # the server keeps the limit there
        assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    finally:
        if serving is not None:
            _stop(serving)
        _stop(server)


def test_serve_resolves_the_nightly_config_against_the_repository(tmp_path, monkeypatch):
    """`polite serve` runs each flow in a subprocess of the serving process, in its working directory: served
    from anywhere but the repository, `config: configs/nightly.yaml` would fail at 02:00 as a missing file."""
    import prefect

    from deployments.apply import serve_all

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kwargs: served.extend(deployments))
    monkeypatch.chdir(tmp_path)
    serve_all(load_specs(DEFAULT_FILE, only=["nightly", "export"]))
    params = {d.name: d.parameters for d in served}
    assert params["nightly"] == {"config": str(REPO / "configs" / "nightly.yaml")}
    assert params["export"] == {}


@pytest.mark.parametrize("command", ["deploy", "serve"])
def test_deploy_and_serve_without_a_reachable_api_say_so_in_one_line(tmp_path, command):
    """PREFECT_API_URL set with no server there: one line naming the URL and what to start, not a 300-line
    httpx traceback."""
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api}
    done = subprocess.run(
        [str(BIN / "polite"), command, "--only", "export"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"cannot reach the Prefect API at {api}" in " ".join(output.split()), output
    assert "Traceback" not in output and len(output.splitlines()) <= 3, output
    # no PREFECT_API_URL at all: Prefect's temporary server would run no schedule, so this is refused too
    env.pop("PREFECT_API_URL")
    done = subprocess.run([str(BIN / "polite"), command, "--only", "export"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "deployments need a Prefect server" in " ".join(output.split()), output


def test_deploy_applies_job_variables_and_schedule_parameters_from_the_yaml(tmp_path, monkeypatch):
    """The YAML is the one source of truth: `prefect deploy` honours a work pool's job_variables and a schedule's
    own parameters and slug, so `polite deploy` must too (it dropped them silently); a schedule key it cannot
    apply is an error naming the deployment, not a schedule that quietly differs."""
    import prefect.flows

    import deployments.apply as apply

    (tmp_path / "prefect.yaml").write_text(
        """
deployments:
- name: export
  entrypoint: flows/export.py:export_flow
  parameters: {formats: [pf1m]}
  schedules:
  - cron: "0 6 * * 1"
    slug: weekly
    parameters: {formats: [parquet]}
    active: false
  work_pool:
    name: polite-process
    job_variables: {env: {POLITE_WORKSPACE: /data/ws}}
"""
    )
    deployed = []

    class Sourced:
        def deploy(self, **kwargs):
            deployed.append(kwargs)
            return "id"

    monkeypatch.setattr(prefect.flows.Flow, "from_source", classmethod(lambda cls, **kwargs: Sourced()))
    monkeypatch.setattr(apply, "ensure_work_pool", lambda name, kind="process": False)
    monkeypatch.setenv("POLITE_PROJECT_DIR", str(apply.PROJECT_DIR))  # deploy_all sets it when unset
    apply.deploy_all(apply.load_specs(tmp_path / "prefect.yaml"))
    (kwargs,) = deployed
    assert kwargs["job_variables"] == {"env": {"POLITE_WORKSPACE": "/data/ws"}}
    (schedule,) = kwargs["schedules"]
    assert (schedule.slug, schedule.parameters, schedule.active) == ("weekly", {"formats": ["parquet"]}, False)
    bad = apply.DeploymentSpec(name="x", entrypoint="flows/x.py:f", schedules=[{"cron": "0 2 * * *", "tz": "UTC"}])
    with pytest.raises(ValueError, match="deployment x: schedule key 'tz'"):
        bad.prefect_schedules()
