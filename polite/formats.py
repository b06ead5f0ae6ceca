"""Text formats shared by several stages."""

from __future__ import annotations

import re
from collections.abc import Sequence

BOX_EXPLANATION = (
    "Each line below names an object and its bounding box [x1, y1, x2, y2], "
    "with coordinates normalised to the range 0 to 1 (top-left origin)."
)
_BOX_LINE = re.compile(r"^(?P<label>.+): \[(?P<coords>[-0-9., ]+)\]$")


def normalise_box(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Pixel [x1, y1, x2, y2] -> 0..1, clipped to the image."""
    x1, y1, x2, y2 = box
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return (clip(x1 / width), clip(y1 / height), clip(x2 / width), clip(y2 / height))


def format_captions_and_boxes(captions: Sequence[str], boxes: Sequence[tuple[str, Sequence[float]]]) -> str:
    """METHOD.md's retrieved-annotation text: captions one per line, a blank line, the box sentence, box lines.

    ``boxes`` are ``(label, [x1, y1, x2, y2])`` already normalised to 0..1; printed with 3 decimals.
    """
    lines = [c.strip() for c in captions if c and c.strip()]
    text = "\n".join(lines)
    if boxes:
        box_lines = [f"{label}: [{', '.join(f'{v:.3f}' for v in coords)}]" for label, coords in boxes]
        text += "\n\n" + BOX_EXPLANATION + "\n" + "\n".join(box_lines)
    return text


def parse_captions_and_boxes(text: str) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Inverse of ``format_captions_and_boxes`` (boxes come back rounded to 3 decimals)."""
    head, _, tail = text.partition("\n\n")
    captions = [line for line in head.split("\n") if line]
    boxes: list[tuple[str, list[float]]] = []
    for line in tail.split("\n"):
        match = _BOX_LINE.match(line)
        if match:
            boxes.append((match["label"], [float(v) for v in match["coords"].split(",")]))
    return captions, boxes
