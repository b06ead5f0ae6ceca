"""CPU benchmark of the rewrite generator with the tiny model: plain HF generate vs the fast decoder, per batch size.

Real prompts (models.prompts.rewrite_prompt), real PNG images through the tiny model's image processor, the
batching engine with prefetch, greedy decoding forced to --new-tokens tokens. Prints one JSON line per setting
(backend, batch); use it to see the CPU-side overheads (Python per step) that the GPU benchmark removes with CUDA graphs.

    .venv/bin/python bench/rewrite_cpu.py                 # ~1 min on 2 cores
    .venv/bin/python bench/rewrite_cpu.py --samples 256 --batches 1,16,64 --new-tokens 64
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _png(k: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (64, 48), ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest when shared)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from models.batching import plan_batches, run_batches
    from models.generation import RewriteGenerator, resolve_generation
    from models.loader import load_rewriter
    from models.tiny import make_tiny_rewriter

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="rewrite-cpu-"))
    loaded = load_rewriter(make_tiny_rewriter(work / "tiny"))
    images = []
    for k in range(max(1, args.samples // 4)):  # four questions per image, as in VQA datasets
        path = work / f"{k}.png"
        path.write_bytes(_png(k))
        images.append((f"i_{k}", str(path)))
    rows = [(f"<image>\nQuestion {i}: what is in the picture, and what colour is it?", f"raw answer number {i}")
            for i in range(args.samples)]  # fmt: skip
    settings = resolve_generation(
        "greedy", {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    )
    results = {"machine": "2-core CPU (shared)", "threads": args.threads, "samples": args.samples,
               "new_tokens": args.new_tokens, "runs": []}  # fmt: skip
    for backend in ("plain", "fast"):
        gen = RewriteGenerator(loaded, settings, backend=backend, cuda_graphs=False)
        ids = [gen.prompt_ids(i, r) for i, r in rows]
        for batch in [int(b) for b in args.batches.split(",")]:
            plan = plan_batches(
                [len(x) for x in ids], args.new_tokens, token_budget=10**9, max_batch_size=batch
            )
            t0 = time.perf_counter()
            outcomes, stats = run_batches(plan, lambda i, g=gen, x=ids: g.prepare(x[i], [images[i % len(images)]]),
                                          gen.generate, prefetch=True)  # fmt: skip
            seconds = time.perf_counter() - t0
            tokens = sum(o.value.output_tokens for o in outcomes if o.ok)
            row = {"backend": backend, "batch": batch, "seconds": round(seconds, 2),
                   "tokens_per_s": round(tokens / seconds, 1), "samples_per_s": round(args.samples / seconds, 2),
                   "failed": sum(not o.ok for o in outcomes)}  # fmt: skip
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
