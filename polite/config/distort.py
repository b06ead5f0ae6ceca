"""Settings of the distortion stage (stage 1): which pairs to make, by which method, from which sources.

The ``mix`` says how many (distorted -> original) pairs each method makes from which sources; the method
sections say how. Everything that changes a pair's text is part of its *variant* (see
``tasks.distort.record.variant_for``), so changing it makes new pairs instead of mixing two settings under one key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polite.config.device import Device
from polite.config.names import unknown_names
from polite.record import TASK_TYPES

Method = Literal["llm", "augment", "retrieve"]
METHODS: tuple[str, ...] = ("llm", "augment", "retrieve")
CHAR_ACTIONS = ("insert", "substitute", "swap", "delete")
WORD_ACTIONS = ("delete", "swap", "crop")


class MixEntry(BaseModel):
    """Make ``count`` pairs with ``method`` from samples of ``sources`` (empty: every source)."""

    model_config = ConfigDict(extra="forbid")
    method: Method
    sources: list[str] = Field(default_factory=list)
    count: int | None = Field(default=None, ge=0)  # None: every eligible sample
    task_types: list[str] | None = None  # None: DistortSettings.task_types

    @model_validator(mode="after")
    def _check(self) -> MixEntry:
        problem = unknown_names(self.task_types or [], TASK_TYPES, "task type")
        if problem:
            raise ValueError(f"task_types: {problem}")
        return self


class LLMSettings(BaseModel):
    """The distorting chat LLM (method ``llm``): an OpenAI-compatible server, or a local causal LM."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["openai", "local"] = "openai"
    # openai: the model name the server serves; local: a folder with a Hugging Face causal LM (or a Hub id
    # when allow_download is true).
    model: str
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the key; unset is fine locally
    template: str = "distort_v1"  # a file tasks/distort/templates/<template>.yaml
    defect_probability: float = Field(default=0.5, ge=0, le=1)
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)  # 0: greedy, the only fully reproducible choice
    top_p: float = Field(default=1.0, gt=0, le=1)
    # Sent to the server as `stop`; replies are cut at role markers anyway, this only saves tokens.
    stop: list[str] = Field(default_factory=lambda: ["### Human:"], max_length=4)
    # HTTP backend
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0)  # extra attempts after the first, on timeouts, 5xx, 429, garbage
    backoff_s: float = Field(default=1.0, ge=0)
    # local backend
    batch_size: int = Field(default=8, ge=1)
    device: Device = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(default=2048, ge=16)  # longer conversations are cut from the left
    allow_download: bool = False  # let a local backend fetch `model` from the Hub

    @property
    def resolved_dtype(self) -> str:
        """The torch dtype name the local backend loads the model in: ``auto`` is bfloat16 on CUDA, else
        float32. The rule of ``models.text_lm._dtype``, without importing torch (a test checks they agree)."""
        if self.dtype == "auto":
            return "bfloat16" if self.device.startswith("cuda") else "float32"
        return self.dtype

    @model_validator(mode="after")
    def _check(self) -> LLMSettings:
        if not self.model.strip():
            raise ValueError("model is empty: name the served model (openai) or a model folder (local)")
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


class AugmentSettings(BaseModel):
    """Random text augmentation (method ``augment``): each step fires independently with its probability."""

    model_config = ConfigDict(extra="forbid")
    p_keep_first: float = Field(default=0.5, ge=0, le=1)  # keep only the first k sentences
    p_shuffle: float = Field(default=0.5, ge=0, le=1)  # shuffle sentences, joined by '' or a newline
    p_char: float = Field(default=0.5, ge=0, le=1)  # nlpaug character noise
    p_word: float = Field(default=0.5, ge=0, le=1)  # nlpaug word noise
    char_actions: list[Literal["insert", "substitute", "swap", "delete"]] = Field(
        default_factory=lambda: list(CHAR_ACTIONS)
    )
    # Share of words touched and share of characters changed within a touched word, drawn uniformly.
    char_rate: tuple[float, float] = (0.05, 0.3)
    word_actions: list[Literal["delete", "swap", "crop"]] = Field(default_factory=lambda: list(WORD_ACTIONS))
    word_rate: tuple[float, float] = (0.05, 0.3)  # share of words deleted/swapped/cropped, drawn uniformly
    # With four coin flips, 1 draw in 16 changes nothing; an unchanged copy teaches the rewriter nothing, so the
    # steps are drawn again (from the same seeded generator) up to this many more times before the pair fails.
    max_redraws: int = Field(default=3, ge=0, le=20)

    @model_validator(mode="after")
    def _check(self) -> AugmentSettings:
        for name in ("char_rate", "word_rate"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high <= 1, got [{lo}, {hi}]")
        if not self.char_actions or not self.word_actions:
            raise ValueError("char_actions and word_actions need at least one action each")
        return self


def _default_mix() -> list[MixEntry]:
    return [MixEntry(method="augment"), MixEntry(method="retrieve")]


class DistortSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    seed: int | None = None  # None: the factory seed
    task_types: list[str] = Field(default_factory=lambda: ["detailed_caption", "conversation"])
    mix: list[MixEntry] = Field(default_factory=_default_mix)
    shard_size: int = Field(default=1000, ge=1, le=100_000)
    llm: LLMSettings | None = None
    augment: AugmentSettings = Field(default_factory=AugmentSettings)

    @model_validator(mode="after")
    def _check(self) -> DistortSettings:
        problem = unknown_names(self.task_types, TASK_TYPES, "task type")
        if problem:
            raise ValueError(f"task_types: {problem}")
        if any(e.method == "llm" for e in self.mix) and self.llm is None:
            raise ValueError(
                "mix has an llm entry but `llm` is not set: add llm.backend (openai|local) and llm.model, "
                "or drop the llm entry"
            )
        for method in METHODS:
            entries = [e for e in self.mix if e.method == method]
            if len(entries) > 1:
                seen: set[str] = set()
                for e in entries:
                    if not e.sources or seen & set(e.sources):
                        raise ValueError(
                            f"several mix entries for method {method!r} must name disjoint, non-empty sources "
                            "(a sample makes at most one pair per method)"
                        )
                    seen |= set(e.sources)
        return self
