"""The three distortion methods on inline fixtures: properties of their output, and determinism."""

from __future__ import annotations

import json
import random

import pytest

from polite.config import ConfigError, parse_config
from polite.config.distort import AugmentSettings, DistortSettings
from polite.formats import BOX_EXPLANATION, parse_captions_and_boxes
from tasks.distort.augment import augment_text, distort_augment, keep_first, sentence_spans
from tasks.distort.defects import DEFECTS
from tasks.distort.prompting import build_conversation, draw_defect, load_template, parse_reply
from tasks.distort.record import variant_for
from tasks.distort.retrieve import distort_retrieve

RESPONSE = (
    "The image shows a busy street with several cars parked along the curb. A man in a red jacket, "
    "about 3.5 m away, is walking a small dog near the corner! Is the dog on a leash? Yes, it is.\n"
    "There are two tall trees.\n\n- A bus stop.\n- A wooden bench."
)


def row(i: int = 0, response: str = RESPONSE, meta: dict | None = None) -> dict:
    return {
        "sample_id": f"s_fixture_{i}",
        "instruction": "<image>\nDescribe the image in detail.",
        "raw_response": response,
        "meta": json.dumps(meta or {}),
    }


# -- method 2: augment ------------------------------------------------------------------------------------
def test_keep_first_keeps_a_prefix_of_whole_sentences():
    spans = sentence_spans(RESPONSE)
    assert len(spans) == 7  # "3.5" is not a sentence end; line breaks are
    for k in range(1, len(spans)):
        kept = keep_first(RESPONSE, k)
        assert RESPONSE.startswith(kept)
        assert len(sentence_spans(kept)) == k
        assert kept.rstrip()[-1] in ".!?"


def test_each_step_fires_about_half_the_time_and_both_branches_are_hit():
    settings = AugmentSettings(max_redraws=0)  # the raw coin flips, before unchanged draws are drawn again
    fired = {"keep_first": 0, "shuffle": 0, "char": 0, "word": 0}
    joiners, char_actions, word_actions = set(), set(), set()
    n = 400
    short = "A dog runs fast. A cat sits still! Two cars wait? The sky is blue.\nA bus stops here."
    for seed in range(n):
        _, steps, _ = augment_text(short, settings, seed)
        for step in steps:
            fired[step["op"]] += 1
            joiners.add(step.get("joiner"))
            if step["op"] == "char":
                char_actions.add(step["action"])
                assert 0.05 <= step["word_rate"] <= 0.3 and 0.05 <= step["char_rate"] <= 0.3
            if step["op"] == "word":
                word_actions.add(step["action"])
                assert 0.05 <= step["rate"] <= 0.3
    for op, count in fired.items():
        assert 0.35 * n < count < 0.65 * n, (op, count)
    assert {"", "\n"} <= joiners
    assert char_actions == {"insert", "substitute", "swap", "delete"}
    assert word_actions == {"delete", "swap", "crop"}


def test_augment_steps_do_what_they_say():
    settings = AugmentSettings(p_keep_first=1, p_shuffle=0, p_char=0, p_word=0)
    text, steps, _ = augment_text(RESPONSE, settings, seed=5)
    (step,) = steps
    assert step["op"] == "keep_first" and 1 <= step["k"] < step["of"] == len(sentence_spans(RESPONSE))
    assert text == keep_first(RESPONSE, step["k"]) and len(sentence_spans(text)) == step["k"]
    shuffle_only = AugmentSettings(p_keep_first=0, p_shuffle=1, p_char=0, p_word=0)
    sentences = [RESPONSE[a:b].strip() for a, b in sentence_spans(RESPONSE)]
    joiners = set()
    for seed in (11, 12):  # seed 11 draws the "" joiner, seed 12 the line break: both branches are checked
        text, steps, _ = augment_text(RESPONSE, shuffle_only, seed=seed)
        (step,) = steps
        order = step["order"]
        assert step["op"] == "shuffle" and sorted(order) == list(range(len(sentences)))
        assert order != sorted(order)  # really reordered
        assert text == step["joiner"].join(sentences[i] for i in order)  # whole sentences, in the drawn order
        if step["joiner"] == "\n":
            assert sorted(text.split("\n")) == sorted(sentences)  # a permutation of the sentences
        joiners.add(step["joiner"])
    assert joiners == {"", "\n"}
    delete_words = AugmentSettings(p_keep_first=0, p_shuffle=0, p_char=0, p_word=1, word_actions=["delete"])
    text, steps, _ = augment_text(RESPONSE, delete_words, seed=3)
    assert len(text.split()) < len(RESPONSE.split())
    assert set(text.lower().split()) <= set(RESPONSE.lower().split())  # deleted, nothing invented
    assert text.count("\n") == RESPONSE.count("\n")  # noise is applied line by line


def test_a_draw_that_changes_nothing_is_drawn_again_and_counted():
    rows = [row(i) for i in range(400)]
    once = distort_augment(rows, AugmentSettings(max_redraws=0), "v_x", run_seed=0)
    failed_once = [p for p in once if p.status == "failed"]
    assert 0.03 * len(rows) < len(failed_once) < 0.11 * len(rows)  # about 1 in 16 draws no step
    assert all(p.error.startswith("unchanged") and "(1 draws)" in p.error for p in failed_once)
    redrawn = distort_augment(rows, AugmentSettings(), "v_x", run_seed=0)
    assert all(p.status == "ok" for p in redrawn)
    draws = [p.params["draws"] for p in redrawn]
    assert max(draws) >= 2 and sum(d > 1 for d in draws) >= len(failed_once)
    by_id = {p.sample_id: p for p in once}
    for pair in redrawn:  # a first draw that changed the text is kept as it was
        if pair.params["draws"] == 1:
            assert pair.distorted == by_id[pair.sample_id].distorted
    # One word and no character noise: word noise keeps at least one word, so no draw can change it.
    one_word = distort_augment([row(0, response="Yes")], AugmentSettings(p_char=0), "v_x", run_seed=0)[0]
    assert one_word.status == "failed" and one_word.error.startswith("unchanged") and "(4 draws)" in one_word.error


def test_augment_is_deterministic_and_independent_of_global_random_state():
    rows = [row(i) for i in range(20)]
    random.seed(1)
    first = [p.to_row() for p in distort_augment(rows, AugmentSettings(), "v_x", run_seed=3)]
    random.seed(2)
    import numpy as np

    np.random.seed(9)
    second = [p.to_row() for p in distort_augment(rows, AugmentSettings(), "v_x", run_seed=3)]
    assert first == second
    other_seed = [p.to_row() for p in distort_augment(rows, AugmentSettings(), "v_x", run_seed=4)]
    assert [r["distorted"] for r in other_seed] != [r["distorted"] for r in first]
    for r in first:
        assert r["status"] in ("ok", "failed")
        if r["status"] == "ok":
            assert r["distorted"] != r["original"]
        else:
            assert r["error"].startswith("unchanged")
        assert json.loads(r["params"])["steps"] is not None


@pytest.mark.parametrize(
    "kind,actions",
    [("char", ["insert", "substitute", "swap", "delete"]), ("word", ["delete", "swap", "crop", "substitute"])],
)
def test_lean_doc_gives_exactly_what_nlpaugs_doc_gives(kind, actions):
    """Our augmenters build LeanDoc; the same class on nlpaug's own Doc must give the same text and change logs."""
    import nlpaug.augmenter.char as nac
    import nlpaug.augmenter.word as naw

    from tasks.distort.augment import _seeded_classes

    lean_cls = _seeded_classes()[0 if kind == "char" else 1]
    stock_base = nac.RandomCharAug if kind == "char" else naw.RandomWordAug
    stock_cls = type("Stock" + lean_cls.__name__, (lean_cls,), {})
    for name in actions:  # nlpaug's own action methods, building its own Doc
        setattr(stock_cls, name, getattr(stock_base, name))
    texts = [
        RESPONSE.replace("\n", " "),
        "i think i saw 3.5 cats, i did.",
        "One",
        "Two words",
        "  spaced   out   text with   gaps  ",
        "A dog (brown) sits on the couch; it's \"happy\" -- really!",
    ]
    compared = changed = 0
    for action in actions:
        kwargs = {"action": action, "tokenizer": str.split, "reverse_tokenizer": " ".join}
        if kind == "char":
            lean, stock = (c(aug_char_max=None, aug_word_max=None, **kwargs) for c in (lean_cls, stock_cls))
            lean.aug_word_p = stock.aug_word_p = lean.aug_char_p = stock.aug_char_p = 0.3
        else:
            if action == "substitute":
                kwargs["target_words"] = ["X"]
            lean, stock = (c(aug_max=None, **kwargs) for c in (lean_cls, stock_cls))
            lean.aug_p = stock.aug_p = 0.3
        lean.include_detail = stock.include_detail = True  # the change logs must agree too
        for seed in range(60):
            for text in texts:
                lean.rng, stock.rng = random.Random(seed), random.Random(seed)
                got = getattr(lean, action)(text.strip())
                expected = getattr(stock, action)(text.strip())
                assert got == expected, (action, seed, text)
                compared += 1
                changed += (got[0] if isinstance(got, tuple) else got) != text.strip()
    assert compared == len(actions) * 60 * len(texts)
    assert changed > compared // 2  # the comparison covers real changes, not only untouched texts


def test_lean_doc_updating_an_unchanged_token_keeps_its_original_like_nlpaugs_doc():
    from nlpaug.util.doc import Doc

    from tasks.distort.lean_doc import LeanDoc

    docs = [cls("i saw i", ["i", "saw", "i"]) for cls in (Doc, LeanDoc)]
    for doc in docs:
        doc.update_change_log(0, token="I")
        doc.add_change_log(2, new_token="me", action="substitute", change_seq=1)
    stock, lean = docs
    assert lean.get_original_tokens() == stock.get_original_tokens() == ["i", "saw", "i"]
    assert lean.get_augmented_tokens() == stock.get_augmented_tokens() == ["I", "saw", "me"]
    assert lean.get_change_logs() == stock.get_change_logs()


# -- method 3: retrieve -------------------------------------------------------------------------------------
def test_retrieve_box_lines_parse_back_to_the_boxes():
    captions = ["A man walks a dog.", "A street with cars.", "A dog on a leash.", "Cars by a curb.", "A city scene."]
    boxes = [["person", [0.1, 0.2, 0.35, 0.9]], ["dog", [0.3333333, 0.6, 0.5, 0.95]], ["car", [0, 0, 1, 0.5]]]
    (pair,) = distort_retrieve([row(meta={"captions": captions, "boxes": boxes})], "v_r", run_seed=0)
    assert pair.status == "ok", pair.error
    head, blank, tail = pair.distorted.partition("\n\n")
    assert head.split("\n") == captions
    assert tail.split("\n")[0] == BOX_EXPLANATION
    assert tail.split("\n")[2] == "dog: [0.333, 0.600, 0.500, 0.950]"
    got_captions, got_boxes = parse_captions_and_boxes(pair.distorted)
    assert got_captions == captions
    assert [(label, coords) for label, coords in got_boxes] == [
        (label, [round(v, 3) for v in coords]) for label, coords in boxes
    ]
    assert pair.params == {"n_captions": 5, "n_boxes": 3}


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({}, "no captions"),
        ({"captions": ["ok"], "boxes": [["cat", [10, 20, 300, 400]]]}, "normalised to 0..1"),
        ({"captions": ["ok"], "boxes": [["cat", [0.1, 0.2]]]}, "4 coordinates"),
        ({"captions": ["ok"], "boxes": ["cat"]}, "must be [label"),
        ({"captions": ["ok"], "boxes": [[None, [0.1, 0.2, 0.3, 0.4]]]}, "label"),
        ({"captions": ["ok"], "boxes": [["  ", [0.1, 0.2, 0.3, 0.4]]]}, "empty label"),
    ],
)
def test_retrieve_bad_meta_fails_that_pair_with_a_reason(meta, reason):
    (pair,) = distort_retrieve([row(meta=meta)], "v_r", run_seed=0)
    assert pair.status == "failed" and reason in pair.error and pair.distorted is None


# -- method 1: prompt and parsing ------------------------------------------------------------------------
def test_defect_is_drawn_half_the_time_and_named_in_capitals():
    template = load_template("distort_v1")
    drawn = [draw_defect(seed, 0.5) for seed in range(400)]
    hits = [d for d in drawn if d is not None]
    assert 0.4 * 400 < len(hits) < 0.6 * 400
    assert len(set(hits)) > 15  # spread over the 24 defects
    seed_with = next(s for s, d in enumerate(drawn) if d is not None)
    seed_without = next(s for s, d in enumerate(drawn) if d is None)
    with_defect = build_conversation("<image>\nWhat is here?", RESPONSE, template, draw_defect(seed_with, 0.5))
    without = build_conversation("<image>\nWhat is here?", RESPONSE, template, draw_defect(seed_without, 0.5))
    defect = DEFECTS[drawn[seed_with]]
    assert defect.upper() in with_defect[-1]["content"]
    assert not any(d.upper() in without[-1]["content"] for d in DEFECTS)
    assert [m["role"] for m in with_defect] == ["user", "assistant", "user"]
    assert with_defect[0]["content"] == "What is here?"  # image markers are not for a text LLM
    assert with_defect[1]["content"] == RESPONSE.strip()
    assert len(DEFECTS) == 24 and template.version == "distort-llm-v1"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('Sure! Here is the short version:\n\n"man walks dog"\n\nNote: I removed details.', "man walks dog"),
        ("“a dog. street.”", "a dog. street."),
        ("Here's a curt version: dog street cars", "dog street cars"),
        ("cars and a dog\n### Human: thanks", "cars and a dog"),
        ("```\nshort text\n```", "short text"),
        ("DOG. STREET.\n\nI hope this helps!", "DOG. STREET."),
        ("Here is the distorted response, with the defect applied: dog, street", "dog, street"),
        # content that merely starts like a preamble is kept whole
        ("This is a kitchen: rice, chicken", "This is a kitchen: rice, chicken"),
        ("Here are two dogs: one brown, one black", "Here are two dogs: one brown, one black"),
    ],
)
def test_parse_reply_strips_quotes_preambles_and_chatter(reply, expected):
    assert parse_reply(reply, RESPONSE) == (expected, None)


def test_parse_reply_rejects_empty_and_unchanged_output_with_a_reason():
    assert parse_reply("", RESPONSE) == (None, "empty reply")
    assert parse_reply('""', RESPONSE)[1].startswith("empty after cleaning")
    assert parse_reply("  " + RESPONSE.replace("\n", " ") + " ", RESPONSE)[1].startswith("unchanged")
    assert parse_reply(RESPONSE.lower(), RESPONSE)[0] == RESPONSE.lower()  # a case change is a real distortion


# -- settings ---------------------------------------------------------------------------------------------
def test_config_errors_say_what_to_fix():
    with pytest.raises(ConfigError, match="llm entry but `llm` is not set"):
        parse_config({"distort": {"mix": [{"method": "llm"}]}})
    with pytest.raises(ConfigError, match="disjoint"):
        parse_config({"distort": {"mix": [{"method": "augment"}, {"method": "augment", "sources": ["a"]}]}})
    with pytest.raises(ConfigError, match="char_rate"):
        parse_config({"distort": {"augment": {"char_rate": [0.5, 0.1]}}})
    cfg = parse_config({"distort": {"mix": [{"method": "llm", "count": 5}], "llm": {"model": "m"}}})
    assert cfg.distort.llm.defect_probability == 0.5


def test_variant_changes_with_what_changes_the_text_only():
    base = DistortSettings()
    v = variant_for("augment", base, run_seed=0)
    assert v == variant_for("augment", DistortSettings(shard_size=7), run_seed=0)
    assert v != variant_for("augment", base, run_seed=1)
    assert v != variant_for("augment", DistortSettings(augment={"p_char": 0.9}), run_seed=0)
    llm = DistortSettings(mix=[{"method": "llm"}], llm={"model": "m"})
    faster = DistortSettings(mix=[{"method": "llm"}], llm={"model": "m", "concurrency": 64, "timeout_s": 5})
    assert variant_for("llm", llm, 0, "openai:m") == variant_for("llm", faster, 0, "openai:m")
    assert variant_for("llm", llm, 0, "openai:m") != variant_for("llm", llm, 0, "openai:other")



def llm_settings(**llm) -> DistortSettings:
    return DistortSettings(mix=[{"method": "llm"}], llm={"model": "m", **llm})


LOCAL_ID = "hf:tiny@0123456789"


def test_variants_of_existing_settings_are_pinned():
    """Values computed before stop, device and dtype joined the variant: a workspace made with these settings
    must keep its variants, or every pair (LLM calls included) would count as not made and be made again."""
    assert variant_for("augment", DistortSettings(), 0) == "v_6934c2c93ca4"
    assert variant_for("retrieve", DistortSettings(), 0) == "v_057ba16fd12f"
    assert variant_for("llm", llm_settings(), 0, "openai:m") == "v_6be92af22223"
    assert variant_for("llm", llm_settings(backend="local"), 0, LOCAL_ID) == "v_797d02549768"
    # Non-default settings that were in the variant already keep theirs too.
    sampling = llm_settings(temperature=0.7, top_p=0.9, max_new_tokens=128, defect_probability=0.2)
    assert variant_for("llm", sampling, 7, "openai:m") == "v_da2adf8545a7"
    local = llm_settings(backend="local", temperature=0.7, max_prompt_tokens=512, batch_size=2)
    assert variant_for("llm", local, 7, LOCAL_ID) == "v_98e834ea90c9"
    # Settings equal to the old values, spelt another way, are the old values.
    assert variant_for("llm", llm_settings(stop=["### Human:", "### Human:"]), 0, "openai:m") == "v_6be92af22223"
    assert variant_for("llm", llm_settings(backend="local", dtype="float32"), 0, LOCAL_ID) == "v_797d02549768"


def test_a_non_default_stop_gives_the_http_backend_a_new_variant():
    base = variant_for("llm", llm_settings(), 0, "openai:m")
    none = variant_for("llm", llm_settings(stop=[]), 0, "openai:m")
    lines = variant_for("llm", llm_settings(stop=["\n"]), 0, "openai:m")
    both = variant_for("llm", llm_settings(stop=["\n", "### Human:"]), 0, "openai:m")
    assert len({base, none, lines, both}) == 4
    assert both == variant_for("llm", llm_settings(stop=["### Human:", "\n"]), 0, "openai:m")  # order: no matter
    # The HTTP backend sends neither device nor dtype: they leave its variant alone.
    assert base == variant_for("llm", llm_settings(device="cuda", dtype="float16"), 0, "openai:m")


def test_local_dtype_and_device_kind_give_a_new_variant_stop_does_not():
    def v(**kw) -> str:
        return variant_for("llm", llm_settings(backend="local", **kw), 0, LOCAL_ID)

    base = v()
    variants = {
        "bf16": v(dtype="bfloat16"),
        "fp16": v(dtype="float16"),
        "cuda auto (bf16)": v(device="cuda"),
        "cuda fp32": v(device="cuda", dtype="float32"),
        "mps": v(device="mps"),
    }
    assert base not in variants.values() and len(set(variants.values())) == len(variants), variants
    assert v(device="cuda:1") == v(device="cuda") == v(device="cuda:0", dtype="bfloat16")  # the index: no matter
    assert v(device="cpu", dtype="auto") == v(dtype="float32") == base  # auto on the CPU is float32
    assert v(stop=[]) == v(stop=["\n"]) == base  # the local backend does not use stop


def test_resolved_dtype_is_what_the_local_backend_loads():
    torch = pytest.importorskip("torch")
    from models.text_lm import _dtype

    for device in ("cpu", "cuda", "cuda:1", "mps", "xpu"):
        for dtype in ("auto", "float32", "bfloat16", "float16"):
            llm = llm_settings(backend="local", device=device, dtype=dtype).llm
            assert getattr(torch, llm.resolved_dtype) is _dtype(dtype, device), (device, dtype)


def test_shards_give_the_same_pairs_whatever_the_sharding(tmp_path):
    """A pair depends on its sample and settings only: not on the shard, its size or its order."""
    import pyarrow as pa

    from polite.shards import read_table, write_table_atomic
    from tasks.distort.shard import distort_shard

    data = [row(i, response=f"{RESPONSE} Item {i}.", meta={"captions": [f"c{i}"]}) for i in range(12)]
    settings = DistortSettings().model_dump(mode="json")
    results = []
    for size, order in ((12, 1), (5, -1)):
        rows_ = data[::order]
        out = {}
        for k in range(0, len(rows_), size):
            work = write_table_atomic(pa.Table.from_pylist(rows_[k : k + size]), str(tmp_path / f"w{size}_{k}.parquet"))
            for method in ("augment", "retrieve"):
                job = {"method": method, "variant": "v_s", "work": work, "out": str(tmp_path / f"o{size}_{k}_{method}.parquet")}
                first = distort_shard(job, settings, run_seed=5)
                assert distort_shard(job, settings, run_seed=5) == first  # a repeated task is a no-op
                out.update({(r["sample_id"], r["method"]): r for r in read_table(first).to_pylist()})
        results.append(out)
    assert len(results[0]) == 24 and results[0] == results[1]



@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("\u201cDog\u201d sits on a \u201ccouch\u201d", "\u201cDog\u201d sits on a \u201ccouch\u201d"),
        ("\u2018a\u2019 b \u2018c\u2019", "\u2018a\u2019 b \u2018c\u2019"),
        ('"dog" and "cat"', '"dog" and "cat"'),
        ("\u201ca dog on a \u2018couch\u2019\u201d", "a dog on a \u2018couch\u2019"),
    ],
)
def test_parse_reply_keeps_quotes_that_do_not_wrap_the_whole_reply(reply, expected):
    """Curly quotes open and close with different characters: two quoted words are not one wrapped reply."""
    assert parse_reply(reply, RESPONSE) == (expected, None)


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"captions": ["ok"], "boxes": 5}, "meta.boxes must be a list"),
        ({"captions": ["ok"], "boxes": "dog"}, "meta.boxes must be a list"),
        ({"captions": ["ok"], "boxes": [["cat", [10**400, 0, 0, 0]]]}, "must be [label"),
        ({"captions": ["ok"], "boxes": [["cat", "0000"]]}, "must be [label"),
    ],
)
def test_retrieve_malformed_boxes_fail_the_pair_instead_of_the_shard(meta, reason):
    (pair,) = distort_retrieve([row(meta=meta)], "v_r", run_seed=0)
    assert pair.status == "failed" and reason in pair.error and pair.distorted is None


def test_retrieve_keeps_one_caption_and_one_box_per_line():
    """A caption or label with a line break inside would read as two captions, or as a caption among the boxes."""
    meta = {"captions": ["A man\nwalks a dog.", "A street.\r\n"], "boxes": [["traffic\nlight", [0.1, 0.2, 0.3, 0.4]]]}
    (pair,) = distort_retrieve([row(meta=meta)], "v_r", run_seed=0)
    assert pair.status == "ok", pair.error
    assert parse_captions_and_boxes(pair.distorted) == (
        ["A man walks a dog.", "A street."],
        [("traffic light", [0.1, 0.2, 0.3, 0.4])],
    )
    assert pair.distorted.count("\n") == 2 + 1 + 1  # two captions, the blank line, the sentence, one box


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("version: v\nfollowup: [unclosed\n", "is not valid YAML"),
        ("- just\n- a list\n", "needs string keys"),
        ("", "needs string keys"),
    ],
)
def test_a_broken_template_file_is_a_config_error_before_any_work(tmp_path, monkeypatch, workspace, text, reason):
    """A user's copy of distort_v1.yaml with a YAML slip must stop the flow with the file named, not a traceback."""
    import types

    from tasks.distort import prompting

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.yaml").write_text(text)
    monkeypatch.setattr(prompting, "resources", types.SimpleNamespace(files=lambda package: tmp_path))
    prompting.load_template.cache_clear()
    try:
        with pytest.raises(ValueError, match=reason):
            prompting.load_template("mine")
        from flows.distort import distort_flow

        cfg = {"distort": {"mix": [{"method": "llm"}], "llm": {"model": "m", "template": "mine"}}}
        with pytest.raises(ConfigError, match="mine"):
            distort_flow.fn(config=cfg, workspace=str(workspace.root))
    finally:
        prompting.load_template.cache_clear()
