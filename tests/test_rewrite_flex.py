"""FlexAttention decode steps (models/flex_decode.py): the same tokens and logits as the SDPA path and the plain
open_flamingo path, block lists that cover exactly each row's keys, and a compiled kernel that skips the rest."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from test_rewrite_fast import _batch, _reference_tokens, images, loaded  # noqa: F401 - fixtures

from models.flex_decode import FlexDecodeMask
from models.generation import RewriteGenerator, resolve_generation

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_num_threads(1)


def test_flex_greedy_equals_plain_open_flamingo(loaded, images):  # noqa: F811
    settings = resolve_generation("greedy", {"max_new_tokens": 20})
    flex = RewriteGenerator(loaded, settings, backend="fast", cuda_graphs=False, decode_attention="flex")
    assert flex.decoder.attention == "flex" and flex.runtime()["decode_attention"] == "flex"
    batch = _batch(flex, images)
    assert len({len(p.input_ids) for p in batch}) > 1  # left padding differs per row
    assert [g.token_ids for g in flex.generate(batch)] == _reference_tokens(loaded, batch, 20)


@pytest.mark.parametrize("kv_block", [16, 32])
def test_flex_teacher_forced_logits_equal_sdpa(loaded, images, kv_block):  # noqa: F811
    from models.fast_decode import FastFlamingoDecoder

    gen = RewriteGenerator(loaded, resolve_generation("greedy", {"max_new_tokens": 8}), backend="plain")
    ids, mask, media = gen._collate(_batch(gen, images))
    continuation = torch.randint(3, 500, (ids.shape[0], 40), generator=torch.Generator().manual_seed(1))
    sdpa = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=kv_block)
    flex = FastFlamingoDecoder(loaded.model, cuda_graphs=False, kv_block=kv_block, attention="flex")
    # 40 steps cross several block boundaries of the cache
    torch.testing.assert_close(flex.score(ids, mask, media, continuation),
                               sdpa.score(ids, mask, media, continuation), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_block_lists_cover_exactly_each_rows_keys():
    block, cache_len = 16, 96
    pad_len = torch.tensor([0, 15, 16, 40, 0])
    slot = torch.tensor(0)
    span = FlexDecodeMask(pad_len, slot, cache_len, block)
    span.start(pad_len)
    for s in (47, 48, 63, 64, 95):
        slot.fill_(s)
        span.advance(slot)
        got = span.dense_blocks()
        for row, pad in enumerate(pad_len.tolist()):
            want = [pad // block <= j <= s // block for j in range(cache_len // block)]
            assert got[row].tolist() == want, (row, s)


def test_flex_settings_are_checked():
    from pydantic import ValidationError

    from models.fast_decode import FastFlamingoDecoder
    from polite.config.rewrite import RewriteSettings

    with pytest.raises(ValidationError, match="multiple of 16"):
        RewriteSettings(kv_block=40)
    with pytest.raises(ValidationError, match="decode_attention"):
        RewriteSettings(decode_attention="paged")
    with pytest.raises(ValueError, match="attention must be one of sdpa, flex"):
        FastFlamingoDecoder(torch.nn.Linear(2, 2), attention="paged")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")  # fmt: skip
def test_compiled_flex_reads_only_listed_blocks():
    """The compiled kernel (CPU template here, Triton on CUDA) follows the block lists: NaN planted in blocks
    outside every row's span never reaches the output, and the listed blocks give SDPA's masked result."""
    from models.flex_decode import compiled_flex_attention

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, block, cache_len = 3, 4, 2, 16, 32, 128
    pad_len = torch.tensor([0, 40, 70])
    slot = torch.tensor(80)
    q = torch.randn(rows, heads, 1, dim)
    k, v = torch.randn(rows, kv_heads, cache_len, dim), torch.randn(rows, kv_heads, cache_len, dim)
    k[:, :, 96:], v[:, :, 96:] = float("nan"), float("nan")  # blocks after the slot's block
    k[2, :, :64], v[2, :, :64] = float("nan"), float("nan")  # row 2's padding blocks
    span = FlexDecodeMask(pad_len, slot, cache_len, block)
    span.start(pad_len)
    span.advance(slot)
    out = compiled_flex_attention()(q, k, v, block_mask=span.block_mask, enable_gqa=True)
    keys = torch.arange(cache_len)
    visible = ((keys >= pad_len.view(-1, 1)) & (keys <= slot)).view(rows, 1, 1, cache_len)
    ref = F.scaled_dot_product_attention(
        q, k.nan_to_num(), v.nan_to_num(), attn_mask=visible, enable_gqa=True
    )
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
