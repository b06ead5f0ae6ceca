"""Is the process that started a run still there? Asked of the runs a flow records (flows/common.py)."""

from __future__ import annotations

import os
import socket

# the error of a run marked interrupted: nothing recorded why it stopped
INTERRUPTED = "the process ended without recording an outcome (killed, or its machine stopped)"


def this_host() -> str:
    return socket.gethostname()


def has_ended(host: str | None, pid: int | None) -> bool:
    """True only when it can be told: the process ran on this host and no process has that id now. A process on
    another host, or of an unknown host or id (a row older than the columns), is never called ended. A reused
    id reads as still running, the safe side: nothing is marked interrupted that might be going."""
    if not host or not pid or host != this_host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False
