"""Settings of the export stage: formats, selection, publishing gates, images, report and Hub push."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPORT_FORMATS = ("datasets", "parquet", "pf1m", "llava")
ExportFormat = Literal["datasets", "parquet", "pf1m", "llava"]
# Which duplicate items an export drops (tasks/export_dedupe.py): none; exact (same images, instruction and
# response); response (same response, whatever the images and instruction).
Dedupe = Literal["none", "exact", "response"]


class ExportChecks(BaseModel):
    """SQL gates run before anything is written; a failing gate stops the export and names itself.

    Set a bound to ``null`` to switch that check off.
    """

    model_config = ConfigDict(extra="forbid")
    # Share of decided latest rewrites that were kept. The paper kept 83% (975,782 of 1.17M); the demo's
    # 2M-parameter rewriter keeps far less, so the default only catches a broken filter chain (0 kept).
    min_keep_rate: float | None = Field(default=0.01, ge=0, le=1)
    # Median of (reward of the rewrite - reward of the raw annotation) over kept items, checked only when
    # both rewards exist. The paper's median went from -2.42 to -0.50 (+1.9); 0 means "not worse".
    min_median_reward_gain: float | None = 0.0
    # No kept item may have an empty output (whitespace only counts as empty).
    no_empty_outputs: bool = True
    # Fewer selected items than this fails the export (an empty export is almost always a mistake).
    min_items: int = Field(default=1, ge=0)


class ExportSettings(BaseModel):
    """How `polite export` (and the factory's last stage) publishes the kept rewrites."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    formats: list[ExportFormat] = Field(default_factory=lambda: ["datasets", "pf1m", "llava"])
    # SQL predicate over the `lineage` view that replaces the default `kept`: write "kept AND source = 'gqa'"
    # to stay within the kept rewrites.
    where: str | None = None
    # Images of the JSON layouts: hard-link into the export folder (falls back to a copy across devices or
    # on remote storage), copy, or leave out. `datasets`/`parquet` always embed image bytes.
    images: Literal["link", "copy", "none"] = "link"
    checks: ExportChecks = Field(default_factory=ExportChecks)
    # Every export counts its duplicate items (responses compared after whitespace normalisation); this drops
    # them, keeping the first of each group by sample_id. "exact": an item with the same images, instruction and
    # response as an earlier one; "response": an item whose response repeats an earlier one's, whatever its
    # images and instruction (a rewriter that gives one answer to many questions; it also drops every exact
    # duplicate). "none" keeps them all: the default, so an export's items and id change only when asked.
    dedupe: Dedupe = "none"
    report: Literal["markdown", "html", "none"] = "markdown"
    sample_cards: int = Field(default=6, ge=0, le=100)
    push_to_hub: str | None = None  # "user/name": pushes the parquet export with a dataset card
    private: bool = True

    @field_validator("formats")
    @classmethod
    def _non_empty_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"give at least one export format out of {list(EXPORT_FORMATS)}")
        return list(dict.fromkeys(value))
