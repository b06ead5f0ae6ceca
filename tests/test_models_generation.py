"""RewriteGenerator's CPU side over the tiny model: cutting a row's tokens into its rewrite, loading images."""

from __future__ import annotations

import pytest
import torch

from models.generation import RewriteGenerator, resolve_generation
from models.loader import load_rewriter
from models.tiny import make_tiny_rewriter


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    tiny = make_tiny_rewriter(tmp_path_factory.getbasetemp() / "tiny-rewriter", seed=0)
    loaded = load_rewriter(tiny, device="cpu", dtype=torch.float32)
    return RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 8}), backend="plain")


def _ids(gen, text: str) -> list[int]:
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"]


def _prepared(gen):
    from models.generation import Prepared

    return Prepared(input_ids=[1, 5, 6], image_keys=[], pixels=[])


def test_result_is_the_generated_text_up_to_the_first_end_token(gen):
    eoc = int(gen.loaded.model.eoc_token_id)
    tokens = _ids(gen, "A polite answer.") + [eoc] + _ids(gen, "junk after")
    got = gen._result(_prepared(gen), tokens, nan=False)
    assert got.text == "A polite answer."
    assert got.output_tokens == len(_ids(gen, "A polite answer.")) + 1


def test_result_keeps_a_rewrite_that_contains_the_response_marker(gen):
    """The generated tokens hold no prompt: text before a '(Revised Response): ' the rewrite itself wrote is
    part of the rewrite, not a prompt to split off."""
    text = "Quoted from the form: (Revised Response): none given."
    got = gen._result(_prepared(gen), _ids(gen, text), nan=False)
    assert got.text == text


def test_an_empty_rewrite_is_empty(gen):
    got = gen._result(_prepared(gen), [2], nan=False)
    assert got.text == "" and got.output_tokens == 1 and got.token_ids == []


def _save(path, image) -> str:
    image.save(path, format="PNG")
    return str(path)


def test_a_16_bit_grayscale_image_is_seen_as_its_8_bit_self(gen, tmp_path):
    """A 16-bit PNG (mode I;16) converted straight to RGB clips every value above 255 to white."""
    import numpy as np
    from PIL import Image

    from models.inference import open_image

    levels = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    deep = _save(tmp_path / "deep.png", Image.fromarray(levels))
    flat = _save(tmp_path / "flat.png", Image.fromarray((levels >> 8).astype(np.uint8)))
    assert Image.open(deep).mode.startswith("I")
    assert np.array_equal(np.asarray(open_image(deep)), np.asarray(open_image(flat)))
    assert torch.equal(gen._pixels("i_deep", deep), gen._pixels("i_flat", flat))
    # and wherever else the factory opens stored images: the image store, CLIPScore, the report's cards
    from filters.clipscore import open_image as clip_open
    from polite.images import ImageStore
    from tasks.report import _thumbnail

    store = ImageStore(str(tmp_path / "store"))
    for opened in (store.open(deep), clip_open(deep)):
        assert np.array_equal(np.asarray(opened), np.asarray(open_image(flat)))
    assert _thumbnail(deep) == _thumbnail(flat)


def test_rewrite_prompt_is_the_released_template_byte_for_byte():
    """METHOD.md's ``rewrite`` template (typo included), with each image marker followed by an end of chunk."""
    from models.prompts import rewrite_prompt

    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")  # fmt: skip
    got = rewrite_prompt("<image> What is it?", "a cat")
    assert got == (f"{system}\n### Human: <image><|endofchunk|> What is it?\n### Assistent: (Drafted Response): "
                   "a cat\n (Revised Response): ")  # fmt: skip
    assert rewrite_prompt("<image><|endofchunk|> What is it?", "a cat") == got
