"""Settings of the rewrite stage: which samples, which model, how to decode, how to batch.

Generation settings are a preset (``paper``, ``greedy``, ``beam``) plus optional overrides; the merged result
is what gets recorded with every rewrite (see ``models.generation.resolve_generation``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from polite.config.device import OptionalDevice
from polite.config.names import unknown_names
from polite.record import TASK_TYPES


class GenerationOverrides(BaseModel):
    """Any subset of the decoding parameters; unset fields keep the preset's value."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(default=None, ge=1)
    min_new_tokens: int | None = Field(default=None, ge=0)
    num_beams: int | None = Field(default=None, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None


class RewriteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # None: the latest `models` row of kind 'rewriter' in the lineage. Else a model_id from that table or a path.
    model: str | None = None

    # -- which samples (a rerun's --where replaces these) --
    sources: list[str] | None = None  # None: every source
    task_types: list[str] | None = None  # None: every task type not excluded below
    # The high-quality types that stage 1 degrades into training pairs are targets, not raw annotations.
    exclude_task_types: list[str] = Field(default_factory=lambda: ["detailed_caption", "conversation"])
    exclude_sources: list[str] = Field(default_factory=list)

    # -- how to decode --
    preset: Literal["paper", "greedy", "beam"] = "greedy"
    overrides: GenerationOverrides = Field(default_factory=GenerationOverrides)
    backend: Literal["auto", "fast", "plain"] = (
        "auto"  # auto: the fast decoder whenever the settings allow it
    )

    # -- how to batch --
    shard_size: int = Field(default=512, ge=1)
    # KV-cache slots per batch: size x beams x (longest prompt + planned new tokens). auto: on CUDA, what the
    # free memory holds once the model is loaded (models/memory.py); 65536 on CPU
    token_budget: int | Literal["auto"] = "auto"
    # The fast decoder's static batches start with KV-cache room for each prompt plus this many new tokens, and
    # the token budget plans for that many; a row still decoding when the cache is full moves (with the other
    # unfinished rows) to a longer one. Rewrites rarely need max_new_tokens (1024 in the paper), so batches
    # hold several times the rows. None: room for max_new_tokens from the start.
    cache_new_tokens: int | None = Field(default=256, ge=1)
    # H200, 9B, 128/128 greedy: 10,097 tokens/s at 512 (compiled layers), 10,205 at 768 (138 of 140 GB), 8,361 at
    # 256 (uncompiled)
    max_batch_size: int = Field(default=512, ge=1)
    max_prompt_tokens: int = Field(default=1024, ge=8)  # longer prompts fail alone with reason 'too long'

    # -- where --
    device: OptionalDevice = None  # None or auto: cuda when available, else cpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cuda_graphs: bool = True
    # the fast decoder's step attention: one masked span per batch (sdpa) or each row's own cache blocks (flex,
    # FlexAttention compiled on CUDA); same function, the faster one depends on the card (BENCHMARKS.md)
    decode_attention: Literal["sdpa", "flex"] = "sdpa"
    # KV-cache granularity (keys) of the decode step: one CUDA graph per block; H200, 9B: 16 beat 64 by 1-2%
    kv_block: int = Field(default=16, ge=16, multiple_of=16)
    # static batches (and beams) move their unfinished rows to a session half the size once they fit it, so
    # finished rows stop costing compute and KV reads; same tokens
    shrink_batches: bool = True
    # run the decoder layers' work around attention through torch.compile, in the prefill and the decode steps
    # (one graph per half-layer for all layers): fuses the norms, rotations and activations between the matrix
    # products; compiles for tens of seconds once per worker process. auto: on CUDA (H200, 9B, batch 512: 10,097
    # vs 9,124 tokens/s), off on CPU (no faster there)
    compile_layers: bool | Literal["auto"] = "auto"
    # static: each batch decodes until its longest rewrite ends. continuous: samples that finish are refilled
    # with the next ones at once (any setting of the fast decoder; the plain path, for a repetition penalty,
    # stays static). auto: continuous with flex attention (and on CPU with shrink_batches off), else static:
    # every sdpa continuous step attends the whole ring cache, and on CPU shrinking static batches measured
    # 1.3-1.8x faster
    scheduling: Literal["auto", "static", "continuous"] = "auto"
    prefetch_images: bool = True  # decode the next batch's images on a CPU thread while the GPU works

    @field_validator("task_types", "exclude_task_types")
    @classmethod
    def _known_task_types(cls, value: list[str] | None) -> list[str] | None:
        # a misspelt type selects nothing (or, excluded, excludes nothing: the training targets get rewritten)
        problem = unknown_names(value or [], TASK_TYPES, "task type")
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("overrides")
    @classmethod
    def _resolves(cls, overrides: GenerationOverrides, info: ValidationInfo) -> GenerationOverrides:
        """The preset with these overrides must resolve (min_new_tokens <= max_new_tokens, ...): found here, not
        by the rewrite stage after every stage before it has run."""
        preset = info.data.get("preset")
        if preset is None:  # the preset itself is wrong: its own error says so
            return overrides
        from polite.config.generation import resolve_generation

        given = overrides.model_dump(exclude_none=True)
        try:
            resolve_generation(preset, given)
        except ValueError as exc:
            raise ValueError(f"{exc} (preset {preset!r} with overrides {given})") from None
        return overrides

    @field_validator("token_budget", mode="before")
    @classmethod
    def _budget(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"give 'auto' or a positive number of KV-cache slots, not {value!r}")

    @model_validator(mode="after")
    def _check(self) -> RewriteSettings:
        if self.task_types is not None and not self.task_types:
            raise ValueError("task_types is empty: give at least one type, or leave it out for all types")
        if self.sources is not None and not self.sources:
            raise ValueError("sources is empty: give at least one source, or leave it out for all sources")
        if self.backend == "fast" and self.overrides.repetition_penalty not in (None, 1.0):
            # caught here, not in the first GPU task: the fast decoder has no repetition penalty
            raise ValueError(
                "backend 'fast' has no repetition penalty: drop overrides.repetition_penalty, or use backend "
                "'auto' (the plain path for these settings) or 'plain'"
            )
        return self
