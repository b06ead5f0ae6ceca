"""Scorer models made locally, for tests, the demo and benchmarks: no download, same loading code.

``tiny`` shapes run in milliseconds on a CPU; ``base``/``large`` build the real architectures (DeBERTa-v3
base and large, MPNet base) with random weights, for GPU throughput figures. Tokenizers are word-level,
built on the spot: realistic sequence lengths, no vocabulary file to fetch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

_BASE_WORDS = (
    "a an the this that these those is are was were be been has have had do does did not no yes and or but "
    "of in on at to from with by for about over under near behind between into out up down left right top "
    "bottom front back there here it its he she they them his her their we you i image picture photo shows "
    "showing contains depicts scene man woman person people child dog cat horse bird car bus train truck "
    "street road table chair sofa couch bed room kitchen window door wall floor grass tree sky water beach "
    "red blue green yellow white black brown gray small large big little two three four many some one answer "
    "question what where which who how why color number sitting standing walking riding holding eating "
    "playing looking wearing parked open closed old young"
).split()
_WORD = re.compile(r"\w+|[^\w\s]")


def make_tokenizer(path: str | Path, texts: Iterable[str] = (), style: str = "bert") -> str:
    """A word-level fast tokenizer saved at ``path`` (vocabulary: common words + the words of ``texts``).

    ``style`` picks the special tokens: ``bert`` ([CLS] a [SEP] b [SEP]) or ``roberta`` (<s> a </s></s> b </s>).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if style == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    pad, unk, cls, sep = specials
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in [*_BASE_WORDS, *(w.lower() for t in texts for w in _WORD.findall(t))]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    pair = f"{cls} $A {sep} $B:1 {sep}:1" if style == "bert" else f"{cls} $A {sep} {sep} $B:1 {sep}:1"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair, special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        pad_token=pad,
        cls_token=cls,
        sep_token=sep,
        bos_token=cls,
        eos_token=sep,
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(path))
    return str(path)


DEBERTA_SIZES = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, position_buckets=32
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        position_buckets=256,
    ),
    "large": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        position_buckets=256,
    ),
}
NLI_LABELS = {0: "contradiction", 1: "entailment", 2: "neutral"}  # cross-encoder/nli-deberta-v3-base's order


def make_deberta_classifier(
    path: str | Path,
    num_labels: int,
    size: str = "tiny",
    texts: Iterable[str] = (),
    id2label: dict[int, str] | None = None,
    seed: int = 0,
    real_vocab: bool = False,
    save_dtype: str | None = None,
) -> str:
    """A DeBERTa-v3 sequence classifier (NLI: 3 labels; reward: 1) with random weights, saved at ``path``."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    make_tokenizer(path, texts, style="bert")
    n_vocab = len(json.loads((Path(path) / "tokenizer.json").read_text())["model"]["vocab"])
    if id2label is None and num_labels == 3:
        id2label = NLI_LABELS
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    config = DebertaV2Config(
        vocab_size=128100 if real_vocab else n_vocab,
        max_position_embeddings=512,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **DEBERTA_SIZES[size],
    )
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(config)
    if save_dtype:  # full-size models: half the bytes to write and read back
        model.to(getattr(torch, save_dtype))
    model.save_pretrained(str(path))
    return str(path)


def make_mpnet_sentence_model(
    path: str | Path, size: str = "base", texts: Iterable[str] = (), seed: int = 0
) -> str:
    """A sentence-transformers MPNet (mean pooling + normalise, like all-mpnet-base-v2), random weights."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import MPNetConfig, MPNetModel

    raw = Path(path) / "_transformer"
    make_tokenizer(raw, texts, style="roberta")
    shape = (
        {}
        if size == "base"
        else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    config = MPNetConfig(
        vocab_size=30527, max_position_embeddings=514, pad_token_id=0, bos_token_id=2, eos_token_id=3, **shape
    )
    torch.manual_seed(seed)
    MPNetModel(config).save_pretrained(str(raw))
    transformer = models.Transformer(str(raw), max_seq_length=384)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = models.Pooling(dim(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(path))
    return str(path)


CLIP_SIZES = {
    "tiny": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


def make_clip(
    folder: str | Path, name: str = "polite-tiny-clip", size: str = "tiny", seed: int = 0
) -> dict[str, str]:
    """An open_clip model config (both towers) and random weights, saved under ``folder``.

    Returns the ``filters.clipscore`` settings that load it: ``model``, ``model_config_file``, ``pretrained``.
    """
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / f"{name}.json"
    config_file.write_text(json.dumps(CLIP_SIZES[size]))
    open_clip.add_model_config(str(config_file))
    from polite.env import random_init_on_purpose

    torch.manual_seed(seed)
    with random_init_on_purpose():  # the weights are made here and saved next: open_clip's warning misleads
        model = open_clip.create_model(name)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return {"model": name, "model_config_file": str(config_file), "pretrained": str(weights)}


def make_tiny_scorer_models(folder: str | Path, texts: Iterable[str] = ()) -> dict[str, dict]:
    """Tiny NLI, reward and CLIP models under ``folder``; returns the ``filters`` config that enables them."""
    folder = Path(folder)
    texts = list(texts)
    return {
        "nli": {"enabled": True, "model": make_deberta_classifier(folder / "nli", 3, texts=texts)},
        "reward": {
            "enabled": True,
            "model": make_deberta_classifier(folder / "reward", 1, texts=texts, seed=1),
        },
        "clipscore": {"enabled": True, **make_clip(folder / "clip")},
    }
