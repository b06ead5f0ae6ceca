"""Shared builders for the rewrite tests (no tests here): samples with real images, a registered tiny model."""

from __future__ import annotations

import io
from pathlib import Path

from lineage.store import LineageStore
from polite.images import IMAGE_SCHEMA, ImageStore
from polite.record import Sample, samples_to_table

SOURCES = ("gqa", "vqav2", "coco")
TASKS = ("vqa", "vqa", "caption")
# small generation settings: a random tiny model rarely stops on its own
FAST_REWRITE = {
    "preset": "greedy",
    "overrides": {"max_new_tokens": 12},
    "token_budget": 2048,
    "max_batch_size": 8,
}


def png(color: tuple[int, int, int], size: int = 40) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(image).rectangle(
        [size // 4, size // 4, size // 2, size // 2], fill=(255 - color[0], 20, color[2])
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_samples(workspace, n: int = 12, extra_hq: int = 2) -> list[Sample]:
    """``n`` raw samples over three sources with images in the store (some shared, one with two images), plus
    ``extra_hq`` high-quality ``detailed_caption`` samples that the default selection excludes."""
    store = ImageStore(workspace.images)
    images = [
        store.put(png((40 * k % 256, 90 + 13 * k % 160, 200 - 17 * k % 200))) for k in range(max(3, n // 2))
    ]
    samples = []
    for i in range(n):
        first = images[i % len(images)]
        ids = [first.image_id]
        instruction = f"<image>\nQuestion {i}: what colour is the square?"
        if i == 3:  # a change-caption style sample with two images
            ids.append(images[(i + 1) % len(images)].image_id)
            instruction = "<image> before, <image> after. What changed?"
        samples.append(
            Sample(
                sample_id=f"s_{i:04d}",
                source=SOURCES[i % 3],
                split="val",
                task_type=TASKS[i % 3],
                instruction=instruction,
                raw_response=["red", "two dogs", "a square on a plain background", "it moved"][i % 4]
                + f" {i}",
                images=ids,
            )
        )
    for j in range(extra_hq):
        samples.append(
            Sample(
                sample_id=f"s_hq{j:02d}",
                source="llava",
                split="train",
                task_type="detailed_caption",
                instruction="<image>\nDescribe the image in detail.",
                raw_response="A long, careful description.",
                images=[images[j].image_id],
            )
        )
    lineage = LineageStore(workspace.db_path)
    lineage.migrate()
    import pyarrow as pa

    rows = [image.to_row() for image in images]
    with lineage.writer() as con:
        lineage.ingest_arrow("images", pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), con=con)
        lineage.ingest_arrow("samples", samples_to_table(samples), con=con)
    return samples


def tiny_model(root: Path) -> str:
    from models.tiny import make_tiny_rewriter

    return str(make_tiny_rewriter(root / "tiny-rewriter", seed=0))


def register_model(workspace, path: str) -> str:
    """Register the model folder as the latest rewriter, the way training does; returns its model_id."""
    from models.loader import as_spec, fingerprint

    model_id = fingerprint(as_spec(path))
    lineage = LineageStore(workspace.db_path)
    with lineage.writer() as con:
        con.execute(
            "INSERT OR IGNORE INTO models (model_id, kind, base, path) VALUES (?, 'rewriter', 'tiny', ?)",
            [model_id, path],
        )
    return model_id


def image_path(workspace, image_id: str) -> str:
    lineage = LineageStore(workspace.db_path)
    return lineage.query("SELECT path FROM images WHERE image_id = ?", [image_id]).column("path")[0].as_py()


def hold_rewrite_lock(workspace, model_id: str, max_new_tokens: int = 12):
    """A separate process that holds the rewrite lock of ``model_id`` under the greedy preset with
    ``max_new_tokens`` (the settings the rewrite tests run) until killed; returned once it holds it."""
    import subprocess
    import sys

    from flows.rewrite import rewrite_key
    from models.generation import resolve_generation

    key = rewrite_key(model_id, resolve_generation("greedy", {"max_new_tokens": max_new_tokens}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flows.rewrite import rewrite_lock; "
         "from polite.workspace import Workspace; lock = rewrite_lock(Workspace.resolve(sys.argv[1]), "
         f"{key!r}); lock.__enter__(); print('held', flush=True); time.sleep(300)", workspace.root],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder
