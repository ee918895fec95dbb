"""Convert VQAv2 questions + annotations + COCO images into OFA's ``vqa_gen`` TSV and ``ans2label``.

Input: a VQAv2 questions JSON (``questions[]`` with ``question_id``, ``image_id``, ``question``, and
the file's ``data_subtype`` such as ``train2014``), its annotations JSON (``annotations[]`` with
``question_id`` and the human ``answers[].answer``), and the COCO image folder
(``<image-root>/COCO_<data_subtype>_<image_id:012d>.jpg`` by default, see ``--image-pattern``).

Output ``vqa_<split>.tsv`` in OFA's column order ``question-id, image-id, question, answers,
object-labels, image-base64`` (OFA reads it with ``--selected-cols 0,5,2,3,4``). The answers column
is ``conf|!+answer`` entries joined by ``&&``, highest confidence first. The confidence of an answer
is VQA's official accuracy of that answer against the human answers: min(1, matches/3) averaged over
the leave-one-out subsets of the (10) human answers, so 1, 2, 3, >=4 matches give 0.3, 0.6, 0.9, 1.0.
That is what OFA's data holds (its README's example row ``0.6|!+no``; OFA says it follows earlier
works' frequency-based scores, and LXMERT's preprocessed data has the same 0.3 / 0.6 / 0.9 steps),
not the plain min(1, count/3). Answers are normalised first as VQA's evaluation does
(`normalize_answer`: "Two." and "2" are one answer). The object-labels column is left empty (OFA's
VinVL labels are not part of VQAv2). Without annotations (test-dev, test) every row gets a placeholder
answer ``1.0|!+no``, as OFA's test TSV holds a dummy one.

``--rows-per-answer`` writes one row per distinct answer instead (OFA's training layout: "questions
with multiple golden answers become multiple training samples"), each weighted by its confidence.
``--ans2label PATH`` writes a pickle ``{answer: index}`` of the ``--num-answers`` most frequent human
answers (ties broken alphabetically), OFA's candidate set (``--ans2label-file``).

Bad rows (``--on-bad-row``): a question entry missing a field, a question with no annotation or no
non-empty answer, an answer holding OFA's separators, a missing or unreadable image; each is named by
file and question id in ``conversion_report.json``.

Usage: ``python -m data_utils.convert_vqa --questions v2_OpenEnded_mscoco_train2014_questions.json
--annotations v2_mscoco_train2014_annotations.json --image-root train2014 --split train --out-dir OUT``
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pickle
import re
from collections import Counter
from typing import Optional

from data_utils.conversion import (
    ON_BAD_ROW_CHOICES,
    ConversionReport,
    clean_text,
    encode_image_file,
    write_tsv_row,
)

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"
DEFAULT_NUM_ANSWERS = 3129  # the size of OFA's (and the VQA literature's) trainval_ans2label.pkl
ANSWER_SEPARATOR = "&&"
CONFIDENCE_SEPARATOR = "|!+"
# The answers column of questions without annotations (test-dev, test), a placeholder as in OFA's
# test TSV: the predictions, not the score, are what such a split is evaluated for.
TEST_PLACEHOLDER_ANSWER = "no"
LOG_EVERY = 50000


NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset(("a", "an", "the"))
# VQA's evaluation splits words at these (periods and apostrophes are handled apart)
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-<>@`,?!]")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


def normalize_answer(answer: str) -> str:
    """An answer as VQA's evaluation compares them (and OFA's candidate answers are written).

    Lower case; thousands separators and periods (not decimal points) dropped; other punctuation
    splits words; number words up to ten become digits; articles are dropped. VQA's table of
    contractions is not applied.
    """
    text = _THOUSANDS.sub("", answer.lower())
    text = _PUNCTUATION.sub(" ", _PERIOD.sub("", text))
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def answer_confidences(answers: list[str]) -> dict[str, float]:
    """VQA's official accuracy of each distinct answer against all human ``answers``.

    For an answer matching m of the n human answers: the mean, over the n subsets that leave one
    human answer out, of min(1, matches in the subset / 3).
    """
    n = len(answers)
    counts = Counter(answers)
    scores = {}
    for answer, m in counts.items():
        # m subsets drop a matching answer, n - m drop another one
        total = m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)
        scores[answer] = round(total / n, 4)
    return scores


def _load_list(path: str, key: str) -> tuple[dict, list]:
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    entries = document.get(key) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list (VQAv2 format)")
    return document, entries


def _annotation_answers(
    annotations_json: str, entries: list, report: ConversionReport
) -> tuple[dict[int, list[str]], dict[int, str]]:
    """question id -> normalised human answers, and question id -> why its annotation is unusable.

    Unusable annotations are reported when their question is converted (so a question is reported once).
    """
    answers: dict[int, list[str]] = {}
    problems: dict[int, str] = {}
    for j, entry in enumerate(entries):
        qid = entry.get("question_id") if isinstance(entry, dict) else None
        if not isinstance(qid, int):
            report.bad(annotations_json, f"annotations[{j}]", "missing field: 'question_id'")
            continue
        raw = entry.get("answers")
        texts = [a.get("answer") for a in raw if isinstance(a, dict)] if isinstance(raw, list) else []
        texts = [normalize_answer(t) for t in texts if isinstance(t, str)]
        texts = [t for t in texts if t]
        odd = [t for t in texts if ANSWER_SEPARATOR in t or CONFIDENCE_SEPARATOR in t]
        if not texts:
            problems[qid] = "question with no answer: empty 'answers'"
        elif odd:
            problems[qid] = f"answer contains OFA's separator '&&' or '|!+': {odd[0]!r}"
        else:
            answers[qid] = texts
    return answers, problems


def build_ans2label(answers: dict[int, list[str]], num_answers: int) -> dict[str, int]:
    """The ``num_answers`` most frequent human answers -> label, most frequent first."""
    counts = Counter(a for texts in answers.values() for a in texts)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:num_answers]
    return {answer: i for i, (answer, _) in enumerate(ranked)}


def convert_vqa(
    questions_json: str,
    annotations_json: Optional[str],
    image_root: str,
    out_dir: str,
    split: str = "train",
    on_bad_row: str = "fail",
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
    rows_per_answer: bool = False,
    ans2label_path: Optional[str] = None,
    num_answers: int = DEFAULT_NUM_ANSWERS,
    max_side: Optional[int] = None,
    limit: Optional[int] = None,
) -> ConversionReport:
    """Convert one VQAv2 questions/annotations pair into ``<out_dir>/vqa_<split>.tsv``; see the module docstring."""
    report = ConversionReport(on_bad_row=on_bad_row)
    if num_answers < 1:
        raise ValueError(f"num_answers must be positive, got {num_answers}")
    questions_doc, questions = _load_list(questions_json, "questions")
    if annotations_json is None:  # test-dev / test: no answers are published
        if ans2label_path is not None:
            raise ValueError("--ans2label needs --annotations: the candidate answers are counted from them")
        annotations = []
    else:
        _, annotations = _load_list(annotations_json, "annotations")
    subtype = questions_doc.get("data_subtype", "")
    if "{subtype}" in image_pattern and not subtype:
        raise ValueError(f"{questions_json}: no 'data_subtype' to fill --image-pattern {image_pattern!r}")
    answers, problems = _annotation_answers(annotations_json, annotations, report)
    os.makedirs(out_dir, exist_ok=True)
    out_name = f"vqa_{split}.tsv"

    @functools.lru_cache(maxsize=256)
    def image_base64(image_path: str) -> str:
        return encode_image_file(image_path, max_side)

    converted = 0
    with open(os.path.join(out_dir, out_name), "w", encoding="utf-8", newline="\n") as out:
        for i, entry in enumerate(questions):
            if limit is not None and converted >= limit:
                break
            missing = [k for k in ("question_id", "image_id", "question") if not isinstance(entry, dict)
                       or entry.get(k) in (None, "")]
            if missing:
                report.bad(questions_json, f"questions[{i}]", f"missing field: {missing}")
                continue
            qid, image_id = int(entry["question_id"]), int(entry["image_id"])
            where = f"question_id {qid}"
            question = clean_text(str(entry["question"]))
            if not question:
                report.bad(questions_json, where, "missing field: empty 'question'")
                continue
            if annotations_json is not None and qid in problems:
                report.bad(annotations_json, where, problems[qid])
                continue
            if annotations_json is not None and qid not in answers:
                report.bad(annotations_json, where, "question with no answer: no annotation")
                continue
            image_path = os.path.join(image_root, image_pattern.format(subtype=subtype, image_id=image_id))
            try:
                image_b64 = image_base64(image_path)
            except FileNotFoundError:
                report.bad(questions_json, where, f"missing image: {image_path}")
                continue
            except OSError as e:
                report.bad(questions_json, where, str(e))
                continue
            if annotations_json is None:
                scored = [(TEST_PLACEHOLDER_ANSWER, 1.0)]
            else:
                scored = sorted(answer_confidences(answers[qid]).items(), key=lambda item: (-item[1], item[0]))
            cells = [f"{conf!r}{CONFIDENCE_SEPARATOR}{answer}" for answer, conf in scored]
            groups = [[c] for c in cells] if rows_per_answer else [cells]
            for group in groups:
                write_tsv_row(out, [qid, image_id, question, ANSWER_SEPARATOR.join(group), "", image_b64])
                report.count_written(out_name)
            converted += 1
            if converted % LOG_EVERY == 0:
                logger.info("%s: %d questions converted", out_name, converted)

    if ans2label_path is not None:
        ans2label = build_ans2label(answers, num_answers)
        os.makedirs(os.path.dirname(os.path.abspath(ans2label_path)), exist_ok=True)
        with open(ans2label_path, "wb") as f:
            pickle.dump(ans2label, f)
        logger.info("wrote %d candidate answers to %s", len(ans2label), ans2label_path)
    report.save(os.path.join(out_dir, "conversion_report.json"))
    report.log_summary()
    return report


def cli_main(argv: list[str] | None = None) -> ConversionReport:
    parser = argparse.ArgumentParser(description="VQAv2 questions + annotations + COCO images -> OFA vqa_gen TSV")
    parser.add_argument("--questions", required=True, help="VQAv2 questions JSON (v2_OpenEnded_mscoco_*_questions.json)")
    parser.add_argument("--annotations", default=None,
                        help="VQAv2 annotations JSON (v2_mscoco_*_annotations.json); without it (test-dev, test) "
                             f"every question gets the placeholder answer 1.0|!+{TEST_PLACEHOLDER_ANSWER}")
    parser.add_argument("--image-root", required=True, help="COCO image folder of the questions' data_subtype")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--split", default="train", help="output name: <out-dir>/vqa_<split>.tsv")
    parser.add_argument("--on-bad-row", default="fail", choices=ON_BAD_ROW_CHOICES,
                        help="fail on the first bad question, or skip it and list it in the report")
    parser.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN,
                        help="image file name under --image-root; {subtype} and {image_id} are filled in")
    parser.add_argument("--rows-per-answer", action="store_true",
                        help="one row per distinct answer (OFA's training layout) instead of one per question")
    parser.add_argument("--ans2label", default=None, help="also write the candidate answers pickle here")
    parser.add_argument("--num-answers", type=int, default=DEFAULT_NUM_ANSWERS,
                        help="how many of the most frequent answers --ans2label keeps")
    parser.add_argument("--max-side", type=int, default=None,
                        help="downscale images whose longer side exceeds this (re-encoded as JPEG)")
    parser.add_argument("--limit", type=int, default=None, help="convert at most this many questions")
    args = parser.parse_args(argv)
    return convert_vqa(
        args.questions, args.annotations, args.image_root, args.out_dir, args.split, args.on_bad_row,
        args.image_pattern, args.rows_per_answer, args.ans2label, args.num_answers, args.max_side, args.limit,
    )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
