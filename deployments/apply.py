"""Read deployments/prefect.yaml and apply it: `polite deploy` (work pool) and `polite serve` (no pool).

The YAML is the one source of truth; ``prefect deploy --all --prefect-file deployments/prefect.yaml`` reads
it too. We apply it through Prefect's Python API instead of its CLI so the command never prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_FILE = Path(__file__).resolve().parent / "prefect.yaml"
# the keys of a prefect.yaml cron schedule that we apply as `prefect deploy` does
SCHEDULE_KEYS = frozenset({"cron", "timezone", "active", "day_or", "parameters", "slug"})


@dataclass
class DeploymentSpec:
    """One deployment of prefect.yaml, resolved against the project folder."""

    name: str
    entrypoint: str  # "flows/export.py:export_flow"
    description: str = ""
    tags: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    work_pool: dict[str, Any] = field(default_factory=dict)
    # flow runs of this deployment at once: an int, or {limit, collision_strategy: ENQUEUE | CANCEL_NEW}
    concurrency_limit: int | dict[str, Any] | None = None

    @property
    def file(self) -> str:
        return self.entrypoint.split(":", 1)[0]

    def load_flow(self, root: Path = PROJECT_DIR):
        """Import the flow object from its file (absolute path, so any working directory works)."""
        from prefect.flows import load_flow_from_entrypoint

        path, func = self.entrypoint.split(":", 1)
        return load_flow_from_entrypoint(f"{root / path}:{func}", use_placeholder_flow=False)

    def prefect_schedules(self, root: Path | None = None) -> list:
        """The cron schedules; with ``root`` (serving), a schedule's relative ``config`` made absolute against it."""
        from prefect.client.schemas.schedules import CronSchedule
        from prefect.schedules import Schedule

        out = []
        for entry in self.schedules:
            parameters = entry.get("parameters") or {}
            if "cron" not in entry:
                raise ValueError(
                    f"deployment {self.name}: only cron schedules are supported here, got {entry}"
                )
            unknown = sorted(set(entry) - SCHEDULE_KEYS)
            if unknown:  # prefect deploy would apply (or refuse) it: never a schedule that quietly differs
                raise ValueError(
                    f"deployment {self.name}: schedule key {unknown[0]!r} is not applied here "
                    f"(known: {', '.join(sorted(SCHEDULE_KEYS))})"
                )
            out.append(
                Schedule(
                    cron=entry["cron"],
                    timezone=entry.get("timezone", "UTC"),
                    active=entry.get("active", True),
                    day_or=entry.get("day_or", True),
                    # this schedule's runs: over the deployment's parameters
                    parameters=_rooted_config(parameters, root) if root else parameters,
                    slug=entry.get("slug"),
                )
            )
            CronSchedule(
                cron=entry["cron"], timezone=entry.get("timezone", "UTC")
            )  # validates the expression
        return out

    def prefect_concurrency(self):
        """``concurrency_limit`` as Prefect takes it (None: unlimited); a bad value names the deployment."""
        from prefect.client.schemas.objects import ConcurrencyLimitConfig
        from pydantic import ValidationError

        limit = self.concurrency_limit
        if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
            return limit
        try:
            return ConcurrencyLimitConfig.model_validate(limit)
        except ValidationError as exc:
            raise ValueError(
                f"deployment {self.name}: concurrency_limit must be a positive int or "
                f"{{limit: N, collision_strategy: ENQUEUE | CANCEL_NEW}}, got {limit!r} ({exc.errors()[0]['msg']})"
            ) from None


def load_specs(path: str | Path = DEFAULT_FILE, only: list[str] | None = None) -> list[DeploymentSpec]:
    """The deployments of a prefect.yaml, optionally only those named in ``only``."""
    data = yaml.safe_load(Path(path).read_text())
    specs = []
    for entry in data.get("deployments") or []:
        known = {
            k: entry[k] for k in DeploymentSpec.__dataclass_fields__ if k in entry and entry[k] is not None
        }
        specs.append(DeploymentSpec(**known))
    if only:
        missing = sorted(set(only) - {s.name for s in specs})
        if missing:
            raise ValueError(f"no deployment named {missing} in {path}; have {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    return specs


def runnable(specs: list[DeploymentSpec], root: Path = PROJECT_DIR) -> tuple[list[DeploymentSpec], list[str]]:
    """Split specs into those whose flow file exists and a note for each that is skipped."""
    ok, skipped = [], []
    for spec in specs:
        if (root / spec.file).exists():
            ok.append(spec)
        else:
            skipped.append(f"{spec.name}: {spec.file} is not in this checkout")
    return ok, skipped


def _rooted_config(parameters: dict[str, Any], root: Path) -> dict[str, Any]:
    """A relative ``config`` path (``configs/nightly.yaml``) made absolute against the project folder. Served runs
    are subprocesses in the serving process's working directory (a worker's pull step enters the project
    folder instead), so served from elsewhere the path would name no file."""
    config = parameters.get("config")
    if isinstance(config, str) and not Path(config).is_absolute() and (root / config).exists():
        return {**parameters, "config": str(root / config)}
    return parameters


def serve_all(specs: list[DeploymentSpec], root: Path = PROJECT_DIR, limit: int | None = None) -> None:
    """Serve the flows with their schedules from this process (blocks until interrupted)."""
    from prefect import serve

    deployments = [
        spec.load_flow(root).to_deployment(
            name=spec.name,
            description=spec.description or None,
            tags=spec.tags,
            parameters=_rooted_config(spec.parameters, root),
            schedules=spec.prefect_schedules(root),
            concurrency_limit=spec.prefect_concurrency(),
        )
        for spec in specs
    ]
    serve(*deployments, limit=limit, print_starting_message=True)


def api_problem() -> str | None:
    """Why the Prefect API at PREFECT_API_URL cannot serve deployments, or None. Checked first, so a server that is
    not running is one line, not the traceback of the first request that needed it.

    Without PREFECT_API_URL Prefect would start a temporary server of its own: it runs no scheduler (a schedule
    never fires), and each served run starts another temporary server that cannot see the first one's
    concurrency slots (a triggered run is cancelled). Deployments need a real server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return (
            "deployments need a Prefect server: start one (`prefect server start`) and point PREFECT_API_URL at "
            "it (export PREFECT_API_URL=http://127.0.0.1:4200/api); Prefect's temporary server runs no schedules"
        )
    with get_client(sync_client=True) as client:
        exc = client.api_healthcheck()
    if exc is None:
        return None
    return (
        f"cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc}); start a server "
        "(prefect server start) and point PREFECT_API_URL at it"
    )


def ensure_work_pool(name: str, kind: str = "process") -> bool:
    """Create the work pool when missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=kind))
            return True


def deploy_all(
    specs: list[DeploymentSpec], root: Path = PROJECT_DIR, work_pool: str | None = None
) -> list[str]:
    """Register every deployment with its work pool (process pool by default); returns deployment ids."""
    os.environ.setdefault("POLITE_PROJECT_DIR", str(root))
    ids = []
    for spec in specs:
        pool = work_pool or spec.work_pool.get("name") or "polite-process"
        ensure_work_pool(pool)
        flow = spec.load_flow(root)
        sourced = flow.from_source(source=str(root), entrypoint=spec.entrypoint)
        deployment_id = sourced.deploy(
            name=spec.name,
            work_pool_name=pool,
            work_queue_name=spec.work_pool.get("work_queue_name"),
            job_variables=spec.work_pool.get("job_variables") or None,
            build=False,
            push=False,
            description=spec.description or None,
            tags=spec.tags,
            parameters=spec.parameters,
            schedules=spec.prefect_schedules(),
            concurrency_limit=spec.prefect_concurrency(),
            print_next_steps=False,
            ignore_warnings=True,
        )
        ids.append(str(deployment_id))
    return ids
