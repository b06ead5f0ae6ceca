"""Token selection for beam search and sampling on the device, with Hugging Face ``generate``'s semantics.

The fast decoder (models/fast_decode.py) computes each step's logits; the searches here turn them into the next
tokens, and for beams into the rows each beam continues from. The logits processors are Hugging Face's own
classes in ``generate``'s order (``logits_processors``); the two searches follow ``GenerationMixin._sample`` and
``GenerationMixin._beam_search`` step for step, so in exact arithmetic, with the same seed, they pick the same
tokens (tests/test_rewrite_search.py checks it against ``generate`` itself). Transformers has no public beam
search component to call: its beam search lives inside ``generate``'s loop, which owns the model call.

A search holds every sequence in a fixed (rows, prompt + max_new) buffer, so one search serves a whole batch
without reallocating; ``step`` reports when every row (or every beam group) is done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Hugging Face masks the score of a beam that must not continue by adding this, not -inf, so sums stay finite.
_NEG = -1.0e9


@dataclass(frozen=True)
class SearchSettings:
    """The decoding settings a search needs (see models.generation.resolve_generation for the rest)."""

    max_new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    length_penalty: float = 1.0

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SearchSettings:
        sampling = bool(settings.get("do_sample", False))
        return cls(
            max_new_tokens=int(settings["max_new_tokens"]),
            num_beams=int(settings.get("num_beams", 1)),
            do_sample=sampling,
            temperature=float(settings.get("temperature", 1.0)) if sampling else 1.0,
            top_k=int(settings.get("top_k", 0) or 0) if sampling else 0,
            top_p=float(settings.get("top_p", 1.0)) if sampling else 1.0,
            no_repeat_ngram_size=int(settings.get("no_repeat_ngram_size", 0) or 0),
            min_new_tokens=int(settings.get("min_new_tokens", 0) or 0),
            length_penalty=float(settings.get("length_penalty", 1.0)),
        )


def logits_processors(s: SearchSettings, prompt_len: int, eos_token_ids: Sequence[int], extra: Sequence = ()):
    """Hugging Face's processors for these settings, in ``generate``'s order: constraints, then ``extra``
    (a caller's own, as ``generate`` appends ``logits_processor=``), then the sampling warpers."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    eos = list(eos_token_ids)
    processors = LogitsProcessorList()
    if s.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if s.min_new_tokens > 0 and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, s.min_new_tokens, eos))
    processors.extend(extra)
    if s.do_sample:
        # generate keeps one candidate per end token plus one in every beam, so a beam can always go on
        keep = len(eos) + 1 if s.num_beams > 1 else 1
        if s.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            processors.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=keep))
        if s.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=keep))
    return processors


class TokenSearch(ABC):
    """What the decoder drives: ``step(logits)`` once per forward pass, until it returns True (all done);
    ``next_tokens`` (rows,) feed the next pass, ``source_rows`` (rows,) say which row's cache each row continues
    (None: its own); ``result()`` gives (batch, generated) token ids."""

    width: int  # rows per sample (beams)
    next_tokens: torch.Tensor
    source_rows: torch.Tensor | None = None

    def __init__(self, input_ids: torch.Tensor, s: SearchSettings, eos_token_ids: Sequence[int], pad_token_id: int,
                 processors) -> None:  # fmt: skip
        self.s = s
        self.batch, self.prompt_len = input_ids.shape
        self.max_length = self.prompt_len + s.max_new_tokens
        self.cur_len = self.prompt_len
        self.processors = processors
        self.pad_token_id = int(pad_token_id)
        self.device = input_ids.device
        self.eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=self.device)

    def _hits_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.isin(tokens, self.eos)

    @abstractmethod
    def step(self, logits: torch.Tensor) -> bool:
        """Pick the next tokens from this forward pass's logits (rows, vocab); True once every sample is done."""

    @abstractmethod
    def result(self) -> torch.Tensor:
        """(batch, generated) token ids, as ``generate`` returns them after the prompt."""

    @abstractmethod
    def live_samples(self) -> torch.Tensor:
        """(batch,) bool: samples whose result can still change. The others' rows may get any logits."""


class Sampler(TokenSearch):
    """One row per sample: ``generate``'s ``_sample`` (greedy with constraints, or multinomial sampling)."""

    width = 1

    def __init__(self, input_ids, s, eos_token_ids, pad_token_id, processors) -> None:
        super().__init__(input_ids, s, eos_token_ids, pad_token_id, processors)
        self.sequences = torch.full((self.batch, self.max_length), self.pad_token_id, dtype=torch.long,
                                    device=self.device)  # fmt: skip
        self.sequences[:, : self.prompt_len] = input_ids
        self.unfinished = torch.ones(self.batch, dtype=torch.long, device=self.device)

    def step(self, logits: torch.Tensor) -> bool:
        scores = self.processors(self.sequences[:, : self.cur_len], logits)
        if self.s.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if len(self.eos):
            tokens = tokens * self.unfinished + self.pad_token_id * (1 - self.unfinished)
        self.sequences[:, self.cur_len] = tokens
        self.cur_len += 1
        self.unfinished = self.unfinished & ~self._hits_eos(tokens)
        self.next_tokens = tokens
        return self.cur_len >= self.max_length or not bool(self.unfinished.any())

    def result(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len : self.cur_len]

    def live_samples(self) -> torch.Tensor:
        return self.unfinished.bool()


class BeamSearch(TokenSearch):
    """``num_beams`` rows per sample (beam ``j`` of sample ``i`` is row ``i * num_beams + j``): ``generate``'s
    ``_beam_search``, deterministic or sampled, with its length penalty and default early-stop heuristic
    (``early_stopping=False``)."""

    def __init__(self, input_ids, s, eos_token_ids, pad_token_id, processors) -> None:
        super().__init__(input_ids, s, eos_token_ids, pad_token_id, processors)
        b, k, dev = self.batch, s.num_beams, self.device
        self.width = k
        # one continuation per end token plus one, per beam: enough that num_beams of them can go on
        self.keep = max(2, 1 + len(self.eos)) * k
        # generate fills unwritten positions with pad_token_id "or" the first end token: pad id 0 is falsy
        fill = self.pad_token_id or (int(self.eos[0]) if len(self.eos) else -1)
        self.running = torch.full((b, k, self.max_length), fill, dtype=torch.long, device=dev)
        self.running[:, :, : self.prompt_len] = input_ids.view(b, 1, -1)
        self.sequences = self.running.clone()  # finished hypotheses, best first
        self.lengths = torch.zeros((b, k), dtype=torch.long, device=dev)  # their generated lengths
        # only beam 0 starts live, so the first step does not pick the same token in every beam
        self.running_scores = torch.zeros((b, k), dtype=torch.float, device=dev)
        self.running_scores[:, 1:] = _NEG
        self.scores = torch.full((b, k), _NEG, dtype=torch.float, device=dev)
        self.finished = torch.zeros((b, k), dtype=torch.bool, device=dev)
        self.may_improve = torch.ones((b, 1), dtype=torch.bool, device=dev)
        self.top_beams = torch.arange(self.keep, device=dev) < k
        self.row_offset = torch.arange(b, device=dev).view(b, 1) * k

    @staticmethod
    def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    def step(self, logits: torch.Tensor) -> bool:
        b, k, n = self.batch, self.s.num_beams, self.prompt_len
        cur = self.cur_len
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = self.processors(self.running[:, :, :cur].reshape(b * k, cur), log_probs)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(b, k, vocab) + self.running_scores[:, :, None]).view(b, k * vocab)

        # the best `keep` continuations over all beams of a sample (or `keep` drawn without replacement)
        if self.s.do_sample:
            picked = torch.multinomial(torch.softmax(log_probs, dim=-1), num_samples=self.keep)
            top_scores = torch.gather(log_probs, 1, picked)
            top_scores, order = top_scores.sort(dim=-1, descending=True)
            picked = picked.gather(-1, order)
        else:
            top_scores, picked = torch.topk(log_probs, k=self.keep)
        from_beam = picked // vocab
        candidates = self._gather(self.running, from_beam)
        candidates[:, :, cur] = picked % vocab
        stops = self._hits_eos(candidates[:, :, cur]) | (cur + 1 >= self.max_length)

        # the live beams of the next step: the best candidates that did not stop
        live_scores = top_scores + stops.to(torch.float32) * _NEG
        best = torch.topk(live_scores, k=k)[1]
        self.running = self._gather(candidates, best)
        self.running_scores = self._gather(live_scores, best)
        self.source_rows = (self._gather(from_beam, best) + self.row_offset).view(-1)
        self.next_tokens = self.running[:, :, cur].reshape(-1)

        # finished hypotheses: a stopped candidate among the top num_beams enters if it beats a kept one
        just_finished = stops & self.top_beams[None, :]
        final = top_scores / ((cur + 1 - n) ** self.s.length_penalty)
        final = final + (~self.may_improve).to(torch.float32) * _NEG
        final = final + (~just_finished) * _NEG
        all_scores = torch.cat((self.scores, final), dim=1)
        merged = torch.topk(all_scores, k=k)[1]
        self.sequences = self._gather(torch.cat((self.sequences, candidates), dim=1), merged)
        self.scores = self._gather(all_scores, merged)
        new_lengths = torch.full_like(final, cur + 1 - n, dtype=torch.long)
        self.lengths = self._gather(torch.cat((self.lengths, new_lengths), dim=1), merged)
        self.finished = self._gather(torch.cat((self.finished, just_finished), dim=1), merged)

        self.cur_len = cur = cur + 1
        # generate's default heuristic: stop a sample once its best live beam, at the current length, cannot
        # beat its worst finished hypothesis
        best_live = self.running_scores[:, :1] / ((cur - n) ** self.s.length_penalty)
        worst_done = torch.where(self.finished, torch.min(self.scores, dim=1, keepdim=True)[0], _NEG)
        self.may_improve = self.may_improve & torch.any(best_live > worst_done, dim=-1, keepdim=True)
        return not bool(self.may_improve.any() & ~stops.all())

    def live_samples(self) -> torch.Tensor:
        # a sample that cannot improve has its finished hypotheses frozen (their scores get -1e9 added)
        return self.may_improve.view(-1)

    def result(self) -> torch.Tensor:
        """The best hypothesis of each sample, as ``generate`` returns it (cut to the longest one's length)."""
        longest = int(self.lengths[:, 0].max())
        return self.sequences[:, 0, self.prompt_len : self.prompt_len + longest]


def make_search(input_ids: torch.Tensor, s: SearchSettings, eos_token_ids: Sequence[int], pad_token_id: int,
                extra_processors: Sequence = ()) -> TokenSearch:  # fmt: skip
    """The search for these settings over a left-padded batch of prompts ``input_ids`` (batch, prompt_len)."""
    processors = logits_processors(s, input_ids.shape[1], eos_token_ids, extra_processors)
    cls = BeamSearch if s.num_beams > 1 else Sampler
    return cls(input_ids, s, eos_token_ids, pad_token_id, processors)
