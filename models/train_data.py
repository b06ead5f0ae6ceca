"""The rewriter's training examples: the training-set parquet -> token ids with loss only on the revised response.

The parquet is the distortion stage's fixed contract (``flows.distort.write_training_set``): pair_id, sample_id,
method, images (paths), prompt (the rewrite template filled with the distorted text), target (the original).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from models.prompts import EOS_ID

IGNORE = -100
REQUIRED_COLUMNS = ("pair_id", "images", "prompt", "target")


@dataclass(frozen=True)
class Example:
    pair_id: str
    images: tuple[str, ...]
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE on the prompt; the target tokens and eos otherwise

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def build_example(tokenizer, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` for one pair: bos + prompt + target + eos, labels only on target + eos.

    The prompt and target are tokenized apart, as generation sees them (the prompt ends where decoding starts).
    A long target is cut to fit ``max_length``; a prompt that leaves no room for a target gives ``None``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [EOS_ID]
    room = max_length - len(prompt_ids)
    if room < 2:
        return None
    target_ids = target_ids[:room]
    return prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids


def read_training_set(path: str) -> list[dict[str, Any]]:
    """Rows of the training-set parquet, checked for the contract's columns."""
    from polite.shards import read_table

    table = read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"training set {path} lacks columns {missing} (expected {list(REQUIRED_COLUMNS)})")
    return table.to_pylist()


def split_heldout(rows: list[dict[str, Any]], fraction: float, max_heldout: int, seed: int):
    """A deterministic (train, held-out) split by pair id: the same pairs are held out on every run."""
    from polite.ids import stable_hash

    ranked = sorted(rows, key=lambda r: stable_hash("heldout", seed, r["pair_id"]))
    n_held = min(max_heldout, int(round(len(rows) * fraction))) if len(rows) > 1 else 0
    held = ranked[:n_held]
    held_ids = {r["pair_id"] for r in held}
    return [r for r in rows if r["pair_id"] not in held_ids], held


def make_examples(rows: list[dict[str, Any]], tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Tokenized examples and how many rows were skipped (prompt longer than the context)."""
    out, skipped = [], 0
    for r in rows:
        built = build_example(tokenizer, r["prompt"], r["target"] or "", max_length)
        if built is None:
            skipped += 1
            continue
        out.append(Example(r["pair_id"], tuple(r.get("images") or ()), tuple(built[0]), tuple(built[1])))
    return out, skipped


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def step_indices(n: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based): a fixed shuffle per epoch, so a resumed run sees
    exactly the batches an uninterrupted one would."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        out.append(epoch_order(n, seed, epoch)[pos])
    return out


class ImageCache:
    """Preprocessed pixels per image path, computed once per training run."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self._pixels: dict[str, Any] = {}

    def pixels(self, path: str):
        if path not in self._pixels:
            from models.inference import open_image

            self._pixels[path] = self.image_processor(open_image(path))
        return self._pixels[path]

    def blank(self):
        if "" not in self._pixels:
            from PIL import Image

            self._pixels[""] = self.image_processor(Image.new("RGB", (224, 224), color="black"))
        return self._pixels[""]


def collate(examples: list[Example], images: ImageCache):
    """Right-padded ids (pad 0), attention mask, labels and (B, T_img, 1, C, H, W) pixels for a micro-batch."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    t_img = max(1, max(len(e.images) for e in examples))
    rows = []
    for e in examples:
        pix = [images.pixels(p) for p in e.images] or [images.blank()]
        pix += [images.blank()] * (t_img - len(pix))
        rows.append(torch.stack(pix))
    return ids, mask, labels, torch.stack(rows).unsqueeze(2)


def masked_loss_sum(logits, labels):
    """Summed next-token cross-entropy over the labelled (target) positions only, and their count."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE).sum())
