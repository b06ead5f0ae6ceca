"""The cheap scorers (length, unchanged, repetition, truncated) and their rules in Python vs SQL."""

from __future__ import annotations

import json

import duckdb
import pytest

from filters.base import ScoreInput
from filters.chain import build_chain
from filters.text import LengthScorer, RepetitionScorer, TruncatedScorer, UnchangedScorer, count_tokens
from polite.config.filters import FilterSettings

S = FilterSettings()


def item(rewrite: str, raw: str = "a dog", task_type: str = "caption") -> ScoreInput:
    return ScoreInput(
        rewrite_id=f"r{abs(hash(rewrite)) % 10**8}", rewrite=rewrite, raw_response=raw, task_type=task_type
    )


def one(scorer, rewrite: str, raw: str = "a dog"):
    return scorer.score_batch([item(rewrite, raw)])[0]


def test_length_bounds_tokens_and_characters_on_both_ends():
    scorer = LengthScorer(S.length)
    assert count_tokens("Yes, it is.") == 5
    short = one(scorer, "Yes.")
    assert short.score == 2 and not short.passed
    assert scorer.reason(short.score, short.details) == "length 2 tokens < 4"
    ok = one(scorer, "Yes, there is a dog on the sofa.")
    assert ok.passed and ok.details == {"tokens": 10, "chars": 32}
    assert not one(scorer, "word " * 900).passed
    long_chars = one(
        LengthScorer(FilterSettings(length={"max_chars": 30}).length), "Yes, there is a dog on the sofa."
    )
    assert not long_chars.passed


def test_unchanged_catches_equal_and_near_equal_rewrites():
    scorer = UnchangedScorer(S.unchanged)
    same = one(scorer, "A dog on a couch!", "a dog on a couch")
    assert same.score == 1.0 and same.details["equal"] and not same.passed
    near = one(
        scorer,
        "A brown dog sleeps on a couch in the living room today",
        "a brown dog sleeps on a couch in the living room",
    )
    assert 0.9 < near.score < 1.0 and not near.passed
    rewritten = one(scorer, "The image shows a brown dog asleep on a comfortable couch.", "a dog on a couch")
    assert rewritten.passed and rewritten.score < 0.7


def test_repetition_flags_loops_not_normal_prose():
    scorer = RepetitionScorer(S.repetition)
    loop = one(scorer, "The dog is on the sofa. " * 6)
    assert loop.score > 0.8 and not loop.passed and loop.details["top"]["times"] >= 5
    prose = one(
        scorer, "The image shows a brown dog lying on a sofa. Next to it, a cat watches from the window sill."
    )
    assert prose.score == 0.0 and prose.passed


@pytest.mark.parametrize(
    ("text", "truncated"),
    [
        ("There is a dog on the sofa.", False),
        ("There is a dog on the sofa and", True),
        ("The dog is sitting on the...", True),
        ("Objects:\n- a dog\n- a sofa", False),
        ("The objects are:", True),
        ('He said "hello."', False),
    ],
)
def test_truncated(text, truncated):
    result = one(TruncatedScorer(S.truncated), text)
    assert (not result.passed) is truncated


def test_rules_in_sql_match_python_for_every_cheap_scorer():
    settings = FilterSettings(length={"min_tokens": 5, "max_chars": 60}, unchanged={"max_similarity": 0.8})
    chain = build_chain(settings, only=["length", "unchanged", "repetition", "truncated"])
    assert [s.name for s in chain.scorers] == ["length", "unchanged", "repetition", "truncated"]
    texts = [
        "Yes.",
        "A dog on a couch",
        "The image shows a dog lying on a couch, relaxed.",
        "The dog is brown. The dog is brown. The dog is brown.",
        "A very long sentence that certainly goes past the sixty character limit set here.",
        "It ends with...",
    ]
    con = duckdb.connect()
    for scorer in chain.scorers:
        for text in texts:
            r = one(scorer, text, "a dog on a couch")
            details = json.dumps(r.details)
            passed, reason = con.execute(
                f"SELECT {scorer.passes_sql('s', 'd')}, {scorer.reason_sql('s', 'd')} FROM (SELECT ?::DOUBLE AS s, ?::VARCHAR AS d)",
                [r.score, details],
            ).fetchone()
            assert passed == r.passed, (scorer.name, text)
            if not r.passed:
                assert reason == scorer.reason(r.score, r.details), (scorer.name, text)


def test_a_bad_item_fails_alone_and_is_counted():
    class Fussy(LengthScorer):
        def measure(self, items):
            if any("boom" in i.rewrite for i in items):
                raise RuntimeError("cannot score boom")
            return super().measure(items)

    scorer = Fussy(S.length)
    results = scorer.score_batch(
        [item("A fine sentence about a dog."), item("boom"), item("Another fine one here.")]
    )
    assert [r.passed for r in results] == [True, False, True]
    assert results[1].score is None and "cannot score boom" in results[1].details["error"]
    assert scorer.counts["errors"] == 1 and scorer.counts["scored"] == 3


def test_a_nan_score_is_an_error_row_that_python_and_sql_both_drop():
    from filters.semantic import SemanticScorer

    class NaNSemantic(SemanticScorer):
        def prepare(self):
            pass

        def measure(self, items):
            return [(float("nan"), {}) for _ in items]

    scorer = NaNSemantic(S.semantic, model_ref="none")
    (result,) = scorer.score_batch([item("A dog lies on a sofa.")])
    assert result.score is None and not result.passed and "non-finite" in result.details["error"]
    assert scorer.counts["errors"] == 1
    row = scorer.score_row(item("A dog lies on a sofa."), result, None)
    passed, reason = (
        duckdb.connect()
        .execute(
            f"SELECT {scorer.passes_sql('s', 'd')}, {scorer.reason_sql('s', 'd')} FROM (SELECT ?::DOUBLE AS s, ?::VARCHAR AS d)",
            [row["score"], row["details"]],
        )
        .fetchone()
    )
    assert passed is False and reason == scorer.reason(result.score, result.details)


def test_scorer_task_type_sets_match_the_sample_record():
    from filters import base
    from polite import record

    assert base._CAPTION_TYPES == record.CAPTION_TYPES and base._QA_TYPES == record.QA_TYPES


def test_rouge_is_the_rouge_l_f_measure_against_the_raw_annotation_and_drops_only_below_its_minimum():
    """'a dog on a sofa' vs 'A dog is on the sofa.': the longest common word subsequence is 'a dog on sofa'
    (4 words): precision 4/6, recall 4/5, F 0.727273."""
    from filters.text import RougeScorer
    from polite.config.filters import RougeSettings

    item = ScoreInput(rewrite_id="r", rewrite="A dog is on the sofa.", raw_response="a dog on a sofa")
    ((score, details),) = RougeScorer(RougeSettings()).measure([item])
    assert score == 0.727273 and details == {"precision": 0.666667, "recall": 0.8}
    assert RougeScorer(RougeSettings()).passes(score, details)  # no minimum: informational
    strict = RougeScorer(RougeSettings(min_score=0.8))
    assert not strict.passes(score, details) and strict.reason(score, details) == "rouge 0.73 < 0.80"
    # stemming changes the score ("dogs" meets "dog"), so it is part of the version; the minimum is not
    plural = ScoreInput(rewrite_id="r", rewrite="Two dogs sleep.", raw_response="two dog")
    assert RougeScorer(RougeSettings()).measure([plural])[0][0] == 0.8
    assert RougeScorer(RougeSettings(use_stemmer=False)).measure([plural])[0][0] == 0.4
    assert RougeScorer(RougeSettings()).version == strict.version != RougeScorer(RougeSettings(use_stemmer=False)).version


@pytest.mark.parametrize("score", [0.3, 0.399853, 0.39996, 0.4 - 1e-9])
def test_a_score_just_under_its_threshold_reads_under_it_in_python_and_sql(score):
    """Two digits made 0.399853 against 0.40 read "0.40 < 0.40": the reason shows the digits that tell them
    apart, the same in Python and SQL (thresholds are re-decided in SQL)."""
    from filters.reward import RewardScorer
    from filters.semantic import SemanticScorer
    from filters.text import RougeScorer

    settings = FilterSettings(semantic={"threshold": 0.4}, rouge={"min_score": 0.4}, reward={"min_score": 0.4})
    con = duckdb.connect()
    for scorer in (SemanticScorer(settings.semantic, model_ref="unused"), RougeScorer(settings.rouge),
                   RewardScorer(settings.reward)):  # fmt: skip
        reason = scorer.reason(score, {})
        sql = f"SELECT {scorer.reason_sql('s', 'NULL')} FROM (SELECT ?::DOUBLE AS s)"
        assert reason == con.execute(sql, [score]).fetchone()[0]
        shown = float(reason.split()[1])
        assert shown < 0.4 or reason.endswith("0.400000 < 0.40"), reason  # beyond 6 digits: as close as it gets
