"""A small OpenAI-compatible chat server on 127.0.0.1 for tests, benchmarks and dry runs without an LLM.

The first path segment picks the behaviour, so one server serves every case: ``/<mode>/v1/chat/completions``.
Modes: ``ok`` (a curt version of the assistant turn, wrapped in the chatter real LLMs add), ``echo`` (the
original unchanged), ``flaky`` (500 on every first attempt of a conversation, then ``ok``), an HTTP status (``500``, ``401``, ...),
``garbage`` (200 with a body that is not JSON), ``slow`` (answers after ``delay_s``).

    python -m tasks.distort.stub_server --port 8099   # then distort.llm.base_url: http://127.0.0.1:8099/ok/v1
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def curt_version(original: str, n_words: int = 8) -> str:
    """What the ``ok`` mode answers: the first words of the original, lower-cased, without punctuation."""
    words = [w.strip(".,;:!?\"'()") for w in original.split()[:n_words]]
    return " ".join(w for w in words if w).lower()


class StubChatServer:
    """Run with ``with StubChatServer() as server: server.url("ok")``; ``server.requests`` counts per mode."""

    def __init__(self, port: int = 0, delay_s: float = 2.0):
        self.delay_s = delay_s
        self.requests: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, mode: str = "ok") -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    def start(self) -> StubChatServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="stub-chat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StubChatServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _answer(self, mode: str, body: dict[str, Any]) -> tuple[int, bytes]:
        messages = body.get("messages") or []
        original = next((m.get("content", "") for m in messages if m.get("role") == "assistant"), "")
        if mode == "flaky":
            key = json.dumps(messages, sort_keys=True)
            with self._lock:
                first = key not in self._seen
                self._seen.add(key)
            if first:
                return 500, b'{"error": "warming up"}'
            mode = "ok"
        if mode.isdigit():  # that HTTP status, e.g. 500, 400, 401
            return int(mode), json.dumps({"error": f"stub status {mode}"}).encode()
        if mode == "garbage":
            return 200, b"<html>definitely not json"
        if mode == "slow":
            time.sleep(self.delay_s)
            mode = "ok"
        if mode == "echo":
            content = original
        else:
            content = f'Sure! Here is the short version:\n\n"{curt_version(original)}"\n\nNote: I dropped the details.'
        reply = {
            "id": "stub",
            "object": "chat.completion",
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
        return 200, json.dumps(reply).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                parts = self.path.strip("/").split("/")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if len(parts) != 4 or parts[1:] != ["v1", "chat", "completions"]:
                    status, payload = 404, b'{"error": "not found"}'
                else:
                    with server._lock:
                        server.requests[parts[0]] += 1
                    try:
                        status, payload = server._answer(parts[0], json.loads(raw or b"{}"))
                    except ValueError:
                        status, payload = 400, b'{"error": "request is not JSON"}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
                    pass

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--delay-s", type=float, default=2.0, help="how long the 'slow' mode waits")
    args = parser.parse_args()
    server = StubChatServer(args.port, args.delay_s)
    print(f"stub chat server on {server.url('ok')} (modes: ok echo flaky 500 400 garbage slow)", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
