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


def row_problem(row: dict[str, Any]) -> str | None:
    """Why a training-set row cannot be trained on (``None`` when it can): no prompt, no target, bad images.
    An empty target would teach the rewriter to answer with nothing but eos."""
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        return "no prompt"
    if not isinstance(row.get("target"), str) or not row["target"].strip():
        return "empty target"
    images = row.get("images") or []
    if not isinstance(images, list | tuple) or not all(isinstance(p, str) and p for p in images):
        return f"bad images: not a list of paths: {images!r}"
    return None


def make_examples(
    rows: list[dict[str, Any]], tokenizer, max_length: int
) -> tuple[list[Example], dict[str, str]]:
    """Tokenized examples, and the rows skipped as ``{pair_id: reason}`` (malformed, or a prompt longer than the
    context): one bad pair is left out and recorded, it does not stop the run."""
    out, skipped = [], {}
    for r in rows:
        problem = row_problem(r)
        built = None if problem else build_example(tokenizer, r["prompt"], r["target"], max_length)
        if built is None:
            skipped[str(r["pair_id"])] = problem or f"prompt too long: over max_length {max_length}"
            continue
        out.append(Example(r["pair_id"], tuple(r.get("images") or ()), tuple(built[0]), tuple(built[1])))
    return out, skipped


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


class BatchPlan:
    """The examples of each optimizer step, a fixed function of (examples, seed, step): a resumed run sees exactly
    the batches an uninterrupted one would.

    Without ``lengths``: a fresh shuffle per epoch, cut into steps of ``batch_size`` (the last step of an epoch
    runs on into the next). With ``lengths`` (group by length, as Hugging Face's ``group_by_length``): each
    epoch's shuffle is cut into windows of ``window`` steps, each window is sorted by length and cut into
    steps, and the steps are shuffled; an epoch's partial step comes last. Which examples share a window stays
    random, while one step's sequences have similar lengths, so little of a padded batch is padding.
    """

    window = 50  # steps per window when grouping by length (bench/train_padding.py tries others)

    def __init__(self, n: int, seed: int, batch_size: int, lengths=None, window: int | None = None) -> None:
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.window = window or type(self).window
        self.lengths = None if lengths is None else list(lengths)
        self._cached: tuple[int, list[list[int]]] | None = None

    def step(self, step: int) -> list[int]:
        if self.lengths is None:
            out = []
            for k in range(step * self.batch_size, (step + 1) * self.batch_size):
                epoch, pos = divmod(k, self.n)
                out.append(epoch_order(self.n, self.seed, epoch)[pos])
            return out
        epoch, index = divmod(step, -(-self.n // self.batch_size))
        return list(self._grouped(epoch)[index])

    def _grouped(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            order, span = epoch_order(self.n, self.seed, epoch), self.batch_size * self.window
            full, partial = [], []
            for start in range(0, self.n, span):
                ranked = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
                for j in range(0, len(ranked), self.batch_size):
                    (full if j + self.batch_size <= len(ranked) else partial).append(ranked[j : j + self.batch_size])
            random.Random(f"steps:{self.seed}:{epoch}").shuffle(full)
            self._cached = (epoch, full + partial)
        return self._cached[1]


def by_length(examples: list[Example]) -> list[Example]:
    """One step's examples longest first, so its micro-batches pad little; the step's gradient is their sum,
    whatever the order."""
    return sorted(examples, key=lambda e: -len(e.input_ids))


class ImageCache:
    """Preprocessed pixels per image path, computed once per training run; an image that cannot be read is
    remembered with the reason, and ``problem`` tells which examples to skip for it."""

    # at most this many images kept (least recently used dropped): at 336 px one is 1.35 MB of float32, and the
    # paper's training set names ~80k images, which unbounded would not fit in memory
    max_items = 2048

    def __init__(self, image_processor, max_items: int | None = None):
        from collections import OrderedDict

        self.image_processor = image_processor
        self.max_items = max_items or type(self).max_items
        self._pixels: OrderedDict[str, Any] = OrderedDict()
        self._bad: dict[str, str] = {}

    def pixels(self, path: str):
        if path in self._pixels:
            self._pixels.move_to_end(path)
        else:
            from models.inference import open_image

            self._pixels[path] = self.image_processor(open_image(path))
            while len(self._pixels) > self.max_items:
                self._pixels.popitem(last=False)
        return self._pixels[path]

    def problem(self, example: Example) -> str | None:
        """Why ``example``'s images cannot be used (missing, unreadable, corrupt), or ``None`` when they can."""
        for path in example.images:
            if path not in self._bad:
                try:
                    self.pixels(path)
                except Exception as exc:  # noqa: BLE001 - any failure to read one image skips its pairs only
                    self._bad[path] = f"image unreadable: {path}: {type(exc).__name__}: {exc}"
            if path in self._bad:
                return self._bad[path]
        return None

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
