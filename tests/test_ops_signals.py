"""A flow command stopped by SIGTERM (a scheduler's stop, `kill PID`) or by `kill -9` must not leave Prefect's
temporary API server (a uvicorn subprocess) running without its parent. Real processes: `polite ingest demo`
through the CLI, held inside its flow run, then signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lineage.store import LineageStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")

# `polite ingest demo`, held where its shards would run: inside the flow run and its `runs` row
HELD_COMMAND = (
    "import sys, time\n"
    "import flows.ingest\n"
    "def held(*args, **kwargs):\n"
    "    print('HELD', flush=True)\n"
    "    time.sleep(300)\n"
    "flows.ingest.map_shards = held\n"
    "from polite.cli import app\n"
    "app(['ingest', 'demo', '-w', sys.argv[1]], prog_name='polite')\n"
)


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left to read


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


def _held_flow(workspace: str, tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """The command held inside its flow run, and its temporary API server(s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}  # ephemeral mode, as a user's
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen([sys.executable, "-c", HELD_COMMAND, workspace], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    line = proc.stdout.readline()
    assert line.strip() == "HELD", line
    servers = [pid for pid, cmd in _children(proc.pid).items() if "prefect.server.api.server" in cmd]
    assert len(servers) == 1, _children(proc.pid)
    return proc, servers


def _watchers(pid: int) -> list[int]:
    return [child for child, cmd in _children(pid).items() if " -I -S -c " in cmd]


def _cleanup(proc: subprocess.Popen, pids: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_temporary_server_and_the_run_reads_interrupted(tmp_path):
    workspace = str(tmp_path / "ws")
    proc, servers = _held_flow(workspace, tmp_path)
    watchers = _watchers(proc.pid)
    assert watchers  # stopped first: here the SIGTERM handler alone must stop the server, not the kill -9 guard
    for watcher in watchers:
        os.kill(watcher, signal.SIGKILL)
    assert _gone_within(watchers, 10) == []
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM  # still ends as a SIGTERM'd process does
        assert _gone_within(servers, 10) == [], "the temporary API server outlived its SIGTERM'd parent"
        assert _gone_within(watchers, 10) == []
    finally:
        _cleanup(proc, servers + watchers)
    runs = LineageStore(Path(workspace) / "lineage.duckdb").query("SELECT flow, status, error FROM runs").to_pylist()
    assert [(r["flow"], r["status"]) for r in runs] == [("ingest", "interrupted")], runs


def test_kill_9_leaves_no_temporary_server_behind(tmp_path):
    proc, servers = _held_flow(str(tmp_path / "ws"), tmp_path)
    watchers = _watchers(proc.pid)  # one per server: it stops the server when the flow process is gone
    try:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert _gone_within(servers, 15) == [], "the temporary API server outlived its kill -9'd parent"
        assert _gone_within(watchers, 10) == []
    finally:
        _cleanup(proc, servers + watchers)


def test_sigterm_outside_a_flow_run_stops_the_server_too_and_a_handler_of_someone_else_is_kept():
    """The handler does its part wherever the signal lands (between two stage commands' flows, say), and is
    installed only over the default one: a worker's own SIGTERM handling is not replaced."""
    script = (
        "import signal, sys\n"
        "mine = lambda *a: None\n"
        "signal.signal(signal.SIGTERM, mine)\n"
        "import flows.common\n"
        "assert signal.getsignal(signal.SIGTERM) is mine\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "from polite.processes import stop_servers_on_sigterm, _stop_servers_then_terminate\n"
        "stop_servers_on_sigterm()\n"
        "assert signal.getsignal(signal.SIGTERM) is _stop_servers_then_terminate\n"
        "import polite.processes as p\n"
        "stopped = []\n"
        "class Server:\n"
        "    server_process = object()\n"
        "    def stop(self): stopped.append(1); print('stopped', flush=True)\n"
        "p.temporary_servers = lambda: [Server()]\n"
        "import os; os.kill(os.getpid(), signal.SIGTERM)\n"
        "import time; time.sleep(30)\n"
        "print('still alive', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout.strip() == "stopped", (done.stdout, done.stderr)
