"""LoRA through peft: merging keeps the logits, an adapter saved and loaded back gives the same model."""

from __future__ import annotations

import pytest
import torch

from models import lora
from models.flamingo import FlamingoSpec, build_flamingo
from models.loader import fingerprint
from models.tiny import make_tiny_rewriter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_rewriter(tmp_path_factory.getbasetemp() / "tiny-rewriter", seed=0)


def _randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model, tok):
    enc = tok(["<image><|endofchunk|> a red bus", "<image> hi"], return_tensors="pt", padding=True)
    vision_x = torch.randn(2, 1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(vision_x, enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def test_lora_targets_attention_and_mlp_with_rank_64_by_default(tiny):
    model, *_ = build_flamingo(FlamingoSpec.from_file(tiny))
    peft_model = lora.add_lora(model)
    cfg = peft_model.peft_config["default"]
    assert cfg.r == 64
    assert set(cfg.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(cfg.target_modules)  # the cross-attention's to_q/to_kv are left alone
    assert model.lang_encoder is peft_model.base_model.model


def test_merge_gives_the_same_logits_as_unmerged(tiny):
    model, tok, _, _ = build_flamingo(FlamingoSpec.from_file(tiny))
    base = _logits(model, tok)
    peft_model = lora.add_lora(model, rank=8, alpha=16)
    _randomise_lora(model)
    unmerged = _logits(model, tok)
    assert (unmerged - base).abs().max() > 1e-3
    lora.merge(model, peft_model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, tok), unmerged, rtol=1e-4, atol=1e-4)


def test_adapter_round_trip_and_plain_lm_key_names(tiny, tmp_path):
    model, tok, _, _ = build_flamingo(FlamingoSpec.from_file(tiny))
    peft_model = lora.add_lora(model, rank=8)
    _randomise_lora(model, seed=2)
    expected = _logits(model, tok)
    lora.save_adapter(peft_model, tmp_path / "adapter")
    spec = FlamingoSpec.from_file(tiny)
    spec.adapter = str(tmp_path / "adapter")
    merged, *_ = build_flamingo(spec)
    torch.testing.assert_close(_logits(merged, tok), expected, rtol=1e-4, atol=1e-4)
    assert fingerprint(spec) != fingerprint(FlamingoSpec.from_file(tiny))

    # an adapter trained on the plain LM (e.g. Guanaco-7B) has no ``decoder_layer.`` level in its keys
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    plain = {k.replace(".decoder_layer.", "."): v for k, v in state.items()}
    assert plain.keys() != state.keys()
    save_file(plain, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    again, *_ = build_flamingo(spec)
    torch.testing.assert_close(_logits(again, tok), expected, rtol=1e-4, atol=1e-4)


def test_released_style_checkpoint_on_top_of_a_tuning_config(tiny, tmp_path):
    """As published: a LoRA adapter folder (the seed's tuning_config) injects the adapter, then a torch
    checkpoint saved from a peft-wrapped lang_encoder (old peft key names, no adapter name) loads on top."""
    model, tok, _, _ = build_flamingo(FlamingoSpec.from_file(tiny))
    peft_model = lora.add_lora(model, rank=8)
    lora.save_adapter(peft_model, tmp_path / "tuning_config")  # B = 0: does nothing by itself
    _randomise_lora(model, seed=5)
    expected = _logits(model, tok)
    released = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace("lang_encoder.", "lang_encoder.base_model.model.", 1).replace(".default.", ".")
            released[key] = p.detach().clone()
    torch.save(released, tmp_path / "polite_flamingo.pt")
    spec = FlamingoSpec.from_file(tiny)
    spec.adapter = str(tmp_path / "tuning_config")
    spec.extra_checkpoints = [str(tmp_path / "polite_flamingo.pt")]
    loaded, _, _, reports = build_flamingo(spec)
    torch.testing.assert_close(_logits(loaded, tok), expected, rtol=1e-4, atol=1e-4)
    assert len(reports[-1].loaded) == len(released) and "lm" in reports[-1].summary()
