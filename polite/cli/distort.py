"""CLI commands of the distort stage: `polite distort` (make pairs, or export them as a training set)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from polite.cli.common import ConfigOpt, WorkspaceOpt, console, stage_config, user_errors


class TrainingSetFormat(StrEnum):
    parquet = "parquet"
    datasets = "datasets"


def register(app: typer.Typer) -> None:
    """Add this stage's commands to `app`."""

    @app.command("distort")
    @user_errors
    def distort(
        config: ConfigOpt = None,
        workspace: WorkspaceOpt = None,
        retry_failed: Annotated[
            bool, typer.Option("--retry-failed", help="Also redo pairs that failed (e.g. LLM timeouts).")
        ] = False,
        method: Annotated[
            list[str] | None,
            typer.Option("--method", "-m", help="Only this method (llm, augment, retrieve); repeatable."),
        ] = None,
        export_training_set: Annotated[
            str | None,
            typer.Option(
                "--export-training-set",
                help="Make no pairs: write the ok pairs as the rewriter's training set to PATH "
                "('-' for the default under <workspace>/exports/training_set/).",
                metavar="PATH",
            ),
        ] = None,
        where: Annotated[
            str | None,
            typer.Option("--where", help="With --export-training-set: SQL predicate over pairs p, samples s."),
        ] = None,
        format: Annotated[
            TrainingSetFormat, typer.Option("--format", help="With --export-training-set: parquet or datasets.")
        ] = TrainingSetFormat.parquet,
    ) -> None:
        """Turn high-quality samples into (distorted -> original) pairs, as the config's distort.mix asks.

        Re-running resumes: pairs already made under the same settings are not made again.

        Examples:
          polite distort --config configs/pf1m.yaml
          polite distort --retry-failed --method llm
          polite distort --export-training-set workspace/train.parquet --where "p.method <> 'retrieve'"
        """
        cfg = stage_config(config)
        if export_training_set is not None:
            _export_training_set(cfg, workspace, where, export_training_set, format.value)
            return
        if where is not None:
            raise ValueError("--where only applies with --export-training-set")
        from flows.distort import METHODS, distort_flow

        unknown = sorted(set(method or []) - set(METHODS))
        if unknown:  # here, not in the flow: before a Prefect server starts and a flow run fails
            raise ValueError(f"--method {', '.join(unknown)}: not a method; choose from {', '.join(METHODS)}")
        if method is None or "llm" in method:  # a Hub LLM the offline hub cannot fetch: before the flow starts
            from flows.preflight import check_hub_offline

            check_hub_offline(cfg, ["distort"])
        summary = distort_flow(
            config=cfg.model_dump(mode="json", by_alias=True), workspace=workspace, retry_failed=retry_failed, methods=method or None
        )
        for line in summary_lines(summary):
            console.print(line, highlight=False, soft_wrap=True)


def summary_lines(summary: dict) -> list[str]:
    """The distort flow's counts (``<method>_selected``, ``<method>_<status>``), one line per method."""
    if summary.get("enabled") is False:
        return ["distort: disabled in the config (distort.enabled: false)"]
    methods = sorted({key.rsplit("_", 1)[0] for key in summary if key.endswith("_selected")})
    lines = []
    for m in methods:
        made = ", ".join(f"{summary[key]} {key.rsplit('_', 1)[1]}" for key in sorted(summary)
                         if key.startswith(f"{m}_") and key != f"{m}_selected")  # fmt: skip
        lines.append(f"distort {m}: {summary[f'{m}_selected']} samples selected" + (f", pairs {made}" if made else ""))
    if not any(summary.get(f"{m}_selected") for m in methods):
        lines.append("nothing to do: every selected sample has its pairs under these settings (--retry-failed "
                     "redoes failed ones)")  # fmt: skip
    return lines


def _export_training_set(cfg, workspace: str | None, where: str | None, out: str, format: str) -> None:
    from flows.distort import write_training_set

    path = write_training_set(cfg.model_dump(mode="json", by_alias=True), workspace, where,
                              None if out == "-" else out, format, allow_empty=False)  # fmt: skip
    if format == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    else:
        import datasets

        rows = datasets.load_from_disk(path).num_rows
    console.print(f"wrote the training set ({rows} pairs) to {path}", highlight=False, soft_wrap=True)
