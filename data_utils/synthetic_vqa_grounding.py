"""Built-in VQA and visual-grounding data from the synthetic scenes, in OFA's TSV formats.

The scenes of `synthetic_task` know every shape, colour, size and position, so they yield:

* ``vqa_gen_{split}.tsv``: question id, image id, question, answers (``1.0|!+answer``), object
  labels (``&&``-joined shapes), image (OFA's ``--selected-cols 0,5,2,3,4``), with questions of three
  levels: 1 "what color is the star?" / "is there a blue square?", 2 "how many shapes are there?",
  3 "how many red shapes are there?", 4 (relations, only with ``--vqa-levels``) "is the star left of
  the circle?" / "is the star above the circle?"; ``vqa_ans2label.pkl`` (and ``.json``) hold every
  possible answer;
* ``refcoco_{split}.tsv``: uniq id (``image_k``), image id, referring expression, box
  ``x0,y0,x1,y1`` in pixels, image (``--selected-cols 0,4,2,3``), with expressions of three levels:
  1 "the circle", 2 "the red circle", 3 "the large red circle on the left". Shapes are unique
  within a scene, so every expression names one object. Images are widened by a random margin on
  the right, so width and height differ and the box follows OFA's per-axis resize.

Each TSV has a ``.meta.jsonl`` with the level and the scene of every row.

    python -m data_utils.synthetic_vqa_grounding --out-dir work_dirs/synthetic --num-train 2000
"""

import argparse
import json
import os
import pickle
import random
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from data_utils.synthetic.config import SyntheticTaskConfig
from data_utils.synthetic.language import _article, _position_phrase
from data_utils.synthetic.scene import (
    COLORS, Scene, SceneObject, _radius, _shape_polygon, image_to_base64, render_scene, sample_scene,
)
from data_utils.synthetic.writers import _write_jsonl, _write_tsv
from mue_fairseq.metrics.synthetic_content import GRID, HOLLOW, SHAPES

VQA_COLUMNS = ("question-id", "image-id", "question", "answers", "object-labels", "image-base64")
REFCOCO_COLUMNS = ("uniq-id", "image-id", "text", "region-coord", "image-base64")
VQA_SELECTED_COLS = "0,5,2,3,4"
REFCOCO_SELECTED_COLS = "0,4,2,3"
COLOR_WORDS = tuple(sorted(COLORS)) + (HOLLOW,)
MAX_COUNT = len(SHAPES)
# Every answer a synthetic question can have: the candidate set (OFA's ans2label).
VQA_ANSWERS = ("no", "yes") + COLOR_WORDS + tuple(str(n) for n in range(MAX_COUNT + 1))
VQA_LEVELS = (1, 2, 3, 4)
DEFAULT_VQA_LEVELS = (1, 2, 3)


def object_box(obj: SceneObject, image_size: int) -> Tuple[float, float, float, float]:
    """The object's bounding box (x0, y0, x1, y1) in pixels, inside the square scene."""
    r = _radius(obj.size, image_size / GRID)
    if obj.shape == "circle":
        xs, ys = (obj.cx - r, obj.cx + r), (obj.cy - r, obj.cy + r)
    else:
        points = _shape_polygon(obj.shape, obj.cx, obj.cy, r)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(image_size), max(xs)), min(float(image_size), max(ys))
    return round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)


def referring_expression(obj: SceneObject, level: int) -> str:
    """The expression of ``level`` (1-3) that names ``obj`` (shapes are unique within a scene)."""
    if level == 1:
        return f"the {obj.shape}"
    if level == 2:
        return f"the {obj.color_word} {obj.shape}"
    return f"the {obj.size} {obj.color_word} {obj.shape} {_position_phrase(obj)}"


def vqa_question(scene: Scene, level: int, rng: random.Random) -> Tuple[str, str]:
    """(question, answer) of ``level`` about ``scene``."""
    if level == 1:
        if rng.random() < 0.5:
            obj = rng.choice(scene.objects)
            return f"what color is the {obj.shape}?", obj.color_word
        shape = rng.choice(SHAPES)
        present = scene.by_shape(shape)
        if present is not None and present.color is not None and rng.random() < 0.5:
            return f"is there {_article(present.color + ' ' + shape)}?", "yes"
        color = rng.choice(sorted(COLORS))
        answer = "yes" if present is not None and present.color == color else "no"
        return f"is there {_article(color + ' ' + shape)}?", answer
    if level == 2:
        return "how many shapes are there?", str(len(scene.objects))
    if level == 4:  # a relation between two objects: both must be found, then their cells compared
        first, second = rng.sample(scene.objects, 2)
        if first.col != second.col and (first.row == second.row or rng.random() < 0.5):
            return f"is the {first.shape} left of the {second.shape}?", "yes" if first.col < second.col else "no"
        return f"is the {first.shape} above the {second.shape}?", "yes" if first.row < second.row else "no"
    color = rng.choice(sorted(COLORS))
    return f"how many {color} shapes are there?", str(sum(o.color == color for o in scene.objects))


def widen(image: Image.Image, margin: int, background: Tuple[int, int, int]) -> Image.Image:
    """The image with ``margin`` background pixels added on the right."""
    if margin == 0:
        return image
    wide = Image.new("RGB", (image.width + margin, image.height), background)
    wide.paste(image, (0, 0))
    return wide


def build_vqa_grounding_task(
    out_dir: str,
    seed: int = 1,
    num_train: int = 2000,
    num_valid: int = 300,
    num_test: int = 300,
    questions_per_image: int = 2,
    expressions_per_image: int = 1,
    config: Optional[SyntheticTaskConfig] = None,
    vqa_levels: Sequence[int] = DEFAULT_VQA_LEVELS,
) -> Dict[str, str]:
    """Write the VQA and grounding splits (sizes count images) to ``out_dir``; returns the paths
    (keys ``vqa_gen_{split}``, ``refcoco_{split}``, their ``_meta``, ``vqa_ans2label``, ``vqa_ans2label_json``).
    Each question's level is drawn uniformly from ``vqa_levels`` (repeat a level to weight it)."""
    cfg = config or SyntheticTaskConfig()
    vqa_levels = tuple(vqa_levels)
    if not vqa_levels or any(level not in VQA_LEVELS for level in vqa_levels):
        raise ValueError(f"vqa_levels must be levels among {VQA_LEVELS}, got {vqa_levels}")
    sizes = {"train": num_train, "valid": num_valid, "test": num_test}
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"num_{split} must be >= 1, got {n}")
    if questions_per_image < 1 or expressions_per_image < 1:
        raise ValueError("questions_per_image and expressions_per_image must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    next_image_id, next_question_id = 0, 0
    for split, n_images in sizes.items():
        rng = random.Random(f"mue-synthetic-vqa-grounding/{seed}/{split}")
        vqa_rows, vqa_meta, ref_rows, ref_meta = [], [], [], []
        for _ in range(n_images):
            scene = sample_scene(rng, cfg)
            image = widen(render_scene(scene, cfg.image_size), rng.randint(0, cfg.image_size // 3), scene.background)
            image_b64 = image_to_base64(image)
            image_id, next_image_id = next_image_id, next_image_id + 1
            labels = "&&".join(o.shape for o in scene.objects)
            objects = [f"{o.size} {o.color_word} {o.shape} r{o.row}c{o.col}" for o in scene.objects]
            for _ in range(questions_per_image):
                # randrange draws as randint(1, 3) did, so the default levels keep earlier data
                level = vqa_levels[rng.randrange(len(vqa_levels))]
                if level == 4 and len(scene.objects) < 2:
                    level = 1  # no relation in a one-object scene
                question, answer = vqa_question(scene, level, rng)
                vqa_rows.append((next_question_id, image_id, question, f"1.0|!+{answer}", labels, image_b64))
                vqa_meta.append({"question_id": next_question_id, "image_id": image_id, "level": level,
                                 "answer": answer, "objects": objects})
                next_question_id += 1
            for k, obj in enumerate(rng.sample(scene.objects, min(expressions_per_image, len(scene.objects)))):
                level = rng.randint(1, 3)
                box = object_box(obj, cfg.image_size)
                uniq_id = f"{image_id}_{k}"
                ref_rows.append((uniq_id, image_id, referring_expression(obj, level), ",".join(map(str, box)),
                                 image_b64))
                ref_meta.append({"uniq_id": uniq_id, "image_id": image_id, "level": level,
                                 "width": image.width, "height": image.height, "objects": objects})
        for name, rows, meta in (("vqa_gen", vqa_rows, vqa_meta), ("refcoco", ref_rows, ref_meta)):
            tsv = os.path.join(out_dir, f"{name}_{split}.tsv")
            _write_tsv(tsv, rows)
            _write_jsonl(os.path.join(out_dir, f"{name}_{split}.meta.jsonl"), meta)
            paths[f"{name}_{split}"] = tsv
            paths[f"{name}_{split}_meta"] = os.path.join(out_dir, f"{name}_{split}.meta.jsonl")
    ans2label = {answer: i for i, answer in enumerate(VQA_ANSWERS)}
    paths["vqa_ans2label"] = os.path.join(out_dir, "vqa_ans2label.pkl")
    with open(paths["vqa_ans2label"], "wb") as handle:
        pickle.dump(ans2label, handle)
    paths["vqa_ans2label_json"] = os.path.join(out_dir, "vqa_ans2label.json")
    with open(paths["vqa_ans2label_json"], "w", encoding="utf-8") as handle:
        json.dump(ans2label, handle)
    return paths


def cli_main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-valid", type=int, default=300, help="validation images")
    parser.add_argument("--num-test", type=int, default=300, help="test images")
    parser.add_argument("--questions-per-image", type=int, default=2)
    parser.add_argument("--expressions-per-image", type=int, default=1)
    parser.add_argument("--vqa-levels", default=",".join(map(str, DEFAULT_VQA_LEVELS)),
                        help="comma-separated question levels to draw from (1-4; repeat one to weight it); "
                             "level 4 asks about the relation of two shapes")
    args = parser.parse_args(argv)
    try:
        levels = tuple(int(v) for v in args.vqa_levels.split(","))
    except ValueError:
        parser.error(f"--vqa-levels {args.vqa_levels!r}: give comma-separated integers, e.g. 1,2,3,4")
    paths = build_vqa_grounding_task(args.out_dir, args.seed, args.num_train, args.num_valid, args.num_test,
                                     args.questions_per_image, args.expressions_per_image, vqa_levels=levels)
    for key, path in sorted(paths.items()):
        print(f"{key}\t{path}")
    return paths


if __name__ == "__main__":
    cli_main()
