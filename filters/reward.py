"""Reward: OpenAssistant's DeBERTa reward model on (instruction, response), for the rewrite and the raw text.

``reward`` scores (instruction, rewrite); ``reward_raw`` scores (instruction, raw annotation), so the gain of
every rewrite is known. Both are annotation by default (the paper filters on other signals); ``min_score``
turns ``reward`` into a filter. Both share one loaded model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filters.base import ScoreInput, Scorer, fmt, fmt_below, sql_fmt_below, sql_num, strip_image_markers
from filters.models import classify_pairs, load_sequence_classifier


def reward_scores(
    settings: Any, runtime: Any, questions: Sequence[str], answers: Sequence[str]
) -> list[float]:
    model, tokenizer = load_sequence_classifier(settings.model, runtime)
    logits = classify_pairs(
        model,
        tokenizer,
        list(questions),
        list(answers),
        settings.batch_size,
        settings.max_length,
        runtime,
    )
    return [round(float(v), 6) for v in logits[:, 0]]


class RewardScorer(Scorer):
    name = "reward"
    uses_model = True
    target = "rewrite"

    def identity(self) -> dict[str, Any]:
        return {"model": self.settings.model, "max_length": self.settings.max_length}

    def thresholds(self) -> dict[str, Any]:
        return {"min_score": self.settings.min_score}

    def threshold_value(self) -> float | None:
        return self.settings.min_score

    def prepare(self) -> None:
        load_sequence_classifier(self.settings.model, self.runtime)

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        answers = [getattr(i, "rewrite" if self.target == "rewrite" else "raw_response") for i in items]
        scores = reward_scores(
            self.settings, self.runtime, [strip_image_markers(i.instruction) for i in items], answers
        )
        return [(s, {}) for s in scores]

    def passes(self, score, details) -> bool:
        return score is not None and (self.settings.min_score is None or score >= self.settings.min_score)

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"{self.name} {fmt_below(score, self.settings.min_score)} < {fmt(self.settings.min_score)}"

    def passes_sql(self, score: str, details: str) -> str:
        if self.settings.min_score is None:
            return f"({score} IS NOT NULL)"
        return f"({score} IS NOT NULL AND {score} >= {sql_num(float(self.settings.min_score))})"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE '{self.name} ' || {sql_fmt_below(score, self.settings.min_score)} || ' < {fmt(self.settings.min_score)}' END"
        )


class RawRewardScorer(RewardScorer):
    """The raw annotation's reward: never drops (it judges the input, not the rewrite)."""

    name = "reward_raw"
    target = "raw"

    def thresholds(self) -> dict[str, Any]:
        return {}

    def threshold_value(self) -> float | None:
        return None

    def passes(self, score, details) -> bool:
        return True

    def passes_sql(self, score: str, details: str) -> str:
        return "TRUE"
