"""Instruction templates per task type: our own wording, several paraphrases each.

Sources that carry no instruction of their own (captions) or only a bare question get one of these,
picked by the sample id, so the same sample always gets the same wording and a dataset gets a spread.
"""

from __future__ import annotations

import hashlib

from polite.record import IMAGE_MARKER

TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "Describe this image briefly.",
        "Write a short caption for the picture.",
        "What does this image show? Answer in one sentence.",
        "Give a concise description of the scene.",
        "Summarise the content of the photo in a sentence.",
    ),
    "detailed_caption": (
        "Describe the image in detail.",
        "Give a thorough description of everything you can see in this picture.",
        "Explain what is happening in the image, mentioning the objects, their colours and where they are.",
        "Provide a detailed, well-organised description of this scene.",
        "Walk me through the contents of this image.",
    ),
    "region_caption": (
        "Describe the object inside the marked region.",
        "What is inside the highlighted box?",
        "Tell me about the outlined part of the image.",
    ),
    "vqa": (
        "{question}",
        "{question}\nAnswer the question using the image.",
        "Look at the picture and answer: {question}",
        "Question about the image: {question}",
        "Based on what you see, {question_lc}",
    ),
    "vqa_rationale": (
        "{question}\nAnswer and explain your reasoning.",
        "{question}\nGive the answer and the reason for it.",
        "Looking at the image, {question_lc} Please justify your answer.",
        "Answer the question about the picture and say why: {question}",
    ),
    "multiple_choice": (
        "{question}\nOptions: {options}",
        "{question}\nChoose one of: {options}",
        "Pick the right option for the question. {question}\nOptions: {options}",
    ),
    "classification": (
        "What is this?",
        "What kind of object or scene is shown here?",
        "Classify the content of this image.",
    ),
    "change_caption": (
        "What changed between these images?",
        "Describe the differences between the two pictures.",
        "Point out what is different in the second image.",
    ),
    "conversation": ("{question}",),
}


def _pick(key: str, n: int) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


_WITH_QUESTION = {t: [x for x in ts if "{question" in x] or list(ts) for t, ts in TEMPLATES.items()}
_WITHOUT_QUESTION = {t: [x for x in ts if "{question" not in x and "{options" not in x] or ["{question}"]
                     for t, ts in TEMPLATES.items()}


def render_instruction(
    task_type: str, sample_id: str, question: str | None = None, options: list[str] | None = None, n_images: int = 1
) -> str:
    """The instruction for one sample: image markers first, then a template chosen by ``sample_id``.

    A template that needs ``{question}`` is only chosen when a question is given; with no question the
    caption-style templates of the task type apply.
    """
    if question is not None:
        question = question.replace(IMAGE_MARKER, "").strip()
        usable = _WITH_QUESTION[task_type]
    else:
        usable = _WITHOUT_QUESTION[task_type]
        question = ""
    template = usable[_pick(sample_id, len(usable))]
    if "{" in template:
        template = template.format(question=question, question_lc=_lower_first(question), options=", ".join(options or []))
    return IMAGE_MARKER * n_images + template
