"""Official COCO caption scores through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE.

Texts go through pycocoevalcap's PTB tokenizer (Java), as in OFA's ``run_scripts/caption/coco_eval.py``
(COCOEvalCap); the score names are COCOEvalCap's (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
``CIDEr``, ``SPICE``). SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use;
this module never triggers that download: SPICE runs only when the jars are already installed.

Command line: ``python -m mue_fairseq.metrics.caption_scores --references ref_coco_format.json
--predictions results.json [--output scores.json]``; predictions are OFA's
``[{"image_id": ..., "caption": ...}]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from typing import Hashable, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
SCORE_NAMES = BLEU_NAMES + ("METEOR", "ROUGE_L", "CIDEr")
SCORERS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_jars_missing() -> list[str]:
    """Paths of the CoreNLP jars SPICE needs that are not installed (empty list: SPICE can run)."""
    try:
        import pycocoevalcap.spice as spice_pkg
    except ImportError:
        return ["pycocoevalcap.spice"]
    lib = os.path.join(os.path.dirname(os.path.abspath(spice_pkg.__file__)), "lib")
    return [os.path.join(lib, jar) for jar in SPICE_CORENLP_JARS if not os.path.isfile(os.path.join(lib, jar))]


def _check_inputs(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    allow_missing: bool,
) -> dict[str, Hashable]:
    """Validate ids and texts; returns the str(id) -> original id map of the images to score."""
    ref_keys = {str(k): k for k in references}
    pred_keys = {}
    for key, caption in predictions.items():
        skey = str(key)
        if skey in pred_keys:
            raise ValueError(f"two predictions for image id {skey!r} (ids are compared as strings)")
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image id {key!r} is {type(caption).__name__}, expected str")
        pred_keys[skey] = key
    if not pred_keys:
        raise ValueError("no predictions to score")
    unknown = sorted(set(pred_keys) - set(ref_keys))
    if unknown:
        raise KeyError(f"{len(unknown)} predicted image ids have no references, e.g. {unknown[:5]}")
    missing = sorted(set(ref_keys) - set(pred_keys))
    if missing:
        if not allow_missing:
            raise KeyError(
                f"{len(missing)} reference images have no prediction, e.g. {missing[:5]} "
                "(pass allow_missing=True to score only the predicted images)"
            )
        logger.warning("%d reference images have no prediction; scoring the %d predicted ones",
                       len(missing), len(pred_keys))
    for skey in pred_keys:
        refs = references[ref_keys[skey]]
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references of image id {skey!r} must be a non-empty list of strings")
    return pred_keys


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: Optional[bool] = None,
    allow_missing: bool = False,
    return_per_image: bool = False,
    scorers: Sequence[str] = SCORERS,
):
    """COCO caption scores of one predicted caption per image.

    Args:
        predictions: image id -> predicted caption. Ids are matched to the references as strings.
        references: image id -> reference captions.
        spice: True requires SPICE (error if its jars are missing), False skips it, None runs it
            only when its jars are installed (otherwise logs once that it is skipped).
        allow_missing: score only the predicted images when some references have no prediction.
        return_per_image: also return ``{score name: {image id: score}}``.
        scorers: subset of :data:`SCORERS` to run (METEOR's Java start-up takes seconds).

    Returns:
        ``{"Bleu_1": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ..., ["SPICE": ...]}``
        as fractions (CIDEr is not multiplied by 100), optionally with the per-image scores.
    """
    unknown = set(scorers) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown scorers {sorted(unknown)}; choose from {SCORERS}")
    keys = _check_inputs(predictions, references, allow_missing)
    run_spice = _resolve_spice(spice)
    if not java_available():
        raise RuntimeError("caption scores need Java (pycocoevalcap's PTB tokenizer and METEOR); `java` not found")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ref_keys = {str(k): k for k in references}
    ids = sorted(keys)
    gts_raw = {i: [{"caption": c} for c in references[ref_keys[i]]] for i in ids}
    res_raw = {i: [{"caption": predictions[keys[i]]}] for i in ids}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(gts_raw)
    res = _tokenize_hypotheses(tokenizer, res_raw)

    # An empty hypothesis matches nothing; ROUGE-L divides by its length, so those images are
    # scored 0 for it directly and left out of the scorer call.
    nonempty = [i for i in ids if res[i][0].strip()]
    if len(nonempty) < len(ids):
        logger.warning("%d predictions are empty after tokenization; they score 0", len(ids) - len(nonempty))

    scores: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {}

    if "Bleu" in scorers:
        bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
        for n, name in enumerate(BLEU_NAMES):
            scores[name] = float(bleu[n])
            per_image[name] = {i: float(s) for i, s in zip(gts.keys(), bleu_per_image[n])}

    if "METEOR" in scorers:
        meteor = Meteor()
        try:
            scores["METEOR"], meteor_per_image = meteor.compute_score(gts, res)
        finally:
            _close_meteor(meteor)
        per_image["METEOR"] = {i: float(s) for i, s in zip(gts.keys(), meteor_per_image)}

    if "ROUGE_L" in scorers:
        rouge_per_image = {i: 0.0 for i in ids}
        if nonempty:
            _, rouge_values = Rouge().compute_score({i: gts[i] for i in nonempty}, {i: res[i] for i in nonempty})
            rouge_per_image.update({i: float(s) for i, s in zip(nonempty, rouge_values)})
        scores["ROUGE_L"] = sum(rouge_per_image.values()) / len(ids)
        per_image["ROUGE_L"] = rouge_per_image

    if "CIDEr" in scorers:
        cider, cider_per_image = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(cider)
        per_image["CIDEr"] = {i: float(s) for i, s in zip(gts.keys(), cider_per_image)}

    if run_spice:
        from pycocoevalcap.spice.spice import Spice

        spice_score, spice_per_image = Spice().compute_score(gts, res)
        scores["SPICE"] = float(spice_score)
        per_image["SPICE"] = {i: float(s["All"]["f"]) for i, s in zip(sorted(gts.keys()), spice_per_image)}

    scores = {k: float(v) for k, v in scores.items()}
    if return_per_image:
        return scores, {name: {keys[i]: v for i, v in vals.items()} for name, vals in per_image.items()}
    return scores


def _resolve_spice(spice: Optional[bool]) -> bool:
    if spice is False:
        return False
    missing = spice_jars_missing()
    if not missing:
        return True
    message = (
        "SPICE skipped: its Stanford CoreNLP jars are not installed (missing: "
        + ", ".join(missing)
        + "); pycocoevalcap would download them, which this code never does"
    )
    if spice:
        raise RuntimeError(message)
    logger.info(message)
    return False


def _tokenize_hypotheses(tokenizer, res_raw: dict[str, list[dict]]) -> dict[str, list[str]]:
    """PTB-tokenize hypotheses; empty ones stay empty (the tokenizer would drop their lines)."""
    nonempty = {k: v for k, v in res_raw.items() if v[0]["caption"].strip()}
    res = tokenizer.tokenize(nonempty) if nonempty else {}
    if set(res) != set(nonempty):
        raise RuntimeError("PTB tokenizer returned a different set of images than it was given")
    return {k: res.get(k, [""]) for k in res_raw}


def _close_meteor(meteor) -> None:
    """Stop METEOR's Java subprocess now, also after a failed call that left its lock held."""
    if meteor.lock.locked():
        meteor.lock.release()
    proc = meteor.meteor_p
    with meteor.lock:
        proc.stdin.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def load_coco_references(path: str) -> dict[str, list[str]]:
    """Reference captions of a COCO-format caption file: ``{str(image_id): [caption, ...]}``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO-format caption file (no 'annotations' list)")
    refs: dict[str, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{path}: annotations[{n}] needs 'image_id' and a string 'caption'")
        refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    image_ids = {str(img["id"]) for img in data.get("images", []) if isinstance(img, dict) and "id" in img}
    without_refs = sorted(image_ids - set(refs))
    if without_refs:
        logger.warning("%s: %d images have no reference captions, e.g. %s", path, len(without_refs), without_refs[:5])
    return refs


def load_predictions(path: str) -> dict[str, str]:
    """OFA-style caption predictions ``[{"image_id": ..., "caption": ...}]`` as ``{str(image_id): caption}``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} objects")
    preds: dict[str, str] = {}
    for n, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise ValueError(f"{path}: entry [{n}] needs 'image_id' and a string 'caption'")
        key = str(item["image_id"])
        if key in preds:
            raise ValueError(f"{path}: entry [{n}] repeats image_id {key!r}")
        preds[key] = item["caption"]
    return preds


def score_caption_files(
    reference_json: str,
    predictions_json: str,
    output_json: Optional[str] = None,
    spice: Optional[bool] = None,
    allow_missing: bool = False,
) -> dict[str, float]:
    """Score an OFA predictions file against a COCO-format reference file; optionally write JSON."""
    scores = score_captions(
        load_predictions(predictions_json), load_coco_references(reference_json), spice=spice,
        allow_missing=allow_missing,
    )
    for name, value in scores.items():
        logger.info("%s: %.4f", name, value)
    if output_json is not None:
        with open(output_json, "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=1, sort_keys=True)
    return scores


def cli_main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="COCO caption scores (pycocoevalcap) of OFA predictions")
    parser.add_argument("--references", required=True, help="COCO-format reference JSON")
    parser.add_argument("--predictions", required=True, help='JSON list of {"image_id", "caption"}')
    parser.add_argument("--output", default=None, help="write the scores here as JSON")
    parser.add_argument("--spice", choices=("auto", "on", "off"), default="auto",
                        help="auto: run SPICE only if its CoreNLP jars are installed")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score only predicted images when some references have no prediction")
    args = parser.parse_args(argv)
    spice = {"auto": None, "on": True, "off": False}[args.spice]
    return score_caption_files(args.references, args.predictions, args.output, spice, args.allow_missing)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
