"""Continuous batching for a shard: feed items to a streaming generator as rows free up, with the same outcome
contract as ``models.batching.run_batches`` (every item gets exactly one ``Outcome``; a bad item fails alone).

Static batches run until their longest row finishes, so rows that finish early sit idle. A stream refills them.
Items are loaded (images decoded) on a CPU thread ahead of the stream's requests. If the stream itself raises
(out of memory, or an error it cannot pin on one row), the items it had not finished go through
``run_batches``, whose split-and-retry isolates the cause.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from models.batching import BatchStats, Outcome, describe_error, is_oom_error, load_or_fail, run_batches

Fetch = Callable[[int], list[tuple[int, Any]]]


class _Loader:
    """Loads items in order, one chunk ahead on a thread; a failed load becomes that item's outcome."""

    def __init__(self, order: Sequence[int], load_item, outcomes: dict[int, Outcome], stats: BatchStats,
                 prefetch: bool, chunk: int):  # fmt: skip
        self.order = deque(order)
        self.ready: deque[tuple[int, Any]] = deque()
        self.load_item, self.outcomes, self.stats, self.chunk = load_item, outcomes, stats, max(1, chunk)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if prefetch else None
        self.future: Future | None = None
        self.lock = threading.Lock()

    def _load(self, n: int) -> list[tuple[int, Any]]:
        # one loader at a time (take() collects a chunk in flight before it loads), so only the queue is shared
        loaded = []
        for _ in range(n):
            with self.lock:
                if not self.order:
                    break
                i = self.order.popleft()
            if (item := load_or_fail(i, self.load_item, self.outcomes, self.stats)) is not None:
                loaded.append(item)
        return loaded

    def _collect(self) -> None:
        if self.future is not None:
            waited = time.perf_counter()
            self.ready.extend(self.future.result())
            self.stats.load_wait_s += time.perf_counter() - waited
            self.future = None

    def take(self, k: int) -> list[tuple[int, Any]]:
        self._collect()
        while len(self.ready) < k and self.order:
            waited = time.perf_counter()
            self.ready.extend(self._load(k - len(self.ready)))
            self.stats.load_wait_s += time.perf_counter() - waited
        taken = [self.ready.popleft() for _ in range(min(k, len(self.ready)))]
        if self.pool is not None and self.order and self.future is None:
            self.future = self.pool.submit(self._load, self.chunk)
        return taken

    def rest(self) -> list[int]:
        """Indices never handed out (after waiting for a chunk in flight)."""
        self._collect()
        return [i for i, _ in self.ready] + list(self.order)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def run_continuous(
    order: Sequence[int],
    load_item: Callable[[int], Any],
    stream: Callable[[Fetch], Iterator[tuple[int, Any]]],
    fallback_generate: Callable[[list[Any]], list[Any]],
    plan_fallback: Callable[[list[int]], list[list[int]]],
    *,
    prefetch: bool = True,
    chunk: int = 32,
) -> tuple[list[Outcome], BatchStats]:
    """Stream items in ``order`` through ``stream(fetch)``, which yields ``(index, value)`` as rows finish (a
    value that is an ``Exception`` fails that item alone). ``latency_s`` of an outcome is the time from the
    item's admission to its result. If ``stream`` raises, the unfinished items go to ``run_batches`` with
    batches from ``plan_fallback`` and ``fallback_generate``."""
    stats = BatchStats()
    outcomes: dict[int, Outcome] = {}
    loader = _Loader(order, load_item, outcomes, stats, prefetch, chunk)
    admitted: dict[int, float] = {}

    def fetch(k: int) -> list[tuple[int, Any]]:
        taken = loader.take(k)
        now = time.perf_counter()
        admitted.update((i, now) for i, _ in taken)
        return taken

    def statically(rest: list[int]) -> None:
        fallback, more = run_batches(plan_fallback(rest), load_item, fallback_generate, prefetch=prefetch)
        outcomes.update((o.index, o) for o in fallback)
        for name in ("batches", "splits", "oom_splits", "load_failures", "load_wait_s"):
            setattr(stats, name, getattr(stats, name) + getattr(more, name))
        stats.errors.extend(more.errors)

    started = time.perf_counter()
    try:
        for i, value in stream(fetch):
            latency = time.perf_counter() - admitted.pop(i)
            if isinstance(value, BaseException):
                outcomes[i] = Outcome(index=i, error=describe_error(value), latency_s=latency)
            else:
                outcomes[i] = Outcome(index=i, value=value, latency_s=latency)
        stats.batches += 1
        rest = sorted(admitted) + loader.rest()
        if rest:  # a stream that stopped early: its items must not cost the shard's finished work
            stats.errors.append(f"the stream ended with {len(rest)} items unfinished; they ran in static batches")
            statically(rest)
    except Exception as exc:  # the stream as a whole failed: isolate the cause the static way
        oom = is_oom_error(exc)
        stats.splits += 1
        stats.oom_splits += int(oom)
        stats.errors.append(describe_error(exc))
        statically(sorted(admitted) + loader.rest())
    finally:
        loader.close()
        stats.generate_s += time.perf_counter() - started
    assert set(outcomes) == set(order), "every item must get exactly one outcome"
    return [outcomes[i] for i in sorted(outcomes)], stats
