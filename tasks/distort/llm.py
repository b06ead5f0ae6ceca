"""Method 1, LLM-instructed distortion: ask a chat LLM to squeeze a good response into a curt, poor one."""

from __future__ import annotations

from typing import Any

from polite.config.distort import LLMSettings
from tasks.distort.backends import ChatBackend
from tasks.distort.defects import DEFECTS
from tasks.distort.prompting import build_conversation, draw_defect, load_template, parse_reply
from tasks.distort.record import Pair, new_pair


def distort_llm(
    rows: list[dict[str, Any]], settings: LLMSettings, backend: ChatBackend, variant: str, run_seed: int
) -> list[Pair]:
    """One pair per sample row; every request of the shard goes to the backend in one call (it batches)."""
    template = load_template(settings.template)
    pairs: list[Pair] = []
    conversations = []
    for row in rows:
        pair = new_pair(row, "llm", variant, run_seed, template.version)
        pair.llm = backend.identity
        defect = draw_defect(pair.seed, settings.defect_probability)
        pair.params = {
            "defect_index": defect,
            "defect": None if defect is None else DEFECTS[defect],
            "template": template.name,
            "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        pairs.append(pair)
        conversations.append(build_conversation(pair.instruction, pair.original, template, defect))
    replies = backend.chat(conversations, [p.seed for p in pairs])
    for pair, reply in zip(pairs, replies, strict=True):
        pair.params["attempts"] = reply.attempts  # latency is left out: it would make rows differ run to run
        if reply.error is not None:
            pair.fail(reply.error)
            continue
        text, reason = parse_reply(reply.text, pair.original)
        if reason is not None:
            pair.params["raw_reply"] = (reply.text or "")[:500]
            pair.fail(reason)
        else:
            pair.distorted = text
    return pairs
