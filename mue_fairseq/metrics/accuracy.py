"""SNLI-VE accuracy from predictions and gold labels, overall, per class and per group.

Predictions may use OFA's answer words (``yes``/``no``/``maybe``, as in OFA's SNLI-VE results
``[{"uniq_id": ..., "answer": ...}]``) or the label words (``entailment``/``contradiction``/
``neutral``); both map to the label words. Groups (e.g. the synthetic task's per-row difficulty)
give one accuracy per group value.

Command line: ``python -m mue_fairseq.metrics.accuracy --predictions results.json --tsv
snli_ve_test.tsv [--meta snli_ve_test.meta.jsonl --group-key difficulty] [--output acc.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from typing import Hashable, Mapping, Optional

logger = logging.getLogger(__name__)

ANSWER_TO_LABEL = {
    "yes": "entailment",
    "no": "contradiction",
    "maybe": "neutral",
    "entailment": "entailment",
    "contradiction": "contradiction",
    "neutral": "neutral",
}
SNLI_VE_LABEL_COLUMN = 5


def normalize_answer(answer: str) -> str:
    """Map an answer or label word (any case, surrounding spaces allowed) to its SNLI-VE label."""
    key = answer.strip().lower()
    if key not in ANSWER_TO_LABEL:
        raise ValueError(f"unknown SNLI-VE answer {answer!r}; expected one of {sorted(ANSWER_TO_LABEL)}")
    return ANSWER_TO_LABEL[key]


def snli_ve_accuracy(
    predictions: Mapping[Hashable, str],
    labels: Mapping[Hashable, str],
    groups: Optional[Mapping[Hashable, Hashable]] = None,
) -> dict:
    """Accuracy of ``predictions`` against ``labels`` (keys compared as strings; every label needs a prediction).

    Returns ``{"accuracy": float, "count": int, "per_class": {label: acc}, ["per_group": {group: acc},
    "group_counts": {group: n}]}``.
    """
    preds = {str(k): normalize_answer(v) for k, v in predictions.items()}
    golds = {str(k): normalize_answer(v) for k, v in labels.items()}
    if len(preds) != len(predictions) or len(golds) != len(labels):
        raise ValueError("ids collide when compared as strings")
    if not golds:
        raise ValueError("no labels to score against")
    missing = sorted(set(golds) - set(preds))
    extra = sorted(set(preds) - set(golds))
    if missing or extra:
        raise KeyError(f"prediction ids differ from label ids (missing: {missing[:5]}, unknown: {extra[:5]})")
    group_of = None
    if groups is not None:
        group_of = {str(k): v for k, v in groups.items()}
        absent = sorted(set(golds) - set(group_of))
        if absent:
            raise KeyError(f"{len(absent)} ids have no group, e.g. {absent[:5]}")

    correct = {k: preds[k] == gold for k, gold in golds.items()}
    result: dict = {"accuracy": sum(correct.values()) / len(correct), "count": len(correct)}
    per_class: dict[str, list[bool]] = defaultdict(list)
    for k, gold in golds.items():
        per_class[gold].append(correct[k])
    result["per_class"] = {c: sum(v) / len(v) for c, v in sorted(per_class.items())}
    if group_of is not None:
        per_group: dict[Hashable, list[bool]] = defaultdict(list)
        for k in golds:
            per_group[group_of[k]].append(correct[k])
        result["per_group"] = {g: sum(v) / len(v) for g, v in sorted(per_group.items(), key=lambda x: str(x[0]))}
        result["group_counts"] = {g: len(v) for g, v in sorted(per_group.items(), key=lambda x: str(x[0]))}
    return result


def load_snli_ve_labels(tsv_path: str) -> dict[str, str]:
    """``{uniq-id: label}`` from an OFA SNLI-VE TSV (columns uniq-id, image-id, image, hypothesis, caption, label)."""
    labels: dict[str, str] = {}
    with open(tsv_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) <= SNLI_VE_LABEL_COLUMN:
                raise ValueError(f"{tsv_path}:{line_no}: expected 6 columns, found {len(cols)}")
            if cols[0] in labels:
                raise ValueError(f"{tsv_path}:{line_no}: repeated uniq-id {cols[0]!r}")
            labels[cols[0]] = cols[SNLI_VE_LABEL_COLUMN]
    return labels


def load_snli_ve_predictions(json_path: str) -> dict[str, str]:
    """``{uniq_id: answer}`` from OFA's SNLI-VE results file ``[{"uniq_id": ..., "answer": ...}]``."""
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of {{'uniq_id', 'answer'}} objects")
    preds: dict[str, str] = {}
    for n, item in enumerate(data):
        if not isinstance(item, dict) or "uniq_id" not in item or not isinstance(item.get("answer"), str):
            raise ValueError(f"{json_path}: entry [{n}] needs 'uniq_id' and a string 'answer'")
        key = str(item["uniq_id"])
        if key in preds:
            raise ValueError(f"{json_path}: entry [{n}] repeats uniq_id {key!r}")
        preds[key] = item["answer"]
    return preds


def cli_main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="SNLI-VE accuracy of OFA-style predictions")
    parser.add_argument("--predictions", required=True, help='JSON list of {"uniq_id", "answer"}')
    parser.add_argument("--tsv", required=True, help="SNLI-VE TSV holding the gold labels")
    parser.add_argument("--meta", default=None, help="JSONL with uniq_id and a group key per row")
    parser.add_argument("--group-key", default="difficulty", help="meta field to group accuracies by")
    parser.add_argument("--output", default=None, help="write the result here as JSON")
    args = parser.parse_args(argv)
    groups = None
    if args.meta:
        groups = {}
        with open(args.meta, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                record = json.loads(line)
                if "uniq_id" not in record or args.group_key not in record:
                    raise ValueError(f"{args.meta}:{line_no}: needs 'uniq_id' and {args.group_key!r}")
                groups[str(record["uniq_id"])] = record[args.group_key]
    result = snli_ve_accuracy(load_snli_ve_predictions(args.predictions), load_snli_ve_labels(args.tsv), groups)
    logger.info("accuracy %.4f on %d rows", result["accuracy"], result["count"])
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
