"""Token selection for beam search and sampling on the device, with Hugging Face ``generate``'s semantics.

The fast decoder (models/fast_decode.py) computes each step's logits; the searches here turn them into the next
tokens, and for beams into the rows each beam continues from. The logits processors are Hugging Face's own
classes in ``generate``'s order (``logits_processors``); the two searches follow ``GenerationMixin._sample`` and
``GenerationMixin._beam_search`` step for step, so in exact arithmetic, with the same seed, they pick the same
tokens (tests/test_rewrite_search.py checks it against ``generate`` itself). Transformers has no public beam
search component to call: its beam search lives inside ``generate``'s loop, which owns the model call.

A search holds every sequence right-aligned in a fixed (rows, span) buffer, so one search serves a whole batch
without reallocating; ``step`` reports when every row (or every beam group) is done. Both searches count each
sample's tokens and limits apart, so samples can join and leave a running search (continuous batching,
``FastFlamingoDecoder.stream_search``) and carry their state to another (``export``, ``restore``).
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


def logits_processors(s: SearchSettings, prompt_len: int, eos_token_ids: Sequence[int], extra: Sequence = (),
                      min_new=None):  # fmt: skip
    """Hugging Face's processors for these settings, in ``generate``'s order: constraints, then ``extra``
    (a caller's own, as ``generate`` appends ``logits_processor=``), then the sampling warpers. ``min_new``:
    the minimum-length processor to use instead of Hugging Face's (which counts from ``prompt_len``)."""
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
        processors.append(min_new or MinNewTokensLengthLogitsProcessor(prompt_len, s.min_new_tokens, eos))
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


class SampleSearch(TokenSearch):
    """A search whose samples join (``admit``), leave (``retire``) and carry their state elsewhere (``export``,
    ``restore``) at different steps: each keeps its own count of generated tokens and its own limits, and its
    tokens right-aligned in ``span`` columns, so every history ends in the same column whatever its prompt
    length and age. ``FastFlamingoDecoder.stream_search`` streams such a search."""

    def _per_sample(self, span: int | None) -> None:
        b, dev = self.batch, self.device
        self.span = span or self.max_length
        self.gen = torch.zeros(b, dtype=torch.long, device=dev)  # tokens generated so far, per sample
        self.max_new = torch.full((b,), self.s.max_new_tokens, dtype=torch.long, device=dev)
        self.min_new = torch.full((b,), self.s.min_new_tokens, dtype=torch.long, device=dev)
        self._tokens_host = [0] * b  # prompt + generated tokens per sample (the columns the processors read)
        self._active_host = [False] * b

    def _join(self, samples: Sequence[int], tokens: int, what: str, generated: int = 0,
              max_new: Sequence[int] | None = None, min_new: Sequence[int] | int | None = None) -> None:  # fmt: skip
        """The bookkeeping of ``samples`` starting with ``tokens`` tokens (``generated`` of them written);
        per-sample limits default to the settings'."""
        if tokens > self.span:
            raise ValueError(f"a {what} of {tokens} tokens does not fit a search of span {self.span}")
        for name, value, default in (("max_new", max_new, self.s.max_new_tokens),
                                     ("min_new", min_new, self.s.min_new_tokens)):  # fmt: skip
            limit = default if value is None else torch.as_tensor(value, dtype=torch.long, device=self.device)
            getattr(self, name)[samples] = limit
        self.gen[samples] = generated
        for i in samples:
            self._tokens_host[i], self._active_host[i] = tokens, True

    def admit(self, samples: torch.Tensor, input_ids: torch.Tensor, max_new: Sequence[int] | None = None,
              min_new: Sequence[int] | None = None) -> None:  # fmt: skip
        """Start ``samples`` (indices) afresh with these left-padded prompts and per-sample limits (default: the
        settings'). Their first ``step`` reads the logits after their prompts."""
        self._join(samples.tolist(), input_ids.shape[1], "prompt", max_new=max_new, min_new=min_new)
        self._start(samples, input_ids)

    @abstractmethod
    def _start(self, samples: torch.Tensor, input_ids: torch.Tensor) -> None:
        """The search's own state for ``samples`` starting with these prompts."""

    def _columns(self) -> int:
        """The columns the processors read: the longest live history (``generate``'s ``input_ids`` width)."""
        return max((t for t, live in zip(self._tokens_host, self._active_host, strict=True) if live), default=1)

    def retire(self, samples: Sequence[int]) -> None:
        """Samples whose results were taken: their rows are free, and the processors stop reading them."""
        for i in samples:
            self._active_host[i] = False


class SearchState:
    """One sample's search between two steps (``export``), enough to go on elsewhere (``restore``)."""

    generated: int
    prompt_tokens: int
    min_new: int

    def histories(self) -> torch.Tensor:
        """(rows, generated): each row's (beam's) generated tokens."""
        raise NotImplementedError


@dataclass
class RowState(SearchState):
    """A single-row search's sample between two steps (``Sampler.export``): its prompt and generated tokens,
    (1, tokens), and its counters. Sampling keeps no other state: its random stream is the process's."""

    tokens: torch.Tensor
    generated: int
    prompt_tokens: int
    min_new: int

    def histories(self) -> torch.Tensor:
        return self.tokens[:, self.tokens.shape[1] - self.generated :]


class Sampler(SampleSearch):
    """One row per sample: ``generate``'s ``_sample`` (greedy with constraints, or multinomial sampling). For a
    batch that starts together the processors read exactly ``generate``'s ``input_ids``."""

    width = 1

    def __init__(self, input_ids, s, eos_token_ids, pad_token_id, processors, span: int | None = None) -> None:
        """A batch whose samples start now with the prompts ``input_ids`` (left-padded); an empty ``input_ids`` of
        shape (samples, 0) with ``span`` makes room for samples that ``admit`` adds later."""
        super().__init__(input_ids, s, eos_token_ids, pad_token_id, processors)
        b, dev = self.batch, self.device
        self._per_sample(span)
        self.sequences = torch.full((b, self.span), self.pad_token_id, dtype=torch.long, device=dev)
        self.unfinished = torch.zeros(b, dtype=torch.bool, device=dev)
        self.tail = torch.zeros(b, dtype=torch.long, device=dev)  # per sample, steps since it finished
        if input_ids.shape[1]:
            self.admit(torch.arange(b, device=dev), input_ids)

    def _start(self, samples: torch.Tensor, input_ids: torch.Tensor) -> None:
        n = input_ids.shape[1]
        self.sequences[samples] = self.pad_token_id
        self.sequences[samples, self.span - n :] = input_ids
        self.tail[samples] = 0
        self.unfinished[samples] = self.max_new[samples] > 0

    def export(self, sample: int) -> RowState:
        """Sample ``sample``'s state after a ``step`` (its next token picked, not yet fed to the model)."""
        width = self._tokens_host[sample]
        generated = int(self.gen[sample])
        return RowState(tokens=self.sequences[sample, self.span - width :].view(1, -1).clone(),
                        generated=generated, prompt_tokens=width - generated,
                        min_new=int(self.min_new[sample]))  # fmt: skip

    def restore(self, samples: Sequence[int], states: Sequence[RowState]) -> None:
        """Go on with exported states in ``samples``: their next ``step`` reads the logits after each sample's
        prompt and tokens (a prefill of both). ``max_new_tokens`` still counts from its first generated token."""
        for i, st in zip(samples, states, strict=True):
            width = st.tokens.shape[1]
            self._join([i], width, "state", generated=st.generated, min_new=st.min_new)
            self.sequences[i] = self.pad_token_id
            self.sequences[i, self.span - width :] = st.tokens[0]
            self.tail[i] = 0
            self.unfinished[i] = st.generated < self.s.max_new_tokens

    def retire(self, samples: Sequence[int]) -> None:
        super().retire(samples)
        self.unfinished[list(samples)] = False

    def step(self, logits: torch.Tensor) -> bool:
        # generate's input_ids: every sample's prompt and tokens, shorter histories left-filled with padding
        scores = self.processors(self.sequences[:, self.span - self._columns() :], logits)
        if self.s.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        # a finished sample gets padding, as in generate (where every sample's limit is the same)
        tokens = torch.where(self.unfinished, tokens, self.pad_token_id)
        self.sequences = torch.cat((self.sequences[:, 1:], tokens.view(-1, 1)), dim=1)
        self.gen += self.unfinished  # the tokens it wrote, its end token included
        self.tail += ~self.unfinished  # ... and the padding after them
        self.unfinished &= ~self._hits_eos(tokens) & (self.gen < self.max_new)
        self.next_tokens = tokens
        self.cur_len += 1
        self._tokens_host = [t + 1 for t in self._tokens_host]
        return not bool(self.unfinished.any())

    def done(self) -> torch.Tensor:
        """(batch,) bool: samples whose result is final (an end token, or their limit)."""
        return ~self.unfinished

    def live_samples(self) -> torch.Tensor:
        return self.unfinished.clone()

    def tokens_of(self, samples: Sequence[int]) -> list[list[int]]:
        """Each sample's generated token ids."""
        ends = (self.span - self.tail[list(samples)]).tolist()
        gen = self.gen[list(samples)].tolist()
        rows = self.sequences[list(samples)].tolist()
        return [row[end - n : end] for row, n, end in zip(rows, gen, ends, strict=True)]

    def result(self) -> torch.Tensor:
        """(batch, generated) ids, padded after each sample's end, as ``generate`` returns them; a restored
        sample's include the tokens it wrote before."""
        longest = int(self.gen.max()) if self.batch else 0
        offsets = torch.arange(longest, device=self.device).view(1, -1)
        index = (self.span - self.tail - self.gen).view(-1, 1) + offsets
        picked = self.sequences.gather(1, index.clamp(max=self.span - 1))
        return picked.masked_fill(offsets >= self.gen.view(-1, 1), self.pad_token_id)


@dataclass
class BeamState(SearchState):
    """One sample's beam search between two steps (``BeamSearch.export``), enough to go on elsewhere
    (``BeamSearch.restore``): its beams' sequences (prompt and generated tokens, right-aligned, (k, tokens)) and
    scores, its finished hypotheses, and its counters."""

    running: torch.Tensor
    running_scores: torch.Tensor
    sequences: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    may_improve: bool
    generated: int
    prompt_tokens: int
    min_new: int

    def histories(self) -> torch.Tensor:
        """(k, generated) each beam's generated tokens."""
        return self.running[:, self.running.shape[1] - self.generated :]


class PerSampleMinNewTokens:
    """``generate``'s minimum-length rule (no end token before ``min_new_tokens`` new ones), counted per sample.

    Hugging Face's ``MinNewTokensLengthLogitsProcessor`` counts new tokens from one prompt length shared by the
    batch; in a stream (``BeamSearch.admit``) samples join at different steps, so the count comes from the
    search. Same effect for a batch that starts together: the end tokens' scores become -inf."""

    def __init__(self, search: SampleSearch) -> None:
        self.search = search

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.search
        short = (s.gen < s.min_new).repeat_interleave(s.width)
        is_eos = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        is_eos[s.eos] = True
        return scores.masked_fill(short.view(-1, 1) & is_eos.view(1, -1), -float("inf"))


class BeamSearch(SampleSearch):
    """``num_beams`` rows per sample (beam ``j`` of sample ``i`` is row ``i * num_beams + j``): ``generate``'s
    ``_beam_search``, deterministic or sampled, with its length penalty and default early-stop heuristic
    (``early_stopping=False``).

    Each sample keeps its own count of generated tokens and its own limits, so samples may join (``admit``) and
    finish (``done``) at different steps: ``FastFlamingoDecoder.stream_search`` refills the rows of finished
    samples (continuous batching). Sequences are kept right-aligned in ``span`` columns (the newest token last),
    so every sample's history ends in the same column whatever its prompt length and age."""

    def __init__(self, input_ids, s, eos_token_ids, pad_token_id, processors, span: int | None = None) -> None:
        """A batch whose samples all start now with the prompts ``input_ids`` (left-padded); an empty
        ``input_ids`` of shape (samples, 0) with ``span`` (the longest prompt plus new tokens any sample may
        have) makes room for samples that ``admit`` adds later."""
        super().__init__(input_ids, s, eos_token_ids, pad_token_id, processors)
        b, k, dev = self.batch, s.num_beams, self.device
        self.width = k
        self._per_sample(span)
        # one continuation per end token plus one, per beam: enough that num_beams of them can go on
        self.keep = max(2, 1 + len(self.eos)) * k
        # generate fills unwritten positions with pad_token_id "or" the first end token: pad id 0 is falsy
        self.fill = self.pad_token_id or (int(self.eos[0]) if len(self.eos) else -1)
        self.running = torch.full((b, k, self.span), self.fill, dtype=torch.long, device=dev)
        self.sequences = self.running.clone()  # finished hypotheses, best first (right-aligned when they ended)
        self.lengths = torch.zeros((b, k), dtype=torch.long, device=dev)  # their generated lengths
        self.running_scores = torch.zeros((b, k), dtype=torch.float, device=dev)
        self.scores = torch.full((b, k), _NEG, dtype=torch.float, device=dev)
        self.finished = torch.zeros((b, k), dtype=torch.bool, device=dev)
        self.may_improve = torch.zeros((b, 1), dtype=torch.bool, device=dev)
        self.top_beams = torch.arange(self.keep, device=dev) < k
        self.row_offset = torch.arange(b, device=dev).view(b, 1) * k
        if input_ids.shape[1]:
            self.admit(torch.arange(b, device=dev), input_ids)

    def _start(self, samples: torch.Tensor, input_ids: torch.Tensor) -> None:
        n = input_ids.shape[1]
        self.running[samples] = self.fill
        self.running[samples, :, self.span - n :] = input_ids.view(len(samples), 1, n)
        self.sequences[samples] = self.running[samples]
        self.lengths[samples] = 0
        # only beam 0 starts live, so the first step does not pick the same token in every beam
        self.running_scores[samples] = 0.0
        self.running_scores[samples, 1:] = _NEG
        self.scores[samples] = _NEG
        self.finished[samples] = False
        self.may_improve[samples] = True

    def export(self, sample: int) -> BeamState:
        """Sample ``sample``'s state after a ``step`` (its next tokens picked, not yet fed to the model)."""
        width = self._tokens_host[sample]
        return BeamState(
            running=self.running[sample, :, self.span - width :].clone(),
            running_scores=self.running_scores[sample].clone(),
            sequences=self.sequences[sample, :, self.span - width :].clone(),
            scores=self.scores[sample].clone(),
            lengths=self.lengths[sample].clone(),
            finished=self.finished[sample].clone(),
            may_improve=bool(self.may_improve[sample]),
            generated=int(self.gen[sample]),
            prompt_tokens=width - int(self.gen[sample]),
            min_new=int(self.min_new[sample]),
        )

    def restore(self, samples: Sequence[int], states: Sequence[BeamState]) -> None:
        """Go on with exported states in ``samples``: their next ``step`` reads the logits after each beam's
        sequence (a prefill of prompt + history per beam). The settings' ``max_new_tokens`` still counts from
        each sample's first generated token."""
        for i, st in zip(samples, states, strict=True):
            width = st.running.shape[1]
            self._join([i], width, "state", generated=st.generated, min_new=st.min_new)
            self.running[i] = self.fill
            self.running[i, :, self.span - width :] = st.running
            self.sequences[i] = self.fill
            self.sequences[i, :, self.span - width :] = st.sequences
            self.running_scores[i] = st.running_scores
            self.scores[i] = st.scores
            self.lengths[i] = st.lengths
            self.finished[i] = st.finished
            self.may_improve[i] = st.may_improve

    @staticmethod
    def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    def _penalty(self, generated: torch.Tensor) -> torch.Tensor:
        """``generate``'s length-penalty divisor for sequences of ``generated`` new tokens, (b, 1): computed in
        double and rounded to float, as Python computes ``length ** length_penalty`` there."""
        return (generated.double() ** self.s.length_penalty).float().view(-1, 1)

    def step(self, logits: torch.Tensor) -> bool:
        b, k = self.batch, self.s.num_beams
        # the processors read each sample's prompt and generated tokens (samples with shorter histories see
        # fill tokens before theirs, as left padding; in a batch that started together, there are none)
        cols = self._columns()
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = self.processors(self.running[:, :, self.span - cols :].reshape(b * k, cols), log_probs)
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
        candidates = torch.cat((candidates[:, :, 1:], (picked % vocab).unsqueeze(-1)), dim=-1)
        generated = self.gen + 1
        stops = self._hits_eos(candidates[:, :, -1]) | (generated >= self.max_new).view(b, 1)

        # the live beams of the next step: the best candidates that did not stop
        live_scores = top_scores + stops.to(torch.float32) * _NEG
        best = torch.topk(live_scores, k=k)[1]
        self.running = self._gather(candidates, best)
        self.running_scores = self._gather(live_scores, best)
        self.source_rows = (self._gather(from_beam, best) + self.row_offset).view(-1)
        self.next_tokens = self.running[:, :, -1].reshape(-1)

        # finished hypotheses: a stopped candidate among the top num_beams enters if it beats a kept one
        penalty = self._penalty(generated)
        just_finished = stops & self.top_beams[None, :]
        final = top_scores / penalty
        final = final + (~self.may_improve).to(torch.float32) * _NEG
        final = final + (~just_finished) * _NEG
        all_scores = torch.cat((self.scores, final), dim=1)
        merged = torch.topk(all_scores, k=k)[1]
        self.sequences = self._gather(torch.cat((self.sequences, candidates), dim=1), merged)
        self.scores = self._gather(all_scores, merged)
        new_lengths = generated.view(b, 1).expand_as(final)
        self.lengths = self._gather(torch.cat((self.lengths, new_lengths), dim=1), merged)
        self.finished = self._gather(torch.cat((self.finished, just_finished), dim=1), merged)

        self.gen = generated
        self.cur_len += 1
        self._tokens_host = [t + 1 for t in self._tokens_host]
        # generate's default heuristic: stop a sample once its best live beam, at the current length, cannot
        # beat its worst finished hypothesis
        best_live = self.running_scores[:, :1] / penalty
        worst_done = torch.where(self.finished, torch.min(self.scores, dim=1, keepdim=True)[0], _NEG)
        self.may_improve = self.may_improve & torch.any(best_live > worst_done, dim=-1, keepdim=True)
        return bool(self.done().all())

    def done(self) -> torch.Tensor:
        """(batch,) bool: samples whose result is final (it cannot improve, or it reached its limit)."""
        return ~self.may_improve.view(-1) | (self.gen >= self.max_new)

    def live_samples(self) -> torch.Tensor:
        # a sample that cannot improve has its finished hypotheses frozen (their scores get -1e9 added)
        return ~self.done()

    def tokens_of(self, samples: Sequence[int]) -> list[list[int]]:
        """Each sample's best hypothesis: its generated token ids."""
        lengths = self.lengths[list(samples), 0].tolist()
        best = self.sequences[list(samples), 0].tolist()
        return [row[self.span - n :] if n else [] for row, n in zip(best, lengths, strict=True)]

    def result(self) -> torch.Tensor:
        """The best hypothesis of each sample, as ``generate`` returns it (cut to the longest one's length; the
        shorter ones filled after their end)."""
        lengths = self.lengths[:, 0]
        longest = int(lengths.max())
        offsets = torch.arange(longest, device=self.device).view(1, -1)
        index = (self.span - lengths).view(-1, 1) + offsets
        picked = self.sequences[:, 0].gather(1, index.clamp(max=self.span - 1))
        return picked.masked_fill(offsets >= lengths.view(-1, 1), self.fill)


def make_search(input_ids: torch.Tensor, s: SearchSettings, eos_token_ids: Sequence[int], pad_token_id: int,
                extra_processors: Sequence = (), span: int | None = None) -> TokenSearch:  # fmt: skip
    """The search for these settings over a left-padded batch of prompts ``input_ids`` (batch, prompt_len); an
    empty (samples, 0) ``input_ids`` and a ``span`` give a search that samples join later (``admit``)."""
    kind = Sampler if s.num_beams == 1 else BeamSearch
    search = kind(input_ids, s, eos_token_ids, pad_token_id, None, span=span)
    search.processors = logits_processors(s, input_ids.shape[1], eos_token_ids, extra_processors,
                                          min_new=PerSampleMinNewTokens(search))  # fmt: skip
    return search
