"""The bundled demo source: deterministic, correct about each scene, and shaped the way distortion needs it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from polite.config import SourceSpec
from polite.formats import format_captions_and_boxes, parse_captions_and_boxes
from tasks.ingest import plan_source
from tasks.sources import fixtures
from tasks.sources.demo import generate
from tasks.sources.demo_scenes import make_scene, render_png, scene_record
from tasks.sources.loading import SourceError


def run_source(spec, workspace, shard_size=1000):
    return fixtures.ingest_locally(spec, workspace.root, shard_size)


def test_two_generations_are_byte_identical(tmp_path):
    a = generate(tmp_path / "a", n_scenes=12)
    b = generate(tmp_path / "b", n_scenes=12)
    digest = lambda folder: hashlib.sha256((folder / "data" / "train-00000-of-00001.parquet").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    assert render_png(make_scene(3)) == render_png(make_scene(3))
    assert render_png(make_scene(3)) != render_png(make_scene(4))


def test_demo_ingest_ids_counts_and_shape(tmp_path, workspace):
    spec = {"adapter": "demo", "options": {"scenes": 30}}
    _, samples, images = run_source(spec, workspace, shard_size=16)
    assert len(samples) == 180 and all(s.status == "ok" for s in samples) and len(images) == 30
    by_type = {}
    for s in samples:
        by_type.setdefault((s.split, s.task_type), []).append(s)
    assert {k: len(v) for k, v in by_type.items()} == {
        ("hq", "detailed_caption"): 30, ("hq", "conversation"): 60, ("raw", "vqa"): 60, ("raw", "caption"): 30}
    for s in by_type[("hq", "detailed_caption")]:
        assert 40 <= len(s.raw_response.split()) <= 120
        assert len(s.meta["captions"]) == 5
        for label, box in s.meta["boxes"]:
            assert label.split()[-1] in ("circle", "square", "triangle") and all(0 <= v <= 1 for v in box)
            assert box[0] < box[2] and box[1] < box[3]
        text = format_captions_and_boxes(s.meta["captions"], s.meta["boxes"])  # what distortion method 3 builds
        assert parse_captions_and_boxes(text)[0] == s.meta["captions"]
    assert all(len(s.raw_response.split()) <= 2 for s in by_type[("raw", "vqa")])
    counted = 0
    for s in by_type[("hq", "conversation")]:  # polite answers: full sentences that contain the short answer
        assert s.raw_response[0].isupper() and s.raw_response.endswith(".") and len(s.raw_response.split()) >= 6
        short = s.meta["short_answer"]
        if short.isdigit():  # "How many circles are there?" "2" -> "There are two circles ..."
            noun = s.instruction.removeprefix("<image>How many ").removesuffix(" are there?")
            said = {"0": "no", "1": "one", "2": "two", "3": "three", "4": "four"}[short]
            assert f"{said} {noun.removesuffix('s') if short == '1' else noun}" in s.raw_response.lower(), s
            counted += 1
        elif short in ("yes", "no"):
            assert s.raw_response.startswith(f"{short.capitalize()}, "), s
        else:
            assert short in s.raw_response.lower(), s
    assert counted  # the count answers were met
    assert len({s.raw_response for s in by_type[("hq", "detailed_caption")]}) == 30
    # a second workspace generates the same data again and gets the same ids
    _, again, _ = run_source(spec, type(workspace).resolve(str(tmp_path / "other")).ensure(), shard_size=50)
    assert sorted(s.sample_id for s in again) == sorted(s.sample_id for s in samples)


def _where_by_thirds(box: tuple[int, int, int, int], size: int) -> str:
    """The answer to "Where is ...?": the third of the image the shape's centre is in, per axis."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    return f"{row} {col}".strip() or "centre"


def test_answers_are_true_of_the_scene():
    import io

    from PIL import Image

    from tasks.sources.demo_scenes import BACKGROUNDS, SIZE

    asked_kinds = set()
    for index in range(60):
        scene = make_scene(index)
        record = scene_record(scene)
        names = [s.name for s in scene.shapes]
        for question, answer, polite in record["qa"]:
            if question == "How many shapes are there?":
                kind = "count"
                assert answer == str(len(scene.shapes))
            elif question.startswith("How many "):  # "How many circles are there?"
                kind = "count of a kind"
                shape = question[len("How many "):-len("s are there?")]
                assert answer == str(sum(s.kind == shape for s in scene.shapes))
            elif question.startswith("Is there "):
                kind = f"is there ({answer})"
                asked = question[len("Is there "):-1].split(" ", 1)[1]  # drop the article
                assert answer == ("yes" if asked in names else "no")
                assert polite.startswith("Yes, " if answer == "yes" else "No, ")
            elif question == "What colour is the background?":
                kind = "background"
                assert answer == scene.background
                corner = Image.open(io.BytesIO(render_png(scene))).convert("RGB").getpixel((0, 0))
                assert corner == BACKGROUNDS[answer]  # what the picture shows
            elif question.startswith("What colour is the "):
                kind = "colour"
                shape = question[len("What colour is the "):-1]
                (only,) = [s for s in scene.shapes if s.kind == shape]  # asked only of the one shape of a kind
                assert answer == only.colour
            elif question.startswith("What shape is the "):
                kind = "shape"
                colour = question[len("What shape is the "):-len(" object?")]
                (only,) = [s for s in scene.shapes if s.colour == colour]
                assert answer == only.kind
            elif question.startswith("Where is the "):
                kind = "where"
                (only,) = [s for s in scene.shapes if s.name == question[len("Where is the "):-1]]
                assert answer == _where_by_thirds(only.box, SIZE)
            else:
                raise AssertionError(f"a question this test does not check: {question!r}")
            asked_kinds.add(kind)
        for name in names:
            assert name in record["description"]
        assert 2 <= len(scene.shapes) <= 4
    # every kind of question was met and checked (60 scenes x 2 questions)
    assert asked_kinds == {"count", "count of a kind", "is there (yes)", "is there (no)", "background", "colour",
                           "shape", "where"}  # fmt: skip


def test_leftmost_and_rightmost_are_by_centre():
    for index in range(40):
        scene = make_scene(index)
        centres = {s.name: s.box[0] + s.box[2] for s in scene.shapes}
        text = scene_record(scene)["description"]
        left = min(centres, key=centres.get)
        right = max(centres, key=centres.get)
        assert f"The {left} is the leftmost shape, while the {right} is furthest to the right." in text


@pytest.mark.parametrize(("options", "bad"), [({"scenes": 0}, "scenes"), ({"scenes": "many"}, "scenes"),
                                              ({"scenes": 2.5}, "scenes"), ({"seed": "x"}, "seed")])  # fmt: skip
def test_bad_demo_options_say_what_to_fix_and_generate_nothing(options, bad, workspace):
    with pytest.raises(SourceError, match=rf"-o {bad}=N"):
        plan_source(SourceSpec.model_validate({"adapter": "demo", "options": options}), workspace.root, 100)
    assert not list(Path(workspace.root).rglob("*.parquet"))
