"""bench/gpu_rewrite.py runs end to end on CPU with the tiny shape: every path (the paper preset's beams on our
decoder included), the decode-attention variants and the kernel profile, so the device session spends its minutes measuring, not debugging."""

from __future__ import annotations

import json

import pytest

from models.fast_cache import KV_BLOCK, round_up

pytestmark = pytest.mark.filterwarnings("ignore")


def test_tiny_run_measures_every_path_and_profiles(tmp_path, bench_script):
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "rewrite.json"
    bench_script("gpu_rewrite").main(["--tiny", "--device", "cpu", "--no-levers", "--profile-steps", "2", "--seed-samples", "1",
                   "--attention", "sdpa:64:unfused,sdpa:64:compiled,flex:32", "--attention-batch", "8",
                   "--also-batch", "24", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert "errors" not in data, data.get("errors")
    paths = [r["path"] for r in data["runs"]]
    assert paths[0].startswith("seed") and "naive HF greedy" in paths
    variants = [r for r in data["runs"] if r["path"].startswith("decode attention")]
    assert [r["path"] for r in variants if r["batch"] == 8] == [
        "decode attention sdpa, kv_block 64, unfused projections",
        "decode attention sdpa, kv_block 64, compiled layers",
        "decode attention flex, kv_block 32",
    ]
    at_24 = [r for r in variants if r["batch"] == 24]
    variants = [r for r in variants if r["batch"] == 8]
    assert [r["batch"] for r in data["runs"] if r["path"].startswith("ours (")] == [4, 16, 24]  # 24: the grown one
    # the fastest variant runs at the grown batch too (none of these is the decoder that batch already ran with)
    assert [r["path"] for r in at_24] == [max(variants, key=lambda r: r["tokens_per_s"])["path"]]
    assert all(r["compile_error"] is None for r in variants)
    assert all(r["tokens_per_s"] > 0 for r in variants)
    scheduling = [r for r in data["runs"] if r["path"].startswith("scheduling")]
    grown = 16 * round_up(24 + 48, KV_BLOCK) // round_up(24 + 12, KV_BLOCK)
    assert grown > 16  # a cache that starts shorter holds more rows
    assert [r["path"] for r in scheduling] == ["scheduling: static batches, no shrinking, sdpa",
                                               "scheduling: static batches, sdpa",
                                               f"scheduling: static batches of {grown}, cache grows from 12, sdpa",
                                               "scheduling: continuous, sdpa", "scheduling: continuous, flex"]  # fmt: skip
    assert data["kv_bytes_per_token"] > 0 and "token_budget_auto" not in data  # CUDA only
    # the KV slots of 16 rows x (24 + 48) hold `grown` rows x (24 + 12), each rounded up to the cache's blocks
    assert data["scheduling"]["grown_cache_rows"] == grown and data["scheduling"]["cache_new_tokens"] == 12
    assert all(r["batch"] == 48 and r["tokens_per_s"] > 0 for r in scheduling)
    beams = [r for r in data["runs"] if r["path"].startswith("beam scheduling")]
    grown_samples = 4 * round_up(24 + 48, KV_BLOCK) // round_up(24 + 12, KV_BLOCK)
    assert [r["path"] for r in beams] == ["beam scheduling: static beam batches, sdpa",
                                          f"beam scheduling: static beam batches of {grown_samples}, cache grows from 12, sdpa",
                                          "beam scheduling: continuous beams, sdpa",
                                          "beam scheduling: continuous beams, flex"]  # fmt: skip
    assert all(r["batch"] == 12 and r["tokens_per_s"] > 0 for r in beams)
    checks = data["checks"]
    assert checks["logits_ok"] and checks["greedy_token_agreement"] == 1.0
    assert checks["stream_sdpa"] == checks["stream_flex"] == {"stream_rows_identical": "12/12"}
    assert checks["beam_search_rows_identical"] == "6/6"  # our beam search vs generate, fp32
    paper = [r for r in data["runs"] if r["path"].startswith("ours, paper preset")]
    assert len(paper) == 1 and paper[0]["batch"] == 4 and paper[0]["step_ms"] > 0
    assert 0 < paper[0]["beam_keys_copied_share"] < 1  # beams copy only the keys after their histories part
    assert data["paper_speedup_vs_seed"] == round(
        paper[0]["tokens_per_s"] / data["runs"][0]["tokens_per_s"], 1
    )
    profile = data["profile"]
    assert set(profile) >= {
        "prefill",
        "prefill_compiled",
        "decode_step_sdpa",
        "decode_step_sdpa_compiled",
        "decode_step_flex",
    }
    assert any("mm" in k["name"] for k in profile["prefill"]["kernels"])
    ours = [r for r in data["runs"] if r["path"].startswith(("ours (", "ours, CUDA", "decode attention"))]
    assert data["best_tokens_per_s"] == max(r["tokens_per_s"] for r in ours)
    assert data["speedup_vs_seed"] > 1
    # the prefill's counted FLOPs cover at least the prompt through the LM's layers (the perceiver's 64 latents
    # and the vision tower add more), and each row's prefill
    # throughput is those FLOPs over its prefill time (beams share their sample's prefill)
    gpu_rewrite = bench_script("gpu_rewrite")
    model, image_size = gpu_rewrite.build(True, torch.device("cpu"), torch.float32)
    layers = sum(
        p.numel() for n, p in model.lang_encoder.named_parameters() if p.dim() == 2 and ".layers." in n
    )
    per_sample = data["prefill_tflop_per_sample"] * 1e12
    assert per_sample >= 2 * layers * data["prompt_len"]
    # every vision-tower matrix once per patch and class token, the attention's in/out projections included:
    # FlopCounterMode alone counts nothing in nn.MultiheadAttention's inference kernel (a third of them)
    vision = sum(
        p.numel() for n, p in model.vision_encoder.named_parameters() if p.dim() == 2 and "resblocks" in n
    )
    pixels = torch.randn(1, 3, image_size, image_size)
    with torch.inference_mode():
        assert gpu_rewrite.count_flops(model.vision_encoder, pixels) >= 2 * vision * (
            (image_size // 8) ** 2 + 1
        )
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on after counting
    for row in [*ours, *paper]:
        expected = (row["batch"] * per_sample / row["prefill_s"]) / 1e12
        assert row["prefill_tflops"] == pytest.approx(expected, abs=0.06)


def test_bf16_logits_are_as_close_to_fp32_as_the_plain_paths(bench_script):
    """In bf16 the fast path and the plain open_flamingo path round differently; the device check asks that the
    fast path be no farther from the fp32 result of the same weights than the plain path is."""
    import torch

    from models.fast_decode import FastFlamingoDecoder

    torch.set_num_threads(1)
    gpu_rewrite = bench_script("gpu_rewrite")
    model, image_size = gpu_rewrite.build(True, torch.device("cpu"), torch.bfloat16)
    decoder = FastFlamingoDecoder(model, cuda_graphs=False)
    checks = gpu_rewrite.logits_check(model, decoder, 24, image_size, torch.device("cpu"), torch.bfloat16)
    plain, fast = checks["logits_plain_error_vs_fp32"], checks["logits_fast_error_vs_fp32"]
    assert 1e-4 < plain < 5e-2 and 1e-4 < fast < 5e-2  # bf16 rounding is there, and small on 4 layers
    assert checks["logits_as_accurate_as_plain"] and checks["logits_fast_vs_plain_error_ratio"] <= 1.1
    assert next(model.parameters()).dtype == torch.bfloat16  # the fp32 reference was a copy

    # a real error fails it: each row's cross-attention keys/values taken from another row's image
    cross_kv = decoder._cross_kv
    decoder._cross_kv = lambda block, latents: cross_kv(block, latents.roll(1, 0))
    broken = gpu_rewrite.logits_check(model, decoder, 24, image_size, torch.device("cpu"), torch.bfloat16)
    assert not broken["logits_as_accurate_as_plain"] and broken["logits_fast_vs_plain_error_ratio"] > 5


def test_layer_traffic_counts_each_elementwise_pass(bench_script):
    """The 9B layer's traffic outside the matrix products, op by op: SiLU reads the gate and writes its
    activation (2 x 11008 bf16 per token); the products themselves are not counted; a decode step moves what a
    prompt token does (within 10%), per row."""
    figures = bench_script("layer_traffic").main(["--batch", "2", "--prompt-len", "16", "--layers", "4",
                                                  "--bandwidth-tbs", "1"])  # fmt: skip
    by_op = figures["by_op_kb"]
    assert by_op["silu"] == round(2 * 11008 * 2 / 1e3, 1)
    assert not {"mm", "linear", "addmm", "scaled_dot_product_attention"} & set(by_op)
    assert {"pow", "mean", "cat"} <= set(by_op)  # the fp32 RMS norm and the rotation are there
    assert figures["kb_per_token_layer"] == pytest.approx(sum(by_op.values()), abs=0.5)
    per_token_s = figures["kb_per_token_layer"] * 1e3 / 1e12
    assert figures["seconds"] == pytest.approx(per_token_s * 2 * 16 * 4, rel=1e-2)
    assert figures["step_ms"] == pytest.approx(1e3 * per_token_s * 2 * 4, rel=0.1)


def test_flops_only_counts_the_prefill_and_its_vision_part(tmp_path, bench_script):
    out = tmp_path / "flops.json"
    data = bench_script("gpu_rewrite").main(["--tiny", "--device", "cpu", "--flops-only", "--out", str(out)])
    assert (
        data["runs"] == []
        and json.loads(out.read_text())["prefill_tflop_per_sample"] == data["prefill_tflop_per_sample"]
    )
    assert 0 < data["prefill_tflop_vision_per_sample"] < data["prefill_tflop_per_sample"]


def test_a_larger_batch_is_tried_only_where_the_card_s_memory_allows(bench_script):
    """Session 1's H200: 17 GB before the batches, 93.7 GB peak at batch 512, 149 GB on the card (139 GiB)."""
    grown_batch = bench_script("gpu_rewrite").grown_batch
    gb = 10**9
    assert grown_batch(512, 17 * gb, int(93.7 * gb), int(149.3 * gb)) == 768  # 17 + 1.5 x 76.7 = 132 < 137 GB
    assert grown_batch(768, 17 * gb, 132 * gb, int(149.3 * gb)) is None  # 1152 rows: 190 GB
    assert grown_batch(512, 17 * gb, int(93.7 * gb), 80 * gb) is None  # an H100
    assert grown_batch(64, 17 * gb, 26 * gb, 80 * gb) == 96
    assert grown_batch(100, 17 * gb, 26 * gb, 80 * gb) == 128  # 150, rounded down to 32 rows
    assert grown_batch(20, 1 * gb, 2 * gb, 80 * gb) is None  # 30 rounds down to 0: nothing to try
