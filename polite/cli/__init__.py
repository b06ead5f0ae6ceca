"""The `polite` command line. Each stage registers its commands from its own module."""

from __future__ import annotations

import os

import typer

from polite.cli import distort, export, factory, filter, ingest, lineage, rewrite, train

app = typer.Typer(
    name="polite",
    help="Polite Flamingo dataset factory: ingest -> distort -> train rewriter -> rewrite -> filter -> export, "
    "with every sample's lineage in DuckDB.\n\nStart with `polite run` (the offline demo), then `polite sql`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def _everywhere(
    workspace: str | None = typer.Option(
        None,
        "--workspace",
        "-w",
        help="Workspace for the command that follows (same as its own --workspace).",
    ),
) -> None:
    """Let `polite -w DIR COMMAND` work as `polite COMMAND -w DIR` does: commands read POLITE_WORKSPACE."""
    if workspace is not None:
        os.environ["POLITE_WORKSPACE"] = workspace


for module in (factory, ingest, distort, train, rewrite, filter, export, lineage):
    module.register(app)
