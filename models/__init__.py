"""The rewriter model: OpenFlamingo + LoRA, built from local files, loaded once per process.

Public API (heavy modules import lazily, so ``import models`` stays cheap):

    from models import load_rewriter, make_tiny_rewriter, Inferencer, get_prompt
    loaded = load_rewriter("workspace/models/tiny-rewriter")      # model, tokenizer, image_processor, fingerprint
    out = generate(loaded.model, vision_x, input_ids, attention_mask, max_new_tokens=64)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from models.prompts import get_prompt, rewrite_prompt, split_response

_LAZY = {
    "FlamingoSpec": "models.flamingo",
    "build_flamingo": "models.flamingo",
    "generate": "models.flamingo",
    "LoadedRewriter": "models.loader",
    "load_rewriter": "models.loader",
    "fingerprint": "models.loader",
    "make_tiny_rewriter": "models.tiny",
    "Inferencer": "models.inference",
    "images_to_vision_x": "models.inference",
}

__all__ = ["get_prompt", "rewrite_prompt", "split_response", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
