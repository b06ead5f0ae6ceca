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
    images = store.query("SELECT image_id, format, width, height, n_bytes FROM images ORDER BY image_id").to_pylist()
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
    assert not ray.is_initialized()  # the session shut down the instance it started
    assert len(executed) >= 2  # the shard tasks really ran in Ray worker processes
    assert result["new_samples"] == threads["new_samples"] > 0
    assert _lineage(str(tmp_path / "ray")) == _lineage(str(tmp_path / "threads"))
