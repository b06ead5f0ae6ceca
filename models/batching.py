"""Batching engine for generation: token-budget batches, prefetching, and failure isolation.

Independent of any model: it plans batches from prompt lengths, loads each batch's items on a CPU thread
while the previous batch generates, and calls a ``generate`` function per batch. When a batch raises (CUDA
out of memory, or anything else), it is split in half and each half retried, down to single samples, so
one bad sample fails alone and an oversized batch still finishes in smaller pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


def plan_batches(
    lengths: Sequence[int],
    max_new_tokens: int,
    token_budget: int,
    max_batch_size: int,
    width: int = 1,
    granularity: int = 1,
    session_rows: Callable[[int], int] | None = None,
) -> list[list[int]]:
    """Group item indices into batches, longest prompts first.

    A batch's cost is ``size * width * (longest prompt + max_new_tokens)``: the KV cache and activations it pads
    to, as the decoder lays them out. The length is rounded up to a multiple of ``granularity`` (the decoder's
    KV-cache block), and ``session_rows`` maps the ``size * width`` rows to the rows the decoder runs them as
    (its CUDA graph buckets: 257 rows decode as 288). Sorting by length keeps padding small; longest-first makes
    an out-of-memory surface in the first batch rather than the last. ``width`` is the number of beams. An item
    whose cost alone exceeds the budget still gets a batch of its own. Deterministic for the same lengths.
    """
    if token_budget <= 0 or max_batch_size <= 0 or granularity <= 0:
        raise ValueError("token_budget, max_batch_size and granularity must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        candidate_longest = max(longest, int(lengths[i]))
        row = -(-(candidate_longest + max_new_tokens) // granularity) * granularity
        rows = (len(current) + 1) * width
        cost = (session_rows(rows) if session_rows else rows) * row
        if current and (cost > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, candidate_longest = [], int(lengths[i])
        current.append(i)
        longest = candidate_longest
    if current:
        batches.append(current)
    return batches


def stream_rows(token_budget: int, ring: int, max_batch_size: int, items: int,
                session_rows: Callable[[int], int] | None = None, width: int = 1) -> int:  # fmt: skip
    """Samples of a continuous batch whose ring holds ``ring`` slots per row, each sample taking ``width`` rows
    (its beams): as many as a static batch of the longest prompts could have, no more than there are ``items``,
    and (``session_rows``, see ``plan_batches``) few enough that the rows the decoder runs them as fit the
    budget. At least one."""
    samples = max(1, min(max_batch_size, token_budget // (ring * width), items))
    while samples > 1 and session_rows is not None and session_rows(samples * width) * ring > token_budget:
        samples -= 1
    return samples


def is_oom_error(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "out of memory" in str(exc).lower()


def release_accelerator_memory() -> None:
    """Hand cached CUDA blocks back so a smaller retry can use them."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class Outcome:
    """What happened to one item: a value or an error, and the wall time of the call that produced it."""

    index: int
    value: Any = None
    error: str | None = None
    latency_s: float = 0.0
    batch_size: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BatchStats:
    batches: int = 0  # generate calls that returned
    splits: int = 0  # batches split after an error
    oom_splits: int = 0  # ... of which for out of memory
    load_failures: int = 0
    generate_s: float = 0.0
    load_wait_s: float = 0.0  # time the generator waited for loading (not hidden by the prefetch)
    errors: list[str] = field(default_factory=list)


def describe_error(exc: BaseException) -> str:
    """An outcome's error text: the exception type and the first line of its message, at most 500 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


def load_or_fail(i: int, load_item: Callable[[int], Any], outcomes: dict[int, Outcome], stats: BatchStats):
    """``(i, loaded item)``, or None after recording the failure as item ``i``'s outcome (it fails alone)."""
    try:
        return i, load_item(i)
    except Exception as exc:
        stats.load_failures += 1
        outcomes[i] = Outcome(index=i, error=describe_error(exc))
        return None


def run_batches(
    batches: Sequence[Sequence[int]],
    load_item: Callable[[int], Any],
    generate: Callable[[list[Any]], list[Any]],
    *,
    prefetch: bool = True,
    is_oom: Callable[[BaseException], bool] = is_oom_error,
    on_oom: Callable[[], None] = release_accelerator_memory,
) -> tuple[list[Outcome], BatchStats]:
    """Run ``generate`` over ``batches`` of item indices; every index gets exactly one ``Outcome``.

    ``load_item(i)`` prepares item ``i`` on the CPU (decode images, tokenize) and raises for a bad item,
    which then fails alone. ``generate(loaded)`` returns one value per loaded item, in order; a value that is
    an ``Exception`` fails that item alone. If ``generate`` raises, the batch is split and retried.
    """
    stats = BatchStats()
    outcomes: dict[int, Outcome] = {}

    def load_batch(indices: Sequence[int]) -> list[tuple[int, Any]]:
        return [item for i in indices if (item := load_or_fail(i, load_item, outcomes, stats)) is not None]

    def generate_split(loaded: list[tuple[int, Any]]) -> None:
        if not loaded:
            return
        started = time.perf_counter()
        try:
            values = generate([value for _, value in loaded])
            if len(values) != len(loaded):
                raise RuntimeError(f"generate returned {len(values)} results for {len(loaded)} items")
        except Exception as exc:
            oom = is_oom(exc)
            if oom:
                on_oom()
            if len(loaded) == 1:
                i = loaded[0][0]
                reason = ("out of memory even alone: " if oom else "") + describe_error(exc)
                stats.errors.append(reason)
                outcomes[i] = Outcome(index=i, error=reason, batch_size=1)
                return
            stats.splits += 1
            stats.oom_splits += int(oom)
            half = len(loaded) // 2
            generate_split(loaded[:half])
            generate_split(loaded[half:])
            return
        elapsed = time.perf_counter() - started
        stats.batches += 1
        stats.generate_s += elapsed
        for (i, _), value in zip(loaded, values, strict=True):
            if isinstance(value, BaseException):
                outcomes[i] = Outcome(
                    index=i, error=describe_error(value), latency_s=elapsed, batch_size=len(loaded)
                )
            else:
                outcomes[i] = Outcome(index=i, value=value, latency_s=elapsed, batch_size=len(loaded))

    if prefetch and len(batches) > 1:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending: Future | None = pool.submit(load_batch, batches[0])
            for n in range(len(batches)):
                waited = time.perf_counter()
                loaded = pending.result()
                stats.load_wait_s += time.perf_counter() - waited
                pending = pool.submit(load_batch, batches[n + 1]) if n + 1 < len(batches) else None
                generate_split(loaded)
    else:
        for batch in batches:
            waited = time.perf_counter()
            loaded = load_batch(batch)
            stats.load_wait_s += time.perf_counter() - waited
            generate_split(loaded)

    expected = {i for batch in batches for i in batch}
    assert set(outcomes) == expected, "every item must get exactly one outcome"
    return [outcomes[i] for i in sorted(outcomes)], stats
