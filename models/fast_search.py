"""Beam search and sampling on the fast decoder (models/fast_decode.py): the decoder's graph-captured steps give
each row's logits, and a search with Hugging Face's semantics (models/search.py) picks the tokens and the rows each
beam continues from.

* ``search``: a static batch. Each sample's prompt is prefilled once and copied to its beams; the batch shrinks
  as samples finish and its cache grows when rows outlive it. It also continues searches that left a ring
  (``resumed``): then every beam's row is its prompt plus its own tokens.
* ``stream_search``: continuous batching. Samples join the decoder's ring cache as others finish; a sample whose
  next key would not fit its row leaves with its search's state (``BeamState``; ``RowState`` for one row).

After each step a beam that continues another copies that beam's keys from the first token where their
histories differ (``_continue_beams``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from models.fast_cache import Admission, DecodeOutput, Session
from models.search import BeamSearch, Sampler, SearchState, TokenSearch


class SearchDecoding:
    """The searching half of ``FastFlamingoDecoder``, which supplies the prefill, the steps and the sessions."""

    @torch.inference_mode()
    def search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: torch.Tensor,
               search: TokenSearch, cache_new_tokens: int | None = None,
               resumed: Sequence[int] | None = None) -> DecodeOutput:  # fmt: skip
        """Beam search or sampling (``models.search``) of a left-padded batch: this decoder computes the logits,
        ``search`` picks the tokens. Each sample's prompt is prefilled once and its cache copied to its beams;
        after each step every beam's generated keys are gathered from the row it continues.
        ``cache_new_tokens``: as in ``generate``.

        ``resumed``: searches going on from exported states (``BeamSearch.restore``): per sample, how many tokens
        its beams generated so far. The inputs then have a row per beam, its prompt and its generated tokens, and
        each row is prefilled as it is (the keys of the generated part differ between beams)."""
        k = search.width
        rows = input_ids.shape[0] if resumed is not None else input_ids.shape[0] * k
        b, n = rows // k, input_ids.shape[1]
        grows = self.grows
        max_new = search.s.max_new_tokens
        sess = self._session(rows, n, max_new, cache_len=self._first_cache_len(n, max_new, cache_new_tokens))
        self._reset_state(sess, [], 0, slot=n, select=False)
        sess.full_span = False
        logits = self._prefill(
            sess, input_ids.to(self.device), attention_mask.to(self.device), media.to(self.device)
        )
        sess.nan[: len(logits)] = torch.isnan(logits).any(dim=-1)
        # per session row, the generated tokens whose keys fill its slots [start, slot) (beams only)
        history = torch.zeros((rows, max_new + 1), dtype=torch.long, device=self.device) if k > 1 else None
        start = torch.full((rows,), n, dtype=torch.long, device=self.device)
        if resumed is not None:
            generated = torch.as_tensor(resumed, dtype=torch.long, device=self.device).repeat_interleave(k)
            start -= generated
            for r, g in enumerate(generated.tolist() if history is not None else []):
                history[r, :g] = input_ids[r, n - g :]
        elif k > 1:  # every beam starts as a copy of its sample's prefilled row
            source = torch.arange(b, device=self.device).repeat_interleave(k)
            self._move_rows(sess, sess, source, n)
            logits = logits[source]
        self._ensure_flex(sess)
        # row i of the session holds original row order[i] (where[order[i]] == i); after a shrink, rows of finished
        # samples are gone and the search sees zero logits for them (it no longer reads them)
        order = sess.rows[:rows].clone()
        where = order.clone()
        full = logits
        nan = torch.zeros(rows, dtype=torch.bool, device=self.device)
        while not search.step(full):
            live = search.live_samples().repeat_interleave(k)[order].nonzero().flatten()
            no_slot = sess.slot_host >= sess.cache_len  # the next key has no slot: grow the cache first
            if no_slot or self._worth_shrinking(sess, len(live), len(order)):
                nan[order] |= sess.nan[: len(order)]
                length = self._grown_len(sess, len(live), n + max_new) if no_slot else None
                sess, order = self._regroup(sess, live, length), order[live]
                where = torch.full_like(where, -1)
                where[order] = torch.arange(len(order), device=self.device)
                history = history[live] if history is not None else None
                start = start[live]
            current = len(order)
            sess.tok[:current] = search.next_tokens[order]
            written = sess.slot_host - start[:current]
            if search.source_rows is not None:
                source = where[search.source_rows[order]]
                moved = (source != sess.rows[:current]).nonzero().flatten()
                if len(moved):
                    self._continue_beams(sess, history, moved, source[moved], start[moved], written[moved])
            if history is not None:
                history[sess.rows[:current], written] = sess.tok[:current]
            self._run_step(sess)
            sess.slot_host += 1
            if current == rows:
                full = sess.logits[:rows]
            else:
                full = torch.zeros((rows, sess.logits.shape[1]), device=self.device, dtype=sess.logits.dtype)
                full[order] = sess.logits[:current]
        nan[order] |= sess.nan[: len(order)]
        nan = nan.view(b, k).any(dim=1)
        if bool(nan.any()):
            self._cache.zero()  # as in generate: a masked NaN would poison later batches
        return DecodeOutput(tokens=search.result(), nan=nan, grows=self.grows - grows)

    def _continue_beams(self, sess: Session, history: torch.Tensor, rows: torch.Tensor, source: torch.Tensor,
                        start: torch.Tensor, written: torch.Tensor) -> None:  # fmt: skip
        """Beams in ``rows`` continue the beams in ``source`` (session rows of the same samples): give each the
        generated keys of its source. A row's generated keys are at slots ``start + j`` for ``j < written`` (per
        row; positions in the ring). The prompt's keys are the same in every beam of a sample, and so are the keys
        of generated tokens up to the first one where the two beams' histories differ (the same tokens after the
        same prompt), so only the keys from there on are copied: on the demo rewriter's beams 12% of the
        generated keys, where ``generate`` reorders the whole cache every step."""
        most = int(written.max()) if len(written) else 0
        if not most:
            return
        offsets = torch.arange(most, device=self.device).view(1, -1)
        valid = offsets < written.view(-1, 1)
        differs = (history[rows, :most] != history[source, :most]) & valid
        first = torch.where(differs.any(dim=1), differs.int().argmax(dim=1), written)
        at_row, at_pos = ((offsets >= first.view(-1, 1)) & valid).nonzero(as_tuple=True)
        self.beam_keys_copied += len(at_row)
        self.beam_keys_moved += int(written.sum())
        if len(at_row):
            dest, src = rows[at_row], source[at_row]
            pos = torch.remainder(start[at_row] + at_pos, sess.cache_len)
            for cache in (*sess.k, *sess.v):
                cache[dest, :, pos] = cache[src, :, pos]  # gathered before written: rows may swap
        history[rows, :most] = history[source, :most]

    @torch.inference_mode()
    def stream_search(self, fetch: Callable[[int], Admission | None], search: BeamSearch | Sampler, cache_len: int,
                      refill_at: int | None = None) -> Iterator[tuple[Any, list[int] | SearchState, bool]]:  # fmt: skip
        """Continuous batching for beam search and for single-row searches (sampling, n-gram constraints): keep
        up to ``search.batch`` samples (``search.width`` rows each) decoding and refill the rows of samples that
        finish.

        ``search``: a search made for streaming (``make_search`` with empty prompts and a span of at least
        ``cache_len``). ``fetch(k)`` returns up to ``k`` new samples (an ``Admission``: one prompt and its
        token limits per sample), or None when there are no more. Yields ``(key, result, nan)`` per sample as it
        leaves: ``result`` is its best hypothesis's token ids, the ones ``generate`` gives it (deterministic
        beams: the same tokens; sampled ones draw from one random stream for the whole run), or, for a sample
        whose next key would not fit its row of the ring, its search's state (a ``SearchState``), which
        ``search(..., resumed=)`` continues; ``nan``: its logits saw NaN.

        Each joining prompt is prefilled once into its sample's first row, ending at the current slot of the
        ring (as in ``stream``), and its keys are copied to the sample's other beams. After each step a beam
        that continues another beam takes that beam's generated keys where their histories differ."""
        k, samples = search.width, search.batch
        rows = samples * k
        sess = self._ring_session(rows, search.s.max_new_tokens, cache_len, [], search.pad_token_id, select=False)
        refill_at = max(1, refill_at or samples // 8)
        owner: list[Any] = [None] * samples
        room = [0] * samples  # tokens a sample can generate before its row of the ring is full
        start = torch.zeros(rows, dtype=torch.long, device=self.device)  # the slot of each row's first new key
        # beams only: per row, the generated tokens whose keys it holds (``_continue_beams``)
        history = torch.zeros((rows, sess.cache_len + 1), dtype=torch.long, device=self.device) if k > 1 else None
        logits = torch.zeros((rows, self.vocab), dtype=torch.float32, device=self.device)
        beams = torch.arange(k, device=self.device)

        def rows_of(groups: list[int]) -> torch.Tensor:
            return (torch.as_tensor(groups, dtype=torch.long, device=self.device).view(-1, 1) * k + beams).view(-1)

        exhausted = False
        while True:
            free = [g for g in range(samples) if owner[g] is None]
            if free and not exhausted and (len(free) >= refill_at or len(free) == samples):
                joining = fetch(len(free))
                if joining is None or not joining.keys:
                    exhausted = True
                else:
                    self._check_fits(joining, sess.cache_len, search.s.max_new_tokens, len(free), clipped=False)
                    taken = free[: len(joining.keys)]
                    at = torch.as_tensor(taken, dtype=torch.long, device=self.device)
                    joined = rows_of(taken)
                    logits[joined] = self._admit_beams(sess, at * k, joining, k).repeat_interleave(k, dim=0)
                    start[joined] = sess.slot_host
                    search.admit(at, joining.input_ids.to(self.device), joining.max_new, joining.min_new)
                    for g, key in zip(taken, joining.keys, strict=True):
                        owner[g], room[g] = key, sess.cache_len - joining.input_ids.shape[1]
            busy = [g for g in range(samples) if owner[g] is not None]
            if not busy:
                if exhausted:
                    return
                continue
            search.step(logits)
            done, generated = search.done().tolist(), search.gen.tolist()
            leaving = [g for g in busy if done[g] or generated[g] >= room[g]]
            if leaving:
                parked = rows_of(leaving)
                nan = sess.nan[parked].view(-1, k).any(dim=1).tolist()
                # park the rows: their span restarts at the slot, so idle steps read only fresh keys
                sess.pad_len[parked] = sess.slot
                bad = parked[sess.nan[parked]]
                if len(bad):  # 0 * NaN is NaN: a masked NaN left in a row's cache would poison its next prompt
                    for cache in (*sess.k, *sess.v, *sess.xk.values(), *sess.xv.values()):
                        cache[bad] = 0
                if sess.flex is not None:
                    sess.flex.start(sess.pad_len)
                ended = [g for g in leaving if done[g]]
                results = dict(zip(ended, search.tokens_of(ended), strict=True))
                for g, bad_row in zip(leaving, nan, strict=True):
                    key, owner[g] = owner[g], None
                    yield key, results[g] if g in results else search.export(g), bool(bad_row)
                search.retire(leaving)
                busy = [g for g in busy if owner[g] is not None]
                if not busy:
                    continue
            sess.tok[:rows] = search.next_tokens
            if history is not None:
                live = rows_of(busy)
                written = sess.slot_host - start[live]
                moving = search.source_rows[live] != live
                if bool(moving.any()):
                    moved = live[moving]
                    self._continue_beams(sess, history, moved, search.source_rows[moved], start[moved],
                                         written[moving])  # fmt: skip
                history[live, written] = sess.tok[live]
            self._run_step(sess)
            sess.slot_host += 1
            logits.copy_(sess.logits[:rows])

    def _admit_beams(self, sess: Session, first_rows: torch.Tensor, joining: Admission, k: int) -> torch.Tensor:
        """Prefill ``joining``'s prompts into ``first_rows`` of a running batch, ending at the current slot, and
        copy each one's keys and per-row state to the ``k - 1`` rows after it (its other beams); returns the
        prompts' last logits (samples, vocab)."""
        ids = joining.input_ids.to(self.device)
        n = ids.shape[1]
        logits = self._prefill(sess, ids, joining.attention_mask.to(self.device), joining.media.to(self.device),
                               rows=first_rows, offset=sess.slot_host - n)  # fmt: skip
        rows = (first_rows.view(-1, 1) + torch.arange(k, device=self.device)).view(-1)
        if k > 1:
            source = first_rows.repeat_interleave(k)
            pos = torch.remainder(sess.slot_host - n + torch.arange(n, device=self.device), sess.cache_len)
            for cache in (*sess.k, *sess.v):
                cache[rows.view(-1, 1), :, pos.view(1, -1)] = cache[source.view(-1, 1), :, pos.view(1, -1)]
            for t in (sess.pad_len, sess.has_media, *sess.xk.values(), *sess.xv.values()):
                t[rows] = t[source]
            if sess.media_last is not None:
                sess.media_last[rows] = sess.media_last[source]
        sess.nan[rows] = torch.isnan(logits).any(dim=-1).repeat_interleave(k)
        self._ensure_flex(sess)
        return logits
