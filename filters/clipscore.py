"""CLIPScore per paragraph (captions): paragraphs not grounded in the image are removed.

A paragraph's score is 100 x cosine(image embedding, normalised mean of the normalised embeddings of its
first ``max_sentences`` sentences), with open_clip ``ViT-L-14-336``. Paragraphs scoring below the threshold
(17.0) are cut from the final output; a sample with none left is dropped. With several images (change
captions) a paragraph scores its best image.

score = the best paragraph's score, so "some paragraph survives" is simply ``score >= threshold``;
details hold every paragraph's score, so ``--rethreshold`` can recut paragraphs without the model.
"""

from __future__ import annotations

import re
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
from filters.models import cached, compute_precision, exclusive, resolve_ref
from filters.text import split_sentences

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
_STRIP = " \t\n\r"
# The same split in SQL, for --rethreshold: keep the two in step (tests check they agree).
PARAGRAPHS_SQL = (
    "list_filter(list_transform(regexp_split_to_array(trim({text}, E' \\t\\n\\r'), E'\\n[ \\t\\r]*\\n'), "
    "lambda p: trim(p, E' \\t\\n\\r')), lambda p: p <> '')"
)


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are separated by blank lines."""
    parts = _PARAGRAPH_BREAK.split(text.strip(_STRIP))
    return [p.strip(_STRIP) for p in parts if p.strip(_STRIP)]


def keep_paragraphs(text: str, scores: Sequence[float], threshold: float) -> tuple[str, list[int]]:
    """The text without paragraphs scoring under ``threshold``, and the (0-based) indices removed."""
    removed = [i for i, s in enumerate(scores) if s < threshold]
    if not removed:  # leave the rewrite's own layout alone
        return text.strip(_STRIP), []
    paragraphs = split_paragraphs(text)
    kept = [p for p, s in zip(paragraphs, scores, strict=False) if s >= threshold]
    return "\n\n".join(kept), removed


def load_clip(settings: Any, runtime: Runtime) -> tuple[Any, Any, Any]:
    """(model, image preprocess, tokenizer) through open_clip, cached per process."""

    def load():
        open_clip = require("open_clip", "open-clip-torch", "clipscore")
        from filters.models import weights_dtype

        if settings.model_config_file:
            open_clip.add_model_config(resolve_ref(settings.model_config_file))
        pretrained = settings.pretrained
        if pretrained and not runtime.allow_download and pretrained not in ("", "none"):
            # A tag (e.g. "openai") resolves to a hub file; open_clip would download it when missing.
            from filters.models import is_local_path

            if not is_local_path(pretrained) and not clip_weights_cached(settings.model, pretrained):
                raise FileNotFoundError(
                    f"open_clip weights {settings.model}/{pretrained} are not in the local cache and "
                    "filters.allow_download is false; set filters.clipscore.pretrained to a local checkpoint"
                )
        model, _, preprocess = open_clip.create_model_and_transforms(
            settings.model, pretrained=resolve_ref(pretrained) if pretrained else None, device=runtime.device
        )
        model.to(weights_dtype(runtime)).eval()
        return model, preprocess, open_clip.get_tokenizer(settings.model)

    key = (
        "clip",
        settings.model,
        settings.pretrained,
        settings.model_config_file,
        runtime.device,
        runtime.dtype,
    )
    return cached(key, load)


def clip_weights_cached(model: str, tag: str) -> bool:
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        cfg = open_clip.pretrained.get_pretrained_cfg(model, tag)
        repo = (cfg or {}).get("hf_hub", "").rstrip("/")
        if not repo:
            return False
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, name), str):
                return True
    except Exception:
        return False
    return False


def open_image(path: str | None):
    """An RGB image from any fsspec URL (the image store's paths)."""
    import io

    from fsspec.core import url_to_fs
    from PIL import Image

    from polite.images import to_rgb

    if not path:
        raise FileNotFoundError("the sample names an image that is not in the `images` table")
    fs, local = url_to_fs(path)
    with fs.open(local, "rb") as handle:
        return to_rgb(Image.open(io.BytesIO(handle.read())))


class ClipScoreScorer(Scorer):
    name = "clipscore"
    rule_reads_details = True
    applies_to = CAPTION_TYPES
    needs_image = True
    uses_model = True

    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {"model": s.model, "pretrained": s.pretrained, "max_sentences": s.max_sentences}

    def thresholds(self) -> dict[str, Any]:
        return {"threshold": self.settings.threshold}

    def threshold_value(self) -> float | None:
        return self.settings.threshold

    def prepare(self) -> None:
        load_clip(self.settings, self.runtime)

    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        import torch

        model, preprocess, tokenizer = load_clip(self.settings, self.runtime)
        device, dtype = self.runtime.device, next(model.parameters()).dtype
        # Each distinct image once per batch (many questions share an image).
        paths = list(dict.fromkeys(p for i in items for p in i.image_paths))
        pixels = torch.stack([preprocess(open_image(p)) for p in paths]).to(device, dtype)
        # Every paragraph's first sentences, flattened into one text batch.
        sentences: list[str] = []
        spans: list[list[tuple[int, int]]] = []
        for item in items:
            item_spans = []
            for paragraph in split_paragraphs(item.rewrite):
                sents = split_sentences(paragraph)[: self.settings.max_sentences] or [paragraph]
                item_spans.append((len(sentences), len(sentences) + len(sents)))
                sentences.extend(sents)
            spans.append(item_spans)
        with exclusive(model), torch.inference_mode(), compute_precision(self.runtime):
            img = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = (
                torch.cat(
                    [
                        model.encode_text(tokenizer(sentences[s : s + 256]).to(device)).float()
                        for s in range(0, len(sentences), 256)
                    ]
                )
                if sentences
                else torch.zeros(0, img.shape[1], device=img.device)
            )
            txt = torch.nn.functional.normalize(txt, dim=-1)
        image_index = {p: k for k, p in enumerate(paths)}
        out = []
        for item, item_spans in zip(items, spans, strict=True):
            if not item_spans:
                out.append((None, {"error": "no paragraphs"}))
                continue
            item_img = img[[image_index[p] for p in item.image_paths]]
            para = torch.stack([txt[a:b].mean(0) for a, b in item_spans])
            para = torch.nn.functional.normalize(para, dim=-1)
            per_par = (100.0 * para @ item_img.T).max(dim=1).values.cpu().tolist()
            per_par = [round(v, 4) for v in per_par]
            out.append((max(per_par), {"paragraph_scores": per_par}))
        return out

    def passes(self, score, details) -> bool:
        return score is not None and score >= self.settings.threshold

    def reason(self, score, details) -> str:
        if score is None:
            return super().reason(score, details)
        return f"clipscore {fmt_below(score, self.settings.threshold)} < {fmt(self.settings.threshold)} (no paragraph left)"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL AND {score} >= {sql_num(float(self.settings.threshold))})"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {super().reason_sql(score, details)} "
            f"ELSE 'clipscore ' || {sql_fmt_below(score, self.settings.threshold)} || ' < {fmt(self.settings.threshold)} (no paragraph left)' END"
        )

    @staticmethod
    def paragraph_scores_sql(details: str) -> str:
        return f"CAST(json_extract({details}, '$.paragraph_scores') AS DOUBLE[])"

    def final_output_sql(self, text: str, scores: str) -> tuple[str, str]:
        """SQL for (text without its low paragraphs, or NULL when none is cut; removed 0-based indices), given
        the paragraph scores as a DOUBLE[] expression (``paragraph_scores_sql``, parsed once by the caller)."""
        thr = sql_num(float(self.settings.threshold))
        paragraphs = PARAGRAPHS_SQL.format(text=text)
        # Most rewrites lose no paragraph: the regex split runs only for those that do.
        kept = (
            f"CASE WHEN list_min({scores}) < {thr} THEN "
            f"array_to_string(list_filter({paragraphs}, lambda p, i: {scores}[i] >= {thr}), E'\\n\\n') END"
        )
        removed = f"list_filter(list_transform({scores}, lambda s, i: CASE WHEN s < {thr} THEN i - 1 END), lambda x: x IS NOT NULL)"
        return kept, removed
