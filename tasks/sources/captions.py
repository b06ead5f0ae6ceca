"""Adapters for the captioning sources of PF-1M (layouts from /work/shared/DATASETS.md, 2026-08)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from polite.formats import format_captions_and_boxes, normalise_box
from tasks.sources.base import Adapter, Draft, text_list
from tasks.sources.loading import SourceError, cached, load_source

BOX_FORMATS = ("xyxy", "xywh")


def _category_names(features: Any) -> list[str] | None:
    """The ClassLabel names of ``objects.category`` in either layout `datasets` uses for a sequence of structs."""
    objects = features.get("objects")
    inner = getattr(objects, "feature", objects)  # List(struct) -> struct; dict of lists stays a dict
    category = inner.get("category") if isinstance(inner, dict) else None
    category = getattr(category, "feature", category)
    return list(category.names) if hasattr(category, "names") else None


def _objects(value: Any) -> list[dict]:
    """Object list from list-of-structs or struct-of-lists storage."""
    if value is None:
        return []
    if isinstance(value, dict):
        keys = list(value)
        n = len(value[keys[0]]) if keys else 0
        return [{k: value[k][i] for k in keys} for i in range(n)]
    return list(value)


class BoxSource:
    """Boxes of a detection-datasets/coco style dataset, looked up by image id.

    Holds only an ``image id -> row`` index; the rows stay memory-mapped and are read one image at a time,
    never the images themselves. Built once per process (``BoxSource.open``).
    """

    COLUMNS = ["image_id", "width", "height", "objects"]

    def __init__(self, dataset, box_format: str, origin: str):
        missing = [c for c in self.COLUMNS if c not in dataset.column_names]
        if missing:
            raise SourceError(f"boxes source {origin}: column(s) {missing} not found; columns found: {dataset.column_names}")
        self.table = dataset.with_format("arrow").select_columns(self.COLUMNS)
        self.names = _category_names(dataset.features)
        self.box_format = box_format
        ids = self.table.select_columns(["image_id"])[:]["image_id"].to_pylist()
        self.index = {str(image_id): i for i, image_id in enumerate(ids)}
        self._check(origin)

    @classmethod
    def open(cls, from_: str, split: str, box_format: str, revision: str | None, cache_dir: str | None) -> BoxSource:
        if box_format not in BOX_FORMATS:
            raise SourceError(f"options.box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        return cached(
            ("boxes", from_, split, box_format, revision, cache_dir),
            lambda: cls(load_source(from_, split, None, revision, cache_dir), box_format, from_),
        )

    def _convert(self, row: dict) -> tuple[list, int]:
        """``[(label, [x1, y1, x2, y2] in 0..1)]`` for one image, and how many boxes were inverted."""
        width, height = float(row["width"] or 0), float(row["height"] or 0)
        found, inverted = [], 0
        if width <= 0 or height <= 0:
            return found, inverted
        for obj in _objects(row["objects"]):
            bbox, category = obj.get("bbox"), obj.get("category")
            if not bbox or len(bbox) != 4 or category is None:
                continue
            try:
                x1, y1, a, b = (float(v) for v in bbox)
            except (TypeError, ValueError):  # a null coordinate: skip this box like a malformed one
                continue
            xyxy = (x1, y1, x1 + a, y1 + b) if self.box_format == "xywh" else (x1, y1, a, b)
            if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
                inverted += 1
                continue
            label = self.names[category] if self.names and isinstance(category, int) else str(category)
            found.append((label, list(normalise_box(xyxy, width, height))))
        return found, inverted

    def _check(self, origin: str, sample: int = 500) -> None:
        """Boxes that come out inverted in the chosen format mean the other format: say so before any work."""
        total = inverted = 0
        for row in self.table[: min(sample, len(self.index))].to_pylist():
            found, bad = self._convert(row)
            total, inverted = total + len(found) + bad, inverted + bad
        if total and inverted > 0.1 * total:
            other = "xywh" if self.box_format == "xyxy" else "xyxy"
            raise SourceError(
                f"boxes source {origin}: {inverted} of the first {total} boxes have x2 < x1 or y2 < y1 as "
                f"{self.box_format}; set -o box_format={other}"
            )

    def get(self, image_id: Any) -> list:
        i = self.index.get(str(image_id))
        if i is None:
            return []
        return self._convert(self.table[i : i + 1].to_pylist()[0])[0]


class COCOCaptions(Adapter):
    """COCO captions, ``lmms-lab/COCO-Caption2017`` (README at main), splits val/test.

    [read] question_id (the file name), image, answer (the 5 reference captions), id, file_name, height,
    width. [inferred] ``id`` is the COCO image id (used to join boxes and as the row key).
    One sample per image: raw = the five captions, one per line, then (with boxes) a blank line, the box
    sentence and one ``label: [x1, y1, x2, y2]`` line per object (polite/formats.py, METHOD.md method 3).
    Boxes are optional: ``options.boxes_from`` names a detection-datasets/coco style source (Hub id or local
    folder; [read] columns image_id, width, height, objects{bbox, category: ClassLabel}), joined on
    ``image_id == id``; ``options.boxes_split`` (default ``val``), ``options.box_format`` ``xyxy`` (default,
    [inferred] for detection-datasets/coco) or ``xywh`` (COCO json). meta carries ``captions`` and ``boxes``.
    """

    name = "coco_captions"
    hub_id = "lmms-lab/COCO-Caption2017"
    default_split = "val"
    task_type = "caption"
    columns = ("image", "answer", "id")
    key_column = "id"
    summary = "COCO captions: five captions (+ boxes via options.boxes_from) per image (caption)"
    option_names = ("boxes_from", "boxes_split", "box_format", "boxes_revision")

    def check_options(self) -> None:
        super().check_options()
        if self.options.get("box_format", "xyxy") not in BOX_FORMATS:
            raise SourceError(f"options.box_format must be one of {BOX_FORMATS}, got {self.options['box_format']!r}")

    def prepare(self, dataset) -> None:
        self._boxes = None
        if self.options.get("boxes_from"):
            self._boxes = BoxSource.open(
                self.options["boxes_from"], self.options.get("boxes_split", "val"),
                self.options.get("box_format", "xyxy"), self.options.get("boxes_revision"), self.cache_dir,
            )

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        captions = text_list(row["answer"], "answer")
        boxes = self._boxes.get(row["id"]) if self._boxes is not None else []
        yield Draft(
            raw=format_captions_and_boxes(captions, boxes), task_type="caption", images=[row["image"]],
            meta={"captions": captions, "boxes": boxes, "file_name": row.get("file_name") or row.get("question_id")},
        )


class Flickr30k(Adapter):
    """Flickr30k, ``lmms-lab/flickr30k`` (README at commit 0d6d9049be2e), split ``test`` (all 31,783 images).

    [read] image, caption (5 strings), sentids, img_id, filename. One sample per image: raw = the five
    captions, one per line; meta carries ``captions``.
    """

    name = "flickr30k"
    hub_id = "lmms-lab/flickr30k"
    default_split = "test"
    task_type = "caption"
    columns = ("image", "caption", "img_id")
    key_column = "img_id"
    summary = "Flickr30k: five captions per image, one per line (caption)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        captions = text_list(row["caption"], "caption")
        yield Draft(raw="\n".join(captions), task_type="caption", images=[row["image"]],
                    meta={"captions": captions, "filename": row.get("filename")})


class TextCaps(Adapter):
    """TextCaps, ``lmms-lab/TextCaps`` (README at main), splits train/val/test.

    [read] question_id, question, image, image_id, caption_str (list), reference_strs, caption_id.
    [inferred] one row per image with its captions in ``caption_str``; test captions are empty (those rows
    fail). One sample per caption (turn = position), as PF-1M's TextCaps count (69.7k) exceeds its images.
    """

    name = "textcaps"
    hub_id = "lmms-lab/TextCaps"
    default_split = "val"
    task_type = "caption"
    columns = ("image", "image_id", "caption_str")
    key_column = "image_id"
    summary = "TextCaps: one sample per reference caption (caption)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        captions = text_list(row["caption_str"], "caption_str")
        for turn, caption in enumerate(captions):
            yield Draft(raw=caption, task_type="caption", images=[row["image"]], turn=turn,
                        meta={"image_classes": row.get("image_classes") or []})
