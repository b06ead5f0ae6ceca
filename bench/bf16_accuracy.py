"""How far the fast decoder's bf16 logits are from the exact result, next to the plain open_flamingo path's.

For random LLaMA-shaped Flamingos of growing depth: teacher-forced logits of the fast decoder and of the plain
forward in bf16, each compared with a fp32 copy of the same weights (``bench/gpu_rewrite.py``'s
``logits_check``), and the fast decoder in fp32 against the same reference. Deep random models amplify bf16
rounding, so two correct bf16 paths can differ by more than 1e-2; the fast path is right when it is as close to
fp32 as the plain path is.

    .venv/bin/python bench/bf16_accuracy.py                         # 16 and 32 layers, 1024 wide, CPU
    python bench/bf16_accuracy.py --device cuda --layers 32 --width 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_rewrite  # noqa: E402

from models.fast_decode import FastFlamingoDecoder  # noqa: E402


def measure(layers: int, width: int, device: torch.device, prompt_len: int) -> dict:
    heads = max(1, width // 128)
    shape = dict(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
    model, image_size = gpu_rewrite.build(True, device, torch.bfloat16, lm_overrides=shape)
    bf16 = gpu_rewrite.logits_check(model, FastFlamingoDecoder(model, cuda_graphs=False), prompt_len, image_size,
                                    device, torch.bfloat16)  # fmt: skip
    exact = copy.deepcopy(model).float()
    del model
    fp32 = gpu_rewrite.logits_check(exact, FastFlamingoDecoder(exact, cuda_graphs=False), prompt_len, image_size,
                                    device, torch.float32)  # fmt: skip
    row = {
        "layers": layers,
        "width": width,
        "fast_vs_plain_bf16": bf16["logits_relative_error"],
        "plain_bf16_vs_fp32": bf16["logits_plain_error_vs_fp32"],
        "fast_bf16_vs_fp32": bf16["logits_fast_error_vs_fp32"],
        "ratio": bf16["logits_fast_vs_plain_error_ratio"],
        "fast_fp32_vs_fp32": fp32["logits_relative_error"],
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="16,32")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = [measure(int(n), args.width, device, args.prompt_len) for n in args.layers.split(",")]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
