"""Train the rewriter on (distorted -> original) pairs: LoRA by default, loss only on the revised response.

    result = train_rewriter("train.parquet", base="workspace/models/tiny-base", out_dir="workspace/models/r1",
                            settings={"max_steps": 200}, seed=0)

Writes into ``out_dir``: ``checkpoints/step-N/`` every ``checkpoint_every`` steps (a crashed run resumes from the
last one, with the same batches, optimizer state and random state), and at the end a loadable model folder:
``flamingo.json`` (the base's spec + ``adapter/`` + ``trained.safetensors``), ``training.json`` (settings, losses,
speed) and ``loss.png``. A finished ``out_dir`` is returned as it is.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from models.flamingo import FlamingoSpec
from models.train_data import (
    BatchPlan,
    ImageCache,
    by_length,
    collate,
    make_examples,
    masked_loss_sum,
    read_training_set,
    split_heldout,
)
from polite.errors import NoTrainingPairs

DONE_FILE = "training.json"
# settings that say where, how fast or how long training runs: a checkpoint may be resumed with other values
# (the learning rate after warm-up is constant, so a longer run continues a shorter one exactly)
_RESUMABLE_ACROSS = ("enabled", "device", "num_threads", "checkpoint_every", "eval_every", "max_steps", "epochs",
                     "time_budget_s")  # fmt: skip


def default_groups(train_groups: list[str] | None, base_is_tiny: bool) -> list[str]:
    if train_groups:
        return list(train_groups)
    # the tiny base's LM is random: nothing for LoRA to preserve, and training it whole is cheaper than a rank-64
    # adapter on a 192-wide model and learns faster in the demo's budget
    return ["lm", "cross_attn", "perceiver"] if base_is_tiny else ["lora"]


def prepare_model(base_spec: FlamingoSpec, settings, groups: list[str], dtype=None):
    """Build the base for training: adapter unmerged (fresh or ``init_adapter``), only ``groups`` trainable."""
    from models import compat
    from models.flamingo import build_flamingo

    spec = replace(base_spec, merge_lora=False)
    lora_cfg = None
    if settings.init_adapter:
        spec = replace(spec, adapter=settings.init_adapter)
    elif "lora" in groups:
        lora_cfg = dict(
            rank=settings.lora_rank,
            alpha=settings.lora_alpha,
            dropout=settings.lora_dropout,
            targets=settings.lora_targets,
        )
    model, tokenizer, image_processor, _ = build_flamingo(spec, dtype=dtype, lora_for_training=lora_cfg)
    model.requires_grad_(False)
    compat.unfreeze(model, groups)
    return model, tokenizer, image_processor


def _trainable(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step-*[0-9]"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: Path, model, optimizer, state: dict[str, Any], keep: int = 1) -> Path:
    """Trainable tensors, optimizer and random state, and the loop state, written atomically."""
    import torch
    from safetensors.torch import save_file

    final = out_dir / "checkpoints" / f"step-{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {n: p.detach().float().contiguous().cpu() for n, p in _trainable(model).items()},
        str(tmp / "trainable.safetensors"),
    )
    rng = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators, not the CPU one
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), **rng}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted((out_dir / "checkpoints").glob("step-*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer) -> dict[str, Any]:
    import torch

    from models.checkpoints import read_state_dict

    params = _trainable(model)
    saved = read_state_dict(ckpt / "trainable.safetensors")
    if set(saved) != set(params):
        raise ValueError(
            f"checkpoint {ckpt} was made with other trainable parameters; delete it or change out_dir"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].dtype))
    extra = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return json.loads((ckpt / "state.json").read_text())


def plot_losses(history: list[float], heldout: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(history) + 1), history, lw=1, label="train (per step)")
    if heldout:
        ax.plot([s for s, _ in heldout], [v for _, v in heldout], "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (revised-response tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_rewriter(
    training_set: str,
    base: str | FlamingoSpec,
    out_dir: str | Path,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    base_is_tiny: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
    training_digest: str | None = None,
) -> dict[str, Any]:
    """Train (or resume, or return the finished) rewriter in ``out_dir``; returns a JSON-able summary.

    ``training_digest`` names the training set's content for resuming (default: the file's digest). The flow
    passes the digest of its copy with image paths relative to the workspace, so a moved or copied workspace
    resumes its checkpoint, while ``training_set`` says where the images are now."""
    import torch

    from models.loader import default_device_dtype, file_digest
    from polite.config.train import TrainSettings

    s = TrainSettings.model_validate(settings or {})
    out_dir = Path(out_dir)
    if (out_dir / DONE_FILE).exists():
        return json.loads((out_dir / DONE_FILE).read_text())["summary"]
    out_dir.mkdir(parents=True, exist_ok=True)
    device, _ = default_device_dtype(s.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(s.num_threads) if device.type == "cpu" else threads_before)
    try:
        digest = training_digest or file_digest(training_set)
        return _train(training_set, digest, base, out_dir, s, seed, base_is_tiny, on_step, log, device)
    finally:
        torch.set_num_threads(threads_before)


def cpu_threads(asked: int | None, window_s: float = 0.5) -> int:
    """Threads for CPU training: as asked; else torch's default, capped at the cores other processes leave free
    now (more threads than free cores make every matmul wait on the others: 10-15x slower measured here).

    The free cores are sampled for ``window_s`` while this process waits. The load average would also count
    this run's own previous stage (the demo's distortion workers), and so trained on one thread on an idle
    two-core machine."""
    import os

    import torch

    if asked:
        return asked
    default = torch.get_num_threads()
    if default <= 1:
        return 1
    import psutil

    cores = os.cpu_count() or 1
    busy = psutil.cpu_percent(interval=window_s) / 100.0 * cores
    return max(1, min(default, round(cores - busy)))


def _train(
    training_set, training_digest: str, base, out_dir: Path, s, seed, base_is_tiny, on_step, log, device
) -> dict[str, Any]:
    import torch

    from models.loader import as_spec, file_digest

    bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda")
    groups = default_groups(s.train_groups, base_is_tiny)

    torch.manual_seed(seed)
    base_spec = as_spec(base)
    model, tokenizer, image_processor = prepare_model(base_spec, s, groups, torch.bfloat16 if bf16 else None)
    model.to(device)
    if s.activation_checkpointing:
        from models.compat import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    params = _trainable(model)
    for p in params.values():
        p.data = p.data.float()  # master weights of what we train stay fp32

    rows = read_training_set(training_set)
    run_key = _run_key(training_digest, base_spec, s, seed, groups)
    # a checkpoint written before training_digest existed carries the key of the file as it was then
    resumable_keys = {run_key, _run_key(file_digest(training_set), base_spec, s, seed, groups)}
    train_rows, held_rows = split_heldout(rows, s.heldout_fraction, s.heldout_max, seed)
    train, skipped = make_examples(train_rows, tokenizer, s.max_length)
    heldout, skipped_held = make_examples(held_rows, tokenizer, s.max_length)
    images = ImageCache(image_processor)
    for e in heldout:  # the held-out pairs are few: check their images now, the training pairs as they come
        if (problem := images.problem(e)) is not None:
            skipped_held[e.pair_id] = problem
    heldout = [e for e in heldout if e.pair_id not in skipped_held]
    for pair_id, reason in {**skipped, **skipped_held}.items():
        log(f"skipping pair {pair_id}: {reason}")
    if not train:
        raise NoTrainingPairs(
            f"no usable training pairs in {training_set} ({len(rows)} rows; skipped: {_reasons(skipped)})"
        )
    # the training pairs' images are read as steps need them; a first look at some of them stops a run whose
    # images are all unreadable (paths relative to a workspace read from elsewhere, say) before it "trains" on
    # empty batches to a loss of 0
    probed = {e.pair_id: images.problem(e) for e in train[:PROBE_PAIRS]}
    if probed and all(probed.values()):
        _all_unreadable(training_set, len(train), probed)
    total_steps = s.max_steps or max(1, math.ceil(s.epochs * len(train) / s.batch_size))
    lengths = [len(e.input_ids) for e in train] if s.group_by_length else None
    plan = BatchPlan(len(train), seed, s.batch_size, lengths)
    heldout = by_length(heldout)  # evaluation pads less too; its mean loss does not depend on the order
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def micro_batches(examples):
        for i in range(0, len(examples), s.micro_batch_size):
            ids, mask, labels, vision_x = collate(examples[i : i + s.micro_batch_size], images)
            yield (
                ids.to(device),
                mask.to(device),
                labels.to(device),
                vision_x.to(device, torch.bfloat16 if bf16 else torch.float32),
            )

    def evaluate() -> float | None:
        if not heldout:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast:
            for ids, mask, labels, vision_x in micro_batches(heldout):
                loss, n = masked_loss_sum(model(vision_x, ids, attention_mask=mask).logits, labels)
                total, count = total + float(loss), count + n
        train_mode()
        return total / max(count, 1)

    def train_mode() -> None:
        model.train()
        if "vision" not in groups:  # a frozen tower stays in eval mode (no dropout or patch dropout)
            model.vision_encoder.eval()

    optimizer = torch.optim.AdamW(list(params.values()), lr=s.learning_rate, weight_decay=s.weight_decay)
    # skipped: {pair_id: reason} for training pairs whose images turned out unreadable when their step came
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "history": [], "heldout": [], "skipped": {},
                             "run_key": run_key}  # fmt: skip
    resumed_from = None
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        state = {"skipped": {}, **load_checkpoint(ckpt, model, optimizer)}
        if state.setdefault("run_key", run_key) not in resumable_keys:
            raise ValueError(
                f"{ckpt} is a checkpoint of another run (other base, training set, settings or seed): resuming "
                f"it would mix two runs. Delete {out_dir / 'checkpoints'} or train into another out_dir."
            )
        state["run_key"] = run_key
        resumed_from = state["step"]
        log(f"resuming from {ckpt} (step {state['step']})")
    if not state["heldout"]:
        start = evaluate()
        state["heldout"] = [[0, start]] if start is not None else []

    train_mode()
    steps_this_run, t_run = 0, time.perf_counter()
    while state["step"] < total_steps and (s.time_budget_s is None or state["elapsed_s"] < s.time_budget_s):
        t0 = time.perf_counter()
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = s.learning_rate * min(1.0, (step + 1) / max(1, s.warmup_steps))
        batch = []
        for e in (train[i] for i in plan.step(step)):
            if (problem := images.problem(e)) is None:
                batch.append(e)
            elif e.pair_id not in state["skipped"]:
                state["skipped"][e.pair_id] = problem
                log(f"skipping pair {e.pair_id}: {problem}")
        if not batch and len(state["skipped"]) >= len(train):
            _all_unreadable(training_set, len(train), state["skipped"])
        batch = by_length(batch)
        n_tokens = max(1, sum(e.n_target for e in batch))
        step_loss = 0.0
        for ids, mask, labels, vision_x in micro_batches(batch):
            with autocast:
                loss, _ = masked_loss_sum(model(vision_x, ids, attention_mask=mask).logits, labels)
            (loss / n_tokens).backward()
            step_loss += float(loss.detach()) / n_tokens
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["history"].append(step_loss)
        steps_this_run += 1
        if state["step"] % s.eval_every == 0 and heldout:
            state["heldout"].append([state["step"], evaluate()])
        state["elapsed_s"] += time.perf_counter() - t0
        if state["step"] % s.checkpoint_every == 0:
            save_checkpoint(out_dir, model, optimizer, state)
        if on_step is not None:
            on_step(state["step"], step_loss)
    train_seconds = time.perf_counter() - t_run

    if heldout and (not state["heldout"] or state["heldout"][-1][0] != state["step"]):
        state["heldout"].append([state["step"], evaluate()])
    save_checkpoint(out_dir, model, optimizer, state)
    summary = _write_model(out_dir, model, base_spec, s, groups, state, train, heldout)
    all_skipped = {**skipped, **skipped_held, **state["skipped"]}  # every skipped pair, with its reason
    summary.update(
        steps_this_run=steps_this_run,
        steps_per_s=round(steps_this_run / train_seconds, 4) if train_seconds > 0 else None,
        resumed_from=resumed_from,
        n_skipped=len(all_skipped),
        skipped=_reasons(all_skipped),
        device=str(device),
        precision="bf16" if bf16 else "fp32",
        threads=torch.get_num_threads(),
    )
    state["skipped"] = all_skipped
    # the marker of a finished folder: written whole or not at all, else a crash here leaves a folder that
    # neither loads as finished nor resumes
    tmp = out_dir / f".{DONE_FILE}.tmp"
    tmp.write_text(json.dumps({"summary": summary, "settings": s.model_dump(mode="json"), **state}, indent=1))
    tmp.replace(out_dir / DONE_FILE)
    return summary


def _run_key(training_digest: str, base_spec: FlamingoSpec, s, seed: int, groups: list[str]) -> str:
    """What a checkpoint must have been trained on to be resumed: base, training-set content, learning settings,
    seed and trained groups."""
    from models.loader import fingerprint
    from polite.ids import stable_hash

    learned = {k: v for k, v in s.model_dump(mode="json").items() if k not in _RESUMABLE_ACROSS}
    return stable_hash("train-run", fingerprint(base_spec), training_digest, learned, seed, groups)


PROBE_PAIRS = 64  # training pairs whose images are read before the first step


def _all_unreadable(training_set, n_pairs: int, problems: dict[str, str | None]) -> None:
    example = next(p for p in problems.values() if p)
    raise NoTrainingPairs(
        f"no usable training pairs in {training_set}: the images of every training pair read so far are unusable "
        f"({len(problems)} of {n_pairs}; e.g. {example}). Image paths relative to a workspace are read from the "
        "working directory: train on the training set the factory exports (polite distort --export-training-set), "
        "or make the paths absolute"
    )


def _reasons(skipped: dict[str, str]) -> dict[str, int]:
    """How many pairs were skipped for each kind of reason (the text before its ':' detail)."""
    from collections import Counter

    return dict(Counter(r.split(":")[0] for r in skipped.values()))


def _write_model(
    out_dir: Path, model, base_spec: FlamingoSpec, s, groups, state, train, heldout
) -> dict[str, Any]:
    """The trained model as a loadable folder (see the module docstring)."""
    from safetensors.torch import save_file

    from models import lora

    peft_model = getattr(model, "peft_model", None)
    adapter = base_spec.adapter
    if peft_model is not None and "lora" in groups:
        lora.save_adapter(peft_model, out_dir / "adapter")
        adapter = str(out_dir / "adapter")
    elif s.init_adapter:
        adapter = s.init_adapter
    # every trained tensor (LoRA included) goes last, so it wins over anything the base's extra weights set
    trained = {n: p.detach().float().contiguous().cpu() for n, p in _trainable(model).items()}
    save_file(trained, str(out_dir / "trained.safetensors"))
    spec = replace(
        base_spec,
        adapter=adapter,
        extra_checkpoints=[*base_spec.extra_checkpoints, str(out_dir / "trained.safetensors")],
        merge_lora=True,
    )
    spec.save(out_dir)
    plot_losses(state["history"], state["heldout"], out_dir / "loss.png")
    tail = state["history"][-10:]
    held = state["heldout"]
    return {
        "path": str(out_dir),
        "final_loss": sum(tail) / len(tail) if tail else None,
        "heldout_loss_start": held[0][1] if held else None,
        "heldout_loss_end": held[-1][1] if held else None,
        "steps": state["step"],
        "train_seconds": round(state["elapsed_s"], 2),
        "n_train": len(train),
        "n_heldout": len(heldout),
        "train_groups": groups,
        "n_trainable": sum(t.numel() for t in trained.values()),
    }
