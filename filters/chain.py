"""The filter chain: which scorers run, in which order, and the decision each rewrite gets.

Order (METHOD.md, cheap first): length, unchanged, repetition, truncated, answer (QA), semantic (captions), nli (QA),
clipscore (captions with images), reward (+ reward_raw). A rewrite dropped by one scorer is not scored by
the later ones unless ``full_scoring``; the reason names the first scorer (in this order) that fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from filters.answer import AnswerScorer
from filters.base import Runtime, ScoreInput, Scorer, ScoreResult
from filters.clipscore import ClipScoreScorer, clip_weights_cached, keep_paragraphs
from filters.models import available_locally, is_local_path
from filters.nli import NLIScorer
from filters.reward import RawRewardScorer, RewardScorer
from filters.semantic import SemanticScorer, semantic_model_ref
from filters.text import LengthScorer, RepetitionScorer, RougeScorer, TruncatedScorer, UnchangedScorer
from polite.config.filters import FilterSettings
from polite.errors import UserError
from polite.ids import settings_hash as hash_settings

CHAIN_ORDER = (
    "rouge",  # first: it drops nothing by default, so every rewrite gets one (PF-1M's rouge_score)
    "length",
    "unchanged",
    "repetition",
    "truncated",
    "answer",
    "semantic",
    "nli",
    "clipscore",
    "reward",
    "reward_raw",
)
SCORER_CLASSES: dict[str, type[Scorer]] = {
    "rouge": RougeScorer,
    "length": LengthScorer,
    "unchanged": UnchangedScorer,
    "repetition": RepetitionScorer,
    "truncated": TruncatedScorer,
    "answer": AnswerScorer,
    "semantic": SemanticScorer,
    "nli": NLIScorer,
    "clipscore": ClipScoreScorer,
    "reward": RewardScorer,
    "reward_raw": RawRewardScorer,
}


class ScorerUnavailableError(UserError, ValueError):
    """A scorer was enabled explicitly (``enabled: true``) but its model cannot be loaded offline."""


def decision_id(rewrite_id: str, settings_hash: str) -> str:
    """md5, because the SQL of ``--rethreshold`` must compute the very same id (DuckDB has md5)."""
    return "d_" + hashlib.md5(f"{rewrite_id}:{settings_hash}".encode()).hexdigest()[:20]


def can_download(settings: FilterSettings) -> bool:
    """Whether a missing Hub model may be fetched: allowed by the config, and not ruled out by HF_HUB_OFFLINE
    (huggingface_hub would refuse the download inside the filter task, after the chain was planned)."""
    from polite.env import hub_offline

    return settings.allow_download and not hub_offline()


def _availability(name: str, settings: FilterSettings) -> tuple[bool, str, str]:
    """(available, why not, the config line that enables it) for a model scorer."""
    download = can_download(settings)
    if name == "semantic":
        s = settings.semantic
        ok = semantic_model_ref(s, download) is not None
        return (
            ok,
            f"no model folder at {s.model}" if is_local_path(s.model) else f"model {s.model} is not available locally",
            f"filters.semantic.model: /path/to/{s.model.split('/')[-1]}",
        )
    if name in ("nli", "reward"):
        s = getattr(settings, name)
        ok = download or available_locally(s.model)
        return (
            ok,
            f"no model folder at {s.model}" if is_local_path(s.model) else f"model {s.model} is not available locally",
            f"filters.{name}.model: /path/to/{s.model.split('/')[-1]}",
        )
    if name == "clipscore":
        s = settings.clipscore
        if importlib.util.find_spec("open_clip") is None:
            return False, "open_clip is not installed", "pip install open-clip-torch"
        if s.model_config_file and not available_locally(s.model_config_file):
            return (
                False,
                f"model config {s.model_config_file} does not exist",
                "filters.clipscore.model_config_file: /path/to/config.json",
            )
        ok = (
            download
            or (is_local_path(s.pretrained) and available_locally(s.pretrained))
            or clip_weights_cached(s.model, s.pretrained)
        )
        return (
            ok,
            f"no weights file at {s.pretrained} (for open_clip {s.model})"
            if is_local_path(s.pretrained)
            else f"open_clip weights {s.model}/{s.pretrained} are not available locally",
            "filters.clipscore.pretrained: /path/to/open_clip_model.safetensors",
        )
    return True, "", ""


@dataclass
class Chain:
    """The enabled scorers in chain order, and those skipped with the config line that enables them."""

    settings: FilterSettings
    scorers: list[Scorer]
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.scorers]

    def scorer(self, name: str) -> Scorer | None:
        return next((s for s in self.scorers if s.name == name), None)

    def versions(self) -> dict[str, str]:
        return {s.name: s.version for s in self.scorers}

    def thresholds(self) -> dict[str, Any]:
        """What a decision depends on: each enabled scorer's version and thresholds."""
        return {s.name: {"version": s.version, **s.thresholds()} for s in self.scorers}

    @property
    def settings_hash(self) -> str:
        return hash_settings(self.thresholds())

    def thresholds_json(self) -> str:
        return json.dumps({"settings_hash": self.settings_hash, "scorers": self.thresholds()}, sort_keys=True)

    def spec(self) -> dict[str, Any]:
        """Plain data a worker rebuilds the identical chain from (no re-probing of the filesystem)."""
        semantic = self.scorer("semantic")
        return {
            "settings": self.settings.model_dump(mode="json"),
            "enabled": self.names,
            "semantic_model": getattr(semantic, "model_ref", None),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Chain:
        settings = FilterSettings.model_validate(spec["settings"])
        runtime = Runtime(settings.device, settings.dtype, settings.allow_download)
        scorers: list[Scorer] = []
        for name in CHAIN_ORDER:
            if name not in spec["enabled"]:
                continue
            own = settings.reward if name == "reward_raw" else getattr(settings, name)
            if name == "semantic":
                scorers.append(SemanticScorer(own, runtime, model_ref=spec.get("semantic_model")))
            else:
                scorers.append(SCORER_CLASSES[name](own, runtime))
        return cls(settings, scorers)

    # -- scoring and deciding ----------------------------------------------------------------------
    def run(
        self,
        items: Sequence[ScoreInput],
        prior: dict[str, dict[str, tuple[float | None, dict[str, Any]]]] | None = None,
        full_scoring: bool = False,
        run_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Score ``items`` through the chain; returns (new score rows, decision rows).

        ``prior`` holds scores already stored for these scorer versions (rewrite_id -> scorer -> (score,
        details)); they are reused, never recomputed, and their pass/fail is re-judged on today's thresholds.
        """
        prior = prior or {}
        alive = list(items)
        results: dict[str, dict[str, ScoreResult]] = {}
        score_rows: list[dict[str, Any]] = []
        for scorer in self.scorers:
            alive_ids = {i.rewrite_id for i in alive}
            mine: dict[str, ScoreResult] = {}
            fresh = []
            for item in items:
                if not scorer.applies(item):
                    continue
                stored = prior.get(item.rewrite_id, {}).get(scorer.name)
                if stored is not None:  # stored scores count even for rewrites dropped earlier, as in SQL
                    mine[item.rewrite_id] = ScoreResult(stored[0], stored[1], scorer.passes(*stored))
                elif item.rewrite_id in alive_ids:
                    fresh.append(item)
            for item, result in zip(fresh, scorer.score_batch(fresh), strict=True):
                mine[item.rewrite_id] = result
                score_rows.append(scorer.score_row(item, result, run_id))
            results[scorer.name] = mine
            if not full_scoring:
                alive = [i for i in alive if i.rewrite_id not in mine or mine[i.rewrite_id].passed]
        return score_rows, [self.decide(item, results, run_id) for item in items]

    def decide(
        self, item: ScoreInput, results: dict[str, dict[str, ScoreResult]], run_id: str | None
    ) -> dict[str, Any]:
        dropped_by, reason = None, "kept"
        for scorer in self.scorers:
            if not scorer.applies(item):
                continue
            result = results.get(scorer.name, {}).get(item.rewrite_id)
            if result is None:  # only after an earlier drop (or a scorer that never ran): say so
                dropped_by, reason = scorer.name, f"unscored: {scorer.name} (run `polite filter` to score)"
                break
            if not result.passed:
                dropped_by, reason = scorer.name, f"dropped: {scorer.reason(result.score, result.details)}"
                break
        final_output, removed = None, None  # None: the rewrite as it is (see filters/sql.py)
        clip = results.get("clipscore", {}).get(item.rewrite_id)
        if clip is not None and clip.score is not None:
            cut, removed = keep_paragraphs(
                item.rewrite, clip.details["paragraph_scores"], self.settings.clipscore.threshold
            )
            final_output = cut if removed else None
        return {
            "decision_id": decision_id(item.rewrite_id, self.settings_hash),
            "rewrite_id": item.rewrite_id,
            "kept": dropped_by is None,
            "reason": reason,
            "final_output": final_output,
            "run_id": run_id,
            "settings_hash": self.settings_hash,
            "dropped_by": dropped_by,
            "removed_paragraphs": removed,
            "decided_at": datetime.now(UTC).replace(tzinfo=None),
        }

    def counts(self) -> dict[str, dict[str, int]]:
        return {s.name: dict(s.counts) for s in self.scorers}


def build_chain(settings: FilterSettings | dict | None = None, only: Iterable[str] | None = None) -> Chain:
    """Resolve which scorers run. ``auto`` scorers whose model is missing are skipped (and listed with the
    line that enables them); an explicit ``enabled: true`` with a missing model fails here, before any work."""
    if not isinstance(settings, FilterSettings):
        settings = FilterSettings.model_validate(settings or {})
    from polite.env import hub_offline

    wanted = set(only) if only is not None else None
    enabled: list[str] = []
    skipped: list[dict[str, str]] = []
    offline = hub_offline()  # downloads are off whatever the config allows: no advice to allow them either
    for name in CHAIN_ORDER:
        if name == "reward_raw":
            if (
                "reward" in enabled
                and settings.reward.score_raw
                and (wanted is None or name in wanted or "reward" in wanted)
            ):
                enabled.append(name)
            continue
        flag = getattr(settings, name).enabled
        if flag is False or (wanted is not None and name not in wanted):
            continue
        ok, why, line = _availability(name, settings)
        if not ok and settings.allow_download and offline and "not available locally" in why:
            why += " (filters.allow_download is true, but HF_HUB_OFFLINE is set: nothing can be downloaded)"
        if ok:
            enabled.append(name)
        elif flag == "auto":
            skipped.append({"scorer": name, "why": why, "enable_with": line})
        else:
            # downloading helps only a Hub id (a path that is not there is a path to fix), and only online
            local = why.startswith("no ")
            no_download = local or settings.allow_download or offline or name == "clipscore" and "pip" in line
            raise ScorerUnavailableError(
                f"filters.{name} is enabled but {why}; set `{line}`"
                + ("" if no_download else " or filters.allow_download: true")
                + f", or `filters.{name}.enabled: auto` to skip it when missing"
            )
    spec = {"settings": settings.model_dump(mode="json"), "enabled": enabled}
    if "semantic" in enabled:
        spec["semantic_model"] = semantic_model_ref(settings.semantic, can_download(settings))
    chain = Chain.from_spec(spec)
    chain.skipped = skipped
    return chain
