"""A small compatibility layer between open_flamingo 2.0.1 (written for transformers 4.x / torch 2.0) and the
versions we install (transformers 5.x, peft 0.2x).

Each fix is one named piece, tested in tests/test_models_compat.py:

* ``CompatFlamingoLMMixin.forward`` - open_flamingo's mixin takes ``attention_mask`` positionally and hides
  ``position_ids``: transformers' ``generate`` only builds position ids from a left-padding mask when the model's
  ``forward`` signature names them, and may omit an all-ones mask. Ours names every argument and passes all of them
  on by keyword.
* the cache argument - transformers 5 renamed the LM's ``past_key_values`` to ``cache`` (the old name is dropped in
  5.40); ``Flamingo.forward`` still passes the old name, so the mixin maps it to whatever the LM accepts.
* ``CompatMaskedCrossAttention`` - the cross-attention masking: the current rule (text attends to the image that
  precedes it) or the v1 rule the released OpenFlamingo-9B v1 / Polite Flamingo checkpoints were trained with
  (text attends to the *next* image; text after the last image attends to none).
* ``language_model`` / ``unfreeze`` - peft: keep ``model.lang_encoder`` pointing at the inner model (peft injects
  adapters in place), because a ``PeftModel`` wrapper there makes ``Flamingo.generate`` set its cached-image flag on
  the wrapper and cached decoding silently ignores the image; and ``get_peft_model`` freezes the gated
  cross-attention layers that live inside the LM, so training re-enables the groups it asked for.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from einops import rearrange, repeat
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.helpers import MaskedCrossAttention


def cache_argument_name(lm_class: type) -> str:
    """The name the LM's ``forward`` uses for its KV cache: ``cache`` (transformers >= 5) or ``past_key_values``."""
    params = inspect.signature(lm_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CompatFlamingoLMMixin(FlamingoLMMixin):
    """open_flamingo's LM mixin with a keyword-only, fully named ``forward`` (see the module docstring)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        if input_ids is None:
            # media locations are read from the token ids; embeddings carry no <image> marker
            raise ValueError(
                "the Flamingo language model needs input_ids (inputs_embeds alone cannot mark images)"
            )
        if inputs_embeds is not None:
            raise ValueError("pass input_ids, not inputs_embeds, to the Flamingo language model")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            kwargs[_lm_cache_name(type(self))] = cache
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if labels is not None:
            kwargs["labels"] = labels
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        return FlamingoLMMixin.forward(self, input_ids, attention_mask, **kwargs)


def _lm_cache_name(cls: type) -> str:
    base = next(c for c in cls.__mro__ if not issubclass(c, FlamingoLMMixin) and "forward" in c.__dict__)
    return cache_argument_name(base)


def make_flamingo_lm(lang_encoder: torch.nn.Module, decoder_layers_attr_name: str) -> torch.nn.Module:
    """Graft the (compatible) Flamingo mixin onto a Hugging Face causal LM instance, in place."""
    base_cls = type(lang_encoder)
    new_cls = type(base_cls.__name__, (CompatFlamingoLMMixin, base_cls), {})
    lang_encoder.__class__ = new_cls
    lang_encoder.set_decoder_layers_attr_name(decoder_layers_attr_name)
    return lang_encoder


def text_time_v1(media_locations: torch.Tensor) -> torch.Tensor:
    """v1 rule: each text token belongs to the *next* image, the image token to itself; text after the last
    image gets 0 (no image)."""
    text_time = media_locations.cumsum(dim=-1)
    text_time = torch.where(media_locations, text_time, text_time + 1)
    n_images = media_locations.sum(dim=-1, keepdim=True)
    return torch.where(text_time > n_images, torch.zeros_like(text_time), text_time)


class CompatMaskedCrossAttention(MaskedCrossAttention):
    """open_flamingo's masked cross-attention with a choice of masking rule (``v1_masking``)."""

    v1_masking: bool = False

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        if not self.v1_masking:
            return super().forward(
                x, media, media_locations=media_locations, use_cached_media=use_cached_media
            )
        t_txt = x.shape[1]
        _, t_img, n = media.shape[:3]
        x = self.norm(x)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads) * self.scale
        k, v = self.to_kv(rearrange(media, "b t n d -> b (t n) d")).chunk(2, dim=-1)
        k = rearrange(k, "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(v, "b n (h d) -> b h n d", h=self.heads)
        sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
        if use_cached_media or media_locations is None:
            # decoding past the prompt: under v1 every new token follows the last image, so it sees none
            text_time = torch.zeros(x.shape[0], t_txt, dtype=torch.long, device=x.device)
        else:
            text_time = text_time_v1(media_locations)
        media_time = torch.arange(t_img, device=x.device) + 1
        allowed = torch.eq(
            rearrange(text_time, "b i -> b 1 i 1"), repeat(media_time, "j -> 1 1 1 (j n)", n=n)
        )
        sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        attn = attn.masked_fill(rearrange(text_time == 0, "b i -> b 1 i 1"), 0.0)
        out = torch.einsum("... i j, ... j d -> ... i d", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def set_masking(model: torch.nn.Module, v1_masking: bool) -> None:
    """Use the v1 or the current cross-attention masking rule in every gated cross-attention layer."""
    for module in model.modules():
        if isinstance(module, MaskedCrossAttention):
            module.__class__ = CompatMaskedCrossAttention
            module.v1_masking = bool(v1_masking)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The inner Hugging Face LM of a Flamingo, never a peft wrapper (see the module docstring)."""
    lm = model.lang_encoder
    from peft import PeftModel

    if isinstance(lm, PeftModel):
        raise TypeError(
            "model.lang_encoder is a PeftModel wrapper: cached generation would ignore the image. "
            "Keep model.lang_encoder pointing at the inner model (peft injects adapters in place)."
        )
    return lm


def unfreeze(model: torch.nn.Module, groups: tuple[str, ...] | list[str]) -> None:
    """Re-enable gradients for named parameter groups after peft froze everything but the adapters.

    Groups: ``lora``, ``perceiver``, ``cross_attn``, ``embeddings``, ``lm`` (every LM weight but the
    cross-attention and adapters), ``vision``.
    """
    known = {"lora", "perceiver", "cross_attn", "embeddings", "lm", "vision"}
    unknown = set(groups) - known
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; choose from {sorted(known)}")
    lm = language_model(model)
    for name, param in model.named_parameters():
        if "lora" in groups and "lora_" in name:
            param.requires_grad_(True)
    if "perceiver" in groups:
        model.perceiver.requires_grad_(True)
    if "cross_attn" in groups:
        lm.gated_cross_attn_layers.requires_grad_(True)
    if "embeddings" in groups:
        lm.get_input_embeddings().requires_grad_(True)
        lm.get_output_embeddings().requires_grad_(True)
    if (
        "lm" in groups
    ):  # every LM weight (embeddings and norms included) except the cross-attention and adapters
        for name, param in lm.named_parameters():
            if "gated_cross_attn" not in name and "lora_" not in name:
                param.requires_grad_(True)
    if "vision" in groups:
        model.vision_encoder.requires_grad_(True)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant: frozen inputs need no grad).

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    goes in v6); the decoder layers sit inside open_flamingo's FlamingoLayer and are found all the same.
    """
    lm = language_model(model)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
