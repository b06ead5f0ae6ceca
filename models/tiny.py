"""A tiny rewriter for tests and the demo, written to disk in the same layout as a real checkpoint:

    out_dir/
      flamingo.json            the model spec (paths relative to out_dir)
      lm/                      a Hugging Face LLaMA folder: config, safetensors weights, tokenizer (BPE trained here)
      vision/                  an open_clip local-dir: open_clip_config.json + open_clip_model.safetensors
      checkpoint.safetensors   the OpenFlamingo weights (perceiver + gated cross-attention)

and loaded back by ``models.loader.load_rewriter`` exactly like OpenFlamingo-9B. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from models.flamingo import SPEC_FILE, FlamingoSpec
from models.prompts import ADDED_TOKENS, CHAT_TEMPLATE, REWRITE_TEMPLATE, SYSTEM

# Enough English for a usable BPE when no corpus is given (the flow passes the training texts instead).
_FALLBACK_CORPUS = [
    SYSTEM,
    REWRITE_TEMPLATE.format(system="", instruction="Describe the image.", raw="a dog on a couch"),
    CHAT_TEMPLATE.format(system="", instruction="What is in the picture?"),
    "The image shows a brown dog lying on a red couch next to a window. The room is bright and tidy.",
    "There are two people riding bicycles along a street lined with trees, and a bus is parked nearby.",
    "Answer: yes. The man is holding an umbrella because it is raining, so he is trying to stay dry.",
    "A plate of food with rice, vegetables and a piece of grilled chicken sits on a wooden table.",
    "In this photo, a cat is sitting on a laptop keyboard while someone is trying to work.",
    "The answer is 3. I can count three giraffes standing near the fence in the zoo enclosure.",
]

TINY_LM = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip
TINY_VISION = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 32, "heads": 2, "layers": 1},
}
TINY_FLAMINGO = dict(cross_attn_every_n_layers=2, perceiver_depth=1, perceiver_latents=8, perceiver_heads=2,
                     perceiver_dim_head=32, cross_attn_heads=2, cross_attn_dim_head=32, cross_attn_ff_mult=2)  # fmt: skip
_OPENAI_NORM = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 600):
    """A byte-level BPE trained on ``texts``: ``<unk>``/``<s>``/``</s>`` are ids 0/1/2 (as LLaMA), the Flamingo
    tokens are added after the learned vocabulary, and encoding prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS[:2])})
    fast.add_special_tokens({"pad_token": ADDED_TOKENS[2]})
    fast.pad_token = "<unk>"  # pad id 0, like the released checkpoints
    return fast


def make_tiny_rewriter(
    out_dir: str | Path,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 600,
    lm: dict | None = None,
    vision: dict | None = None,
) -> Path:
    """Create (once) a random-init tiny Flamingo at ``out_dir`` and return that folder.

    ``corpus`` trains the tokenizer (default: a few built-in sentences). The gated cross-attention starts with
    open gates (tanh(1)) so that even the untrained model's output depends on the image.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / SPEC_FILE).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        texts = list(corpus) if corpus is not None else []
        tokenizer = train_tokenizer(texts + _FALLBACK_CORPUS, vocab_size=vocab_size)
        tokenizer.save_pretrained(tmp / "lm")

        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False, **{**TINY_LM, **(lm or {})},
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(tmp / "lm", safe_serialization=True)

        (tmp / "vision").mkdir()
        vision_cfg = {"model_cfg": vision or TINY_VISION, "preprocess_cfg": _OPENAI_NORM}
        (tmp / "vision" / "open_clip_config.json").write_text(json.dumps(vision_cfg, indent=2))
        import open_clip

        from polite.env import random_init_on_purpose

        torch.manual_seed(seed + 1)
        with random_init_on_purpose():  # the weights are made here and saved next: open_clip's warning misleads
            clip = open_clip.create_model(f"local-dir:{tmp / 'vision'}")
        save_file(
            {k: v.contiguous() for k, v in clip.state_dict().items()},
            str(tmp / "vision" / "open_clip_model.safetensors"),
        )

        from models.flamingo import build_flamingo

        spec = FlamingoSpec(lm=str(tmp / "lm"), vision=f"local-dir:{tmp / 'vision'}", **TINY_FLAMINGO)
        torch.manual_seed(seed + 2)
        model, *_ = build_flamingo(spec)
        with torch.no_grad():
            for layer in model.lang_encoder.gated_cross_attn_layers:
                if layer is not None:
                    layer.attn_gate.fill_(1.0)
                    layer.ff_gate.fill_(1.0)
        flamingo_weights = {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if k.startswith("perceiver.") or k.startswith("lang_encoder.gated_cross_attn_layers.")
        }
        save_file(flamingo_weights, str(tmp / "checkpoint.safetensors"))
        spec.checkpoint = str(tmp / "checkpoint.safetensors")
        spec.save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
