"""A growing KV cache vs room for max_new_tokens from the start, through the production rewrite task.

Runs ``tasks.rewrite.rewrite_shard`` (batch planning, image loading, the fast decoder, result files) on the work
of a demo workspace's first rewrite run with its latest rewriter, under one token budget, once with
``cache_new_tokens`` unset (every row reserves prompt + max_new_tokens, as before) and once with it set (batches
are planned for prompt + cache_new_tokens, and a batch's cache grows when rows outlive it), alternating for
``--rounds`` rounds. The trained rewriter's rewrites vary in length like real ones (the demo's: median 30 tokens,
p90 103, of at most 224), which is what the growing cache is for. Prints per run the batches and rows per batch
(with ``--scheduling continuous``: the rows of the ring, and the samples that outlived it and went on in static
batches), the KV-cache arena the decoder needed, how often a cache grew, time and tokens/s, and whether both ways
wrote the same rewrites.

    .venv/bin/polite run --workspace /tmp/demo_ws               # once: a trained tiny rewriter and 600 samples
    .venv/bin/python bench/cache_growth.py --workspace /tmp/demo_ws --rounds 2
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
    parser.add_argument("--preset", default="greedy", help="greedy, beam or paper (3 sampled beams)")
    parser.add_argument("--scheduling", choices=("static", "continuous"), default="static",
                        help="continuous: the ring holds prompt + cache_new_tokens, and rows that "
                             "outlive it go on in static batches")  # fmt: skip
    parser.add_argument("--cache-new-tokens", type=int, default=64,
                        help="the growing run's first room (the ratio 224:64 is about the paper's 1024:256)")  # fmt: skip
    parser.add_argument(
        "--token-budget", type=int, default=8192, help="small enough to bind at the demo's size"
    )
    parser.add_argument(
        "--shard-size", type=int, default=512, help="samples per rewrite_shard call, as the flow"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples of the work")
    args = parser.parse_args(argv)

    import torch

    from flows.rewrite import WORK_ORDER
    from models.generation import fast_decoder, resolve_generation
    from models.loader import load_rewriter
    from polite.shards import read_table
    from tasks.rewrite import rewrite_shard

    torch.set_num_threads(args.threads)
    demo = DemoShards(args.workspace, WORK_ORDER, args.shard_size, args.limit, prefix="cache-growth-")
    model, first, tmp, shards = demo.model, demo.work, demo.folder, demo.shards
    settings = resolve_generation(args.preset, {"max_new_tokens": args.max_new_tokens})
    base = demo.job(settings, backend="fast", scheduling=args.scheduling, token_budget=args.token_budget,
                    max_batch_size=args.max_batch_size)  # fmt: skip
    print(f"{first.num_rows} samples, model {model['model_id']}, {args.preset}, max_new_tokens {args.max_new_tokens}, "
          f"token_budget {args.token_budget}", flush=True)  # fmt: skip
    demo.warm_up()
    # the decoder the task uses (one per model and options in a process): reset before each run, so its arena
    # afterwards is what that run needed
    decoder = fast_decoder(load_rewriter(model["path"], device="cpu"))
    modes = {"full": None, "grow": args.cache_new_tokens}
    runs, outputs = [], {}
    for k in range(args.rounds):
        for mode in modes if k % 2 == 0 else reversed(modes):
            decoder.reset()
            started = time.perf_counter()
            total: dict[str, float] = {}
            for n, work_path in enumerate(shards):
                out = str(tmp / f"{mode}-{k}-{n}.parquet")
                stats = rewrite_shard(dict(base, work=work_path, out=out, cache_new_tokens=modes[mode]))
                for name in ("generate_s", "output_tokens", "ok", "batches", "cache_grows", "rows_continued"):
                    total[name] = total.get(name, 0) + stats[name]
                outputs.setdefault(mode, {}).update(
                    (r["sample_id"], r["output"]) for r in read_table(out).to_pylist()
                )
            row = {"mode": mode, "cache_new_tokens": modes[mode], "round": k,
                   "seconds": round(time.perf_counter() - started, 2),
                   **{name: round(value, 3) for name, value in total.items()},
                   # continuous: a shard's stream counts as one batch, so its rows are stream_rows, not this
                   "rows_per_batch": round(total["ok"] / total["batches"], 1) if args.scheduling == "static" else None,
                   "stream_rows": stats["stream_rows"],
                   "kv_cache_mb": round(decoder.kv_cache_bytes / 2**20, 2),
                   "tokens_per_s": round(total["output_tokens"] / total["generate_s"], 1)}  # fmt: skip
            runs.append(row)
            print(json.dumps(row), flush=True)
    same = sum(outputs["full"][s] == outputs["grow"].get(s) for s in outputs["full"])
    result = {"samples": first.num_rows, "preset": args.preset, "scheduling": args.scheduling,
              "token_budget": args.token_budget,
              "max_new_tokens": args.max_new_tokens,
              "runs": runs, "identical_rewrites": f"{same}/{len(outputs['full'])}"}  # fmt: skip
    return report(result, "mode", args.out)


if __name__ == "__main__":
    main()
