"""``rewrite.token_budget: auto`` (models/memory.py): the bytes a token keeps in the KV cache, and the budget a
device's free memory gives."""

from __future__ import annotations

import types

import pytest
import torch
from test_rewrite_fast import INSTRUCTIONS, images, loaded  # noqa: F401 - fixtures

from models.fast_decode import FastFlamingoDecoder
from models.generation import RewriteGenerator, resolve_generation
from models.memory import (
    ACTIVATION_SHARE,
    BUDGET_STEP,
    CPU_TOKEN_BUDGET,
    USABLE_FRACTION,
    gpu_share,
    kv_bytes_per_token,
    resolve_token_budget,
    token_budget_for,
    usable_bytes,
)
from polite.config import ConfigError, load_config

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_num_threads(1)


def test_kv_bytes_per_token_is_what_the_decoders_cache_takes(loaded, images):  # noqa: F811
    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 5}), backend="plain")
    batch = [
        gen.prepare(gen.prompt_ids(i, r), [images[0]] if "<image>" in i else []) for i, r in INSTRUCTIONS[:3]
    ]
    decoder = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=16)
    ids, mask, media = gen._collate(batch)
    decoder.generate(ids, mask, media, 5, gen.eos_ids, 0)
    slots = 3 * decoder._cache.cache_len(ids.shape[1], 5)
    assert decoder.kv_cache_bytes == slots * kv_bytes_per_token(
        loaded.model.lang_encoder.config, loaded.dtype
    )


def test_grouped_query_models_count_their_key_value_heads():
    config = types.SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   hidden_size=4096)  # fmt: skip
    assert kv_bytes_per_token(config, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    config.num_key_value_heads = None  # LLaMA-7B, as in OpenFlamingo-9B: 512 KB per token
    assert kv_bytes_per_token(config, torch.bfloat16) == 512 * 1024


def test_the_budget_leaves_room_for_the_prefill_and_the_measured_run_fits():
    per_token = 512 * 1024
    h200_free = int(141e9 - 16.5e9)  # the 9B's weights loaded
    budget = token_budget_for(h200_free, per_token)
    # session 1's batch 512 x (128 + 128) = 131,072 slots peaked at 93.7 GB on the H200: it fits the budget
    assert 131072 <= budget
    assert budget * per_token * (1 + ACTIVATION_SHARE) <= USABLE_FRACTION * h200_free
    assert token_budget_for(h200_free // 2, per_token) == pytest.approx(budget / 2, rel=0.1)
    # a little more or less free memory plans the same batches
    assert budget % BUDGET_STEP == 0 and token_budget_for(h200_free - 2**29, per_token) == budget
    assert token_budget_for(2 * per_token * 10, per_token) == 12  # below one step: as computed
    with pytest.raises(ValueError, match="positive"):
        token_budget_for(h200_free, 0)


def test_auto_is_the_cpu_budget_off_cuda_and_numbers_pass_through(loaded):  # noqa: F811
    assert resolve_token_budget("auto", loaded) == CPU_TOKEN_BUDGET
    assert resolve_token_budget(4096, loaded) == 4096


def test_the_setting_takes_auto_or_a_positive_count(tmp_path):
    def rewrite(value):
        path = tmp_path / "config.yaml"
        path.write_text(f"rewrite: {{token_budget: {value}}}\n")
        return load_config(path).rewrite

    assert load_config(None).rewrite.token_budget == "auto"
    assert rewrite(32768).token_budget == 32768
    for bad, shown in (("0", "0"), ("lots", "'lots'"), ("-4096", "-4096")):
        with pytest.raises(ConfigError, match=rf"rewrite\.token_budget: .*positive number of KV-cache slots, not {shown}$"):
            rewrite(bad)


def test_a_worker_with_half_a_card_plans_for_half_of_it():
    gb = 10**9
    # alone on a 141 GB card with the 9B loaded (18 GB): everything free is usable, plus the cache and arena
    assert usable_bytes(free=120 * gb, total=141 * gb, cached=gb, allocated=18 * gb, held=0) == 121 * gb
    assert usable_bytes(free=60 * gb, total=141 * gb, cached=0, allocated=78 * gb, held=60 * gb) == 120 * gb
    # half the card, the other worker not loaded yet: half of 141 less its own model, not the 120 GB free
    assert usable_bytes(free=120 * gb, total=141 * gb, cached=0, allocated=18 * gb, held=0, share=0.5) == int(
        52.5 * gb
    )
    # ... and never more than is free
    assert (
        usable_bytes(free=10 * gb, total=141 * gb, cached=0, allocated=18 * gb, held=0, share=0.5) == 10 * gb
    )
    assert gpu_share() == 1.0  # outside Ray


@pytest.mark.slow
def test_a_ray_task_given_half_a_gpu_knows_its_share():
    ray = pytest.importorskip("ray")

    ray.init(
        num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False
    )  # a declared, not a real, GPU
    try:
        share = ray.remote(num_gpus=0.5, num_cpus=0)(gpu_share)
        whole = ray.remote(num_gpus=1, num_cpus=0)(gpu_share)
        assert ray.get([share.remote(), whole.remote()]) == [0.5, 1.0]
    finally:
        ray.shutdown()
