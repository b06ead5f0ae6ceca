"""Batched rewriting with a loaded rewriter: decoding presets, input preparation, plain and fast backends.

``RewriteGenerator`` turns (instruction, raw response, images) into rewrites for one batch at a time:

* prompts are ``models.prompts.rewrite_prompt`` tokenized and padded left; a prompt longer than
  ``max_prompt_tokens`` fails alone ('too long'), so does a bad image (``polite.images.BadImageError``);
* each distinct image of a batch is encoded once (vision tower + perceiver), then gathered per row;
* the fast decoder (models/fast_decode.py) runs every preset, in static batches or continuously (``stream``):
  greedy entirely on the device, beams, sampling and no-repeat n-grams with Hugging Face's selection semantics
  (models/search.py); a repetition penalty, or a language model it does not support, goes to Hugging Face
  ``generate`` on the same precomputed image latents (the plain path);
* a row whose logits turn NaN fails alone.

Batching, prefetching and out-of-memory splitting live in models/batching.py.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from models.prompts import EOS_ID, PAD_ID, cut_response, rewrite_prompt
from polite.config.generation import PRESETS, resolve_generation  # noqa: F401 (settings: re-exported here)


def fast_supported(settings: dict[str, Any]) -> bool:
    """The fast decoder runs every setting but a repetition penalty."""
    return settings.get("repetition_penalty", 1.0) == 1.0


def greedy_on_device(settings: dict[str, Any]) -> bool:
    """Plain greedy search (optionally with a minimum length): picked inside the captured decode step. Every
    other setting picks its tokens with a search of models/search.py."""
    return (
        fast_supported(settings)
        and settings["num_beams"] == 1
        and not settings["do_sample"]
        and not settings.get("no_repeat_ngram_size")
    )


def hf_generate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings -> Hugging Face ``generate`` keyword arguments."""
    kwargs = {k: v for k, v in settings.items() if k != "seed"}
    if not kwargs.get("min_new_tokens"):
        kwargs.pop("min_new_tokens", None)
    if kwargs.get("num_beams", 1) > 1:
        # generate's default, stated so that a checkpoint's generation_config cannot change it: the settings
        # recorded with a rewrite, and the fast decoder's beam search (models/search.py), assume it
        kwargs["early_stopping"] = False
    return kwargs


class PromptTooLong(ValueError):
    """The prompt has more tokens than ``max_prompt_tokens``."""


@dataclass
class Prepared:
    """One sample ready for a batch: prompt ids and its images (preprocessed pixels, keyed for dedup)."""

    input_ids: list[int]
    image_keys: list[str]
    pixels: list[Any]


@dataclass
class Generated:
    text: str
    input_tokens: int
    output_tokens: int
    token_ids: list[int]


def encode_images(model, pixels):
    """Image latents (U, n_latents, dim) for U images (U, C, H, W): vision tower, then perceiver."""
    import torch

    with torch.inference_mode():
        feats = model.vision_encoder(pixels)[1]  # (U, patches, dim)
        return model.perceiver(feats[:, None, None])[:, 0]  # perceiver wants (b, T, F, v, d)


def plain_generate(model, media, input_ids, attention_mask, **gen_kwargs):
    """Hugging Face ``generate`` through open_flamingo with precomputed image latents ``media`` (B, T, n, d).

    Same as ``models.flamingo.generate`` except that images were encoded once per distinct image, not per row.
    """
    import torch

    from models.compat import language_model
    from models.flamingo import model_lock

    lm = language_model(model)
    num_beams = int(gen_kwargs.get("num_beams", 1) or 1)
    if num_beams > 1:
        media = media.repeat_interleave(num_beams, dim=0)
    gen_kwargs.setdefault("eos_token_id", [model.eoc_token_id, EOS_ID])
    gen_kwargs.setdefault("pad_token_id", PAD_ID)
    with model_lock(model):  # the conditioning lives in the layers: one call per model at a time
        try:
            with torch.inference_mode():
                lm._use_cached_vision_x = True
                for layer in lm._get_decoder_layers():
                    layer.condition_vis_x(media)
                return lm.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        finally:
            lm.clear_conditioned_layers()
            lm._use_cached_vision_x = False


def plain_logits(model, vision_x, input_ids, attention_mask):
    """Teacher-forced logits (B, L, vocab) of the plain open_flamingo forward, with position ids taken from the
    attention mask as ``generate`` takes them (a bare forward would shift left-padded rows' positions, which RoPE
    ignores in exact arithmetic but not in bf16). The reference the fast decoder is checked against."""
    import torch

    from models.compat import language_model
    from models.flamingo import model_lock

    lm = language_model(model)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with model_lock(model):
        try:
            with torch.inference_mode():
                model._encode_vision_x(vision_x=vision_x)
                model._condition_media_locations(input_ids=input_ids)
                out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
                return out.logits.float()
        finally:
            lm.clear_conditioned_layers()


def _nan_guard(flags: list[int], rows_per_sample: int):
    """A logits processor that notes which samples saw NaN logits (and keeps generation going)."""
    import torch
    from transformers import LogitsProcessor

    class NanGuard(LogitsProcessor):
        def __call__(self, input_ids, scores):
            bad = torch.isnan(scores).any(dim=-1)
            if bool(bad.any()):
                flags.extend(int(r) // rows_per_sample for r in bad.nonzero().flatten().tolist())
                scores = torch.nan_to_num(scores, nan=0.0)
            return scores

    return NanGuard()


# keyed weakly by the model: when the loader forgets a model, its decoder (caches, graphs) goes with it
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def fast_decoder(
    loaded,
    cuda_graphs: bool = True,
    attention: str = "sdpa",
    kv_block: int = 16,
    shrink: bool = True,
    compile_layers: bool | None = None,
):
    """One ``FastFlamingoDecoder`` per loaded model, options and process, so captured graphs (and compiled
    layers) survive across shards."""
    from models.fast_decode import FastFlamingoDecoder

    if compile_layers is None:  # resolved here as the decoder would, so auto and its answer share one decoder
        import torch

        compile_layers = torch.device(loaded.device).type == "cuda"
    key = (bool(cuda_graphs), attention, int(kv_block), bool(shrink), bool(compile_layers))
    with _decoders_lock:
        per_model = _decoders.setdefault(loaded.model, {})
        if key not in per_model:
            per_model[key] = FastFlamingoDecoder(loaded.model, cuda_graphs=cuda_graphs, attention=attention,
                                                 kv_block=kv_block, shrink=shrink, compile_layers=compile_layers)  # fmt: skip
        return per_model[key]


class RewriteGenerator:
    """Prepare and generate rewrites with one loaded rewriter and one set of decoding settings."""

    def __init__(
        self,
        loaded,
        settings: dict[str, Any],
        backend: str = "auto",
        max_prompt_tokens: int = 1024,
        cuda_graphs: bool = True,
        image_cache_size: int = 256,
        latent_cache_size: int = 1024,
        decode_attention: str = "sdpa",
        kv_block: int = 16,
        shrink_batches: bool = True,
        compile_layers: bool | None = None,
        cache_new_tokens: int | None = None,
    ):
        """``cache_new_tokens``: the fast decoder's static batches start with KV-cache room for the prompt and
        this many new tokens and grow it when a row outlives it (None: room for max_new_tokens from the start);
        the batch planner budgets ``planned_new_tokens`` per row."""
        from models.fast_decode import FastPathUnsupported

        if backend not in ("auto", "fast", "plain"):
            raise ValueError(f"backend must be auto, fast or plain, got {backend!r}")
        self.loaded = loaded
        self.settings = dict(settings)
        self.max_prompt_tokens = max_prompt_tokens
        self.cache_new_tokens = cache_new_tokens
        self.tokenizer = loaded.tokenizer
        self.eos_ids = [int(loaded.model.eoc_token_id), EOS_ID]
        self.decoder = None
        if backend == "fast" and not fast_supported(self.settings):
            raise ValueError(
                "backend 'fast' has no repetition penalty; use backend 'auto' or 'plain' for these settings"
            )
        if backend != "plain" and fast_supported(self.settings):
            try:
                self.decoder = fast_decoder(
                    loaded,
                    cuda_graphs=cuda_graphs,
                    attention=decode_attention,
                    kv_block=kv_block,
                    shrink=shrink_batches,
                    compile_layers=compile_layers,
                )
            except FastPathUnsupported:
                if backend == "fast":
                    raise
        self.backend = "fast" if self.decoder is not None else "plain"
        self._images: OrderedDict[str, Any] = OrderedDict()
        self._image_cache_size = image_cache_size
        # image latents on the device, across batches: questions about one image usually share a shard (the
        # flow orders work by image), and a 9B-shape latent is 128 KB, so 1024 of them cost 128 MB
        self._latents: OrderedDict[str, Any] = OrderedDict()
        self._latent_cache_size = latent_cache_size
        self.images_encoded = 0  # vision-tower passes, one per image not found in the latent cache
        self.cache_grows = 0  # times a batch's unfinished rows moved to a longer KV cache (cache_new_tokens)
        self.rows_continued = 0  # streamed rows that outlived the ring and went on in a static batch
        self.rows_restarted = 0  # ... of which had written an <image> token, so started again

    @property
    def planned_new_tokens(self) -> int:
        """New tokens per row that a batch's memory is planned for: the fast decoder's first cache length when
        its cache grows; ``max_new_tokens`` on the plain path, whose batch keeps every row's cache until the
        longest row ends."""
        max_new = int(self.settings["max_new_tokens"])
        if self.decoder is None or self.cache_new_tokens is None:
            return max_new
        return min(max_new, int(self.cache_new_tokens))

    @property
    def beams(self) -> int:
        return int(self.settings["num_beams"])

    @property
    def can_stream(self) -> bool:
        """Whether ``stream`` (continuous batching) runs these settings: any the fast decoder runs."""
        return self.decoder is not None

    def runtime(self) -> dict[str, Any]:
        """What ran the settings (recorded next to them; not part of the settings hash)."""
        runtime = {
            "backend": self.backend,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
        }
        if self.decoder is not None:
            runtime["decode_attention"] = self.decoder.attention
            runtime["shrink_batches"] = self.decoder.shrink
            # what ran: a compiler that failed left the layers eager (compile_error says why)
            runtime["compile_layers"] = bool(self.decoder._compiled_parts)
            if self.decoder.compile_error:
                runtime["compile_error"] = self.decoder.compile_error
            runtime["kv_block"] = self.decoder.kv_block
            runtime["cache_new_tokens"] = self.cache_new_tokens
        return runtime

    # -- CPU side ----------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str, raw_response: str) -> list[int]:
        ids = self.tokenizer(rewrite_prompt(instruction, raw_response), add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(
                f"too long: prompt has {len(ids)} tokens, max_prompt_tokens is {self.max_prompt_tokens}"
            )
        return list(ids)

    def _pixels(self, key: str, path: str):
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        from fsspec.core import url_to_fs

        from polite.images import BadImageError, decode_check, to_rgb

        fs, local = url_to_fs(path)
        try:
            with fs.open(local, "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, OSError) as exc:
            raise BadImageError(f"image {key} unreadable at {path}: {exc}") from exc
        image = to_rgb(decode_check(data))
        pixels = self.loaded.image_processor(image)
        self._images[key] = pixels
        if len(self._images) > self._image_cache_size:
            self._images.popitem(last=False)
        return pixels

    def prepare(self, input_ids: list[int], images: list[tuple[str, str]]) -> Prepared:
        """Load and preprocess one sample's images ((key, path) pairs, in instruction order)."""
        from models.prompts import IMAGE_TOKEN

        media_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        n_markers = sum(1 for t in input_ids if t == media_id)
        if n_markers != len(images):
            raise ValueError(
                f"instruction has {n_markers} {IMAGE_TOKEN} markers but the sample has {len(images)} images"
            )
        return Prepared(list(input_ids), [k for k, _ in images], [self._pixels(k, p) for k, p in images])

    # -- device side -------------------------------------------------------------------------------
    def _collate(self, batch: list[Prepared]):
        import torch

        loaded = self.loaded
        width = max(len(p.input_ids) for p in batch)
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[row, width - len(p.input_ids) :] = 1
        keys: dict[str, int] = {}
        pixels: dict[str, Any] = {}
        for p in batch:
            for key, px in zip(p.image_keys, p.pixels, strict=True):
                if key not in keys:
                    keys[key] = len(keys)
                    pixels[key] = px
        t_max = max(1, max(len(p.image_keys) for p in batch))
        model = loaded.model
        zero = torch.zeros((1, *model.perceiver.latents.shape), device=loaded.device, dtype=loaded.dtype)
        latents = torch.cat([self._encode(pixels), zero]) if pixels else zero
        index = torch.full((len(batch), t_max), len(keys), dtype=torch.long)
        for row, p in enumerate(batch):
            for t, key in enumerate(p.image_keys):
                index[row, t] = keys[key]
        media = latents[
            index.to(loaded.device)
        ]  # (B, T, n, d); padding points at the zero latent, never attended
        return ids.to(loaded.device), mask.to(loaded.device), media

    def _encode(self, pixels: dict[str, Any]):
        """Latents (U, n_latents, dim) of these images, in order: cached ones reused, the rest encoded at once."""
        import torch

        missing = [key for key in pixels if key not in self._latents]
        if missing:
            stacked = torch.stack([pixels[key] for key in missing]).to(self.loaded.device, self.loaded.dtype)
            for key, latent in zip(missing, encode_images(self.loaded.model, stacked), strict=True):
                self._latents[key] = latent
            self.images_encoded += len(missing)
        for key in pixels:
            self._latents.move_to_end(key)
        out = torch.stack([self._latents[key] for key in pixels])
        while len(self._latents) > self._latent_cache_size:
            self._latents.popitem(last=False)
        return out

    def generate(self, batch: list[Prepared]) -> list[Generated | Exception]:
        """One batch -> one result per sample (an ``Exception`` for a sample that failed alone)."""
        import torch

        ids, mask, media = self._collate(batch)
        flags: list[int] = []
        guard = _nan_guard(flags, int(self.settings["num_beams"]))
        if self.settings["do_sample"]:
            torch.manual_seed(int(self.settings.get("seed", 0)))  # both paths draw from the same stream
        try:
            if self.decoder is not None and greedy_on_device(self.settings):
                out = self.decoder.generate(
                    ids, mask, media, self.settings["max_new_tokens"], self.eos_ids, PAD_ID,
                    min_new_tokens=self.settings.get("min_new_tokens", 0), cache_new_tokens=self.cache_new_tokens,
                )  # fmt: skip
                new, nan_rows = out.tokens.cpu(), set(out.nan.nonzero().flatten().tolist())
                self.cache_grows += out.grows
            elif self.decoder is not None:
                from models.search import SearchSettings, make_search

                search = make_search(ids, SearchSettings.from_settings(self.settings), self.eos_ids, PAD_ID,
                                     extra_processors=[guard])  # fmt: skip
                out = self.decoder.search(ids, mask, media, search, cache_new_tokens=self.cache_new_tokens)
                new, nan_rows = out.tokens.cpu(), set(flags) | set(out.nan.nonzero().flatten().tolist())
                self.cache_grows += out.grows
            else:
                from transformers import LogitsProcessorList

                kwargs = hf_generate_kwargs(self.settings)
                kwargs["logits_processor"] = LogitsProcessorList([guard])
                seqs = plain_generate(
                    self.loaded.model, media, ids, mask, eos_token_id=self.eos_ids, **kwargs
                )
                new, nan_rows = seqs[:, ids.shape[1] :].cpu(), set(flags)
        except BaseException as exc:
            self._after_error(exc)
            raise
        return [self._result(p, new[row].tolist(), row in nan_rows) for row, p in enumerate(batch)]

    def _result(self, prepared: Prepared, tokens: list[int], nan: bool) -> Generated | Exception:
        """A row's generated ids -> its rewrite (cut at the first end-of-sequence token), or why it failed."""
        if nan:
            return FloatingPointError("NaN in the logits while generating")
        cut = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if cut is None else tokens[:cut]
        n_out = len(tokens) if cut is None else cut + 1
        # the generated tokens alone: no prompt to split off at a response marker
        text = cut_response(self.tokenizer.decode(kept, skip_special_tokens=True))
        return Generated(text=text, input_tokens=len(prepared.input_ids), output_tokens=n_out, token_ids=kept)

    def stream(
        self, fetch: Callable[[int], list[tuple[Any, Prepared]]], rows: int, longest_prompt: int
    ) -> Iterator[tuple[Any, Generated | Exception]]:
        """Continuous batching with the fast decoder (``FastFlamingoDecoder.stream``, or ``stream_search`` for
        beams): ``fetch(k)`` gives up to ``k`` (key, prepared sample) pairs, an empty list when there are no more;
        yields (key, result) as samples finish. ``rows``: samples decoding at once (with beams, each takes
        ``num_beams`` rows).

        The ring cache holds ``longest_prompt`` plus ``planned_new_tokens`` per row (``cache_new_tokens``, else
        ``max_new_tokens``). A sample that outlives it leaves the ring with what it wrote (greedy) or its
        search's state (beams, sampling, n-gram constraints); once the stream has run dry, those samples go on
        in static batches whose rows' prompts are their prompts plus what they wrote, prefilled and decoded on
        with a growing cache: the tokens decoding would have given, as a static batch that grows its cache gives
        them."""
        from models.fast_cache import round_up
        from models.search import SearchState

        if not self.can_stream:
            raise ValueError("continuous batching needs the fast decoder (these settings take the plain path)")
        max_new = int(self.settings["max_new_tokens"])
        ring = round_up(longest_prompt + self.planned_new_tokens, self.decoder.kv_block)
        joined: dict[Any, tuple[Prepared, int]] = {}  # each sample and how many tokens the ring allows it
        on_device = greedy_on_device(self.settings)
        admission = self._admission(fetch, ring, joined, clip=on_device)
        outlived: list[tuple[Any, Prepared, list[int] | SearchState]] = []
        try:
            if not on_device:
                left = self._stream_search(admission, rows, ring)
            else:
                left = ((key, tokens.tolist(), nan)
                        for key, tokens, nan in self.decoder.stream(admission, rows, ring, max_new, self.eos_ids, PAD_ID))  # fmt: skip
            for key, written, nan in left:
                prepared, limit = joined.pop(key)
                if isinstance(written, SearchState):
                    outlived_ring = not nan
                else:  # a greedy row stopped at the ring's limit, not at an end token
                    ended = bool(written) and written[-1] in self.eos_ids
                    outlived_ring = not nan and limit < max_new and len(written) == limit and not ended
                if outlived_ring:
                    outlived.append((key, prepared, written))
                else:
                    yield key, self._result(prepared, [] if isinstance(written, SearchState) else written, nan)
            # as many samples per batch as take the ring's memory at first (their caches start at prompt +
            # written + planned_new_tokens)
            size = max(1, rows * ring // (ring + self.planned_new_tokens))
            for start in range(0, len(outlived), size):
                chunk = outlived[start : start + size]
                go_on = self._continue if on_device else self._continue_search
                results = go_on([(p, written) for _, p, written in chunk])
                yield from zip([key for key, _, _ in chunk], results, strict=True)
        except BaseException as exc:
            self._after_error(exc)
            raise

    def _admission(self, fetch, ring: int, joined: dict[Any, tuple[Prepared, int]], clip: bool = True):
        """``fetch`` as the decoder's stream wants it: the samples collated into an ``Admission`` (each noted in
        ``joined`` with the tokens the ring allows it). ``clip``: its token limits keep each prompt plus its new
        tokens within the ring (greedy rows stop there); else they are the settings' (a search leaves the ring
        with its state)."""
        from models.fast_decode import Admission

        max_new = int(self.settings["max_new_tokens"])
        min_new = int(self.settings.get("min_new_tokens", 0) or 0)

        def admission(k: int) -> Admission | None:
            batch = fetch(k)
            if not batch:
                return None
            ids, mask, media = self._collate([p for _, p in batch])
            limit = min(max_new, ring - ids.shape[1])  # >= planned_new_tokens: no prompt is longer than longest
            joined.update((key, (p, limit)) for key, p in batch)
            keys = [key for key, _ in batch]
            most = limit if clip else max_new
            return Admission(keys, ids, mask, media, max_new=[most] * len(keys),
                             min_new=[min(min_new, most)] * len(keys))  # fmt: skip

        return admission

    def _new_search(self, samples: int, span: int):
        """A search with these settings that ``samples`` samples join later (``admit`` or ``restore``), guarded
        against NaN logits (the decoder flags the rows)."""
        import torch

        from models.search import SearchSettings, make_search

        return make_search(torch.empty((samples, 0), dtype=torch.long, device=self.loaded.device),
                           SearchSettings.from_settings(self.settings), self.eos_ids, PAD_ID,
                           extra_processors=[_nan_guard([], self.beams)], span=span)  # fmt: skip

    def _stream_search(self, admission, samples: int, ring: int):
        """``FastFlamingoDecoder.stream_search`` over ``samples`` samples at a time."""
        import torch

        search = self._new_search(samples, ring)
        if self.settings["do_sample"]:
            torch.manual_seed(int(self.settings.get("seed", 0)))  # one random stream for the whole run
        yield from self.decoder.stream_search(admission, search, ring)

    def _continue_search(self, rows: list[tuple[Prepared, Any]]) -> list[Generated | Exception]:
        """Searches that left the ring (``SearchState``s) go on in one static batch: each beam's (or single row's)
        row is its prompt plus its generated tokens, prefilled, and the search resumes where it stopped
        (``generate``'s tokens, as for ``_continue``). A sample one of whose rows wrote an ``<image>`` token
        starts again instead: in a prompt that token would be read as one more image."""
        media_id = int(self.loaded.model.media_token_id)
        again = [i for i, (_, st) in enumerate(rows) if bool((st.histories() == media_id).any())]
        self.rows_continued += len(rows)
        self.rows_restarted += len(again)
        results: dict[int, Generated | Exception] = {}
        if again:
            results.update(zip(again, self.generate([rows[i][0] for i in again]), strict=True))
        going = [i for i in range(len(rows)) if i not in results]
        if going:
            beams = [Prepared(p.input_ids + h, p.image_keys, p.pixels)
                     for p, st in (rows[i] for i in going) for h in st.histories().tolist()]  # fmt: skip
            ids, mask, media = self._collate(beams)
            states = [rows[i][1] for i in going]
            search = self._new_search(len(going), ids.shape[1] + int(self.settings["max_new_tokens"]))
            search.restore(range(len(going)), states)
            out = self.decoder.search(ids, mask, media, search, cache_new_tokens=self.cache_new_tokens,
                                      resumed=[st.generated for st in states])  # fmt: skip
            self.cache_grows += out.grows
            new, nan = out.tokens.cpu().tolist(), out.nan.tolist()
            for row, i in enumerate(going):
                results[i] = self._result(rows[i][0], new[row], nan[row])
        return [results[i] for i in range(len(rows))]

    def _continue(self, rows: list[tuple[Prepared, list[int]]]) -> list[Generated | Exception]:
        """Greedy decoding of samples that already wrote some tokens: each prompt plus its tokens is prefilled
        and decoding goes on to ``max_new_tokens`` in all. Under either cross-attention masking rule text after
        the prompt's last image is treated alike in a prefill and in a decode step, so this continues as the
        decoding would have. A row that wrote an ``<image>`` token starts again instead: in a prompt that token
        would be read as one more image."""
        max_new = int(self.settings["max_new_tokens"])
        min_new = int(self.settings.get("min_new_tokens", 0) or 0)
        media_id = int(self.loaded.model.media_token_id)
        self.rows_continued += len(rows)
        self.rows_restarted += sum(media_id in written for _, written in rows)
        rows = [(p, [] if media_id in written else written) for p, written in rows]
        ids, mask, media = self._collate([Prepared(p.input_ids + w, p.image_keys, p.pixels) for p, w in rows])
        budgets = [max_new - len(w) for _, w in rows]
        out = self.decoder.generate(ids, mask, media, budgets, self.eos_ids, PAD_ID,
                                    min_new_tokens=[max(0, min_new - len(w)) for _, w in rows],
                                    cache_new_tokens=self.cache_new_tokens)  # fmt: skip
        self.cache_grows += out.grows
        new, nan = out.tokens.cpu().tolist(), out.nan.tolist()
        return [self._result(p, w + new[row][: budgets[row]], nan[row]) for row, (p, w) in enumerate(rows)]

    def _after_error(self, exc: BaseException) -> None:
        """After out of memory, drop the fast decoder's caches and graphs so a smaller retry has the room."""
        from models.batching import is_oom_error

        if self.decoder is not None and is_oom_error(exc):
            self.decoder.reset()
