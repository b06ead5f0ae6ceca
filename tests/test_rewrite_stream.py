"""Continuous batching (FastFlamingoDecoder.stream): rows that join a running batch through the ring cache get
exactly the tokens they get alone, with either decode attention, while the ring wraps many times."""

from __future__ import annotations

import pytest
import torch
from test_rewrite_fast import INSTRUCTIONS, images, loaded  # noqa: F401 - fixtures

from models.fast_decode import Admission, FastFlamingoDecoder
from models.generation import RewriteGenerator, resolve_generation

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_num_threads(1)


def _items(gen, images, n: int):  # noqa: F811
    """``n`` prepared samples cycling over the instructions, with per-sample forced lengths 1..17."""
    image_rows = [[images[0]], [images[1]], [], [images[2], images[3]], [images[3]]]
    items = []
    for k in range(n):
        instruction, raw = INSTRUCTIONS[k % len(INSTRUCTIONS)]
        prepared = gen.prepare(
            gen.prompt_ids(instruction, raw + " x" * (k % 3)), image_rows[k % len(image_rows)]
        )
        items.append((prepared, 1 + (7 * k) % 17))
    return items


def _alone(decoder, gen, prepared, new: int) -> list[int]:
    ids, mask, media = gen._collate([prepared])
    out = decoder.generate(ids, mask, media, new, gen.eos_ids, 0, min_new_tokens=new)
    return out.tokens[0, :new].tolist()


@pytest.fixture(scope="module")
def alone(loaded, images):  # noqa: F811
    """The reference for every test here, computed once: each of the 36 items of ``_items`` (a test's first n
    items are the same samples) decoded alone, greedily, on the eager SDPA decoder."""
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    eager = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16)
    return {k: _alone(eager, gen, p, new) for k, (p, new) in enumerate(_items(gen, images, 36))}


def _stream_all(decoder, gen, items, rows: int, poison: int | None = None):
    """Every item through ``decoder.stream`` (forced per-item lengths, max 17): tokens by item, fetch sizes, and
    the items whose logits saw NaN. Item ``poison`` gets NaN image latents."""
    longest = max(len(p.input_ids) for p, _ in items)
    queue = list(range(len(items)))
    fetched = []

    def fetch(k: int):
        take, queue[:] = queue[:k], queue[k:]
        fetched.append(len(take))
        if not take:
            return None
        ids, mask, media = gen._collate([items[i][0] for i in take])
        if poison in take:
            media[take.index(poison)] = float("nan")
        news = [items[i][1] for i in take]
        return Admission(
            keys=take, input_ids=ids, attention_mask=mask, media=media, max_new=news, min_new=news
        )

    got, nans = {}, set()
    for key, tokens, nan in decoder.stream(fetch, rows=rows, cache_len=longest + 17, max_new_tokens=17,
                                           eos_token_ids=gen.eos_ids, pad_token_id=0, check_every=3, refill_at=1):  # fmt: skip
        assert key not in got
        got[key] = tokens.tolist()
        if nan:
            nans.add(key)
    return got, fetched, nans


@pytest.mark.parametrize("attention,bucketed", [("sdpa", False), ("flex", False), ("sdpa", True)])
def test_stream_rows_get_the_tokens_they_get_alone(loaded, images, alone, attention, bucketed):  # noqa: F811
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    items = _items(gen, images, 36)
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16, attention=attention)
    expected = alone
    # this decoder alone gives the reference's tokens too (checked on a few items: flex on CPU is slow)
    assert {k: _alone(decoder, gen, p, new) for k, (p, new) in enumerate(items[:4])} == {
        k: expected[k] for k in range(4)}  # fmt: skip
    # the CUDA-graph path pads 3 rows to a bucket of 4 with an idle row; force that on CPU
    decoder._cache.bucket_batches = bucketed
    got, fetched, nans = _stream_all(decoder, gen, items, rows=3)
    assert got == expected and not nans
    assert list(got) != sorted(got)  # rows finished out of order, so rows really were refilled mid-batch
    assert max(fetched) == 3 and min(fetched[:-1]) < 3  # a full first batch, then partial refills
    sess = next(iter(decoder._cache._sessions.values()))
    assert sess.slot_host > sess.cache_len  # the ring wrapped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_cuda_graphs_give_eager_tokens_in_static_and_continuous_batches(images, tmp_path, attention):  # noqa: F811
    """On a GPU in fp32 (TF32 off): graph-replayed steps, either attention, static or continuous batches, give
    the eager SDPA path's tokens for every sample."""
    from models.loader import load_rewriter
    from models.tiny import make_tiny_rewriter

    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = load_rewriter(make_tiny_rewriter(tmp_path / "tiny", seed=3), device="cuda", dtype=torch.float32)
    gen = RewriteGenerator(on_gpu, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    items = _items(gen, images, 20)
    eager = FastFlamingoDecoder(on_gpu.model, cuda_graphs=False, kv_block=16)
    graphs = FastFlamingoDecoder(on_gpu.model, cuda_graphs=True, kv_block=16, attention=attention)
    expected = {k: _alone(eager, gen, p, new) for k, (p, new) in enumerate(items)}
    assert {k: _alone(graphs, gen, p, new) for k, (p, new) in enumerate(items)} == expected
    got, _, nans = _stream_all(graphs, gen, items, rows=5)
    assert got == expected and not nans and graphs.graph_error is None
    # a static batch of all of them whose cache starts at 2 new tokens and grows, under graphs
    ids, mask, media = gen._collate([p for p, _ in items])
    limits = [new for _, new in items]
    out = graphs.generate(ids, mask, media, limits, gen.eos_ids, 0, min_new_tokens=limits, cache_new_tokens=2)
    assert out.grows >= 1 and graphs.graph_error is None
    assert {k: out.tokens[k, :new].tolist() for k, (_, new) in enumerate(items)} == expected


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_nan_row_fails_alone_and_its_row_is_clean_for_the_next(loaded, images, alone, attention):  # noqa: F811
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    items = _items(gen, images, 10)
    assert items[0][0].image_keys  # item 0 has an image, so NaN latents reach its hidden states and cache
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16, attention=attention)
    expected = {k: alone[k] for k in range(len(items))}
    got, _, nans = _stream_all(decoder, gen, items, rows=2, poison=0)
    assert nans == {0}
    # 10 items through 2 rows: the poisoned row was refilled several times, and every later occupant is exact
    assert {k: v for k, v in got.items() if k != 0} == {k: v for k, v in expected.items() if k != 0}


def test_stream_rejects_rows_that_do_not_fit(loaded, images):  # noqa: F811
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 8}), backend="plain")
    ((prepared, _),) = _items(gen, images, 1)
    ids, mask, media = gen._collate([prepared])
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16)
    joining = Admission(keys=[0], input_ids=ids, attention_mask=mask, media=media, max_new=[8], min_new=[0])
    with pytest.raises(ValueError, match="the ring holds 16"):
        list(decoder.stream(lambda k: joining, rows=2, cache_len=16, max_new_tokens=8, eos_token_ids=gen.eos_ids,
                            pad_token_id=0))  # fmt: skip


def test_static_batches_take_per_row_limits(loaded, images, alone):  # noqa: F811
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    items = _items(gen, images, 5)
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False)
    ids, mask, media = gen._collate([p for p, _ in items])
    limits = [new for _, new in items]
    out = decoder.generate(ids, mask, media, limits, gen.eos_ids, 0, min_new_tokens=limits).tokens
    assert out.shape[1] == max(limits)
    for row, (_, new) in enumerate(items):
        assert out[row, :new].tolist() == alone[row]
        assert (out[row, new:] == 0).all()  # padded after its own limit


@pytest.mark.parametrize("attention,bucketed", [("sdpa", False), ("flex", False), ("sdpa", True)])
def test_static_batches_shrink_as_rows_finish(loaded, images, alone, attention, bucketed):  # noqa: F811
    """Once a static batch's unfinished rows fit half its session, they move to a smaller one (their keys to the
    front of the arena): every row still gets the tokens it gets alone, and a NaN row stops the shrinking."""
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    items = _items(gen, images, 24)
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16, attention=attention)
    decoder._cache.bucket_batches = bucketed  # the CUDA-graph path's session sizes, forced on CPU
    ids, mask, media = gen._collate([p for p, _ in items])
    limits = [new for _, new in items]
    out = decoder.generate(ids, mask, media, limits, gen.eos_ids, 0, min_new_tokens=limits)
    assert decoder.shrinks >= 2 and not out.nan.any()
    for row, (_, new) in enumerate(items):
        assert out.tokens[row, :new].tolist() == alone[row]

    shrinks = decoder.shrinks
    media[5] = float("nan")
    poisoned = decoder.generate(ids, mask, media, limits, gen.eos_ids, 0, min_new_tokens=limits)
    assert poisoned.nan.nonzero().flatten().tolist() == [5] and decoder.shrinks == shrinks
    keep = [r for r in range(len(items)) if r != 5]
    assert torch.equal(poisoned.tokens[keep], out.tokens[keep])


def test_compiled_layers_stream_the_eager_tokens(loaded, images, alone):  # noqa: F811
    """Rows joining a running batch (a prefill of one or a few rows into the ring) through the compiled layer
    halves get the tokens an eager decoder gives each alone."""
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 17}), backend="plain")
    items = _items(gen, images, 12)
    expected = {k: alone[k] for k in range(len(items))}  # eager, each alone
    compiled = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16, compile_layers=True)
    got, fetched, nans = _stream_all(compiled, gen, items, rows=3)
    assert got == expected and not nans and compiled.compile_error is None
    assert min(fetched[:-1]) < 3  # partial refills: prefills of fewer rows than the batch


def _grow_case(loaded, images):  # noqa: F811
    """The batch of the cache-growing tests: 24 samples, the generator, and its per-row limits (varied, full)."""
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 40}), backend="plain")
    items = _items(gen, images, 24)
    varied = [2 * new + 5 for _, new in items]  # 7..37 new tokens
    return gen, items, {"varied": varied, "full": [37] * len(items)}


@pytest.fixture(scope="module")
def roomy(loaded, images):  # noqa: F811
    """The reference for the cache-growing tests, computed once: the eager SDPA decoder's tokens for each set of
    limits with room for every row's tokens from the start (the same for either attention: see above)."""
    gen, items, limits = _grow_case(loaded, images)
    ids, mask, media = gen._collate([p for p, _ in items])
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16)
    return {name: decoder.generate(ids, mask, media, lim, gen.eos_ids, 0, min_new_tokens=lim).tokens
            for name, lim in limits.items()}  # fmt: skip


@pytest.mark.parametrize("attention,bucketed", [("sdpa", False), ("flex", False), ("sdpa", True)])
def test_static_batches_grow_their_cache_when_rows_outlive_it(loaded, images, roomy, attention, bucketed):  # noqa: F811
    """A batch whose cache first holds 4 new tokens per row grows it when rows outlive it: into the arena's room
    left by finished rows (lengths vary), or by a larger arena (every row runs to the end). Every row gets the
    tokens it gets with room for all its tokens from the start, and a NaN row still fails alone."""
    gen, items, limits = _grow_case(loaded, images)
    ids, mask, media = gen._collate([p for p, _ in items])

    def decode(limits, cache_new, media=media):
        decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16, attention=attention)
        decoder._cache.bucket_batches = bucketed  # the CUDA-graph path's session sizes, forced on CPU
        out = decoder.generate(ids, mask, media, limits, gen.eos_ids, 0, min_new_tokens=limits,
                               cache_new_tokens=cache_new)  # fmt: skip
        return decoder, out

    for name in ("varied", "full"):
        grown, out = decode(limits[name], 4)
        assert grown.grows >= 1 and torch.equal(out.tokens, roomy[name]) and not out.nan.any()
    # every row was live when the cache filled: the arena grew to the full prompt + 37 for all of them
    assert grown._cache.slots_per_row(len(items)) >= ids.shape[1] + 37

    poisoned = media.clone()
    poisoned[5] = float("nan")
    grown, out = decode(limits["varied"], 4, poisoned)
    assert grown.grows >= 1 and out.nan.nonzero().flatten().tolist() == [5]
    keep = [r for r in range(len(items)) if r != 5]
    assert torch.equal(out.tokens[keep], roomy["varied"][keep])


def test_batches_are_planned_for_the_first_cache(loaded):  # noqa: F811
    settings = resolve_generation("greedy", {"max_new_tokens": 40})
    assert RewriteGenerator(loaded, settings, backend="fast", cache_new_tokens=16).planned_new_tokens == 16
    assert RewriteGenerator(loaded, settings, backend="fast", cache_new_tokens=64).planned_new_tokens == 40
    assert RewriteGenerator(loaded, settings, backend="fast").planned_new_tokens == 40
    # plain generate keeps every row's cache until the batch's longest row ends: it plans for max_new_tokens
    assert RewriteGenerator(loaded, settings, backend="plain", cache_new_tokens=16).planned_new_tokens == 40
