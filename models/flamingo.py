"""Build an OpenFlamingo from a spec, from local files only unless the spec allows downloads.

The same code builds the tiny test model and OpenFlamingo-9B (v1) with the Polite Flamingo weights on top:

    FlamingoSpec(lm="/models/llama-7b-hf", vision="ViT-L-14-336", vision_pretrained="/models/clip/openai.pt",
                 checkpoint="/models/OpenFlamingo-9B/checkpoint.pt", adapter="/models/guanaco-7b",
                 extra_checkpoints=["/models/polite_flamingo.pt"], cross_attn_every_n_layers=4, v1_masking=True)

Order of loading: tokenizer -> LM (resized to the tokenizer) -> vision tower -> Flamingo wrapper -> the OpenFlamingo
checkpoint -> the LoRA adapter (peft, injected in place) -> extra checkpoints (may hold LoRA weights) -> merge.
open_flamingo's own factory downloads weights by default; we construct from paths and configs instead.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from models.prompts import ADDED_TOKENS, BOS_ID, CHUNK_END_TOKEN, EOS_ID, IMAGE_TOKEN, PAD_ID

SPEC_FILE = "flamingo.json"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DECODER_LAYERS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
                   "opt": "model.decoder.layers", "gptneox": "gpt_neox.layers", "gpt_neox": "gpt_neox.layers",
                   "gptj": "transformer.h", "mpt": "transformer.blocks"}  # fmt: skip
_PATH_FIELDS = ("lm", "tokenizer", "vision", "vision_pretrained", "checkpoint", "adapter")


@dataclass
class FlamingoSpec:
    """Everything needed to build one rewriter model. Relative paths resolve against ``root``."""

    lm: str | None = None  # Hugging Face causal LM folder (or hub id, with allow_download)
    lm_config: dict[str, Any] | None = None  # or: build the LM from this config with random weights
    tokenizer: str | None = None  # defaults to ``lm``
    # an open_clip model name, or "local-dir:PATH" (open_clip_config.json + weights)
    vision: str = "ViT-L-14-336"
    vision_pretrained: str | None = None  # open_clip weight file, or a tag like "openai" (downloads)
    checkpoint: str | None = None  # OpenFlamingo weights (checkpoint.pt or .safetensors), loaded strict=False
    adapter: str | None = None  # a peft LoRA adapter folder (the seed's ``tuning_config``)
    extra_checkpoints: list[str] = field(default_factory=list)  # e.g. polite_flamingo.pt, after the adapter
    merge_lora: bool = True  # fold the adapter into the LM weights for inference
    cross_attn_every_n_layers: int = 4
    perceiver_depth: int = 6
    perceiver_latents: int = 64
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    cross_attn_ff_mult: int = 4
    v1_masking: bool = False  # the masking the released v1 checkpoints were trained with
    decoder_layers_attr_name: str | None = None
    allow_download: bool = False
    root: str | None = None

    def resolve(self, root: str | os.PathLike | None = None) -> FlamingoSpec:
        """A copy with every local relative path made absolute against ``root`` (or ``self.root``)."""
        base = Path(root or self.root or ".").resolve()
        values = asdict(self)
        values["root"] = str(base)

        def fix(p: str | None) -> str | None:
            if p is None:
                return None
            if p.startswith("local-dir:"):
                return "local-dir:" + str((base / p[len("local-dir:") :]).resolve())
            cand = base / p
            return str(cand.resolve()) if (not Path(p).is_absolute() and cand.exists()) else p

        for name in _PATH_FIELDS:
            values[name] = fix(values[name])
        values["extra_checkpoints"] = [fix(p) for p in self.extra_checkpoints]
        return FlamingoSpec(**values)

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: str | os.PathLike | None = None) -> FlamingoSpec:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"unknown model spec fields {extra}; known: {sorted(known)}")
        _check_values(data)
        spec = cls(**data)
        return spec.resolve(root) if root is not None or spec.root else spec

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FlamingoSpec:
        """Read ``flamingo.json`` (or a folder holding one); its relative paths are relative to its folder."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        if not path.exists():
            raise FileNotFoundError(f"no model spec at {path} (a model folder holds {SPEC_FILE})")
        try:
            return cls.from_dict(json.loads(path.read_text()), root=path.parent)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | os.PathLike, relative: bool = True) -> Path:
        """Write ``flamingo.json`` into ``folder``, paths inside the folder stored relative to it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data.pop("root", None)
        if relative:

            def rel(p: str | None) -> str | None:
                # inside the folder or beside it (sibling models in one workspace): relative, so the
                # workspace can move; anything else stays as given
                if p is None:
                    return None
                prefix = "local-dir:" if p.startswith("local-dir:") else ""
                raw = Path(p[len(prefix) :])
                if not raw.is_absolute():
                    return p
                home = folder.resolve().parent
                if raw.resolve().is_relative_to(home):
                    return prefix + os.path.relpath(raw.resolve(), folder.resolve())
                return p

            for name in _PATH_FIELDS:
                data[name] = rel(data[name])
            data["extra_checkpoints"] = [rel(p) for p in data["extra_checkpoints"]]
        out = folder / SPEC_FILE
        out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return out


_BOOL_FIELDS = ("merge_lora", "v1_masking", "allow_download")
_COUNT_FIELDS = ("cross_attn_every_n_layers", "perceiver_depth", "perceiver_latents", "perceiver_heads",
                 "perceiver_dim_head", "cross_attn_heads", "cross_attn_dim_head", "cross_attn_ff_mult")  # fmt: skip
_TEXT_FIELDS = ("lm", "tokenizer", "vision", "vision_pretrained", "checkpoint", "adapter",
                "decoder_layers_attr_name", "root")  # fmt: skip


def _check_values(data: dict[str, Any]) -> None:
    """Reject a spec's values of the wrong kind by name: a JSON "false" would otherwise be true, a string of
    extra checkpoints one path per character, and a zero count a crash deep inside open_flamingo."""
    for name in _BOOL_FIELDS:
        if name in data and not isinstance(data[name], bool):
            raise ValueError(f"model spec: {name} must be true or false, got {data[name]!r}")
    for name in _COUNT_FIELDS:
        value = data.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model spec: {name} must be a whole number of at least 1, got {value!r}")
    for name in _TEXT_FIELDS:
        value = data.get(name, "")
        if not isinstance(value, str) and not (value is None and name != "vision"):
            raise ValueError(f"model spec: {name} must be a path or name, got {value!r}")
    extra = data.get("extra_checkpoints", [])
    if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
        raise ValueError(f"model spec: extra_checkpoints must be a list of paths, got {extra!r}")
    if not isinstance(data.get("lm_config", {}), dict | None):
        raise ValueError(f"model spec: lm_config must be a mapping (a model config), got {data['lm_config']!r}")


def _local_only(spec: FlamingoSpec, what: str, ref: str) -> bool:
    """``local_files_only`` for a Hugging Face load; refuse hub ids unless downloads are allowed."""
    if Path(ref).exists():
        return True
    if not spec.allow_download:
        raise FileNotFoundError(
            f"{what} {ref!r} is not a local path; set allow_download: true in the model spec to fetch it from a hub"
        )
    return False


def load_tokenizer(spec: FlamingoSpec):
    """The LM's tokenizer with the Flamingo tokens added; pad id 0, bos 1, eos 2, left padding (as the seed)."""
    from transformers import AutoTokenizer

    ref = spec.tokenizer or spec.lm
    if ref is None:
        raise ValueError("the model spec needs a tokenizer (or an lm folder holding one)")
    tok = AutoTokenizer.from_pretrained(ref, local_files_only=_local_only(spec, "tokenizer", ref))
    missing = [t for t in (CHUNK_END_TOKEN, IMAGE_TOKEN) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": list(missing)})
    if ADDED_TOKENS[-1] not in tok.get_vocab():
        tok.add_special_tokens({"pad_token": ADDED_TOKENS[-1]})
    # the released checkpoints pad with id 0 (LLaMA's <unk>), not with the added <PAD>
    tok.pad_token = tok.convert_ids_to_tokens(PAD_ID)
    if tok.bos_token_id != BOS_ID or tok.eos_token_id != EOS_ID:
        raise ValueError(
            f"tokenizer {ref} has bos/eos ids {tok.bos_token_id}/{tok.eos_token_id}; expected 1/2"
        )
    tok.padding_side = "left"
    return tok


def _decoder_layers_attr(lm, spec: FlamingoSpec) -> str:
    if spec.decoder_layers_attr_name:
        return spec.decoder_layers_attr_name
    name = type(lm).__name__.lower()
    for key, attr in _DECODER_LAYERS.items():
        if key in name:
            return attr
    raise ValueError(
        f"cannot tell where {type(lm).__name__} keeps its decoder layers; set decoder_layers_attr_name"
    )


def load_language_model(spec: FlamingoSpec, dtype=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.lm_config is not None:
        config = dict(spec.lm_config)
        config_obj = AutoConfig.for_model(config.pop("model_type", "llama"), **config)
        return AutoModelForCausalLM.from_config(config_obj, dtype=dtype)
    if spec.lm is None:
        raise ValueError("the model spec needs lm (a model folder) or lm_config")
    return AutoModelForCausalLM.from_pretrained(
        spec.lm, local_files_only=_local_only(spec, "language model", spec.lm), dtype=dtype
    )


def load_vision(spec: FlamingoSpec):
    """The open_clip model (weights from a local file, a local-dir, or an allowed tag) and its eval transform."""
    import open_clip

    pretrained = spec.vision_pretrained
    if spec.vision.startswith("hf-hub:") and not spec.allow_download:
        raise FileNotFoundError(f"vision {spec.vision!r} is on a hub; set allow_download: true to fetch it")
    if pretrained is not None and not Path(pretrained).exists() and not spec.allow_download:
        raise FileNotFoundError(
            f"vision_pretrained {pretrained!r} is neither a local file nor allowed to download "
            "(give the weight file's path, or set allow_download: true)"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(spec.vision, pretrained=pretrained)
    model.visual.output_tokens = True
    width = open_clip.get_model_config(spec.vision)["vision_cfg"]["width"]
    return model, preprocess, width


def build_flamingo(spec: FlamingoSpec, dtype=None, lora_for_training: dict[str, Any] | None = None):
    """Build the model, load its weights, and return ``(model, tokenizer, image_processor, reports)``.

    The adapter (if any) is merged unless ``spec.merge_lora`` is false. ``lora_for_training`` (rank, alpha,
    dropout, targets) adds a fresh adapter when the spec has none; the peft wrapper then sits at
    ``model.peft_model`` while ``model.lang_encoder`` stays the inner LM.
    """
    import torch
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    from models import compat, lora
    from models.checkpoints import load_into, read_state_dict

    tokenizer = load_tokenizer(spec)
    lm = load_language_model(spec, dtype=dtype)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):  # LLaMA's 32000 -> 32003; never shrink
        lm.resize_token_embeddings(len(tokenizer))
    compat.make_flamingo_lm(lm, _decoder_layers_attr(lm, spec))
    clip, image_processor, vis_dim = load_vision(spec)
    model = Flamingo(
        clip,
        lm,
        eoc_token_id=tokenizer.convert_tokens_to_ids(CHUNK_END_TOKEN),
        media_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vis_dim=vis_dim,
        cross_attn_every_n_layers=spec.cross_attn_every_n_layers,
    )
    perceiver_shape = (
        spec.perceiver_depth,
        spec.perceiver_latents,
        spec.perceiver_heads,
        spec.perceiver_dim_head,
    )
    if perceiver_shape != (6, 64, 8, 64):  # open_flamingo's fixed default
        model.perceiver = PerceiverResampler(
            dim=vis_dim,
            depth=spec.perceiver_depth,
            num_latents=spec.perceiver_latents,
            heads=spec.perceiver_heads,
            dim_head=spec.perceiver_dim_head,
        )
    if (spec.cross_attn_heads, spec.cross_attn_dim_head, spec.cross_attn_ff_mult) != (8, 64, 4):
        lang_dim = model.lang_dim
        lm.gated_cross_attn_layers = torch.nn.ModuleList(
            [
                GatedCrossAttentionBlock(
                    dim=lang_dim,
                    dim_visual=vis_dim,
                    dim_head=spec.cross_attn_dim_head,
                    heads=spec.cross_attn_heads,
                    ff_mult=spec.cross_attn_ff_mult,
                )
                if layer is not None
                else None
                for layer in lm.gated_cross_attn_layers
            ]
        )
        lm.init_flamingo_layers(False)
    compat.set_masking(model, spec.v1_masking)
    reports = []
    if spec.checkpoint:
        reports.append(load_into(model, read_state_dict(spec.checkpoint), spec.checkpoint))
    peft_model = None
    if spec.adapter:
        peft_model = lora.load_adapter(model, spec.adapter)
    elif lora_for_training is not None:
        peft_model = lora.add_lora(model, **lora_for_training)
    for extra in spec.extra_checkpoints:
        reports.append(load_into(model, read_state_dict(extra), extra))
    if peft_model is not None and spec.merge_lora and lora_for_training is None:
        lora.merge(model, peft_model)
        peft_model = None
    # kept outside the module tree: a registered wrapper would duplicate every LM weight in state_dict()
    object.__setattr__(model, "peft_model", peft_model)
    model.requires_grad_(False)
    model.eval()
    if dtype is not None:
        model.to(dtype=dtype)
    return model, tokenizer, image_processor, reports


def generate(model, vision_x, input_ids, attention_mask=None, **gen_kwargs):
    """``Flamingo.generate`` with the compatibility fixes: works on the inner LM (never a peft wrapper), stops at
    ``<|endofchunk|>`` or eos by default, and always clears the image conditioning, also when it raises.

    ``vision_x`` is (B, T_img, 1, C, H, W); returns the prompt ids with the new tokens appended.
    """

    from models.compat import language_model

    lm = language_model(model)
    with model_lock(model):  # the image conditioning lives in the layers: one generation per model at a time
        return _generate(model, lm, vision_x, input_ids, attention_mask, **gen_kwargs)


def model_lock(model) -> threading.RLock:
    """The lock that serialises calls which condition a model's layers on images (threads share cached models)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


_LOCKS_GUARD = threading.Lock()
_LOCKS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # kept off the module: models stay deep-copyable


def _generate(model, lm, vision_x, input_ids, attention_mask, **gen_kwargs):
    import torch

    num_beams = int(gen_kwargs.get("num_beams", 1) or 1)
    if num_beams > 1:
        vision_x = vision_x.repeat_interleave(num_beams, dim=0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    gen_kwargs.setdefault("eos_token_id", [model.eoc_token_id, EOS_ID])
    gen_kwargs.setdefault("pad_token_id", PAD_ID)
    try:
        with torch.inference_mode():
            lm._use_cached_vision_x = True
            model._encode_vision_x(vision_x=vision_x)
            return lm.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    finally:
        lm.clear_conditioned_layers()
        lm._use_cached_vision_x = False
