"""A LLaMA decoder layer's work around its attention, as pure functions of their arguments, for the fast decoder
(models/fast_decode.py): the rotated queries, keys and values before it, the output projection, MLP and residuals
after it. The decoder runs them eagerly or through ``torch.compile`` (``LAYER_PARTS``), and fuses projections
that share an input into one matrix product (``_fuse_linears``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Fused = tuple[torch.Tensor, list[int]]  # one weight for several projections, and each one's rows


def _fuse_linears(linears: list[torch.nn.Module]) -> tuple[torch.Tensor, list[int]] | None:
    """One weight for several bias-free ``nn.Linear`` layers on the same input, with their weights re-pointed
    at its rows (same values, same memory); None when any of them is something else (e.g. a LoRA wrapper)."""
    if any(type(m) is not torch.nn.Linear or m.bias is not None for m in linears):
        return None
    weights = [m.weight.data for m in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    sizes = [w.shape[0] for w in weights]
    first, cols = weights[0], weights[0].shape[1]
    starts = [sum(sizes[:j]) * cols * first.element_size() for j in range(len(sizes))]
    storage = first.untyped_storage()
    end = first.storage_offset() * first.element_size() + sum(sizes) * cols * first.element_size()
    adjacent = all(
        w.is_contiguous()
        and w.untyped_storage().data_ptr() == storage.data_ptr()
        and w.data_ptr() == first.data_ptr() + at
        for w, at in zip(weights, starts, strict=True)
    )
    if adjacent and end <= storage.nbytes():
        # already rows of one matrix (an earlier decoder fused them, or they loaded so): view, do not copy
        whole = torch.empty(0, dtype=first.dtype, device=first.device)
        return whole.set_(storage, first.storage_offset(), (sum(sizes), cols), (cols, 1)), sizes
    fused = torch.cat(weights)
    start = 0
    for m, rows in zip(linears, sizes, strict=True):
        m.weight.data = fused[start : start + rows]
        start += rows
    return fused, sizes


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (_rotate_half(x) * sin)


def _qkv_heads(attn, x: torch.Tensor, qkv: Fused | None, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values of ``x`` (b, n, dim), each (b, heads, n, head_dim), before rotation."""
    b, n, _ = x.shape
    if qkv is not None:
        q, k, v = F.linear(x, qkv[0]).split(qkv[1], dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    return tuple(t.reshape(b, n, -1, head_dim).transpose(1, 2) for t in (q, k, v))


def _mlp(dl, x: torch.Tensor, gate_up: Fused | None) -> torch.Tensor:
    if gate_up is None:
        return dl.mlp(x)
    gate, up = F.linear(x, gate_up[0]).split(gate_up[1], dim=-1)
    return dl.mlp.down_proj(dl.mlp.act_fn(gate) * up)


def attention_inputs(dl, x: torch.Tensor, cos, sin, qkv: Fused | None, head_dim: int) -> tuple[torch.Tensor, ...]:
    """A decoder layer up to its attention: the rotated queries and keys, and the values, of the normed ``x``
    (b, n, dim), each (b, heads, n, head_dim)."""
    q, k, v = _qkv_heads(dl.self_attn, dl.input_layernorm(x), qkv, head_dim)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def layer_output(dl, x: torch.Tensor, attended: torch.Tensor, gate_up: Fused | None) -> torch.Tensor:
    """A decoder layer after its attention: the output projection of ``attended`` (b, heads, n, head_dim) and
    the residual, then the MLP and its residual."""
    b, n, _ = x.shape
    x = x + dl.self_attn.o_proj(attended.transpose(1, 2).reshape(b, n, -1))
    return x + _mlp(dl, dl.post_attention_layernorm(x), gate_up)


# The two halves of a layer around its attention, by name. Each is a function of its arguments only (no decoder
# state, no layer index), so torch.compile makes one graph per half that every layer shares: the layers differ
# only in their weights, which the graph takes as inputs. The attention itself, and the cache writes, stay out.
LAYER_PARTS: dict[str, Callable] = {"attention_inputs": attention_inputs, "layer_output": layer_output}
