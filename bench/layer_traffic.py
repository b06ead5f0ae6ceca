"""Memory traffic of the decoder layers outside the matrix products, 9B shape (bf16): prefill and decode step.

Runs the fast decoder's own layer halves (``attention_inputs``, SDPA, ``layer_output``; fused q/k/v and gate/up
products, as on CUDA) on the meta device, so nothing is computed and any machine answers at once, and adds up the
bytes each op reads and writes. Matrix products and attention are compute work a kernel cannot avoid; everything else (the RMS norms in fp32,
the rotations, SiLU x up, residual adds) moves activations through memory once per op in eager mode, which
is what ``compile_layers`` fuses. Prints bytes per token and layer by op, and what they cost a batch at a
given memory bandwidth. ``--measure`` also times the fast decoder's prefill and decode steps eager and with
``compile_layers``, on a random model of ``--width`` x ``--layers``.

    python bench/layer_traffic.py                          # batch 512 x 128 tokens, 32 layers, 4.8 TB/s
    python bench/layer_traffic.py --batch 256 --bandwidth-tbs 3.35
    python bench/layer_traffic.py --measure --batch 8 --layers 8 --width 1024   # CPU: fp32; GPU: bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from models.fast_layers import attention_inputs, layer_output  # noqa: E402

# ops that are the work itself (a fused kernel still does them) and ops that only re-describe memory
MATRIX_OPS = {"mm", "addmm", "bmm", "linear", "matmul", "scaled_dot_product_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_flash_attention_for_cpu"}  # fmt: skip
VIEW_OPS = {"view", "_unsafe_view", "transpose", "expand", "slice", "unsqueeze", "t", "reshape", "split",
            "split_with_sizes", "detach", "alias", "select", "as_strided", "_reshape_alias"}  # fmt: skip


class TrafficCounter(TorchDispatchMode):
    """Bytes read and written per op: every tensor argument and result of at least ``small`` elements, counted
    whole."""

    def __init__(self, small: int):
        super().__init__()
        self.small = small
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in VIEW_OPS or name in MATRIX_OPS:
            return out
        self.by_op[name] += sum(
            t.numel() * t.element_size()
            for t in tree_leaves((args, kwargs, out))
            if isinstance(t, torch.Tensor) and t.numel() >= self.small
        )
        return out


def layer_traffic(rows: int, tokens: int, hidden: int = 4096, intermediate: int = 11008, heads: int = 32):
    """``TrafficCounter`` of one LLaMA layer over ``rows`` x ``tokens`` (a prefill; a decode step has one token
    per row, whose attention over the cache is work and not counted)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=heads)  # fmt: skip
    head_dim = hidden // heads
    meta = dict(device="meta", dtype=torch.bfloat16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            layer = LlamaDecoderLayer(cfg, 0)
    finally:
        torch.set_default_dtype(previous)
    x = torch.empty(rows, tokens, hidden, **meta)
    cos = torch.empty(rows, 1, tokens, head_dim, **meta)
    sin = torch.empty(rows, 1, tokens, head_dim, **meta)
    attend = torch.empty(rows, 1, tokens, tokens, dtype=torch.bool, device="meta")
    qkv = (torch.empty(3 * hidden, hidden, **meta), [hidden] * 3)
    gate_up = (torch.empty(2 * intermediate, hidden, **meta), [intermediate] * 2)
    counter = TrafficCounter(small=hidden + 1)  # leaves out the norms' weights, counts every activation
    with counter, torch.inference_mode():
        q, k, v = attention_inputs(layer, x, cos, sin, qkv, head_dim)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        layer_output(layer, x, attended, gate_up)
    return counter


def measure(batch: int, prompt_len: int, layers: int, width: int, repeats: int, steps: int = 16) -> dict:
    """Median seconds of the fast decoder's prefill (the prompt through every layer to the first token's logits;
    images encoded beforehand) and ms per decode step (teacher-forced ``steps`` tokens, the prefill subtracted),
    eager and with ``compile_layers``, same random weights; and the largest difference of their logits relative
    to the logits' largest magnitude. Steps run without CUDA graphs, so on a GPU they include launch costs."""
    import statistics

    import gpu_rewrite

    from models.fast_decode import FastFlamingoDecoder
    from models.generation import encode_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = max(1, width // 128)
    shape = dict(hidden_size=width, intermediate_size=width * 11008 // 4096, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32003)  # fmt: skip
    model, image_size = gpu_rewrite.build(True, device, dtype, lm_overrides=shape)
    ids, mask, pixels = gpu_rewrite.make_inputs(model, batch, prompt_len, image_size, device, dtype, seed=0)
    with torch.inference_mode():
        media = encode_images(model, pixels)[:, None]  # the tower is the same either way: time the layers
    continuation = torch.randint(3, 30000, (batch, steps), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    out: dict = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                 "prompt_len": prompt_len, "layers": layers, "width": width, "steps": steps}  # fmt: skip
    logits = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        decoder = FastFlamingoDecoder(
            model, cuda_graphs=False, fuse_projections=True, compile_layers=compiled
        )
        first, first_s = gpu_rewrite.timed(device, decoder.score, ids, mask, media, continuation)  # compiles
        prefill = [gpu_rewrite.timed(device, decoder.score, ids, mask, media, continuation[:, :0])[1]
                   for _ in range(repeats)]  # fmt: skip
        full = [
            gpu_rewrite.timed(device, decoder.score, ids, mask, media, continuation)[1]
            for _ in range(repeats)
        ]
        out[f"{name}_first_s"] = round(first_s, 2)
        out[f"{name}_prefill_s"] = round(statistics.median(prefill), 4)
        out[f"{name}_step_ms"] = round(
            1e3 * (statistics.median(full) - statistics.median(prefill)) / steps, 3
        )
        logits[name] = first.float()
        decoder.reset()
    out["prefill_speedup"] = round(out["eager_prefill_s"] / out["compiled_prefill_s"], 3)
    out["step_speedup"] = round(out["eager_step_ms"] / out["compiled_step_ms"], 3)
    scale = logits["eager"].abs().max()
    out["max_relative_difference"] = float(
        f"{float((logits['compiled'] - logits['eager']).abs().max() / scale):.3g}"
    )
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth, TB/s (H200: 4.8)")
    parser.add_argument(
        "--measure", action="store_true", help="also time prefill and steps, eager and compiled"
    )
    parser.add_argument("--width", type=int, default=4096, help="--measure: the model's width")
    parser.add_argument("--repeats", type=int, default=5, help="--measure: timed runs per variant")
    args = parser.parse_args(argv)
    bandwidth = args.bandwidth_tbs * 1e12
    counter = layer_traffic(1, args.prompt_len)
    per_token = {op: moved / args.prompt_len for op, moved in counter.by_op.most_common()}
    total = sum(per_token.values())
    tokens = args.batch * args.prompt_len * args.layers
    seconds = total * tokens / bandwidth
    print(f"outside the matrix products, per token and layer: {total / 1e3:.0f} KB")
    for op, moved in per_token.items():
        print(f"  {op:<12} {moved / 1e3:7.1f} KB")
    print(f"prefill, batch {args.batch} x {args.prompt_len} tokens x {args.layers} layers: "
          f"{total * tokens / 1e12:.2f} TB, {seconds:.3f} s at {args.bandwidth_tbs} TB/s")  # fmt: skip
    step = sum(layer_traffic(args.batch, 1).by_op.values()) * args.layers
    print(f"decode step, batch {args.batch} x {args.layers} layers: {step / 1e9:.1f} GB, "
          f"{1e3 * step / bandwidth:.2f} ms at {args.bandwidth_tbs} TB/s")  # fmt: skip
    figures = {"kb_per_token_layer": round(total / 1e3, 1), "seconds": float(f"{seconds:.4g}"),
               "step_ms": float(f"{1e3 * step / bandwidth:.4g}"),
               "by_op_kb": {op: round(v / 1e3, 1) for op, v in per_token.items()}}  # fmt: skip
    if args.measure:
        figures["measured"] = measure(args.batch, args.prompt_len, args.layers, args.width, args.repeats)
    return figures


if __name__ == "__main__":
    main()
