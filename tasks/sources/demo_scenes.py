"""Synthetic scenes for the bundled demo: shapes drawn with PIL, with exact annotations derived from the scene.

Everything is a function of the scene index, so two generations give identical images and texts.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from polite.formats import normalise_box

SIZE = 224
COLOURS = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210),
    "yellow": (235, 200, 30), "purple": (130, 60, 170), "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "light grey": (215, 215, 215), "beige": (240, 230, 200), "pale blue": (210, 228, 245)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # pixels x1, y1, x2, y2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def position(self) -> str:
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        col = "left" if cx < SIZE / 3 else "right" if cx > 2 * SIZE / 3 else ""
        row = "top" if cy < SIZE / 3 else "bottom" if cy > 2 * SIZE / 3 else ""
        return f"{row} {col}".strip() or "centre"


@dataclass(frozen=True)
class Scene:
    index: int
    background: str
    shapes: tuple[Shape, ...]

    @property
    def scene_id(self) -> str:
        return f"scene-{self.index:05d}"


def make_scene(index: int, seed: int = 0) -> Scene:
    rng = random.Random(f"demo-scene-{seed}-{index}")
    n = rng.choice((2, 3, 3, 4))
    shapes: list[Shape] = []
    used: set[tuple[str, str]] = set()
    while len(shapes) < n:
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if (kind, colour) in used:
            continue
        side = rng.randint(36, 72)
        x, y = rng.randint(6, SIZE - side - 6), rng.randint(6, SIZE - side - 6)
        box = (x, y, x + side, y + side)
        if any(not (box[2] + 6 < s.box[0] or s.box[2] + 6 < box[0] or box[3] + 6 < s.box[1] or s.box[3] + 6 < box[1]) for s in shapes):
            continue  # keep shapes apart, so boxes and "where" answers are unambiguous
        used.add((kind, colour))
        shapes.append(Shape(kind, colour, box))
    return Scene(index, rng.choice(list(BACKGROUNDS)), tuple(shapes))


def render_png(scene: Scene) -> bytes:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        x1, y1, x2, y2 = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _a(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _listing(names: list[str]) -> str:
    items = [_a(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(position: str) -> str:
    if position == "centre":
        return "in the centre"
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position} corner"


def captions(scene: Scene) -> list[str]:
    names = [s.name for s in scene.shapes]
    n = NUMBERS[len(names)]
    biggest = max(scene.shapes, key=lambda s: s.area)
    return [
        f"{n.capitalize()} shapes on a {scene.background} background.",
        _listing(names).capitalize() + ".",
        f"Simple flat shapes: {', '.join(names)}.",
        f"A plain {scene.background} canvas with {n} coloured shapes.",
        f"The {biggest.name} is the largest of {n} shapes.",
    ]


def boxes(scene: Scene) -> list[list]:
    return [[s.name, [round(v, 4) for v in normalise_box(s.box, SIZE, SIZE)]] for s in scene.shapes]


def _count_phrase(n: int, noun: str) -> str:
    if n == 0:
        return f"there are no {noun}s"
    return f"there is one {noun}" if n == 1 else f"there are {NUMBERS[n]} {noun}s"


def qa_pairs(scene: Scene, k: int = 2) -> list[tuple[str, str, str]]:
    """``k`` (question, short answer, polite answer) triples, picked deterministically from those true of the scene.

    The short answer is the curt raw annotation a VQA dataset would hold; the polite answer is the well-formed
    response the rewriter should learn to give: it answers in its first sentence, then adds one fact about the
    scene, like the helpful answers of LLaVA-Instruct.
    """
    rng = random.Random(f"demo-qa-{scene.index}")
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    names = [s.name for s in scene.shapes]
    n = len(scene.shapes)
    all_shapes = _listing(names)
    pool: list[tuple[str, str, str]] = [
        ("How many shapes are there?", str(n),
         f"There are {NUMBERS[n]} shapes in the image: {all_shapes}."),
        ("What colour is the background?", scene.background,
         f"The background is {scene.background}. It is a plain, uniform colour with only the {NUMBERS[n]} shapes on it."),
    ]  # fmt: skip
    for s in scene.shapes:
        where = _where(s.position)
        if kinds.count(s.kind) == 1:
            pool.append((f"What colour is the {s.kind}?", s.colour,
                         f"The {s.kind} is {s.colour}. It is the only {s.kind} in the image, and it sits {where}."))  # fmt: skip
        if colours.count(s.colour) == 1:
            pool.append((f"What shape is the {s.colour} object?", s.kind,
                         f"The {s.colour} object is {_a(s.kind)}. You can find it {where} of the image."))  # fmt: skip
            pool.append((f"Where is the {s.name}?", s.position,
                         f"The {s.name} is {where} of the image. It is one of {NUMBERS[n]} shapes in the picture."))  # fmt: skip
    for kind in SHAPES:
        count = kinds.count(kind)
        pool.append((f"How many {kind}s are there?", str(count),
                     f"{_count_phrase(count, kind).capitalize()} in the image. Altogether the picture shows {all_shapes}."))  # fmt: skip
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    present = any(s.colour == colour and s.kind == kind for s in scene.shapes)
    pool.append((f"Is there {_a(colour + ' ' + kind)}?", "yes" if present else "no",
                 f"Yes, there is {_a(colour + ' ' + kind)} in the image." if present
                 else f"No, there is no {colour} {kind} in the image. The shapes are {all_shapes}."))  # fmt: skip
    s = rng.choice(scene.shapes)
    pool.append((f"Is there {_a(s.name)}?", "yes", f"Yes, there is {_a(s.name)} {_where(s.position)} of the image."))
    return rng.sample(pool, min(k, len(pool)))


OPENINGS = (
    "The image shows {n} simple geometric shapes arranged on a plain {bg} background.",
    "This is a clean, minimal picture in which {n} flat, coloured shapes sit on a {bg} backdrop.",
    "In this picture, {n} coloured shapes are placed on an otherwise empty {bg} background.",
    "Here is what the image contains: {n} solid shapes drawn on a uniform {bg} background.",
)
SHAPE_LINES = (
    "{ord} there is a {size} {name} {where}.",
    "{ord} a {size} {name} can be seen {where}.",
    "{ord} the image has a {size} {name} placed {where}.",
    "{ord} we find a {size} {name} {where}.",
)
ORDINALS = ("First,", "Next,", "Then,", "Finally,")
CLOSINGS = (
    "The shapes do not overlap, so each one is easy to identify.",
    "There is no text and there are no other objects, so the shapes are the only things to see.",
    "Overall, the scene is simple and uncluttered, with clear space between the shapes.",
    "The colours are bright and flat, without shading or texture.",
)


SIGN_OFFS = (
    "I hope this description helps you picture the scene.",
    "Please let me know if you would like more detail about any of the shapes.",
    "Feel free to ask if you want to know more about their exact positions.",
)


def description(scene: Scene) -> str:
    """One long, well-formed description of the scene (40-120 words), wording chosen by the scene index."""
    rng = random.Random(f"demo-text-{scene.index}")
    shapes = sorted(scene.shapes, key=lambda s: (s.box[0] + s.box[2], s.box[1]))  # left to right by centre
    areas = sorted(s.area for s in shapes)
    parts = [rng.choice(OPENINGS).format(n=NUMBERS[len(shapes)], bg=scene.background)]
    for i, s in enumerate(shapes):
        ordinal = ORDINALS[-1] if i == len(shapes) - 1 else ORDINALS[min(i, 2)]
        size = "large" if s.area == areas[-1] else "small" if s.area == areas[0] else "medium-sized"
        line = rng.choice(SHAPE_LINES).format(ord=ordinal, size=size, name=s.name, where=_where(s.position))
        parts.append(line)
    left, right = shapes[0], shapes[-1]
    parts.append(f"The {left.name} is the leftmost shape, while the {right.name} is furthest to the right.")
    parts.append(rng.choice(CLOSINGS))
    if rng.random() < 0.5:
        parts.append(rng.choice(SIGN_OFFS))
    return " ".join(parts)


def scene_record(scene: Scene) -> dict:
    """Everything the demo adapter needs about one scene (stored as JSON beside the image)."""
    return {
        "scene_id": scene.scene_id,
        "background": scene.background,
        "shapes": [{"kind": s.kind, "colour": s.colour, "box": list(s.box), "position": s.position} for s in scene.shapes],
        "captions": captions(scene),
        "boxes": boxes(scene),
        "qa": [list(triple) for triple in qa_pairs(scene, k=4)],  # 2 raw annotations + 2 polite (hq) answers
        "description": description(scene),
    }
