"""Rewrite one work shard: every sample in it gets exactly one result row (ok or failed) in one parquet file.

The pure function ``rewrite_shard`` reads the work shard (samples with their attempt number, reason and image
paths), loads the rewriter once per process (models.loader), runs the batching engine (models/batching.py) over
``RewriteGenerator`` (models/generation.py), and writes the result rows atomically at ``job["out"]``. That path
is derived from the shard's content, the model, the prompt version and the settings, so a repeated task finds
its file and does nothing. Workers never open DuckDB.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
from prefect import task

from polite.shards import exists, read_table, write_table_atomic

WORK_SCHEMA = pa.schema(
    [
        ("rewrite_id", pa.string()),
        ("sample_id", pa.string()),
        ("attempt", pa.int32()),
        ("reason", pa.string()),
        ("instruction", pa.string()),
        ("raw_response", pa.string()),
        ("image_ids", pa.list_(pa.string())),
        ("image_paths", pa.list_(pa.string())),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        ("rewrite_id", pa.string()),
        ("sample_id", pa.string()),
        ("model_id", pa.string()),
        ("prompt_version", pa.string()),
        ("settings_hash", pa.string()),
        ("settings", pa.string()),
        ("attempt", pa.int32()),
        ("status", pa.string()),
        ("output", pa.string()),
        ("error", pa.string()),
        ("input_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("latency_ms", pa.float64()),
        ("run_id", pa.string()),
        ("reason", pa.string()),
    ]
)


def rewrite_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the samples of ``job["work"]`` into ``job["out"]``; returns the path and counts.

    ``job``: work, out (URLs); model_path, model_id; prompt_version; settings (decoding), settings_hash;
    run_id; and the runtime options backend, device, dtype, cuda_graphs, decode_attention, kv_block, shrink_batches,
    compile_layers, cache_new_tokens, scheduling, token_budget, max_batch_size, max_prompt_tokens, prefetch_images.
    """
    out = job["out"]
    if exists(out):
        return {"path": out, "reused": True}
    from models.batching import plan_batches, run_batches, stream_rows
    from models.fast_cache import round_up
    from models.flamingo import model_lock
    from models.generation import PromptTooLong, RewriteGenerator
    from models.loader import load_rewriter
    from models.memory import resolve_token_budget

    started = time.perf_counter()
    work = read_table(job["work"]).to_pylist()
    loaded = load_rewriter(job["model_path"], device=job.get("device"), dtype=_dtype(job.get("dtype")))
    if loaded.fingerprint != job["model_id"]:
        raise RuntimeError(
            f"the model files at {job['model_path']} now fingerprint as {loaded.fingerprint}, not {job['model_id']}: "
            "they changed since the flow chose them; run the flow again"
        )
    settings = job["settings"]
    gen = RewriteGenerator(
        loaded,
        settings,
        backend=job.get("backend", "auto"),
        max_prompt_tokens=int(job.get("max_prompt_tokens", 1024)),
        cuda_graphs=bool(job.get("cuda_graphs", True)),
        decode_attention=str(job.get("decode_attention", "sdpa")),
        kv_block=int(job.get("kv_block", 16)),
        shrink_batches=bool(job.get("shrink_batches", True)),
        compile_layers=compile_layers_option(job.get("compile_layers", "auto")),
        cache_new_tokens=job.get("cache_new_tokens"),
    )
    # one generation at a time per loaded model: its layers carry per-call state (image conditioning, the fast
    # decoder's caches), and shards in one worker process share the cached model
    lock = model_lock(loaded.model)
    with lock:  # the memory reading must not see another shard's batch in flight
        token_budget = resolve_token_budget(job.get("token_budget", "auto"), loaded,
                                            gen.decoder.kv_cache_bytes if gen.decoder is not None else 0)  # fmt: skip

    prompt_ids: dict[int, list[int]] = {}
    early: dict[int, str] = {}
    for i, row in enumerate(work):
        try:
            prompt_ids[i] = gen.prompt_ids(row["instruction"] or "", row["raw_response"] or "")
        except PromptTooLong as exc:
            early[i] = str(exc)
    todo = sorted(prompt_ids)
    planned_new = gen.planned_new_tokens

    def plan(indices: list[int]) -> list[list[int]]:
        """Token-budget batches of these work rows (as row indices)."""
        batches = plan_batches(
            [len(prompt_ids[i]) for i in indices],
            max_new_tokens=planned_new,
            token_budget=token_budget,
            max_batch_size=int(job.get("max_batch_size", 512)),
            width=int(settings.get("num_beams", 1)),
            granularity=gen.decoder.kv_block if gen.decoder is not None else 1,
            session_rows=gen.decoder.session_rows if gen.decoder is not None else None,
        )
        return [[indices[j] for j in batch] for batch in batches]

    batches = plan(todo)

    def load_item(i: int):
        row = work[i]
        return gen.prepare(
            prompt_ids[i], list(zip(row["image_ids"] or [], row["image_paths"] or [], strict=True))
        )

    def generate(batch):
        with lock:
            return gen.generate(batch)

    prefetch = bool(job.get("prefetch_images", True))
    scheduling = (
        choose_scheduling(str(job.get("scheduling", "auto")), gen, len(batches)) if todo else "static"
    )
    if scheduling == "continuous":
        from models.continuous import run_continuous

        longest = max(len(prompt_ids[i]) for i in todo)
        ring = round_up(longest + planned_new, gen.decoder.kv_block)
        slots = stream_rows(token_budget, ring, int(job.get("max_batch_size", 512)), len(todo),
                            gen.decoder.session_rows, width=gen.beams)  # fmt: skip

        def stream(fetch):
            with lock:
                yield from gen.stream(fetch, slots, longest)

        order = [i for batch in batches for i in batch]  # longest prompts first, as the batches were planned
        outcomes, stats = run_continuous(order, load_item, stream, generate, plan, prefetch=prefetch)
    else:
        slots = None
        outcomes, stats = run_batches(batches, load_item, generate, prefetch=prefetch)
    by_index = {o.index: o for o in outcomes}

    recorded = json.dumps(
        {**settings, "runtime": {**gen.runtime(), "scheduling": scheduling, "token_budget": token_budget}},
        sort_keys=True,
    )
    rows = []
    for i, row in enumerate(work):
        outcome = by_index.get(i)
        value = outcome.value if outcome is not None and outcome.ok else None
        error = early.get(i) or (outcome.error if outcome is not None else None)
        rows.append(
            {
                "rewrite_id": row["rewrite_id"],
                "sample_id": row["sample_id"],
                "model_id": job["model_id"],
                "prompt_version": job["prompt_version"],
                "settings_hash": job["settings_hash"],
                "settings": recorded,
                "attempt": int(row["attempt"]),
                "status": "ok" if value is not None else "failed",
                "output": value.text if value is not None else None,
                "error": None if value is not None else (error or "no result"),
                "input_tokens": len(prompt_ids[i]) if i in prompt_ids else None,
                "output_tokens": value.output_tokens if value is not None else None,
                "latency_ms": round(outcome.latency_s * 1000.0, 3)
                if outcome is not None and outcome.ok
                else None,
                "run_id": job.get("run_id"),
                "reason": row["reason"],
            }
        )
    write_table_atomic(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out)
    n_ok = sum(r["status"] == "ok" for r in rows)
    return {
        "path": out,
        "reused": False,
        "ok": n_ok,
        "failed": len(rows) - n_ok,
        "output_tokens": sum(r["output_tokens"] or 0 for r in rows),
        "seconds": round(time.perf_counter() - started, 3),
        "generate_s": round(stats.generate_s, 3),
        "load_wait_s": round(stats.load_wait_s, 3),  # image loading the prefetch did not hide
        "batches": stats.batches,
        "splits": stats.splits,
        "oom_splits": stats.oom_splits,
        "backend": gen.backend,
        "scheduling": scheduling,
        "images_encoded": gen.images_encoded,
        "token_budget": token_budget,
        "cache_grows": gen.cache_grows,
        "stream_rows": slots,  # continuous scheduling: the samples decoding at once (x num_beams rows)
        "rows_continued": gen.rows_continued,  # ... of the samples, those that outlived the ring
        # the worker's KV-cache arena after this shard (shared by the shards of one process; it only grows)
        "kv_cache_mb": round(gen.decoder.kv_cache_bytes / 2**20, 1) if gen.decoder is not None else None,
    }


def choose_scheduling(requested: str, gen, static_batches: int) -> str:
    """``auto``: continuous where it was measured to pay, or where each row reads only its own span (flex);
    static for sdpa on CUDA until a GPU run compares them (BENCHMARKS.md). On CPU, static batches that shrink
    as rows finish measured 1.3-1.8x faster than continuous batching, whose sdpa steps attend the whole ring;
    without shrinking, continuous was 1.13-1.36x faster than static. Continuous only pays when some row can be
    refilled, that is when the shard needs more than one static batch (with a single batch it measured 30%
    slower on CPU)."""
    if not gen.can_stream:  # the plain path (a repetition penalty) batches statically
        return "static"
    if requested != "auto":
        return requested
    if static_batches < 2:
        return "static"
    decoder = gen.decoder
    cpu_without_shrinking = decoder.device.type == "cpu" and not decoder.shrink
    return "continuous" if decoder.attention == "flex" or cpu_without_shrinking else "static"


def _dtype(name: str | None):
    return None if name in (None, "auto") else name


def compile_layers_option(value: bool | str) -> bool | None:
    """The config's ``compile_layers`` for the decoder: ``auto`` (None there) compiles on CUDA only."""
    return None if value == "auto" else bool(value)


@task(name="rewrite-shard", task_run_name="rewrite {job[name]}")
def rewrite_shard_task(job: dict[str, Any]) -> dict[str, Any]:
    """Prefect wrapper: one task per work shard; the model stays loaded in the worker between shards."""
    return rewrite_shard(job)
