"""A built-in synthetic image-text task for trying MuE without OFA weights, COCO or SNLI-VE.

Scenes are small PIL drawings: 1-4 shapes (distinct shapes per scene) on a 3x3 grid, each with a
colour or drawn hollow (outline only, so its colour cannot be seen), a size, and optional grey
clutter. From each scene the generator writes

* caption rows (OFA caption TSV: ``uniq-id, image-id, caption, predicted-object-labels,
  image-base64``): the caption lists the shapes left to right or names their spatial relation;
  train has one caption per row, valid/test one row per image with ``&&``-joined references, plus
  a COCO-format reference JSON for scoring; the predicted-object-labels column lists the scene's
  shapes joined with ``&&`` (OFA does not read it);
* visual-entailment rows (OFA SNLI-VE TSV: ``uniq-id, image-id, image-base64, hypothesis,
  caption, label``): the premise describes part of the scene, the hypothesis is judged against the
  whole picture. Labels are balanced. ``neutral`` means the picture cannot decide the hypothesis:
  a colour claim about a hollow shape, or a property no drawing shows ("the circle is heavy").

Difficulty is varied on purpose, so that some rows are answerable after a few layers and others
need more: hypothesis types range from shape existence (level 1) through counting and attribute
binding (level 2) and spatial relations with three-valued descriptors (level 3) to conjunctions of
two attribute claims (level 4). Per-row difficulty and scene facts are written to a JSONL file next
to each TSV (``<name>.meta.jsonl``, one line per TSV row, same order).

Everything is a deterministic function of the seed and the configuration. All words are plain
English, so OFA's GPT-2 BPE encodes them without unknown tokens.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 125, 15),
}
SIZES = ("small", "large")
HOLLOW = "hollow"
# Properties a drawing cannot show: hypotheses about them are always neutral.
HIDDEN_PROPERTIES = ("heavy", "soft", "warm", "wet", "old", "new")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
GRID = 3
OUTLINE_COLOR = (45, 45, 45)

ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
LABELS = (ENTAILMENT, NEUTRAL, CONTRADICTION)

CAPTION_COLUMNS = ("uniq-id", "image-id", "caption", "predicted-object-labels", "image-base64")
SNLI_VE_COLUMNS = ("uniq-id", "image-id", "image-base64", "hypothesis", "caption", "label")

# Truth values of the three-valued (Kleene) logic used to label hypotheses.
TRUE, FALSE, UNKNOWN = "T", "F", "U"


@dataclass
class SyntheticTaskConfig:
    """Knobs of the generator; the defaults give a task a small model learns in minutes on CPU."""

    image_size: int = field(default=96, metadata={"help": "canvas side in pixels"})
    min_objects: int = field(default=1, metadata={"help": "fewest shapes per scene"})
    max_objects: int = field(default=4, metadata={"help": "most shapes per scene (<= 5)"})
    hollow_prob: float = field(default=0.4, metadata={"help": "chance that a shape is drawn hollow"})
    clutter_levels: tuple[int, ...] = field(
        default=(0, 4, 10), metadata={"help": "number of grey clutter marks per clutter level"}
    )
    captions_per_image: int = field(default=2, metadata={"help": "caption rows per train image / refs per eval image"})
    hypotheses_per_image: int = field(default=2, metadata={"help": "SNLI-VE rows per image"})
    type_weights: dict[str, float] = field(
        default_factory=lambda: {
            "exists": 1.0,
            "hidden_property": 0.3,
            "count": 1.0,
            "attribute": 1.5,
            "colored_exists": 1.0,
            "relation": 2.5,
            "conjunction": 2.0,
        },
        metadata={"help": "relative frequency of each hypothesis type"},
    )

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(SHAPES)}")
        if self.image_size < 48:
            raise ValueError("image_size must be at least 48 pixels")
        if self.captions_per_image < 1 or self.hypotheses_per_image < 1:
            raise ValueError("captions_per_image and hypotheses_per_image must be >= 1")
        unknown = set(self.type_weights) - set(HYPOTHESIS_LEVELS)
        if unknown:
            raise ValueError(f"unknown hypothesis types {sorted(unknown)}; known: {sorted(HYPOTHESIS_LEVELS)}")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: Optional[str]  # None = hollow
    size: str
    row: int
    col: int
    cx: float
    cy: float

    @property
    def color_word(self) -> str:
        return self.color if self.color is not None else HOLLOW


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    clutter: int  # clutter level index
    background: tuple[int, int, int]
    clutter_marks: tuple[tuple, ...]

    def by_shape(self, shape: str) -> Optional[SceneObject]:
        for obj in self.objects:
            if obj.shape == shape:
                return obj
        return None

    @property
    def has_hollow(self) -> bool:
        return any(o.color is None for o in self.objects)


# ----------------------------------------------------------------------------- scenes and images


def sample_scene(rng: random.Random, cfg: SyntheticTaskConfig) -> Scene:
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(range(GRID * GRID), n)
    cell = cfg.image_size / GRID
    objects = []
    for shape, c in zip(shapes, cells):
        row, col = divmod(c, GRID)
        size = rng.choice(SIZES)
        radius = _radius(size, cell)
        slack = max(0.0, cell / 2 - radius - 2)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        color = None if rng.random() < cfg.hollow_prob else rng.choice(sorted(COLORS))
        objects.append(SceneObject(shape, color, size, row, col, round(cx, 2), round(cy, 2)))
    clutter = rng.randrange(len(cfg.clutter_levels))
    background = tuple(rng.randint(232, 255) for _ in range(3))
    marks = []
    for _ in range(cfg.clutter_levels[clutter]):
        gray = rng.randint(140, 200)
        x, y = rng.uniform(0, cfg.image_size), rng.uniform(0, cfg.image_size)
        if rng.random() < 0.5:
            marks.append(("dot", round(x, 1), round(y, 1), gray))
        else:
            angle = rng.uniform(0, math.pi)
            length = rng.uniform(3, 7)
            marks.append(
                ("line", round(x, 1), round(y, 1), round(x + length * math.cos(angle), 1),
                 round(y + length * math.sin(angle), 1), gray)
            )
    objects.sort(key=lambda o: (o.col, o.row))
    return Scene(tuple(objects), clutter, background, tuple(marks))


def _radius(size: str, cell: float) -> float:
    return cell * (0.38 if size == "large" else 0.2)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return points
    if shape == "cross":
        a = r * 0.33
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for mark in scene.clutter_marks:
        if mark[0] == "dot":
            _, x, y, g = mark
            draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(g, g, g))
        else:
            _, x0, y0, x1, y1, g = mark
            draw.line((x0, y0, x1, y1), fill=(g, g, g), width=1)
    cell = image_size / GRID
    for obj in scene.objects:
        r = _radius(obj.size, cell)
        fill = COLORS[obj.color] if obj.color is not None else None
        outline = None if fill is not None else OUTLINE_COLOR
        width = 0 if fill is not None else 2
        if obj.shape == "circle":
            draw.ellipse((obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r), fill=fill, outline=outline, width=width)
        else:
            points = _shape_polygon(obj.shape, obj.cx, obj.cy, r)
            if fill is not None:
                draw.polygon(points, fill=fill)
            else:
                draw.line(points + [points[0]], fill=outline, width=width, joint="curve")
    return image


def image_to_base64(image: Image.Image) -> str:
    """PNG bytes in standard base64, the encoding OFA's TSVs use."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: SceneObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.color_word, obj.shape]
    return _article(" ".join(words))


def _position_phrase(obj: SceneObject) -> str:
    if obj.col == 0:
        return "on the left"
    if obj.col == GRID - 1:
        return "on the right"
    return {0: "at the top", GRID - 1: "at the bottom"}.get(obj.row, "in the middle")


def describe(objects: tuple[SceneObject, ...] | list[SceneObject], variant: int) -> str:
    """One true description of a set of objects (sorted left to right); ``variant`` picks a paraphrase."""
    objects = sorted(objects, key=lambda o: (o.col, o.row))
    n = len(objects)
    if n == 1:
        obj = objects[0]
        phrase = _noun_phrase(obj, with_size=True)
        if variant % 2 == 0:
            return f"{phrase} {_position_phrase(obj)}"
        return f"{_position_phrase(obj)} {phrase}"
    if n == 2:
        a, b = objects
        pa, pb = _noun_phrase(a, True), _noun_phrase(b, True)
        if a.col != b.col:
            templates = (f"{pa} left of {pb}", f"{pb} right of {pa}", f"{pa} to the left of {pb}",
                         f"{pb} to the right of {pa}")
        else:
            top, bottom = (pa, pb) if a.row < b.row else (pb, pa)
            templates = (f"{top} above {bottom}", f"{bottom} below {top}", f"{top} over {bottom}",
                         f"{bottom} under {top}")
        return templates[variant % len(templates)]
    phrases = [_noun_phrase(o, with_size=False) for o in objects]
    head, last = phrases[:-1], phrases[-1]
    if variant % 3 == 0:
        return " ".join(head) + f" and {last}"
    if variant % 3 == 1:
        return f"{head[0]} with " + " ".join(head[1:]) + f" and {last}"
    return f"{head[0]} beside " + " ".join(head[1:]) + f" and {last}"


def caption_variants(scene: Scene, count: int, rng: random.Random) -> list[str]:
    """``count`` distinct true captions of the whole scene (repeats only if too few paraphrases)."""
    n_templates = {1: 2, 2: 4}.get(len(scene.objects), 3)
    order = list(range(n_templates))
    rng.shuffle(order)
    return [describe(scene.objects, order[i % n_templates]) for i in range(count)]


# ----------------------------------------------------------------------------- hypotheses


def _kleene_and(values: list[str]) -> str:
    if FALSE in values:
        return FALSE
    if UNKNOWN in values:
        return UNKNOWN
    return TRUE


_TRUTH_TO_LABEL = {TRUE: ENTAILMENT, FALSE: CONTRADICTION, UNKNOWN: NEUTRAL}
_LABEL_TO_TRUTH = {v: k for k, v in _TRUTH_TO_LABEL.items()}


def _count_phrase(k: int) -> str:
    return "there is one shape" if k == 1 else f"there are {NUMBER_WORDS[k]} shapes"


def _attribute_claim(obj: SceneObject, truth: str, rng: random.Random) -> Optional[str]:
    """An attribute word whose claim about ``obj`` has the given truth value, or None."""
    options = []
    if truth == TRUE:
        options.append(obj.size)
        options.append(obj.color_word)
    elif truth == FALSE:
        options.append("small" if obj.size == "large" else "large")
        if obj.color is not None:
            options.append(rng.choice([c for c in sorted(COLORS) if c != obj.color]))
            options.append(HOLLOW)
    else:
        if obj.color is None:
            options.append(rng.choice(sorted(COLORS)))
    return rng.choice(options) if options else None


def _descriptor(obj: SceneObject, truth: str, rng: random.Random) -> Optional[str]:
    """A referring expression for ``obj`` whose presupposition has the given truth value."""
    if truth == TRUE:
        if obj.color is not None and rng.random() < 0.5:
            return f"{obj.color} {obj.shape}"
        return obj.shape
    if truth == FALSE:
        if obj.color is None:
            return None
        return f"{rng.choice([c for c in sorted(COLORS) if c != obj.color])} {obj.shape}"
    if obj.color is None:
        return f"{rng.choice(sorted(COLORS))} {obj.shape}"
    return None


def _truth_combos(target: str, k: int, rng: random.Random) -> list[tuple[str, ...]]:
    """All k-tuples of truth values whose Kleene conjunction is ``target``, shuffled."""
    combos = [()]
    for _ in range(k):
        combos = [c + (t,) for c in combos for t in (TRUE, FALSE, UNKNOWN)]
    combos = [c for c in combos if _kleene_and(list(c)) == target]
    rng.shuffle(combos)
    return combos


def _hyp_exists(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    present = [o.shape for o in scene.objects]
    if truth == TRUE:
        return f"there is {_article(rng.choice(present))}"
    if truth == FALSE:
        absent = [s for s in SHAPES if s not in present]
        return f"there is {_article(rng.choice(absent))}" if absent else None
    return None


def _hyp_hidden_property(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    if truth != UNKNOWN:
        return None
    return f"the {rng.choice(scene.objects).shape} is {rng.choice(HIDDEN_PROPERTIES)}"


def _hyp_count(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    n = len(scene.objects)
    if truth == TRUE:
        return _count_phrase(n)
    if truth == FALSE:
        return _count_phrase(rng.choice([k for k in NUMBER_WORDS if k != n]))
    return None


def _hyp_attribute(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    objects = list(scene.objects)
    rng.shuffle(objects)
    for obj in objects:
        word = _attribute_claim(obj, truth, rng)
        if word is not None:
            return f"the {obj.shape} is {word}"
    return None


def _hyp_colored_exists(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    if truth == FALSE and rng.random() < 0.4:
        absent = [s for s in SHAPES if scene.by_shape(s) is None]
        if absent:
            return f"there is {_article(rng.choice(sorted(COLORS)) + ' ' + rng.choice(absent))}"
    objects = list(scene.objects)
    rng.shuffle(objects)
    for obj in objects:
        if truth == TRUE and obj.color is not None:
            return f"there is {_article(obj.color + ' ' + obj.shape)}"
        if truth == FALSE and obj.color is not None:
            other = rng.choice([c for c in sorted(COLORS) if c != obj.color])
            return f"there is {_article(other + ' ' + obj.shape)}"
        if truth == UNKNOWN and obj.color is None:
            return f"there is {_article(rng.choice(sorted(COLORS)) + ' ' + obj.shape)}"
    return None


_RELATIONS = ("left of", "right of", "above", "below")


def _relation_truth(a: SceneObject, rel: str, b: SceneObject) -> Optional[str]:
    """Truth of "a <rel> b" on the grid; None when the grid cannot decide it (same column/row)."""
    if rel in ("left of", "right of"):
        if a.col == b.col:
            return None
        return TRUE if (a.col < b.col) == (rel == "left of") else FALSE
    if a.row == b.row:
        return None
    return TRUE if (a.row < b.row) == (rel == "above") else FALSE


def _hyp_relation(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    rng.shuffle(pairs)
    for combo in _truth_combos(truth, 3, rng):
        rel_truth, truth_a, truth_b = combo
        for a, b in pairs:
            rels = [r for r in _RELATIONS if _relation_truth(a, r, b) == rel_truth]
            if not rels:
                continue
            da, db = _descriptor(a, truth_a, rng), _descriptor(b, truth_b, rng)
            if da is None or db is None:
                continue
            return f"the {da} is {rng.choice(rels)} the {db}"
    return None


def _hyp_conjunction(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    if len(scene.objects) < 2:
        return None
    for combo in _truth_combos(truth, 2, rng):
        a, b = rng.sample(scene.objects, 2)
        wa, wb = _attribute_claim(a, combo[0], rng), _attribute_claim(b, combo[1], rng)
        if wa is not None and wb is not None:
            return f"the {a.shape} is {wa} and the {b.shape} is {wb}"
    return None


HYPOTHESIS_BUILDERS: dict[str, Callable[[Scene, str, random.Random], Optional[str]]] = {
    "exists": _hyp_exists,
    "hidden_property": _hyp_hidden_property,
    "count": _hyp_count,
    "attribute": _hyp_attribute,
    "colored_exists": _hyp_colored_exists,
    "relation": _hyp_relation,
    "conjunction": _hyp_conjunction,
}
HYPOTHESIS_LEVELS = {
    "exists": 1,
    "hidden_property": 1,
    "count": 2,
    "attribute": 2,
    "colored_exists": 2,
    "relation": 3,
    "conjunction": 4,
}


def make_hypothesis(scene: Scene, label: str, rng: random.Random, weights: dict[str, float]) -> tuple[str, str]:
    """A hypothesis with the requested label; returns ``(hypothesis, type)``.

    Types are tried in weighted random order; ``hidden_property`` always yields a neutral
    hypothesis, so every label is reachable for every scene.
    """
    truth = _LABEL_TO_TRUTH[label]
    types = [t for t, w in weights.items() if w > 0]
    keys = {t: rng.random() ** (1.0 / weights[t]) for t in types}
    for hyp_type in sorted(types, key=lambda t: -keys[t]):
        hyp = HYPOTHESIS_BUILDERS[hyp_type](scene, truth, rng)
        if hyp is not None:
            return hyp, hyp_type
    for fallback in ("hidden_property", "exists", "count"):
        hyp = HYPOTHESIS_BUILDERS[fallback](scene, truth, rng)
        if hyp is not None:
            return hyp, fallback
    raise RuntimeError(f"no hypothesis with label {label!r} for scene {scene}")


def make_premise(scene: Scene, rng: random.Random) -> tuple[str, int]:
    """A true description of one or two of the scene's shapes; returns (premise, shapes mentioned)."""
    k = rng.randint(1, min(2, len(scene.objects)))
    subset = rng.sample(scene.objects, k)
    return describe(subset, rng.randrange(4)), k


# ----------------------------------------------------------------------------- writing


def _balanced_labels(count: int, rng: random.Random) -> list[str]:
    labels = [LABELS[i % len(LABELS)] for i in range(count)]
    rng.shuffle(labels)
    return labels


def _coco_reference(split_images: list[dict], annotations: list[dict], split: str) -> dict:
    return {
        "info": {"description": f"mue-fairseq synthetic caption task, {split} split"},
        "licenses": [],
        "type": "captions",
        "images": split_images,
        "annotations": annotations,
    }


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _write_tsv(path: str, rows: list[tuple]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write("\t".join(str(v) for v in row) + "\n")


def build_synthetic_task(
    out_dir: str,
    seed: int = 1,
    num_train: int = 2000,
    num_valid: int = 300,
    num_test: int = 300,
    config: SyntheticTaskConfig | None = None,
) -> dict[str, str]:
    """Generate the task into ``out_dir``; sizes count images (scenes) per split.

    Returns a dict of written paths with keys ``caption_{split}``, ``snli_ve_{split}``,
    ``caption_{split}_meta``, ``snli_ve_{split}_meta`` (split in train/valid/test),
    ``caption_{valid,test}_coco`` (COCO-format references), ``caption_valid_cider_df`` (CIDEr-D
    document frequencies of the valid references, JSON), ``cider_cached_{train,valid}`` (the same
    for train and valid in OFA's pickle layout, ``cider_cached_tokens/coco-{split}-words.p``, what
    OFA's ``--eval-cider-cached-tokens`` / ``--scst-cider-cached-tokens`` read) and ``info``.
    """
    from mue_fairseq.metrics.cider import CIDER_EOS, save_document_frequency

    cfg = config or SyntheticTaskConfig()
    sizes = {"train": num_train, "valid": num_valid, "test": num_test}
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"num_{split} must be >= 1, got {n}")
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    next_image_id = 0
    next_row_id = 0
    for split, n_images in sizes.items():
        rng = random.Random(f"mue-synthetic/{seed}/{split}")
        caption_rows, caption_meta, stage2_rows = [], [], []
        snli_rows, snli_meta = [], []
        coco_images, coco_annotations = [], []
        refs_by_image: dict[int, list[str]] = {}
        labels = _balanced_labels(n_images * cfg.hypotheses_per_image, rng)
        for i in range(n_images):
            scene = sample_scene(rng, cfg)
            image_b64 = image_to_base64(render_scene(scene, cfg.image_size))
            image_id = next_image_id
            next_image_id += 1
            object_labels = "&&".join(o.shape for o in scene.objects)
            scene_meta = {
                "image_id": image_id,
                "num_objects": len(scene.objects),
                "num_hollow": sum(o.color is None for o in scene.objects),
                "clutter": scene.clutter,
                "objects": [f"{o.size} {o.color_word} {o.shape} r{o.row}c{o.col}" for o in scene.objects],
            }
            captions = caption_variants(scene, cfg.captions_per_image, rng)
            refs_by_image[image_id] = list(captions)
            caption_difficulty = len(scene.objects)
            if split == "train":
                for caption in captions:
                    caption_rows.append((next_row_id, image_id, caption, object_labels, image_b64))
                    caption_meta.append({"uniq_id": next_row_id, "difficulty": caption_difficulty, **scene_meta})
                    next_row_id += 1
                stage2_rows.append((image_id, image_id, "&&".join(captions), object_labels, image_b64))
            else:
                caption_rows.append((image_id, image_id, "&&".join(captions), object_labels, image_b64))
                caption_meta.append({"uniq_id": image_id, "difficulty": caption_difficulty, **scene_meta})
                coco_images.append({"id": image_id, "file_name": f"synthetic_{image_id}.png"})
                for caption in captions:
                    coco_annotations.append({"image_id": image_id, "id": len(coco_annotations), "caption": caption})
            for j in range(cfg.hypotheses_per_image):
                label = labels[i * cfg.hypotheses_per_image + j]
                hypothesis, hyp_type = make_hypothesis(scene, label, rng, cfg.type_weights)
                premise, premise_objects = make_premise(scene, rng)
                snli_rows.append((next_row_id, image_id, image_b64, hypothesis, premise, label))
                snli_meta.append({
                    "uniq_id": next_row_id,
                    "difficulty": HYPOTHESIS_LEVELS[hyp_type],
                    "hypothesis_type": hyp_type,
                    "label": label,
                    "premise_objects": premise_objects,
                    **scene_meta,
                })
                next_row_id += 1

        for name, rows, meta in (("caption", caption_rows, caption_meta), ("snli_ve", snli_rows, snli_meta)):
            tsv = os.path.join(out_dir, f"{name}_{split}.tsv")
            _write_tsv(tsv, rows)
            _write_jsonl(os.path.join(out_dir, f"{name}_{split}.meta.jsonl"), meta)
            paths[f"{name}_{split}"] = tsv
            paths[f"{name}_{split}_meta"] = os.path.join(out_dir, f"{name}_{split}.meta.jsonl")
        if split == "train":
            stage2_path = os.path.join(out_dir, "caption_stage2_train.tsv")
            _write_tsv(stage2_path, stage2_rows)
            paths["caption_stage2_train"] = stage2_path
        if split != "train":
            coco_path = os.path.join(out_dir, f"caption_{split}_coco_format.json")
            with open(coco_path, "w", encoding="utf-8") as f:
                json.dump(_coco_reference(coco_images, coco_annotations, split), f, sort_keys=True)
            paths[f"caption_{split}_coco"] = coco_path
            if split == "valid":
                refs: dict[int, list[str]] = {}
                for ann in coco_annotations:
                    refs.setdefault(ann["image_id"], []).append(ann["caption"])
                df_path = os.path.join(out_dir, "caption_valid_cider_df.json")
                save_document_frequency(refs, df_path)
                paths["caption_valid_cider_df"] = df_path
        if split != "test":
            cached_dir = os.path.join(out_dir, "cider_cached_tokens")
            os.makedirs(cached_dir, exist_ok=True)
            cached_path = os.path.join(cached_dir, f"coco-{split}-words.p")
            # SCST scores sentences ending in the word <eos>, so OFA's training n-grams end with it too.
            save_document_frequency(refs_by_image, cached_path, end_word=CIDER_EOS if split == "train" else None)
            paths[f"cider_cached_{split}"] = cached_path
        logger.info(
            "synthetic %s: %d images, %d caption rows, %d snli_ve rows",
            split, n_images, len(caption_rows), len(snli_rows),
        )

    info_path = os.path.join(out_dir, "synthetic_task_info.json")
    info = {
        "seed": seed,
        "sizes_in_images": sizes,
        "config": dataclasses.asdict(cfg),
        "caption_columns": list(CAPTION_COLUMNS),
        "snli_ve_columns": list(SNLI_VE_COLUMNS),
        "hypothesis_levels": HYPOTHESIS_LEVELS,
        "files": {k: os.path.basename(v) for k, v in sorted(paths.items())},
    }
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    paths["info"] = info_path
    return paths


def load_meta(meta_path: str) -> dict[int, dict]:
    """Read a ``.meta.jsonl`` file into ``{uniq_id: record}``."""
    records: dict[int, dict] = {}
    with open(meta_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                records[int(record["uniq_id"])] = record
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise ValueError(f"{meta_path}:{line_no}: bad meta record ({e})") from e
    return records


_COLOURED_SHAPE = re.compile(r"\b(" + "|".join(sorted(COLORS) + [HOLLOW]) + r") (" + "|".join(SHAPES) + r")\b")


def named_objects(caption: str) -> list[str]:
    """The "colour shape" pairs a caption names, in order ("hollow" counts as a colour)."""
    return [" ".join(pair) for pair in _COLOURED_SHAPE.findall(caption)]


def scene_objects(record: dict) -> list[str]:
    """A scene's "colour shape" pairs from its meta record ("large purple star r0c1" -> "purple star")."""
    return [" ".join(obj.split()[1:3]) for obj in record["objects"]]


def caption_content_accuracy(predictions: list[dict], meta: dict[int, dict]) -> float:
    """Percentage of generated captions ({"image_id", "caption"}) that name exactly the scene's
    coloured shapes (as a multiset). CIDEr-D alone can be high for captions that get every colour
    and shape wrong, since most n-grams of this task's captions are template words."""
    right = sum(sorted(named_objects(p["caption"])) == sorted(scene_objects(meta[int(p["image_id"])]))
                for p in predictions)
    return 100.0 * right / max(len(predictions), 1)


def cli_main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=2000, help="train images")
    parser.add_argument("--num-valid", type=int, default=300, help="valid images")
    parser.add_argument("--num-test", type=int, default=300, help="test images")
    defaults = SyntheticTaskConfig()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--min-objects", type=int, default=defaults.min_objects)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--hollow-prob", type=float, default=defaults.hollow_prob)
    parser.add_argument("--captions-per-image", type=int, default=defaults.captions_per_image)
    parser.add_argument("--hypotheses-per-image", type=int, default=defaults.hypotheses_per_image)
    parser.add_argument(
        "--type-weights", default=None,
        help="JSON object overriding hypothesis type weights, e.g. '{\"relation\": 4}'",
    )
    args = parser.parse_args(argv)
    weights = dict(defaults.type_weights)
    if args.type_weights:
        weights.update(json.loads(args.type_weights))
    cfg = SyntheticTaskConfig(
        image_size=args.image_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        hollow_prob=args.hollow_prob,
        captions_per_image=args.captions_per_image,
        hypotheses_per_image=args.hypotheses_per_image,
        type_weights=weights,
    )
    paths = build_synthetic_task(args.out, args.seed, args.num_train, args.num_valid, args.num_test, cfg)
    logger.info("wrote %s", ", ".join(sorted(paths.values())))
    return paths


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
