"""CLI commands of the train stage: `polite train-rewriter`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from polite.cli.common import ConfigOpt, WorkspaceOpt, check_predicate, console, stage_config, user_errors


def register(app: typer.Typer) -> None:
    """Add this stage's commands to `app`."""

    @app.command("train-rewriter")
    @user_errors
    def train_rewriter(
        config: ConfigOpt = None,
        workspace: WorkspaceOpt = None,
        base: Annotated[
            str | None,
            typer.Option(
                "--base", help="'tiny' (made in the workspace) or a model folder holding flamingo.json."
            ),
        ] = None,
        max_steps: Annotated[
            int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.")
        ] = None,
        time_budget: Annotated[
            float | None, typer.Option("--time-budget", help="Stop after this many seconds of training.")
        ] = None,
        where: Annotated[
            str | None,
            typer.Option("--where", help="SQL predicate over pairs p, samples s choosing the pairs."),
        ] = None,
    ) -> None:
        """Train the rewriter on the (distorted -> original) pairs and record it in the lineage (`models`).

        Re-running with the same pairs and settings resumes from the last checkpoint, or returns the finished
        model at once. Prints the model id (its fingerprint), folder and held-out loss before/after.

        Examples:
          polite train-rewriter
          polite train-rewriter --max-steps 200 --where "p.method = 'augment'"
          polite train-rewriter --config configs/pf1m.yaml --base /models/openflamingo-9b-polite
        """
        from flows.train_rewriter import PAIRS_SOURCE, train_rewriter_flow
        cfg = stage_config(config)
        check_predicate(workspace, cfg.workspace, where, PAIRS_SOURCE, "--where")
        summary = train_rewriter_flow(
            config=cfg.model_dump(mode="json"),
            workspace=workspace,
            base=base,
            max_steps=max_steps,
            time_budget_s=time_budget,
            where=where,
        )
        console.print_json(json.dumps(summary, default=str))
