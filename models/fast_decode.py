"""Fast decoding for an open_flamingo model: our own decode loop over its modules.

Why: Hugging Face ``generate`` on open_flamingo launches every kernel from Python each step (20-70 ms per step
whatever the batch) and recomputes the cross-attention keys/values from the image latents at every step. Here:

* a static KV cache (one preallocated arena per layer, viewed per batch shape), so a step has fixed shapes;
* cross-attention keys/values computed once per batch (from each row's last image) instead of once per step;
* the whole step - embedding, layers, greedy pick, end-of-sequence bookkeeping - captured in a CUDA graph per
  (batch bucket, cache length, attention span) and replayed, so a step costs one launch;
* the prompt (prefill) runs eagerly through the very same open_flamingo cross-attention modules;
* per-row decoding state (tokens generated, limits, end of sequence) and a ring-shaped cache shared by one write
  slot, so ``stream`` can refill a finished row with a new prompt while the others keep decoding (continuous
  batching) and every step is still the same captured graph;
* the step's self-attention is SDPA over one masked span, or FlexAttention over each row's own cache blocks
  (models/flex_decode.py);
* optionally (``compile_layers``) each layer's work around its attention compiled by ``torch.compile``, one graph
  for all layers, so the elementwise ops between the matrix products fuse;
* beam search and sampling (``search``, ``stream_search``; models/fast_search.py): the same graph-captured steps
  produce logits, and a search with Hugging Face's semantics (models/search.py) picks the tokens and the rows
  each beam continues from.

The decoder calls the model's own modules (norms, projections, MLPs, cross-attention), so merged LoRA weights and
either cross-attention masking rule (models/compat.py) are honoured. It supports LLaMA-style language models;
``FastPathUnsupported`` tells the caller to use the plain path instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from models.fast_cache import KV_BLOCK, Admission, DecodeOutput, Session, SessionCache, capture_step, round_up
from models.fast_layers import LAYER_PARTS, _fuse_linears
from models.fast_search import SearchDecoding

ATTENTION_KINDS = ("sdpa", "flex")


def _most(limit: int | Sequence[int]) -> int:
    return int(limit) if isinstance(limit, int) else max(int(x) for x in limit)


class FastPathUnsupported(RuntimeError):
    """This model or these settings are not handled by the fast decoder; use the plain path."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()




class FastFlamingoDecoder(SearchDecoding):
    """Greedy decoding and teacher-forced scoring over a loaded open_flamingo ``Flamingo``.

    ``media`` arguments are image latents after the perceiver, shape (B, T_img, n_latents, dim), gathered per
    row (see ``models.generation.encode_images``); rows may pad T_img with zeros beyond their own images.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cuda_graphs: bool = True,
        kv_block: int = KV_BLOCK,
        recompute_cross_kv: bool = False,
        attention: str = "sdpa",
        fuse_projections: bool | None = None,
        shrink: bool = True,
        compile_layers: bool | None = None,
    ):
        """``attention`` picks the decode step's self-attention: ``sdpa`` (one masked span for the whole batch,
        rounded up to ``kv_block``) or ``flex`` (FlexAttention reading each row's own cache blocks, compiled on
        CUDA; models/flex_decode.py). Both compute the same function; the prefill always uses SDPA.

        ``fuse_projections``: run each layer's q/k/v projections as one matrix product, and gate/up as another.
        The model's own weights become views into the fused matrices (same values, no extra memory), so other
        users of the model see no change. At decode batch sizes the separate products are too small to fill a
        large GPU. Layers whose projections are not plain ``nn.Linear`` without bias (an unmerged LoRA
        adapter, say) stay unfused. None: fuse on CUDA only (on 2 CPU cores the tiny demo model measured 0-7%
        slower fused, within noise: there the split outputs' strided copies cost about what fusing saves).

        ``shrink``: once a static batch's unfinished rows fit a session half its size, move them there, so the
        finished rows stop costing compute and KV reads (same tokens; ``shrinks`` counts the moves).

        ``compile_layers``: run each decoder layer's two halves around its attention (``LAYER_PARTS``) through
        ``torch.compile``, in the prefill and in the decode steps (inside their CUDA graphs). That fuses the
        norms, rotations, activation and residual adds between the matrix products, which in eager mode move
        about 0.6 MB per token and layer of the 9B shape (bench/layer_traffic.py). One graph per half serves
        every layer, dynamic in batch size and length. The first batch of a process compiles (tens of seconds);
        a compiler failure falls back to eager with a warning. None: compile on CUDA only (H200, 9B, batch 512:
        10,097 vs 9,124 tokens/s; on 2 CPU cores it is no faster).

        ``recompute_cross_kv`` recomputes the cross-attention keys/values every step, as open_flamingo does:
        only for measuring what precomputing them saves (bench/gpu_rewrite.py)."""
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        if kv_block < 1 or (attention == "flex" and kv_block % 16):
            raise ValueError(f"kv_block must be >= 1 (a multiple of 16 for flex attention), got {kv_block}")
        self.attention = attention
        lm = model.lang_encoder
        self.recompute_cross_kv = recompute_cross_kv
        self.media_token_id = int(model.media_token_id)
        try:
            self.layers = list(lm._get_decoder_layers())
            decoder = lm.get_decoder()
            self.embed = lm.get_input_embeddings()
            self.lm_head = lm.get_output_embeddings()
            self.norm = decoder.norm
            rotary = decoder.rotary_emb
            attn0 = self.layers[0].decoder_layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(attn0, name)
            self.layers[0].decoder_layer.input_layernorm  # noqa: B018 - existence check
        except (AttributeError, IndexError) as exc:
            raise FastPathUnsupported(f"{type(lm).__name__} is not a LLaMA-style decoder: {exc}") from exc
        cfg = lm.config
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.gqa = self.n_kv != self.n_heads  # grouped-query attention: fewer key/value heads than query heads
        self.head_dim = int(getattr(attn0, "head_dim", cfg.hidden_size // self.n_heads))
        self.scaling = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.vocab = int(self.lm_head.weight.shape[0])
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_block = kv_block
        self.cuda_graphs = bool(cuda_graphs and self.device.type == "cuda")
        self._flex_attention = None
        if attention == "flex":
            from models import flex_decode

            # compiled only where it pays: on CPU the eager form is exact and compiling costs ~25 s per shape
            cuda = self.device.type == "cuda"
            self._flex_attention = (
                flex_decode.compiled_flex_attention() if cuda else flex_decode.eager_flex_attention
            )
        self._rotary = rotary
        self._cos = self._sin = None
        self._cache = SessionCache(len(self.layers), self.n_kv, self.head_dim, self.vocab, self.device, self.dtype,
                                   bucket_batches=self.cuda_graphs, kv_block=kv_block)  # fmt: skip
        self._rope_table(int(getattr(cfg, "max_position_embeddings", 2048)))
        self._qkv: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self._gate_up: dict[int, tuple[torch.Tensor, list[int]]] = {}
        if fuse_projections is None:
            fuse_projections = self.device.type == "cuda"
        if fuse_projections:
            with torch.no_grad():
                for i, layer in enumerate(self.layers):
                    dl = layer.decoder_layer
                    attn, mlp = dl.self_attn, dl.mlp
                    fused = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                    if fused is not None:
                        self._qkv[i] = fused
                    if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                        fused = _fuse_linears([mlp.gate_proj, mlp.up_proj])
                        if fused is not None:
                            self._gate_up[i] = fused
        self.graph_error: str | None = None  # why graphs were turned off, if a capture failed
        if compile_layers is None:
            compile_layers = self.device.type == "cuda"
        self.compile_layers = compile_layers
        self.compile_error: str | None = None  # why the compiled layer parts were dropped, if compiling failed
        self._compiled_parts = (
            {name: torch.compile(fn, dynamic=True) for name, fn in LAYER_PARTS.items()} if compile_layers else {}
        )
        self.shrink = shrink
        self.shrinks = 0
        self.grows = 0  # static sessions whose rows moved to a longer cache (``cache_new_tokens``)
        # beam search: generated keys (rows x positions) copied to beams that continue another row, of all the
        # generated keys those beams had (what copying whole rows would have moved)
        self.beam_keys_copied = self.beam_keys_moved = 0

    # -- tables and buffers ------------------------------------------------------------------------
    @torch.inference_mode()
    def _rope_table(self, n_positions: int) -> None:
        """cos/sin for every position, from the model's own rotary module (identical values to its forward)."""
        if self._cos is not None and self._cos.shape[0] >= n_positions:
            return
        dummy = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
        positions = torch.arange(n_positions, device=self.device)[None]
        cos, sin = self._rotary(dummy, positions)
        self._cos, self._sin = cos[0], sin[0]
        self._cache.clear_sessions()  # graphs captured against the old tables

    def _session(self, batch: int, prompt_len: int, max_new: int, cache_len: int | None = None) -> Session:
        self._rope_table(self._cache.cache_len(prompt_len, max_new, cache_len))
        return self._cache.get(batch, prompt_len, max_new, cache_len=cache_len)

    def reset(self) -> None:
        """Drop every cache and graph (e.g. after an out-of-memory error)."""
        self._cache.reset()

    def session_rows(self, rows: int) -> int:
        """The rows a batch of ``rows`` decodes as (with CUDA graphs, a bucket: 257 rows run as 288)."""
        return self._cache.rows_for(rows)

    @property
    def kv_cache_bytes(self) -> int:
        """Memory held by the KV-cache arena (the largest session so far needed it)."""
        return self._cache.arena_bytes()

    # -- the model, piece by piece -----------------------------------------------------------------
    def _layer_part(self, name: str, *args):
        """``LAYER_PARTS[name](*args)``, compiled when asked; eager from then on if compiling fails (warned)."""
        compiled = self._compiled_parts.get(name)
        if compiled is not None:
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not fail the rewrites
                if is_oom(exc) or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                    raise  # the caller splits the batch / decodes without graphs
                import warnings

                self.compile_error = f"{type(exc).__name__}: {str(exc)[:500]}"
                warnings.warn(f"compiling the decoder layers failed, running them eagerly: {self.compile_error}",
                              stacklevel=2)  # fmt: skip
                self._compiled_parts = {}
        return LAYER_PARTS[name](*args)

    def _decode_layer(self, i: int, dl, x, cos, sin, write_at, keys, mask, sess) -> torch.Tensor:
        """Decoder layer ``i`` for one new token per row: every row writes its new key/value at the ring
        position ``write_at``, then attends the cache (the first ``keys`` slots under ``mask``, or each row's
        own blocks with flex)."""
        b = x.shape[0]
        q, k, v = self._layer_part("attention_inputs", dl, x, cos, sin, self._qkv.get(i), self.head_dim)
        kc, vc = sess.k[i], sess.v[i]
        kc.index_copy_(2, write_at, k)
        vc.index_copy_(2, write_at, v)
        if self._flex_attention is not None:
            out = self._flex_attention(q, kc[:b], vc[:b], block_mask=sess.flex.block_mask, scale=self.scaling,
                                       enable_gqa=self.gqa)  # fmt: skip
        else:
            out = F.scaled_dot_product_attention(q, kc[:b, :, :keys], vc[:b, :, :keys], attn_mask=mask,
                                                 scale=self.scaling, enable_gqa=self.gqa)  # fmt: skip
        return self._layer_part("layer_output", dl, x, out, self._gate_up.get(i))

    @staticmethod
    def _cross_kv(block, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values (b, heads, latents, dim_head) of one image per row."""
        k, v = block.attn.to_kv(latents).chunk(2, dim=-1)
        shape = (latents.shape[0], -1, block.attn.heads, k.shape[-1] // block.attn.heads)
        return k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)

    def _cross_attention_step(self, block, x, xk, xv, has_media) -> torch.Tensor:
        """A gated cross-attention block for one new token, against keys/values precomputed per batch."""
        b = x.shape[0]
        a = block.attn
        q = a.to_q(a.norm(x)).view(b, 1, a.heads, -1).transpose(1, 2) * a.scale
        sim = q @ xk.transpose(-1, -2)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        weights = sim.softmax(dim=-1) * has_media.view(b, 1, 1, 1)
        out = (weights @ xv).transpose(1, 2).reshape(b, 1, -1)
        x = a.to_out(out) * block.attn_gate.tanh() + x
        return block.ff(x) * block.ff_gate.tanh() + x

    def _select(self, sess: Session, logits: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Greedy pick with Hugging Face's semantics (min_new_tokens, pad after eos), per row, on the device.

        ``rows``: pick for these rows only (rows just prefilled); None: every row (a graph-capturable step)."""
        at = slice(None) if rows is None else rows
        index = sess.rows if rows is None else rows
        finished, done = sess.finished[at], sess.gen_step[at]
        sess.logits[at] = logits
        sess.nan[at] = sess.nan[at] | torch.isnan(logits).any(dim=-1)
        blocked = (done < sess.min_new[at]).view(-1, 1) & sess.is_eos.view(1, -1)
        logits = logits.masked_fill(blocked, float("-inf"))
        nxt = torch.where(finished, sess.pad_id, logits.argmax(dim=-1))
        trash = sess.out.shape[1] - 1  # finished rows write there, so a row's own tokens stay put
        sess.out[index, torch.where(finished, trash, done)] = nxt
        done = done + (~finished).long()
        sess.gen_step[at] = done
        sess.finished[at] = finished | sess.is_eos[nxt] | (done >= sess.max_new_row[at])
        sess.tok[at] = nxt

    def _step(self, sess: Session, keys: int) -> None:
        """One decode step for the whole (bucketed) batch; graph-capturable: no host syncs, fixed shapes."""
        b = sess.bsz
        ring = sess.cache_len
        x = self.embed(sess.tok).view(b, 1, -1)
        # how far back each row's first key is; idle (finished) rows may drift past the ring
        span = sess.slot - sess.pad_len
        pos = span.clamp(min=0, max=ring - 1)
        cos = self._cos[pos].view(b, 1, 1, -1)
        sin = self._sin[pos].view(b, 1, 1, -1)
        if sess.flex is not None:
            sess.flex.advance(sess.slot)
            mask = None
        else:
            # slots since each position was written
            age = torch.remainder(sess.slot - sess.key_idx[:keys], ring)
            mask = (age.view(1, keys) <= span.view(b, 1)).view(b, 1, 1, keys)
        write_at = torch.remainder(sess.slot, ring).view(1)
        for i, layer in enumerate(self.layers):
            block = layer.gated_cross_attn_layer
            if block is not None:
                xk, xv = sess.xk[i], sess.xv[i]
                if self.recompute_cross_kv:
                    xk, xv = self._cross_kv(block, sess.media_last)
                x = self._cross_attention_step(block, x, xk, xv, sess.has_media)
            x = self._decode_layer(i, layer.decoder_layer, x, cos, sin, write_at, keys, mask, sess)
        logits = self.lm_head(self.norm(x))[:, -1].float()
        if sess.select:
            self._select(sess, logits)
        else:  # a search picks on the host side of the loop (models/search.py)
            sess.logits.copy_(logits)
            sess.nan |= torch.isnan(logits).any(dim=-1)
        sess.slot += 1

    def _prefill(
        self, sess: Session, input_ids, attention_mask, media, rows=None, offset: int = 0
    ) -> torch.Tensor:
        """Run the prompt through every layer (cross-attention by open_flamingo's own modules), fill the cache
        and the per-row cross-attention keys/values; return the last position's logits (float32).

        ``rows`` None: a new batch in rows ``[:b]`` at slots ``[0, n)``. Else the prompts join a running batch in
        those rows, at slots ``[offset, offset + n)`` of the ring; the other rows are untouched."""
        b, n = input_ids.shape
        mask2d = attention_mask.bool()
        if not bool((mask2d.long().diff(dim=1) >= 0).all()):
            raise ValueError("the fast decoder needs left padding (attention mask 0...0 1...1 per row)")
        pad_len = n - mask2d.sum(dim=1)
        pos = (torch.arange(n, device=self.device).view(1, n) - pad_len.view(b, 1)).clamp(min=0)
        cos, sin = self._cos[pos].unsqueeze(1), self._sin[pos].unsqueeze(1)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        # padded queries attend to themselves only: a fully masked row would give NaN in the cache
        attend = (causal.view(1, n, n) & mask2d.view(b, 1, n)) | torch.eye(
            n, dtype=torch.bool, device=self.device
        )
        attend = attend.view(b, 1, n, n)
        media_locations = input_ids == self.media_token_id
        n_images = media_locations.sum(dim=1)
        media = media.to(self.dtype)
        target = slice(0, b) if rows is None else rows
        last = media[torch.arange(b, device=self.device), (n_images - 1).clamp(min=0)]  # (b, latents, dim)
        if self.recompute_cross_kv:
            if sess.media_last is None or sess.media_last.shape[1:] != last.shape[1:]:
                sess.media_last = torch.zeros(
                    (sess.bsz, *last.shape[1:]), device=self.device, dtype=self.dtype
                )
                sess.graphs.clear()
            sess.media_last[target] = last
        ring_pos = None if rows is None else torch.remainder(offset + torch.arange(n, device=self.device),
                                                             sess.cache_len)  # fmt: skip
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            block = layer.gated_cross_attn_layer
            if block is not None:
                x = block(x, media, media_locations=media_locations, use_cached_media=False)
                k, v = self._cross_kv(block, last)
                full = (sess.bsz, *k.shape[1:])
                if i not in sess.xk or tuple(sess.xk[i].shape) != full:
                    sess.xk[i] = torch.zeros(full, device=self.device, dtype=self.dtype)
                    sess.xv[i] = torch.zeros(full, device=self.device, dtype=self.dtype)
                    sess.graphs.clear()
                sess.xk[i][target] = k
                sess.xv[i][target] = v
            dl = layer.decoder_layer
            q, k, v = self._layer_part("attention_inputs", dl, x, cos, sin, self._qkv.get(i), self.head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.scaling,
                                                 enable_gqa=self.gqa)  # fmt: skip
            x = self._layer_part("layer_output", dl, x, out, self._gate_up.get(i))
            kc, vc = sess.k[i], sess.v[i]
            if rows is None:  # a batch's first prefill: rows [:b], positions [:n]
                kc[:b, :, :n] = k
                vc[:b, :, :n] = v
            else:  # rows joining a running batch: (row, ring position) pairs
                kc[rows.view(-1, 1), :, ring_pos.view(1, -1)] = k.transpose(1, 2)
                vc[rows.view(-1, 1), :, ring_pos.view(1, -1)] = v.transpose(1, 2)
        # under the v1 masking rule text after the prompt sees no image; under the current rule, the last one
        v1 = any(getattr(x_.gated_cross_attn_layer.attn, "v1_masking", False) for x_ in self._xattn_layers())
        if rows is None:
            sess.pad_len.zero_()
            sess.has_media.zero_()
        sess.pad_len[target] = offset + pad_len
        sess.has_media[target] = 0.0 if v1 else (n_images > 0).to(self.dtype)
        return self.lm_head(self.norm(x[:, -1:]))[:, -1].float()

    def _xattn_layers(self):
        return [layer for layer in self.layers if layer.gated_cross_attn_layer is not None]

    # -- public ------------------------------------------------------------------------------------
    def _reset_state(self, sess: Session, eos_token_ids, pad_token_id, slot: int, select: bool = True) -> None:
        """Every row finished and empty, the write slot at ``slot``; ``select``: see ``Session.select``."""
        sess.is_eos.zero_()
        sess.is_eos[torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=self.device)] = True
        sess.pad_id.fill_(int(pad_token_id))
        for t in (sess.min_new, sess.max_new_row, sess.gen_step, sess.pad_len, sess.has_media, sess.nan):
            t.zero_()
        sess.finished.fill_(True)
        sess.tok.fill_(int(pad_token_id))
        sess.out.fill_(int(pad_token_id))
        sess.slot.fill_(slot)
        sess.slot_host = slot
        sess.select = select

    def _ensure_flex(self, sess: Session) -> None:
        if self.attention == "flex":
            if sess.flex is None:
                from models.flex_decode import FlexDecodeMask

                sess.flex = FlexDecodeMask(sess.pad_len, sess.slot, sess.cache_len, self.kv_block)
            sess.flex.start(sess.pad_len)

    @staticmethod
    def _first_cache_len(prompt_len: int, max_new: int, cache_new: int | None) -> int | None:
        """A static batch's first cache length: the prompt plus ``cache_new`` new tokens, when that is less
        than its ``max_new``; None (room for all of them) otherwise."""
        return prompt_len + cache_new if cache_new is not None and cache_new < max_new else None

    def _start(
        self, input_ids, attention_mask, media, max_new, min_new, eos_token_ids, pad_token_id, cache_new=None
    ) -> Session:
        b, n = input_ids.shape
        most = _most(max_new)
        sess = self._session(b, n, most, cache_len=self._first_cache_len(n, most, cache_new))
        self._reset_state(sess, eos_token_ids, pad_token_id, slot=n)
        sess.full_span = False
        sess.min_new[:b] = torch.as_tensor(min_new, dtype=torch.long, device=self.device)
        sess.max_new_row[:b] = torch.as_tensor(max_new, dtype=torch.long, device=self.device)
        sess.finished[:b] = False
        logits = self._prefill(
            sess, input_ids.to(self.device), attention_mask.to(self.device), media.to(self.device)
        )
        self._ensure_flex(sess)
        self._select(sess, logits, rows=sess.rows[:b])
        return sess

    def _admit(self, sess: Session, rows: list[int], joining: Admission) -> None:
        """Prefill ``joining``'s prompts into the free ``rows`` of a running batch, ending at the current slot,
        and pick their first tokens; their next token is decoded with everyone else's at the next step."""
        ids = joining.input_ids.to(self.device)
        n = ids.shape[1]
        at = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        sess.gen_step[at] = 0
        sess.min_new[at] = torch.as_tensor(joining.min_new, dtype=torch.long, device=self.device)
        sess.max_new_row[at] = torch.as_tensor(joining.max_new, dtype=torch.long, device=self.device)
        sess.nan[at] = False
        sess.finished[at] = False
        sess.out[at] = sess.pad_id
        logits = self._prefill(sess, ids, joining.attention_mask.to(self.device), joining.media.to(self.device),
                               rows=at, offset=sess.slot_host - n)  # fmt: skip
        self._ensure_flex(sess)
        self._select(sess, logits, rows=at)

    def _run_step(self, sess: Session) -> None:
        if sess.flex is not None or sess.full_span:  # flex: rows' block lists follow the slot on the device
            keys = sess.cache_len
        else:
            keys = min(round_up(int(sess.slot_host) + 1, self.kv_block), sess.cache_len)
        if not self.cuda_graphs:
            self._step(sess, keys)
            return
        graph = sess.graphs.get((keys, sess.select))
        if graph is None:
            try:
                graph = capture_step(self._step, sess, keys, self._cache.pool)
            except Exception as exc:  # a kernel that cannot be captured: decode eagerly rather than fail
                if is_oom(exc):
                    raise
                import warnings

                self.graph_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"CUDA graph capture failed, decoding without graphs: {self.graph_error}", stacklevel=2
                )
                self.cuda_graphs = False
                self._cache.clear_sessions()
                self._step(sess, keys)
                return
        graph.replay()

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        max_new_tokens: int | Sequence[int],
        eos_token_ids: list[int],
        pad_token_id: int,
        min_new_tokens: int | Sequence[int] = 0,
        check_every: int = 8,
        cache_new_tokens: int | None = None,
    ) -> DecodeOutput:
        """Greedy decoding of a left-padded batch; identical tokens to Hugging Face greedy ``generate``.

        The token limits are one for all rows or one per row; the batch runs until every row has finished.
        ``cache_new_tokens``: the KV cache first holds the prompt and this many new tokens, and grows when a row
        that is still decoding reaches its end (``_grown_len``); None: room for ``max_new_tokens`` from the
        start."""
        b, n = input_ids.shape
        grows = self.grows
        sess = self._start(input_ids, attention_mask, media, max_new_tokens, min_new_tokens, eos_token_ids,
                           pad_token_id, cache_new_tokens)  # fmt: skip
        # row i of the session holds original row order[i]; rows dropped by a shrink leave their results here
        order = torch.arange(b, device=self.device)
        tokens = torch.full_like(sess.out[:b], int(pad_token_id))
        nan = torch.zeros(b, dtype=torch.bool, device=self.device)
        steps = 1
        every = 1 if self.device.type == "cpu" else max(1, check_every)
        while steps < _most(max_new_tokens):
            no_slot = sess.slot_host >= sess.cache_len  # the next key has no slot: grow the cache first
            if no_slot or steps % every == 0:
                live = (~sess.finished[: len(order)]).nonzero().flatten()
                if not len(live):
                    break
                if no_slot or self._worth_shrinking(sess, len(live), len(order)):
                    rows = len(order)
                    tokens[order], nan[order] = sess.out[:rows], sess.nan[:rows]
                    length = self._grown_len(sess, len(live), n + _most(max_new_tokens)) if no_slot else None
                    sess, order = self._regroup(sess, live, length), order[live]
            self._run_step(sess)
            sess.slot_host += 1
            steps += 1
        rows = len(order)
        tokens[order], nan[order] = sess.out[:rows], sess.nan[:rows]
        if bool(nan.any()):
            # keep later batches safe: masked cache slots are multiplied by zero, and 0 * NaN is NaN
            self._cache.zero()
        tokens = tokens[:, :steps]
        if steps > 1 and bool(sess.finished[:rows].all()):
            # trim trailing all-pad columns left by the periodic stop check
            alive = (tokens != int(pad_token_id)).any(dim=0).nonzero()
            keep = int(alive.max()) + 1 if alive.numel() else 1
            tokens = tokens[:, :keep]
        return DecodeOutput(tokens=tokens, nan=nan, grows=self.grows - grows)

    def _worth_shrinking(self, sess: Session, live: int, rows: int) -> bool:
        """Move the live rows to a smaller session once they fit one half the size (or less): the rows that
        finished stop costing compute and KV reads. Not after NaN: a stale NaN left in a reused row's masked
        slots would poison it."""
        return self.shrink and self._cache.rows_for(live) * 2 <= sess.bsz and not bool(sess.nan[:rows].any())

    def _grown_len(self, sess: Session, live: int, needed: int) -> int:
        """The cache length a full static session's ``live`` unfinished rows move to: as much of ``needed``
        (prompt + max new tokens) as the arena holds for them, so memory stays what the batch was planned for;
        only when it holds no more than they have does the arena grow, to twice their length. Usually most rows
        have finished by the time the cache is full, and their share of the arena lets the rest go on."""
        needed = self._cache.cache_len(needed, 0)
        fits = self._cache.slots_per_row(live) // self.kv_block * self.kv_block
        return min(needed, fits if fits > sess.cache_len else 2 * sess.cache_len)

    def _regroup(self, sess: Session, keep: torch.Tensor, cache_len: int | None = None) -> Session:
        """A session holding only rows ``keep`` of ``sess`` (in that order), with ``cache_len`` slots per row
        (None: the same). Static batches only: slots ``[0, slot)`` hold every row's keys.

        Same length (a shrink): row r of both sessions is the same memory, so the kept rows' keys move to the
        front of the arena. Longer (a growth): the rows' keys are gathered and rewritten at the new layout, and
        the rest of each row's new cache is zeroed (it overlaps other rows' old keys, a NaN among them would
        survive masking: 0 * NaN is NaN). Either way the decoding state is copied and the new session's other
        rows are idle (finished)."""
        grow = cache_len is not None and cache_len != sess.cache_len
        new = self._session(len(keep), 1, sess.max_new, cache_len=cache_len or sess.cache_len)
        self._reset_state(new, [], 0, slot=sess.slot_host, select=sess.select)
        new.is_eos.copy_(sess.is_eos)
        new.pad_id.copy_(sess.pad_id)
        new.full_span = sess.full_span
        self._move_rows(sess, new, keep, sess.slot_host)
        if grow:
            for cache in (*new.k, *new.v):
                cache[: len(keep), :, sess.slot_host :].zero_()
            self.grows += 1
        else:
            self.shrinks += 1
        self._ensure_flex(new)
        return new

    def _move_rows(self, sess: Session, into: Session, source: torch.Tensor, slots: int) -> None:
        """Rows ``[:len(source)]`` of ``into`` (which may be ``sess``, or have another cache length) take rows
        ``source`` of ``sess``: their keys in slots ``[0, slots)``, image keys/values and per-row decoding state.
        All sessions view the same arena, so for the cache this is a move within it."""
        m = len(source)
        for mine, theirs in zip((*sess.k, *sess.v), (*into.k, *into.v), strict=True):
            # gathered first: the sessions may view overlapping memory of the arena
            theirs[:m, :, :slots].copy_(mine[:, :, :slots].index_select(0, source))
        for name in ("tok", "gen_step", "pad_len", "has_media", "finished", "nan", "out", "logits", "min_new",
                     "max_new_row"):  # fmt: skip
            getattr(into, name)[:m] = getattr(sess, name)[source]
        for mine, theirs in ((sess.xk, into.xk), (sess.xv, into.xv)):
            for i, t in mine.items():
                if i not in theirs or theirs[i].shape[1:] != t.shape[1:]:
                    theirs[i] = torch.zeros((into.bsz, *t.shape[1:]), device=self.device, dtype=t.dtype)
                    into.graphs.clear()  # they read the old tensor
                theirs[i][:m] = t[source]
        if sess.media_last is not None:
            if into.media_last is None or into.media_last.shape[1:] != sess.media_last.shape[1:]:
                into.media_last = torch.zeros((into.bsz, *sess.media_last.shape[1:]), device=self.device,
                                              dtype=self.dtype)  # fmt: skip
                into.graphs.clear()
            into.media_last[:m] = sess.media_last[source]

    def _ring_session(self, rows: int, max_new: int, cache_len: int, eos_token_ids, pad_token_id,
                      select: bool) -> Session:  # fmt: skip
        """A continuous batch's session: every row idle, the write slot at 0, the whole ring attended."""
        sess = self._session(rows, 1, max_new, cache_len=cache_len)
        self._reset_state(sess, eos_token_ids, pad_token_id, slot=0, select=select)
        sess.full_span = True
        self._ensure_flex(sess)
        return sess

    @torch.inference_mode()
    def stream(
        self,
        fetch: Callable[[int], Admission | None],
        rows: int,
        cache_len: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        check_every: int | None = None,
        refill_at: int | None = None,
    ) -> Iterator[tuple[Any, torch.Tensor, bool]]:
        """Continuous batching: keep up to ``rows`` rows decoding and refill the rows that finish.

        ``fetch(k)`` returns up to ``k`` new rows (an ``Admission``), or None when there are no more. Yields
        ``(key, tokens, nan)`` per row as it finishes, in finishing order: its generated ids (the end-of-sequence
        token included, if any) and whether its logits saw NaN. Every prompt plus its ``max_new`` must fit in
        ``cache_len`` (rounded up to ``kv_block``); ``max_new_tokens`` bounds every row's ``max_new``. Each row's
        tokens are the ones ``generate`` gives it alone.

        The cache is a ring shared by one write slot: a joining prompt is written to the slots just before the
        current one, so all rows keep stepping together (and one CUDA graph serves every step). Free rows are
        refilled once ``refill_at`` of them (default rows / 8) are free, to keep joining prefills batched.
        """
        sess = self._ring_session(rows, max_new_tokens, cache_len, eos_token_ids, pad_token_id, select=True)
        refill_at = max(1, refill_at or rows // 8)
        # how many steps between looks at which rows finished: a look is a device sync on CUDA, free on CPU
        # (where looking every step measured 5% faster than every 8th on the demo's rewrites)
        every = check_every or (1 if self.device.type == "cpu" else 8)
        owner: list[Any] = [None] * rows
        exhausted = False
        while True:
            free = [r for r in range(rows) if owner[r] is None]
            if free and not exhausted and (len(free) >= refill_at or len(free) == rows):
                joining = fetch(len(free))
                if joining is None or not joining.keys:
                    exhausted = True
                else:
                    self._check_fits(joining, sess.cache_len, max_new_tokens, len(free))
                    taken = free[: len(joining.keys)]
                    self._admit(sess, taken, joining)
                    for r, key in zip(taken, joining.keys, strict=True):
                        owner[r] = key
            busy = [r for r in range(rows) if owner[r] is not None]
            if not busy:
                if exhausted:
                    return
                continue
            for _ in range(every):
                self._run_step(sess)
                sess.slot_host += 1
            finished = sess.finished[:rows].tolist()
            done = [r for r in busy if finished[r]]
            if not done:
                continue
            at = torch.as_tensor(done, dtype=torch.long, device=self.device)
            tokens, counts, nan = sess.out[at].cpu(), sess.gen_step[at].tolist(), sess.nan[at].tolist()
            # park the finished rows: their span restarts at the slot, so idle steps read only fresh keys
            sess.pad_len[at] = sess.slot
            if any(nan):
                # 0 * NaN is NaN: a masked NaN left in a row's cache would poison the row's next prompt
                bad = at[torch.as_tensor(nan, device=self.device)]
                for k, v in zip(sess.k, sess.v, strict=True):
                    k[bad] = 0
                    v[bad] = 0
            if sess.flex is not None:
                sess.flex.start(sess.pad_len)
            for i, r in enumerate(done):
                key, owner[r] = owner[r], None
                yield key, tokens[i, : counts[i]], bool(nan[i])

    @staticmethod
    def _check_fits(joining: Admission, cache_len: int, max_new_tokens: int, free: int, clipped: bool = True) -> None:
        """``clipped``: every joining row's ``max_new`` must fit the ring; else only one new token must (a beam
        search that outlives its row leaves the ring with its state)."""
        n = joining.input_ids.shape[1]
        if len(joining.keys) > free:
            raise ValueError(f"fetch returned {len(joining.keys)} rows for {free} free ones")
        if max(joining.max_new) > max_new_tokens or n + (max(joining.max_new) if clipped else 1) > cache_len:
            raise ValueError(
                f"a joining row needs {n} prompt + {max(joining.max_new)} new tokens; the ring holds {cache_len} "
                f"and max_new_tokens is {max_new_tokens}"
            )

    @torch.inference_mode()
    def score(self, input_ids, attention_mask, media, continuation: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, K+1, vocab): after the prompt, then after each of ``continuation``'s K tokens,
        computed by the same prefill and (graph-captured) decode steps that ``generate`` uses."""
        b, n = input_ids.shape
        k = continuation.shape[1]
        sess = self._start(input_ids, attention_mask, media, k + 1, 0, [], 0)
        out = [sess.logits[:b].clone()]
        for j in range(k):
            sess.tok[:b] = continuation[:, j].to(self.device)
            self._run_step(sess)
            sess.slot_host += 1
            out.append(sess.logits[:b].clone())
        return torch.stack(out, dim=1)
