"""Reading weight files safely and loading them into a Flamingo with a report of what matched.

Never unpickles: ``.safetensors`` through safetensors, anything else through ``torch.load(weights_only=True)``.
Released checkpoints are loaded ``strict=False`` the way they were published, but every key must land somewhere:
a key that matches no parameter (or one with the wrong shape) fails with a message that names it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polite.errors import UserError

# peft versions before 0.3 saved adapters without the adapter name; a model wrapped as a whole by PeftModel
# (as the seed code did with lang_encoder) saves under "lang_encoder.base_model.model."
_WRAPPER_PREFIXES = ("lang_encoder.base_model.model.",)
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# weights saved from a plain LM name ``model.layers.N.self_attn``; in a Flamingo the block sits one level down
_PLAIN_LAYER = re.compile(r"(\.layers\.\d+\.)(?!decoder_layer\.|gated_cross_attn_layer\.)")


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint holds keys that match no parameter of the model (or match with the wrong shape)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in a weight file (safetensors, or a torch file loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects; say so instead of a pickle traceback
        raise ValueError(
            f"{path} could not be read as plain tensors (torch.load weights_only=True): {exc}. "
            "We never unpickle checkpoints; convert it to safetensors with a trusted tool first."
        ) from None
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat mapping of names to tensors")
    return state


def normalise_key(key: str) -> str:
    """Map the key spellings of other savers onto ours (DDP ``module.``, peft wrappers, unnamed adapters)."""
    if key.startswith("module."):
        key = key[len("module.") :]
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = "lang_encoder." + key[len(prefix) :]
    for part in _LORA_PARTS:
        key = key.replace(f".{part}.weight", f".{part}.default.weight")
    return key


@dataclass
class LoadReport:
    """What one weight file set: loaded keys, our parameters it left alone, and where it came from."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        groups = Counter(_group(k) for k in self.missing)
        left = ", ".join(f"{g} {n}" for g, n in sorted(groups.items())) or "none"
        return f"{self.source}: loaded {len(self.loaded)} tensors; left as they were: {left}"


def _group(key: str) -> str:
    if "lora_" in key:
        return "lora"
    if "gated_cross_attn" in key:
        return "cross_attn"
    for prefix in ("vision_encoder", "perceiver"):
        if key.startswith(prefix):
            return prefix
    return "lm"


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy ``state`` into ``model`` (``strict=False``); fail, naming them, on keys that match nothing.

    open_flamingo registers each decoder layer twice (``model.layers.N.decoder_layer`` and
    ``old_decoder_blocks.N``); a key under either name loads the one shared tensor.
    """
    own = model.state_dict(keep_vars=True)
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, tensor in own.items():
        alias[name] = canonical.setdefault(id(tensor), name)
    unexpected, bad_shape, resolved = [], [], {}
    for raw_key, value in state.items():
        key = normalise_key(raw_key)
        if key not in alias:
            key = _PLAIN_LAYER.sub(r"\1decoder_layer.", key)
        if key not in alias:
            unexpected.append(raw_key)
            continue
        target = alias[key]
        if tuple(own[target].shape) != tuple(value.shape):
            bad_shape.append(f"{raw_key} {tuple(value.shape)} vs ours {tuple(own[target].shape)}")
            continue
        resolved[target] = value
    if unexpected or bad_shape:
        lines = [f"{source} does not fit this model:"]
        if unexpected:
            lines.append(
                f"  {len(unexpected)} keys match no parameter, e.g. {', '.join(sorted(unexpected)[:8])}"
            )
        if bad_shape:
            lines.append(f"  {len(bad_shape)} keys have the wrong shape, e.g. {'; '.join(bad_shape[:5])}")
        lines.append("  (check the model spec: LM size, cross_attn_every_n_layers, LoRA rank and targets)")
        raise CheckpointMismatch("\n".join(lines))
    with torch.no_grad():
        for target, value in resolved.items():
            own[target].data.copy_(value.to(dtype=own[target].dtype))
    missing = sorted({n for n in alias.values()} - set(resolved))
    return LoadReport(source=source, loaded=sorted(resolved), missing=missing)
