"""Synthetic scenes of coloured shapes and glyphs, and the questions asked about them: grounding ("locate X"),
pointing ("centre of each X"), counting (with zero and hard negatives), spatial relations (left of, above,
inside a frame) and ``general`` questions that need no primitives at all.

Ground truth is exact because we draw it: every object's box is the bounding box of its own ink, in pixels,
then mapped to 0-999 with ``primitives.box_to_999``. Sides are multiples of 42 px (one merged ViT token per
42×42 px), 252×252 for ``primitives-tiny``. Objects never overlap, so a box always means one object.

Gold answers follow the paper's primitive language (lineage §5.2): boxes ``<|ref|>T<|/ref|><|box|>[[…]]<|/box|>``
ordered left to right, points ``<|point|>[[x,y],…]<|/point|>`` with no label, final answers in ``\\boxed{}``.
Counting follows the paper's coarse protocol (ground every instance, then sum): the cited list has exactly as
many entries as the boxed count, which is what the quality reward checks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from optictx.data.sample import Sample, boxed, check_mode, check_side, pick, rng, wrap_prompt
from optictx.errors import ConfigError
from optictx.primitives import box_to_999, format_box, format_points, point_to_999, sort_left_to_right

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38), "green": (30, 150, 60), "blue": (37, 84, 220), "yellow": (235, 200, 20),
    "orange": (245, 128, 20), "purple": (130, 60, 180), "pink": (240, 110, 185), "black": (25, 25, 25),
}
GEOMETRIC = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
GLYPHS = ("letter A", "letter K", "letter R", "letter T")
SHAPES = GEOMETRIC + GLYPHS
SIZES = ("small", "large")
# Shapes a quick look confuses: the hard negatives of counting (lineage §5.2, fine-grained counting).
LOOKALIKES = {"circle": ("hexagon",), "hexagon": ("circle",), "square": ("diamond",), "diamond": ("square",),
              "star": ("cross",), "cross": ("star",), "triangle": ("diamond",),
              **{g: tuple(x for x in GLYPHS if x != g) for g in GLYPHS}}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
STYLES = ("train", "unseen")


@dataclass(frozen=True)
class Spec:
    """What a question refers to: a shape, optionally narrowed by colour and size."""

    shape: str
    colour: str | None = None
    size: str | None = None

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.size, self.colour, self.shape) if p)

    @property
    def plural(self) -> str:
        return self.name + ("es" if self.shape == "cross" else "s")

    def matches(self, obj: "SceneObject") -> bool:
        return (obj.shape == self.shape and self.colour in (None, obj.colour)
                and self.size in (None, obj.size))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box_px: tuple[int, int, int, int]  # ink bounding box, x2/y2 exclusive (PIL getbbox)

    @property
    def centre_px(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box_px
        return ((x1 + x2) / 2, (y1 + y2) / 2)


@dataclass
class SceneConfig:
    side: int = 252
    max_objects: int = 9
    max_count: int = 6
    zero_prob: float = 0.15
    hard_negative_prob: float = 0.6
    thinking: str = "box"  # how counting cites instances: "box" (grounding specialist) or "point"
    style: str = "train"  # "unseen": gradient + noise background, outlined shapes, stronger colour jitter
    frame_prob: float = 0.4  # spatial questions: chance of an "inside the frame" question

    def validate(self) -> "SceneConfig":
        check_side(self.side)
        if self.thinking not in ("box", "point"):
            raise ConfigError(f"scene thinking must be 'box' or 'point', got {self.thinking!r}")
        if self.style not in STYLES:
            raise ConfigError(f"scene style must be one of {STYLES}, got {self.style!r}")
        if not 1 <= self.max_count < self.max_objects:
            raise ConfigError(f"need 1 <= max_count < max_objects, got {self.max_count}, {self.max_objects}")
        return self


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    frame: SceneObject | None = None  # a hollow rectangle: the container of "inside" questions

    def boxes_999(self, objs) -> list[tuple[int, int, int, int]]:
        return sort_left_to_right([box_to_999(o.box_px, self.image.size) for o in objs])

    def points_999(self, objs) -> list[tuple[int, int]]:
        return sorted(point_to_999(o.centre_px, self.image.size) for o in objs)


# ----------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=64)
def _glyph_font(size: int) -> ImageFont.FreeTypeFont:
    from optictx.render.fonts import load_font, primary_font

    return load_font(primary_font("sans", bold=True), size)


def _polygon(n: int, d: int, inner: float = 1.0, phase: float = -np.pi / 2) -> list[tuple[float, float]]:
    """A regular polygon (``inner`` < 1 alternates radii: a star) inscribed in a d×d square."""
    r = d / 2 - 0.5
    k = n * (2 if inner < 1 else 1)
    return [(d / 2 + (r if i % 2 == 0 or inner == 1 else r * inner) * np.cos(phase + 2 * np.pi * i / k),
             d / 2 + (r if i % 2 == 0 or inner == 1 else r * inner) * np.sin(phase + 2 * np.pi * i / k))
            for i in range(k)]


def shape_mask(shape: str, d: int) -> Image.Image:
    """The ink of a shape drawn in a d×d "L" mask (255 = ink)."""
    mask = Image.new("L", (d, d), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, d - 1, d - 1), fill=255)
    elif shape == "square":
        draw.rectangle((d * 0.08, d * 0.08, d * 0.92, d * 0.92), fill=255)
    elif shape == "triangle":
        draw.polygon([(d / 2, 0), (d - 1, d - 1), (0, d - 1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(d / 2, 0), (d - 1, d / 2), (d / 2, d - 1), (0, d / 2)], fill=255)
    elif shape == "star":
        draw.polygon(_polygon(5, d, inner=0.45), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(6, d, phase=0.0), fill=255)
    elif shape == "cross":
        t = d * 0.17
        draw.rectangle((d / 2 - t, 0, d / 2 + t, d - 1), fill=255)
        draw.rectangle((0, d / 2 - t, d - 1, d / 2 + t), fill=255)
    elif shape in GLYPHS:
        font = _glyph_font(int(d * 1.3))
        draw.text((d / 2, d / 2), shape[-1], font=font, fill=255, anchor="mm")
    else:
        raise ConfigError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def _background(r: np.random.Generator, side: int, style: str) -> Image.Image:
    if style == "train":
        tint = r.integers(228, 256, size=3)
        return Image.new("RGB", (side, side), tuple(int(v) for v in tint))
    top, bottom = r.integers(200, 256, size=3), r.integers(200, 256, size=3)
    t = np.linspace(0, 1, side)[:, None, None]
    arr = (top * (1 - t) + bottom * t) * np.ones((1, side, 1)) + r.normal(0, 6, size=(side, side, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _ink(r: np.random.Generator, colour: str, style: str) -> tuple[int, int, int]:
    jitter = 12 if style == "train" else 24
    return tuple(int(np.clip(c + r.integers(-jitter, jitter + 1), 0, 255)) for c in COLOURS[colour])


def _diameter(r: np.random.Generator, size: str, side: int) -> int:
    lo, hi = (0.075, 0.10) if size == "small" else (0.14, 0.18)
    return max(8, int(round(side * r.uniform(lo, hi))))


def _free(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]], gap: int) -> bool:
    x1, y1, x2, y2 = box
    return all(x2 + gap <= a1 or a2 + gap <= x1 or y2 + gap <= b1 or b2 + gap <= y1 for a1, b1, a2, b2 in taken)


def _frame_parts(frame: tuple[int, int, int, int] | None, box, inside: bool | None) -> bool:
    """Whether ``box`` may go here: clear of the frame's border, and inside/outside it as asked."""
    if frame is None:
        return True
    fx1, fy1, fx2, fy2 = frame
    margin = 6
    fully_in = fx1 + margin <= box[0] and fy1 + margin <= box[1] and box[2] <= fx2 - margin and box[3] <= fy2 - margin
    fully_out = box[2] + 3 <= fx1 or fx2 + 3 <= box[0] or box[3] + 3 <= fy1 or fy2 + 3 <= box[1]
    return fully_in if inside else fully_out if inside is False else (fully_in or fully_out)


def render_scene(r: np.random.Generator, wanted: list[tuple[str, str, str, bool | None]], cfg: SceneConfig,
                 frame_colour: str | None = None) -> Scene:
    """Place and draw objects ``(shape, colour, size, inside_frame)`` without overlap.

    Placement is rejection sampling with the sample's RNG; a layout that does not fit is redrawn from the
    same stream (still a pure function of the seed). Sizes shrink one step after a few failed layouts.
    """
    side = cfg.side
    for attempt in range(20):
        scale = 1.0 if attempt < 5 else 0.8
        image = _background(r, side, cfg.style)
        draw = ImageDraw.Draw(image)
        frame_box = None
        if frame_colour is not None:
            w, h = (int(side * r.uniform(0.42, 0.55)) for _ in range(2))
            x, y = int(r.integers(4, side - w - 4)), int(r.integers(4, side - h - 4))
            frame_box = (x, y, x + w, y + h)
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=_ink(r, frame_colour, cfg.style), width=4)
        placed: list[SceneObject] = []
        taken: list[tuple[int, int, int, int]] = []
        ok = True
        for shape, colour, size, inside in wanted:
            d = max(8, int(_diameter(r, size, side) * scale))
            mask = shape_mask(shape, d)
            ink = mask.getbbox()
            for _ in range(200):
                x, y = int(r.integers(3, side - d - 3)), int(r.integers(3, side - d - 3))
                box = (x + ink[0], y + ink[1], x + ink[2], y + ink[3])
                if _free(box, taken, gap=4) and _frame_parts(frame_box, box, inside):
                    break
            else:
                ok = False
                break
            image.paste(Image.new("RGB", (d, d), _ink(r, colour, cfg.style)), (x, y), mask)
            if cfg.style == "unseen":  # a dark outline the training data never shows
                edge = _edge(mask)
                image.paste(Image.new("RGB", (d, d), (20, 20, 20)), (x, y), edge)
            placed.append(SceneObject(shape, colour, size, box))
            taken.append(box)
        if ok:
            frame = SceneObject("frame", frame_colour, "large", frame_box) if frame_box else None
            return Scene(image, placed, frame)
    raise ConfigError(f"cannot place {len(wanted)} objects on a {side}-px scene; lower max_objects")


def _edge(mask: Image.Image) -> Image.Image:
    """A mask -> its 1-px inner border (the outline "unseen" style draws around each shape)."""
    from PIL import ImageFilter

    eroded = np.asarray(mask.filter(ImageFilter.MinFilter(3)))
    return Image.fromarray(np.where((np.asarray(mask) > 0) & (eroded == 0), 255, 0).astype(np.uint8))


# ----------------------------------------------------------------------------- object lists


def random_spec(r: np.random.Generator, colour_p: float = 0.8, size_p: float = 0.25) -> Spec:
    return Spec(pick(r, SHAPES), pick(r, list(COLOURS)) if r.random() < colour_p else None,
                pick(r, SIZES) if r.random() < size_p else None)


def instance_of(r: np.random.Generator, spec: Spec) -> tuple[str, str, str]:
    return (spec.shape, spec.colour or pick(r, list(COLOURS)), spec.size or pick(r, SIZES))


def hard_negative(r: np.random.Generator, spec: Spec) -> tuple[str, str, str]:
    """An object that differs from ``spec`` in exactly one attribute the question names."""
    shape, colour, size = instance_of(r, spec)
    choices = ["shape"] + (["colour"] if spec.colour else []) + (["size"] if spec.size else [])
    what = pick(r, choices)
    if what == "shape":
        shape = pick(r, LOOKALIKES[spec.shape])
    elif what == "colour":
        colour = pick(r, [c for c in COLOURS if c != spec.colour])
    else:
        size = "small" if spec.size == "large" else "large"
    return shape, colour, size


def distractor(r: np.random.Generator, spec: Spec) -> tuple[str, str, str]:
    while True:
        obj = (pick(r, SHAPES), pick(r, list(COLOURS)), pick(r, SIZES))
        if not spec.matches(SceneObject(*obj, (0, 0, 0, 0))):
            return obj


def scene_for(r: np.random.Generator, spec: Spec, count: int, cfg: SceneConfig) -> Scene:
    """A scene with exactly ``count`` objects matching ``spec`` plus hard negatives and random distractors."""
    others = int(r.integers(max(0, 2 - count), cfg.max_objects - count + 1))
    n_hard = int(r.integers(1, others + 1)) if others and r.random() < cfg.hard_negative_prob else 0
    wanted = [instance_of(r, spec) for _ in range(count)]
    wanted += [hard_negative(r, spec) for _ in range(n_hard)]
    wanted += [distractor(r, spec) for _ in range(others - n_hard)]
    order = r.permutation(len(wanted))
    return render_scene(r, [(*wanted[i], None) for i in order], cfg)


def _count(r: np.random.Generator, cfg: SceneConfig, min_count: int = 0) -> int:
    if min_count == 0 and r.random() < cfg.zero_prob:
        return 0
    return int(r.integers(max(1, min_count), cfg.max_count + 1))


# ----------------------------------------------------------------------------- tasks

GROUNDING_TEMPLATES = ("Locate <|ref|>{name}<|/ref|> in the image.",
                       "Locate {name} in this image and report its bounding box coordinates.",
                       "Find every {name} and give its bounding box.")
POINTING_TEMPLATES = ("Help me find {name}. Give me the center point for each instance.",
                      "Point to the center of each {name}.")
COUNTING_TEMPLATES = ("How many {plural} are there? Put the number in \\boxed{{}}.",
                      "Count the {plural} in the image. Answer with \\boxed{{N}}.")


def _answer_is_primitive(mode: str) -> str:
    """Grounding and pointing answer *with* primitives, so "direct" has no meaning there: it becomes "auto"."""
    return "auto" if check_mode(mode) == "direct" else mode


def _not_found(spec: Spec) -> str:
    return f"There is no {spec.name} in the image."


def grounding(seed: int, index: int, cfg: SceneConfig | None = None, mode: str = "auto") -> Sample:
    """"Locate X": the answer is the box list itself (zero instances -> a faithful refusal, no box)."""
    cfg = (cfg or SceneConfig()).validate()
    r = rng(seed, index, "grounding")
    spec = random_spec(r)
    count = 0 if r.random() < cfg.zero_prob / 2 else int(r.integers(1, cfg.max_count + 1))
    scene = scene_for(r, spec, count, cfg)
    boxes = scene.boxes_999([o for o in scene.objects if spec.matches(o)])
    target = format_box(spec.name, boxes) if boxes else _not_found(spec)
    question = pick(r, GROUNDING_TEMPLATES).format(name=spec.name)
    return Sample("grounding", scene.image, wrap_prompt(question, _answer_is_primitive(mode)), target, "", mode,
                  seed, index, _scene_meta(scene, spec, boxes))


def pointing(seed: int, index: int, cfg: SceneConfig | None = None, mode: str = "auto") -> Sample:
    """"Centre of each X": the answer is the point list, left to right."""
    cfg = (cfg or SceneConfig()).validate()
    r = rng(seed, index, "pointing")
    spec = random_spec(r)
    count = 0 if r.random() < cfg.zero_prob / 2 else int(r.integers(1, cfg.max_count + 1))
    scene = scene_for(r, spec, count, cfg)
    hits = [o for o in scene.objects if spec.matches(o)]
    points = scene.points_999(hits)
    target = format_points(points) if points else _not_found(spec)
    question = pick(r, POINTING_TEMPLATES).format(name=spec.name)
    meta = _scene_meta(scene, spec, scene.boxes_999(hits))
    meta["points"] = [list(p) for p in points]
    return Sample("pointing", scene.image, wrap_prompt(question, _answer_is_primitive(mode)), target, "", mode,
                  seed, index, meta)


def counting_trace(spec: Spec, boxes: list, points: list, count: int, thinking: str, mode: str) -> str:
    """Gold counting answer: ground every instance (boxes or points), then the sum."""
    if mode == "direct":
        return boxed(count)
    if count == 0:
        return f"I look for {spec.plural} and find none. {boxed(0)}"
    if thinking == "box":
        cited = format_box(spec.name, boxes)
    else:
        cited = f"{spec.name}: {format_points(points)}"
    return f"{cited} That makes {count}. {boxed(count)}"


def counting(seed: int, index: int, cfg: SceneConfig | None = None, mode: str = "trigger") -> Sample:
    cfg = (cfg or SceneConfig()).validate()
    r = rng(seed, index, "counting")
    spec = random_spec(r)
    count = _count(r, cfg)
    scene = scene_for(r, spec, count, cfg)
    hits = [o for o in scene.objects if spec.matches(o)]
    boxes, points = scene.boxes_999(hits), scene.points_999(hits)
    question = pick(r, COUNTING_TEMPLATES).format(plural=spec.plural)
    meta = _scene_meta(scene, spec, boxes)
    meta.update(count=count, points=[list(p) for p in points])
    return Sample("counting", scene.image, wrap_prompt(question, check_mode(mode)),
                  counting_trace(spec, boxes, points, count, cfg.thinking, mode), str(count), mode, seed, index,
                  meta)


def _relation(a: SceneObject, b: SceneObject, side: int, axis: str) -> str | None:
    """The relation of a to b along an axis, or None when the centres are too close to call."""
    (ax, ay), (bx, by) = a.centre_px, b.centre_px
    d = (ax - bx) if axis == "x" else (ay - by)
    if abs(d) < 0.12 * side:
        return None
    if axis == "x":
        return "left of" if d < 0 else "right of"
    return "above" if d < 0 else "below"


def spatial(seed: int, index: int, cfg: SceneConfig | None = None, mode: str = "trigger") -> Sample:
    """"Is the A left of / above / inside the B?" Yes and No are balanced (index parity picks the truth)."""
    cfg = (cfg or SceneConfig()).validate()
    r = rng(seed, index, "spatial")
    truth = index % 2 == 0
    n_objects = int(r.integers(3, cfg.max_objects + 1))
    if r.random() < cfg.frame_prob:
        frame_colour = pick(r, list(COLOURS))
        a = (pick(r, SHAPES), pick(r, list(COLOURS)), pick(r, SIZES))
        wanted = [(*a, truth)] + [(*distractor(r, Spec(*a[:2])), None) for _ in range(n_objects - 1)]
        scene = render_scene(r, wanted, cfg, frame_colour)
        obj_a, obj_b = scene.objects[0], scene.frame
        asked, actual = "inside", "inside" if truth else "outside"
        name_a, name_b = f"{obj_a.colour} {obj_a.shape}", f"{frame_colour} frame"
    else:
        for _ in range(50):
            scene = render_scene(r, [(pick(r, SHAPES), pick(r, list(COLOURS)), pick(r, SIZES), None)
                                     for _ in range(n_objects)], cfg)
            unique = [o for o in scene.objects
                      if sum(1 for p in scene.objects if (p.shape, p.colour) == (o.shape, o.colour)) == 1]
            axis = pick(r, ("x", "y"))
            pairs = [(a, b) for a in unique for b in unique if a is not b and _relation(a, b, cfg.side, axis)]
            if pairs:
                break
        else:
            raise ConfigError("no scene with a clear spatial relation; raise max_objects")
        obj_a, obj_b = pairs[int(r.integers(len(pairs)))]
        actual = _relation(obj_a, obj_b, cfg.side, axis)
        asked = actual if truth else OPPOSITE[actual]
        name_a, name_b = f"{obj_a.colour} {obj_a.shape}", f"{obj_b.colour} {obj_b.shape}"
    answer = "Yes" if truth else "No"
    question = f"Is the {name_a} {asked} the {name_b}? Answer \\boxed{{Yes}} or \\boxed{{No}}."
    box_a, box_b = (box_to_999(o.box_px, scene.image.size) for o in (obj_a, obj_b))
    if mode == "direct":
        target = boxed(answer)
    else:
        target = (f"{format_box(name_a, [box_a])} {format_box(name_b, [box_b])} "
                  f"The {name_a} is {actual} the {name_b}. {boxed(answer)}")
    meta = _scene_meta(scene, None, [])
    meta.update(refs={name_a: list(box_a), name_b: list(box_b)}, relation=asked)
    return Sample("spatial", scene.image, wrap_prompt(question, check_mode(mode)), target, answer, mode,
                  seed, index, meta)


def general(seed: int, index: int, cfg: SceneConfig | None = None, mode: str = "auto") -> Sample:
    """Questions that need no primitives: the gold answer is direct even without "Answer directly".

    With these next to counting/maze prompts *without* the trigger, the model learns from the question
    itself when primitives help (beyond the paper's limitation 2). They never carry the trigger.
    """
    cfg = (cfg or SceneConfig()).validate()
    r = rng(seed, index, "general")
    spec = random_spec(r, colour_p=1.0, size_p=0.0)
    kind = int(r.integers(3))
    present = bool(r.random() < 0.5)
    scene = scene_for(r, spec, int(present), cfg)
    meta = _scene_meta(scene, spec, [])
    if kind == 0:
        a, b = (int(v) for v in r.integers(0, 50, size=2))
        question, answer = f"What is {a} plus {b}?", str(a + b)
    elif kind == 1:
        question = f"Is there any {spec.name} in the image? Answer \\boxed{{Yes}} or \\boxed{{No}}."
        answer = "Yes" if present else "No"
    else:
        colours = sorted({o.colour for o in scene.objects})
        question, answer = "Name one colour of a shape in the image.", colours[0]
        meta["accepted"] = colours
    prompt = wrap_prompt(question, "direct" if mode == "direct" else "auto")
    return Sample("general", scene.image, prompt, boxed(answer), answer, mode, seed, index, meta)


def _scene_meta(scene: Scene, spec: Spec | None, boxes: list) -> dict:
    """Verifier ground truth: the asked target's boxes and every drawn object's box (0-999)."""
    objects = scene.objects + ([scene.frame] if scene.frame else [])
    return {
        "label": spec.name if spec else None,
        "boxes": [list(b) for b in boxes],
        "all_boxes": [list(box_to_999(o.box_px, scene.image.size)) for o in objects],
        "side": scene.image.width,
    }
