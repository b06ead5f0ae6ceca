"""Plain batched generation with a Hugging Face causal LM (the local backend of LLM-instructed distortion).

Loaded once per process through ``load_text_lm`` (cached), so a worker keeps the model between shards.
Batches are formed from prompts sorted by length and padded on the left, so every row's new tokens start
at the same position and little compute goes to padding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from polite.ids import stable_hash

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def fingerprint(name_or_path: str) -> str:
    """``hf:<name>@<hash>`` of a local model folder (its config, and its weight files' and tokenizer's content
    digests), or the Hub id.

    Cheap enough to key resume before loading anything: a large file's digest reads its first and last MiB
    (``models.loader.file_digest``). Sizes alone did not do: a model fine-tuned and saved over the same folder
    keeps its files' sizes, and resume would have taken the old model's output for the new one's.
    """
    from models.loader import file_digest

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"hf:{name_or_path}"
    config = (path / "config.json").read_text() if (path / "config.json").exists() else ""
    files = sorted((p.name, file_digest(p)) for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    tok = file_digest(path / "tokenizer.json") if (path / "tokenizer.json").exists() else ""
    return f"hf:{path.resolve().name}@{stable_hash('text-lm', config, files, tok, length=10)}"


def render_guanaco(messages: Sequence[dict[str, str]]) -> str:
    """Fallback chat format for tokenizers without a chat template (Guanaco's, the paper's distorter)."""
    turns = []
    for m in messages:
        role = {"user": "Human", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"].title())
        turns.append(f"### {role}: {m['content']}")
    return "\n".join(turns) + "\n### Assistant:"


class TextLM:
    """A causal LM with its tokenizer, ready for left-padded batched generation."""

    def __init__(self, model: Any, tokenizer: Any, identity: str, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self._lock = threading.Lock()  # one generate at a time per model: seeds are process-global in torch

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return render_guanaco(messages)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        max_prompt_tokens: int = 2048,
        seed: int = 0,
    ) -> list[str]:
        """Completions of ``prompts`` in their order. ``temperature`` 0 decodes greedily (reproducible)."""
        import torch

        tok = self.tokenizer
        # A chat template already writes the BOS token; a plain prompt needs the tokenizer to add it.
        add_special = not self.has_chat_template
        encoded = [tok(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
        budget = max(1, max_prompt_tokens)
        encoded = [ids[-budget:] for ids in encoded]  # keep the end: the follow-up request matters most
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        outputs: list[str] = [""] * len(encoded)
        pad_id = tok.pad_token_id
        sampling = temperature > 0
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = encoded[i]
                    ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                    mask[row, width - len(seq) :] = 1
                kwargs: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_new_tokens}
                if sampling:
                    kwargs.update(temperature=temperature, top_p=top_p)
                    torch.manual_seed(seed + start)
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    pad_token_id=pad_id,
                    **kwargs,
                )
                for row, i in enumerate(idx):
                    outputs[i] = tok.decode(out[row, width:], skip_special_tokens=True)
        return outputs


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


@lru_cache(maxsize=4)
def load_text_lm(name_or_path: str, device: str = "cpu", dtype: str = "auto", allow_download: bool = False) -> TextLM:
    """Load a causal LM and its tokenizer once per process. A Hub id needs ``allow_download``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if not local.is_dir() and not allow_download:
        raise FileNotFoundError(
            f"no model folder at {name_or_path}; give a local Hugging Face model folder, "
            "or set distort.llm.allow_download: true to fetch it from the Hub"
        )
    source = str(local) if local.is_dir() else name_or_path
    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer of {name_or_path} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=offline, dtype=_dtype(dtype, device))
    model.to(device).eval()
    return TextLM(model, tokenizer, fingerprint(name_or_path), device)

