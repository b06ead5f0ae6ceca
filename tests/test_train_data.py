"""Training examples: loss only on the revised response, deterministic splits and batch order."""

from __future__ import annotations

import pytest
import torch

from models.prompts import EOS_ID, rewrite_prompt
from models.tiny import train_tokenizer
from models.train_data import IGNORE, build_example, collate, masked_loss_sum, split_heldout, step_indices


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
    n_prompt = len(tok(prompt)["input_ids"])
    ids, labels = build_example(tok, prompt, "a red bus on the street " * 20, max_length=n_prompt + 5)
    assert len(ids) == n_prompt + 5 and sum(x != IGNORE for x in labels) == 5
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
    first_epoch = [i for s in range(5) for i in step_indices(10, 0, s, 2)]
    assert sorted(first_epoch) == list(range(10))  # one epoch visits each example once
    assert step_indices(10, 0, 7, 2) == step_indices(10, 0, 7, 2)
    assert step_indices(10, 0, 0, 10) != step_indices(10, 0, 1, 10)  # a new epoch, a new order
