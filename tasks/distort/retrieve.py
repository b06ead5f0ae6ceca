"""Method 3, retrieve captions and boxes: the "distorted" input is what raw dataset annotations look like.

For an image with a detailed description and COCO-style captions and boxes (in the sample's ``meta``), the
input is the captions one per line, a blank line, one sentence on the box format, then ``class: [x1, y1, x2,
y2]`` per object in 0..1 with 3 decimals: exactly ``polite.formats.format_captions_and_boxes``, which
ingestion uses too. Nothing here is random; the pair still records its derived seed.
"""

from __future__ import annotations

import json
import math
from typing import Any

from polite.formats import format_captions_and_boxes
from tasks.distort.record import RETRIEVE_VERSION, DistortError, Pair, new_pair


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError as exc:
            raise DistortError(f"meta is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise DistortError(f"meta must be a JSON object, got {type(meta).__name__}")
    return meta


def _one_line(text: str) -> str:
    """``text`` on one line: the format has one caption or one box per line, so a line break inside would
    read as two captions, or put a caption among the boxes."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def captions_and_boxes(meta: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Validated ``meta["captions"]`` and ``meta["boxes"]`` (``[[label, [x1, y1, x2, y2]], ...]`` in 0..1)."""
    captions = meta.get("captions")
    if not isinstance(captions, list) or not [c for c in captions if isinstance(c, str) and c.strip()]:
        raise DistortError("no captions in meta (need meta.captions: a list of strings)")
    if not all(isinstance(c, str) for c in captions):
        raise DistortError("meta.captions must hold strings only")
    raw_boxes = meta.get("boxes") or []
    if not isinstance(raw_boxes, list):  # a number would not iterate, a string would iterate as characters
        raise DistortError(f"meta.boxes must be a list of [label, [x1, y1, x2, y2]], got {type(raw_boxes).__name__}")
    boxes: list[tuple[str, list[float]]] = []
    for i, item in enumerate(raw_boxes):
        try:
            label, coords = item
            if not isinstance(coords, list | tuple):  # "0000" would pass as four digits
                raise TypeError
            coords = [float(v) for v in coords]
        except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond float range
            raise DistortError(f"meta.boxes[{i}] must be [label, [x1, y1, x2, y2]], got {item!r:.120}") from None
        if len(coords) != 4 or not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in coords):
            raise DistortError(f"meta.boxes[{i}] must have 4 coordinates normalised to 0..1, got {coords}")
        if not isinstance(label, str):  # str(None) would print a "None: [...]" line
            raise DistortError(f"meta.boxes[{i}] label must be a string, got {label!r}")
        if not label.strip():
            raise DistortError(f"meta.boxes[{i}] has an empty label")
        boxes.append((_one_line(label), [min(max(v, 0.0), 1.0) for v in coords]))
    return [_one_line(c) for c in captions if c.strip()], boxes


def distort_retrieve(rows: list[dict[str, Any]], variant: str, run_seed: int) -> list[Pair]:
    pairs = []
    for row in rows:
        pair = new_pair(row, "retrieve", variant, run_seed, RETRIEVE_VERSION)
        try:
            captions, boxes = captions_and_boxes(_meta(row))
        except DistortError as exc:
            pairs.append(pair.fail(str(exc)))
            continue
        pair.distorted = format_captions_and_boxes(captions, boxes)
        pair.params = {"n_captions": len(captions), "n_boxes": len(boxes)}
        pairs.append(pair)
    return pairs
