"""Caption content of the built-in synthetic task (``data_utils/synthetic``): its words and its meta files.

The task's scenes are drawn from this vocabulary; the generator (``data_utils``) imports it from
here, so the plugin's metrics, the backbone pre-training and the generator read the same words
without the plugin depending on ``data_utils``.
"""
import json
import re

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Colour words, in the generator's order (its RGB values live with the renderer).
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# The colour word of a shape drawn as an outline only.
HOLLOW = "hollow"
# Scenes place shapes on a GRID x GRID grid of cells.
GRID = 3


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


_COLOURED_SHAPE = re.compile(r"\b(" + "|".join(sorted(COLOR_WORDS) + [HOLLOW]) + r") (" + "|".join(SHAPES) + r")\b")


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


