"""Decode-step attention by FlexAttention over the fast decoder's static KV cache.

Why: the SDPA path attends every row over the same span ``[0, keys)`` with a boolean mask, so each step reads the
left padding and up to ``kv_block - 1`` unwritten slots of every row, through a general masked kernel. Here each
row lists only the cache blocks between its first real key and the current slot (a FlexAttention ``BlockMask``),
the mask function hides the rest inside those blocks, and on CUDA the compiled kernel is PyTorch's flash-decoding
template for short queries.

Everything a step touches is a fixed tensor updated in place (the block counts grow with the slot), so the step
stays capturable as a CUDA graph: the block lists are written after each prefill (a new batch, or rows joining a
running one), and the step only recomputes how many blocks each row reads.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_compiled = None
_compiled_lock = threading.Lock()
# Sessions differ only in the tensors their mask function closes over; each distinct batch and cache shape is
# one more compiled variant, so allow as many as the session cache can hold (models/fast_cache.MAX_SESSIONS).
RECOMPILE_LIMIT = 64


def compiled_flex_attention():
    """``flex_attention`` through ``torch.compile`` (one process-wide wrapper, compiled per shape on first use)."""
    global _compiled
    with _compiled_lock:
        if _compiled is None:
            import torch._dynamo

            config = torch._dynamo.config
            # named cache_size_limit before torch 2.7
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            _compiled = torch.compile(flex_attention, fullgraph=True)
        return _compiled


def eager_flex_attention(*args, **kwargs):
    """The uncompiled reference: same result (it applies the mask function to every key), far slower."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)


class FlexDecodeMask:
    """Which cache blocks each row of a session reads at the current step, as a FlexAttention ``BlockMask``.

    Rows share one write slot that counts up without bound; the cache is a ring, so the key written at slot ``s``
    lives at ``s % cache_len``. Row ``r`` attends the keys written at slots ``pad_len[r] .. slot`` (inclusive:
    the key written this step is included); a row's span never exceeds the ring. ``pad_len`` and ``slot`` are
    the session's own tensors. The mask function reads them, so it is always exact, and the block lists only
    decide what is skipped.
    """

    def __init__(self, pad_len: torch.Tensor, slot: torch.Tensor, cache_len: int, block: int):
        if cache_len % block:
            raise ValueError(f"cache length {cache_len} is not a multiple of the attention block {block}")
        bsz, device = pad_len.shape[0], pad_len.device
        self.block = block
        self.n_blocks = cache_len // block
        self.first = torch.zeros(bsz, dtype=torch.int32, device=device)
        self.num_blocks = torch.zeros(bsz, 1, 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(bsz, 1, 1, self.n_blocks, dtype=torch.int32, device=device)
        self._ramp = torch.arange(self.n_blocks, dtype=torch.int32, device=device)

        def row_span(b, h, q_idx, kv_idx):
            # how many slots ago position kv_idx was written, modulo the ring
            age = torch.remainder(slot - kv_idx, cache_len)
            return age <= slot - pad_len[b]

        kwargs = dict(BLOCK_SIZE=(128, block), mask_mod=row_span, seq_lengths=(1, cache_len))
        try:  # the query-side lists only serve the backward pass; newer PyTorch can skip them
            self.block_mask = BlockMask.from_kv_blocks(
                self.num_blocks, self.indices, compute_q_blocks=False, **kwargs
            )
        except TypeError:
            self.block_mask = BlockMask.from_kv_blocks(self.num_blocks, self.indices, **kwargs)

    def start(self, pad_len: torch.Tensor) -> None:
        """After a prefill: each row's block list starts at the block of its first real key, going round the
        ring."""
        self.first.copy_(torch.div(pad_len, self.block, rounding_mode="floor"))
        self.indices.copy_(torch.remainder(self.first.view(-1, 1, 1, 1) + self._ramp, self.n_blocks))

    def advance(self, slot: torch.Tensor) -> None:
        """Inside the (captured) step: read up to the block holding ``slot``, never a block twice."""
        last = torch.div(slot, self.block, rounding_mode="floor").to(torch.int32)
        self.num_blocks.copy_((last + 1 - self.first).clamp(max=self.n_blocks).view(-1, 1, 1))

    def dense_blocks(self) -> torch.Tensor:
        """(rows, n_blocks) bool: the blocks each row reads now, read back from the lists (tests, inspection)."""
        out = torch.zeros(self.first.shape[0], self.n_blocks, dtype=torch.bool)
        for row, (count, listed) in enumerate(
            zip(self.num_blocks.view(-1).tolist(), self.indices.view(len(out), -1).tolist(), strict=True)
        ):
            out[row, listed[:count]] = True
        return out
