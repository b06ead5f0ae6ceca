"""The prompt templates, byte for byte as the released Polite/Clever Flamingo checkpoints expect them.

Keep every template here. ``PROMPT_VERSION`` is recorded with every rewrite and training pair: bump it when a
template changes, and resumed work will not mix outputs of two prompts.
"""

from __future__ import annotations

import re

from polite.markers import CHUNK_END, IMAGE_MARKER

PROMPT_VERSION = "pf-v1"

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# "Assistent" is deliberate: the released polite_flamingo.pt was trained on this spelling.
REWRITE_TEMPLATE = "{system}\n### Human: {instruction}\n### Assistent: (Drafted Response): {raw}\n (Revised Response): "
CHAT_TEMPLATE = "{system}\n### Human: {instruction}\n### Assistant: "

IMAGE_TOKEN = IMAGE_MARKER
CHUNK_END_TOKEN = CHUNK_END
PAD_TOKEN = "<PAD>"
ADDED_TOKENS = (CHUNK_END_TOKEN, IMAGE_TOKEN, PAD_TOKEN)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
RESPONSE_SPLITS = {"polite_flamingo": "(Revised Response): ", "clever_flamingo": "### Assistant: "}

_BARE_IMAGE = re.compile(re.escape(IMAGE_TOKEN) + r"(?!" + re.escape(CHUNK_END_TOKEN) + r")")


def render_images(instruction: str) -> str:
    """Each ``<image>`` marker becomes ``<image><|endofchunk|>`` (idempotent)."""
    return _BARE_IMAGE.sub(IMAGE_TOKEN + CHUNK_END_TOKEN, instruction)


def rewrite_prompt(instruction: str, raw_annotation: str) -> str:
    """The Polite Flamingo rewriter's input: the instruction and the drafted (raw) response."""
    return REWRITE_TEMPLATE.format(system=SYSTEM, instruction=render_images(instruction), raw=raw_annotation)


def chat_prompt(instruction: str) -> str:
    """The Clever Flamingo chat input."""
    return CHAT_TEMPLATE.format(system=SYSTEM, instruction=render_images(instruction))


def get_prompt(instruction: str, raw_annotation: str | None = None, mode: str = "clever_flamingo") -> str:
    """The seed's API: ``mode`` is ``polite_flamingo`` (needs ``raw_annotation``) or ``clever_flamingo``."""
    if mode == "polite_flamingo":
        if raw_annotation is None:
            raise ValueError("mode='polite_flamingo' rewrites a drafted response: pass raw_annotation")
        return rewrite_prompt(instruction, raw_annotation)
    if mode == "clever_flamingo":
        return chat_prompt(instruction)
    raise ValueError(f"mode must be 'polite_flamingo' or 'clever_flamingo', got {mode!r}")


def split_response(full_text: str, response_split: str = RESPONSE_SPLITS["polite_flamingo"]) -> str:
    """The generated response after the last ``response_split`` marker, without end-of-chunk/eos text."""
    return cut_response(full_text.rsplit(response_split, 1)[-1])


def cut_response(generated: str) -> str:
    """Generated text alone (no prompt) up to end-of-chunk/eos text or a new human turn, stripped."""
    for stop in (CHUNK_END_TOKEN, "</s>", "\n### Human:", "### Human:"):
        generated = generated.split(stop, 1)[0]
    return generated.strip()
