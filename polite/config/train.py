"""Settings of rewriter training (stage 2): which base model, which pairs, which parameters, how long.

The defaults train a tiny Flamingo made in the workspace for at most 150 s on 2 CPU cores (the demo sets 300
steps and no time budget instead, about 3.5 min). The paper's run on OpenFlamingo-9B (LoRA r64 only, lr 1e-4,
batch 256, context 1024, 3 epochs, bf16) is ``base: <folder>, train_groups: [lora], learning_rate: 1e-4,
batch_size: 256, epochs: 3, time_budget_s: null`` (see docs/models.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polite.config.device import OptionalDevice

TRAIN_GROUPS = ("lora", "perceiver", "cross_attn", "embeddings", "lm", "vision")


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # "tiny": a tiny Flamingo made once in <workspace>/models/tiny-base (tokenizer trained on the training texts);
    # otherwise a model folder (with flamingo.json) or the path of a flamingo.json.
    base: str = "tiny"
    tiny_vocab_size: int = Field(default=600, ge=300)
    pairs_where: str | None = None  # SQL predicate over pairs p, samples s choosing the training pairs
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1)
    heldout_max: int = Field(default=64, ge=1)
    # parameter groups to train. None: LoRA only (the paper) on a real base; on the tiny base the whole LM,
    # cross-attention and perceiver (its random LM has nothing to preserve, and this learns fastest on a CPU).
    train_groups: list[str] | None = None
    lora_rank: int = Field(default=64, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    init_adapter: str | None = None  # continue from an existing LoRA adapter folder instead of a fresh one
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    batch_size: int = Field(default=8, ge=1)  # sequences per optimizer step
    # steps of similar-length sequences (windows of 50 steps sorted by length): 1.9x the steps/s on the demo's
    # pairs, but each step learns less (held-out loss after 300 steps 0.392 vs 0.303), so it is off by default
    group_by_length: bool = False
    micro_batch_size: int = Field(default=8, ge=1)  # sequences per forward pass (gradient accumulation)
    epochs: float = Field(default=50.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    time_budget_s: float | None = Field(default=150.0, gt=0)  # stop training after this much wall time
    max_length: int = Field(default=1024, ge=16)  # context, prompt + target tokens
    checkpoint_every: int = Field(default=50, ge=1)
    eval_every: int = Field(default=50, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False  # recompute decoder layers in backward: less memory, ~30% slower
    device: OptionalDevice = None  # None or auto: CUDA when available
    num_threads: int | None = Field(default=None, ge=1)  # CPU threads for torch (None: torch's default)

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        unknown = [g for g in self.train_groups or [] if g not in TRAIN_GROUPS]
        if unknown:
            raise ValueError(f"unknown train_groups {unknown}; choose from {list(TRAIN_GROUPS)}")
        if self.train_groups is not None and not self.train_groups:
            raise ValueError("train_groups is empty: name at least one group (e.g. [lora])")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}"
            )
        return self
