"""How many KV-cache slots a rewrite batch may plan for on this device: ``rewrite.token_budget: auto``.

A batch's memory is its KV cache (slots x bytes per slot, ``models/batching.plan_batches`` counts the slots) plus
the prefill's activations, which grow with the prompt tokens. On an H200, the 9B shape at batch 512 x (128 + 128)
peaked at 93.7 GB: 16.5 GB of weights, 64.4 GB of KV cache (131,072 slots of 512 KB) and 12.8 GB besides, for
65,536 prompt tokens, so about 0.4 slot's worth per prompt token (BENCHMARKS.md, session 1). The budget charges
every slot that much extra (a prompt token has a slot) and leaves a tenth of the memory free for fragmentation
and the CUDA graphs' pools. (The plans count the graphs' batch buckets themselves: 257 rows decode as 288.)
"""

from __future__ import annotations

import sys
from typing import Any

CPU_TOKEN_BUDGET = 65536  # on a CPU the budget bounds work per batch, not memory: compute is the limit there
ACTIVATION_SHARE = 0.4  # prefill activations per prompt token, in KV slots (measured, see above)
USABLE_FRACTION = 0.9
# The budget is rounded down to a multiple of this many slots, so that a few hundred MB more or less free memory
# (another process, fragmentation, a resumed run) plans the same batches: the same batches give the same sampled
# rewrites (sampling is seeded per batch) and, on a GPU, the same rounding.
BUDGET_STEP = 8192


def kv_bytes_per_token(lm_config: Any, dtype) -> int:
    """Bytes of keys and values one token keeps in the cache of a decoder language model."""
    layers = int(lm_config.num_hidden_layers)
    heads = int(lm_config.num_attention_heads)
    kv_heads = int(getattr(lm_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(lm_config, "head_dim", None) or lm_config.hidden_size // heads)
    itemsize = dtype.itemsize if hasattr(dtype, "itemsize") else int(dtype)
    return 2 * layers * kv_heads * head_dim * itemsize


def token_budget_for(available_bytes: int, kv_bytes: int) -> int:
    """The KV-cache slots to plan batches for, given the device memory a batch may use."""
    if kv_bytes <= 0:
        raise ValueError(f"kv_bytes must be positive, got {kv_bytes}")
    slots = int(available_bytes * USABLE_FRACTION / (kv_bytes * (1 + ACTIVATION_SHARE)))
    return slots // BUDGET_STEP * BUDGET_STEP if slots >= BUDGET_STEP else max(1, slots)


def usable_bytes(free: int, total: int, cached: int, allocated: int, held: int, share: float = 1.0) -> int:
    """Device memory a batch may use: what the driver reports ``free``, what PyTorch's allocator holds ``cached``
    but unused, and what this process ``held`` for batches already (the decoder's KV arena, reused). A worker
    given a ``share`` of the card (Ray's ``num_gpus: 0.5``) stays within that share of ``total``, less what it
    has ``allocated`` besides the arena (the model), whatever the driver says is free: the other workers on the
    card may not have loaded yet."""
    available = free + cached + held
    if share < 1.0:
        available = min(available, int(share * total) - (allocated - held))
    return max(0, int(available))


def gpu_share() -> float:
    """The fraction of a GPU this process was given: Ray's ``num_gpus`` for the task or actor it runs, if below
    one; else 1."""
    # a Ray worker has imported ray already; elsewhere there is no share to ask for (and no import to pay)
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 1.0
    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0)
    return float(gpus) if 0 < gpus < 1 else 1.0


def cuda_bytes_available(device, held_bytes: int = 0) -> int:
    """``usable_bytes`` for a CUDA device, as the driver and PyTorch's allocator report it now."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return usable_bytes(free, total, reserved - allocated, allocated, held_bytes, gpu_share())


def resolve_token_budget(setting: int | str, loaded, held_bytes: int = 0) -> int:
    """``token_budget`` as configured, or for ``auto``: from the free memory of a CUDA device, after the model
    (``loaded``, from models.loader) is on it; ``CPU_TOKEN_BUDGET`` elsewhere."""
    if setting != "auto":
        return int(setting)
    if loaded.device.type != "cuda":
        return CPU_TOKEN_BUDGET
    per_token = kv_bytes_per_token(loaded.model.lang_encoder.config, loaded.dtype)
    return token_budget_for(cuda_bytes_available(loaded.device, held_bytes), per_token)
