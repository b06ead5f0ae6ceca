"""The `answer` scorer: short QA answers must survive the rewrite; yes/no by polarity; SQL rule = Python rule."""

from __future__ import annotations

import json

import duckdb
import pytest

from filters.answer import AnswerScorer, answer_recall
from filters.base import ScoreInput
from polite.config.filters import AnswerSettings


@pytest.mark.parametrize(
    ("raw", "rewrite", "score"),
    [
        ("no", "Yes, there is a yellow triangle in the bottom left corner of the image.", 0.0),
        ("no", "No, there is no blue circle in the image.", 1.0),
        ("no", "There is not a single red square in this picture.", 1.0),
        ("yes", "Yes, there is an orange square.", 1.0),
        ("yes", "No, the picture has no orange square.", 0.0),
        ("3", "There are three shapes in the image.", 1.0),
        ("three", "The picture shows 3 shapes.", 1.0),
        ("2", "There are three shapes.", 0.0),
        ("top left", "The red circle is in the top left corner of the image.", 1.0),
        ("top left", "The red circle is in the bottom left corner.", 0.5),
        ("the red ball", "It is a red ball.", 1.0),  # fillers ("the", "a") do not count
    ],
)
def test_answer_recall(raw, rewrite, score):
    assert answer_recall(raw, rewrite)[0] == pytest.approx(score)


def _item(raw: str, rewrite: str, task_type: str = "vqa") -> ScoreInput:
    return ScoreInput(
        rewrite_id=f"r_{raw}_{len(rewrite)}", rewrite=rewrite, raw_response=raw, task_type=task_type
    )


def test_scorer_applies_to_qa_only_and_defers_long_answers():
    scorer = AnswerScorer(AnswerSettings())
    assert scorer.applies(_item("no", "x")) and not scorer.applies(_item("no", "x", task_type="caption"))
    long_raw = "Answer: cigarette. He is smoking while riding the motorbike."
    ((score, details),) = scorer.measure([_item(long_raw, "The man holds a toothpick.")])
    assert score == 1.0 and details["kind"] == "deferred"


@pytest.mark.parametrize("raw", ["東京", "?", "—"])
def test_an_answer_without_latin_words_is_deferred_not_an_error(raw):
    scorer = AnswerScorer(AnswerSettings())
    (result,) = scorer.score_batch([_item(raw, "The answer is 東京, the capital.")])
    assert result.passed and result.score == 1.0 and result.details["kind"] == "deferred"
    assert scorer.counts["errors"] == 0


def test_sql_rule_and_reason_match_python():
    scorer = AnswerScorer(AnswerSettings(min_recall=1.0))
    items = [
        _item("no", "Yes, there is a yellow triangle."),
        _item("top left", "The circle is in the bottom left corner."),
        _item("3", "There are three shapes."),
    ]
    con = duckdb.connect()
    measured = scorer.measure(items)
    # the flipped yes/no and the wrong corner fail (their SQL reason is compared too), the count passes
    assert [scorer.passes(score, details) for score, details in measured] == [False, False, True]
    for score, details in measured:
        payload = json.dumps(details)
        sql_pass, sql_reason = con.execute(
            f"SELECT {scorer.passes_sql('s', 'd')}, {scorer.reason_sql('s', 'd')} FROM (SELECT ?::DOUBLE s, ?::VARCHAR d)",
            [score, payload],
        ).fetchone()
        assert sql_pass == scorer.passes(score, details)
        if not scorer.passes(score, details):
            assert sql_reason == scorer.reason(score, details)
    assert (
        scorer.reason(0.0, {"kind": "polarity", "answer": "no", "said": "yes"})
        == "answer 'no' flipped to 'yes'"
    )
