"""LLaVA-Instruct: the high-quality, multi-turn side that distortion degrades (layout from DATASETS.md §12)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from polite.ids import stable_hash
from tasks.sources.base import Adapter, Draft, RowError, text
from tasks.sources.loading import SourceError, load_source, looks_local

PREFERRED_FILE = "llava_instruct_150k.json"


class LLaVAInstruct(Adapter):
    """LLaVA-Instruct-150K, ``liuhaotian/LLaVA-Instruct-150K`` (tree at main): JSON records, no images.

    [read] each file is a JSON array of ``{"id", "image", "conversations": [{"from": "human"|"gpt",
    "value"}]}``; ``image`` is a COCO train2017 file name resolved against a user-supplied image folder
    (``llava_v1_5_mix665k.json`` uses prefixed relative paths such as ``coco/train2017/...``).
    [inferred] ``<image>`` sits at the start or end of the first human turn (we strip it wherever it is).

    ``--from`` is a folder holding the JSON file(s) and an ``images/`` folder, a JSON file, or the Hub id;
    ``options.file`` picks the JSON file (default ``llava_instruct_150k.json``, or the only one);
    ``options.image_folder`` where images live (default ``<from>/images``, then ``<from>``).
    Every gpt turn is one sample (task_type ``conversation``): instruction = the human turn before it,
    raw = the gpt answer, meta.history = the earlier turns. Records without ``image`` (text-only) become
    samples without images. ``id`` is the COCO image id, shared by every record about one image (the 150k file
    joins the conversation, detail and complex-reasoning sets), so the row key is ``<id>:<hash of the
    conversation>``: each record keeps its samples, and the same record in two files is the same sample.
    """

    name = "llava_instruct"
    hub_id = "liuhaotian/LLaVA-Instruct-150K"
    default_split = "train"
    task_type = "conversation"
    columns = ("id", "conversations")
    key_column = "id"
    summary = "LLaVA-Instruct: each gpt turn of a conversation (conversation; the high-quality side)"
    version = "2"  # 2: the row key adds a hash of the conversation (ids repeat across records)
    option_names = ("file",)

    def _file(self) -> str:
        if self.options.get("file"):
            return self.options["file"]
        if self.spec.from_ and looks_local(self.spec.from_):
            folder = Path(os.path.expanduser(self.spec.from_))
            if folder.is_file():
                return folder.name
            found = sorted(p.name for p in folder.glob("*.json*"))
            if PREFERRED_FILE in found:
                return PREFERRED_FILE
            if len(found) == 1:
                return found[0]
            raise SourceError(f"llava_instruct: pick one JSON file with --option file=NAME; found {found} in {folder}")
        return PREFERRED_FILE

    def load(self):
        origin = self.source
        if looks_local(origin) and Path(os.path.expanduser(origin)).is_file():
            return load_source(origin, None, None, None, self.cache_dir)
        return load_source(origin, None, None, self.spec.revision, self.cache_dir, data_files=self._file())

    def image_roots(self) -> list[Path]:
        roots = super().image_roots()
        if self.spec.from_ and looks_local(self.spec.from_) and not self.options.get("image_folder"):
            src = Path(os.path.expanduser(self.spec.from_)).resolve()
            roots.insert(0, (src if src.is_dir() else src.parent) / "images")
        return roots

    def prepare(self, dataset) -> None:
        """Fail before any work when none of the first image names resolves: the image folder is wrong."""
        if "image" not in dataset.column_names:
            return
        roots = self.image_roots()
        names = [n for n in dataset.with_format("arrow")[: min(20, dataset.num_rows)]["image"].to_pylist() if n]
        if names and not any((root / name).is_file() for name in names for root in roots):
            raise SourceError(
                f"llava_instruct: none of the first {len(names)} image files (e.g. {names[0]!r}) is in "
                f"{[str(r) for r in roots]}; pass -o image_folder=DIR (COCO train2017 for llava_instruct_150k.json)"
            )

    def row_key(self, row: dict, index: int) -> str:
        return f"{super().row_key(row, index)}:{stable_hash('llava-record', row.get('conversations'), length=10)}"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise RowError("conversations is empty")
        images = [row["image"]] if row.get("image") else []
        history: list[dict] = []
        question = None
        answer_turn = 0
        for turn in turns:
            speaker, value = (turn or {}).get("from"), (turn or {}).get("value")
            if speaker == "human":
                question = text(value, "human turn")
            elif speaker == "gpt":
                if question is None:
                    raise RowError("a gpt turn comes before any human turn")
                yield Draft(
                    raw=value, task_type="conversation", instruction=question, images=images, turn=answer_turn,
                    meta={"history": list(history), "n_turns": len(turns)},
                )
                history += [{"from": "human", "value": question}, {"from": "gpt", "value": value}]
                question = None
                answer_turn += 1
            else:
                raise RowError(f"unknown speaker {speaker!r} (expected human or gpt)")
