"""The pair record (one distorted -> original training pair), its Arrow schema, and its identifiers.

A pair's ``variant`` is a hash of everything that decides its text except the sample: the method, the run
seed, the template version and the method's settings (for ``llm`` also the LLM's identity). ``pair_id`` is a
hash of the sample and the variant, so the same sample under the same settings is the same pair on any
machine, and "already made" is a plain SQL anti-join on (sample_id, variant).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from polite.config.distort import DistortSettings
from polite.ids import seed_for, stable_hash

AUGMENT_VERSION = "augment-v2"  # v2: one-character draws use choice(), so texts differ from v1
RETRIEVE_VERSION = "retrieve-v1"

PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("sample_id", pa.string()),
        ("method", pa.string()),
        ("variant", pa.string()),
        ("params", pa.string()),
        ("seed", pa.int64()),
        ("template_version", pa.string()),
        ("llm", pa.string()),
        ("instruction", pa.string()),
        ("original", pa.string()),
        ("distorted", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


class DistortError(ValueError):
    """This one sample cannot be distorted this way; the reason lands in ``pairs.error``."""


@dataclass(slots=True)
class Pair:
    pair_id: str
    sample_id: str
    method: str
    variant: str
    seed: int
    template_version: str
    instruction: str
    original: str
    distorted: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    llm: str | None = None
    status: str = "ok"
    error: str | None = None

    def fail(self, reason: str) -> Pair:
        self.status, self.error = "failed", reason
        return self

    def to_row(self) -> dict[str, Any]:
        return {
            "pair_id": self.pair_id,
            "sample_id": self.sample_id,
            "method": self.method,
            "variant": self.variant,
            "params": json.dumps(self.params, sort_keys=True, ensure_ascii=False),
            "seed": self.seed,
            "template_version": self.template_version,
            "llm": self.llm,
            "instruction": self.instruction,
            "original": self.original,
            "distorted": self.distorted,
            "status": self.status,
            "error": self.error,
        }


def pairs_to_table(pairs: list[Pair]) -> pa.Table:
    return pa.Table.from_pylist([p.to_row() for p in pairs], schema=PAIR_SCHEMA)


def template_version(method: str, settings: DistortSettings) -> str:
    if method == "llm":
        from tasks.distort.prompting import load_template

        assert settings.llm is not None
        return load_template(settings.llm.template).version
    return {"augment": AUGMENT_VERSION, "retrieve": RETRIEVE_VERSION}[method]


def variant_for(method: str, settings: DistortSettings, run_seed: int, llm_identity: str | None = None) -> str:
    """Hash of what decides a pair's text besides the sample (see the module docstring)."""
    knobs: dict[str, Any] = {}
    if method == "augment":
        knobs = settings.augment.model_dump(mode="json")
    elif method == "llm":
        assert settings.llm is not None and llm_identity
        llm = settings.llm
        # Only what changes the reply; concurrency, timeouts and batch size do not.
        knobs = {
            "llm": llm_identity,
            "defect_probability": llm.defect_probability,
            "max_new_tokens": llm.max_new_tokens,
            "temperature": llm.temperature,
            "top_p": llm.top_p,
            "max_prompt_tokens": llm.max_prompt_tokens if llm.backend == "local" else None,
        }
    return "v_" + stable_hash("variant", method, run_seed, template_version(method, settings), knobs, length=12)


def new_pair(row: dict[str, Any], method: str, variant: str, run_seed: int, version: str) -> Pair:
    """The pair for one selected sample row, before its method fills in ``distorted``."""
    sid = row["sample_id"]
    return Pair(
        pair_id="p_" + stable_hash("pair", sid, variant),
        sample_id=sid,
        method=method,
        variant=variant,
        seed=seed_for(run_seed, "distort", method, sid),
        template_version=version,
        instruction=row.get("instruction") or "",
        original=row.get("raw_response") or "",
    )
