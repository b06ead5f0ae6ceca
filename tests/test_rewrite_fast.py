"""The fast decoder against the plain open_flamingo path (CPU, fp32, the tiny model): same greedy tokens, same
teacher-forced logits, under both cross-attention masking rules; and the generator's OOM split."""

from __future__ import annotations

import pytest
import torch
from test_rewrite_fixtures import png

from models.batching import plan_batches, run_batches
from models.generation import RewriteGenerator, resolve_generation
from models.prompts import EOS_ID

pytestmark = pytest.mark.filterwarnings("ignore")
# One intra-op thread: on a shared 2-core box OpenMP's spinning threads slow these tiny ops down 30x.
torch.set_num_threads(1)

INSTRUCTIONS = [
    ("<image>\nWhat is the dog doing?", "sleeping"),
    ("<image>Describe the picture.", "a cat on a laptop keyboard while someone tries to work at the desk"),
    ("A question without an image: what is 2 + 1?", "3"),
    ("<image> before, <image> after. What changed?", "the car moved"),
    ("<image>\nHow many people?", "two"),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from models.loader import load_rewriter
    from models.tiny import make_tiny_rewriter

    return load_rewriter(make_tiny_rewriter(tmp_path_factory.mktemp("models") / "tiny", seed=3))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]):
        path = folder / f"{k}.png"
        path.write_bytes(png(color))
        paths.append((f"i_{k}", str(path)))
    return paths


def _batch(gen: RewriteGenerator, images):
    image_rows = [[images[0]], [images[1]], [], [images[2], images[3]], [images[0]]]  # image 0 shared
    return [
        gen.prepare(gen.prompt_ids(i, r), imgs) for (i, r), imgs in zip(INSTRUCTIONS, image_rows, strict=True)
    ]


def _reference_tokens(loaded, batch, max_new_tokens, **kwargs) -> list[list[int]]:
    """Greedy tokens of the plain path: ``Flamingo.generate`` (via models.flamingo.generate) on per-row pixels."""
    from models.flamingo import generate

    width = max(len(p.input_ids) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(batch):
        ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
        mask[row, width - len(p.input_ids) :] = 1
    t_max = max(1, max(len(p.pixels) for p in batch))
    blank = torch.zeros_like(batch[0].pixels[0])
    vision_x = torch.stack(
        [torch.stack(p.pixels + [blank] * (t_max - len(p.pixels))) for p in batch]
    ).unsqueeze(2)
    out = generate(loaded.model, vision_x, ids, mask, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                   **kwargs)  # fmt: skip
    stops = {loaded.model.eoc_token_id, EOS_ID}
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append(row if cut is None else row[:cut])
    return rows


def test_fast_greedy_equals_plain_open_flamingo(loaded, images):
    settings = resolve_generation("greedy", {"max_new_tokens": 20})
    fast = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False)
    plain = RewriteGenerator(loaded, settings, backend="plain")
    assert (fast.backend, plain.backend) == ("fast", "plain")
    batch = _batch(fast, images)
    assert len({len(p.input_ids) for p in batch}) > 1  # rows really are left-padded
    reference = _reference_tokens(loaded, batch, 20)
    got_fast = [g.token_ids for g in fast.generate(batch)]
    got_plain = [g.token_ids for g in plain.generate(batch)]
    assert got_fast == reference
    assert got_plain == reference  # unique-image encoding changes nothing either
    assert any(len(set(r)) > 2 for r in reference)  # not a degenerate constant output
    # each row alone gives the same tokens as in the batch (padding does not leak)
    assert [fast.generate([p])[0].token_ids for p in batch[:2]] == reference[:2]


def test_min_new_tokens_and_image_dependence(loaded, images):
    settings = resolve_generation("greedy", {"max_new_tokens": 16, "min_new_tokens": 16})
    fast = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False)
    batch = _batch(fast, images)
    reference = _reference_tokens(loaded, batch, 16, min_new_tokens=16)
    results = fast.generate(batch)
    assert [g.token_ids for g in results] == reference
    assert all(g.output_tokens == 16 for g in results)
    swapped = fast.prepare(batch[0].input_ids, [images[2]])  # same prompt, other image
    assert fast.generate([swapped])[0].token_ids != results[0].token_ids


@pytest.mark.parametrize("v1_masking", [False, True])
def test_teacher_forced_logits_match_the_plain_forward(tmp_path, images, v1_masking, loaded):
    from models.compat import set_masking
    from models.fast_decode import FastFlamingoDecoder
    from models.flamingo import FlamingoSpec, build_flamingo
    from models.generation import encode_images, plain_logits

    # a private copy: switching the masking rule must not touch the cached model other tests use
    model, *_ = build_flamingo(FlamingoSpec.from_file(loaded.spec.root))
    set_masking(model, v1_masking)
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 8}), backend="plain")
    batch = _batch(gen, images)
    width = max(len(p.input_ids) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(batch):
        ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
        mask[row, width - len(p.input_ids) :] = 1
    blank = torch.zeros_like(batch[0].pixels[0])
    vision_x = torch.stack([torch.stack(p.pixels + [blank] * (2 - len(p.pixels))) for p in batch]).unsqueeze(
        2
    )
    continuation = torch.randint(3, 500, (len(batch), 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        media = torch.stack([encode_images(model, vision_x[b, :, 0]) for b in range(len(batch))])
    full = plain_logits(model, vision_x, torch.cat([ids, continuation], 1),
                        torch.cat([mask, torch.ones_like(continuation)], 1))  # fmt: skip
    ours = FastFlamingoDecoder(model, cuda_graphs=False).score(ids, mask, media, continuation)
    torch.testing.assert_close(ours, full[:, width - 1 :], rtol=1e-5, atol=1e-5)


def test_generator_oom_split_gives_the_same_rewrites(loaded, images):
    settings = resolve_generation("greedy", {"max_new_tokens": 10})
    gen = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False)
    batch = _batch(gen, images)
    whole = [g.token_ids for g in gen.generate(batch)]

    def flaky_device(items):
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return gen.generate(items)

    batches = plan_batches([len(p.input_ids) for p in batch], 10, token_budget=10_000, max_batch_size=8)
    assert len(batches) == 1
    outcomes, stats = run_batches(batches, lambda i: batch[i], flaky_device, prefetch=False)
    assert stats.oom_splits >= 1 and all(o.ok for o in outcomes)
    assert [o.value.token_ids for o in outcomes] == whole


def test_out_of_memory_while_a_cache_grows_splits_the_batch(loaded, images, monkeypatch):
    """A cache that cannot grow (CUDA out of memory) fails the batch inside the decoder: the decoder drops its
    caches, the batch splits, and the halves grow within what they may."""
    settings = resolve_generation("greedy", {"max_new_tokens": 30})
    batch = _batch(RewriteGenerator(loaded, settings, backend="plain"), images)
    roomy = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False, kv_block=16)
    whole = [g.token_ids for g in roomy.generate(batch)]
    gen = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False, kv_block=16, cache_new_tokens=2)
    grown_len = gen.decoder._grown_len

    def tight(sess, live, needed):
        if live > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return grown_len(sess, live, needed)

    monkeypatch.setattr(gen.decoder, "_grown_len", tight)
    outcomes, stats = run_batches([list(range(len(batch)))], lambda i: batch[i], gen.generate, prefetch=False)
    assert stats.oom_splits >= 1 and all(o.ok for o in outcomes) and gen.cache_grows >= 2
    assert [o.value.token_ids for o in outcomes] == whole


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_tokens_and_bf16_logits_agree(images, tmp_path):
    from models.fast_decode import FastFlamingoDecoder
    from models.generation import plain_logits
    from models.loader import load_rewriter
    from models.tiny import make_tiny_rewriter

    path = make_tiny_rewriter(tmp_path / "tiny", seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_rewriter(path, device="cuda", dtype=dtype)
        gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 24}), backend="fast")
        batch = _batch(gen, images)
        ids, mask, media = gen._collate(batch)
        graphs = FastFlamingoDecoder(loaded.model, cuda_graphs=True)
        eager = FastFlamingoDecoder(loaded.model, cuda_graphs=False)
        args = (ids, mask, media, 24, gen.eos_ids, 0)
        assert torch.equal(graphs.generate(*args).tokens, eager.generate(*args).tokens)
        continuation = torch.randint(3, 500, (len(batch), 8), device="cuda")
        vision_x = torch.stack([torch.stack(p.pixels + [torch.zeros_like(p.pixels[0])] * (2 - len(p.pixels)))
                                for p in batch]).unsqueeze(2).to("cuda", dtype)  # fmt: skip
        ref = plain_logits(loaded.model, vision_x, torch.cat([ids, continuation], 1),
                           torch.cat([mask, torch.ones_like(continuation)], 1))[:, ids.shape[1] - 1 :]  # fmt: skip
        ours = graphs.score(ids, mask, media, continuation)
        assert float((ours - ref).norm() / ref.norm()) < (
            1e-3 if dtype == torch.float32 else 1e-2
        )  # cuDNN may use TF32 convolutions


def test_bucketed_batches_with_dummy_rows_give_the_same_tokens(loaded, images):
    """The graph path pads a batch of 5 to a bucket of 8 with finished dummy rows; check that logic on CPU."""
    from models.fast_decode import FastFlamingoDecoder

    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 14}), backend="plain")
    ids, mask, media = gen._collate(_batch(gen, images))
    plain = FastFlamingoDecoder(loaded.model, cuda_graphs=False)
    bucketed = FastFlamingoDecoder(loaded.model, cuda_graphs=False)
    bucketed._cache.bucket_batches = True
    args = (ids, mask, media, 14, gen.eos_ids, 0)
    expected = plain.generate(*args).tokens
    assert torch.equal(bucketed.generate(*args).tokens, expected)
    assert {s.bsz for s in bucketed._cache._sessions.values()} == {8}
    assert torch.equal(bucketed.generate(*args).tokens, expected)  # a reused session starts clean


def test_fused_projections_share_the_models_weights(loaded, images):
    """q/k/v and gate/up run as one product each; the model's weights become views of those matrices (a second
    decoder reuses them), adapters or biases keep a layer unfused, and tokens do not change."""
    from models.fast_decode import FastFlamingoDecoder
    from models.fast_layers import _fuse_linears

    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 12}), backend="plain")
    ids, mask, media = gen._collate(_batch(gen, images))
    args = (ids, mask, media, 12, gen.eos_ids, 0)
    unfused = (
        FastFlamingoDecoder(loaded.model, cuda_graphs=False, fuse_projections=False).generate(*args).tokens
    )
    assert not FastFlamingoDecoder(loaded.model, cuda_graphs=False)._qkv  # not by default on CPU
    first = FastFlamingoDecoder(loaded.model, cuda_graphs=False, fuse_projections=True)
    second = FastFlamingoDecoder(loaded.model, cuda_graphs=False, fuse_projections=True)
    n_layers = len(first.layers)
    assert len(first._qkv) == len(first._gate_up) == n_layers
    attn = first.layers[0].decoder_layer.self_attn
    assert attn.q_proj.weight.data_ptr() == first._qkv[0][0].data_ptr() == second._qkv[0][0].data_ptr()
    assert torch.equal(first.generate(*args).tokens, unfused)

    a, b = torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 5, bias=False)
    before = torch.cat([a.weight.detach(), b.weight.detach()])
    fused, sizes = _fuse_linears([a, b])
    assert sizes == [3, 5] and torch.equal(fused, before) and b.weight.data_ptr() == fused[3:].data_ptr()
    assert _fuse_linears([a, torch.nn.Linear(4, 2)]) is None  # a bias
    assert _fuse_linears([a, torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))]) is None  # a wrapper


def test_each_image_is_encoded_once_per_generator(loaded, images):
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 4}), backend="fast",
                           cuda_graphs=False, latent_cache_size=3)  # fmt: skip
    batch = _batch(gen, images)  # rows' images: [0], [1], [], [2, 3], [0]
    first = [g.token_ids for g in gen.generate(batch)]
    assert gen.images_encoded == 4  # image 0 once for its two rows
    assert [g.token_ids for g in gen.generate(batch[1:2])] == first[1:2]  # image 1: cached, same tokens
    assert gen.images_encoded == 4
    assert [g.token_ids for g in gen.generate(batch[:1])] == first[:1]  # image 0 was the one evicted (3 kept)
    assert gen.images_encoded == 5


def test_compiled_layers_match_eager_with_graphs_shared_by_every_layer(loaded, images):
    """torch.compile of each layer's work around attention, in the prefill and the decode steps: the same logits
    and tokens as eager, and the graphs serve all layers (their weights are inputs) and every batch shape, so a
    32-layer model does not hit dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    from models.fast_decode import FastFlamingoDecoder

    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 10}), backend="plain")
    batch = _batch(gen, images)
    eager = FastFlamingoDecoder(loaded.model, cuda_graphs=False, fuse_projections=True)
    compiled = FastFlamingoDecoder(loaded.model, cuda_graphs=False, fuse_projections=True, compile_layers=True)
    torch._dynamo.reset()  # dynamo caches per function, across decoders: count this test's graphs only
    graphs = counters["stats"]["unique_graphs"]
    continuation = torch.randint(3, 500, (len(batch), 4), generator=torch.Generator().manual_seed(1))
    for rows in (batch, batch[:2]):  # two batch sizes and prompt widths: dynamic shapes, no recompiling
        ids, mask, media = gen._collate(rows)
        args = (ids, mask, media, 10, gen.eos_ids, 0)
        assert torch.equal(compiled.generate(*args).tokens, eager.generate(*args).tokens)
        forced = continuation[: len(rows)]
        torch.testing.assert_close(compiled.score(ids, mask, media, forced), eager.score(ids, mask, media, forced),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert compiled.compile_error is None
    # one graph per half-layer for prompts, one for single-token steps (dynamo specialises length 1): not 4 x 4
    assert len(compiled.layers) == 4 and counters["stats"]["unique_graphs"] - graphs == 4


def test_compile_layers_auto_compiles_on_cuda_only(loaded):
    from models.fast_decode import FastFlamingoDecoder
    from models.fast_layers import LAYER_PARTS
    from polite.config.rewrite import RewriteSettings
    from tasks.rewrite import compile_layers_option

    assert RewriteSettings().compile_layers == "auto"
    assert compile_layers_option("auto") is None and compile_layers_option(False) is False
    on_cpu = FastFlamingoDecoder(loaded.model, cuda_graphs=False, compile_layers=compile_layers_option("auto"))
    assert on_cpu.compile_layers is False and not on_cpu._compiled_parts  # no faster on CPU: left eager
    forced = FastFlamingoDecoder(loaded.model, cuda_graphs=False, compile_layers=compile_layers_option(True))
    assert forced.compile_layers is True and set(forced._compiled_parts) == set(LAYER_PARTS)
    # `auto` and what it means here are one decoder per process (one KV arena, one set of graphs), not two
    from models.generation import fast_decoder

    assert fast_decoder(loaded, cuda_graphs=False, compile_layers=None) is fast_decoder(
        loaded, cuda_graphs=False, compile_layers=False
    )


def test_a_failing_layer_compiler_falls_back_to_eager(loaded, images):
    from models.fast_decode import FastFlamingoDecoder

    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 8}), backend="plain")
    ids, mask, media = gen._collate(_batch(gen, images))
    args = (ids, mask, media, 8, gen.eos_ids, 0)
    expected = FastFlamingoDecoder(loaded.model, cuda_graphs=False).generate(*args).tokens
    compiling = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 8}), backend="fast",
                                 cuda_graphs=False, compile_layers=True)  # fmt: skip
    assert compiling.runtime()["compile_layers"] is True  # recorded with every rewrite
    decoder = compiling.decoder

    def broken_compiler(*_):
        raise RuntimeError("inductor: no C++ compiler found")

    decoder._compiled_parts = dict.fromkeys(decoder._compiled_parts, broken_compiler)
    with pytest.warns(UserWarning, match="compiling the decoder layers failed"):
        tokens = decoder.generate(*args).tokens
    assert torch.equal(tokens, expected)
    assert decoder.compile_error == "RuntimeError: inductor: no C++ compiler found"
    assert decoder._compiled_parts == {}  # not tried again for every layer and step
    # the record says what ran: eager layers, and why
    runtime = compiling.runtime()
    assert runtime["compile_layers"] is False and runtime["compile_error"] == decoder.compile_error
