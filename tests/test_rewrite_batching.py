"""The batching engine (token budget, longest first, failure isolation, OOM split) and decoding settings."""

from __future__ import annotations

import pytest
import torch

from models.batching import is_oom_error, plan_batches, run_batches, stream_rows
from models.generation import fast_supported, greedy_on_device, resolve_generation
from polite.ids import settings_hash


def test_plan_batches_respects_budget_size_and_sorts_longest_first():
    lengths = [5, 40, 12, 40, 7, 30, 8, 9]
    batches = plan_batches(lengths, max_new_tokens=10, token_budget=120, max_batch_size=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every item exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * (longest + 10) <= 120
    assert batches[0] == [1, 3]  # 2 x (40 + 10) = 100 fits, a third would not
    # an item over budget on its own still runs, alone
    assert plan_batches([500, 3], max_new_tokens=10, token_budget=100, max_batch_size=8) == [[0], [1]]
    # beams multiply the cost
    assert len(plan_batches([10] * 4, 10, 80, 8, width=2)) == 2
    assert plan_batches(lengths, 10, 120, 3) == batches  # deterministic
    # the cache rounds each row up to its block: 10 + 10 tokens cost 32 slots at granularity 16
    assert [len(b) for b in plan_batches([10] * 6, 10, 100, 8, granularity=16)] == [3, 3]
    assert [len(b) for b in plan_batches([10] * 6, 10, 100, 8)] == [5, 1]
    # and a decoder that runs batches in power-of-two buckets: 9 rows would take 16 rows' memory
    assert [len(b) for b in plan_batches([5] * 10, 5, 100, 16)] == [10]
    buckets = [len(b) for b in plan_batches([5] * 10, 5, 100, 16, session_rows=lambda n: 1 << (n - 1).bit_length())]
    assert buckets == [8, 2]



def test_stream_rows_fit_the_budget_as_the_decoder_runs_them():
    pow2 = lambda n: 1 << (n - 1).bit_length()  # noqa: E731
    assert stream_rows(token_budget=1000, ring=100, max_batch_size=64, items=50) == 10
    assert stream_rows(1000, 100, 64, 50, session_rows=pow2) == 8  # 10 rows would run as 16
    assert stream_rows(1000, 100, 4, 50, session_rows=pow2) == 4
    assert stream_rows(1000, 100, 64, 3) == 3
    assert stream_rows(50, 100, 64, 50, session_rows=pow2) == 1  # one row even when it does not fit


def _oom(msg="CUDA out of memory. Tried to allocate 2.00 GiB"):
    return torch.cuda.OutOfMemoryError(msg)


def test_oom_splits_batches_down_to_what_fits():
    calls = []

    def generate(items):
        calls.append(len(items))
        if len(items) > 2:
            raise _oom()
        return [x * 10 for x in items]

    released = []
    outcomes, stats = run_batches(
        [[0, 1, 2, 3, 4]], lambda i: i, generate, prefetch=False, on_oom=lambda: released.append(1)
    )
    assert [o.value for o in outcomes] == [0, 10, 20, 30, 40]
    assert all(o.ok for o in outcomes)
    assert calls == [5, 2, 3, 1, 2]  # halves, and the half that still does not fit halves again
    assert stats.oom_splits == stats.splits == 2 and stats.batches == 3
    assert len(released) == 2  # the accelerator's cached memory is handed back before each smaller retry
    assert [o.batch_size for o in outcomes] == [2, 2, 1, 2, 2]
    assert is_oom_error(_oom()) and not is_oom_error(ValueError("bad"))


def test_one_bad_sample_fails_alone_and_the_rest_goes_on():
    def load(i):
        if i == 6:
            raise ValueError("image cannot be decoded")
        return i

    def generate(items):
        if 2 in items:  # a poisoned sample makes its whole batch raise
            raise RuntimeError("poisoned input 2")
        return [FloatingPointError("NaN in the logits") if x == 4 else f"ok {x}" for x in items]

    outcomes, stats = run_batches([[0, 1, 2, 3], [4, 5, 6, 7]], load, generate, prefetch=True)
    by = {o.index: o for o in outcomes}
    assert set(by) == set(range(8))
    assert by[2].error == "RuntimeError: poisoned input 2"
    assert by[4].error.startswith("FloatingPointError")
    assert "cannot be decoded" in by[6].error
    assert [i for i, o in by.items() if o.ok] == [0, 1, 3, 5, 7]
    assert by[0].value == "ok 0" and by[7].value == "ok 7"
    # the poisoned batch halves until 2 stands alone: [0, 1, 2, 3] -> [0, 1] + [2, 3] -> [2] + [3]
    assert stats.load_failures == 1 and stats.splits == 2 and stats.oom_splits == 0


def test_an_item_that_ooms_alone_fails_with_the_reason():
    def generate(items):
        if 1 in items:
            raise _oom()
        return list(items)

    outcomes, _ = run_batches([[0, 1]], lambda i: i, generate, prefetch=False, on_oom=lambda: None)
    assert outcomes[0].ok and outcomes[0].value == 0
    assert outcomes[1].error.startswith("out of memory even alone")


def test_generation_presets_and_hash_normalisation():
    paper = resolve_generation("paper")
    # the released decoding (METHOD.md, as models.inference.DEFAULT_DECODING), recorded in full: written out here,
    # not read back from PRESETS, so a changed preset (and with it every rewrite's settings hash) fails
    assert paper == dict(max_new_tokens=1024, num_beams=3, do_sample=True, temperature=1.0, top_k=20, top_p=0.9,
                         length_penalty=1.0, no_repeat_ngram_size=3, min_new_tokens=0, repetition_penalty=1.0,
                         seed=0)  # fmt: skip
    assert fast_supported(paper) and not greedy_on_device(paper)
    greedy = resolve_generation("greedy", {"max_new_tokens": 64})
    assert greedy_on_device(greedy) and greedy["max_new_tokens"] == 64
    # knobs that cannot change greedy output do not change the hash, so resume still finds the rewrites
    same = resolve_generation(
        "greedy", {"max_new_tokens": 64, "temperature": 0.3, "top_k": 5, "length_penalty": 2}
    )
    assert settings_hash(same) == settings_hash(greedy)
    assert settings_hash(resolve_generation("greedy", {"max_new_tokens": 65})) != settings_hash(greedy)
    assert not greedy_on_device(resolve_generation("greedy", {"no_repeat_ngram_size": 3}))
    assert not fast_supported(resolve_generation("greedy", {"repetition_penalty": 1.2}))
    with pytest.raises(ValueError, match="unknown generation preset"):
        resolve_generation("fastest")
    with pytest.raises(ValueError, match="min_new_tokens"):
        resolve_generation("greedy", {"max_new_tokens": 4, "min_new_tokens": 8})


def test_rewrite_settings_validate_before_any_work():
    from polite.config import ConfigError, parse_config

    cfg = parse_config({"rewrite": {"preset": "paper", "overrides": {"max_new_tokens": 32}}})
    assert cfg.rewrite.exclude_task_types == ["detailed_caption", "conversation"]
    for bad, where in (
        ({"preset": "nucleus"}, "rewrite.preset"),
        ({"overrides": {"beams": 3}}, "rewrite.overrides.beams"),
        ({"task_types": []}, "task_types is empty"),
        ({"token_budget": 0}, "rewrite.token_budget"),
        ({"backend": "fast", "overrides": {"repetition_penalty": 1.2}}, "no repetition penalty"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse_config({"rewrite": bad})


def _fake_stream(rows: int, fail_after: int | None = None, poison: int | None = None):
    """A stand-in for a continuous decoder: ``rows`` slots, item i takes 1 + i % 4 steps; value = i * 10."""

    def stream(fetch):
        active: dict[int, int] = {}
        finished = 0
        exhausted = False
        while True:
            if not exhausted and len(active) < rows:
                joined = fetch(rows - len(active))
                exhausted = not joined
                for i, item in joined:
                    assert item == f"item{i}"
                    active[i] = 1 + i % 4
            if not active:
                return
            for i in list(active):
                active[i] -= 1
                if active[i] == 0:
                    del active[i]
                    if fail_after is not None and finished == fail_after:
                        raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
                    finished += 1
                    yield i, (ValueError("NaN in row") if i == poison else i * 10)

    return stream


@pytest.mark.parametrize("prefetch", [False, True])
def test_continuous_runs_every_item_once_and_isolates_failures(prefetch):
    from models.continuous import run_continuous

    def load(i):
        if i == 3:
            raise OSError("image 3 unreadable")
        return f"item{i}"

    def static(batch):  # the fallback must never be needed here
        raise AssertionError("no fallback expected")

    order = list(range(20))
    outcomes, stats = run_continuous(order, load, _fake_stream(rows=4, poison=7), static, lambda idx: [idx],
                                     prefetch=prefetch, chunk=3)  # fmt: skip
    assert [o.index for o in outcomes] == order
    assert (
        outcomes[3].error == "OSError: image 3 unreadable" and outcomes[7].error == "ValueError: NaN in row"
    )
    assert all(o.value == o.index * 10 and o.latency_s > 0 for o in outcomes if o.index not in (3, 7))
    assert stats.load_failures == 1 and stats.splits == 0


def test_a_failing_stream_hands_the_unfinished_items_to_static_batches():
    from models.continuous import run_continuous

    seen: list[list[str]] = []

    def static(batch):
        seen.append(list(batch))
        return [int(item[4:]) * 10 for item in batch]

    order = list(range(12))
    outcomes, stats = run_continuous(order, lambda i: f"item{i}", _fake_stream(rows=3, fail_after=4), static,
                                     lambda idx: [idx[k : k + 5] for k in range(0, len(idx), 5)])  # fmt: skip
    assert [o.index for o in outcomes] == order and all(o.value == o.index * 10 for o in outcomes)
    redone = sorted(int(item[4:]) for batch in seen for item in batch)
    assert len(redone) == 12 - 4 and stats.oom_splits == 1  # the 4 finished items were kept, not redone
    assert "OutOfMemoryError" in stats.errors[0]


def test_a_stream_that_stops_early_leaves_no_item_without_an_outcome():
    """A stream that returns before asking for every item (or with some admitted and never finished): those
    items run in static batches; the finished ones are kept."""
    from models.continuous import run_continuous

    seen: list[str] = []

    def static(batch):
        seen.extend(batch)
        return [int(item[4:]) * 10 for item in batch]

    def short(fetch):
        yield from ((i, i * 10) for i, _ in fetch(3)[:2])  # admits 3, finishes 2, never asks again

    order = list(range(8))
    outcomes, stats = run_continuous(order, lambda i: f"item{i}", short, static, lambda idx: [idx], prefetch=False)
    assert [o.index for o in outcomes] == order and all(o.value == o.index * 10 for o in outcomes)
    assert sorted(int(item[4:]) for item in seen) == list(range(2, 8))  # the 2 finished ones were not redone
    assert "6 items unfinished" in stats.errors[0]


def test_auto_scheduling_is_continuous_where_it_pays():
    from types import SimpleNamespace

    from tasks.rewrite import choose_scheduling

    def gen(device: str | None, attention: str = "sdpa", shrink: bool = True):
        decoder = (
            None
            if device is None
            else SimpleNamespace(device=torch.device(device), attention=attention, shrink=shrink)
        )
        return SimpleNamespace(decoder=decoder, can_stream=decoder is not None)

    assert choose_scheduling("auto", gen("cpu"), 3) == "static"  # shrinking static batches measured faster
    assert choose_scheduling("auto", gen("cpu", shrink=False), 3) == "continuous"
    assert choose_scheduling("auto", gen("cpu", shrink=False), 1) == "static"  # one batch: nothing to refill
    assert choose_scheduling("auto", gen("cuda"), 3) == "static"  # sdpa would read the whole ring every step
    assert choose_scheduling("auto", gen("cuda", "flex"), 3) == "continuous"
    assert choose_scheduling("static", gen("cpu"), 3) == "static"
    assert choose_scheduling("continuous", gen("cuda"), 1) == "continuous"
    assert choose_scheduling("continuous", gen(None), 3) == "static"  # the plain path cannot stream
    # (nor beams or sampling on the fast decoder: tests/test_rewrite_search.py)
