"""The `answer` scorer: a QA rewrite must still say what the raw answer said.

PF-1M judged QA faithfulness with an NLI cross-encoder, which needs a large model. Most raw VQA answers are
one to four words ("3", "no", "top left"), and for those a plain check catches the worst failure of a weak
rewriter (answering a different question, flipping yes to no) at no cost, offline, before any model runs:
every word of the short answer must appear in the rewrite, numbers and number words being the same, and a
yes/no answer must keep its polarity. Longer raw answers (rationales, sentences) are left to `nli`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from filters.base import QA_TYPES, ScoreInput, Scorer, fmt, fmt_below, sql_fmt_below, sql_num, sql_str

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
_CANONICAL = {word: str(i) for i, word in enumerate(_NUMBER_WORDS)} | {
    "none": "0",
    "no": "no",
    "grey": "gray",
}
_NEGATIONS = frozenset(
    {"no", "not", "none", "nothing", "neither", "nor", "isn", "aren", "doesn", "don", "cannot"}
)
_FILLER = frozenset({"a", "an", "the", "of", "in", "on", "at", "is", "are", "it", "its", "to"})


def canonical_words(text: str) -> list[str]:
    """Lower-case word tokens with number words as digits ("three" -> "3")."""
    return [_CANONICAL.get(w, w) for w in _WORD.findall(text.lower())]


def answer_recall(raw: str, rewrite: str) -> tuple[float, dict[str, Any]]:
    """Share of the raw answer's words found in the rewrite; yes/no answers are judged by polarity."""
    answer = canonical_words(raw)
    words = canonical_words(rewrite)
    if answer in (["yes"], ["no"]):
        opening = words[:1]
        negated = bool(_NEGATIONS.intersection(words[:12]))  # the answer sits in the first clause
        said_yes = opening == ["yes"] or (opening != ["no"] and not negated)
        agrees = said_yes if answer == ["yes"] else not said_yes
        return (1.0 if agrees else 0.0), {
            "kind": "polarity",
            "answer": answer[0],
            "said": "yes" if said_yes else "no",
        }
    content = [w for w in answer if w not in _FILLER] or answer
    if not content:  # "?", "東京": no latin word or digit to look for; the cross-encoder can judge it
        return 1.0, {"kind": "deferred", "why": "raw answer has no latin word or digit; nli judges it"}
    present = set(words)
    missing = [w for w in content if w not in present]
    return 1.0 - len(missing) / len(content), {"kind": "words", "missing": missing}


class AnswerScorer(Scorer):
    """score = share of the short raw answer kept in the rewrite (1.0 = all of it); QA task types only."""

    name = "answer"
    applies_to = QA_TYPES
    rule_reads_details = True

    def identity(self) -> dict[str, Any]:
        return {"max_answer_words": self.settings.max_answer_words}

    def thresholds(self) -> dict[str, Any]:
        return {"min_recall": self.settings.min_recall}

    def threshold_value(self) -> float | None:
        return self.settings.min_recall

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        out: list[tuple[float | None, dict[str, Any]]] = []
        for item in items:
            n_words = len(item.raw_response.split())
            if n_words == 0 or n_words > self.settings.max_answer_words:
                out.append(
                    (1.0, {"kind": "deferred", "why": f"raw answer has {n_words} words; nli judges it"})
                )
                continue
            score, details = answer_recall(item.raw_response, item.rewrite)
            out.append((round(score, 6), details))
        return out

    def passes(self, score, details) -> bool:
        return score is not None and score >= self.settings.min_recall

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        if details.get("kind") == "polarity":
            return f"answer {details['answer']!r} flipped to {details['said']!r}"
        return f"answer {fmt_below(score, self.settings.min_recall)} < {fmt(self.settings.min_recall)} (missing: {', '.join(details.get('missing', []))})"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL AND {score} >= {sql_num(float(self.settings.min_recall))})"

    def reason_sql(self, score: str, details: str) -> str:
        kind = f"json_extract_string({details}, '$.kind')"
        missing = f"array_to_string(CAST(json_extract({details}, '$.missing') AS VARCHAR[]), ', ')"
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"WHEN {kind} = 'polarity' THEN 'answer ''' || json_extract_string({details}, '$.answer') "
            f"|| ''' flipped to ''' || json_extract_string({details}, '$.said') || '''' "
            f"ELSE 'answer ' || {sql_fmt_below(score, self.settings.min_recall)} || {sql_str(' < ' + fmt(self.settings.min_recall))} "
            f"|| ' (missing: ' || coalesce({missing}, '') || ')' END"
        )
