"""LoRA on the Flamingo's language model through peft: fresh, from a saved adapter, saved, merged.

peft injects the adapter layers into the LM in place; ``model.lang_encoder`` keeps pointing at the inner LM (see
models/compat.py for why) and the ``PeftModel`` wrapper is only used to save or merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.flamingo import DEFAULT_LORA_TARGETS

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def add_lora(
    model,
    rank: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
    config=None,
):
    """Inject a fresh LoRA adapter into the LM's attention and MLP projections; returns the peft wrapper.

    Only the adapter is trainable afterwards (peft freezes the rest, cross-attention included): call
    ``compat.unfreeze`` for more groups.
    """
    from peft import LoraConfig, get_peft_model

    from models.compat import language_model

    lm = language_model(model)
    if config is None:
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
        )
    peft_model = get_peft_model(lm, config)
    assert model.lang_encoder is lm  # injected in place; the wrapper must not replace the LM
    model.train(model.training)  # new dropout layers start in training mode, even inside an eval() model
    return peft_model


def adapter_weight_file(folder: str | Path) -> Path:
    folder = Path(folder)
    for name in _ADAPTER_FILES:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no LoRA adapter ({' or '.join(_ADAPTER_FILES)})")


def adapter_keys_to_flamingo(state: dict[str, Any]) -> dict[str, Any]:
    """Adapter keys (relative to the LM, as peft saves them) -> Flamingo keys. An adapter trained on the plain LM
    (e.g. Guanaco-7B) lacks the ``decoder_layer.`` level; ``checkpoints.load_into`` finds those too."""
    prefix = "base_model.model."
    return {"lang_encoder." + (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_adapter(model, folder: str | Path, trainable: bool = False):
    """Inject the adapter saved in ``folder`` (peft format) and load its weights, failing on keys that match
    nothing. Returns the peft wrapper."""
    from peft import LoraConfig

    from models.checkpoints import load_into, read_state_dict

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = not trainable
    peft_model = add_lora(model, config=config)
    state = adapter_keys_to_flamingo(read_state_dict(adapter_weight_file(folder)))
    load_into(model, state, str(folder))
    return peft_model


def save_adapter(peft_model, folder: str | Path) -> Path:
    """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def merge(model, peft_model) -> None:
    """Fold the adapter into the LM weights (in place); the LM is plain again afterwards."""
    from models.compat import language_model

    lm = language_model(model)
    merged = peft_model.merge_and_unload()
    assert merged is lm and model.lang_encoder is lm
