"""``load_rewriter``: one cached load per process, keyed by the model's fingerprint, for the tiny model and the 9B alike.

A worker that runs many shards loads the model once; two references to the same files (a folder, its
``flamingo.json``, an equal spec) share one loaded model.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.flamingo import SPEC_FILE, FlamingoSpec

# files above this are fingerprinted by size + head + tail (the 9B weights are ~30 GB)
_FULL_HASH_LIMIT = 64 << 20
_EDGE = 1 << 20
_digest_cache: dict[tuple[str, int, int], str] = {}
_models: dict[tuple[str, str, str], LoadedRewriter] = {}
_lock = threading.Lock()


@dataclass
class LoadedRewriter:
    """A loaded rewriter and what identifies it. ``fingerprint`` is the ``models.model_id`` in the lineage."""

    model: Any
    tokenizer: Any
    image_processor: Any
    fingerprint: str
    device: Any
    dtype: Any
    spec: FlamingoSpec
    reports: list = field(default_factory=list)


def file_digest(path: str | Path) -> str:
    """Content digest of one file (full hash up to 64 MiB, else size + first and last MiB), cached per process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digest_cache:
        h = hashlib.blake2b(digest_size=16)
        h.update(str(st.st_size).encode())
        with open(path, "rb") as f:
            if st.st_size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f.read(_EDGE))
                f.seek(st.st_size - _EDGE)
                h.update(f.read(_EDGE))
        _digest_cache[key] = h.hexdigest()
    return _digest_cache[key]


def path_digest(ref: str | None) -> Any:
    """Digest of a file, of every file in a folder, or the reference itself when it is not local (a hub id)."""
    if ref is None:
        return None
    local = ref[len("local-dir:") :] if ref.startswith("local-dir:") else ref
    p = Path(local)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        return sorted(
            (str(f.relative_to(p)), file_digest(f))
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
    return ref


def fingerprint(spec: FlamingoSpec) -> str:
    """``m_`` + hash of the architecture settings and the content of every weight/tokenizer file the spec names."""
    from polite.ids import stable_hash

    data = spec.to_dict()
    for k in ("root", "allow_download"):
        data.pop(k, None)
    for name in ("lm", "tokenizer", "vision", "vision_pretrained", "checkpoint", "adapter"):
        data[name] = path_digest(data[name])
    data["extra_checkpoints"] = [path_digest(p) for p in data["extra_checkpoints"]]
    return "m_" + stable_hash("flamingo", data, length=20)


def as_spec(ref: str | os.PathLike | FlamingoSpec | dict) -> FlamingoSpec:
    """A spec from a model folder, a ``flamingo.json`` path, a dict, or a spec."""
    if isinstance(ref, FlamingoSpec):
        return ref.resolve()
    if isinstance(ref, dict):
        return FlamingoSpec.from_dict(ref).resolve()
    path = Path(ref)
    if path.is_dir() and not (path / SPEC_FILE).exists():
        raise FileNotFoundError(f"{path} is not a model folder: it has no {SPEC_FILE}")
    return FlamingoSpec.from_file(path)


def default_device_dtype(device=None, dtype=None):
    import torch

    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def load_rewriter(ref: str | os.PathLike | FlamingoSpec | dict, device=None, dtype=None) -> LoadedRewriter:
    """Load (or return the already loaded) rewriter named by ``ref`` on ``device`` in ``dtype``.

    Defaults: CUDA in bf16 when available, else CPU in float32. The model is in eval mode with every parameter
    frozen; LoRA adapters named in the spec are merged.
    """
    spec = as_spec(ref)
    device, dtype = default_device_dtype(device, dtype)
    fp = fingerprint(spec)
    key = (fp, str(device), str(dtype))
    with _lock:
        if key not in _models:
            from models.flamingo import build_flamingo

            model, tokenizer, image_processor, reports = build_flamingo(spec)
            model.to(device=device, dtype=dtype)
            _models[key] = LoadedRewriter(model, tokenizer, image_processor, fp, device, dtype, spec, reports)
        return _models[key]


def clear_cache() -> None:
    """Forget every loaded model (frees memory once no caller holds one)."""
    with _lock:
        _models.clear()
