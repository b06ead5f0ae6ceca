"""Scorer throughput with the full-size architectures, random weights, no downloads (GPU; --tiny on CPU).

    python bench/gpu_filters.py --out /tmp/gpu_filters.json            # on the GPU machine
    python bench/gpu_filters.py --tiny --device cpu --out /tmp/t.json  # smoke test anywhere

Builds MPNet-base (all-mpnet-base-v2's shape), DeBERTa-v3-base (NLI, 3 labels), DeBERTa-v3-large (reward,
1 label) from configs and ViT-L-14-336 from open_clip's config, saves them, and scores synthetic
caption-like pairs through the very scorer classes and loaders the filter flow uses (bf16 on GPU, tokenizer
included in the timing). Text lengths mimic PF-1M: instruction ~10 words, raw ~10, rewrite ~60.
open_clip is optional here: without it the clipscore part is skipped. Imports neither prefect nor duckdb.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the fast tokenizer may use every core here
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "the a image shows dog cat man woman child car bus horse bird table sofa street beach window tree sky "
    "red blue green brown white black small large old young sitting standing walking lying parked near on in "
    "behind beside with and of is are there two three several bright calm busy wooden grey light soft warm"
).split()


def synthetic(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(instruction, raw, rewrite): ~10, ~10 and ~60 words, nearly all distinct, made fast from a sentence pool."""
    rng = random.Random(seed)
    pool = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "." for _ in range(5000)
    ]
    out = []
    for _ in range(n):
        rewrite = " ".join(rng.choices(pool, k=5))
        raw = " ".join(rng.choices(pool, k=1)).rstrip(".") + " " + rng.choice(WORDS)
        out.append((rng.choice(pool), raw, rewrite))
    return out


# The defaults of polite.config.filters, as plain attributes: this script must run on a bare GPU image
# (torch, transformers, sentence-transformers) without pydantic or pyarrow.
DEFAULTS = {
    "semantic": {"threshold": 0.40, "max_seq_length": 256, "fallback_model": None},
    "nli": {"min_score": None, "max_length": 512},
    "reward": {"min_score": None, "max_length": 512, "score_raw": True},
    "clipscore": {"threshold": 17.0, "max_sentences": 10, "model_config_file": None, "pretrained": ""},
}


def scorer_settings(name: str, **values) -> SimpleNamespace:
    return SimpleNamespace(**{"enabled": True, **DEFAULTS[name], **values})


def timed(scorer, items, budget_s: float) -> dict:
    """Warm up, calibrate on a slice, then time as many items as fit in ``budget_s``."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    scorer.score_batch(items[: min(len(items), 2 * scorer.batch_size)])  # load + warm-up
    probe = items[: max(len(items) // 10, min(len(items), 64))]
    sync()
    started = time.perf_counter()
    scorer.score_batch(probe)
    sync()
    rate = len(probe) / (time.perf_counter() - started)
    n = max(len(probe), min(len(items), int(rate * budget_s)))
    sync()
    started = time.perf_counter()
    results = scorer.score_batch(items[:n])
    sync()
    seconds = time.perf_counter() - started
    errors = sum(r.score is None for r in results)
    return {"pairs": n, "seconds": round(seconds, 3), "pairs_per_s": round(n / seconds, 1), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument("--budget-s", type=float, default=10.0, help="timed seconds per scorer (at most)")
    parser.add_argument("--only", nargs="*", default=["semantic", "nli", "reward", "clipscore"])
    parser.add_argument("--semantic-batch", type=int, default=1024)
    parser.add_argument("--reward-batch", type=int, default=256)
    parser.add_argument("--nli-batch", type=int, default=256)
    parser.add_argument("--clip-batch", type=int, default=256)
    args = parser.parse_args()

    import torch

    from filters.base import Runtime, ScoreInput
    from filters.models import resolve_runtime
    from filters.nli import NLIScorer
    from filters.reward import RewardScorer
    from filters.semantic import SemanticScorer
    from filters.tiny import make_deberta_classifier, make_mpnet_sentence_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runtime: Runtime = resolve_runtime(device, "auto")
    size = "tiny" if args.tiny else None
    scale = 0.02 if args.tiny or device == "cpu" else 1.0
    info = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "dtype": runtime.dtype,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "results": {},
    }
    print(json.dumps({k: v for k, v in info.items() if k != "results"}), flush=True)
    started_all = time.perf_counter()
    triples = synthetic(int(300_000 * scale) + 64)
    texts = [t for triple in triples[:2000] for t in triple]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def items(n: int, task: str, images: list[str] | None = None) -> list[ScoreInput]:
            return [
                ScoreInput(
                    f"r{i}", rw, raw, ins, task, image_paths=[images[i % len(images)]] if images else []
                )
                for i, (ins, raw, rw) in enumerate(triples[:n])
            ]

        def record(name: str, figures: dict, **extra) -> None:
            info["results"][name] = {**figures, **extra}
            print(f"{name:10s} {figures['pairs_per_s']:>12,.1f} pairs/s  {json.dumps(extra)}", flush=True)

        if "semantic" in args.only:
            t = time.perf_counter()
            path = make_mpnet_sentence_model(
                root / "mpnet", size="tiny" if args.tiny else "base", texts=texts
            )
            settings = scorer_settings("semantic", model=path, batch_size=args.semantic_batch)
            scorer = SemanticScorer(settings, runtime, model_ref=path)
            built = round(time.perf_counter() - t, 1)
            record(
                "semantic",
                timed(scorer, items(int(300_000 * scale), "caption"), args.budget_s),
                arch="MPNet-base" if not args.tiny else "MPNet-tiny",
                batch=args.semantic_batch,
                build_s=built,
            )
        for name, cls, labels, arch, batch in (
            ("nli", NLIScorer, 3, "base", args.nli_batch),
            ("reward", RewardScorer, 1, "large", args.reward_batch),
        ):
            if name not in args.only:
                continue
            t = time.perf_counter()
            path = make_deberta_classifier(
                root / name,
                labels,
                size=size or arch,
                texts=texts,
                real_vocab=not args.tiny,
                save_dtype=None if args.tiny else "bfloat16",
            )
            settings = scorer_settings(name, model=path, batch_size=batch)
            built = round(time.perf_counter() - t, 1)
            record(
                name,
                timed(cls(settings, runtime), items(int(40_000 * scale), "vqa"), args.budget_s),
                arch=f"DeBERTa-v3-{size or arch}",
                batch=batch,
                build_s=built,
            )
        if "clipscore" in args.only:
            try:
                import open_clip  # noqa: F401  (not in every GPU image)
            except ImportError:
                info["results"]["clipscore"] = {"skipped": "open_clip is not installed"}
                print("clipscore  skipped: open_clip is not installed", flush=True)
            else:
                from PIL import Image

                from filters.clipscore import ClipScoreScorer
                from filters.tiny import make_clip

                t = time.perf_counter()
                images = []
                for k in range(64):
                    p = root / f"img{k}.jpg"
                    Image.new("RGB", (640, 480), (k * 4 % 255, 90, 160)).save(p)
                    images.append(str(p))
                clip = make_clip(root / "clip") if args.tiny else {"model": "ViT-L-14-336", "pretrained": ""}
                settings = scorer_settings("clipscore", **clip, batch_size=args.clip_batch)
                built = round(time.perf_counter() - t, 1)
                record(
                    "clipscore",
                    timed(
                        ClipScoreScorer(settings, runtime),
                        items(int(20_000 * scale), "caption", images),
                        args.budget_s,
                    ),
                    arch=clip["model"],
                    batch=args.clip_batch,
                    images_per_batch="<=64 distinct",
                    build_s=built,
                )
    info["total_s"] = round(time.perf_counter() - started_all, 1)
    info["imported_prefect_or_duckdb"] = sorted({"prefect", "duckdb"} & set(sys.modules))
    print(f"total {info['total_s']}s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
