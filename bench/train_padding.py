"""Rewriter training and padding: steps/s and held-out loss of the ways a step's sequences can be batched.

On a demo workspace's training set and tiny base (``polite run --workspace DIR`` once), it trains the tiny
rewriter with ``models.train.train_rewriter`` in these variants and prints steps/s and the held-out losses:

* ``micro``: a big step in micro-batches, its sequences longest first (what training does) against the plan's
  order (``by_length`` replaced by the identity); the same gradient, so the same losses;
* ``group``: the demo's steps of 8, shuffled (the default) against ``group_by_length`` (windows of 50 steps,
  and of ``--small-window`` steps).

    .venv/bin/python bench/train_padding.py --workspace /tmp/demo_ws
    .venv/bin/python bench/train_padding.py --workspace /tmp/demo_ws --only micro --micro-steps 12
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train(training_set: str, base: str, out: Path, settings: dict, window: int | None = None) -> dict:
    from models.train import train_rewriter
    from models.train_data import BatchPlan

    default = BatchPlan.window
    BatchPlan.window = window or default  # the grouping window is not a setting: this run only
    try:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        summary = train_rewriter(training_set, base, out, settings, seed=0, base_is_tiny=True)
    finally:
        BatchPlan.window = default
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["heldout_curve"] = json.loads((out / "training.json").read_text())["heldout"]
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", required=True, help="a workspace where `polite run` trained the demo")
    parser.add_argument("--only", choices=["micro", "group"], default=None)
    parser.add_argument("--micro-steps", type=int, default=12, help="steps of 64 in micro-batches of 8")
    parser.add_argument("--steps", type=int, default=300, help="steps of 8 for the grouping variants")
    parser.add_argument("--small-window", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import models.train as train_module
    from polite.shards import read_table, write_table_atomic
    from polite.workspace import Workspace

    kept = sorted(glob.glob(f"{args.workspace}/models/rewriter-*/training_set.parquet"))[-1]
    base = f"{args.workspace}/models/tiny-base"
    scratch = Path(tempfile.mkdtemp(prefix="train-padding-"))
    # the kept training set stores its image paths relative to the workspace: train on a copy that locates them
    training_set = str(scratch / "training_set.parquet")
    write_table_atomic(Workspace.resolve(args.workspace).locate_paths(read_table(kept), "images"), training_set)
    common = {"checkpoint_every": 100_000, "num_threads": args.threads, "time_budget_s": None}
    rows = []

    def report(variant: str, summary: dict) -> None:
        row = {"variant": variant, "steps_per_s": summary["steps_per_s"], "wall_s": summary["wall_s"],
               "final_loss": round(summary["final_loss"], 4),
               "heldout": [[s, round(v, 3)] for s, v in summary["heldout_curve"]]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.only in (None, "micro"):
        settings = {**common, "max_steps": args.micro_steps, "batch_size": 64, "micro_batch_size": 8,
                    "eval_every": 100_000}  # fmt: skip
        longest_first = train_module.by_length
        for name, order in (("batch 64 / micro 8, plan order", lambda batch: batch),
                            ("batch 64 / micro 8, longest first", longest_first)):  # fmt: skip
            train_module.by_length = order
            try:
                report(name, train(training_set, base, scratch / "micro", settings))
            finally:
                train_module.by_length = longest_first
    if args.only in (None, "group"):
        settings = {**common, "max_steps": args.steps, "eval_every": 50}
        report("batch 8, shuffled", train(training_set, base, scratch / "group", settings))
        grouped = {**settings, "group_by_length": True}
        report("batch 8, grouped by length (50 steps)", train(training_set, base, scratch / "group", grouped))
        report(f"batch 8, grouped by length ({args.small_window} steps)",
               train(training_set, base, scratch / "group", grouped, window=args.small_window))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
