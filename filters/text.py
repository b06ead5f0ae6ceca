"""The cheap scorers: rouge, length, unchanged, repetition, truncated. Pure Python, no model, run first."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher
from typing import Any

from filters.base import ScoreInput, Scorer, fmt, fmt_below, require, sql_fmt_below, sql_num

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NON_WORD = re.compile(r"[^\w]+")


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free proxy, about 1.2 per English word like an LLM's BPE."""
    return len(_TOKEN.findall(text))


def normalise(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form, for near-equality."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


class LengthScorer(Scorer):
    """score = tokens; details carries tokens and characters; the rule bounds both, both ends."""

    name = "length"
    rule_reads_details = True

    def thresholds(self) -> dict[str, Any]:
        s = self.settings
        return {
            "min_tokens": s.min_tokens,
            "max_tokens": s.max_tokens,
            "min_chars": s.min_chars,
            "max_chars": s.max_chars,
        }

    def threshold_value(self) -> float | None:
        return float(self.settings.min_tokens)

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        out = []
        for item in items:
            tokens = count_tokens(item.rewrite)
            out.append((float(tokens), {"tokens": tokens, "chars": len(item.rewrite)}))
        return out

    def _why(self, tokens: int, chars: int) -> str | None:
        s = self.settings
        if tokens < s.min_tokens:
            return f"length {tokens} tokens < {s.min_tokens}"
        if tokens > s.max_tokens:
            return f"length {tokens} tokens > {s.max_tokens}"
        if chars < s.min_chars:
            return f"length {chars} chars < {s.min_chars}"
        if chars > s.max_chars:
            return f"length {chars} chars > {s.max_chars}"
        return None

    def passes(self, score, details) -> bool:
        return score is not None and self._why(details["tokens"], details["chars"]) is None

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return self._why(details["tokens"], details["chars"]) or "length ok"

    def _cols(self, details: str) -> tuple[str, str]:
        return (
            f"CAST(json_extract({details}, '$.tokens') AS BIGINT)",
            f"CAST(json_extract({details}, '$.chars') AS BIGINT)",
        )

    def passes_sql(self, score: str, details: str) -> str:
        s = self.settings
        tokens, chars = self._cols(details)
        return (
            f"({score} IS NOT NULL AND {tokens} BETWEEN {s.min_tokens} AND {s.max_tokens} "
            f"AND {chars} BETWEEN {s.min_chars} AND {s.max_chars})"
        )

    def reason_sql(self, score: str, details: str) -> str:
        s = self.settings
        tokens, chars = self._cols(details)
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"WHEN {tokens} < {s.min_tokens} THEN 'length ' || {tokens} || ' tokens < {s.min_tokens}' "
            f"WHEN {tokens} > {s.max_tokens} THEN 'length ' || {tokens} || ' tokens > {s.max_tokens}' "
            f"WHEN {chars} < {s.min_chars} THEN 'length ' || {chars} || ' chars < {s.min_chars}' "
            f"WHEN {chars} > {s.max_chars} THEN 'length ' || {chars} || ' chars > {s.max_chars}' "
            f"ELSE 'length ok' END"
        )


class RougeScorer(Scorer):
    """score = Rouge-L F-measure (0..1, longest common subsequence of words) of the rewrite against the raw
    annotation, by Google's ``rouge-score`` (the implementation summarisation papers report). PF-1M publishes it
    as ``rouge_score``; here it is stored for every rewrite scored and decides only with ``min_score``."""

    name = "rouge"
    _rouge: Any = None  # rouge_score's scorer, made at the first measure

    def identity(self) -> dict[str, Any]:
        return {"use_stemmer": self.settings.use_stemmer}

    def thresholds(self) -> dict[str, Any]:
        return {"min_score": self.settings.min_score}

    def threshold_value(self) -> float | None:
        return self.settings.min_score

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        if self._rouge is None:
            module = require("rouge_score.rouge_scorer", "rouge-score", self.name)
            self._rouge = module.RougeScorer(["rougeL"], use_stemmer=self.settings.use_stemmer)
        out = []
        for item in items:
            rouge_l = self._rouge.score(item.raw_response or "", item.rewrite or "")["rougeL"]
            out.append((round(rouge_l.fmeasure, 6), {"precision": round(rouge_l.precision, 6),
                                                     "recall": round(rouge_l.recall, 6)}))  # fmt: skip
        return out

    def passes(self, score, details) -> bool:
        minimum = self.settings.min_score
        return score is not None and (minimum is None or score >= minimum)

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"rouge {fmt_below(score, self.settings.min_score)} < {fmt(self.settings.min_score)}"

    def passes_sql(self, score: str, details: str) -> str:
        minimum = self.settings.min_score
        floor = "" if minimum is None else f" AND {score} >= {sql_num(float(minimum))}"
        return f"({score} IS NOT NULL{floor})"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE 'rouge ' || {sql_fmt_below(score, self.settings.min_score)} || ' < {fmt(self.settings.min_score)}' END"
        )


class UnchangedScorer(Scorer):
    """score = word-level similarity (difflib ratio, 0..1) of the normalised rewrite and raw annotation."""

    name = "unchanged"

    def thresholds(self) -> dict[str, Any]:
        return {"max_similarity": self.settings.max_similarity}

    def threshold_value(self) -> float | None:
        return self.settings.max_similarity

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        out = []
        for item in items:
            a, b = normalise(item.rewrite), normalise(item.raw_response)
            if a == b:
                out.append((1.0, {"equal": True}))
                continue
            # Words, not characters: as discriminating here and orders of magnitude cheaper on long texts.
            ratio = SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()
            out.append((round(ratio, 6), {"equal": False}))
        return out

    def passes(self, score, details) -> bool:
        return score is not None and score < self.settings.max_similarity

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"unchanged {fmt(score)} >= {fmt(self.settings.max_similarity)}"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL AND {score} < {sql_num(float(self.settings.max_similarity))})"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE 'unchanged ' || printf('%.2f', {score}) || ' >= {fmt(self.settings.max_similarity)}' END"
        )


class RepetitionScorer(Scorer):
    """score = max(share of words inside a repeated word n-gram, share of sentences repeating an earlier one).

    The rewriter's failure mode is a loop ("The dog is brown. The dog is brown. ..."): both shares go to 1.
    """

    name = "repetition"

    def identity(self) -> dict[str, Any]:
        return {"ngram": self.settings.ngram}

    def thresholds(self) -> dict[str, Any]:
        return {"max_fraction": self.settings.max_fraction}

    def threshold_value(self) -> float | None:
        return self.settings.max_fraction

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        n = self.settings.ngram
        out = []
        for item in items:
            words = [w.lower() for w in _WORD.findall(item.rewrite)]
            ngram_frac, top = 0.0, None
            if len(words) >= n:
                grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
                counts = Counter(grams)
                covered = [False] * len(words)
                for i, g in enumerate(grams):
                    if counts[g] > 1:
                        covered[i : i + n] = [True] * n
                ngram_frac = sum(covered) / len(words)
                gram, times = counts.most_common(1)[0]
                if times > 1:
                    top = {"ngram": " ".join(gram), "times": times}
            sentences = [normalise(s) for s in split_sentences(item.rewrite)]
            sentences = [s for s in sentences if s]
            sent_frac = (len(sentences) - len(set(sentences))) / len(sentences) if sentences else 0.0
            score = round(max(ngram_frac, sent_frac), 6)
            out.append(
                (
                    score,
                    {
                        "ngram_fraction": round(ngram_frac, 6),
                        "sentence_fraction": round(sent_frac, 6),
                        "top": top,
                    },
                )
            )
        return out

    def passes(self, score, details) -> bool:
        return score is not None and score <= self.settings.max_fraction

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"repetition {fmt(score)} > {fmt(self.settings.max_fraction)}"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL AND {score} <= {sql_num(float(self.settings.max_fraction))})"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE 'repetition ' || printf('%.2f', {score}) || ' > {fmt(self.settings.max_fraction)}' END"
        )


_LIST_ITEM = re.compile(r"^\s*([-*•]|\d+[.)])\s+\S")
_TERMINAL = tuple(".!?。！？\"'”’)]}`*|")


class TruncatedScorer(Scorer):
    """score = 1.0 when the rewrite ends with '...' or mid-sentence, else 0.0; details say which."""

    name = "truncated"
    rule_reads_details = True

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        out = []
        for item in items:
            text = item.rewrite.rstrip()
            if not text:
                out.append((1.0, {"why": "empty"}))
            elif text.endswith(("...", "…")):
                out.append((1.0, {"why": "ends with '...'"}))
            elif text.endswith(_TERMINAL):
                out.append((0.0, {"why": None}))
            elif _LIST_ITEM.match(text.rsplit("\n", 1)[-1]) and not text.endswith((",", ":", ";")):
                out.append((0.0, {"why": None}))  # a list may end without a full stop
            else:
                out.append((1.0, {"why": f"ends mid-sentence ({text[-12:]!r})"}))
        return out

    def passes(self, score, details) -> bool:
        return score is not None and score < 0.5

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"truncated: {details.get('why')}"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL AND {score} < 0.5)"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE 'truncated: ' || coalesce(json_extract_string({details}, '$.why'), 'None') END"
        )
