"""Training examples: loss only on the revised response, deterministic splits and batch order."""

from __future__ import annotations

import pytest
import torch

from models.prompts import EOS_ID, rewrite_prompt
from models.tiny import train_tokenizer
from models.train_data import (
    IGNORE,
    BatchPlan,
    build_example,
    by_length,
    collate,
    masked_loss_sum,
    split_heldout,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(
        ["a red bus on the street", rewrite_prompt("Describe.", "bus red")], vocab_size=300
    )


def test_labels_cover_exactly_the_target_and_eos(tok):
    prompt = rewrite_prompt("<image> Describe.", "bus red")
    ids, labels = build_example(tok, prompt, "A red bus.", max_length=512)
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok("A red bus.", add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + target_ids + [EOS_ID]
    assert labels == [IGNORE] * len(prompt_ids) + target_ids + [EOS_ID]
    assert tok.decode([x for x in labels if x != IGNORE], skip_special_tokens=True) == "A red bus."


def test_long_examples_are_cut_or_skipped(tok):
    prompt = rewrite_prompt("Describe.", "bus")
    prompt_ids = tok(prompt)["input_ids"]
    n_prompt = len(prompt_ids)
    long_target = "a red bus on the street " * 20
    ids, labels = build_example(tok, prompt, long_target, max_length=n_prompt + 5)
    # the whole prompt, then the target's first 5 tokens: the end of the target (and its eos) is what goes
    kept = tok(long_target, add_special_tokens=False)["input_ids"][:5]
    assert ids == prompt_ids + kept and labels == [IGNORE] * n_prompt + kept
    assert build_example(tok, prompt, "x", max_length=n_prompt) is None


def test_masked_loss_ignores_prompt_and_padding(tok):
    from models.train_data import Example

    a = build_example(tok, rewrite_prompt("Q?", "bus"), "A bus.", 512)
    b = build_example(tok, rewrite_prompt("A longer question here?", "red"), "Red.", 512)
    examples = [Example("a", (), tuple(a[0]), tuple(a[1])), Example("b", (), tuple(b[0]), tuple(b[1]))]

    class NoImages:
        def blank(self):
            return torch.zeros(3, 8, 8)

    ids, mask, labels, vision_x = collate(examples, NoImages())
    assert vision_x.shape == (2, 1, 1, 3, 8, 8)
    assert (labels[mask == 0] == IGNORE).all() and (ids[mask == 0] == 0).all()
    logits = torch.randn(2, ids.shape[1], len(tok))
    total, count = masked_loss_sum(logits, labels)
    assert count == examples[0].n_target + examples[1].n_target
    # the sum of -log p(target) over the target tokens, each predicted from the position before it
    expected = sum(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(2)
                   for t in range(1, ids.shape[1]) if labels[b, t] != IGNORE)  # fmt: skip
    torch.testing.assert_close(total, expected)
    # changing logits where the next token is not a target changes nothing
    poked = logits.clone()
    free = torch.ones_like(labels, dtype=torch.bool)
    free[:, :-1] = labels[:, 1:] == IGNORE
    poked[free] += torch.randn_like(poked[free]) * 10
    torch.testing.assert_close(masked_loss_sum(poked, labels)[0], total)


def test_heldout_split_and_batch_order_are_deterministic():
    rows = [{"pair_id": f"p{i}"} for i in range(50)]
    train, held = split_heldout(rows, 0.2, 5, seed=0)
    assert len(held) == 5 and len(train) == 45
    assert {r["pair_id"] for r in held} == {
        r["pair_id"] for r in split_heldout(rows[::-1], 0.2, 5, seed=0)[1]
    }
    plan = BatchPlan(10, 0, 2)
    first_epoch = [i for s in range(5) for i in plan.step(s)]
    assert sorted(first_epoch) == list(range(10))  # one epoch visits each example once
    assert plan.step(7) == BatchPlan(10, 0, 2).step(7)
    assert BatchPlan(10, 0, 10).step(0) != BatchPlan(10, 0, 10).step(1)  # a new epoch, a new order


def test_steps_grouped_by_length_pad_less_and_still_cover_every_example_once():
    import random

    rng = random.Random(3)
    n, batch = 803, 8
    lengths = [rng.randint(60, 520) for _ in range(n)]

    def padding(plan: BatchPlan, steps: int) -> float:
        padded = real = 0
        for s in range(steps):
            sizes = [lengths[i] for i in plan.step(s)]
            padded, real = padded + max(sizes) * len(sizes), real + sum(sizes)
        return 1 - real / padded

    per_epoch = -(-n // batch)
    grouped = BatchPlan(n, 0, batch, lengths, window=50)
    for epoch in range(2):
        seen = [i for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in grouped.step(s)]
        assert sorted(seen) == list(range(n))  # each epoch: every example once, the partial step last
        assert len(grouped.step((epoch + 1) * per_epoch - 1)) == n % batch
    assert padding(grouped, per_epoch) < 0.1 < 0.3 < padding(BatchPlan(n, 0, batch), per_epoch)
    # a fixed function of (examples, seed, step): a resumed run rebuilds the same steps
    assert [BatchPlan(n, 0, batch, lengths).step(s) for s in (5, 150, 7)] == [grouped.step(s) for s in (5, 150, 7)]
    assert grouped.step(0) != grouped.step(per_epoch) and grouped.step(0) != BatchPlan(n, 1, batch, lengths).step(0)
    with pytest.raises(ValueError, match="lengths"):
        BatchPlan(n, 0, batch, lengths[:-1])


def test_a_steps_examples_go_longest_first_into_micro_batches():
    from models.train_data import Example

    examples = [Example(f"p{k}", (), tuple(range(k)), tuple(range(k))) for k in (3, 9, 1, 5)]
    assert [len(e.input_ids) for e in by_length(examples)] == [9, 5, 3, 1]


def test_image_cache_is_bounded(tmp_path):
    """Preprocessed pixels are kept for the most recently used images only, not for every image of the run."""
    from PIL import Image

    from models.train_data import ImageCache

    calls = []

    def processor(im):
        calls.append(im)
        return torch.full((3, 4, 4), float(im.getpixel((0, 0))[0]))  # image k's pixels are all k

    paths = []
    for k in range(4):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (4, 4), (k, 0, 0)).save(paths[-1])
    cache = ImageCache(processor, max_items=2)
    for p in paths + paths[-2:]:
        cache.pixels(p)
    assert len(calls) == 4 and len(cache._pixels) == 2  # the last two came from the cache
    # most recently used, not first in: 2 was used after 3, so reading 1 drops 3 and keeps 2
    assert [int(cache.pixels(paths[k])[0, 0, 0]) for k in (2, 1, 2)] == [2, 1, 2]
    assert len(calls) == 5
    assert int(cache.pixels(paths[3]).max()) == 3 and len(calls) == 6
