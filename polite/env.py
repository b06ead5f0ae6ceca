"""Process-wide environment defaults that must be set before Prefect or Hugging Face libraries import."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_DEFAULTS = {
    # Prefect: no telemetry; ephemeral mode talks to its own local server, which must never go via a proxy.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    # Prefect waits 20 s for its ephemeral API server by default, which a busy 2-core machine can miss.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Tokenizers fork warnings are noise in Prefect worker threads.
    "TOKENIZERS_PARALLELISM": "false",
}


# Libraries' tqdm bars ("Loading weights 39/39", "Writing model shards") where no one watches them: in a pipe, a
# CI log or Prefect's log of a deployment each is a line of carriage returns that says nothing the run's own log
# does not. huggingface_hub's switch covers transformers too; tqdm's own (TQDM_DISABLE) every other library.
# Read when those libraries are imported, so set before: `polite` imports this module first.
_QUIET_BARS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def interactive() -> bool:
    """Whether progress bars have someone to watch them: stderr (where tqdm draws) is a terminal."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def configure_runtime_env() -> None:
    """Apply our defaults without overriding anything the user set explicitly."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not interactive():
        for key, value in _QUIET_BARS.items():
            os.environ.setdefault(key, value)
    # Both spellings, merged: urllib and httpx prefer the lowercase one when both are set, and a user's
    # lowercase-only ``no_proxy`` must keep its hosts.
    hosts: list[str] = []
    for value in (os.environ.get("no_proxy", ""), os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost"):
        hosts += [h for h in (p.strip() for p in value.split(",")) if h and h not in hosts]
    merged = ",".join(hosts)
    os.environ["NO_PROXY"] = merged
    os.environ["no_proxy"] = merged


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, read as huggingface_hub reads it: nothing is
    downloaded then, whatever a config's ``allow_download`` says."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


class _RandomInitNotes(logging.Filter):
    """open_clip's notes that the model it just built has random weights (it logs them on the root logger)."""

    NOTES = ("No pretrained weights loaded for model", "Local config loaded, but no CLIP weights found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("open_clip" in record.pathname and str(record.msg).startswith(self.NOTES))


@contextmanager
def random_init_on_purpose() -> Iterator[None]:
    """Around an ``open_clip.create_model`` whose random weights are the point: a tiny model made on the spot,
    whose weights are saved next (models/tiny.py, filters/tiny.py). There open_clip's two warnings (``no CLIP
    weights found``, ``Model initialized randomly``) describe the plan, not a problem, yet read as one in the
    run's log. Anywhere else they stay: a real model built without weights is worth a warning."""
    root = logging.getLogger()
    notes = _RandomInitNotes()
    root.addFilter(notes)
    try:
        yield
    finally:
        root.removeFilter(notes)
