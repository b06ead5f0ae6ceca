"""CLI commands of the distort stage: `polite distort` (make pairs, or export them as a training set)."""

from __future__ import annotations

import json
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
            from flows.distort import write_training_set

            out = None if export_training_set == "-" else export_training_set
            path = write_training_set(cfg.model_dump(mode="json", by_alias=True), workspace, where, out, format.value)
            console.print(f"wrote the training set to {path}")
            return
        if where is not None:
            raise ValueError("--where only applies with --export-training-set")
        from flows.distort import distort_flow

        summary = distort_flow(
            config=cfg.model_dump(mode="json", by_alias=True), workspace=workspace, retry_failed=retry_failed, methods=method or None
        )
        console.print_json(json.dumps(summary, default=str))
