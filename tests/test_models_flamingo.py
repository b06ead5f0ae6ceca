"""Building, saving and loading the rewriter; generation behaviour of the tiny model through the real code path."""

from __future__ import annotations

import json

import pytest
import torch

from models.flamingo import FlamingoSpec, build_flamingo, generate
from models.loader import fingerprint, load_rewriter
from models.prompts import ADDED_TOKENS, rewrite_prompt
from models.tiny import make_tiny_rewriter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # one tiny model per test session (make_tiny_rewriter returns an existing folder as is)
    return make_tiny_rewriter(tmp_path_factory.getbasetemp() / "tiny-rewriter", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_rewriter(tiny, device="cpu", dtype=torch.float32)


def _batch(loaded, prompts, n_images=1, seed=0):
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(len(prompts), n_images, 1, 3, 32, 32, generator=g)
    return vision_x, enc["input_ids"], enc["attention_mask"]


PROMPTS = [
    rewrite_prompt("<image> Describe the picture in detail.", "dog couch red"),
    rewrite_prompt("<image> How many?", "3"),
]


def test_tokenizer_has_flamingo_tokens_and_llama_ids(loaded):
    tok = loaded.tokenizer
    added = set(tok.get_added_vocab())
    assert set(ADDED_TOKENS) <= added
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("<image><|endofchunk|> hi")["input_ids"]
    assert ids[0] == 1
    assert ids[1:3] == tok.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    assert tok.padding_side == "left"


def test_layout_on_disk_is_a_checkpoint_layout(tiny):
    spec = json.loads((tiny / "flamingo.json").read_text())
    assert spec["lm"] == "lm" and spec["vision"] == "local-dir:vision"
    for f in ("lm/config.json", "lm/model.safetensors", "lm/tokenizer.json", "vision/open_clip_config.json",
              "vision/open_clip_model.safetensors", "checkpoint.safetensors"):  # fmt: skip
        assert (tiny / f).is_file(), f


def test_loader_caches_by_fingerprint(tiny, loaded):
    again = load_rewriter(str(tiny / "flamingo.json"), device="cpu", dtype=torch.float32)
    assert again is loaded
    assert loaded.fingerprint.startswith("m_") and loaded.fingerprint == fingerprint(
        FlamingoSpec.from_file(tiny)
    )


def test_fingerprint_follows_weight_content(tiny, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert fingerprint(FlamingoSpec.from_file(copy)) == fingerprint(FlamingoSpec.from_file(tiny))
    with open(copy / "checkpoint.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    assert fingerprint(FlamingoSpec.from_file(copy)) != fingerprint(FlamingoSpec.from_file(tiny))


def test_save_load_round_trip_gives_identical_logits(tiny, loaded):
    vision_x, ids, mask = _batch(loaded, PROMPTS)
    with torch.no_grad():
        first = loaded.model(vision_x, ids, attention_mask=mask).logits
    torch.manual_seed(1234)  # a different random init: everything must come from the files
    model, *_ = build_flamingo(FlamingoSpec.from_file(tiny))
    with torch.no_grad():
        second = model(vision_x, ids, attention_mask=mask).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_checkpoint_with_foreign_keys_fails_naming_them(tiny, tmp_path):
    from safetensors.torch import save_file

    from models.checkpoints import CheckpointMismatch

    bad = tmp_path / "bad.safetensors"
    save_file(
        {"perceiver.not_a_layer.weight": torch.zeros(2), "lang_encoder.lm_head.weight": torch.zeros(3, 3)},
        str(bad),
    )
    spec = FlamingoSpec.from_file(tiny)
    spec.extra_checkpoints = [str(bad)]
    with pytest.raises(CheckpointMismatch) as err:
        build_flamingo(spec)
    assert "perceiver.not_a_layer.weight" in str(err.value)
    assert "lang_encoder.lm_head.weight" in str(err.value) and "wrong shape" in str(err.value)


def test_pickled_checkpoints_are_refused(tmp_path):
    from models.checkpoints import read_state_dict

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": object.__new__(FlamingoSpec)}, path)
    with pytest.raises(ValueError, match="never unpickle"):
        read_state_dict(path)


def test_hub_references_need_allow_download(tiny):
    spec = FlamingoSpec.from_file(tiny)
    spec.vision, spec.vision_pretrained = "ViT-L-14-336", "openai"
    with pytest.raises(FileNotFoundError, match="allow_download"):
        build_flamingo(spec)


def test_cached_and_uncached_generation_agree(loaded):
    vision_x, ids, mask = _batch(loaded, PROMPTS)
    kw = dict(max_new_tokens=12, do_sample=False, num_beams=1)
    cached = generate(loaded.model, vision_x, ids, mask, use_cache=True, **kw)
    uncached = generate(loaded.model, vision_x, ids, mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_matches_each_prompt_alone(loaded):
    vision_x, ids, mask = _batch(loaded, PROMPTS)
    assert mask[1].min() == 0  # the second prompt is shorter: it really is padded
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=1)
    together = generate(loaded.model, vision_x, ids, mask, **kw)[:, ids.shape[1] :]
    for i, prompt in enumerate(PROMPTS):
        one = loaded.tokenizer([prompt], return_tensors="pt")
        alone = generate(loaded.model, vision_x[i : i + 1], one["input_ids"], one["attention_mask"], **kw)
        assert together[i].tolist() == alone[0, one["input_ids"].shape[1] :].tolist()


def test_output_depends_on_the_image(loaded):
    _, ids, mask = _batch(loaded, PROMPTS[:1])
    with torch.no_grad():
        a = loaded.model(torch.zeros(1, 1, 1, 3, 32, 32), ids, attention_mask=mask).logits
        b = loaded.model(torch.ones(1, 1, 1, 3, 32, 32), ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-3
    # and generation sees the image in every cached decoding step, not only in the prompt pass
    vx = torch.stack([torch.zeros(1, 1, 3, 32, 32), torch.ones(1, 1, 3, 32, 32) * 3])
    ids2, mask2 = ids.repeat(2, 1), mask.repeat(2, 1)
    out = generate(loaded.model, vx, ids2, mask2, max_new_tokens=12, do_sample=False)
    assert out[0].tolist() != out[1].tolist()


def test_beam_search_keeps_each_rows_image(loaded):
    vision_x, ids, mask = _batch(loaded, PROMPTS, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=3)
    together = generate(loaded.model, vision_x, ids, mask, **kw)[:, ids.shape[1] :]
    for row, prompt in enumerate(PROMPTS):  # each row, the unpadded one and the left-padded one
        one = loaded.tokenizer([prompt], return_tensors="pt")
        alone = generate(loaded.model, vision_x[row : row + 1], one["input_ids"], one["attention_mask"], **kw)
        alone = alone[0, one["input_ids"].shape[1] :].tolist()
        assert alone and together[row].tolist()[: len(alone)] == alone, row


def test_sampling_settings_are_honoured(loaded):
    vision_x, ids, mask = _batch(loaded, PROMPTS[:1])
    greedy = generate(loaded.model, vision_x, ids, mask, max_new_tokens=10, do_sample=False)
    torch.manual_seed(0)
    top1 = generate(loaded.model, vision_x, ids, mask, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)  # top_k=1 sampling is greedy
    samples = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = generate(
            loaded.model, vision_x, ids, mask, max_new_tokens=10, do_sample=True, temperature=5.0, top_k=0
        )
        samples.add(tuple(out[0].tolist()))
    assert len(samples) > 1  # a hot temperature really samples
    short = generate(loaded.model, vision_x, ids, mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert short.shape[1] == ids.shape[1] + 3


def test_threads_sharing_one_cached_model_get_their_own_images(loaded):
    from concurrent.futures import ThreadPoolExecutor

    _, ids, mask = _batch(loaded, PROMPTS[:1])
    images = [torch.full((1, 1, 1, 3, 32, 32), float(v)) for v in (-2.0, 0.0, 2.0, 4.0)]
    kw = dict(max_new_tokens=10, do_sample=False)
    alone = [generate(loaded.model, vx, ids, mask, **kw).tolist() for vx in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda vx: generate(loaded.model, vx, ids, mask, **kw).tolist(), images * 2))
    assert together == alone * 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("v1_masking", "false", "v1_masking must be true or false"),
        ("merge_lora", 1, "merge_lora must be true or false"),
        ("extra_checkpoints", "polite_flamingo.pt", "extra_checkpoints must be a list of paths"),
        ("extra_checkpoints", [3], "extra_checkpoints must be a list of paths"),
        ("cross_attn_every_n_layers", 0, "cross_attn_every_n_layers must be a whole number of at least 1"),
        ("perceiver_depth", "6", "perceiver_depth must be a whole number of at least 1"),
        ("perceiver_latents", True, "perceiver_latents must be a whole number of at least 1"),
        ("lm", 7, "lm must be a path or name"),
        ("vision", None, "vision must be a path or name"),
        ("lm_config", ["llama"], "lm_config must be a mapping"),
    ],
)
def test_spec_file_with_a_bad_value_is_rejected_naming_it(tmp_path, field, value, message):
    """A hand-edited flamingo.json fails on load with the field named, not later (or never: "false" is truthy,
    a string of extra checkpoints would be read as one path per character)."""
    (tmp_path / "flamingo.json").write_text(json.dumps({"lm": "lm", field: value}))
    with pytest.raises(ValueError, match=message):
        FlamingoSpec.from_file(tmp_path)


def test_spec_file_with_good_values_loads(tiny, tmp_path):
    spec = FlamingoSpec.from_file(tiny)
    assert FlamingoSpec.from_dict(spec.to_dict()) == spec
    # every checked field with a good value other than the tiny model's (and its default): loaded as written
    good = dict(lm="some/lm", v1_masking=True, merge_lora=False, allow_download=True, extra_checkpoints=["a.pt", "b.pt"],
                cross_attn_every_n_layers=3, perceiver_depth=2, perceiver_latents=5, lm_config={"model_type": "llama"},
                vision="ViT-B-32", decoder_layers_attr_name="model.layers")  # fmt: skip
    (tmp_path / "flamingo.json").write_text(json.dumps(good))
    loaded = FlamingoSpec.from_file(tmp_path)
    assert {k: getattr(loaded, k) for k in good} == good
    assert loaded.root == str(tmp_path.resolve())
