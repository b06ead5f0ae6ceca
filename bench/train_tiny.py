"""Does the tiny rewriter learn on CPU? Held-out loss before/after, restorations of simple distortions, speed.

Runs the real stages on a fresh workspace - ingest the bundled demo, distort (augment + retrieve), train the
tiny rewriter (the demo's default budget) - then asks the untrained base and the trained model to restore
held-out originals from two simple distortions (all lowercase without punctuation; sentences shuffled), greedy,
and scores each output against the original (difflib ratio, 1.0 = identical). Prints figures; asserts nothing.

    python bench/train_tiny.py                        # ~5 min on 2 cores
    python bench/train_tiny.py --time-budget 60 --examples 4
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lowercase(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower())


def shuffle_sentences(text: str, rng: random.Random) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    rng.shuffle(parts)
    return " ".join(parts)


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def word_f1(a: str, b: str) -> float:
    """Bag-of-words F1 (case-folded, punctuation dropped): content kept, whatever the order."""
    from collections import Counter

    wa, wb = Counter(lowercase(a).split()), Counter(lowercase(b).split())
    common = sum((wa & wb).values())
    if not common:
        return 0.0
    p, r = common / sum(wa.values()), common / sum(wb.values())
    return 2 * p * r / (p + r)


def restore(model_dir: str, cases: list[dict], max_new: int) -> list[str]:
    from models import Inferencer

    inf = Inferencer.from_model(model_dir, device="cpu", batch_size=8)
    out = inf(prompt=[c["prompt"] for c in cases], imgpaths=[c["images"] for c in cases], max_new_token=max_new,
              num_beams=1, do_sample=False, no_repeat_ngram_size=0, response_split="(Revised Response):")  # fmt: skip
    return [r for r, _ in out]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", default=None, help="default: a fresh temporary workspace")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="training seconds (default: the demo's)"
    )
    parser.add_argument("--examples", type=int, default=8, help="held-out originals to restore")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    from prefect.testing.utilities import prefect_test_harness

    from flows.distort import distort_flow
    from flows.ingest import ingest_flow
    from flows.train_rewriter import train_rewriter_flow
    from lineage.store import LineageStore
    from models.prompts import rewrite_prompt
    from models.train_data import read_training_set, split_heldout
    from polite.config import parse_config
    from polite.workspace import Workspace

    tmp = tempfile.TemporaryDirectory()
    ws = Workspace.resolve(args.workspace or tmp.name).ensure()
    config = parse_config({}).model_dump(mode="json")
    figures: dict = {}
    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        ingest_flow(config=config, workspace=ws.root)
        distort_flow(config=config, workspace=ws.root)
        figures["prepare_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        result = train_rewriter_flow(config=config, workspace=ws.root, time_budget_s=args.time_budget)
        figures["train_flow_s"] = round(time.perf_counter() - t0, 1)
    training = json.loads((Path(result["path"]) / "training.json").read_text())
    summary = training["summary"]
    figures.update({k: summary.get(k) for k in ("heldout_loss_start", "heldout_loss_end", "final_loss", "steps",
                    "steps_per_s", "train_seconds", "n_train", "n_heldout", "n_trainable", "threads")})  # fmt: skip
    figures["batch_size"] = training["settings"]["batch_size"]
    print(f"pairs {result['n_pairs']}  (train {summary['n_train']}, held out {summary['n_heldout']})")
    print(f"held-out loss {summary['heldout_loss_start']:.3f} -> {summary['heldout_loss_end']:.3f} over "
          f"{summary['steps']} steps of {figures['batch_size']} in {summary['train_seconds']:.0f}s "
          f"({summary['steps_per_s']:.2f} steps/s, {summary['threads']} threads)")  # fmt: skip

    # restorations of held-out originals (never trained on), from the untrained base and the trained model
    rows = read_training_set(result["training_set"])
    _, held = split_heldout(
        rows, training["settings"]["heldout_fraction"], training["settings"]["heldout_max"], 0
    )
    store = LineageStore(ws.db_path)
    instructions = {
        r["pair_id"]: r["instruction"]
        for r in store.query(
            "SELECT pair_id, instruction FROM pairs WHERE pair_id IN (SELECT unnest(?))",
            [[h["pair_id"] for h in held]],
        ).to_pylist()  # fmt: skip
    }
    rng = random.Random(0)
    cases = []
    for h in held[: args.examples]:
        for name, distort in (("lowercase", lowercase), ("shuffle", lambda t: shuffle_sentences(t, rng))):
            distorted = distort(h["target"])
            images = [ws.locate(p) for p in h["images"]]  # the kept training set stores them workspace-relative
            cases.append({"kind": name, "target": h["target"], "distorted": distorted, "images": images,
                          "prompt": rewrite_prompt(instructions[h["pair_id"]], distorted)})  # fmt: skip
    base_dir = str(Path(ws.models) / "tiny-base")
    max_new = 140
    before = restore(base_dir, cases, max_new)
    after = restore(result["path"], cases, max_new)

    def mean(metric, outputs, idx):
        return round(sum(metric(outputs[i], cases[i]["target"]) for i in idx) / len(idx), 3)

    inputs = [c["distorted"] for c in cases]
    for metric_name, metric in (("similarity", similarity), ("word_f1", word_f1)):
        table = {}
        for kind in ("lowercase", "shuffle"):
            idx = [i for i, c in enumerate(cases) if c["kind"] == kind]
            table[kind] = {"input_as_is": mean(metric, inputs, idx), "untrained": mean(metric, before, idx),
                           "trained": mean(metric, after, idx)}  # fmt: skip
        figures[f"restoration_{metric_name}"] = table
        print(f"\nmean {metric_name} to the original (1.0 = restored exactly):")
        print(f"{'distortion':<12}{'input as is':>12}{'untrained':>12}{'trained':>12}")
        for kind, t in table.items():
            print(f"{kind:<12}{t['input_as_is']:>12.3f}{t['untrained']:>12.3f}{t['trained']:>12.3f}")
    print("\nexamples:")
    for i, c in enumerate(cases[:4]):
        print(f"- [{c['kind']}] input:     {c['distorted'][:200]}")
        print(f"  untrained: {before[i][:200]}")
        print(f"  trained:   {after[i][:200]}")
        print(f"  original:  {c['target'][:200]}")
    figures["examples"] = [
        {
            "kind": c["kind"],
            "input": c["distorted"],
            "untrained": before[i],
            "trained": after[i],
            "original": c["target"],
        }
        for i, c in enumerate(cases[:4])
    ]
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    tmp.cleanup()
    return figures


if __name__ == "__main__":
    main()
