"""Static buffers of the fast decoder (models/fast_decode.py): the KV-cache arena, one session of fixed-shape
buffers per batch shape, and CUDA graph capture of a decode step over a session.

A CUDA graph replays kernels on the exact memory it was captured with, so everything a decode step reads or writes
lives in a session's preallocated tensors. The KV caches of all sessions are views into one arena per layer (only
one batch decodes at a time); growing the arena drops every session, since their graphs point at the old memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# cache lengths and attention spans are rounded up to this: one CUDA graph per block of keys. 16 wastes fewer keys
# per step than 64 (H200, 9B, batch 512: 35.7 vs 36.3 ms a step) for about 25 ms of capture per extra graph
KV_BLOCK = 16
MAX_SESSIONS = 16  # batch shapes kept with their captured graphs (least recently used ones are dropped)


def round_up(n: int, block: int) -> int:
    return ((n + block - 1) // block) * block


def batch_bucket(n: int) -> int:
    """Batch sizes captured as graphs: powers of two up to 32, then multiples of 32."""
    if n <= 32:
        return 1 << (max(n, 1) - 1).bit_length()
    return round_up(n, 32)


@dataclass
class Session:
    """Static buffers of one batch shape; CUDA graphs captured for it read and write only these."""

    bsz: int
    cache_len: int
    max_new: int
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    tok: torch.Tensor  # (bsz,) the token each row feeds into the next step
    # The write position, shared by all rows. It counts up without bound; the cache is a ring of cache_len
    # slots, and a key written at slot s lives at s % cache_len.
    slot: torch.Tensor
    gen_step: torch.Tensor  # (bsz,) tokens generated so far per row (a finished row stops counting)
    # (bsz,) the slot of each row's first real key (prompts are left-padded; may be < 0)
    pad_len: torch.Tensor
    has_media: torch.Tensor
    finished: torch.Tensor
    nan: torch.Tensor
    out: torch.Tensor  # (bsz, max_new + 1) generated ids; the last column takes finished rows' writes
    logits: torch.Tensor
    min_new: torch.Tensor  # (bsz,)
    max_new_row: torch.Tensor  # (bsz,) a row finishes after this many tokens
    is_eos: torch.Tensor
    pad_id: torch.Tensor
    key_idx: torch.Tensor
    rows: torch.Tensor  # arange(bsz)
    xk: dict[int, torch.Tensor] = field(default_factory=dict)
    xv: dict[int, torch.Tensor] = field(default_factory=dict)
    media_last: torch.Tensor | None = (
        None  # each row's last image latents (only kept to recompute keys/values)
    )
    graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = field(default_factory=dict)  # by (keys, select)
    flex: Any = None  # models.flex_decode.FlexDecodeMask when the decoder attends with FlexAttention
    slot_host: int = 0  # the cache slot the next step writes, known on the host (picks the attention span)
    full_span: bool = False  # rows may hold keys anywhere in the ring (continuous batching): attend all of it
    # a step picks the greedy token on the device (True), or only leaves its logits for a search (models/search.py)
    select: bool = True


@dataclass
class Admission:
    """Rows joining a running batch (``FastFlamingoDecoder.stream``): left-padded prompts, their image latents
    (k, T_img, n_latents, dim) and per-row token limits, under caller-chosen keys."""

    keys: list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: torch.Tensor
    max_new: list[int]
    min_new: list[int]


@dataclass
class DecodeOutput:
    tokens: torch.Tensor  # (B, steps) generated ids; pad after a row's end-of-sequence token
    nan: torch.Tensor  # (B,) a row saw NaN logits
    grows: int = 0  # times the batch's unfinished rows moved to a longer KV cache


class SessionCache:
    """Sessions by (batch bucket, cache length, max new tokens), least recently used dropped beyond ``MAX_SESSIONS``."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, vocab: int, device, dtype, bucket_batches: bool,
                 kv_block: int = KV_BLOCK):  # fmt: skip
        self.n_layers, self.n_kv, self.head_dim, self.vocab = n_layers, n_kv, head_dim, vocab
        self.device, self.dtype = device, dtype
        self.bucket_batches = bucket_batches
        self.kv_block = kv_block
        self._arena: list[torch.Tensor] = []
        self._sessions: dict[tuple[int, int, int], Session] = {}
        self.pool = self._new_pool()

    def _new_pool(self):
        # A private graph pool dies with the last graph captured into it; capturing into a dead pool's handle
        # trips an allocator assert (seen on an H200 when the arena grew from batch 64 to 256). So every time
        # all sessions, and with them all graphs, are dropped, later captures get a fresh pool.
        return torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def cache_len(self, prompt_len: int, max_new: int, at_least: int | None = None) -> int:
        """Cache slots per row: prompt + new tokens (or ``at_least``, a caller's ring size), rounded up."""
        return round_up(at_least or prompt_len + max_new, self.kv_block)

    def clear_sessions(self) -> None:
        self._sessions.clear()
        self.pool = self._new_pool()

    def reset(self) -> None:
        """Drop every session and the arena (e.g. after an out-of-memory error)."""
        self._sessions.clear()
        self._arena = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.pool = self._new_pool()

    def zero(self) -> None:
        """Zero the arena: after NaN logits, so later batches never multiply a stale NaN by zero."""
        for t in self._arena:
            t.zero_()

    def rows_for(self, batch: int) -> int:
        """The session size (rows) a batch of ``batch`` rows gets."""
        return batch_bucket(batch) if self.bucket_batches else batch

    def arena_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._arena)

    def slots_per_row(self, batch: int) -> int:
        """Cache slots each row of a ``batch``-row session could have in the arena as it is now."""
        if not self._arena:
            return 0
        return self._arena[0].numel() // (self.rows_for(batch) * self.n_kv * self.head_dim)

    def get(self, batch: int, prompt_len: int, max_new: int, cache_len: int | None = None) -> Session:
        bsz = self.rows_for(batch)
        cache_len = self.cache_len(prompt_len, max_new, cache_len)
        key = (bsz, cache_len, max_new)
        if key in self._sessions:
            self._sessions[key] = self._sessions.pop(key)  # most recently used last
            return self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:  # each holds graphs and per-batch buffers
            self._sessions.pop(next(iter(self._sessions)))
        per_layer = bsz * self.n_kv * cache_len * self.head_dim
        if not self._arena or self._arena[0].numel() < per_layer:
            # growing the arena moves the caches: every captured graph points at the old memory
            self.reset()
            # zeros, not empty: masked-out cache slots are multiplied by 0 in attention, and 0 * NaN is NaN
            self._arena = [
                torch.zeros(per_layer, device=self.device, dtype=self.dtype) for _ in range(2 * self.n_layers)
            ]
        shape = (bsz, self.n_kv, cache_len, self.head_dim)
        dev = self.device
        sess = Session(
            bsz=bsz,
            cache_len=cache_len,
            max_new=max_new,
            k=[self._arena[2 * i][:per_layer].view(shape) for i in range(self.n_layers)],
            v=[self._arena[2 * i + 1][:per_layer].view(shape) for i in range(self.n_layers)],
            tok=torch.zeros(bsz, dtype=torch.long, device=dev),
            slot=torch.zeros((), dtype=torch.long, device=dev),
            gen_step=torch.zeros(bsz, dtype=torch.long, device=dev),
            pad_len=torch.zeros(bsz, dtype=torch.long, device=dev),
            has_media=torch.zeros(bsz, dtype=self.dtype, device=dev),
            finished=torch.ones(bsz, dtype=torch.bool, device=dev),
            nan=torch.zeros(bsz, dtype=torch.bool, device=dev),
            out=torch.zeros(bsz, max_new + 1, dtype=torch.long, device=dev),
            logits=torch.zeros(bsz, self.vocab, dtype=torch.float32, device=dev),
            min_new=torch.zeros(bsz, dtype=torch.long, device=dev),
            max_new_row=torch.zeros(bsz, dtype=torch.long, device=dev),
            is_eos=torch.zeros(self.vocab, dtype=torch.bool, device=dev),
            pad_id=torch.zeros((), dtype=torch.long, device=dev),
            key_idx=torch.arange(cache_len, device=dev),
            rows=torch.arange(bsz, device=dev),
        )
        self._sessions[key] = sess
        return sess


def capture_step(
    step: Callable[[Session, int], None], sess: Session, keys: int, pool
) -> torch.cuda.CUDAGraph:
    """Capture ``step(sess, keys)`` as a CUDA graph (after one warm-up run whose effects are undone)."""
    state = (sess.tok, sess.slot, sess.gen_step, sess.finished, sess.nan)
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(sess, keys)  # warm-up (cuBLAS handles, autotuning) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    for dst, src in zip(state, saved, strict=True):
        dst.copy_(src)  # the cache slot and output column it wrote are rewritten by the real step
    graph = torch.cuda.CUDAGraph()
    # thread_local: CPU work on other threads (image prefetch) must not invalidate the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        step(sess, keys)
    sess.graphs[(keys, sess.select)] = graph
    return graph
