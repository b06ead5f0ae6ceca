"""The bundled ``demo`` source: ~200 synthetic scenes generated on the fly into the workspace.

The generator writes a small Hub-layout parquet dataset (``data/train-00000-of-00001.parquet`` with an
``image`` column of the `datasets` Image feature and a ``scene`` JSON column), and the adapter reads it back
through the same `datasets` loading path as every other source. Per scene: one long description
(``detailed_caption``, split ``hq``, the side distortion degrades; meta carries ``captions`` and ``boxes``),
two short VQA answers and one short caption (split ``raw``, the annotations to rewrite), and two polite answers
to other questions about the scene (``conversation``, split ``hq``: the QA half of the high-quality side).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from tasks.sources.base import Adapter, Draft
from tasks.sources.demo_scenes import make_scene, render_png, scene_record
from tasks.sources.loading import SourceError, cached, load_source

DEMO_VERSION = "v3"  # bump when the scenes or their texts change: the generated folder is reused by name
DEFAULT_SCENES = 200


def generate(folder: str | os.PathLike, n_scenes: int = DEFAULT_SCENES, seed: int = 0) -> Path:
    """Write the demo dataset under ``folder`` (skipped when already there) and return the folder."""
    import datasets

    datasets.disable_progress_bars()
    folder = Path(folder)
    target = folder / "data" / "train-00000-of-00001.parquet"
    if target.exists():
        return folder
    scenes = [make_scene(i, seed) for i in range(n_scenes)]
    features = datasets.Features(
        {"scene_id": datasets.Value("string"), "image": datasets.Image(), "scene": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict(
        {
            "scene_id": [s.scene_id for s in scenes],
            "image": [{"bytes": render_png(s), "path": None} for s in scenes],
            "scene": [json.dumps(scene_record(s), sort_keys=True) for s in scenes],
        },
        features=features,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
    table.to_parquet(str(tmp))
    os.replace(tmp, target)
    return folder


class Demo(Adapter):
    """The synthetic demo (ours; no Hub id). ``options.scenes`` (default 200) and ``options.seed`` (default 0).

    Without ``--from`` the dataset is generated into ``<workspace>/sources/demo-<version>-n<N>-s<seed>``.
    """

    name = "demo"
    default_split = "train"
    task_type = "detailed_caption"
    columns = ("scene_id", "image", "scene")
    key_column = "scene_id"
    summary = "bundled synthetic scenes: 1 description + 2 polite QA answers (hq), 2 VQA + 1 caption (raw) per scene"
    option_names = ("scenes", "seed")

    def check_options(self) -> None:
        super().check_options()
        self._int_option("scenes", DEFAULT_SCENES, 1)
        self._int_option("seed", 0, 0)

    @property
    def source(self) -> str:
        if self.spec.from_:
            return self.spec.from_
        if not self.workspace_root or "://" in self.workspace_root:
            raise SourceError("the demo source is generated into a local workspace: pass --workspace DIR")
        n, seed = self._int_option("scenes", DEFAULT_SCENES, 1), self._int_option("seed", 0, 0)
        folder = Path(self.workspace_root) / "sources" / f"demo-{DEMO_VERSION}-n{n}-s{seed}"
        return str(cached(("demo-generate", str(folder)), lambda: generate(folder, n, seed)))

    def _int_option(self, name: str, default: int, least: int) -> int:
        value = self.options.get(name, default)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SourceError(f"demo: option {name} must be a whole number >= {least}, got {value!r}; pass -o {name}=N")
        return value

    def load(self):
        return load_source(self.source, "train", None, None, self.cache_dir)

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        scene = json.loads(row["scene"])
        image = row["image"]
        yield Draft(
            raw=scene["description"], task_type="detailed_caption", images=[image], split="hq",
            meta={"captions": scene["captions"], "boxes": scene["boxes"], "shapes": scene["shapes"]},
        )
        raw_qa, hq_qa = scene["qa"][:2], scene["qa"][2:]
        for turn, (question, short, _) in enumerate(raw_qa, start=1):
            yield Draft(raw=short, task_type="vqa", question=question, images=[image], split="raw", turn=turn)
        yield Draft(raw=scene["captions"][0], task_type="caption", images=[image], split="raw",
                    turn=len(raw_qa) + 1, meta={"captions": scene["captions"]})
        # polite answers to other questions about the same scene: the QA half of the high-quality side
        for turn, (question, short, polite) in enumerate(hq_qa, start=len(raw_qa) + 2):
            yield Draft(raw=polite, task_type="conversation", question=question, images=[image], split="hq",
                        turn=turn, meta={"short_answer": short})
