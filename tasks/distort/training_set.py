"""The rewriter's training set built from pairs: the fixed contract that models/train.py reads.

Columns: pair_id, sample_id, method, images (image file paths/URLs in instruction order), prompt
(``models.prompts.rewrite_prompt(instruction, distorted)``, byte-exact) and target (the original response).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from models.prompts import rewrite_prompt

TRAINING_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("sample_id", pa.string()),
        ("method", pa.string()),
        ("images", pa.list_(pa.string())),
        ("prompt", pa.string()),
        ("target", pa.string()),
    ]
)


def training_rows(pairs: list[dict[str, Any]], image_paths: dict[str, str]) -> tuple[pa.Table, list[str]]:
    """The training table, and the pair ids left out because an image id has no row in ``images``.

    ``pairs`` rows carry pair_id, sample_id, method, image_ids, instruction, distorted, original.
    """
    rows, unresolved = [], []
    for p in pairs:
        ids = p.get("image_ids") or []
        if any(i not in image_paths for i in ids):
            unresolved.append(p["pair_id"])
            continue
        rows.append(
            {
                "pair_id": p["pair_id"],
                "sample_id": p["sample_id"],
                "method": p["method"],
                "images": [image_paths[i] for i in ids],
                "prompt": rewrite_prompt(p["instruction"] or "", p["distorted"]),
                "target": p["original"],
            }
        )
    return pa.Table.from_pylist(rows, schema=TRAINING_SCHEMA), unresolved
