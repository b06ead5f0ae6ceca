"""Printing rich tables whole, wherever the output goes: shared by the CLI and the flows' own summaries."""

from __future__ import annotations

from rich.console import Console


def print_wide(renderable, out: Console | None = None) -> None:
    """Print a table whole. On a terminal rich fits it to the window, wrapping cells; elsewhere (a pipe, a file,
    a CI log) rich assumes 80 columns and cuts values short (``lmms-l…``), so there it is printed as wide as its
    longest values: paths and model ids stay whole, and greppable."""
    out = out or Console()
    if out.is_terminal:
        out.print(renderable)
        return
    natural = out.measure(renderable, options=out.options.update_width(100_000)).maximum
    width = out.width
    out.width = max(width, natural)  # print(width=...) only narrows: widen the console for this table
    try:
        out.print(renderable)
    finally:
        out.width = width
