"""Static batches vs continuous batching through the production rewrite task, on a workspace's own samples.

Runs ``tasks.rewrite.rewrite_shard`` (the function behind the Prefect task: batching, image loading, the fast
decoder, result files) on the work shards of a workspace's first rewrite run, once per scheduling, alternating
for ``--rounds`` rounds, with the workspace's latest rewriter. Rewrites of a trained model differ in length,
which is what continuous batching is for. Prints the time per run, tokens/s over the generation time, and
whether both schedulings wrote the same rewrites.

    .venv/bin/polite run --workspace /tmp/demo_ws               # once: a trained tiny rewriter and 600 samples
    .venv/bin/python bench/rewrite_scheduling.py --workspace /tmp/demo_ws --rounds 3
    .venv/bin/python bench/rewrite_scheduling.py --workspace /tmp/demo_ws --preset beam --cache-new-tokens 64
    .venv/bin/python bench/rewrite_scheduling.py --workspace /tmp/demo_ws --no-repeat-ngram-size 3   # single rows
    .venv/bin/python bench/rewrite_scheduling.py --workspace /tmp/demo_ws --limit 64 --rounds 1   # a quick check
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    from bench.demo_work import DemoShards, demo_parser, report

    parser = demo_parser(__doc__)
    parser.add_argument(
        "--shard-size", type=int, default=512, help="samples per rewrite_shard call, as the flow"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples of the work")
    parser.add_argument("--order", choices=("image", "sample"), default="image",
                        help="work order: the flow's (by first image, then sample id) or by sample id alone")  # fmt: skip
    parser.add_argument("--preset", default="greedy", help="greedy, beam or paper (3 sampled beams)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None,
                        help="an override of the preset's (greedy with it picks tokens with a search, on the host)")  # fmt: skip
    parser.add_argument("--sample", action="store_true", help="do_sample on: one sampled row per sample with "
                        "greedy (rewrites then depend on the batch, so they differ between schedulings)")  # fmt: skip
    parser.add_argument("--token-budget", type=int, default=65536)
    parser.add_argument("--cache-new-tokens", type=int, default=None,
                        help="room for this many new tokens first (the ring's too); default: max_new_tokens")  # fmt: skip
    args = parser.parse_args(argv)

    import torch

    from flows.rewrite import WORK_ORDER
    from models.generation import resolve_generation
    from polite.shards import read_table
    from tasks.rewrite import rewrite_shard

    torch.set_num_threads(args.threads)
    demo = DemoShards(args.workspace, WORK_ORDER if args.order == "image" else "sample_id", args.shard_size, args.limit,
                      prefix="rewrite-scheduling-")  # fmt: skip
    model, first, tmp, shards = demo.model, demo.work, demo.folder, demo.shards
    settings = resolve_generation(args.preset, {"max_new_tokens": args.max_new_tokens,
                                                "no_repeat_ngram_size": args.no_repeat_ngram_size,
                                                "do_sample": True if args.sample else None})  # fmt: skip
    base = demo.job(settings, backend="auto", token_budget=args.token_budget, max_batch_size=args.max_batch_size,
                    cache_new_tokens=args.cache_new_tokens)  # fmt: skip
    print(f"{first.num_rows} samples, model {model['model_id']}, {args.preset}, max_new_tokens "
          f"{args.max_new_tokens}, no_repeat {settings.get('no_repeat_ngram_size')}, sampled {settings['do_sample']}, "
          f"cache_new_tokens {args.cache_new_tokens}, token_budget {args.token_budget}",
          flush=True)  # fmt: skip
    demo.warm_up()
    runs, outputs = [], {}
    for k in range(args.rounds):
        for scheduling in ("static", "continuous") if k % 2 == 0 else ("continuous", "static"):
            started = time.perf_counter()
            total: dict[str, float] = {}
            for n, work_path in enumerate(shards):  # one generator per shard, as in the flow
                out = str(tmp / f"{scheduling}-{k}-{n}.parquet")
                stats = rewrite_shard(dict(base, work=work_path, out=out, scheduling=scheduling))
                for name in ("generate_s", "output_tokens", "ok", "batches", "images_encoded", "rows_continued"):
                    total[name] = total.get(name, 0) + stats[name]
                rows = read_table(out).to_pylist()
                outputs.setdefault(scheduling, {}).update((r["sample_id"], r["output"]) for r in rows)
            wall = time.perf_counter() - started
            row = {"scheduling": stats["scheduling"], "round": k, "seconds": round(wall, 2), "shards": len(shards),
                   "stream_rows": stats["stream_rows"],
                   **{name: round(value, 3) for name, value in total.items()},
                   "tokens_per_s": round(total["output_tokens"] / total["generate_s"], 1)}  # fmt: skip
            runs.append(row)
            print(json.dumps(row), flush=True)
    same = sum(outputs["static"][s] == outputs["continuous"].get(s) for s in outputs["static"])
    result = {
        "samples": first.num_rows,
        "preset": args.preset,
        "no_repeat_ngram_size": settings.get("no_repeat_ngram_size"),
        "do_sample": settings["do_sample"],
        "cache_new_tokens": args.cache_new_tokens,
        "token_budget": args.token_budget,
        "order": args.order,
        "runs": runs,
        "identical_rewrites": f"{same}/{len(outputs['static'])}",
    }
    return report(result, "scheduling", args.out)


if __name__ == "__main__":
    main()
