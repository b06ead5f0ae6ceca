"""Method 1 against real backends: a tiny local LLaMA loaded from disk, and an OpenAI-style HTTP server."""

from __future__ import annotations

import time

import pytest

from polite.config.distort import LLMSettings
from tasks.distort.backends import OpenAIChatBackend, get_backend
from tasks.distort.llm import distort_llm
from tasks.distort.stub_server import StubChatServer, curt_version

ORIGINALS = [
    "The image shows a brown dog lying on a red couch next to a window. The room is bright and tidy.",
    "Two people ride bicycles along a street lined with trees, and a bus is parked nearby.",
    "A plate holds rice, vegetables and grilled chicken. It sits on a wooden table in a sunny kitchen.",
]


def rows(n: int = 3) -> list[dict]:
    return [
        {"sample_id": f"s_llm_{i}", "instruction": "<image>\nDescribe the image.", "raw_response": ORIGINALS[i % 3]}
        for i in range(n)
    ]


# -- a tiny local causal LM ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A 1-layer LLaMA with random weights and a BPE trained here, saved like any Hub model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = train_tokenizer(ORIGINALS * 3 + ["### Human: ### Assistant: short curt version"], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_local_backend_batches_left_padded_like_one_by_one(tiny_lm_dir):
    from models.text_lm import load_text_lm

    lm = load_text_lm(str(tiny_lm_dir))
    assert load_text_lm(str(tiny_lm_dir)) is lm  # cached per process
    assert lm.identity.startswith("hf:") and not lm.has_chat_template
    prompts = [lm.render([{"role": "user", "content": t}]) for t in ORIGINALS + ["hi"]]
    assert prompts[0].startswith("### Human: ") and prompts[0].endswith("### Assistant:")
    batched = lm.generate(prompts, max_new_tokens=6, batch_size=4)
    single = [lm.generate([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding + attention mask leave each row's greedy output unchanged
    assert lm.generate(prompts, max_new_tokens=6, batch_size=2) == batched


def test_a_model_saved_over_the_same_folder_gets_a_new_fingerprint(tiny_lm_dir, tmp_path):
    """Distortion resume is keyed by the local LM's fingerprint: new weights of the same shape must change it."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from models.text_lm import fingerprint

    folder = tmp_path / "lm"
    shutil.copytree(tiny_lm_dir, folder)
    before = fingerprint(str(folder))
    assert fingerprint(str(folder)) == before  # stable
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # "fine-tuned": same shapes, same file sizes
    model.save_pretrained(folder)
    assert fingerprint(str(folder)) != before


def test_shipped_guanaco_chat_template_renders_like_the_local_fallback():
    from importlib import resources

    from models.text_lm import render_guanaco
    from models.tiny import train_tokenizer

    tokenizer = train_tokenizer(ORIGINALS, vocab_size=270)
    tokenizer.chat_template = (resources.files("tasks.distort") / "templates" / "guanaco.jinja").read_text()
    messages = [{"role": "user", "content": "Q?\nmore"}, {"role": "assistant", "content": "A."},
                {"role": "user", "content": "Shorter."}]  # fmt: skip
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_guanaco(messages) == "### Human: Q?\nmore\n### Assistant: A.\n### Human: Shorter.\n### Assistant:"


def test_method_llm_with_a_local_model_is_deterministic_and_records_every_pair(tiny_lm_dir):
    settings = LLMSettings(backend="local", model=str(tiny_lm_dir), max_new_tokens=8, batch_size=2)
    backend = get_backend(settings)
    first = [p.to_row() for p in distort_llm(rows(4), settings, backend, "v_l", run_seed=1)]
    second = [p.to_row() for p in distort_llm(rows(4), settings, backend, "v_l", run_seed=1)]
    assert first == second
    assert sorted(r["sample_id"] for r in first) == [f"s_llm_{i}" for i in range(4)]  # one pair per row, none lost
    for r in first:
        assert r["llm"] == backend.identity and r["template_version"] == "distort-llm-v1"
        # A random model says random things: either a usable distortion or a failure with its reason.
        assert (r["status"] == "ok" and r["distorted"]) or (r["status"] == "failed" and r["error"])


def test_missing_local_model_says_where_it_looked(tmp_path):
    from models.text_lm import load_text_lm

    with pytest.raises(FileNotFoundError, match="allow_download"):
        load_text_lm(str(tmp_path / "nope"))


# -- an OpenAI-compatible HTTP server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with StubChatServer(delay_s=1.0) as s:
        yield s


def http_settings(server: StubChatServer, mode: str, **kw) -> LLMSettings:
    base = dict(backend="openai", model="stub-llm", base_url=server.url(mode), max_retries=2, backoff_s=0.01,
                timeout_s=5.0, concurrency=4)  # fmt: skip
    return LLMSettings(**{**base, **kw})


def test_http_backend_parses_chatty_replies(server):
    settings = http_settings(server, "ok")
    pairs = distort_llm(rows(3), settings, OpenAIChatBackend(settings), "v_h", run_seed=0)
    assert [p.status for p in pairs] == ["ok"] * 3
    assert [p.distorted for p in pairs] == [curt_version(t) for t in ORIGINALS]  # chatter and quotes stripped
    assert all(p.llm == "openai:stub-llm" and p.params["attempts"] == 1 for p in pairs)


def test_http_backend_retries_a_flaky_server(server):
    settings = http_settings(server, "flaky")
    pairs = distort_llm(rows(3), settings, OpenAIChatBackend(settings), "v_h", run_seed=0)
    assert [p.status for p in pairs] == ["ok"] * 3
    assert [p.params["attempts"] for p in pairs] == [2, 2, 2]


@pytest.mark.parametrize(
    ("mode", "extra", "error", "attempts"),
    [
        ("500", {}, "HTTP 500", 3),
        ("garbage", {}, "unparsable reply", 3),
        ("slow", {"timeout_s": 0.2, "max_retries": 1}, "timeout after 0.2s", 2),
        ("400", {}, "HTTP 400 (not retried)", 1),
        ("echo", {}, "unchanged", 1),
    ],
)
def test_http_failures_become_recorded_pairs_after_retries(server, mode, extra, error, attempts):
    settings = http_settings(server, mode, **extra)
    before = server.requests[mode]
    pairs = distort_llm(rows(2), settings, OpenAIChatBackend(settings), "v_h", run_seed=0)
    assert [p.status for p in pairs] == ["failed", "failed"]
    assert all(error in p.error for p in pairs), [p.error for p in pairs]
    assert all(p.params["attempts"] == attempts and p.distorted is None for p in pairs)
    # The server really saw every attempt (a timed-out request may be counted a moment after the client gave up).
    deadline = time.monotonic() + 5
    while server.requests[mode] - before < 2 * attempts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.requests[mode] - before == 2 * attempts


def test_http_connection_refused_is_a_failure_not_a_crash():
    settings = LLMSettings(model="m", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.01)
    (pair,) = distort_llm(rows(1), settings, OpenAIChatBackend(settings), "v_h", run_seed=0)
    assert pair.status == "failed" and "connection error" in pair.error


def test_a_reply_that_cannot_be_decoded_fails_its_pair_not_the_shard():
    """A body whose Content-Encoding lies (a proxy, a broken server) raised httpx.DecodingError out of the shard."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"this is not gzip"
            self.send_response(200)
            for name, value in (("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
                                ("Content-Length", str(len(body)))):  # fmt: skip
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        settings = LLMSettings(model="m", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", max_retries=1,
                               backoff_s=0.01)  # fmt: skip
        pairs = distort_llm(rows(2), settings, OpenAIChatBackend(settings), "v_h", run_seed=0)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [p.status for p in pairs] == ["failed", "failed"]
    assert all("DecodingError" in p.error and p.params["attempts"] == 2 for p in pairs), [p.error for p in pairs]


def test_concurrency_is_per_shard_when_shards_share_a_backend():
    """The threads runner runs shards side by side on one cached backend (get_backend). ``concurrency`` is the
    requests in flight per shard (docs/distort.md), but the client's connection cap made it per process: three
    shards of two requests at concurrency 2 sent two at a time, and a waiting request could time out in the pool."""
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    all_in_flight = threading.Barrier(6, timeout=3)  # answers only once all six requests are in at once

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                all_in_flight.wait()
                status, body = 200, json.dumps({"choices": [{"message": {"content": "a curt reply"}}]}).encode()
            except threading.BrokenBarrierError:
                status, body = 503, b"fewer than six requests were in flight together"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        settings = LLMSettings(model="m", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", concurrency=2,
                               timeout_s=10, max_retries=0)  # fmt: skip
        backend = OpenAIChatBackend(settings)
        with ThreadPoolExecutor(3) as shards:
            results = list(shards.map(lambda k: distort_llm(rows(2), settings, backend, f"v_{k}", k), range(3)))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [p.error for pairs in results for p in pairs] == [None] * 6
