"""Continuous batching for beam search and single-row searches (sampling, no-repeat n-grams;
FastFlamingoDecoder.stream_search through RewriteGenerator.stream): samples that join a running batch through the
ring get the tokens of a static batch (which are generate's), with either decode attention; samples that outlive
the ring go on statically from their search's state; a NaN sample fails alone."""

from __future__ import annotations

import pytest
import torch
from test_rewrite_fast import images, loaded  # noqa: F401 - fixtures
from test_rewrite_search import _batch, _run, _shadowing, ending  # noqa: F401 - fixtures

from models.generation import Prepared, RewriteGenerator, resolve_generation

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_num_threads(1)


def _streamed(gen, batch, samples: int):
    """Every prepared sample through ``gen.stream`` with ``samples`` decoding at once: per sample, (token ids,
    output tokens), or the exception it failed with."""
    queue = list(enumerate(batch))
    fetched = []

    def fetch(k):
        taken, queue[:] = queue[:k], queue[k:]
        fetched.append(len(taken))
        return taken

    longest = max(len(p.input_ids) for p in batch)
    got = dict(gen.stream(fetch, rows=samples, longest_prompt=longest))
    assert sorted(got) == list(range(len(batch)))  # every sample exactly once
    assert len(fetched) > 2  # samples joined as others finished, not in one go
    return [got[i] if isinstance(got[i], Exception) else (got[i].token_ids, got[i].output_tokens)
            for i in range(len(batch))]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,attention",
    [
        ({"max_new_tokens": 24}, "sdpa"),
        ({"max_new_tokens": 24, "num_beams": 4, "min_new_tokens": 5, "length_penalty": 0.5}, "sdpa"),
        ({"max_new_tokens": 24}, "flex"),
    ],
)
def test_streamed_beams_get_the_beams_of_a_static_batch(ending, images, overrides, attention):  # noqa: F811
    settings = resolve_generation("beam", overrides)
    gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16,
                           decode_attention=attention)  # fmt: skip
    assert gen.can_stream
    batch = _batch(gen, images) * 3
    expected = _run(gen, batch)
    copied = gen.decoder.beam_keys_copied
    assert _streamed(gen, batch, samples=4) == expected
    assert gen.rows_continued == 0  # the ring had room for max_new_tokens
    assert gen.decoder.beam_keys_copied > copied  # beams continued each other inside the ring
    lengths = [n for _, n in expected]
    assert len(set(lengths)) > 1 and min(lengths) < 24  # samples finished at different steps


def test_beams_that_outlive_the_ring_go_on_statically_from_their_state(ending, loaded, images):  # noqa: F811
    """A ring with room for each prompt plus 4 new tokens (rounded to 16 slots): the samples that end within it
    finish in the stream; the others leave it with their search's state and go on in a static batch, each beam's
    prompt plus its tokens prefilled; all get the beams of a static batch with room for all 24."""
    settings = resolve_generation("beam", {"max_new_tokens": 24})
    static = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16)
    ringed = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=4)
    batch = _batch(static, images) * 3
    assert _streamed(ringed, batch, samples=4) == _run(static, batch)
    assert 0 < ringed.rows_continued < len(batch) and ringed.rows_restarted == 0
    # the random model rarely ends, so every sample leaves the ring and its beams reorder over the tokens they
    # wrote in it (this fails if those tokens' keys are not taken along)
    settings = resolve_generation("beam", {"max_new_tokens": 40})
    static = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False, kv_block=16)
    ringed = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=4)
    assert _streamed(ringed, batch, samples=4) == _run(static, batch)
    assert ringed.rows_continued == len(batch) and ringed.rows_restarted == 0

    # a sample one of whose beams wrote an <image> token starts again (in a prompt it would read as an image)
    imaging = _shadowing(ending, images, int(ending.model.media_token_id))
    static = RewriteGenerator(imaging, settings, backend="fast", cuda_graphs=False, kv_block=16)
    ringed = RewriteGenerator(imaging, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=4)
    assert _streamed(ringed, batch, samples=4) == _run(static, batch)
    assert 0 < ringed.rows_restarted < ringed.rows_continued


@pytest.mark.parametrize("preset,overrides", [("beam", {}), ("greedy", {"no_repeat_ngram_size": 2})])
def test_a_nan_sample_fails_alone_in_streamed_searches(ending, images, preset, overrides):  # noqa: F811
    """NaN image latents poison one sample's logits: it fails, its rows are cleaned before the next sample takes
    them, and every other sample gets its static tokens."""
    settings = resolve_generation(preset, {**overrides, "max_new_tokens": 16})
    gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16)
    batch = _batch(gen, images) * 2
    expected = _run(gen, batch)
    # sample 0's prompt (one image marker) with an image of NaN pixels
    batch[2] = Prepared(batch[0].input_ids, ["nan"], [torch.full_like(batch[0].pixels[0], float("nan"))])
    got = _streamed(gen, batch, samples=2)
    assert isinstance(got[2], FloatingPointError)
    assert [g for i, g in enumerate(got) if i != 2] == [e for i, e in enumerate(expected) if i != 2]


@pytest.mark.parametrize("preset,overrides", [("paper", {}), ("greedy", {"do_sample": True, "top_p": 0.9})])
def test_streamed_sampling_follows_the_seed(ending, images, preset, overrides):  # noqa: F811
    """Sampled beams (the paper preset) and single sampled rows stream too: one random stream for the run, so the
    same seed and schedule give the same rewrites, another seed others; every rewrite is a whole one."""

    def streamed(seed):
        settings = resolve_generation(preset, {**overrides, "max_new_tokens": 24, "seed": seed})
        gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16)
        return _streamed(gen, _batch(gen, images) * 2, samples=3)

    first = streamed(1)
    assert first == streamed(1)
    assert first != streamed(2)
    assert all(0 < n <= 24 and len(ids) <= n for ids, n in first)


NO_REPEAT = {"max_new_tokens": 24, "no_repeat_ngram_size": 2}
# sampling from the top token alone draws what greedy picks: sampled rows with a result to compare
TOP_ONE = {"max_new_tokens": 24, "do_sample": True, "top_k": 1, "temperature": 0.7, "seed": 5}


@pytest.mark.parametrize(
    "overrides,attention",
    [
        (NO_REPEAT, "sdpa"),
        ({**NO_REPEAT, "min_new_tokens": 6}, "sdpa"),
        (TOP_ONE, "sdpa"),
        (NO_REPEAT, "flex"),
    ],
)
def test_streamed_single_rows_get_the_tokens_of_a_static_batch(ending, images, overrides, attention):  # noqa: F811
    """Single-row searches (n-gram constraints, sampling) stream too: samples joining a running batch get the
    tokens of a static batch, which are generate's (tests/test_rewrite_search.py)."""
    settings = resolve_generation("greedy", overrides)
    gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16,
                           decode_attention=attention)  # fmt: skip
    assert gen.can_stream
    batch = _batch(gen, images) * 3
    expected = _run(gen, batch)
    assert _streamed(gen, batch, samples=3) == expected
    assert gen.rows_continued == 0
    lengths = [n for _, n in expected]
    assert len(set(lengths)) > 1 and min(lengths) < 24  # samples finished at different steps
    assert min(lengths) >= overrides.get("min_new_tokens", 0)


@pytest.mark.parametrize("overrides", [NO_REPEAT, TOP_ONE])
def test_single_rows_that_outlive_the_ring_go_on_statically_from_their_state(ending, loaded, images, overrides):  # noqa: F811
    """A ring with room for each prompt plus 4 new tokens: single rows that outlive it leave with their tokens
    and go on in a static batch (prompt plus tokens prefilled), with the tokens of a static batch with room for
    all of them; the no-repeat rule still sees the tokens written before the move."""
    for model, new in ((ending, 24), (loaded, 40)):
        settings = resolve_generation("greedy", {**overrides, "max_new_tokens": new})
        static = RewriteGenerator(model, settings, backend="fast", cuda_graphs=False, kv_block=16)
        ringed = RewriteGenerator(model, settings, backend="fast", cuda_graphs=False, kv_block=16,
                                  cache_new_tokens=4)  # fmt: skip
        batch = _batch(static, images) * 3
        assert _streamed(ringed, batch, samples=4) == _run(static, batch)
        assert 0 < ringed.rows_continued <= len(batch) and ringed.rows_restarted == 0
    assert ringed.rows_continued == len(batch)  # the random model rarely ends: every sample left the ring


def test_every_fast_setting_streams_and_the_plain_path_does_not(ending):  # noqa: F811
    from tasks.rewrite import choose_scheduling

    for preset, overrides in (("paper", {}), ("greedy", {"do_sample": True}), ("greedy", {"no_repeat_ngram_size": 3})):
        gen = RewriteGenerator(ending, resolve_generation(preset, {**overrides, "max_new_tokens": 8}),
                               cuda_graphs=False)  # fmt: skip
        assert gen.can_stream and choose_scheduling("continuous", gen, static_batches=5) == "continuous"
        assert choose_scheduling("auto", gen, static_batches=5) == "static"  # CPU, shrinking static batches
    # a repetition penalty takes Hugging Face generate (the plain path), which batches statically
    plain = RewriteGenerator(ending, resolve_generation("greedy", {"repetition_penalty": 1.2, "max_new_tokens": 8}),
                             cuda_graphs=False)  # fmt: skip
    assert not plain.can_stream and choose_scheduling("continuous", plain, static_batches=5) == "static"
    with pytest.raises(ValueError, match="needs the fast decoder"):
        next(plain.stream(lambda k: [], rows=2, longest_prompt=8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("preset,overrides", [("beam", {}), ("greedy", {"no_repeat_ngram_size": 2})])
def test_cuda_graphs_stream_the_eager_searches(images, tmp_path, attention, preset, overrides):  # noqa: F811
    """On a GPU in fp32 (TF32 off): continuous beam search (or a single-row search) with graph-replayed steps,
    samples leaving a short ring and going on statically, gives the tokens of an eager static batch."""
    from models.loader import load_rewriter
    from models.tiny import make_tiny_rewriter

    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = load_rewriter(make_tiny_rewriter(tmp_path / "tiny", seed=3), device="cuda", dtype=torch.float32)
    settings = resolve_generation(preset, {**overrides, "max_new_tokens": 40})
    eager = RewriteGenerator(on_gpu, settings, backend="fast", cuda_graphs=False, kv_block=16)
    graphs = RewriteGenerator(on_gpu, settings, backend="fast", cuda_graphs=True, kv_block=16,
                              decode_attention=attention, cache_new_tokens=4)  # fmt: skip
    batch = _batch(eager, images) * 3
    assert _streamed(graphs, batch, samples=4) == _run(eager, batch)
    assert graphs.rows_continued > 0 and graphs.decoder.graph_error is None
