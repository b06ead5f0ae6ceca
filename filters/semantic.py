"""Semantic similarity: sentence-transformers cosine between the rewrite and the raw annotation (captions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filters.base import (
    CAPTION_TYPES,
    Runtime,
    ScoreInput,
    Scorer,
    fmt,
    fmt_below,
    require,
    sql_fmt_below,
    sql_num,
)
from filters.models import available_locally, cached, compute_precision, exclusive, load_kwargs, resolve_ref


def semantic_model_ref(settings: Any, allow_download: bool) -> str | None:
    """The model the scorer will use: the configured one when loadable, else the packaged fallback."""
    if allow_download or available_locally(settings.model):
        return settings.model
    if settings.fallback_model and available_locally(settings.fallback_model):
        return settings.fallback_model
    return None


def load_sentence_model(ref: str, runtime: Runtime, max_seq_length: int | None = None) -> Any:
    def load():
        require("sentence_transformers", "sentence-transformers", "semantic")
        from sentence_transformers import SentenceTransformer

        from filters.models import weights_dtype

        model = SentenceTransformer(resolve_ref(ref), device=runtime.device, **load_kwargs(runtime, ref))
        model.to(weights_dtype(runtime))
        if max_seq_length:
            model.max_seq_length = min(max_seq_length, model.max_seq_length or max_seq_length)
        model.eval()
        return model

    return cached(("sentence", ref, runtime.device, runtime.dtype, max_seq_length), load)


def cosine_pairs(
    model: Any, firsts: Sequence[str], seconds: Sequence[str], batch_size: int, runtime: Runtime
) -> list[float]:
    """Cosine of each (first, second) pair; each distinct text is encoded once (raw captions repeat)."""
    import torch

    unique = list(dict.fromkeys([*firsts, *seconds]))
    if not unique:
        return []
    index = {t: i for i, t in enumerate(unique)}
    with exclusive(model), compute_precision(runtime):
        emb = model.encode(
            unique,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).float()
    a = emb[torch.tensor([index[t] for t in firsts], device=emb.device)]
    b = emb[torch.tensor([index[t] for t in seconds], device=emb.device)]
    return (a * b).sum(-1).clamp(-1.0, 1.0).cpu().tolist()


class SemanticScorer(Scorer):
    """score = cosine(rewrite, raw annotation); drop when below ``threshold`` (0.40)."""

    name = "semantic"
    applies_to = CAPTION_TYPES
    uses_model = True

    def __init__(self, settings: Any, runtime: Runtime | None = None, model_ref: str | None = None):
        super().__init__(settings, runtime)
        self.model_ref = (
            model_ref or semantic_model_ref(settings, self._runtime_spec.allow_download) or settings.model
        )

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_ref, "max_seq_length": self.settings.max_seq_length}

    def thresholds(self) -> dict[str, Any]:
        return {"threshold": self.settings.threshold}

    def threshold_value(self) -> float | None:
        return self.settings.threshold

    def prepare(self) -> None:
        self.model()

    def model(self) -> Any:
        return load_sentence_model(self.model_ref, self.runtime, self.settings.max_seq_length)

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        sims = cosine_pairs(
            self.model(),
            [i.rewrite for i in items],
            [i.raw_response for i in items],
            self.settings.batch_size,
            self.runtime,
        )
        return [(round(s, 6), {}) for s in sims]

    def score_batch(self, items):
        # Encode the whole shard in one call: sentence-transformers batches and length-sorts internally.
        self.batch_size = max(len(items), 1)
        return super().score_batch(items)

    def passes(self, score, details) -> bool:
        return score is not None and score >= self.settings.threshold

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"semantic {fmt_below(score, self.settings.threshold)} < {fmt(self.settings.threshold)}"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL AND {score} >= {sql_num(float(self.settings.threshold))})"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE 'semantic ' || {sql_fmt_below(score, self.settings.threshold)} || ' < {fmt(self.settings.threshold)}' END"
        )
