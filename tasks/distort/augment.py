"""Method 2, random text augmentation: sentence dropping and shuffling (ours), character and word noise (nlpaug).

Each of the four steps fires independently with its probability (0.5 by default) and draws its own
parameters; every random choice comes from one ``random.Random`` seeded by the pair's seed. nlpaug draws from
the process-global ``random``/``numpy`` generators, which threads would share; our subclasses route its two
sampling hooks (``sample``, ``prob``) to a per-call generator instead, so results do not depend on what other
threads do. Their action methods build ``LeanDoc`` (tasks/distort/lean_doc.py) in place of nlpaug's slower
``Doc``, with the same results. Only offline augmenters are used (RandomCharAug, RandomWordAug need no downloaded resources).
"""

from __future__ import annotations

import random
import re
import threading
from functools import lru_cache
from typing import Any

from polite.config.distort import AugmentSettings
from tasks.distort.lean_doc import with_lean_doc
from tasks.distort.record import AUGMENT_VERSION, Pair, new_pair

# A sentence ends at . ! ? (plus closing quotes/brackets) before whitespace, or at a line break.
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(\s+)|\n\s*")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence in ``text``; ``text[:spans[k-1][1]]`` is its first k sentences."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.start(1) if match.group(1) is not None else match.start()
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
        start = match.end()
    end = len(text.rstrip())
    if end > start:
        spans.append((start, end))
    return spans


def keep_first(text: str, k: int) -> str:
    """The first ``k`` sentences, exactly as they were written (a prefix of ``text``)."""
    spans = sentence_spans(text)
    return text if k >= len(spans) else text[: spans[k - 1][1]]


@lru_cache(maxsize=1)
def _seeded_classes():
    import nlpaug.augmenter.char as nac
    import nlpaug.augmenter.word as naw

    class _Seeded:
        rng: random.Random

        def sample(self, x, num=None):  # shadows nlpaug's classmethod that uses the global generators
            if isinstance(x, list):
                # One draw (a replacement character, most calls) is a choice: random.sample's set-up
                # costs several times the draw itself.
                return [self.rng.choice(x)] if num == 1 else self.rng.sample(x, num)
            return self.rng.randint(1, x - 2)  # numpy's randint(1, x-1) excludes the upper bound

        def prob(self):
            return self.rng.random()

    @with_lean_doc
    class SeededCharAug(_Seeded, nac.RandomCharAug):
        pass

    @with_lean_doc
    class SeededWordAug(_Seeded, naw.RandomWordAug):
        def _get_aug_range_idxes(self, tokens):
            # nlpaug 1.1.11 slices tokens[:-0] (nothing) when one word is to be cropped, then fails to
            # sample; this is its range choice with that off-by-one fixed, keeping at least one word.
            count = min(self.generate_aug_cnt(len(tokens)), len(tokens) - 1)
            if count <= 0:
                return []
            direction = self.sample([-1, 1], 1)[0]
            starts = range(len(tokens) - count + 1) if direction > 0 else range(count - 1, len(tokens))
            start = self.sample(list(starts), 1)[0]
            return [start + i * direction for i in range(count)]

    return SeededCharAug, SeededWordAug


_local = threading.local()


def _augmenter(kind: str, action: str):
    """One nlpaug augmenter per thread and action; rates and generator are set per call."""
    cache = _local.__dict__.setdefault("augmenters", {})
    key = (kind, action)
    if key not in cache:
        char_cls, word_cls = _seeded_classes()
        # Whitespace tokens: nlpaug's default tokenizer turns "3.5" into "3. 5" and loses line breaks.
        # No maximum counts, so a drawn rate really is the share of words/characters changed.
        common = {"tokenizer": str.split, "reverse_tokenizer": " ".join}
        if kind == "char":
            cache[key] = char_cls(action=action, aug_char_max=None, aug_word_max=None, **common)
        else:
            cache[key] = word_cls(action=action, aug_max=None, **common)
    return cache[key]


def _noise(text: str, aug) -> str:
    """Apply ``aug`` line by line, so the response keeps its line structure."""
    lines = []
    for line in text.split("\n"):
        if line.strip():
            out = aug.augment(line)
            line = out[0] if out else line
        lines.append(line)
    return "\n".join(lines)


def char_noise(text: str, action: str, word_rate: float, char_rate: float, rng: random.Random) -> str:
    aug = _augmenter("char", action)
    aug.rng, aug.aug_word_p, aug.aug_char_p = rng, word_rate, char_rate
    return _noise(text, aug)


def word_noise(text: str, action: str, rate: float, rng: random.Random) -> str:
    aug = _augmenter("word", action)
    aug.rng, aug.aug_p = rng, rate
    return _noise(text, aug)


def _rate(rng: random.Random, bounds: tuple[float, float]) -> float:
    return round(rng.uniform(*bounds), 4)


def _draw_steps(text: str, settings: AugmentSettings, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    steps: list[dict[str, Any]] = []
    spans = sentence_spans(text)
    if rng.random() < settings.p_keep_first and len(spans) >= 2:
        k = rng.randint(1, len(spans) - 1)
        steps.append({"op": "keep_first", "k": k, "of": len(spans)})
        text, spans = text[: spans[k - 1][1]], spans[:k]  # what keep_first(text, k) returns
    if rng.random() < settings.p_shuffle and len(spans) >= 2:
        order = list(range(len(spans)))
        rng.shuffle(order)
        joiner = rng.choice(["", "\n"])
        sentences = [text[a:b].strip() for a, b in spans]
        text = joiner.join(sentences[i] for i in order)
        steps.append({"op": "shuffle", "order": order, "joiner": joiner})
    if rng.random() < settings.p_char:
        action = rng.choice(settings.char_actions)
        word_rate, char_rate = _rate(rng, settings.char_rate), _rate(rng, settings.char_rate)
        text = char_noise(text, action, word_rate, char_rate, random.Random(rng.getrandbits(64)))
        steps.append({"op": "char", "action": action, "word_rate": word_rate, "char_rate": char_rate})
    if rng.random() < settings.p_word:
        action = rng.choice(settings.word_actions)
        rate = _rate(rng, settings.word_rate)
        text = word_noise(text, action, rate, random.Random(rng.getrandbits(64)))
        steps.append({"op": "word", "action": action, "rate": rate})
    return text, steps


def unchanged(text: str, original: str) -> bool:
    return " ".join(text.split()) == " ".join(original.split())


def augment_text(text: str, settings: AugmentSettings, seed: int) -> tuple[str, list[dict[str, Any]], int]:
    """The augmented text, the steps applied (each with its drawn parameters) and how many draws it took.

    A draw that leaves the text as it was is drawn again, up to ``settings.max_redraws`` more times; all draws
    come from one generator seeded by ``seed``, so the result is still a function of the seed.
    """
    rng = random.Random(seed)
    draws = 0
    while True:
        draws += 1
        augmented, steps = _draw_steps(text, settings, rng)
        if draws > settings.max_redraws or not unchanged(augmented, text):
            return augmented, steps, draws


def distort_augment(rows: list[dict[str, Any]], settings: AugmentSettings, variant: str, run_seed: int) -> list[Pair]:
    """One pair per sample row; a text that no draw changed is a failed pair ('unchanged')."""
    pairs = []
    for row in rows:
        pair = new_pair(row, "augment", variant, run_seed, AUGMENT_VERSION)
        try:
            text, steps, draws = augment_text(pair.original, settings, pair.seed)
        except Exception as exc:  # nlpaug on odd input: this sample fails, the shard goes on
            pairs.append(pair.fail(f"augmentation error: {type(exc).__name__}: {exc}"))
            continue
        pair.params = {"steps": steps, "draws": draws}
        if unchanged(text, pair.original):
            why = "no drawn step changed the text" if steps else "no step was drawn"
            pair.fail(f"unchanged: {why} ({draws} draws)")
        else:
            pair.distorted = text
        pairs.append(pair)
    return pairs
