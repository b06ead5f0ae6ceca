"""Where the distorting LLM runs: an OpenAI-compatible HTTP server, or a local Hugging Face causal LM.

Both answer ``chat(conversations, seeds) -> list[Reply]`` and never raise for one bad request: a timeout,
a 5xx, a 429 or an unparsable body is retried with backoff, and what still fails comes back as a ``Reply``
with ``error`` set, which becomes a failed pair with that reason.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from polite.config.distort import LLMSettings

Message = dict[str, str]
_RETRY_STATUS = {408, 409, 425, 429}


@dataclass(slots=True)
class Reply:
    text: str | None
    error: str | None = None
    attempts: int = 1
    latency_ms: float = 0.0


class ChatBackend(Protocol):
    identity: str

    def chat(self, conversations: Sequence[list[Message]], seeds: Sequence[int]) -> list[Reply]: ...


def llm_identity(settings: LLMSettings) -> str:
    """What the lineage records as the distorting LLM; part of the pairs' variant."""
    if settings.backend == "openai":
        return f"openai:{settings.model}"
    from models.text_lm import fingerprint

    return fingerprint(settings.model)


class OpenAIChatBackend:
    """``POST {base_url}/chat/completions`` with bounded concurrency, per-request timeouts and retries."""

    def __init__(self, settings: LLMSettings):
        import httpx

        self.settings = settings
        self.identity = llm_identity(settings)
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s),
            # No connection cap: chat()'s thread pool bounds the requests in flight per call (per shard). The
            # client is shared by every shard of the process (get_backend), so a cap of `concurrency` here made
            # it per process, and a request queued behind other shards' could time out waiting for a connection.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=settings.concurrency),
            # A server on this machine must not be reached through a proxy from the environment.
            trust_env=urlsplit(settings.base_url).hostname not in ("127.0.0.1", "localhost", "::1"),
        )

    def chat(self, conversations: Sequence[list[Message]], seeds: Sequence[int]) -> list[Reply]:
        if not conversations:
            return []
        workers = min(self.settings.concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distort-llm") as pool:
            return list(pool.map(self._one, conversations, seeds))

    def _body(self, messages: list[Message], seed: int, max_tokens: int | None = None) -> dict[str, Any]:
        s = self.settings
        body = {
            "model": s.model,
            "messages": messages,
            "max_tokens": max_tokens or s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": seed % (2**31),  # some servers take a 32-bit seed only
        }
        if s.stop:
            body["stop"] = list(s.stop)
        return body

    def refusal(self) -> str | None:
        """One small request, as the pairs will send it: why the server refuses it where every pair would be
        refused too (no server at the address, HTTP 401/403/404 or another 4xx that is not retried: a wrong key,
        model or path), else None. A busy or failing server (timeouts, 5xx) is left to the pairs' retries."""
        import httpx

        try:
            response = self._client.post(self.url, json=self._body([{"role": "user", "content": "Hi"}], 0, 1))
        except httpx.ConnectError as exc:
            return f"no server answers at {self.url} ({exc})"
        except httpx.RequestError:
            return None
        status = response.status_code
        if 400 <= status < 500 and status not in _RETRY_STATUS:
            hint = f"; is {self.settings.api_key_env} set?" if status in (401, 403) and self.settings.api_key_env else ""
            return f"{self.url} refused a test request for model {self.settings.model!r}: HTTP {status} {response.text[:200]}{hint}"
        return None

    def _one(self, messages: list[Message], seed: int) -> Reply:
        import httpx

        s = self.settings
        body = self._body(messages, seed)
        attempts = 1 + s.max_retries
        last = "no attempt made"
        started = time.perf_counter()
        for attempt in range(attempts):
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                last = f"timeout after {s.timeout_s:g}s"
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {exc}"
            except httpx.RequestError as exc:  # e.g. a body its Content-Encoding cannot decode: this pair fails
                last = f"request error: {type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    text, problem = _content(response.content)
                    if problem is None:
                        return Reply(text, None, attempt + 1, 1000 * (time.perf_counter() - started))
                    last = problem
                elif status in _RETRY_STATUS or status >= 500:
                    last = f"HTTP {status}: {response.text[:200]}"
                else:  # the request itself is wrong: retrying would not help
                    return Reply(None, f"HTTP {status} (not retried): {response.text[:200]}", attempt + 1,
                                 1000 * (time.perf_counter() - started))
            if attempt + 1 < attempts:
                time.sleep(s.backoff_s * (2**attempt) * (0.5 + random.random()))
        return Reply(None, f"{last} (after {attempts} attempts)", attempts, 1000 * (time.perf_counter() - started))


def _content(raw: bytes) -> tuple[str | None, str | None]:
    """The assistant message of an OpenAI chat completion body, or why there is none."""
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None, f"unparsable reply: {raw[:120]!r}"
    if not isinstance(content, str):
        return None, f"reply content is {type(content).__name__}, not text"
    return content, None


class LocalChatBackend:
    """A Hugging Face causal LM in this process (loaded once per process, see models.text_lm)."""

    def __init__(self, settings: LLMSettings):
        from models.text_lm import load_text_lm

        self.settings = settings
        self.lm = load_text_lm(settings.model, settings.device, settings.dtype, settings.allow_download)
        self.identity = self.lm.identity

    def chat(self, conversations: Sequence[list[Message]], seeds: Sequence[int]) -> list[Reply]:
        if not conversations:
            return []
        s = self.settings
        prompts = [self.lm.render(c) for c in conversations]
        started = time.perf_counter()
        try:
            texts = self.lm.generate(
                prompts,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                batch_size=s.batch_size,
                max_prompt_tokens=s.max_prompt_tokens,
                seed=int(seeds[0]) % (2**31),
            )
        except Exception as exc:  # e.g. out of memory: the shard's pairs fail with the reason, the run goes on
            return [Reply(None, f"local generation failed: {type(exc).__name__}: {exc}") for _ in conversations]
        per_item = 1000 * (time.perf_counter() - started) / len(conversations)
        return [Reply(t, None, 1, per_item) for t in texts]


_cache: dict[str, ChatBackend] = {}
_cache_lock = threading.Lock()


def get_backend(settings: LLMSettings) -> ChatBackend:
    """One backend per process and settings, so a worker keeps its model or connection pool between shards."""
    key = settings.model_dump_json()
    with _cache_lock:
        if key not in _cache:
            _cache[key] = OpenAIChatBackend(settings) if settings.backend == "openai" else LocalChatBackend(settings)
        return _cache[key]
