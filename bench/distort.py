"""Distortion throughput: pairs/s for augment and retrieve, requests/s for the LLM method's HTTP client.

    .venv/bin/python bench/distort.py                      # defaults: 20k pairs, 2 processes, 2k requests
    .venv/bin/python bench/distort.py --pairs 5000 --requests 500 --workers 2

On a shared machine the wall-clock rate shows the contention; pairs per CPU-second of one process is what
each idle core would give (shards are independent, so N idle cores give about N times that).
Methods 2 and 3 are measured through the stage's own functions (``distort_augment``, ``distort_retrieve``),
in one process and in ``--workers`` processes (as the Ray runner would run shards); responses are synthetic,
shaped like LLaVA detailed descriptions (6-9 sentences, ~100-150 words). Method 1 is measured against the
stub OpenAI server (tasks/distort/stub_server.py) in its own process, at concurrency 16: this is the
client's overhead and the stub's speed, not an LLM's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "the a image shows man woman dog cat street car bus tree table red blue green small large wooden "
    "standing sitting walking near next to behind on in with and while there are two three several people "
    "building sky window light bright dark colourful scene background foreground holding looking"
).split()


def response(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(6, 9)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 20))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "!"]))
    return " ".join(sentences)


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        boxes = [[rng.choice(WORDS), sorted([rng.random(), rng.random()]) * 2] for _ in range(rng.randint(3, 10))]
        captions = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(5)]
        out.append(
            {
                "sample_id": f"s_bench_{i}",
                "instruction": "<image>\nDescribe the image in detail.",
                "raw_response": response(rng),
                "meta": json.dumps({"captions": captions, "boxes": boxes}),
            }
        )
    return out


def _run(method: str, chunk: list[dict]) -> float:
    """Make the pairs of ``chunk``; return the CPU seconds this process spent on it."""
    from polite.config.distort import AugmentSettings
    from tasks.distort.augment import distort_augment
    from tasks.distort.record import pairs_to_table
    from tasks.distort.retrieve import distort_retrieve

    started = time.process_time()
    if method == "augment":
        pairs = distort_augment(chunk, AugmentSettings(), "v_bench", run_seed=0)
    else:
        pairs = distort_retrieve(chunk, "v_bench", run_seed=0)
    pairs_to_table(pairs)  # the shard's Arrow table is part of the work
    return time.process_time() - started


def _warm(_: int) -> None:
    _run("augment", rows(2))  # imports nlpaug (and torch through it) before the clock starts


def pairs_per_second(method: str, data: list[dict], workers: int) -> tuple[float, float]:
    """(pairs per wall second, pairs per CPU second of one process)."""
    if workers == 1:
        _warm(0)
        started = time.perf_counter()
        cpu = _run(method, data)
        return len(data) / (time.perf_counter() - started), len(data) / cpu
    size = max(1, len(data) // (workers * 8))
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm, range(workers))
        started = time.perf_counter()
        cpu = sum(pool.starmap(_run, [(method, c) for c in chunks]))
        return len(data) / (time.perf_counter() - started), len(data) / cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_per_second(n: int, concurrency: int) -> tuple[float, int]:
    from polite.config.distort import LLMSettings
    from tasks.distort.backends import OpenAIChatBackend

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tasks.distort.stub_server", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        server.stdout.readline()  # "stub chat server on ..." once it listens
        settings = LLMSettings(model="stub", base_url=f"http://127.0.0.1:{port}/ok/v1", concurrency=concurrency)
        backend = OpenAIChatBackend(settings)
        data = rows(n, seed=1)
        conversations = [
            [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["raw_response"]},
             {"role": "user", "content": "Make it short."}]
            for r in data
        ]  # fmt: skip
        backend.chat(conversations[:32], list(range(32)))  # connect and warm up
        started = time.perf_counter()
        replies = backend.chat(conversations, list(range(n)))
        elapsed = time.perf_counter() - started
        return n / elapsed, sum(r.error is None for r in replies)
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    data = rows(args.pairs)
    words = sum(len(r["raw_response"].split()) for r in data) / len(data)
    print(f"# distortion throughput ({os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f})")
    print(f"{args.pairs} synthetic samples, {words:.0f} words per response on average\n")
    print("| method | processes | pairs/s (wall) | pairs per CPU-second per process |")
    print("|---|---|---|---|")
    for method in ("augment", "retrieve"):
        for workers in sorted({1, args.workers}):
            wall, per_cpu = pairs_per_second(method, data, workers)
            print(f"| {method} | {workers} | {wall:,.0f} | {per_cpu:,.0f} |", flush=True)
    rate, ok = requests_per_second(args.requests, args.concurrency)
    print(f"\nllm (HTTP client -> stub server process), concurrency {args.concurrency}: "
          f"{rate:,.0f} requests/s ({ok}/{args.requests} ok)")  # fmt: skip


if __name__ == "__main__":
    main()
