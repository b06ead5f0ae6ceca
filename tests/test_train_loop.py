"""The training loop on the tiny model: resume after a crash, and a short run that visibly learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.checkpoints import read_state_dict
from models.loader import load_rewriter
from models.prompts import rewrite_prompt
from models.tiny import make_tiny_rewriter
from models.train import train_rewriter

COLORS = ("red", "blue", "green", "yellow")
THINGS = ("dog", "cat", "bus", "bird")


def _pairs(folder, n=40, seed=0):
    rng = random.Random(seed)
    for c in COLORS:
        Image.new("RGB", (32, 32), c).save(folder / f"{c}.png")
    rows = []
    for i in range(n):
        c, t = rng.choice(COLORS), rng.choice(THINGS)
        target = f"A {c} {t} is in the picture."
        distorted = target.lower() if i % 2 else " ".join(rng.sample(target.split(), 6))
        rows.append(dict(pair_id=f"p{i:03d}", sample_id=f"s{i}", method="augment", images=[str(folder / f"{c}.png")],
                         prompt=rewrite_prompt("<image> What is shown?", distorted), target=target))  # fmt: skip
    path = folder / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path), rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    path, rows = _pairs(folder)
    base = make_tiny_rewriter(folder / "base", seed=0, corpus=[r["prompt"] + r["target"] for r in rows])
    return path, base


SMALL = dict(batch_size=4, micro_batch_size=4, heldout_fraction=0.2, heldout_max=8, warmup_steps=2,
             lora_rank=8, learning_rate=3e-3, time_budget_s=None, num_threads=1)  # fmt: skip


class Crash(RuntimeError):
    pass


def crash_at_3(step, loss):
    """``on_step`` of a run that dies at step 3, after its checkpoint at step 2."""
    if step == 3:
        raise Crash("simulated crash")


def test_resume_after_a_crash_matches_an_uninterrupted_run(data, tmp_path):
    path, base = data
    settings = dict(SMALL, max_steps=4, checkpoint_every=2, eval_every=2)
    whole = train_rewriter(
        path, base, tmp_path / "whole", settings, seed=0, base_is_tiny=True, log=lambda m: None
    )

    with pytest.raises(Crash):
        train_rewriter(
            path, base, tmp_path / "crashed", settings, seed=0, base_is_tiny=True, on_step=crash_at_3
        )
    assert not (tmp_path / "crashed" / "training.json").exists()
    resumed = train_rewriter(path, base, tmp_path / "crashed", settings, seed=0, base_is_tiny=True)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    a = read_state_dict(tmp_path / "whole" / "trained.safetensors")
    b = read_state_dict(tmp_path / "crashed" / "trained.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["heldout_loss_end"] == pytest.approx(whole["heldout_loss_end"], rel=1e-4)
    # a finished folder is returned as it is
    again = train_rewriter(path, base, tmp_path / "whole", settings, seed=0, base_is_tiny=True)
    assert again == json.loads((tmp_path / "whole" / "training.json").read_text())["summary"]


@pytest.mark.slow
def test_short_training_lowers_heldout_loss_and_loads_back(data, tmp_path):
    path, base = data
    # LoRA (with the embeddings and cross-attention) here, so the adapter's save -> load -> merge path is covered
    # 40 steps of 8 take the held-out loss from 6.3 to 0.19: under a fifth of the start is a wide margin
    settings = dict(SMALL, max_steps=40, batch_size=8, micro_batch_size=8, checkpoint_every=40, eval_every=20,
                    train_groups=["lora", "embeddings", "cross_attn", "perceiver"])  # fmt: skip
    result = train_rewriter(path, base, tmp_path / "run", settings, seed=0, base_is_tiny=True)
    assert result["steps"] == 40
    assert result["heldout_loss_end"] < 0.2 * result["heldout_loss_start"]
    out = tmp_path / "run"
    for f in (
        "flamingo.json",
        "adapter/adapter_config.json",
        "trained.safetensors",
        "loss.png",
        "training.json",
    ):
        assert (out / f).exists(), f
    # the trained folder loads through the same loader, adapter merged, and reproduces the held-out loss
    from models.train_data import (
        ImageCache,
        collate,
        make_examples,
        masked_loss_sum,
        read_training_set,
        split_heldout,
    )

    loaded = load_rewriter(out, device="cpu", dtype=torch.float32)
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    _, held = split_heldout(read_training_set(path), 0.2, 8, seed=0)
    examples, _ = make_examples(held, loaded.tokenizer, 1024)
    ids, mask, labels, vision_x = collate(examples, ImageCache(loaded.image_processor))
    with torch.no_grad():
        total, count = masked_loss_sum(loaded.model(vision_x, ids, attention_mask=mask).logits, labels)
    assert float(total) / count == pytest.approx(result["heldout_loss_end"], rel=1e-3)


def test_cpu_threads_leave_the_cores_other_processes_keep_busy():
    """CPU training takes torch's threads only if the cores are free now: with every core busy elsewhere it
    takes one (more threads than free cores make every matmul wait on the others)."""
    import os
    import subprocess
    import sys

    from models.train import cpu_threads

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        torch.set_num_threads(max(2, cores))
        assert cpu_threads(None, window_s=1.0) == 1
        assert cpu_threads(3) == 3  # asked for: no sampling
        torch.set_num_threads(1)
        assert cpu_threads(None) == 1
    finally:
        for p in spin:
            p.kill()
        torch.set_num_threads(before)


def test_a_steps_gradient_does_not_depend_on_its_micro_batches(tmp_path, monkeypatch):
    """A step's sequences go into micro-batches longest first (less padding); the step's gradient is still the
    same sum over its target tokens as with other micro-batches (gradients compared before clipping).
    Targets of very different lengths make a per-micro-batch normalisation show."""
    import models.train as train_module

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    words = "the red dog sits on a blue sofa near the window in the warm light".split()
    rows = [dict(pair_id=f"p{i}", sample_id=f"s{i}", method="augment", images=[str(tmp_path / "red.png")],
                 prompt=rewrite_prompt("<image> Describe it.", " ".join(words[: 2 + i % 3])),
                 target=" ".join(words[: 1 + (5 * i) % 14]) + ".") for i in range(12)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    base = make_tiny_rewriter(tmp_path / "base", seed=0, corpus=[r["prompt"] + r["target"] for r in rows])
    settings = dict(SMALL, max_steps=2, batch_size=4, micro_batch_size=2, heldout_fraction=0.0,
                    checkpoint_every=2, eval_every=2)  # fmt: skip
    clip, real_by_length = torch.nn.utils.clip_grad_norm_, train_module.by_length

    def run(name: str, order) -> tuple[list[list[torch.Tensor]], list[set]]:
        grads, micro = [], []

        def recording_clip(params, max_norm):
            grads.append([p.grad.detach().clone() for p in params])
            return clip(params, max_norm)

        def recording_order(batch):
            ordered = order(batch)
            micro.append({frozenset(e.pair_id for e in ordered[k : k + 2]) for k in range(0, len(ordered), 2)})
            return ordered

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        monkeypatch.setattr(train_module, "by_length", recording_order)
        train_rewriter(str(tmp_path / "train.parquet"), base, tmp_path / name, settings, seed=0, base_is_tiny=True)
        return grads, micro

    sorted_grads, sorted_micro = run("sorted", real_by_length)
    # longest, third, ... then second, fourth, ...: every micro-batch pairs other sequences than sorted order's
    mixed_grads, mixed_micro = run("mixed", lambda batch: real_by_length(batch)[::2] + real_by_length(batch)[1::2])
    assert sorted_micro != mixed_micro  # the micro-batches really held other sequences
    assert len(sorted_grads) == len(mixed_grads) == 2
    for step_a, step_b in zip(sorted_grads, mixed_grads, strict=True):
        for ga, gb in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_a_bad_pair_is_skipped_and_recorded_not_fatal(data, tmp_path):
    """A missing or corrupt image, an empty target or a missing prompt leaves that pair out (with the reason in
    training.json) instead of crashing the run at the step that meets it."""
    path, base = data
    rows = pq.read_table(path).to_pylist()
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows[0]["images"] = [str(tmp_path / "missing.png")]
    rows[1]["images"] = [str(tmp_path / "corrupt.png")]
    rows[2]["target"] = None
    rows[3]["prompt"] = None
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    settings = dict(SMALL, max_steps=10, batch_size=8, micro_batch_size=8, heldout_fraction=0.0,
                    checkpoint_every=10, eval_every=10)  # fmt: skip
    result = train_rewriter(str(bad), base, tmp_path / "run", settings, seed=0, base_is_tiny=True)
    assert result["steps"] == 10 and result["n_skipped"] == 4  # 10 steps of 8 see every one of the 40 pairs
    assert result["skipped"] == {"image unreadable": 2, "empty target": 1, "no prompt": 1}
    recorded = json.loads((tmp_path / "run" / "training.json").read_text())["skipped"]
    assert set(recorded) == {"p000", "p001", "p002", "p003"}
    assert "missing.png" in recorded["p000"] and "corrupt.png" in recorded["p001"]


def test_a_checkpoint_restores_the_cuda_random_state_too(tmp_path, monkeypatch):
    """On a GPU, LoRA dropout draws from the CUDA generators: a resume restores them as well as the CPU one
    (CUDA faked here, so the check runs on any machine)."""
    from models.train import load_checkpoint, save_checkpoint

    cuda_state = [torch.arange(16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path, model, optimizer, {"step": 1, "history": [], "heldout": []})
    cpu_state = torch.get_rng_state()
    # the generators move on after the save (as training does): the resume must put back the saved states
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    torch.rand(3)
    load_checkpoint(ckpt, model, optimizer)
    assert len(restored) == 1 and torch.equal(restored[0][0], torch.arange(16, dtype=torch.uint8))
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_a_crash_while_writing_training_json_leaves_a_folder_that_resumes(data, tmp_path, monkeypatch):
    """training.json marks a finished folder; a write cut short must not leave a half file that every later run
    trips over."""
    from pathlib import Path

    path, base = data
    settings = dict(SMALL, max_steps=2, checkpoint_every=2, eval_every=2)
    real_write = Path.write_text

    def cut_short(self, text, *args, **kwargs):
        if "training.json" in self.name:
            real_write(self, text[:20], *args, **kwargs)
            raise Crash("disk full")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(Crash):
        train_rewriter(path, base, tmp_path / "run", settings, seed=0, base_is_tiny=True)
    monkeypatch.setattr(Path, "write_text", real_write)
    result = train_rewriter(path, base, tmp_path / "run", settings, seed=0, base_is_tiny=True)
    assert result["steps"] == 2 and result["resumed_from"] == 2


def test_a_checkpoint_of_another_run_is_not_resumed(data, tmp_path):
    """The same out_dir with another learning rate or seed refuses the old checkpoint instead of continuing it
    as if it were its own; a longer run of the same settings continues it."""
    path, base = data
    settings = dict(SMALL, max_steps=4, checkpoint_every=2, eval_every=2)

    with pytest.raises(Crash):
        train_rewriter(path, base, tmp_path / "run", settings, seed=0, base_is_tiny=True, on_step=crash_at_3)
    for other, seed in ((dict(settings, learning_rate=1e-4), 0), (settings, 1)):
        with pytest.raises(ValueError, match="another run"):
            train_rewriter(path, base, tmp_path / "run", other, seed=seed, base_is_tiny=True)
    longer = train_rewriter(path, base, tmp_path / "run", dict(settings, max_steps=5), seed=0, base_is_tiny=True)
    assert longer["resumed_from"] == 2 and longer["steps"] == 5


def test_a_checkpoint_resumes_by_the_training_digest_wherever_the_images_are_now(data, tmp_path):
    """The flow names the training set by its workspace-relative content (``training_digest``): after a move the
    file's image paths differ and the checkpoint still resumes; another digest is another run. A checkpoint from
    before the digest was passed (the file's own digest) resumes too."""
    import shutil
    from pathlib import Path

    path, base = data
    settings = dict(SMALL, max_steps=4, checkpoint_every=2, eval_every=2)

    with pytest.raises(Crash):
        train_rewriter(path, base, tmp_path / "run", settings, seed=0, base_is_tiny=True, on_step=crash_at_3,
                       training_digest="relative-content")  # fmt: skip
    moved = tmp_path / "moved"
    shutil.copytree(Path(path).parent, moved, ignore=shutil.ignore_patterns("base", "*.parquet"))
    table = pq.read_table(path)
    images = [[str(moved / Path(p).name) for p in ps] for ps in table.column("images").to_pylist()]
    moved_set = moved / "train.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("images"), "images", pa.array(images)), moved_set)
    with pytest.raises(ValueError, match="another run"):
        train_rewriter(str(moved_set), base, tmp_path / "run", settings, seed=0, base_is_tiny=True,
                       training_digest="other-content")  # fmt: skip
    resumed = train_rewriter(str(moved_set), base, tmp_path / "run", settings, seed=0, base_is_tiny=True,
                             training_digest="relative-content")  # fmt: skip
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4

    with pytest.raises(Crash):  # a checkpoint keyed by the file itself, as before training_digest
        train_rewriter(path, base, tmp_path / "old", settings, seed=0, base_is_tiny=True, on_step=crash_at_3)
    upgraded = train_rewriter(path, base, tmp_path / "old", settings, seed=0, base_is_tiny=True,
                              training_digest="relative-content")  # fmt: skip
    assert upgraded["resumed_from"] == 2 and upgraded["steps"] == 4


@pytest.mark.parametrize("probe", [64, 0])  # found by the first look, or only once the steps met every pair
def test_a_training_set_whose_images_are_all_unreadable_stops_instead_of_training_on_nothing(
    data, tmp_path, monkeypatch, probe
):
    """Paths relative to a workspace, read from another folder, find no image: the run used to go through all
    its steps on empty batches and report a loss of 0."""
    import models.train as train_module
    from models.train import NoTrainingPairs

    monkeypatch.setattr(train_module, "PROBE_PAIRS", probe)
    path, base = data
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["images"] = [f"images/ab/{Path(r['images'][0]).name}"]  # as a kept training set stores them
    relative = tmp_path / "relative.parquet"
    pq.write_table(pa.Table.from_pylist(rows), relative)
    steps: list[int] = []
    settings = dict(SMALL, max_steps=50, heldout_fraction=0.0, checkpoint_every=100, eval_every=100)
    with pytest.raises(NoTrainingPairs, match=r"the images of every training pair read so far are unusable \((\d+) "
                                              r"of 40; e\.g\. image unreadable: images/ab/"):  # fmt: skip
        train_rewriter(str(relative), base, tmp_path / "run", settings, seed=0, base_is_tiny=True,
                       on_step=lambda step, loss: steps.append(step))  # fmt: skip
    # the probe stops it before any step; without it, one pass over the 40 pairs in steps of 4 does
    assert steps == ([] if probe else list(range(1, 10)))
