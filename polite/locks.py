"""Exclusive locks beside a workspace's lineage database, for work that two flows at once would do twice.

Two rewrite flows over the same samples, model and settings would never write a sample twice (ids are equal), but
both would spend the GPUs on the same shards, and their attempt numbers would race. So a rewrite flow holds a lock
named after its key for as long as it runs, and a second one stops before any work with who holds it.

The lock is an OS file lock (``filelock``), which the OS drops when its holder dies, ``kill -9`` included: a
crash never leaves a stale lock. It sits next to the DuckDB file, which is always local (polite/workspace.py),
because only the flow process, which writes that file, takes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from polite.errors import Busy


class WorkspaceBusy(Busy, RuntimeError):
    """Another process holds the lock; the message says which and since when. The CLI exits 75 (EX_TEMPFAIL)
    for it, not 2: nothing is wrong with the request, it can run once the other one ends (polite/errors.py)."""


def _files(db_path: Path, name: str) -> tuple[FileLock, Path]:
    folder = Path(db_path).parent / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    # the holder's name sits beside the lock: opening a lock file may truncate it
    return FileLock(folder / f"{name}.lock", timeout=0), folder / f"{name}.holder"


def _busy(holder: Path, what: str) -> WorkspaceBusy:
    try:
        info = json.loads(holder.read_text())
        who = f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError):
        who = "another process"
    return WorkspaceBusy(
        f"{what} is already running in this workspace ({who}); wait for it to finish or stop it. "
        "Resuming afterwards picks up whatever it leaves."
    )


@contextmanager
def exclusive(db_path: Path, name: str, what: str) -> Iterator[None]:
    """Hold the lock ``name`` of the workspace whose lineage is ``db_path`` while the block runs; raise
    ``WorkspaceBusy`` at once if another process holds it. ``what`` names the work in that message."""
    lock, holder = _files(db_path, name)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(holder, what) from None
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())  # as `polite runs` shows times
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        yield
    finally:
        lock.release()


def probe(db_path: Path, name: str, what: str) -> None:
    """Raise ``WorkspaceBusy`` as ``exclusive`` would if the lock is held now; else return at once, holding
    nothing and naming no holder: a dry run or a command's early check must not pass for the holder of the work
    it only looks at."""
    lock, holder = _files(db_path, name)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(holder, what) from None
    lock.release()
