"""Writing the synthetic task: OFA caption and SNLI-VE TSVs, meta JSONL, COCO references, CIDEr-D caches."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random

from data_utils.synthetic.config import SyntheticTaskConfig
from data_utils.synthetic.language import HYPOTHESIS_LEVELS, LABELS, caption_variants, make_hypothesis, make_premise
from data_utils.synthetic.scene import image_to_base64, render_scene, sample_scene
from mue_fairseq.metrics.cider import CIDER_EOS, save_document_frequency

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("uniq-id", "image-id", "caption", "predicted-object-labels", "image-base64")
SNLI_VE_COLUMNS = ("uniq-id", "image-id", "image-base64", "hypothesis", "caption", "label")


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
    ``caption_stage2_train`` (one row per training image with all its captions, OFA's SCST input),
    ``caption_{valid,test}_coco`` (COCO-format references), ``caption_valid_cider_df`` (CIDEr-D
    document frequencies of the valid references, JSON), ``cider_cached_{train,valid}`` (the same
    for train and valid in OFA's pickle layout, ``cider_cached_tokens/coco-{split}-words.p``, what
    OFA's ``--eval-cider-cached-tokens`` / ``--scst-cider-cached-tokens`` read) and ``info``.
    """
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
