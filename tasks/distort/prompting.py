"""Method 1's pure parts: the versioned prompt template, the defect draw, the chat, and reply parsing."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from polite.record import CHUNK_END, IMAGE_MARKER
from tasks.distort.defects import DEFECTS

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    version: str
    followup: str
    defect: str  # holds {DEFECT}


@lru_cache(maxsize=16)
def load_template(name: str) -> Template:
    """Read ``tasks/distort/templates/<name>.yaml``; a missing or malformed file names what to fix."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"template name {name!r} must be a plain file stem like 'distort_v1'")
    entry = resources.files("tasks.distort") / "templates" / f"{name}.yaml"
    if not entry.is_file():
        known = sorted(p.name[:-5] for p in (resources.files("tasks.distort") / "templates").iterdir()
                       if p.name.endswith(".yaml"))
        raise ValueError(f"no distortion template {name!r}; known: {known}")
    try:
        data = yaml.safe_load(entry.read_text())
    except yaml.YAMLError as exc:  # a slip in a user's copy: name the file, stop before any work
        raise ValueError(f"template {name!r} ({entry}) is not valid YAML: {exc}") from None
    if not isinstance(data, dict):  # an empty file, or a list where the keys belong
        data = {}
    missing = [k for k in ("version", "followup", "defect") if not isinstance(data.get(k), str)]
    if missing or "{DEFECT}" not in data["defect"]:
        raise ValueError(f"template {name!r} needs string keys version, followup and defect (with {{DEFECT}})")
    return Template(name=name, version=data["version"], followup=data["followup"].strip(), defect=data["defect"])


def draw_defect(seed: int, probability: float) -> int | None:
    """With ``probability``, the index of one defect to ask for; else None. Depends only on the seed."""
    rng = random.Random(seed)
    if rng.random() < probability:
        return rng.randrange(len(DEFECTS))
    return None


def followup_request(template: Template, defect_index: int | None) -> str:
    """The follow-up turn; a drawn defect is named in capitals so the LLM cannot overlook it."""
    text = template.followup
    if defect_index is not None:
        text += template.defect.replace("{DEFECT}", DEFECTS[defect_index].upper())
    return text


def plain_instruction(instruction: str) -> str:
    """The instruction without image markers: the distorting LLM reads text only."""
    return instruction.replace(CHUNK_END, "").replace(IMAGE_MARKER, "").strip()


def build_conversation(instruction: str, response: str, template: Template, defect_index: int | None) -> list[Message]:
    """User asks, the assistant gave the good response, then the user asks for the curt version."""
    return [
        {"role": "user", "content": plain_instruction(instruction) or "Describe the image."},
        {"role": "assistant", "content": response.strip()},
        {"role": "user", "content": followup_request(template, defect_index)},
    ]


# -- reply parsing -------------------------------------------------------------------------------------
_ROLE_MARKERS = re.compile(r"(### ?Human:|### ?Assistant:|<\|im_end\|>|<\|eot_id\|>|</s>|\n(?:User|USER|Human):)")
# A preamble names what follows ("Here is the short version:"); "This is a kitchen: rice, chicken" is content.
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay|ok|of course|alright)\b[!,.]?\s*)?"
    r"(?:here(?:'s| is| are)|below is|this is)\b[^:\n]{0,100}?"
    r"\b(?:version|rewrite|rewritten|response|answer|text|caption|description|output|result|reply|paraphrase)s?\b"
    r"[^:\n]{0,40}:\s*",
    re.IGNORECASE,
)
_LEAD_WORD = re.compile(r"^\s*(?:sure|certainly|okay|ok|of course|alright)[!,.]\s+", re.IGNORECASE)
_CHATTER = re.compile(
    r"^\s*[(\[]?(?:note|notes|explanation|i hope|hope this|let me know|i have|i've|i kept|i removed|"
    r"this (?:version|shortened|short|compressed|rewrite)|in this version|the (?:shortened|short) version)\b",
    re.IGNORECASE,
)
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"))
_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*?)\n?```$", re.DOTALL)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def clean_reply(reply: str) -> str:
    """Strip role markers and what follows, a leading "Here is ...:", trailing chatter and wrapping quotes."""
    text = _ROLE_MARKERS.split(reply, maxsplit=1)[0].strip()
    text = _PREAMBLE.sub("", text, count=1)
    text = _LEAD_WORD.sub("", text, count=1).strip()
    paragraphs = re.split(r"\n\s*\n", text)
    while len(paragraphs) > 1 and _CHATTER.match(paragraphs[-1]):
        paragraphs.pop()
    text = "\n\n".join(paragraphs).strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    for _ in range(2):  # "\"text\"" wrapped twice happens
        for left, right in _QUOTES:
            if _wrapped(text, left, right):
                text = text[len(left) : -len(right)].strip()
    return text


def _wrapped(text: str, left: str, right: str) -> bool:
    """``text`` is one quotation: it opens with ``left``, closes with ``right``, and neither occurs inside.

    Counting only ``left`` was enough for straight quotes, but a curly pair opens and closes with different
    characters: ``\u201cDog\u201d on a \u201ccouch\u201d`` starts and ends with quotes without being wrapped in them.
    """
    if len(text) < 2 or not (text.startswith(left) and text.endswith(right)):
        return False
    inner = text[len(left) : -len(right)]
    return left not in inner and right not in inner


def parse_reply(reply: str | None, original: str) -> tuple[str | None, str | None]:
    """``(distorted, None)`` for a usable reply, ``(None, reason)`` when it is empty or unchanged."""
    if reply is None or not reply.strip():
        return None, "empty reply"
    text = clean_reply(reply)
    if not text:
        return None, f"empty after cleaning the reply {reply[:80]!r}"
    if _collapse(text) == _collapse(original):
        return None, "unchanged: the reply repeats the original response"
    return text, None
