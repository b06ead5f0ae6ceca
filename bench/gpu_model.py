"""The rewriter at full size on one GPU, with random weights: memory and speed of training and generation.

Builds the OpenFlamingo-9B (v1) shape - LLaMA-7B (32 layers, 4096 wide, 11008 MLP, 32 heads, vocab 32003),
open_clip ViT-L-14-336, perceiver depth 6 with 64 latents, gated cross-attention every 4 layers - in bf16 with
random weights through models.flamingo.build_flamingo (nothing is downloaded), then measures:

* a LoRA r64 training step (forward + masked loss + backward + AdamW) at context 1024: time and peak memory,
  at micro-batches 1 and 4, and 8 with activation checkpointing;
* greedy generation through models.flamingo.generate at batch 1 and 64: new tokens per second, peak memory.

    python bench/gpu_model.py --out bench/results/gpu_model.json            # on the GPU (~2 min on an H200)
    python bench/gpu_model.py --tiny --out /tmp/gpu_model_tiny.json         # the same code on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_7B = dict(model_type="llama", vocab_size=32003, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(tiny: bool, device, workdir: Path, lm_overrides: dict | None = None, vision: str = "ViT-L-14-336"):
    """The model (bf16 on GPU, fp32 on CPU), its tokenizer, the spec used, and seconds taken."""
    import torch

    from models.flamingo import FlamingoSpec, build_flamingo
    from models.tiny import make_tiny_rewriter, train_tokenizer

    t0 = time.perf_counter()
    if tiny:
        spec = FlamingoSpec.from_file(make_tiny_rewriter(workdir / "tiny", seed=0))
        dtype = torch.float32
    else:
        # a small tokenizer made here: only its <image>/<|endofchunk|> ids matter; the LM keeps vocab 32003
        train_tokenizer(["a photo of a cat on a mat"] * 4, vocab_size=300).save_pretrained(workdir / "tok")
        spec = FlamingoSpec(lm_config={**LLAMA_7B, **(lm_overrides or {})}, tokenizer=str(workdir / "tok"),
                            vision=vision, cross_attn_every_n_layers=4)  # fmt: skip
        dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create every weight in its final dtype: no fp32 copy of 9B parameters
    try:
        ctx = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            model, tok, _, _ = build_flamingo(spec)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype)
    _sync(device)
    return model, tok, spec, dtype, time.perf_counter() - t0


def prompt_ids(tok, batch: int, length: int, vocab: int, device, seed: int = 0):
    """``<image><|endofchunk|>`` then random text tokens: (batch, length) ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(vocab, 290), (batch, length), generator=g)
    ids[:, 0] = 1
    ids[:, 1] = tok.convert_tokens_to_ids("<image>")
    ids[:, 2] = tok.convert_tokens_to_ids("<|endofchunk|>")
    return ids.to(device)


def bench_train(model, tok, device, dtype, batch: int, context: int, image_size: int, steps: int) -> dict:
    import torch

    from models import compat
    from models.train_data import IGNORE, masked_loss_sum

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.lang_encoder.get_output_embeddings().weight.shape[0]
    ids = prompt_ids(tok, batch, context, vocab, device)
    labels = ids.clone()
    labels[:, : context // 2] = IGNORE  # loss on the second half, like a response after its prompt
    vision_x = torch.randn(batch, 1, 1, 3, image_size, image_size, device=device, dtype=dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    compat.language_model(model).train()
    _reset_peak(device)
    times = []
    for i in range(steps + 1):  # the first step warms up kernels and the allocator
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss, n = masked_loss_sum(
                model(vision_x, ids, attention_mask=torch.ones_like(ids)).logits, labels
            )
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    model.eval()
    step_s = sum(times) / len(times)
    return {"batch": batch, "context": context, "step_s": round(step_s, 4),
            "tokens_per_s": round(batch * context / step_s, 1), "peak_mem_gb": _peak_gb(device)}  # fmt: skip


def bench_generate(
    model, tok, device, dtype, batch: int, prompt_len: int, new_tokens: int, image_size: int
) -> dict:
    import torch

    from models.flamingo import generate

    vocab = model.lang_encoder.get_output_embeddings().weight.shape[0]
    ids = prompt_ids(tok, batch, prompt_len, vocab, device, seed=1)
    vision_x = torch.randn(batch, 1, 1, 3, image_size, image_size, device=device, dtype=dtype)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    generate(model, vision_x[:1], ids[:1], None, **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    out = generate(model, vision_x, ids, torch.ones_like(ids), **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    made = (out.shape[1] - prompt_len) * batch
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(made / seconds, 1), "peak_mem_gb": _peak_gb(device)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON of results")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a check of this script)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--context", type=int, default=None, help="training context (default 1024; tiny 64)")
    parser.add_argument(
        "--train-batches", default=None, help="comma-separated micro-batch sizes (default 1,4)"
    )
    parser.add_argument("--gen-batches", default="1,64", help="comma-separated generation batch sizes")
    parser.add_argument("--ckpt-batches", default=None, help="micro-batches to time with activation "
                        "checkpointing (default 8; tiny 2; '' for none)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 64; tiny 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per batch size")
    parser.add_argument(
        "--lm-config", default=None, help="JSON overriding LLaMA-7B config keys (shape checks)"
    )
    parser.add_argument(
        "--vision", default="ViT-L-14-336", help="open_clip vision tower (name or local-dir:)"
    )
    args = parser.parse_args(argv)

    import torch
    import transformers

    from models import lora

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    context = args.context or (64 if args.tiny else 1024)
    new_tokens = args.new_tokens or (8 if args.tiny else 64)
    train_batches = [int(b) for b in (args.train_batches or ("1,2" if args.tiny else "1,4")).split(",")]
    gen_batches = [int(b) for b in args.gen_batches.split(",")]
    if args.tiny and args.gen_batches == "1,64":
        gen_batches = [1, 4]
    torch.manual_seed(0)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "tiny": args.tiny, "torch": torch.__version__, "transformers": transformers.__version__,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        overrides = json.loads(args.lm_config) if args.lm_config else None
        model, tok, spec, dtype, build_s = build(args.tiny, device, Path(tmp), overrides, args.vision)
        size = model.vision_encoder.image_size
        image_size = size[0] if isinstance(size, tuple | list) else int(size)
        results.update(dtype=str(dtype).replace("torch.", ""), build_s=round(build_s, 1),
                       params_total=sum(p.numel() for p in model.parameters()),
                       shape=dict(lm=spec.lm_config or spec.lm, vision=spec.vision,
                                  cross_attn_every_n_layers=spec.cross_attn_every_n_layers,
                                  perceiver_depth=spec.perceiver_depth, perceiver_latents=spec.perceiver_latents))  # fmt: skip
        print(f"built in {build_s:.1f}s: {results['params_total'] / 1e9:.2f}B parameters", flush=True)

        results["generate"] = []
        for b in gen_batches:
            row = bench_generate(
                model, tok, device, dtype, b, 128 if not args.tiny else 32, new_tokens, image_size
            )
            results["generate"].append(row)
            print("generate", row, flush=True)

        lora.add_lora(model, rank=64)
        model.requires_grad_(False)
        from models.compat import unfreeze

        unfreeze(model, ["lora"])
        results["lora_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results["train"] = []
        for b in train_batches:
            try:
                row = bench_train(model, tok, device, dtype, b, context, image_size, args.steps)
            except (
                torch.OutOfMemoryError
            ) as exc:  # record it and go on: the other sizes are still worth having
                row = {"batch": b, "context": context, "error": f"out of memory: {str(exc)[:200]}"}
                torch.cuda.empty_cache()
            results["train"].append(row)
            print("train", row, flush=True)
        ckpt = args.ckpt_batches if args.ckpt_batches is not None else ("2" if args.tiny else "8")
        if ckpt:
            from models.compat import enable_activation_checkpointing

            enable_activation_checkpointing(model)
            for b in [int(x) for x in ckpt.split(",")]:
                try:
                    row = bench_train(model, tok, device, dtype, b, context, image_size, args.steps)
                except torch.OutOfMemoryError as exc:
                    row = {"batch": b, "context": context, "error": f"out of memory: {str(exc)[:200]}"}
                    torch.cuda.empty_cache()
                row["activation_checkpointing"] = True
                results["train"].append(row)
                print("train", row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
