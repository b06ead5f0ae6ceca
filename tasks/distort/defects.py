"""The 24 extra defects an LLM-instructed distortion may be asked for (METHOD.md, in our own words).

Order matters: a pair records the defect's index and text, and the index is drawn from the pair's seed.
Append new defects at the end (and bump the template version) rather than reordering.
"""

from __future__ import annotations

DEFECTS: tuple[str, ...] = (
    "no punctuation and no capital letters at all",
    "several spelling mistakes",
    "grammar mistakes",
    "some words left out",
    "every letter in upper case",
    "every letter in lower case",
    "some words swapped for synonyms",
    "some words or phrases repeated",
    "the sentences in a scrambled order",
    "verbs in the wrong tense",
    "needlessly wordy phrasing",
    "as few words as possible",
    "only the essential words, separated by commas",
    "all formatting removed (no lists, line breaks or emphasis)",
    "the content paraphrased in different words",
    "the sentences in reverse order",
    "a casual, unprofessional tone",
    "needlessly complicated vocabulary",
    "vague, ambiguous wording",
    "odd, out-of-place metaphors",
    "an irrelevant remark added",
    "one sentence repeated with small changes",
    "a summary of exactly five words",
    "poor coherence, jumping between ideas",
)
assert len(DEFECTS) == 24, "METHOD.md lists 24 defects"
