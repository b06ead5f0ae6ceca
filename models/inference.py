"""The seed's ``Inferencer`` API, kept as its users know it, plus plain left-padded batched generation.

    from models import Inferencer, get_prompt
    inferencer = Inferencer(lm_path="/models/llama-7b-hf", clip_vision_encoder_path="ViT-L-14-336",
                            tuning_config="/models/guanaco-7b", checkpoint="/models/OpenFlamingo-9B/checkpoint.pt",
                            extra_checkpoints=["/models/polite_flamingo.pt"], vision_pretrained="/models/clip.pt")
    response, full_text = inferencer(prompt=get_prompt(instruction, raw, mode="polite_flamingo"),
                                     imgpaths=["cat.jpg"], response_split="(Revised Response):")

``Inferencer.from_model("workspace/models/<id>")`` opens one of our own model folders (tiny or trained).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from models.prompts import split_response
from polite.images import to_rgb

# Decoding defaults of the released inference code (METHOD.md).
DEFAULT_DECODING = dict(
    max_new_token=1024,
    num_beams=3,
    temperature=1.0,
    top_k=20,
    top_p=0.9,
    do_sample=True,
    length_penalty=1.0,
    no_repeat_ngram_size=3,
)
_BLANK_SIZE = (224, 224)


def open_image(ref):
    """A PIL RGB image from a path or an already open image."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    with Image.open(ref) as im:
        return to_rgb(im)


def images_to_vision_x(image_lists: Sequence[Sequence[Any]], image_processor, device=None, dtype=None):
    """(B, T_img, 1, C, H, W) pixels for a batch: each row's images in order; a row without images gets one black
    image (as the seed), shorter rows are padded with black images that no ``<image>`` token refers to."""
    import torch
    from PIL import Image

    blank = Image.new("RGB", _BLANK_SIZE, color="black")
    rows = [[open_image(r) for r in refs] or [blank] for refs in image_lists]
    t_max = max(len(r) for r in rows)
    pixel_rows = []
    for row in rows:
        row = row + [blank] * (t_max - len(row))
        pixel_rows.append(torch.stack([image_processor(im) for im in row]))
    vision_x = torch.stack(pixel_rows).unsqueeze(2)
    return vision_x.to(device=device, dtype=dtype)


def decoding_kwargs(
    max_new_token: int,
    num_beams: int,
    temperature: float,
    top_k: int,
    top_p: float,
    do_sample: bool,
    length_penalty: float,
    no_repeat_ngram_size: int,
) -> dict[str, Any]:
    """The seed's argument names -> Hugging Face ``generate`` keyword arguments."""
    kwargs = dict(
        max_new_tokens=int(max_new_token),
        num_beams=int(num_beams),
        do_sample=bool(do_sample),
        length_penalty=float(length_penalty),
        no_repeat_ngram_size=int(no_repeat_ngram_size),
    )
    if do_sample:
        kwargs.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    return kwargs


def generate_batch(loaded, prompts: Sequence[str], image_lists: Sequence[Sequence[Any]], **gen_kwargs):
    """Generate for one left-padded batch; returns each row's ids (padding removed) and how many are prompt."""
    from models.flamingo import generate

    tok = loaded.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
    vision_x = images_to_vision_x(image_lists, loaded.image_processor, loaded.device, loaded.dtype)
    out = generate(
        loaded.model,
        vision_x,
        enc["input_ids"].to(loaded.device),
        enc["attention_mask"].to(loaded.device),
        **gen_kwargs,
    )
    width, rows = enc["input_ids"].shape[1], []
    for row, n_pad in zip(out.cpu(), (1 - enc["attention_mask"]).sum(dim=1).tolist(), strict=True):
        rows.append((row[n_pad:].tolist(), width - n_pad))
    return rows


class Inferencer:
    """The seed's inference entry point: build once, then call with a prompt and image paths."""

    def __init__(
        self,
        lm_path: str | None = None,
        clip_vision_encoder_path: str = "ViT-L-14-336",
        tuning_config: str | None = None,
        *,
        checkpoint: str | None = None,
        extra_checkpoints: Sequence[str] = (),
        vision_pretrained: str | None = "openai",
        cross_attn_every_n_layers: int = 4,
        v1_masking: bool = True,
        allow_download: bool = False,
        device=None,
        dtype=None,
        batch_size: int = 8,
        **spec_fields: Any,
    ):
        """``spec_fields`` are further ``FlamingoSpec`` fields (e.g. perceiver sizes of a non-standard model)."""
        from models.flamingo import SPEC_FILE, FlamingoSpec
        from models.loader import load_rewriter

        if lm_path is not None and os.path.isfile(os.path.join(lm_path, SPEC_FILE)):
            ref: Any = lm_path  # one of our model folders
        else:
            ref = FlamingoSpec(
                lm=lm_path,
                vision=clip_vision_encoder_path,
                vision_pretrained=vision_pretrained,
                checkpoint=checkpoint,
                adapter=tuning_config,
                extra_checkpoints=list(extra_checkpoints),
                cross_attn_every_n_layers=cross_attn_every_n_layers,
                v1_masking=v1_masking,
                allow_download=allow_download,
                **spec_fields,
            )
        self.loaded = load_rewriter(ref, device=device, dtype=dtype)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.image_processor = self.loaded.image_processor
        self.batch_size = batch_size

    @classmethod
    def from_model(cls, ref: str, device=None, dtype=None, batch_size: int = 8) -> Inferencer:
        """An Inferencer over one of our model folders (``flamingo.json`` inside)."""
        return cls(lm_path=str(ref), device=device, dtype=dtype, batch_size=batch_size)

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    def __call__(
        self,
        prompt: str | Sequence[str],
        imgpaths: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
        max_new_token: int = DEFAULT_DECODING["max_new_token"],
        num_beams: int = DEFAULT_DECODING["num_beams"],
        temperature: float = DEFAULT_DECODING["temperature"],
        top_k: int = DEFAULT_DECODING["top_k"],
        top_p: float = DEFAULT_DECODING["top_p"],
        do_sample: bool = DEFAULT_DECODING["do_sample"],
        length_penalty: float = DEFAULT_DECODING["length_penalty"],
        no_repeat_ngram_size: int = DEFAULT_DECODING["no_repeat_ngram_size"],
        response_split: str = "### Assistant:",
    ):
        """One prompt -> ``(response, full_text)``; a list of prompts (with a list of image lists) -> a list of
        those tuples. ``full_text`` is the decoded prompt and generation, ``response`` the part after the last
        ``response_split``."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if single:
            image_lists = [list(imgpaths or [])]
        else:
            image_lists = [list(x or []) for x in (imgpaths if imgpaths is not None else [[]] * len(prompts))]
        if len(image_lists) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(image_lists)} image lists")
        gen = decoding_kwargs(
            max_new_token,
            num_beams,
            temperature,
            top_k,
            top_p,
            do_sample,
            length_penalty,
            no_repeat_ngram_size,
        )
        results = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            rows = generate_batch(self.loaded, chunk, image_lists[start : start + self.batch_size], **gen)
            for ids, _ in rows:
                full_text = self.tokenizer.decode(ids, skip_special_tokens=True)
                results.append((split_response(full_text, response_split), full_text))
        return results[0] if single else results
