"""A real local Ray cluster (2 worker CPUs) runs a stage's shard tasks and gives the lineage threads give."""

from __future__ import annotations

import pytest

from polite.config.runner import RunnerSettings

CONFIG = {"ingest": {"sources": [{"adapter": "demo", "options": {"scenes": 12}}], "shard_size": 6}}
COLUMNS = "sample_id, source, split, task_type, images, instruction, raw_response, meta, status, error"


def _lineage(root: str) -> tuple[list, list]:
    from lineage.store import LineageStore
    from polite.workspace import Workspace

    store = LineageStore(Workspace.resolve(root).db_path)
    samples = store.query(f"SELECT {COLUMNS} FROM samples ORDER BY sample_id").to_pylist()
    images = store.query(
        "SELECT image_id, format, width, height, n_bytes FROM images ORDER BY image_id"
    ).to_pylist()
    return samples, images


def test_runner_settings_pick_the_runner():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runners import remote_resources, task_runner_for

    ray_settings = RunnerSettings(kind="ray", gpus_per_rewrite_task=0.5, ray_address="ray://head:10001")
    assert isinstance(task_runner_for(RunnerSettings()), ThreadPoolTaskRunner)
    assert isinstance(task_runner_for(ray_settings, "ingest"), ThreadPoolTaskRunner)  # not a Ray stage
    runner = task_runner_for(ray_settings, "rewrite")
    assert type(runner).__name__ == "RayTaskRunner" and runner.address == "ray://head:10001"
    assert "num_cpus" not in runner.init_kwargs  # a cluster is sized by its nodes, not by us
    assert remote_resources(ray_settings, "rewrite") == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert remote_resources(ray_settings, "filter") == {"num_cpus": 1.0}


@pytest.mark.slow
def test_ingest_on_a_local_ray_cluster_matches_the_thread_runner(tmp_path, prefect_harness):
    import ray

    from flows.ingest import ingest_flow
    from flows.runners import ray_session, stage_resources, task_runner_for

    settings = RunnerSettings(kind="ray", ray_num_cpus=2, ray_object_store_mb=100, ray_stages=["ingest"])
    threads = ingest_flow(CONFIG, workspace=str(tmp_path / "threads"))
    assert not ray.is_initialized()
    with ray_session(settings):
        assert ray.cluster_resources()["CPU"] == 2
        on_ray = ingest_flow.with_options(task_runner=task_runner_for(settings, "ingest"))
        with stage_resources(settings, "ingest"):
            result = on_ray(CONFIG, workspace=str(tmp_path / "ray"))
        executed = [e for e in ray.timeline() if e["name"] == "task:execute"]
        assigned = _assigned_resources_in_a_subflow(settings)
    assert not ray.is_initialized()  # the session shut down the instance it started
    assert len(executed) >= 2  # the shard tasks really ran in Ray worker processes
    assert result["new_samples"] == threads["new_samples"] > 0
    assert _lineage(str(tmp_path / "ray")) == _lineage(str(tmp_path / "threads"))
    # the stage's annotations reach the Ray task submitted inside the subflow (GPUs are the same mechanism)
    assert assigned == {"CPU": 0.5}


def _assigned_resources_in_a_subflow(settings: RunnerSettings) -> dict:
    """A subflow called the way the factory calls stages; its task reports what Ray gave it."""
    from prefect import flow, task

    from flows.runners import stage_resources, task_runner_for

    @task
    def resources() -> dict:
        import ray

        return {k: v for k, v in ray.get_runtime_context().get_assigned_resources().items() if k == "CPU"}

    @flow
    def stage() -> dict:
        return resources.submit().result()

    annotated = settings.model_copy(update={"cpus_per_task": 0.5, "ray_stages": ["filter"]})
    with stage_resources(annotated, "filter"):
        return stage.with_options(task_runner=task_runner_for(annotated, "filter"))()


def test_ray_without_the_ray_extra_is_one_line_before_any_work(tmp_path, monkeypatch):
    """`polite run --runner ray` where `pip install '.[ray]'` was not run: a config error naming the extra, from
    the dry run and before a flow starts (the flow used to run ingest, distort and training first, then fail at
    the rewrite stage with a RuntimeError traceback)."""
    import sys

    from typer.testing import CliRunner

    import flows.factory
    from polite.cli import app

    def no_flow(**kwargs):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.factory, "factory_flow", no_flow)
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # import prefect_ray raises ImportError
    for dry in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["run", "--runner", "ray", *dry, "-w", str(tmp_path / "ws")])
        assert result.exit_code == 2, (dry, result.output)
        assert "needs prefect-ray and ray" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ws").exists()
