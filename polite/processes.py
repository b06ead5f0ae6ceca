"""Processes: is the process that started a run still there (asked of the runs a flow records, flows/common.py),
and the temporary Prefect API server a flow process starts must not outlive it.

Without ``PREFECT_API_URL`` Prefect 3 runs every flow against a temporary API server: a uvicorn subprocess
(``prefect.server.api.server.SubprocessASGIServer``) that it stops at exit (``atexit``). A ``SIGTERM`` skips
that: inside a flow Prefect turns the signal into ``TerminationSignal`` (the run is recorded ``interrupted``),
then hands it back to the handler it found and sends it again, which by default ends the process on the spot,
leaving the server running with no parent. Two guards, both set up by ``flows/common.py``:

- ``stop_servers_on_sigterm``: the handler Prefect finds is ours; it stops this process's temporary servers,
  then ends the process by ``SIGTERM`` as before (exit status 143), so nothing else about a stop changes.
- ``watch_temporary_servers``: for ``kill -9``, which no handler sees, a small watcher process per server
  waits for this process to end and then stops the server that it left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

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


# -- Prefect's temporary API server --------------------------------------------------------------------------


def temporary_servers() -> list:
    """Prefect's temporary API servers running as subprocesses of this process (none unless a flow ran
    without ``PREFECT_API_URL``). Prefect keeps them in a registry on the class (one per port)."""
    module = sys.modules.get("prefect.server.api.server")
    if module is None:  # never imported: never started
        return []
    registry = getattr(module.SubprocessASGIServer, "_instances", {})
    return [s for s in list(registry.values()) if getattr(s, "server_process", None) is not None]


def stop_temporary_servers() -> None:
    """Stop them as Prefect does at exit (terminate, wait up to 5 s, kill)."""
    for server in temporary_servers():
        try:
            server.stop()
        except Exception:  # stopping on the way out: one that will not stop must not keep the others running
            pass


def _stop_servers_then_terminate(signum: int, frame) -> None:
    stop_temporary_servers()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # end as an unhandled SIGTERM would have: exit status 143, no atexit


def stop_servers_on_sigterm() -> None:
    """Make ``SIGTERM`` stop this process's temporary API servers before it ends the process.

    Installed only from the main thread and only over the default handler: a handler someone else set (a
    Prefect worker's, or Prefect's own inside a flow run) is left alone. Prefect, when a flow run starts, keeps
    the handler it found (this one) and calls it after recording the run's end, so the order is: the run is
    marked interrupted, Prefect reports the crash to the server, then the server stops, then the process ends."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_servers_then_terminate)


# Runs in its own small interpreter (-I -S: nothing of the project or site-packages loaded). argv: the flow
# process's id, the server's. Linux: pidfds, so it sleeps until one of the two ends and signals the server
# itself, never a later process given its id; elsewhere it polls once a second.
_WATCHER = """
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops its server
parent, server = int(sys.argv[1]), int(sys.argv[2])
try:
    handle = os.pidfd_open(server)
except (AttributeError, OSError):
    handle = None
try:
    parent_handle = os.pidfd_open(parent) if handle is not None and os.getppid() == parent else None
except OSError:
    parent_handle = None

def ended(timeout):
    if handle is not None:
        return bool(select.select([handle], [], [], timeout)[0])
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)

def send(sig):
    try:
        if handle is not None:
            signal.pidfd_send_signal(handle, sig)
        else:
            os.kill(server, sig)
    except OSError:
        pass

if parent_handle is not None:
    select.select([handle, parent_handle], [], [])
else:
    while os.getppid() == parent and not ended(1.0):
        pass
if not ended(0):
    send(signal.SIGTERM)
    if not ended(5.0):
        send(signal.SIGKILL)
"""

_watchers: dict[int, subprocess.Popen] = {}


def watch_temporary_servers() -> None:
    """Start one watcher per temporary API server of this process (once per server): when this process ends
    without stopping its server (``kill -9``), the watcher stops it. It ends when the server ends; it ignores
    Ctrl-C (the flow process stops the server itself then)."""
    if os.name != "posix":  # the watcher's fallback polls with os.kill(pid, 0), which on Windows ends the process
        return
    for pid, watcher in list(_watchers.items()):  # reap the watchers of servers stopped since
        if watcher.poll() is not None:
            del _watchers[pid]
    for server in temporary_servers():
        pid = server.server_process.pid
        if pid in _watchers or server.server_process.poll() is not None:
            continue
        try:
            _watchers[pid] = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()), str(pid)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
            )  # fmt: skip
        except OSError:  # no watcher: a kill -9 may leave the server behind, as without one
            pass
