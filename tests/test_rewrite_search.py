"""Beam search and sampling on the fast decoder (models/search.py driving FastFlamingoDecoder.search) against
Hugging Face ``generate`` on the plain open_flamingo path: the same tokens for every preset, in fp32 on CPU with
the tiny model, including hypotheses that end early, the length penalty and min_new_tokens."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from test_rewrite_fast import INSTRUCTIONS, images, loaded  # noqa: F401 - fixtures

from models.generation import RewriteGenerator, resolve_generation
from models.prompts import EOS_ID

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_num_threads(1)

SETTINGS = [
    ("beam", {"max_new_tokens": 24}),  # 3 beams, no-repeat 3
    (
        "paper",
        {"max_new_tokens": 24},
    ),  # the released decoding: sampled beams, top-k 20, top-p 0.9, no-repeat 3
    ("beam", {"max_new_tokens": 24, "num_beams": 4, "min_new_tokens": 5, "length_penalty": 0.5}),
    ("greedy", {"max_new_tokens": 24, "no_repeat_ngram_size": 2}),
    ("greedy", {"max_new_tokens": 24, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "seed": 3}),
]


def _shadowing(loaded, images, token: int):  # noqa: F811
    """A private copy of the tiny rewriter whose logit for ``token`` shadows its most frequent token, so the
    random model emits ``token`` now and then."""
    from models.flamingo import FlamingoSpec, build_flamingo

    model, *_ = build_flamingo(FlamingoSpec.from_file(loaded.spec.root))
    copy = dataclasses.replace(loaded, model=model)
    gen = RewriteGenerator(copy, resolve_generation("greedy", {"max_new_tokens": 24}), backend="fast",
                           cuda_graphs=False)  # fmt: skip
    frequent = collections.Counter(
        t for g in gen.generate(_batch(gen, images)) for t in g.token_ids
    ).most_common(1)[0][0]
    head = model.lang_encoder.get_output_embeddings().weight
    with torch.no_grad():
        noise = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
        head[token] = head[frequent] + 0.05 * noise
    return copy


@pytest.fixture(scope="module")
def ending(loaded, images):  # noqa: F811
    """Rows and beams end at different steps (the random model alone nearly never ends)."""
    return _shadowing(loaded, images, EOS_ID)


def _batch(gen, images):  # noqa: F811
    rows = [[images[0]], [images[1]], [], [images[2], images[3]], [images[0]]]  # image 0 shared
    return [gen.prepare(gen.prompt_ids(i, r), imgs) for (i, r), imgs in zip(INSTRUCTIONS, rows, strict=True)]


def _run(gen, batch):
    return [(g.token_ids, g.output_tokens) for g in gen.generate(batch)]


@pytest.mark.parametrize("preset,overrides", SETTINGS)
def test_fast_search_gives_generates_tokens(ending, images, preset, overrides):  # noqa: F811
    settings = resolve_generation(preset, overrides)
    fast = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False)
    plain = RewriteGenerator(ending, settings, backend="plain")
    assert fast.decoder is not None and plain.decoder is None
    batch = _batch(fast, images)
    copied, moved = fast.decoder.beam_keys_copied, fast.decoder.beam_keys_moved
    got = _run(fast, batch)
    assert got == _run(plain, batch)
    if settings["num_beams"] > 1:  # beams that continue another row copy only the keys after their histories part
        assert 0 < fast.decoder.beam_keys_moved - moved
        assert fast.decoder.beam_keys_copied - copied < (fast.decoder.beam_keys_moved - moved) / 2
    lengths = [n for _, n in got]
    assert len(set(lengths)) > 1 and min(lengths) < 24  # some rows ended early, some ran to the limit
    assert all(n >= overrides.get("min_new_tokens", 0) for n in lengths)


@pytest.mark.parametrize("preset", ["beam", "paper"])
def test_search_grows_its_cache_and_keeps_generates_tokens(ending, images, preset):  # noqa: F811
    """Beams whose cache first holds 2 new tokens move to longer caches as they outlive it (beam reordering,
    sampling and ended hypotheses across the moves): still Hugging Face's tokens."""
    settings = resolve_generation(preset, {"max_new_tokens": 24})
    fast = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=2)
    plain = RewriteGenerator(ending, settings, backend="plain")
    grows = fast.decoder.grows
    batch = _batch(fast, images)
    assert _run(fast, batch) == _run(plain, batch)
    assert fast.decoder.grows > grows


def test_each_sample_alone_gets_its_batch_beams(ending, images):  # noqa: F811
    """Samples of a batch do not interact: left padding, other samples' beams, their ends (and, unlike
    open_flamingo's generate, another row's generated ``<image>`` token) leave a sample's result alone."""
    settings = resolve_generation("beam", {"max_new_tokens": 24, "num_beams": 4})
    gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False)
    batch = _batch(gen, images)
    together = _run(gen, batch)
    assert [_run(gen, [p])[0] for p in batch] == together


def test_a_generated_image_token_changes_no_other_row(loaded, images):  # noqa: F811
    """open_flamingo's generate re-reads the image positions of the whole batch from each step's new tokens, so
    one row emitting ``<image>`` changes every row's image attention. Here every generated token attends its
    row's last prompt image: each row gets the tokens it gets alone."""
    imaging = _shadowing(loaded, images, int(loaded.model.media_token_id))
    gen = RewriteGenerator(imaging, resolve_generation("greedy", {"max_new_tokens": 24, "no_repeat_ngram_size": 3}),
                           backend="fast", cuda_graphs=False)  # fmt: skip
    batch = _batch(gen, images)
    out = gen.generate(batch)
    emitted = [imaging.model.media_token_id in g.token_ids for g in out]
    assert any(emitted) and not all(emitted)
    assert [gen.generate([p])[0].token_ids for p in batch] == [g.token_ids for g in out]


def test_flex_attention_search_matches_sdpa(ending, images):  # noqa: F811
    settings = resolve_generation("paper", {"max_new_tokens": 24})
    sdpa = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16)
    flex = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16,
                            decode_attention="flex")  # fmt: skip
    batch = _batch(sdpa, images)
    assert _run(flex, batch) == _run(sdpa, batch)


def test_sampling_follows_the_seed(ending, images):  # noqa: F811
    def tokens(seed):
        settings = resolve_generation("paper", {"max_new_tokens": 24, "seed": seed})
        gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False)
        return _run(gen, _batch(gen, images))

    first = tokens(1)
    assert first == tokens(1)  # a fresh generator with the same seed
    assert first != tokens(2)


def test_a_nan_sample_fails_alone_in_beam_search(ending, images):  # noqa: F811
    from models.search import SearchSettings, make_search

    settings = resolve_generation("beam", {"max_new_tokens": 16})
    gen = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False)
    batch = _batch(gen, images)
    clean = _run(gen, batch)
    ids, mask, media = gen._collate(batch)
    media[1] = float("nan")
    search = make_search(ids, SearchSettings.from_settings(settings), gen.eos_ids, 0)
    out = gen.decoder.search(ids, mask, media, search)
    assert out.nan.tolist() == [False, True, False, False, False]
    for row in (0, 2, 3, 4):
        assert gen._result(batch[row], out.tokens[row].tolist(), False).token_ids == clean[row][0]
    assert _run(gen, batch) == clean  # the cache was cleaned: the next batch is unaffected


def test_beams_record_the_fast_backend(ending):
    gen = RewriteGenerator(ending, resolve_generation("paper", {"max_new_tokens": 8}), cuda_graphs=False)
    assert gen.runtime()["backend"] == "fast"
    with pytest.raises(ValueError, match="repetition penalty"):
        RewriteGenerator(ending, resolve_generation("greedy", {"repetition_penalty": 1.3}), backend="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_search_gives_generates_tokens_in_fp32(images):  # noqa: F811
    from models.loader import load_rewriter
    from models.tiny import make_tiny_rewriter

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import tempfile
    from pathlib import Path

    root = make_tiny_rewriter(Path(tempfile.mkdtemp()) / "tiny", seed=3)
    gpu = load_rewriter(root, device="cuda", dtype="float32")
    for preset in ("beam", "paper"):
        settings = resolve_generation(preset, {"max_new_tokens": 24})
        fast = RewriteGenerator(gpu, settings, backend="fast", cuda_graphs=True)
        plain = RewriteGenerator(gpu, settings, backend="plain")
        batch = _batch(fast, images)
        assert _run(fast, batch) == _run(plain, batch)


def test_compiled_layers_give_the_same_beams(ending, images):  # noqa: F811
    """The paper preset's sampled beams through the compiled layer halves: the tokens of the eager decoder."""
    settings = resolve_generation("paper", {"max_new_tokens": 24})
    eager = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False)
    compiled = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, compile_layers=True)
    batch = _batch(eager, images)
    assert _run(compiled, batch) == _run(eager, batch)
    assert compiled.decoder.compile_layers and compiled.decoder.compile_error is None


def test_rows_that_outlive_the_ring_go_on_statically_with_the_same_tokens(ending, images):  # noqa: F811
    """Continuous batching whose ring holds each prompt plus 4 new tokens: rows that end within it finish in the
    stream, the rest continue in static batches (their prompts plus what they wrote, prefilled) and still get
    the tokens of a static batch with room for all 24."""
    settings = resolve_generation("greedy", {"max_new_tokens": 24})
    static = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16)
    ringed = RewriteGenerator(ending, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=4)
    batch = _batch(static, images) * 3
    expected = [(g.token_ids, g.output_tokens) for g in static.generate(batch)]
    queue = list(enumerate(batch))

    def fetch(k):
        taken, queue[:] = queue[:k], queue[k:]
        return taken

    def streamed(gen):
        queue[:] = list(enumerate(batch))
        longest = max(len(p.input_ids) for p in batch)
        got = dict(gen.stream(fetch, rows=4, longest_prompt=longest))
        return [(got[k].token_ids, got[k].output_tokens) for k in range(len(batch))]

    assert streamed(ringed) == expected
    assert 0 < ringed.rows_continued < len(batch)  # some rows ended in the ring, some went on after it

    # a row that wrote an <image> token starts again (in a prompt the token would read as an image)
    imaging = _shadowing(ending, images, int(ending.model.media_token_id))
    static = RewriteGenerator(imaging, settings, backend="fast", cuda_graphs=False, kv_block=16)
    ringed = RewriteGenerator(imaging, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=4)
    expected = [(g.token_ids, g.output_tokens) for g in static.generate(batch)]
    assert streamed(ringed) == expected
    assert 0 < ringed.rows_restarted < ringed.rows_continued
