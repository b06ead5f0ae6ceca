"""The `polite` command line. Each stage registers its commands from its own module."""

from __future__ import annotations

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

for module in (factory, ingest, distort, train, rewrite, filter, export, lineage):
    module.register(app)
