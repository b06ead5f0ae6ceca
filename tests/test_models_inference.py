"""The seed's Inferencer API over the tiny model: single prompts, batches, decoding defaults."""

from __future__ import annotations

import pytest
from PIL import Image

from models import Inferencer, get_prompt
from models.inference import DEFAULT_DECODING
from models.tiny import make_tiny_rewriter


@pytest.fixture(scope="module")
def inferencer(tmp_path_factory):
    tiny = make_tiny_rewriter(tmp_path_factory.getbasetemp() / "tiny-rewriter", seed=0)
    return Inferencer.from_model(str(tiny), device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for color in ("red", "blue", "green"):
        Image.new("RGB", (40, 30), color).save(d / f"{color}.png")
        paths.append(str(d / f"{color}.png"))
    return paths


def test_defaults_are_the_released_decoding_settings():
    assert DEFAULT_DECODING == dict(max_new_token=1024, num_beams=3, temperature=1.0, top_k=20, top_p=0.9,
                                    do_sample=True, length_penalty=1.0, no_repeat_ngram_size=3)  # fmt: skip


def test_single_call_returns_response_and_full_text(inferencer, images):
    prompt = get_prompt("<image> What colour is it?", "red", mode="polite_flamingo")
    response, full_text = inferencer(
        prompt=prompt, imgpaths=images[:1], max_new_token=6, num_beams=1, do_sample=False,
        response_split="(Revised Response):",
    )  # fmt: skip
    # full_text is the prompt (special tokens dropped) followed by what the model wrote; response is the latter
    shown_prompt = inferencer.tokenizer.decode(inferencer.tokenizer(prompt)["input_ids"], skip_special_tokens=True)
    assert shown_prompt.startswith("A chat between") and "(Drafted Response): red" in shown_prompt
    assert full_text.startswith(shown_prompt) and shown_prompt.endswith("(Revised Response): ")
    generated = full_text[len(shown_prompt) :]
    assert generated.strip() and response == generated.strip()  # the greedy tokens are there, none lost
    shorter, _ = inferencer(prompt=prompt, imgpaths=images[:1], max_new_token=3, num_beams=1, do_sample=False,
                            response_split="(Revised Response):")  # fmt: skip
    assert shorter and response.startswith(shorter) and len(shorter) < len(response)  # max_new_token is honoured


def test_batch_equals_calls_one_by_one(inferencer, images):
    prompts = [
        get_prompt("<image> Describe the image.", "a red square", mode="polite_flamingo"),
        get_prompt("<image> And this one?"),
        get_prompt("No image here."),
    ]
    imgs = [images[:1], images[1:2], []]
    kw = dict(max_new_token=6, num_beams=1, do_sample=False)
    batch = inferencer(prompt=prompts, imgpaths=imgs, **kw)
    assert len(batch) == 3 and all(isinstance(r, tuple) and len(r) == 2 for r in batch)
    for prompt, img, got in zip(prompts, imgs, batch, strict=True):
        assert inferencer(prompt=prompt, imgpaths=img, **kw) == got


def test_mismatched_batch_is_rejected(inferencer):
    with pytest.raises(ValueError, match="image lists"):
        inferencer(prompt=["a", "b"], imgpaths=[[]], max_new_token=2)


def test_seed_constructor_builds_from_released_style_paths(inferencer, tmp_path_factory):
    """The seed's arguments (LM folder, open_clip tower, OpenFlamingo checkpoint) load the same model."""
    from models.tiny import TINY_FLAMINGO

    tiny = tmp_path_factory.getbasetemp() / "tiny-rewriter"
    seed_style = Inferencer(
        lm_path=str(tiny / "lm"), clip_vision_encoder_path=f"local-dir:{tiny / 'vision'}", tuning_config=None,
        checkpoint=str(tiny / "checkpoint.safetensors"), vision_pretrained=None, v1_masking=False, device="cpu",
        **{k: v for k, v in TINY_FLAMINGO.items()},
    )  # fmt: skip
    assert seed_style.fingerprint == inferencer.fingerprint
    prompt = get_prompt("Say something.")
    kw = dict(max_new_token=5, num_beams=1, do_sample=False)
    assert seed_style(prompt=prompt, imgpaths=[], **kw) == inferencer(prompt=prompt, imgpaths=[], **kw)
