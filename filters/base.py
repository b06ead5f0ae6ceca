"""What every scorer shares: the input record, the result, versioning, batching, counting, rules in SQL.

A scorer measures (``measure``: the one method a subclass writes, pure, batched) and a threshold rule
decides (``passes``). The rule exists twice, in Python for the chain and in SQL for ``--rethreshold``, and
tests hold the two equal. Scores never depend on thresholds, so the scorer version (what ``scores`` rows
are keyed by) hashes only what changes a score.
"""

from __future__ import annotations

import importlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from polite.errors import UserError
from polite.ids import stable_hash

# The same sets as polite.record's (a test keeps them in step). polite.record needs pyarrow, which a bare
# GPU image for bench/gpu_filters.py may not have; the scorers need only these two sets.
_CAPTION_TYPES = frozenset(
    {"caption", "detailed_caption", "region_caption", "change_caption", "classification"}
)
_QA_TYPES = frozenset({"vqa", "vqa_rationale", "multiple_choice"})
try:
    from polite.record import CAPTION_TYPES, QA_TYPES
except ImportError:
    CAPTION_TYPES, QA_TYPES = _CAPTION_TYPES, _QA_TYPES


class MissingDependencyError(UserError, ImportError):
    """An optional dependency of one scorer is not installed."""


def require(module: str, pip_name: str, scorer: str) -> Any:
    """Import ``module`` or fail with the ``pip install`` that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {scorer} scorer needs `{module}`: pip install {pip_name} (or disable filters.{scorer})"
        ) from exc


@dataclass(slots=True)
class ScoreInput:
    """One rewrite to score, with what its sample says about it."""

    rewrite_id: str
    rewrite: str
    raw_response: str = ""
    instruction: str = ""
    task_type: str = "caption"
    source: str = ""
    sample_id: str = ""
    image_paths: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ScoreResult:
    score: float | None
    details: dict[str, Any]
    passed: bool = True


@dataclass(frozen=True, slots=True)
class Runtime:
    """Where models run: resolved once per worker from the filter settings."""

    device: str = "cpu"
    dtype: str = "float32"
    allow_download: bool = False


def fmt(value: float | None, digits: int = 2) -> str:
    """Numbers in reasons; SQL uses ``printf('%.<digits>f')``, which rounds the same way."""
    return "null" if value is None else f"{value:.{digits}f}"


def fmt_below(score: float, threshold: float) -> str:
    """A score that missed ``threshold``, with the digits that show it: 0.399853 against 0.40 reads "0.3999",
    not "0.40 < 0.40". ``sql_fmt_below`` writes the same text."""
    return next((fmt(score, d) for d in (2, 4) if fmt(score, d) != fmt(threshold, d)), fmt(score, 6))


def sql_fmt_below(score: str, threshold: float) -> str:
    """``fmt_below`` in SQL, for a score column or expression."""
    cases = " ".join(f"WHEN printf('%.{d}f', {score}) <> '{fmt(threshold, d)}' THEN printf('%.{d}f', {score})"
                     for d in (2, 4))  # fmt: skip
    return f"(CASE {cases} ELSE printf('%.6f', {score}) END)"


def sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sql_num(value: float | int) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def strip_image_markers(text: str) -> str:
    return text.replace("<image>", " ").replace("<|endofchunk|>", " ").strip()


class Scorer:
    """Base class: batching, per-item error isolation, counting, versioning."""

    name: ClassVar[str]
    code_version: ClassVar[str] = "1"
    applies_to: ClassVar[frozenset[str] | None] = None  # task types; None = every type
    needs_image: ClassVar[bool] = False
    uses_model: ClassVar[bool] = False
    rule_reads_details: ClassVar[bool] = (
        False  # False: the SQL rule needs details only for errors (score NULL)
    )
    batch_size: int = 1024

    def __init__(self, settings: Any = None, runtime: Runtime | None = None):
        self.settings = settings
        # Resolved lazily ("auto" needs torch), so building a chain to hash settings or re-decide is cheap.
        self._runtime_spec = runtime or Runtime()
        self._runtime: Runtime | None = None
        if settings is not None and hasattr(settings, "batch_size"):
            self.batch_size = settings.batch_size
        self.counts: Counter[str] = Counter()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            from filters.models import resolve_runtime

            spec = self._runtime_spec
            self._runtime = resolve_runtime(spec.device, spec.dtype, spec.allow_download)
        return self._runtime

    # -- identity ----------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What changes this scorer's scores (not its thresholds)."""
        return {}

    @property
    def version(self) -> str:
        return f"v{self.code_version}-{stable_hash(self.name, self.identity(), length=8)}"

    def thresholds(self) -> dict[str, Any]:
        return {}

    def threshold_value(self) -> float | None:
        """The one number stored in ``scores.threshold`` (the main threshold, if any)."""
        return None

    def applies(self, item: ScoreInput) -> bool:
        if self.applies_to is not None and item.task_type not in self.applies_to:
            return False
        return not (self.needs_image and not item.image_paths)

    @classmethod
    def applies_sql(cls, task_type: str = "task_type", n_images: str = "n_images") -> str:
        """``applies`` as a SQL predicate over a task-type column and an image-count column."""
        parts = []
        if cls.applies_to is not None:
            parts.append(f"{task_type} IN ({', '.join(sql_str(t) for t in sorted(cls.applies_to))})")
        if cls.needs_image:
            parts.append(f"{n_images} > 0")
        return " AND ".join(parts) if parts else "TRUE"

    def prepare(self) -> None:
        """Load what ``measure`` needs (a model scorer loads its model here, once per process)."""

    # -- the one method a scorer implements --------------------------------------------------------
    def measure(self, items: Sequence[ScoreInput]) -> list[tuple[float | None, dict[str, Any]]]:
        raise NotImplementedError

    # -- the threshold rule, twice -----------------------------------------------------------------
    def passes(self, score: float | None, details: dict[str, Any]) -> bool:
        """Python rule; the default says a measured item passes and an errored one (score None) fails."""
        return score is not None

    def reason(self, score: float | None, details: dict[str, Any]) -> str:
        if score is None:
            return f"{self.name} error: {details.get('error', 'no score')}"
        return f"{self.name} {fmt(score)}"

    def passes_sql(self, score: str, details: str) -> str:
        return f"({score} IS NOT NULL)"

    def reason_sql(self, score: str, details: str) -> str:
        return (
            f"CASE WHEN {score} IS NULL THEN {sql_str(self.name + ' error: ')} || "
            f"coalesce(json_extract_string({details}, '$.error'), 'no score') "
            f"ELSE {sql_str(self.name + ' ')} || printf('%.2f', {score}) END"
        )

    # -- batching and counting ---------------------------------------------------------------------
    def score_batch(self, items: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Measure in batches of ``batch_size``; a batch that raises is retried item by item so one bad
        input fails only itself (its error goes to ``details``), and a non-finite score is such an error."""
        results: list[ScoreResult] = []
        if items:
            self.prepare()  # outside the per-item net: a model that cannot load fails the shard, not each item
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            try:
                measured = self.measure(chunk)
            except MissingDependencyError:
                raise
            except Exception:
                measured = []
                for item in chunk:
                    try:
                        measured.extend(self.measure([item]))
                    except MissingDependencyError:
                        raise
                    except Exception as exc:  # bad input: this item fails, the shard goes on
                        measured.append((None, {"error": f"{type(exc).__name__}: {exc}"[:500]}))
            for score, details in measured:
                if score is not None and not math.isfinite(score):
                    # NaN (e.g. an fp16 overflow): Python's `>=` says fail, DuckDB orders NaN above every
                    # number and says pass. An error row agrees in both, and the next run retries it.
                    score, details = (
                        None,
                        {"error": f"non-finite score {score}", "measured": repr(details)[:400]},
                    )
                passed = self.passes(score, details)
                self.counts["scored"] += 1
                self.counts["passed" if passed else "failed"] += 1
                if score is None:
                    self.counts["errors"] += 1
                results.append(ScoreResult(score, details, passed))
        return results

    def score_row(self, item: ScoreInput, result: ScoreResult, run_id: str | None) -> dict[str, Any]:
        return {
            "rewrite_id": item.rewrite_id,
            "scorer": self.name,
            "scorer_version": self.version,
            "score": None if result.score is None else float(result.score),
            "passed": result.passed,
            "threshold": self.threshold_value(),
            "details": json.dumps(result.details, sort_keys=True),
            "run_id": run_id,
        }
