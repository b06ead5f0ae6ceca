"""bench/gpu_model.py runs end to end on CPU: the tiny mode, and the full-size code path with shrunken shapes."""

from __future__ import annotations

import json

import pytest

from models.tiny import make_tiny_rewriter

QUICK = ["--steps", "1", "--gen-batches", "1,2", "--train-batches", "2", "--new-tokens", "3"]


def test_tiny_mode_writes_results(tmp_path, bench_script):
    out = tmp_path / "tiny.json"
    bench_script("gpu_model").main(["--tiny", "--out", str(out), *QUICK])
    data = json.loads(out.read_text())
    assert data["tiny"] is True and data["dtype"] == "float32"
    assert [g["batch"] for g in data["generate"]] == [1, 2] and all(
        g["tokens_per_s"] > 0 for g in data["generate"]
    )
    assert data["train"][0]["context"] == 64 and data["train"][0]["step_s"] > 0
    assert data["train"][-1]["activation_checkpointing"] is True and data["train"][-1]["step_s"] > 0
    assert 0 < data["lora_trainable"] < data["params_total"]


@pytest.mark.slow
def test_full_size_path_in_bf16_with_small_shapes(tmp_path, bench_script):
    """The GPU path (config-built LLaMA, bf16 weights created in place, vocab kept at 32003) on CPU."""
    vision = make_tiny_rewriter(tmp_path / "tiny", seed=0) / "vision"
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
             "num_key_value_heads": 2}  # fmt: skip
    out = tmp_path / "full.json"
    bench_script("gpu_model").main(["--device", "cpu", "--out", str(out), "--lm-config", json.dumps(small),
                   "--vision", f"local-dir:{vision}", "--context", "32", *QUICK])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and data["shape"]["lm"]["vocab_size"] == 32003
    assert data["shape"]["cross_attn_every_n_layers"] == 4 and data["shape"]["perceiver_latents"] == 64
    assert "error" not in data["train"][0] and data["train"][0]["context"] == 32
