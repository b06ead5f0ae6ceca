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
    # Both spellings, merged: urllib and httpx prefer the lowercase one when both are set, and a user's
    # lowercase-only ``no_proxy`` must keep its hosts.
    hosts: list[str] = []
    for value in (os.environ.get("no_proxy", ""), os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost"):
        hosts += [h for h in (p.strip() for p in value.split(",")) if h and h not in hosts]
    merged = ",".join(hosts)
    os.environ["NO_PROXY"] = merged
    os.environ["no_proxy"] = merged
