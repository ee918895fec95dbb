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
from data_utils.synthetic.config import SyntheticTaskConfig
from data_utils.synthetic.writers import build_synthetic_task

__all__ = ["SyntheticTaskConfig", "build_synthetic_task"]
