"""Stable identifiers: every id in the lineage is a short hash of what defines the thing."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest over the JSON encoding of ``parts``; identical inputs give identical ids on any machine."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=32).hexdigest()[:length]


def sample_id(source: str, split: str, row_key: str | int, turn: int = 0) -> str:
    """Id of one raw annotation: re-ingesting the same source row gives the same id."""
    return "s_" + stable_hash("sample", source, split, str(row_key), int(turn))


def seed_for(run_seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from the run seed and e.g. a sample id, so shards can run in any order or place."""
    return int(stable_hash("seed", run_seed, *parts, length=15), 16)


def settings_hash(settings: dict[str, Any]) -> str:
    return stable_hash("settings", settings, length=12)
