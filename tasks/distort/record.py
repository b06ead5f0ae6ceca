"""The pair record (one distorted -> original training pair), its Arrow schema, and its identifiers.

A pair's ``variant`` is a hash of everything that decides its text except the sample: the method, the run
seed, the template version and the method's settings (for ``llm`` also the LLM's identity; the settings that
joined later count only where they differ from ``LATE_LLM_BASELINE``, so older variants stay). ``pair_id`` is a
hash of the sample and the variant, so the same sample under the same settings is the same pair on any
machine, and "already made" is a plain SQL anti-join on (sample_id, variant).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from polite.config.distort import DistortSettings, LLMSettings
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


# Settings that joined the variant after pairs had been made without them, with the values those pairs were
# made with (the defaults of the time). Each joins the hash only when the settings differ from this value, so
# the variants of existing workspaces stay what they were, and a change still makes new pairs. Frozen on
# purpose: if a default changes later, pairs made under the new default must get a new variant.
LATE_LLM_BASELINE: dict[str, Any] = {"stop": ["### Human:"], "device": "cpu", "dtype": "float32"}


def _late_llm_knobs(llm: LLMSettings) -> dict[str, Any]:
    """The settings of ``LATE_LLM_BASELINE`` that differ from it, for the backend that uses them."""
    if llm.backend == "openai":
        # Only the HTTP backend sends `stop`; the server ends the reply at the first match, so a stop string
        # that can occur in a curt answer ("\n", ".") cuts the text. Order and repeats do not matter. A stop
        # string that is itself a role marker changes nothing (parsing cuts there anyway), but telling those
        # apart would copy the parser's rules here: any set other than the baseline makes new pairs. Device and
        # dtype are the server's business here, known to the variant only through the LLM's identity.
        stop = sorted(set(llm.stop))
        return {"stop": stop} if stop != LATE_LLM_BASELINE["stop"] else {}
    knobs: dict[str, Any] = {}
    # dtype changes the text: bfloat16 keeps 8 bits of mantissa, so its logits round differently from float32,
    # greedy decoding soon picks another token somewhere, and the reply diverges from there. The dtype as
    # loaded counts: `auto` on the CPU is float32 (the same variant as `float32`), on CUDA bfloat16.
    if llm.resolved_dtype != LATE_LLM_BASELINE["dtype"]:
        knobs["dtype"] = llm.resolved_dtype
    # The device kind changes the text too, at the same dtype: CPU and CUDA kernels sum in different orders
    # (and CUDA picks other matmul and attention kernels), so greedy decoding can resolve a near-tie the other
    # way, and one flipped token changes the rest of the reply. Rare per token, but systematic: the same on
    # every rerun on that kind of device, so CPU- and CUDA-made pairs are not the same pairs and the lineage
    # should tell them apart. The index (cuda:0, cuda:1) only picks a card: left out. The local backend
    # ignores `stop` (it generates to EOS or max_new_tokens; parsing cuts at role markers): left out.
    # Out of the variant's sight either way: the card's model and the library versions, as with a server.
    kind = llm.device.split(":", 1)[0]
    if kind != LATE_LLM_BASELINE["device"]:
        knobs["device"] = kind
    return knobs


def variant_for(method: str, settings: DistortSettings, run_seed: int, llm_identity: str | None = None) -> str:
    """Hash of what decides a pair's text besides the sample (see the module docstring)."""
    knobs: dict[str, Any] = {}
    if method == "augment":
        knobs = settings.augment.model_dump(mode="json")
    elif method == "llm":
        assert settings.llm is not None and llm_identity
        llm = settings.llm
        # Only what changes the reply; concurrency, timeouts and retries do not. Nor does batch_size (local),
        # although batch padding can flip a greedy near-tie and sampling is seeded per batch: which samples
        # share a batch depends on what is left to do, which no setting fixes. base_url is left out too: the
        # server's model is named by the identity, and moving a server must not remake its pairs.
        knobs = {
            "llm": llm_identity,
            "defect_probability": llm.defect_probability,
            "max_new_tokens": llm.max_new_tokens,
            "temperature": llm.temperature,
            "top_p": llm.top_p,
            "max_prompt_tokens": llm.max_prompt_tokens if llm.backend == "local" else None,
            **_late_llm_knobs(llm),
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
