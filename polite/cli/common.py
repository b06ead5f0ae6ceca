"""Options and error handling shared by every command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any

import typer
from rich.console import Console

from polite.printing import print_wide  # noqa: F401 (the commands print their tables with it)

console = Console()
err_console = Console(stderr=True)


WorkspaceOpt = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        "-w",
        envvar="POLITE_WORKSPACE",
        help="Workspace folder or fsspec URL (lineage.duckdb, images, shards, models, exports). Default ./workspace.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config", "-c", help="YAML/TOML factory config; validated before any work. Default: the demo."
    ),
]


def stage_config(path: str | None):
    """The config a command runs with: the file at ``path``, or without one the demo's, as `polite run` uses it
    (so `polite rewrite --retry-failed` after the demo works on the demo's rewrites, same settings and key)."""
    from flows.factory import resolve_config

    return resolve_config(path)


def with_export_options(
    cfg, formats: list[str] | None, where: str | None, push_to_hub: str | None, origin: str
):
    """The config with a command's ``--format``/``--where``/``--push-to-hub`` in its export section, validated:
    a misspelt format stops here, naming ``export.formats``, and not in the export flow after the stages before it."""
    from polite.config import parse_config

    data = cfg.model_dump(mode="json", by_alias=True)
    options = {"formats": list(formats or []) or None, "where": where, "push_to_hub": push_to_hub}
    data["export"].update({key: value for key, value in options.items() if value is not None})
    return parse_config(data, origin=origin)


def check_predicate(
    workspace: str | None, config_workspace: str, where: str | None, source: str, option: str
) -> None:
    """Stop on a user predicate the lineage cannot run before the flow (and a Prefect server) starts."""
    if not where:
        return
    from lineage.store import LineageStore
    from polite.workspace import Workspace

    LineageStore(Workspace.resolve(workspace or config_workspace).db_path).check_predicate(
        where, source, option
    )


_OUR_PACKAGES = ("polite", "flows", "tasks", "models", "filters", "lineage", "deployments")


def raised_by_us(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by this project's code (a message written for the user) rather than inside a
    library, which is a bug however plain its type (pyarrow's KeyError on a missing field, say)."""
    import sysconfig
    from pathlib import Path

    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(Path(tb.tb_frame.f_code.co_filename).resolve())
        tb = tb.tb_next
    if not frames:
        return True
    # the standard library raising for our call (Path.read_text, json.loads) is ours: judge the last other frame
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    last = next((f for f in reversed(frames) if not f.is_relative_to(stdlib)), frames[-1])
    root = Path(__file__).resolve().parents[2]
    return last.is_relative_to(root) and last.relative_to(root).parts[0] in _OUR_PACKAGES


def is_busy(exc: BaseException) -> bool:
    """Another process holds what the command needs: a workspace lock, or the lineage database for longer than
    the command waits (both ``Busy``). Retrying later is the fix, not editing anything."""
    from polite.errors import Busy

    return isinstance(exc, Busy)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one red line without a traceback, and an exit code a scheduler can
    act on (polite/errors.py): 2 for a request to fix, 75 (EX_TEMPFAIL) for a workspace another process holds,
    1 for failed shards (the rest recorded)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from flows.common import ShardFailures
        from polite.errors import EXIT_BUSY, EXIT_SHARDS_FAILED, EXIT_USER_ERROR, UserError

        try:
            return fn(*args, **kwargs)
        except ShardFailures as exc:  # the finished shards are recorded; the message says how to resume
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_SHARDS_FAILED)
        except (UserError, FileNotFoundError, KeyError, ValueError) as exc:
            if not isinstance(exc, UserError) and not raised_by_us(exc):
                raise  # a library's KeyError or ValueError is a bug to read, with its traceback (exit 1)
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            if is_busy(exc):
                message += f" (exit code {EXIT_BUSY}: busy, try again later)"
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_BUSY if is_busy(exc) else EXIT_USER_ERROR)

    return wrapper
