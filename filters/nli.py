"""NLI: does the rewrite contradict the raw answer? A cross-encoder on METHOD.md's premise/hypothesis pair.

premise    = '"{rewrite}" is the answer to the question: "{question}"'
hypothesis = '"{original}" is the answer to the question: "{question}"'

score = P(entailment) - P(contradiction), in [-1, 1]; details hold all three probabilities. The sample is
dropped when contradiction is strictly the most probable label (and, optionally, when score < min_score).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filters.base import (
    QA_TYPES,
    ScoreInput,
    Scorer,
    fmt,
    fmt_below,
    sql_fmt_below,
    sql_num,
    strip_image_markers,
)
from filters.models import classify_pairs, load_sequence_classifier

LABELS = ("entailment", "neutral", "contradiction")


def nli_pair(rewrite: str, original: str, instruction: str) -> tuple[str, str]:
    question = strip_image_markers(instruction)
    return (
        f'"{rewrite}" is the answer to the question: "{question}"',
        f'"{original}" is the answer to the question: "{question}"',
    )


def label_columns(id2label: dict[int, str]) -> dict[str, int]:
    """Map our label names to the model's logit columns (cross-encoder/nli-deberta-v3-base: 0 contradiction,
    1 entailment, 2 neutral), matching on the config's names so another NLI model's order works too."""
    found: dict[str, int] = {}
    for idx, label in id2label.items():
        name = str(label).lower()
        for ours in LABELS:
            if name.startswith(ours[:6]):
                found[ours] = int(idx)
    if len(found) != 3:
        raise ValueError(f"NLI model labels {id2label} do not name entailment, neutral and contradiction")
    return found


class NLIScorer(Scorer):
    name = "nli"
    rule_reads_details = True
    applies_to = QA_TYPES
    uses_model = True

    def identity(self) -> dict[str, Any]:
        return {"model": self.settings.model, "max_length": self.settings.max_length}

    def thresholds(self) -> dict[str, Any]:
        return {"drop_on": "contradiction", "min_score": self.settings.min_score}

    def threshold_value(self) -> float | None:
        return self.settings.min_score

    def prepare(self) -> None:
        load_sequence_classifier(self.settings.model, self.runtime)

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        import torch

        model, tokenizer = load_sequence_classifier(self.settings.model, self.runtime)
        cols = label_columns(model.config.id2label)
        pairs = [nli_pair(i.rewrite, i.raw_response, i.instruction) for i in items]
        logits = classify_pairs(
            model,
            tokenizer,
            [p for p, _ in pairs],
            [h for _, h in pairs],
            self.settings.batch_size,
            self.settings.max_length,
            self.runtime,
        )
        probs = torch.from_numpy(logits).softmax(-1).numpy()
        out = []
        for row in probs:
            p = {name: round(float(row[cols[name]]), 6) for name in LABELS}
            label = max(LABELS, key=lambda name: p[name])
            out.append((round(p["entailment"] - p["contradiction"], 6), {**p, "label": label}))
        return out

    def _contradiction(self, details: dict[str, Any]) -> bool:
        c = details["contradiction"]
        return c > details["entailment"] and c > details["neutral"]

    def passes(self, score, details) -> bool:
        if score is None or self._contradiction(details):
            return False
        return self.settings.min_score is None or score >= self.settings.min_score

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        if self._contradiction(details):
            return f"nli contradiction {fmt(details['contradiction'])}"
        return f"nli {fmt_below(score, self.settings.min_score)} < {fmt(self.settings.min_score)}"

    def _probs_sql(self, details: str) -> tuple[str, str, str]:
        return tuple(f"CAST(json_extract({details}, '$.{name}') AS DOUBLE)" for name in LABELS)  # type: ignore[return-value]

    def passes_sql(self, score: str, details: str) -> str:
        e, n, c = self._probs_sql(details)
        rule = f"{score} IS NOT NULL AND NOT ({c} > {e} AND {c} > {n})"
        if self.settings.min_score is not None:
            rule += f" AND {score} >= {sql_num(float(self.settings.min_score))}"
        return f"({rule})"

    def reason_sql(self, score: str, details: str) -> str:
        e, n, c = self._probs_sql(details)
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"WHEN {c} > {e} AND {c} > {n} THEN 'nli contradiction ' || printf('%.2f', {c}) "
            f"ELSE 'nli ' || {sql_fmt_below(score, self.settings.min_score)} || ' < {fmt(self.settings.min_score)}' END"
        )
