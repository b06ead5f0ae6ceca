"""Adapters for the question-answering sources of PF-1M.

Layouts are from /work/shared/DATASETS.md (read from dataset cards, Hub trees and lmms-eval code, 2026-08;
nothing downloaded). Each docstring names the Hub id and revision the adapter was written for and marks
what was [read] in a source and what is [inferred].
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

from tasks.sources.base import Adapter, Draft, RowError, SkipRow, most_common, text, text_list
from tasks.sources.loading import SourceError, cached, load_source


class VQAv2(Adapter):
    """VQAv2, ``lmms-lab/VQAv2`` (README at commit d138befad7ef), config ``default``.

    [read] columns question, multiple_choice_answer, answers[{answer, answer_confidence, answer_id}],
    question_id (int64), image_id, question_type, answer_type, image; splits validation/testdev/test.
    [inferred] testdev/test rows have null answers: they become failed samples ("annotation is missing").
    One sample per question: instruction = the question, raw = ``multiple_choice_answer``.
    """

    name = "vqav2"
    hub_id = "lmms-lab/VQAv2"
    default_split = "validation"
    task_type = "vqa"
    columns = ("question", "multiple_choice_answer", "image", "question_id")
    key_column = "question_id"
    summary = "VQAv2: question -> most common answer (vqa)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        answers = [a.get("answer") for a in row.get("answers") or [] if isinstance(a, dict)]
        yield Draft(
            raw=row["multiple_choice_answer"], task_type="vqa", question=text(row["question"], "question"),
            images=[row["image"]],
            meta={"answers": answers, "image_id": row.get("image_id"), "question_type": row.get("question_type"),
                  "answer_type": row.get("answer_type")},
        )


class GQA(Adapter):
    """GQA, ``lmms-lab/GQA`` (tree 78e9ec3, README eab7d48), questions and images in separate configs.

    [read] configs ``{split}_{all,balanced}_{instructions,images}``; instructions have id, imageId, question,
    answer, fullAnswer; images configs have id, image; lmms-eval joins ``imageId == id``.
    Default config ``testdev_balanced_instructions`` (split ``testdev``); the images config is the same name
    with ``_images`` (override with ``options.images_config``). The join table holds only the row index of each
    image id (the images stay memory-mapped). raw = ``answer``; ``fullAnswer`` goes to meta.
    """

    name = "gqa"
    hub_id = "lmms-lab/GQA"
    default_split = "testdev"
    default_config = "testdev_balanced_instructions"
    task_type = "vqa"
    columns = ("id", "imageId", "question", "answer")
    key_column = "id"
    summary = "GQA: question -> short answer (vqa); images joined from the *_images config"
    option_names = ("images_config",)

    def _images(self):
        config = self.options.get("images_config") or (self.config_name or "").replace("_instructions", "_images")
        images = load_source(self.source, self.split, config, self.spec.revision, self.cache_dir)
        if "id" not in images.column_names or "image" not in images.column_names:
            raise SourceError(f"GQA images config {config!r} needs columns id, image; found {images.column_names}")

        def index():
            ids = images.with_format("arrow").select_columns(["id"])[:]["id"].to_pylist()
            return {image_id: i for i, image_id in enumerate(ids)}

        return images, cached(("gqa-index", self.source, config, self.split, self.spec.revision), index)

    def prepare(self, dataset) -> None:
        images, self._index = self._images()
        self._table = images.with_format("arrow")

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        image_id = text(row["imageId"], "imageId")
        if image_id not in self._index:
            raise RowError(f"image {image_id!r} not found in the GQA images config")
        i = self._index[image_id]
        image = self._table[i : i + 1].column("image")[0].as_py()
        yield Draft(
            raw=row["answer"], task_type="vqa", question=text(row["question"], "question"), images=[image],
            meta={"image_id": image_id, "full_answer": row.get("fullAnswer")},
        )


class AOKVQA(Adapter):
    """A-OKVQA, ``HuggingFaceM4/A-OKVQA`` (tree at main, files ``data/<split>-00000-of-00001-<hash>.parquet``).

    [read] columns image, question_id, question, choices, correct_choice_idx, direct_answers (a *string*
    holding a Python list literal), difficult_direct_answer, rationales. [inferred] dtypes and column order;
    test rows have null answer fields (they fail as "annotation is missing").
    raw = "Answer: X. {rationales}" (METHOD.md) with X the correct choice, else the most common direct answer.
    """

    name = "aokvqa"
    hub_id = "HuggingFaceM4/A-OKVQA"
    default_split = "validation"
    task_type = "vqa_rationale"
    columns = ("image", "question_id", "question", "choices", "correct_choice_idx", "rationales")
    key_column = "question_id"
    summary = "A-OKVQA: question -> 'Answer: X. {rationales}' (vqa_rationale)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        choices = row.get("choices") or []
        idx = row.get("correct_choice_idx")
        direct = row.get("direct_answers")
        if isinstance(direct, str):
            try:
                direct = ast.literal_eval(direct)
            except (ValueError, SyntaxError) as exc:
                raise RowError(f"direct_answers does not parse as a list: {exc}") from exc
        if idx is not None and 0 <= idx < len(choices):
            answer = text(choices[idx], "correct choice")
        elif direct:
            answer = most_common(text_list(list(direct) if isinstance(direct, tuple) else direct, "direct_answers"))
        else:
            raise RowError("annotation is missing (no correct_choice_idx and no direct_answers)")
        rationales = " ".join(r.strip() for r in text_list(row.get("rationales"), "rationales"))
        raw = f"Answer: {answer.rstrip('.')}. {rationales}"
        yield Draft(
            raw=raw, task_type="vqa_rationale", question=text(row["question"], "question"), images=[row["image"]],
            meta={"choices": choices, "answer": answer, "direct_answers": direct},
        )


class OKVQA(Adapter):
    """OK-VQA, ``lmms-lab/OK-VQA`` (README at main), split ``val2014``.

    [read] question_id (string), image, question, answers (10 strings), question_type, answer_type.
    raw = the most common of the 10 answers (ties: first seen); all answers go to meta.
    """

    name = "okvqa"
    hub_id = "lmms-lab/OK-VQA"
    default_split = "val2014"
    task_type = "vqa"
    columns = ("question_id", "image", "question", "answers")
    key_column = "question_id"
    summary = "OK-VQA: question -> most common of 10 answers (vqa)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        answers = text_list(row["answers"], "answers")
        yield Draft(
            raw=most_common(answers), task_type="vqa", question=text(row["question"], "question"),
            images=[row["image"]], meta={"answers": answers, "question_type": row.get("question_type")},
        )


class TextVQA(Adapter):
    """TextVQA, ``lmms-lab/textvqa`` (schema read from its duplicate pppop7/textvqa README).

    [read] image_id, question_id (int32), question, image, answers (10 strings), ocr_tokens, image_classes,
    set_name. [inferred] test answers are empty: those rows fail as "answers is empty".
    raw = the most common answer; OCR tokens go to meta.
    """

    name = "textvqa"
    hub_id = "lmms-lab/textvqa"
    default_split = "validation"
    task_type = "vqa"
    columns = ("question_id", "question", "image", "answers")
    key_column = "question_id"
    summary = "TextVQA: question -> most common of 10 answers (vqa)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        answers = text_list(row["answers"], "answers")
        yield Draft(
            raw=most_common(answers), task_type="vqa", question=text(row["question"], "question"),
            images=[row["image"]], meta={"answers": answers, "ocr_tokens": row.get("ocr_tokens") or []},
        )


class OCRVQA(Adapter):
    """OCR-VQA, ``howard-hou/OCR-VQA`` (README at main; no ``configs``, files ``data/<split>-000NN-of-000MM-<hash>``).

    [read] one row per book cover: image, image_id, questions[] and answers[] as parallel lists, title,
    authorName, genre. One sample per question (turn = position in the list); a question whose answer is
    empty fails alone. Lists of different lengths fail the row.
    """

    name = "ocrvqa"
    hub_id = "howard-hou/OCR-VQA"
    default_split = "validation"
    task_type = "vqa"
    columns = ("image", "image_id", "questions", "answers")
    key_column = "image_id"
    summary = "OCR-VQA: one sample per (question, answer) of a cover (vqa)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        questions, answers = row["questions"], row["answers"]
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            raise RowError("questions and answers are not parallel lists of equal length")
        meta = {"title": row.get("title"), "author": row.get("authorName"), "genre": row.get("genre")}
        for turn, (question, answer) in enumerate(zip(questions, answers, strict=True)):
            yield Draft(raw=answer, task_type="vqa", question=question or "", images=[row["image"]], turn=turn, meta=meta)


class ScienceQA(Adapter):
    """ScienceQA, ``derek-thomas/ScienceQA`` (README commit 179a2d61cad9), image questions only.

    [read] image (null for text-only questions), question, choices, answer (int8 index), hint, lecture,
    solution, subject, ... Text-only rows are skipped and counted, not failed. The instruction lists the
    options (and the hint as context); raw = "Answer: X. {solution}" (vqa_rationale, as METHOD.md groups it).
    """

    name = "scienceqa"
    hub_id = "derek-thomas/ScienceQA"
    default_split = "validation"
    task_type = "vqa_rationale"
    columns = ("image", "question", "choices", "answer", "solution")
    summary = "ScienceQA (image questions): question + options -> 'Answer: X. {solution}'"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        if row["image"] is None:
            raise SkipRow("text-only question")
        choices = text_list(row["choices"], "choices")
        idx = row["answer"]
        if not isinstance(idx, int) or not 0 <= idx < len(choices):
            raise RowError(f"answer index {idx!r} is not a valid index into {len(choices)} choices")
        hint = (row.get("hint") or "").strip()
        question = text(row["question"], "question")
        question = f"Context: {hint}\n{question}" if hint else question
        solution = (row.get("solution") or "").strip()
        raw = f"Answer: {choices[idx]}." + (f" {solution}" if solution else "")
        yield Draft(
            raw=raw, task_type="vqa_rationale", images=[row["image"]],
            instruction=f"{question}\nOptions: {', '.join(choices)}",
            meta={"choices": choices, "answer": choices[idx], "subject": row.get("subject"), "lecture": row.get("lecture")},
        )


CAULDRON_SUFFIXES = ("\nGive a very brief answer.", "Give a very brief answer.")


class CLEVR(Adapter):
    """CLEVR, ``HuggingFaceM4/the_cauldron`` config ``clevr`` (tree at main, ``clevr/train-000NN-of-00024-<hash>``).

    [read] images (a list of images) and texts[{user, assistant}] with several Q/A turns per image;
    [inferred] the ``source`` key and the "Give a very brief answer." suffix on user turns (stripped here).
    One sample per turn (turn = position in ``texts``); raw = the assistant text.
    """

    name = "clevr"
    hub_id = "HuggingFaceM4/the_cauldron"
    default_split = "train"
    default_config = "clevr"
    task_type = "vqa"
    columns = ("images", "texts")
    summary = "CLEVR (the_cauldron): one sample per user/assistant turn (vqa)"

    def map_row(self, row: dict, index: int) -> Iterable[Draft]:
        images, texts = row["images"], row["texts"]
        if not images:
            raise RowError("row has no images")
        if not texts:
            raise RowError("row has no texts")
        for turn, pair in enumerate(texts):
            question = (pair or {}).get("user") or ""
            for suffix in CAULDRON_SUFFIXES:
                question = question.removesuffix(suffix)
            yield Draft(raw=(pair or {}).get("assistant"), task_type="vqa", question=question.strip(),
                        images=list(images), turn=turn)
