"""Process-wide environment defaults that must be set before Prefect or Hugging Face libraries import."""

from __future__ import annotations

import os

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


def configure_runtime_env() -> None:
    """Apply our defaults without overriding anything the user set explicitly."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    no_proxy = os.environ.get("NO_PROXY", "")
    wanted = ["127.0.0.1", "localhost"]
    missing = [h for h in wanted if h not in no_proxy.split(",")]
    if missing:
        merged = ",".join([p for p in no_proxy.split(",") if p] + missing)
        os.environ["NO_PROXY"] = merged
        os.environ["no_proxy"] = merged
