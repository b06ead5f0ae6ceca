"""Decoding settings: the presets (the released inference code's, and two cheaper ones) and how a preset plus
overrides resolves into the settings recorded with every rewrite. Pure Python, so a config is checked when it is
parsed (polite/config/rewrite.py) and the rewrite stage (models/generation.py) reads the same definition.
"""

from __future__ import annotations

from typing import Any

# The released inference code's decoding (METHOD.md), and two cheaper presets.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        max_new_tokens=1024,
        num_beams=3,
        do_sample=True,
        temperature=1.0,
        top_k=20,
        top_p=0.9,
        length_penalty=1.0,
        no_repeat_ngram_size=3,
    ),  # fmt: skip
    "greedy": dict(max_new_tokens=1024, num_beams=1, do_sample=False),
    "beam": dict(
        max_new_tokens=1024, num_beams=3, do_sample=False, length_penalty=1.0, no_repeat_ngram_size=3
    ),
}
_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=1024, min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_k=50, top_p=1.0,
    length_penalty=1.0, no_repeat_ngram_size=0, repetition_penalty=1.0, seed=0,
)  # fmt: skip
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed")


def resolve_generation(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full, normalised decoding settings of ``preset`` + ``overrides`` (``None`` values are ignored).

    Parameters that cannot change the output are dropped (sampling knobs without sampling, the length
    penalty without beams), so equivalent settings hash alike and resume finds their rewrites.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown generation preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides or {}) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown generation settings {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    settings = {
        **_DEFAULTS,
        **PRESETS[preset],
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    if not settings["do_sample"]:
        for key in _SAMPLING_ONLY:
            settings.pop(key)
    if settings["num_beams"] == 1:
        settings.pop("length_penalty")
    if settings["min_new_tokens"] > settings["max_new_tokens"]:
        raise ValueError("min_new_tokens cannot exceed max_new_tokens")
    return dict(sorted(settings.items()))
