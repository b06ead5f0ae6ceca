"""Every decoding preset on the fast decoder vs Hugging Face ``generate`` (the plain path), through the production
rewrite task, on a workspace's own samples.

Runs ``tasks.rewrite.rewrite_shard`` (the function behind the Prefect task) on the first ``--samples`` samples of
a workspace's first rewrite run, with the workspace's latest rewriter, once per (preset, backend), alternating the
backends for ``--rounds`` rounds. Prints the generation time, tokens/s and whether both backends wrote the same
rewrites (``--backends`` adds the fast decoder without batch shrinking). Sampling presets draw from the same seeded stream on both backends, so they match too.

    .venv/bin/polite run --workspace /tmp/demo_ws               # once: a trained tiny rewriter and 600 samples
    .venv/bin/python bench/rewrite_presets.py --workspace /tmp/demo_ws --samples 128
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    from bench.demo_work import DemoShards, demo_parser

    parser = demo_parser(__doc__, rounds=1, max_batch_size=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--presets", default="greedy,beam,paper")
    parser.add_argument("--backends", default="plain,fast",
                        help="plain, fast, and fast-noshrink (the fast decoder with shrink_batches off)")  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    from flows.rewrite import WORK_ORDER
    from models.generation import resolve_generation
    from polite.shards import read_table
    from tasks.rewrite import rewrite_shard

    torch.set_num_threads(args.threads)
    demo = DemoShards(args.workspace, WORK_ORDER, args.samples, args.samples, prefix="rewrite-presets-")
    model, first, tmp, shard = demo.model, demo.work, demo.folder, demo.shards[0]
    options = {"token_budget": 65536, "max_batch_size": args.max_batch_size, "scheduling": "static"}
    print(
        f"{first.num_rows} samples, model {model['model_id']}, max_new_tokens {args.max_new_tokens}",
        flush=True,
    )
    demo.warm_up()
    runs, summary = [], {}
    for preset in args.presets.split(","):
        settings = resolve_generation(preset, {"max_new_tokens": args.max_new_tokens})
        outputs: dict[str, dict] = {}
        backends = args.backends.split(",")
        for k in range(args.rounds):
            for variant in backends if k % 2 == 0 else backends[::-1]:
                out = str(tmp / f"{preset}-{variant}-{k}.parquet")
                job = demo.job(settings, work=shard, out=out, backend=variant.split("-")[0],
                               shrink_batches=variant != "fast-noshrink", **options)  # fmt: skip
                started = time.perf_counter()
                stats = rewrite_shard(job)
                wall = time.perf_counter() - started
                rows = read_table(out).to_pylist()
                outputs[variant] = {r["sample_id"]: r["output"] for r in rows}
                row = {"preset": preset, "backend": variant, "round": k, "seconds": round(wall, 2),
                       "generate_s": stats["generate_s"], "ok": stats["ok"], "output_tokens": stats["output_tokens"],
                       "tokens_per_s": round(stats["output_tokens"] / stats["generate_s"], 1)}  # fmt: skip
                runs.append(row)
                print(json.dumps(row), flush=True)
        reference = outputs[backends[0]]
        summary[preset] = {}
        for variant in backends:
            mine = [r["generate_s"] for r in runs if r["preset"] == preset and r["backend"] == variant]
            summary[preset][f"{variant}_generate_s"] = round(statistics.median(mine), 3)
            same = sum(reference[s] == outputs[variant].get(s) for s in reference)
            summary[preset][f"{variant}_identical_to_{backends[0]}"] = f"{same}/{len(reference)}"
        print(json.dumps({preset: summary[preset]}), flush=True)
    result = {
        "samples": first.num_rows,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
        "summary": summary,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
