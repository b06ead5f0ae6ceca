"""Read-only lineage commands: `polite sql`, `polite explain`, `polite diff`, `polite runs`."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from polite.cli.common import WorkspaceOpt, console, user_errors


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _store(workspace: str | None):
    from lineage.store import LineageStore
    from polite.workspace import Workspace

    return LineageStore(Workspace.resolve(workspace).db_path, lock_timeout_s=60)


MIN_COLUMN_WIDTH = 8  # narrower, rich folds every value into a column of empty-looking cells


def print_table(arrow_table, title: str | None = None, max_rows: int = 50, max_width: int = 60) -> None:
    if arrow_table.num_columns * MIN_COLUMN_WIDTH > console.width:  # `SELECT * FROM lineage`: 38 columns
        print_records(arrow_table, max_rows)
        return
    table = Table(title=title, show_lines=False)
    for name in arrow_table.column_names:
        table.add_column(name, overflow="fold", max_width=max_width)
    for row in arrow_table.slice(0, max_rows).to_pylist():
        table.add_row(*["" if v is None else str(v) for v in row.values()])
    console.print(table)
    if arrow_table.num_rows > max_rows:
        console.print(f"... {arrow_table.num_rows - max_rows} more rows (use --format csv|json|parquet for all)")


def print_records(arrow_table, max_rows: int = 50) -> None:
    """One ``column: value`` line per field, row after row (psql's expanded display), for results too wide to
    be a table."""
    width = max(len(name) for name in arrow_table.column_names)
    for i, row in enumerate(arrow_table.slice(0, max_rows).to_pylist()):
        console.rule(f"row {i + 1}", align="left")
        for name, value in row.items():
            console.print(f"[bold]{name.ljust(width)}[/] {'' if value is None else value}", highlight=False)
    if arrow_table.num_rows > max_rows:
        console.print(f"... {arrow_table.num_rows - max_rows} more rows (--format csv|json|parquet for all)")


def csv_ready(arrow_table):
    """CSV has no lists, structs, maps or intervals, and pyarrow refuses the whole table (`SELECT * FROM
    lineage` has ``images`` and ``removed_paragraphs``): such columns go as the JSON text ``--format json``
    prints."""
    import pyarrow as pa
    import pyarrow.types as pat

    columns = []
    for column in arrow_table.columns:
        if pat.is_nested(column.type) or pat.is_interval(column.type):
            values = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
            column = pa.array(values, pa.string())
        columns.append(column)
    return pa.Table.from_arrays(columns, names=arrow_table.column_names)


# A summary's string shorter than this is a setting worth a glance (dedupe=response, mode=retry); longer ones
# are ids, hashes, paths and messages, which stay in SQL
SHORT_SETTING = 13


def _shown(key: str, value) -> bool:
    if isinstance(value, str):  # not an id, a hash or a path, however short
        named = key.endswith(("id", "hash", "path", "url"))
        return 0 < len(value) < SHORT_SETTING and "/" not in value and not named
    return isinstance(value, int | float) and not isinstance(value, bool)


def compact_summary(summary, width: int = 90) -> str:
    """The counts of a run's summary and its short settings; paths, hashes and nested detail (funnels) stay in
    SQL."""
    if not isinstance(summary, dict):
        return "" if summary is None else str(summary)[:width]
    text = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items() if _shown(k, v)
    )
    return text if len(text) <= width else text[: width - 1] + "…"


# Below this a table's summary column is a few characters wide and every run takes a dozen lines.
RUNS_TABLE_WIDTH = 110


def _started(row: dict) -> str:
    return row["started_at"].strftime("%m-%d %H:%M:%S") if row["started_at"] else ""


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _seconds(row: dict) -> str:
    return "-" if row["seconds"] is None else f"{row['seconds']} s"


def _progress(row: dict) -> str:
    """``12/585 shards, about 3 h 10 min left`` for a running run that has written its progress."""
    summary = row["summary"] if isinstance(row["summary"], dict) else {}
    if row["status"] != "running" or not summary.get("shards_total"):
        return ""
    text = f"{summary.get('shards_done', 0)}/{summary['shards_total']} shards"
    left = row.get("left_s")
    if left is None:
        return text
    hours, minutes = divmod(round(left / 60), 60)
    return text + ", about " + (f"{hours} h {minutes} min" if hours else f"{max(minutes, 1)} min") + " left"


def _error(row: dict) -> str:
    """``error: ...``, why a run failed or stopped, on one line (the full text is in SQL: ``runs.error``)."""
    return f"error: {_one_line(row['error'], 400)}" if row.get("error") else ""


def runs_as_lines(rows: list[dict], width: int) -> list[str]:
    """Recent runs for a narrow terminal: a line of run, flow, status, start (UTC) and seconds, then its counts
    and, for a run that failed or was interrupted, its error, wrapped to ``width`` under it."""
    import textwrap

    lines = []
    for row in rows:
        lines.append(f"{row['run_id']}  {row['flow']:<15} {row['status']:<11} {_started(row)}  {_seconds(row)}")
        for text in (_progress(row), compact_summary(row["summary"], width=400), _error(row)):
            if text:
                lines.extend(textwrap.wrap(text, width=width, initial_indent="    ", subsequent_indent="    "))
    return lines


def register(app: typer.Typer) -> None:
    @app.command("sql")
    @user_errors
    def sql(
        query: Annotated[str, typer.Argument(help="One SELECT over the lineage tables and views.")],
        workspace: WorkspaceOpt = None,
        format: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
        output: Annotated[str | None, typer.Option("--output", "-o", help="File for --format parquet.")] = None,
        time_limit: Annotated[float, typer.Option(
            "--time-limit", min=0,
            help="Stop the query after this many seconds (0: no limit). While it reads, no flow can write the "
                 "lineage, and a running flow waits 120 s at most.")] = 60.0,  # fmt: skip
    ) -> None:
        """Query the lineage database, read-only (safe while a run is going).

        Paths inside the workspace are stored relative to it; workspace_path(path) gives where the file is now.

        Example: polite sql "SELECT source, count(*) FROM samples GROUP BY source"
        """
        import duckdb

        from lineage.store import sql_error_summary

        try:
            from polite.workspace import Workspace

            macro = Workspace.resolve(workspace).locate_macro()  # workspace_path(path): where a stored path is
            result = _store(workspace).user_query(query, time_limit_s=time_limit, setup=macro)
        except duckdb.Error as exc:  # the user's SQL: a line that says what is wrong, not a traceback
            raise ValueError(f"{sql_error_summary(exc)}. Tables and views: polite sql \"SHOW TABLES\"; "
                             f'a table\'s columns: polite sql "DESCRIBE rewrites"') from None  # fmt: skip
        if format is OutputFormat.table:
            print_table(result)
        elif format is OutputFormat.csv:
            import pyarrow.csv as pacsv

            pacsv.write_csv(csv_ready(result), sys.stdout.buffer)
        elif format is OutputFormat.json:
            for row in result.to_pylist():
                sys.stdout.write(json.dumps(row, default=str) + "\n")
        else:
            import pyarrow.parquet as pq

            if not output:
                raise ValueError("--format parquet needs --output FILE")
            pq.write_table(result, output)
            console.print(f"wrote {result.num_rows} rows to {output}")

    @app.command("explain")
    @user_errors
    def explain(
        sample_id: Annotated[str, typer.Argument(help="A sample_id from `polite sql`.")],
        workspace: WorkspaceOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    ) -> None:
        """Everything known about one sample: source row, images, distortions, rewrites and their models,
        scores, decisions, exports, and the runs that recorded them.

        Example: polite explain s_0123456789abcdef
        """
        from lineage.queries import explain as explain_sample
        from polite.workspace import Workspace

        report = explain_sample(_store(workspace), sample_id, Workspace.resolve(workspace))
        if as_json:
            console.print_json(json.dumps(report, default=str))
            return
        sample = report["sample"]
        console.rule(f"[bold]{sample_id}[/]  {sample['source']}/{sample['split']}  ({sample['task_type']})")
        for key in ("status", "error", "duplicate_of", "source_key", "source_row", "source_revision",
                    "instruction", "raw_response", "meta"):  # fmt: skip
            if sample.get(key) not in (None, "", {}):
                console.print(f"[bold]{key}:[/] {sample[key]}", highlight=False)
        # the long ones (a run's whole config, an export's selection SQL, the same for its every format) are in
        # --json and in SQL; `current` marks the rewrite and decision the lineage view reads, with a `*`
        left_out = ("config", "selection", "current")
        for part in ("images", "pairs", "rewrites", "models", "scores", "decisions", "exports", "runs"):
            rows = report[part]
            console.print(f"\n[bold]{part}[/] ({len(rows)})")
            for row in rows:
                shown = {k: v for k, v in row.items() if v not in (None, "") and k not in left_out}
                mark = "* " if row.get("current") else "  "
                console.print(mark + json.dumps(shown, default=str, ensure_ascii=False), highlight=False,
                              markup=False, soft_wrap=True)  # fmt: skip
        console.print("\n* the rewrite and the decision the lineage view reads now. Each export's selection and "
                      "each run's config: --json", highlight=False, soft_wrap=True)  # fmt: skip

    @app.command("diff")
    @user_errors
    def diff(
        a: Annotated[str | None, typer.Argument(help="Export id or export run id (default: the export run before b).")] = None,
        b: Annotated[str | None, typer.Argument(help="Export id or export run id (default: the latest export run).")] = None,
        workspace: WorkspaceOpt = None,
        show: Annotated[int, typer.Option(min=0, help="Examples of each change to print.")] = 3,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    ) -> None:
        """What changed between two exports: samples added, removed (and why, from the lineage now), rewritten,
        the same; per source, with examples. In SQL: SELECT * FROM export_diff('a', 'b').

        Examples: polite diff | polite diff run_0123456789abcdef | polite diff x_0123456789abcdef x_fedcba9876543210
        """
        from lineage.queries import CHANGES, export_diff

        report = export_diff(_store(workspace), a, b, show=show)
        if as_json:
            console.print_json(json.dumps(report, default=str))
            return
        for arrow, side in (("   ", report["a"]), ("-> ", report["b"])):
            when = side["created_at"].strftime("%Y-%m-%d %H:%M UTC") if side["created_at"] else "time unknown"
            console.print(f"{arrow}{side['ref']} ({', '.join(side['formats'])}: {side['n_items']} items, {when})",
                          highlight=False, soft_wrap=True)  # fmt: skip
        counts = report["counts"]
        redone = f"redone {counts['redone']} (a new rewrite, the same text), " if counts["redone"] else ""
        recut = f"recut {counts['recut']} (the same rewrite, other paragraphs kept), " if counts["recut"] else ""
        console.print(f"added {counts['added']} ({report['new_samples']} new samples), removed {counts['removed']}, "
                      f"rewritten {counts['rewritten']}, {redone}{recut}same {counts['same']}", highlight=False,
                      soft_wrap=True)  # fmt: skip
        table = Table(title="by source")
        columns = [c for c in CHANGES if c not in ("redone", "recut") or counts[c]]
        for name in ("source", *columns):
            table.add_column(name, justify="left" if name == "source" else "right")
        for row in report["by_source"]:
            table.add_row(*(str(row[k]) for k in ("source", *columns)))
        console.print(table)
        if report["removed_why"]:
            why = ", ".join(f"{r['why']} {r['n']}" for r in report["removed_why"])
            console.print(f"removed, why (the lineage now): {why}", highlight=False, soft_wrap=True)
        marks = {"added": "+", "removed": "-", "rewritten": "~", "redone": "=", "recut": "%"}
        for ex in report["examples"]:
            texts = [repr(_one_line(t, 120)) for t in (ex["text_a"], ex["text_b"]) if t is not None]
            texts = texts[:1] if ex["change"] == "redone" else texts
            console.print(f"{marks[ex['change']]} {ex['sample_id']} {ex['source']}: {' -> '.join(texts)}",
                          highlight=False, markup=False, soft_wrap=True)  # fmt: skip

    @app.command("runs")
    @user_errors
    def runs(
        workspace: WorkspaceOpt = None,
        limit: Annotated[int, typer.Option(min=1, help="How many recent runs.")] = 20,
        flow: Annotated[str | None, typer.Option(help="Only runs of this flow (rewrite, filter, factory, ...).")] = None,
        status: Annotated[
            str | None, typer.Option(help="Only runs in this status: running, completed, failed or interrupted.")
        ] = None,
    ) -> None:
        """Recent flow runs: status, duration, counts, progress of running ones, why one failed.

        Examples: polite runs --limit 5 | polite runs --flow rewrite --status failed
        """
        from lineage.queries import recent_runs

        rows = recent_runs(_store(workspace), limit, flow=flow, status=status)
        title = "recent runs (full rows: polite sql \"SELECT * FROM runs\")"
        if console.width < RUNS_TABLE_WIDTH:
            console.print(title, highlight=False)
            for line in runs_as_lines(rows, console.width):
                console.print(line, highlight=False, markup=False)
            return
        table = Table(title=title)
        for name, opts in (("run_id", {"no_wrap": True}), ("flow", {}), ("status", {}), ("started", {"no_wrap": True}),
                           ("s", {"justify": "right"}), ("summary", {"overflow": "fold"})):  # fmt: skip
            table.add_column(name, **opts)
        for row in rows:
            outcome = "\n".join(t for t in (_progress(row), compact_summary(row["summary"]), _error(row)) if t)
            table.add_row(row["run_id"], row["flow"], row["status"], _started(row),
                          "-" if row["seconds"] is None else str(row["seconds"]), outcome)  # fmt: skip
        console.print(table)
