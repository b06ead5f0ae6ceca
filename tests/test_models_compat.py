"""Each fix in models/compat.py, shown against the installed open_flamingo / transformers / peft."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from open_flamingo.src.flamingo_lm import FlamingoLMMixin

from models import compat, lora
from models.flamingo import FlamingoSpec, build_flamingo, generate
from models.tiny import make_tiny_rewriter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_rewriter(tmp_path_factory.getbasetemp() / "tiny-rewriter", seed=0)


@pytest.fixture
def built(tiny):
    model, tok, _, _ = build_flamingo(FlamingoSpec.from_file(tiny))
    return model, tok


def _unpatched(model):
    """Put open_flamingo's own mixin back, to show what breaks without ours."""
    lm = model.lang_encoder
    base = next(c for c in type(lm).__mro__ if not issubclass(c, FlamingoLMMixin) and "forward" in c.__dict__)
    lm.__class__ = type(base.__name__, (FlamingoLMMixin, base), {})
    return model


def _inputs(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return torch.randn(len(prompts), 1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), enc


def test_generate_without_attention_mask(built):
    model, tok = built
    vision_x, enc = _inputs(tok, ["<image><|endofchunk|> a plain prompt"])
    # generate omits the all-ones mask; the original forward takes it positionally
    with pytest.raises(TypeError, match="attention_mask"):
        _unpatched(build_twin(model)).generate(vision_x, enc["input_ids"], max_new_tokens=2, pad_token_id=0)
    out = generate(model, vision_x, enc["input_ids"], None, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 2


def build_twin(model):
    import copy

    return copy.deepcopy(model)


def test_position_ids_reach_the_lm_from_a_left_padding_mask(built):
    model, tok = built
    vision_x, enc = _inputs(tok, ["<image><|endofchunk|> a much longer prompt than the other", "<image> hi"])
    assert "position_ids" not in inspect.signature(FlamingoLMMixin.forward).parameters
    assert "position_ids" in inspect.signature(type(model.lang_encoder).forward).parameters
    seen = []
    hook = model.lang_encoder.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True
    )
    generate(model, vision_x, enc["input_ids"], enc["attention_mask"], max_new_tokens=2, do_sample=False)
    hook.remove()
    first = seen[0]
    n_pad = int((enc["attention_mask"][1] == 0).sum())
    assert first is not None and n_pad > 0
    assert first[1, n_pad].item() == 0  # the short prompt's first real token is position 0
    assert first[0, 0].item() == 0


def test_cache_argument_is_renamed(built):
    from transformers import LlamaForCausalLM

    model, tok = built
    assert compat.cache_argument_name(LlamaForCausalLM) == "cache"
    vision_x, enc = _inputs(tok, ["<image><|endofchunk|> one two three four"])
    ids = enc["input_ids"]
    with torch.no_grad():
        full = model(vision_x, ids).logits
        head = model(vision_x, ids[:, :-1], use_cache=True, clear_conditioned_layers=False)
        model.lang_encoder._use_cached_vision_x = True
        # Flamingo.forward passes the old name; the LM warns about it (and drops it in 5.40) unless we rename it
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            tail = model(None, ids[:, -1:], past_key_values=head.cache, use_cache=True)
        model.lang_encoder._use_cached_vision_x = False
    torch.testing.assert_close(tail.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_v1_masking_rule():
    media = torch.tensor([[False, True, False, False, True, False, False]])
    # text before image 1 -> 1, the image tokens -> themselves, between -> next image, after the last -> none
    assert compat.text_time_v1(media).tolist() == [[1, 1, 2, 2, 2, 0, 0]]


def test_v1_masking_changes_outputs_and_keeps_cache_parity(tiny):
    spec = FlamingoSpec.from_file(tiny)
    spec.v1_masking = True
    model, tok, _, _ = build_flamingo(spec)
    vision_x, enc = _inputs(tok, ["<image><|endofchunk|> describe it", "<image> hi"])
    kw = dict(max_new_tokens=8, do_sample=False)
    a = generate(model, vision_x, enc["input_ids"], enc["attention_mask"], use_cache=True, **kw)
    b = generate(model, vision_x, enc["input_ids"], enc["attention_mask"], use_cache=False, **kw)
    assert torch.equal(a, b)
    compat.set_masking(model, False)
    with torch.no_grad():
        now = model(vision_x, enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        compat.set_masking(model, True)
        v1 = model(vision_x, enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert (now - v1).abs().max() > 1e-4


def _record_cross_attention(model):
    calls = []
    layer = next(x for x in model.lang_encoder.gated_cross_attn_layers if x is not None)
    hook = layer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    return calls, hook


def test_peft_wrapper_as_lang_encoder_loses_the_image(built):
    model, tok = built
    peft_model = lora.add_lora(model, rank=4)
    assert model.lang_encoder is compat.language_model(model)
    ids = tok(["<image><|endofchunk|> look"], return_tensors="pt")["input_ids"]
    vx = torch.randn(1, 1, 1, 3, 32, 32)
    calls, hook = _record_cross_attention(model)
    generate(model, vx, ids, None, max_new_tokens=4, do_sample=False)
    hook.remove()
    # ours: every decoding step after the prompt attends to the cached image
    assert [c["use_cached_media"] for c in calls] == [False, True, True, True]
    # the bug: with the wrapper at lang_encoder, open_flamingo sets its cached-image flag on the wrapper, so each
    # decoding step re-reads media locations from one new token (no <image> in it) and attends to no image
    model.lang_encoder = peft_model
    with pytest.raises(TypeError, match="PeftModel"):
        compat.language_model(model)
    calls, hook = _record_cross_attention(model)
    model.generate(vx, ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0)
    hook.remove()
    assert [c["use_cached_media"] for c in calls] == [False, False, False, False]
    assert not any(c["media_locations"].any() for c in calls[1:])


def test_get_peft_model_freezes_cross_attention_and_unfreeze_restores(built):
    model, _ = built
    model.requires_grad_(True)
    lora.add_lora(model, rank=4)
    xattn = [p for p in model.lang_encoder.gated_cross_attn_layers.parameters()]
    assert xattn and not any(p.requires_grad for p in xattn)
    compat.unfreeze(model, ["lora", "cross_attn"])
    assert all(p.requires_grad for p in xattn)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        compat.unfreeze(model, ["everything"])


def test_activation_checkpointing_reaches_the_wrapped_decoder_layers(built):
    from models.train_data import masked_loss_sum

    model, tok = built
    lora.add_lora(model, rank=4, dropout=0.0)
    model.requires_grad_(False)
    compat.unfreeze(model, ["lora", "cross_attn"])
    model.train()
    enc = tok(["<image><|endofchunk|> a red bus on the street"], return_tensors="pt")
    vision_x = torch.randn(1, 1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    layers = [m for m in model.lang_encoder.model.layers]
    assert layers
    # each decoder layer's attention calls, the backward's recomputations included (the recomputation runs the
    # layer's forward, not its __call__, so a hook on the layer itself sees the first pass only)
    calls = []
    hooks = [layer.decoder_layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]

    def grads():
        calls.clear()
        model.zero_grad(set_to_none=True)
        loss, _ = masked_loss_sum(model(vision_x, enc["input_ids"]).logits, enc["input_ids"])
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    assert len(calls) == len(layers)  # one forward each, nothing recomputed
    compat.enable_activation_checkpointing(model)
    assert all(getattr(layer.decoder_layer, "gradient_checkpointing", False) for layer in layers)
    recomputed = grads()
    assert len(calls) == 2 * len(layers)  # the backward really ran each decoder layer again
    for hook in hooks:
        hook.remove()
    assert plain and plain.keys() == recomputed.keys()
    assert any("lora_" in name for name in plain) and any("gated_cross_attn" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], recomputed[name], rtol=1e-5, atol=1e-6)
