"""MuE against the other exit policies on the built-in task, at batch 1 and 16, in the paper's form.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_exit_policies.py --markdown BENCHMARKS.md

1. Models: the quickstart's (same work dir layout, same training command), trained here unless
   `--work-dir` already holds them: a 6+6-layer OFA-architecture model per task, fine-tuned with
   the layer-wise loss on the synthetic task (`data_utils/synthetic/`).
2. Policies, each with its knob swept, on one loaded model per task (options changed in place):
   full depth; static depth k/N for every stream and token (the smaller-model baseline); entropy
   (DeeBERT), patience (PABEE) and softmax confidence (CALM) on decoder tokens with the encoder at
   full depth; MuE's similarity exits, two ways: image, text and decoder thresholds moved
   together, and the decoder threshold alone with both encoder streams at full depth (the
   thresholds are separate knobs in MuE; the second way compares it with the prediction-based
   policies at the same encoder depth).
3. Every setting is evaluated on the first `--max-samples` rows of the test split, at each batch
   size, and timed (model only, device synchronised) in `--repeats` rounds: each round runs every
   setting once, full depth first, and full depth runs once more after the last round. Each
   setting keeps its fastest time, so a speed-up is a ratio of two best-of-N times taken in the
   same process, interleaved, and a slow minute of the machine does not favour one setting.
   Entailment uses OFA's protocol for every policy: the three answers scored in one
   teacher-forced pass, a sample's candidates stopping together; entropy, patience and confidence
   judge the prediction of the first answer token.
   VQA and grounding (`--tasks vqa_gen_allcand,vqa_gen_beamsearch,refcoco`) run on the built-in VQA /
   grounding data (`data_utils/synthetic_vqa_grounding.py`), with models trained by the tasks' run
   scripts (`run_scripts/vqa/train_vqa_mue.sh`, `run_scripts/refcoco/train_refcoco_mue.sh`; the
   quickstart's small model, `--reuse-checkpoints` to insist on the ones already trained). vqa_gen is
   evaluated both ways OFA does: allcand (the candidates of a question stop together; the
   prediction-based policies judge the first answer token) and beamsearch (exits per token).
   Their tables add trivial baselines, the score per question / expression level, and for
   grounding the exit depth of each box token (x0, y0, x1, y1) and the IoU the exits cost.
4. Output in `--out-dir` (file names from `--name`): `exit_policies.csv` (one row per task, batch, policy and knob),
   `exit_policies_fronts.png` (quality vs measured speed-up, Pareto front per policy),
   `exit_policies.json`, and with `--markdown` the tables in BENCHMARKS.md: for each policy (and
   each of MuE's two ways) the fastest setting that keeps the target (99% of full-depth accuracy,
   96% of CIDEr-D), chosen on the same rows it is reported on (the same oracle choice for every
   policy), plus static half depth (the "does the task need depth" check: it must lose >= 5
   points).
"""
import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from markdown_section import update_section  # noqa: E402  (benchmarks/, beside this script)
from mue_fairseq.exits.selection import keeps_target, pareto_front  # noqa: E402

logger = logging.getLogger("bench_exit_policies")

SECTION_HEADING = "## Exit policies compared: MuE, static depth, entropy, patience, confidence"
SECTION_BEGIN = "<!-- bench_exit_policies:begin -->"
SECTION_END = "<!-- bench_exit_policies:end -->"
TARGETS = {"snli_ve": 0.99, "caption": 0.96}
# The speed-up targets at those qualities, and the share of the batch-1 gain batch 16 must keep.
TARGET_SPEEDUPS = {"snli_ve": 2.0, "caption": 1.7}
TARGET_GAIN_KEPT = 0.8
NEEDS_DEPTH_POINTS = 5.0

# Every evaluation sets all of these (unset knobs back to "off"), so no setting leaks into the next.
NEUTRAL = {
    "mue_exit_policy": "similarity", "mue_image_threshold": 1.0, "mue_text_threshold": 1.0,
    "mue_decoder_threshold": 1.0, "mue_static_image_layers": 0, "mue_static_text_layers": 0,
    "mue_static_decoder_layers": 0, "mue_entropy_threshold": 0.0, "mue_confidence_threshold": 1.0,
    "mue_patience": 0,
}
POLICIES = ("full depth", "static", "entropy", "patience", "confidence", "MuE")
POLICY_TITLES = {
    "full depth": "full depth (OFA)", "static": "static depth (smaller model)", "entropy": "entropy (DeeBERT)",
    "patience": "patience (PABEE)", "confidence": "confidence (CALM)", "MuE": "MuE (similarity)",
}


# VQA and grounding on the built-in scenes (`data_utils/synthetic_vqa_grounding.py`): trained with the
# tasks' run scripts, OFA-Base's recipe with the quickstart's small model. vqa_gen is benchmarked in
# both of OFA's inference modes on the same model.
VG_TASKS = {
    "vqa_gen_allcand": {"task": "vqa_gen", "script": "run_scripts/vqa/train_vqa_mue.sh", "prefix": "vqa_gen",
                        "selected_cols": "0,5,2,3,4", "eval_args": []},
    "vqa_gen_beamsearch": {"task": "vqa_gen", "script": "run_scripts/vqa/train_vqa_mue.sh", "prefix": "vqa_gen",
                           "selected_cols": "0,5,2,3,4",
                           "eval_args": ["--beam-search-vqa-eval", "--beam", "5", "--unnormalized",
                                         "--temperature", "1.0"]},
    "refcoco": {"task": "refcoco", "script": "run_scripts/refcoco/train_refcoco_mue.sh", "prefix": "refcoco",
                "selected_cols": "0,4,2,3",
                "eval_args": ["--beam", "5", "--min-len", "4", "--max-len-a", "0", "--max-len-b", "4"]},
}
TARGETS.update({"vqa_gen_allcand": 0.99, "vqa_gen_beamsearch": 0.99, "refcoco": 0.99})


def static_depth_options(depth: int) -> Dict:
    """Options truncating every stream (image, text, each decoder token) at `depth` layers."""
    return {"mue_exit_policy": "static", "mue_static_image_layers": depth, "mue_static_text_layers": depth,
            "mue_static_decoder_layers": depth}


def policy_settings(num_layers: int, entropies: Sequence[float], patiences: Sequence[int],
                    confidences: Sequence[float], similarities: Sequence[float],
                    decoder_similarities: Sequence[float] = ()) -> List[Dict]:
    """(policy, knob label, knob value, options) of every point of the sweep."""
    points = [{"policy": "full depth", "knob": "-", "value": "", "options": {}}]
    for depth in range(num_layers - 1, 1, -1):
        points.append({"policy": "static", "knob": "layers", "value": depth, "options": static_depth_options(depth)})
    for value in entropies:
        points.append({"policy": "entropy", "knob": "max entropy (nats)", "value": value,
                       "options": {"mue_exit_policy": "entropy", "mue_entropy_threshold": value}})
    for value in patiences:
        points.append({"policy": "patience", "knob": "patience", "value": value,
                       "options": {"mue_exit_policy": "patience", "mue_patience": value}})
    for value in confidences:
        points.append({"policy": "confidence", "knob": "min top probability", "value": value,
                       "options": {"mue_exit_policy": "confidence", "mue_confidence_threshold": value}})
    for value in similarities:
        points.append({"policy": "MuE", "knob": "threshold (img = txt = dec)", "value": value, "options": {
            "mue_image_threshold": value, "mue_text_threshold": value, "mue_decoder_threshold": value}})
    for value in decoder_similarities:  # the encoder thresholds stay at 1 (NEUTRAL): full-depth streams
        points.append({"policy": "MuE", "knob": "decoder threshold (img = txt = 1)", "value": value,
                       "options": {"mue_decoder_threshold": value}})
    return points


def vg_data_dir(work: Path, vqa_levels: Sequence[int]) -> Path:
    """Where the built-in VQA and grounding TSVs of these question levels live in `work`."""
    from data_utils.synthetic_vqa_grounding import DEFAULT_VQA_LEVELS

    if tuple(vqa_levels) == DEFAULT_VQA_LEVELS:
        return work / "data_vqa_grounding"
    return work / ("data_vqa_grounding_levels_" + "".join(map(str, vqa_levels)))


def vg_data(work: Path, num_train: int, vqa_levels: Sequence[int]) -> Path:
    """The built-in VQA and grounding TSVs in `work` (written when absent)."""
    from data_utils.synthetic_vqa_grounding import build_vqa_grounding_task

    data_dir = vg_data_dir(work, vqa_levels)
    if not (data_dir / "vqa_ans2label.pkl").exists():
        build_vqa_grounding_task(str(data_dir), seed=1, num_train=num_train, num_valid=200, num_test=300,
                                 questions_per_image=2, expressions_per_image=2, vqa_levels=vqa_levels)
    return data_dir


def vg_train_environment(bench_task: str, data_dir: Path, save_dir: Path, updates: int, batch_size: int,
                         bpe_dir: str, backbone_args: Sequence[str],
                         max_image_size: Optional[int] = None) -> Dict[str, str]:
    """The run script's variables for the quickstart's small model on the built-in data: OFA's
    recipe (layer-wise loss, drop-path, label smoothing) with a from-scratch model's learning rate,
    no restore file, a fixed number of updates and no validation (the benchmark evaluates)."""
    from mue_fairseq.cli import quickstart

    spec = VG_TASKS[bench_task]
    model_args = list(quickstart.MODEL_ARGS)
    arch = model_args[model_args.index("--arch") + 1]
    del model_args[model_args.index("--arch"):model_args.index("--arch") + 2]
    size = model_args[model_args.index("--patch-image-size") + 1]
    # the run scripts schedule by --warmup-ratio over --max-epoch (OFA's way); these runs are counted in
    # updates, so the ratio is off and the schedule is given in updates
    extra = model_args + ["--max-update", str(updates), "--total-num-update", str(updates),
                          "--warmup-updates", str(max(updates // 10, 1)), "--disable-validation", "--no-epoch-checkpoints",
                          "--sampled-intermediate-layers", "2", "--seed", "1", *backbone_args]
    env = {
        "arch": arch, "restore_file": "", "lr": "1e-3", "batch_size": str(batch_size), "update_freq": "1",
        "max_epoch": "100", "warmup_ratio": "0",
        "patch_image_size": size, "bpe_dir": bpe_dir, "save_path": str(save_dir), "log_dir": str(save_dir),
        "log_file": str(save_dir / "train.log"), "selected_cols": spec["selected_cols"],
        "data": f"{data_dir / (spec['prefix'] + '_train.tsv')},{data_dir / (spec['prefix'] + '_valid.tsv')}",
        "MASTER_PORT": "6053" if spec["task"] == "refcoco" else "8316",  # both may train at once
    }
    if spec["task"] == "vqa_gen":
        # from scratch: train the embeddings (OFA freezes its pre-trained ones); no EMA, no object labels
        env.update({"ans2label_file": str(data_dir / "vqa_ans2label.pkl"), "uses_ema": "0", "add_object": "0",
                    "freeze_embeddings": "0"})
    else:  # boxes are quantised relative to --max-image-size (default the resized image's side, as OFA's 512 / 512)
        extra += ["--max-image-size", str(max_image_size or size)]
    env["extra_args"] = " ".join(extra)
    return env


def vg_train(bench_task: str, work: Path, data_dir: Path, bpe_dir: str, args) -> Path:
    """Train (or reuse) the model of a VQA / grounding bench task with its run script."""
    import subprocess

    from mue_fairseq.cli import quickstart

    spec = VG_TASKS[bench_task]
    backbone = quickstart.pretrain_backbone(work, work / "data", args.pretrain_backbone_steps)
    save_dir = work / f"checkpoints_{spec['task']}_{args.updates}"
    if spec["task"] == "vqa_gen" and data_dir.name != "data_vqa_grounding":  # other question levels
        save_dir = save_dir.with_name(save_dir.name + data_dir.name[len("data_vqa_grounding"):])
    max_image_size = getattr(args, "grounding_max_image_size", None)
    if spec["task"] == "refcoco" and max_image_size:  # other location-token bins: another model
        save_dir = save_dir.with_name(save_dir.name + f"_maxsize{max_image_size}")
    if args.freeze_encoder_layers_updates > 0:  # the picture survives the encoder's first updates
        backbone = backbone + quickstart.hold_encoder(args.freeze_encoder_layers_updates)
        save_dir = save_dir.with_name(save_dir.name + f"_hold{args.freeze_encoder_layers_updates}")
    if args.finetune_from_model:  # OFA's way: start from a model that already reads the pictures
        import hashlib

        backbone = backbone + ["--finetune-from-model", args.finetune_from_model]
        save_dir = save_dir.with_name(save_dir.name + "_from_"
                                      + hashlib.sha1(args.finetune_from_model.encode()).hexdigest()[:8])
    checkpoint, done = save_dir / "checkpoint_last.pt", save_dir / f"trained_{args.updates}_updates"
    if done.exists() and checkpoint.exists():
        logger.info("%s: reusing %s", spec["task"], checkpoint)
        return checkpoint
    if args.reuse_checkpoints:
        raise FileNotFoundError(f"--reuse-checkpoints: no trained {spec['task']} model in {save_dir} "
                                f"(train it first: the same command without --reuse-checkpoints)")
    save_dir.mkdir(parents=True, exist_ok=True)
    env = vg_train_environment(bench_task, data_dir, save_dir, args.updates, args.train_batch_size, bpe_dir, backbone,
                               max_image_size if spec["task"] == "refcoco" else None)
    env_line = " ".join(f"{k}={v!r}" if " " in v or not v else f"{k}={v}" for k, v in env.items())
    logger.info("%s: training %d updates: %s bash %s", spec["task"], args.updates, env_line, spec["script"])
    (save_dir / "train_command.txt").write_text(f"{env_line} bash {spec['script']}\n")
    subprocess.run(["bash", str(REPO / spec["script"])], check=True, cwd=REPO,
                   env={**os.environ, "PYTHON": sys.executable, **env})
    done.touch()
    return checkpoint


def vg_load(bench_task: str, checkpoint: Path, data_dir: Path, bpe_dir: str, batch_size: int):
    """(models, task, cfg) of a VQA / grounding bench task, evaluated as OFA's scripts do."""
    from fairseq import options

    from mue_fairseq.cli.evaluate import add_mue_arguments, load_for_evaluation

    spec = VG_TASKS[bench_task]
    parser = options.get_generation_parser()
    add_mue_arguments(parser)
    overrides = {"bpe_dir": bpe_dir, "selected_cols": spec["selected_cols"]}
    if spec["task"] == "vqa_gen":
        overrides.update({"ans2label_file": str(data_dir / "vqa_ans2label.pkl"), "valid_batch_size": 20})
    argv = [str(data_dir / f"{spec['prefix']}_valid.tsv"), "--path", str(checkpoint), "--user-dir",
            str(REPO / "mue_fairseq"), "--task", spec["task"], "--batch-size", str(batch_size), "--cpu",
            "--log-format", "none", "--num-workers", "0", "--model-overrides", json.dumps(overrides),
            *spec["eval_args"]]
    return load_for_evaluation(options.parse_args_and_arch(parser, argv))


BOX_POSITIONS = ("x0", "y0", "x1", "y1", "eos")
# The question / expression levels of data_utils.synthetic_vqa_grounding, as the tables name them.
VQA_LEVEL_NAMES = {"1": "colour / yes-no", "2": "how many shapes", "3": "how many of a colour",
                   "4": "relation of two shapes"}
GROUNDING_LEVEL_NAMES = {"1": "'the circle'", "2": "'the red circle'", "3": "size, colour, shape and position"}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _tsv_rows(path: Path) -> List[List[str]]:
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n").split("\t") for line in handle if line.strip()]


def _vqa_answers(column: str) -> Dict[str, float]:
    """The answers column (``conf|!+answer`` joined by ``&&``) as answer -> confidence."""
    answers = {}
    for item in column.split("&&"):
        confidence, answer = item.split("|!+")
        answers[answer] = float(confidence)
    return answers


class VGGrading:
    """What the headline score does not say for VQA / grounding rows: the score per question or
    expression level, trivial baselines (no picture needed), how many answers or boxes an exit
    setting changes, and for grounding the boxes' IoU and the exit depth of each coordinate token."""

    def __init__(self, bench_task: str, test_file: Path, subset_file: Path):
        self.task = VG_TASKS[bench_task]["task"]
        meta = [json.loads(line) for line in test_file.with_suffix(".meta.jsonl").open()]
        key = "question_id" if self.task == "vqa_gen" else "uniq_id"
        self.meta = {str(record[key]): record for record in meta}
        self.rows = {row[0]: row for row in _tsv_rows(subset_file)}
        train = _tsv_rows(test_file.with_name(test_file.name.replace("_test.tsv", "_train.tsv")))
        self.baselines = self._vqa_baselines(train) if self.task == "vqa_gen" else self._box_baselines(train)

    # ----------------------------------------------------------------- baselines
    def _vqa_baselines(self, train: List[List[str]]) -> Dict[str, float]:
        from collections import Counter

        overall = Counter(max(_vqa_answers(r[3]).items(), key=lambda kv: kv[1])[0] for r in train)
        by_question: Dict[str, Counter] = {}
        for r in train:
            by_question.setdefault(r[2], Counter())[max(_vqa_answers(r[3]).items(), key=lambda kv: kv[1])[0]] += 1
        frequent = overall.most_common(1)[0][0]
        rows = list(self.rows.values())

        def score(answer_of) -> float:
            return 100.0 * sum(_vqa_answers(r[3]).get(answer_of(r), 0.0) for r in rows) / len(rows)

        return {f"most frequent answer ({frequent!r})": score(lambda r: frequent),
                "most frequent answer per question (no picture)": score(
                    lambda r: by_question[r[2]].most_common(1)[0][0] if r[2] in by_question else frequent)}

    def _box_baselines(self, train: List[List[str]]) -> Dict[str, float]:
        boxes = [[float(v) for v in r[3].split(",")] for r in train]
        mean_w = sum(b[2] - b[0] for b in boxes) / len(boxes)
        mean_h = sum(b[3] - b[1] for b in boxes) / len(boxes)
        hits = []
        for uniq_id, r in self.rows.items():
            record = self.meta[uniq_id]
            cx, cy = record["width"] / 2, record["height"] / 2
            centre = (cx - mean_w / 2, cy - mean_h / 2, cx + mean_w / 2, cy + mean_h / 2)
            hits.append(box_iou(centre, [float(v) for v in r[3].split(",")]) >= 0.5)
        return {f"centre box of the mean training size ({mean_w:.1f} x {mean_h:.1f} px)": 100.0 * sum(hits) / len(hits)}

    # ------------------------------------------------------------- per setting
    def row_extras(self, result, stats) -> Dict:
        by_level: Dict[str, List[float]] = {}
        extras: Dict = {}
        if self.task == "vqa_gen":
            outputs = {str(p["question_id"]): p["answer"] for p in result.predictions}
            for qid, answer in outputs.items():
                level = str(self.meta[qid]["level"])
                by_level.setdefault(level, []).append(_vqa_answers(self.rows[qid][3]).get(answer, 0.0))
        else:
            outputs = {str(p["uniq_id"]): p["box"] for p in result.predictions}
            ious = []
            for uniq_id, box in outputs.items():
                iou = box_iou(box, [float(v) for v in self.rows[uniq_id][3].split(",")])
                ious.append(iou)
                by_level.setdefault(str(self.meta[uniq_id]["level"]), []).append(float(iou >= 0.5))
            extras["mean_iou"] = sum(ious) / len(ious)
            positions = stats.decoder_by_position()["mean"] if len(stats) else []
            extras["decoder_layers_by_position"] = dict(zip(BOX_POSITIONS, positions))
        extras["quality_by_level"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_level.items())}
        extras["_outputs"] = outputs
        return extras

    def compare_with_full_depth(self, row: Dict, full: Dict) -> None:
        """Share of answers / boxes the setting changes; for boxes, the IoU lost and the IoU with the
        full-depth box."""
        mine, theirs = row["_outputs"], full["_outputs"]
        row["changed_vs_full_depth"] = 100.0 * sum(mine[k] != theirs[k] for k in mine) / max(len(mine), 1)
        if self.task == "refcoco":
            row["iou_cost"] = full["mean_iou"] - row["mean_iou"]
            row["iou_with_full_depth_box"] = sum(box_iou(mine[k], theirs[k]) for k in mine) / max(len(mine), 1)


def parse_floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def first_rows(source: Path, target: Path, count: int) -> Path:
    """The first `count` rows of a TSV (a fixed subset every setting is evaluated on)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open() as handle:
        lines = [line for _, line in zip(range(count), handle)]
    target.write_text("".join(lines))
    return target


def evaluate_point(models, task, cfg, options: Dict, subset: str, snli_mode: str):
    from mue_fairseq.cli.evaluate import run_evaluation

    models[0].set_exit_options(**{**NEUTRAL, **options})
    return run_evaluation(models, task, cfg, subset=subset, snli_mode=snli_mode, progress=False)


def accuracy_by_difficulty(predictions: Sequence[Dict], meta: Dict[int, Dict]) -> Dict[str, float]:
    """Entailment accuracy per hypothesis difficulty level of the synthetic task (1 = shape
    existence ... 4 = conjunctions), from the rows' meta records."""
    from mue_fairseq.data.snli_ve_dataset import SNLI_LABEL_TO_ANSWER

    totals: Dict[str, List[int]] = {}
    for prediction in predictions:
        record = meta[int(prediction["uniq_id"])]
        counts = totals.setdefault(str(record["difficulty"]), [0, 0])
        counts[0] += prediction["answer"] == SNLI_LABEL_TO_ANSWER[record["label"]]
        counts[1] += 1
    return {level: 100.0 * hit / total for level, (hit, total) in sorted(totals.items())}


def point_row(task: str, batch_size: int, point: Dict, result, stats, meta: Optional[Dict] = None) -> Dict:
    summary = stats.summary() if len(stats) else {}
    means = summary.get("mean_exit_layers", {})
    flops = (summary.get("time_reduction_flops") or {}).get("reduction")
    layers = (summary.get("time_reduction_layers") or {}).get("combined")
    reduction = flops if flops is not None else layers
    return {
        "task": task, "batch_size": batch_size, "policy": point["policy"], "knob": point["knob"],
        "value": point["value"], "metric": "accuracy" if "accuracy" in result.scores else "CIDEr-D",
        "quality": result.quality(), "num_samples": result.num_samples,
        "image_layers": means.get("image"), "text_layers": means.get("text"), "decoder_layers": means.get("decoder"),
        "expected_reduction_layers": layers, "expected_reduction_flops": flops,
        "expected_speedup": 1.0 / (1.0 - reduction) if reduction is not None and reduction < 1 else None,
        "seconds": result.seconds,
        "quality_by_difficulty": accuracy_by_difficulty(result.predictions, meta) if meta else None,
    }


def timed_rounds(points: Sequence[Dict], run_point: Callable[[Dict], Tuple], repeats: int) -> List[Dict]:
    """Run every point `repeats` times in interleaved rounds (the first point, full depth, also once
    after the last round); each point's first result and stats, with all its times and the fastest.

    A point must give the same quality in every round: a difference means some setting leaked into
    the next evaluation (or evaluation is not deterministic), and the sweep stops.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timed: List[Dict] = [{"point": point, "seconds_repeats": []} for point in points]
    schedule = [entry for _ in range(repeats) for entry in timed] + timed[:1]
    for entry in schedule:
        result, stats = run_point(entry["point"])
        if "result" not in entry:
            entry["result"], entry["stats"] = result, stats
        elif abs(result.quality() - entry["result"].quality()) > 1e-9:
            raise RuntimeError(f"{entry['point']['policy']} {entry['point']['value']}: quality "
                               f"{entry['result'].quality()} then {result.quality()}: settings leak")
        entry["seconds_repeats"].append(result.seconds)
    for entry in timed:
        entry["seconds"] = min(entry["seconds_repeats"])
    return timed


def sweep_task(task: str, work: Path, data_dir: Path, bpe_dir: str, args) -> List[Dict]:
    import torch

    from mue_fairseq.cli import quickstart

    if task in VG_TASKS:
        vg_dir = vg_data(work, args.num_train_vqa_grounding, args.vqa_levels)
        checkpoint = vg_train(task, work, vg_dir, bpe_dir, args)
        if args.train_only:
            return []
        models, task_obj, cfg = vg_load(task, checkpoint, vg_dir, bpe_dir, args.batch_sizes[0])
        test_file = vg_dir / f"{VG_TASKS[task]['prefix']}_test.tsv"
    else:
        recipe = quickstart.pretrain_backbone(work, data_dir, args.pretrain_backbone_steps) + quickstart.hold_encoder(
            args.freeze_encoder_layers_updates)
        if args.finetune_from_model:  # OFA's way: a task starts from a model that already reads pictures
            recipe += ["--finetune-from-model", args.finetune_from_model]
        checkpoint = quickstart.train(task, data_dir, work / f"checkpoints_{task}", args.updates,
                                      args.train_batch_size, bpe_dir, recipe)
        if args.train_only:
            return []
        models, task_obj, cfg = quickstart.load(task, checkpoint, data_dir, bpe_dir, args.batch_sizes[0])
        test_file = data_dir / quickstart.TASKS[task]["files"][2]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    subset_file = first_rows(test_file, work / "exit_policies" / f"{task}_test_first{args.max_samples}.tsv",
                             args.max_samples)
    task_obj.cfg.data = str(subset_file)  # OFA reads the last --data file for every split but train
    snli_mode = "score"
    meta = None
    if task == "snli_ve":  # per-difficulty accuracy, from the generator's meta records of the test rows
        from mue_fairseq.metrics.synthetic_content import load_meta

        meta_file = test_file.with_suffix(".meta.jsonl")
        meta = load_meta(str(meta_file)) if meta_file.exists() else None
    grading = VGGrading(task, test_file, subset_file) if task in VG_TASKS else None
    points = policy_settings(models[0].args.decoder_layers, parse_floats(args.entropies),
                             [int(v) for v in parse_floats(args.patiences)], parse_floats(args.confidences),
                             parse_floats(args.similarities), parse_floats(args.decoder_similarities))
    rows = []
    for batch_size in args.batch_sizes:
        cfg.dataset.batch_size = batch_size
        evaluate_point(models, task_obj, cfg, {}, "test", snli_mode)  # warm-up, untimed

        def run_point(point: Dict) -> Tuple:
            result, stats = evaluate_point(models, task_obj, cfg, point["options"], "test", snli_mode)
            logger.info("%s batch %d %s %s=%s: %.2f, %.2f s", task, batch_size, point["policy"], point["knob"],
                        point["value"], result.quality(), result.seconds)
            return result, stats

        batch_rows = []
        for entry in timed_rounds(points, run_point, args.repeats):
            row = point_row(task, batch_size, entry["point"], entry["result"], entry["stats"], meta)
            if grading is not None:
                row.update(grading.row_extras(entry["result"], entry["stats"]))
            row["seconds"], row["seconds_repeats"] = entry["seconds"], entry["seconds_repeats"]
            batch_rows.append(row)
        first = batch_rows[0]
        for row in batch_rows:
            row["measured_speedup"] = first["seconds"] / row["seconds"] if row["seconds"] else float("nan")
            row["quality_ratio"] = row["quality"] / first["quality"] if first["quality"] else float("nan")
            row["meets_target"] = keeps_target(row["quality"], first["quality"], TARGETS[task])
            if grading is not None:
                grading.compare_with_full_depth(row, first)
        if grading is not None:
            for row in batch_rows:
                row["trivial_baselines"] = grading.baselines
            for row in batch_rows:  # the answers / boxes themselves are not kept
                del row["_outputs"]
        rows += batch_rows
    return rows


def pareto(rows: Sequence[Dict]) -> List[Dict]:
    """Rows no other row beats on both measured speed-up and quality, slowest first."""
    front = pareto_front(rows, cost=lambda r: -r["measured_speedup"], quality=lambda r: r["quality"])
    return sorted(front, key=lambda r: r["measured_speedup"])


def best_at_target(rows: Sequence[Dict]) -> Optional[Dict]:
    meeting = [r for r in rows if r["meets_target"]]
    return max(meeting, key=lambda r: r["measured_speedup"]) if meeting else None


def not_dominated_by_mue(rows: Sequence[Dict]) -> List[Dict]:
    """Points on another policy's front that no MuE setting matches in both measured speed-up and
    quality (the places where MuE's front does not dominate)."""
    mue = [r for r in rows if r["policy"] == "MuE"]
    escaped = []
    for policy in POLICIES[1:-1]:
        for point in pareto([r for r in rows if r["policy"] == policy]):
            if not any(m["measured_speedup"] >= point["measured_speedup"] and m["quality"] >= point["quality"]
                       for m in mue):
                escaped.append(point)
    return escaped


def summarise(rows: List[Dict]) -> Dict:
    """Per task and batch: each policy's fastest setting at the target, static half depth, and the
    MuE speed-up kept at the largest batch relative to batch 1."""
    summary = {}
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        per_batch = {}
        for batch_size in sorted({r["batch_size"] for r in task_rows}):
            batch_rows = [r for r in task_rows if r["batch_size"] == batch_size]
            full = next(r for r in batch_rows if r["policy"] == "full depth")
            half_depth = full_layers(batch_rows) // 2
            half = next((r for r in batch_rows if r["policy"] == "static" and r["value"] == half_depth), None)
            chosen = {policy: best_at_target([r for r in batch_rows if r["policy"] == policy]) for policy in POLICIES}
            best_other = max((chosen[p]["measured_speedup"] for p in POLICIES[1:-1] if chosen[p]), default=None)
            per_batch[batch_size] = {
                "full": full, "chosen": chosen, "static_half": half,
                "static_half_loss_points": None if half is None else full["quality"] - half["quality"],
                "mue_best": chosen["MuE"], "best_other_speedup": best_other,
                "not_dominated_by_mue": not_dominated_by_mue(batch_rows),
            }
        batches = sorted(per_batch)
        kept = None
        if len(batches) > 1 and per_batch[batches[0]]["mue_best"] and per_batch[batches[-1]]["mue_best"]:
            gain = lambda b: per_batch[b]["mue_best"]["measured_speedup"] - 1.0  # noqa: E731
            kept = gain(batches[-1]) / gain(batches[0]) if gain(batches[0]) > 0 else None
        summary[task] = {"batches": per_batch, "mue_speedup_kept_at_largest_batch": kept}
    return summary


def train_file(task: str, work: Path, data_dir: Path, vqa_levels: Sequence[int] = (1, 2, 3)) -> Path:
    from mue_fairseq.cli import quickstart

    if task in VG_TASKS:
        return vg_data_dir(work, vqa_levels if task.startswith("vqa") else (1, 2, 3)) / f"{VG_TASKS[task]['prefix']}_train.tsv"
    return data_dir / quickstart.TASKS[task]["files"][0]


def count_lines(path: Path) -> int:
    with path.open() as handle:
        return sum(1 for _ in handle)


def full_layers(rows: Sequence[Dict]) -> int:
    static = [int(r["value"]) for r in rows if r["policy"] == "static"]
    return max(static) + 1 if static else 0


def write_csv(rows: List[Dict], path: Path) -> Path:
    columns = ["task", "batch_size", "policy", "knob", "value", "metric", "quality", "quality_ratio", "meets_target",
               "num_samples", "seconds", "measured_speedup", "expected_speedup", "expected_reduction_layers",
               "expected_reduction_flops", "image_layers", "text_layers", "decoder_layers"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def plot_fronts(rows: List[Dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = sorted({(r["task"], r["batch_size"]) for r in rows})
    figure = Figure(figsize=(5.2 * len(panels), 4.4), dpi=100)
    FigureCanvasAgg(figure)
    colors = {"static": "tab:gray", "entropy": "tab:blue", "patience": "tab:purple", "confidence": "tab:green",
              "MuE": "tab:red"}
    for index, (task, batch_size) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        panel = [r for r in rows if (r["task"], r["batch_size"]) == (task, batch_size)]
        full = next(r for r in panel if r["policy"] == "full depth")
        for policy, color in colors.items():
            points = [r for r in panel if r["policy"] == policy]
            axes.scatter([r["measured_speedup"] for r in points], [r["quality"] for r in points], s=14, color=color,
                         alpha=0.5)
            front = pareto(points + [full])
            axes.plot([r["measured_speedup"] for r in front], [r["quality"] for r in front], "-o", markersize=4,
                      color=color, label=POLICY_TITLES[policy])
        axes.scatter([1.0], [full["quality"]], marker="s", s=50, color="black", label="full depth", zorder=3)
        axes.axhline(TARGETS[task] * full["quality"], linestyle="--", color="0.4", linewidth=1,
                     label=f"{TARGETS[task]:.0%} of full depth")
        axes.set_xlabel("measured speed-up vs full depth (same run)")
        axes.set_ylabel(full["metric"])
        axes.set_title(f"{task}, batch {batch_size}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    return path


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def timing_method(setting: Dict) -> str:
    repeats = setting.get("repeats")
    if not repeats:  # runs before --repeats existed
        return "each setting timed once; full depth at the start and the end of each sweep, the faster kept"
    return (f"every setting timed in {repeats} interleaved rounds, full depth first in each and once more "
            "at the end; each keeps its fastest time")


def markdown(rows: List[Dict], summary: Dict, setting: Dict,
             plot: str = "benchmarks/results/exit_policies_fronts.png") -> str:
    lines = [
        f"Command: `{setting['command']}`",
        "",
        f"Models: the quickstart's ({setting['model']}), trained with `mue_layerwise_ce`; the first test rows "
        f"({', '.join(f'{task} {count}' for task, count in samples_per_task(rows).items())}); "
        f"{setting['machine']}. Measured speed-up = model time at full depth / with the policy, both in "
        f"this run ({setting.get('timing') or timing_method(setting)}). Expected = FLOP model of the exits "
        "taken (layer count where FLOPs "
        "are not modelled); layer-count = the paper's expected time (layers run, streams and tokens "
        "alike, without the ResNet, embeddings and output projection). Each policy's row is its fastest "
        "setting that keeps the target quality on these rows (the same oracle choice for every policy; "
        "no separate calibration split).",
        "",
    ]
    for task, task_summary in summary.items():
        target = TARGETS[task]
        for batch_size, entry in task_summary["batches"].items():
            full = entry["full"]
            lines += [f"**{task}, batch {batch_size}** (target: {target:.0%} of full-depth {full['metric']} "
                      f"{full['quality']:.2f}; full depth {1000 * full['seconds'] / full['num_samples']:.1f} ms/sample)",
                      "",
                      "| method | knob | " + full["metric"] + " | of full | img / txt / dec layers | "
                      "measured speed-up | expected speed-up | layer-count speed-up |",
                      "|---|---|---:|---:|---|---:|---:|---:|"]
            for policy in POLICIES:
                policy_rows = [r for r in rows if r["task"] == task and r["batch_size"] == batch_size
                               and r["policy"] == policy]
                # A policy swept along several knobs (MuE: thresholds together, decoder alone) gets a row per knob.
                for knob in dict.fromkeys(r["knob"] for r in policy_rows):
                    candidates = [r for r in policy_rows if r["knob"] == knob]
                    row, note = best_at_target(candidates), ""
                    if row is None:
                        row = max(candidates, key=lambda r: r["quality"])
                        note = " (none meets the target: best quality shown)"
                    lines.append(_table_row(POLICY_TITLES[policy] + note, row))
            half = entry["static_half"]
            if half is not None:
                lines.append(_table_row("static depth, half the layers (depth check)", half))
            lines.append("")
            by_level = [(title, r) for title, r in (("full depth", full), ("static half depth", half),
                                                     ("MuE at the target", entry["mue_best"]))
                        if r is not None and r.get("quality_by_difficulty")]
            if by_level and batch_size == min(task_summary["batches"]):  # the same answers at every batch size
                lines.append("Accuracy by hypothesis difficulty (1 existence and unseen properties, 2 counting and "
                             "attributes, 3 spatial relations, 4 conjunctions): " + "; ".join(
                                 f"{title} " + " / ".join(f"{v:.1f}" for v in r["quality_by_difficulty"].values())
                                 for title, r in by_level) + ".")
                lines.append("")
        if task in VG_TASKS:
            lines += vg_markdown(task, task_summary, [r for r in rows if r["task"] == task])
        kept = task_summary["mue_speedup_kept_at_largest_batch"]
        batches = sorted(task_summary["batches"])
        ends = [task_summary["batches"][b]["mue_best"] for b in (batches[0], batches[-1])]
        ratio = ends[1]["measured_speedup"] / ends[0]["measured_speedup"] if all(ends) else None
        verdict = "" if kept is None else f": {'met' if kept >= TARGET_GAIN_KEPT else 'not met'}"
        lines.append(f"MuE at batch {batches[-1]} vs batch {batches[0]} (each at the target): speed-up ratio "
                     f"{_fmt(ratio, '{:.0%}')}, gain (speed-up - 1) kept {_fmt(kept, '{:.0%}')} "
                     f"(target: {TARGET_GAIN_KEPT:.0%}{verdict}).")
        lines.append("")
    lines.append("Targets and checks (from the table above):")
    lines.append("")
    for task, task_summary in summary.items():
        for batch_size, entry in task_summary["batches"].items():
            mue = entry["mue_best"]
            speedup = mue and mue["measured_speedup"]
            target_speedup = TARGET_SPEEDUPS.get(task)
            met = speedup is not None and target_speedup is not None and speedup >= target_speedup
            loss = entry["static_half_loss_points"]
            lines.append(
                f"- {task}, batch {batch_size}: MuE {_fmt(speedup, '{:.2f}x')} at the target quality "
                + (f"(speed-up target {target_speedup:g}x: {'met' if met else 'not met'}; " if target_speedup
                   else "(no speed-up target set; ")
                + "best other policy "
                f"{_fmt(entry['best_other_speedup'], '{:.2f}x')}); static half depth loses "
                f"{_fmt(loss, '{:.2f}')} points"
                + ("" if loss is None or loss >= NEEDS_DEPTH_POINTS else
                   f" (< {NEEDS_DEPTH_POINTS:g}: the model does not need its depth on this task, so no speed-up is claimed on it)")
                + "; " + _dominance(entry["not_dominated_by_mue"]) + "."
            )
    lines += ["", f"![fronts]({plot})"]
    return "\n".join(lines)


def vg_markdown(task: str, task_summary: Dict, rows: Sequence[Dict]) -> List[str]:
    """The VQA / grounding lines under a task's tables: trivial baselines, quality per level, and for
    grounding the exit depth of each coordinate token and the IoU the exits cost."""
    batches = task_summary["batches"]
    first = batches[min(batches)]
    full = first["full"]
    lines = ["Trivial baselines on the same rows (no picture needed): " + "; ".join(
        f"{name} {value:.2f}" for name, value in (full.get("trivial_baselines") or {}).items())
        + f"; the model at full depth {full['quality']:.2f}.", ""]
    names = VQA_LEVEL_NAMES if task.startswith("vqa") else GROUNDING_LEVEL_NAMES
    present = sorted({level for r in (full, first["static_half"], first["mue_best"]) if r
                      for level in (r.get("quality_by_level") or {})}, key=int)
    level_names = ", ".join(f"{level} {names.get(level, '?')}" for level in present)
    chosen = [("full depth", full), ("static half depth", first["static_half"]),
              ("MuE at the target", first["mue_best"])]
    lines += [f"Score by level ({level_names}), batch {min(batches)}: " + "; ".join(
        f"{title} " + " / ".join(f"{v:.1f}" for v in r["quality_by_level"].values())
        for title, r in chosen if r is not None and r.get("quality_by_level")) + ".", ""]
    if task == "refcoco":
        lines += ["Exit depth per box token and the IoU the exits cost (batch "
                  f"{min(batches)}; decoder layers run at each position, mean over the test rows; "
                  "IoU cost = full-depth mean IoU - the setting's; boxes changed = share of boxes "
                  "not identical to full depth's):", "",
                  "| method | knob | Acc@0.5 | x0 | y0 | x1 | y1 | eos | mean IoU | IoU cost | IoU with full-depth box "
                  "| boxes changed |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        batch_rows = [r for r in rows if r["batch_size"] == min(batches)]
        shown = [full] + [r for r in (first["chosen"].get(p) for p in POLICIES[1:]) if r is not None]
        shown += [r for r in batch_rows if r["policy"] == "static" and r["value"] == full_layers(batch_rows) // 2]
        shown += sorted((r for r in batch_rows if r["policy"] == "MuE" and not r["meets_target"]),
                        key=lambda r: -r["quality"])[:2]
        seen = set()
        for r in shown:
            key = (r["policy"], r["knob"], r["value"])
            if key in seen:
                continue
            seen.add(key)
            depth = r.get("decoder_layers_by_position") or {}
            lines.append(f"| {POLICY_TITLES.get(r['policy'], r['policy'])} | {r['knob']} {r['value']} | "
                         f"{r['quality']:.2f} | " + " | ".join(_fmt(depth.get(p), "{:.2f}") for p in BOX_POSITIONS)
                         + f" | {_fmt(r.get('mean_iou'), '{:.3f}')} | {_fmt(r.get('iou_cost'), '{:+.3f}')} | "
                         f"{_fmt(r.get('iou_with_full_depth_box'), '{:.3f}')} | "
                         f"{_fmt(r.get('changed_vs_full_depth'), '{:.1f}%')} |")
        lines.append("")
    return lines


def _dominance(escaped: Sequence[Dict]) -> str:
    if not escaped:
        return "MuE's front dominates every other policy's front (measured speed-up and quality)"
    points = ", ".join(f"{POLICY_TITLES[r['policy']]} {r['knob']} {r['value']} ({r['measured_speedup']:.2f}x, "
                       f"{r['quality']:.2f})" for r in escaped)
    return f"not dominated by any MuE setting: {points}"


def samples_per_task(rows: Sequence[Dict]) -> Dict[str, int]:
    return {row["task"]: row["num_samples"] for row in rows}


def _table_row(title: str, row: Dict) -> str:
    layers = " / ".join(_fmt(row.get(k), "{:.1f}") for k in ("image_layers", "text_layers", "decoder_layers"))
    return (f"| {title} | {row['knob']} {row['value']} | {row['quality']:.2f} | {row['quality_ratio']:.1%} | "
            f"{layers} | {row['measured_speedup']:.2f}x | {_fmt(row.get('expected_speedup'), '{:.2f}x')} | "
            f"{_fmt(layer_count_speedup(row), '{:.2f}x')} |")


def layer_count_speedup(row: Dict) -> Optional[float]:
    """The paper's measure: layers run at full depth / layers run, streams and tokens alike."""
    reduction = row.get("expected_reduction_layers")
    return 1.0 / (1.0 - reduction) if reduction is not None and reduction < 1 else None


def main(argv: Optional[List[str]] = None) -> Dict:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(REPO / "work_dirs" / "quickstart"),
                        help="quickstart work dir: its data and checkpoints are reused (trained if absent)")
    parser.add_argument("--bpe-dir", default=os.environ.get("MUE_BPE_DIR", str(REPO.parent / "shared" / "ofa_bpe")))
    parser.add_argument("--tasks", default="snli_ve,caption",
                        help="comma-separated: snli_ve, caption, vqa_gen_allcand, vqa_gen_beamsearch, refcoco")
    parser.add_argument("--updates", type=int, default=200, help="training updates per task (as the quickstart)")
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--pretrain-backbone-steps", type=int, default=0,
                        help="pre-train the ResNet on the scenes for this many steps before fine-tuning (as the quickstart)")
    parser.add_argument("--freeze-encoder-layers-updates", type=int, default=0,
                        help="keep the encoder layers fixed for the first N training updates (as the quickstart)")
    parser.add_argument("--num-train", type=int, default=2000,
                        help="training images of the synthetic task, when --work-dir has no data yet (as the quickstart)")
    parser.add_argument("--finetune-from-model", default=None, metavar="CHECKPOINT",
                        help="start training from this checkpoint's weights (fairseq-train's option of the same "
                        "name), e.g. the caption model for entailment, as OFA fine-tunes from its pre-trained model")
    parser.add_argument("--num-train-vqa-grounding", type=int, default=4000,
                        help="training images of the built-in VQA / grounding data (2 questions and 2 "
                        "expressions each), when --work-dir has none yet")
    parser.add_argument("--vqa-levels", default="1,2,3",
                        help="question levels of the built-in VQA data (data_utils.synthetic_vqa_grounding "
                        "--vqa-levels; 4 = relations of two shapes); other than 1,2,3 the data and VQA models "
                        "get their own folders in --work-dir")
    parser.add_argument("--grounding-max-image-size", type=int, default=None,
                        help="refcoco's --max-image-size (the side the <bin_i> tokens span; default the 64-pixel "
                        "resized image, as OFA's 512 / 512). 512 puts the boxes of 64-pixel images on bins 0-125, "
                        "two bins a pixel as in OFA's own setting, instead of 15.6")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the models and stop")
    parser.add_argument("--reuse-checkpoints", action="store_true",
                        help="VQA / grounding: evaluate the models an earlier run trained in --work-dir; "
                        "an error if one is missing (instead of training it)")
    parser.add_argument("--name", default="exit_policies",
                        help="output file names in --out-dir: NAME.csv, NAME.json, NAME.md, NAME_fronts.png")
    parser.add_argument("--batch-sizes", default="1,16", help="evaluation batch sizes")
    parser.add_argument("--max-samples", type=int, default=96, help="test rows evaluated per setting")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds over all settings; each setting keeps its fastest time")
    parser.add_argument("--entropies", default="0.05,0.2,0.5,1,2,4")
    parser.add_argument("--patiences", default="3,2,1")
    parser.add_argument("--confidences", default="0.99,0.9,0.7,0.5,0.3")
    parser.add_argument("--similarities", default="0.99,0.98,0.97,0.95,0.93,0.9,0.85",
                        help="MuE thresholds, image = text = decoder")
    parser.add_argument("--decoder-similarities", default="0.98,0.95,0.9,0.8",
                        help="MuE decoder thresholds with both encoder streams at full depth ('' for none)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--markdown", default=None, help="BENCHMARKS.md to update with the tables")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="rebuild the CSV, plot and tables from earlier runs' exit_policies.json (no evaluation); "
                        "several files (e.g. one per task) are merged")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    try:
        args.vqa_levels = tuple(int(v) for v in args.vqa_levels.split(","))
    except ValueError:
        parser.error(f"--vqa-levels {args.vqa_levels!r}: give comma-separated levels, e.g. 1,2,3,4")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.finetune_from_model and not Path(args.finetune_from_model).is_file():
        parser.error(f"--finetune-from-model: no checkpoint file {args.finetune_from_model}")
    if args.from_json:
        runs = [json.loads(Path(path).read_text()) for path in args.from_json]
        rows = [row for run in runs for row in run["rows"]]
        setting = dict(runs[0]["setting"])
        setting["command"] = "; ".join(run["setting"]["command"] for run in runs)
        setting["machine"] = "; ".join(dict.fromkeys(run["setting"]["machine"] for run in runs))
        setting["model"] = "; ".join(dict.fromkeys(run["setting"]["model"] for run in runs))
        setting["timing"] = "; ".join(  # runs merged here may have been timed differently
            f"{', '.join(sorted({row['task'] for row in run['rows']}))}: {timing_method(run['setting'])}"
            for run in runs)
        return report(rows, setting, Path(args.out_dir), args.markdown, args.name)
    unknown = [t for t in args.tasks.split(",") if t not in TARGETS]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")

    from data_utils.synthetic import build_synthetic_task
    from mue_fairseq.data.ofa_bpe import check_bpe_dir

    check_bpe_dir(args.bpe_dir)
    work = Path(args.work_dir)
    data_dir = work / "data"
    if not (data_dir / "synthetic_task_info.json").exists():
        build_synthetic_task(data_dir, seed=1, num_train=args.num_train, num_valid=200, num_test=200)
    rows: List[Dict] = []
    started = time.time()
    for task in args.tasks.split(","):
        rows += sweep_task(task, work, data_dir, args.bpe_dir, args)
    if args.train_only:
        return {"rows": [], "summary": {}}
    out = Path(args.out_dir)
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    setting = {
        "command": "OMP_NUM_THREADS={} .venv/bin/python benchmarks/bench_exit_policies.py {}".format(
            os.environ.get("OMP_NUM_THREADS", "?"), " ".join(argv if argv is not None else sys.argv[1:])),
        "model": "d=128, 6+6 layers, resnet18 at 64 px, vocabulary 59,457; "
                 f"{args.updates} updates of {args.train_batch_size} per task on "
                 + ", ".join(f"{count_lines(train_file(task, work, data_dir, args.vqa_levels)):,} {task} rows"
                             for task in args.tasks.split(","))
                 + ("; VQA / grounding trained with their run scripts (run_scripts/vqa, run_scripts/refcoco; "
                    "the command is in the checkpoint folder's train_command.txt), no restore file, lr 1e-3"
                    if any(task in VG_TASKS for task in args.tasks.split(",")) else "")
                 + (f"; ResNet pre-trained on the scenes for {args.pretrain_backbone_steps} steps first"
                    if args.pretrain_backbone_steps else "; ResNet from scratch")
                 + (f"; encoder layers held fixed for the first {args.freeze_encoder_layers_updates} updates"
                    if args.freeze_encoder_layers_updates else "")
                 + (f"; initialised from {args.finetune_from_model}" if args.finetune_from_model else ""),
        "samples": args.max_samples,
        "repeats": args.repeats,
        "machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"{platform.processor() or platform.machine()}, load average {load:.1f} at the end, "
                   f"{(time.time() - started) / 60:.0f} min",
    }
    return report(rows, setting, out, args.markdown, args.name)


def report(rows: List[Dict], setting: Dict, out: Path, markdown_path: Optional[str],
           name: str = "exit_policies") -> Dict:
    """Write NAME.csv, NAME_fronts.png, NAME.json and NAME.md of `rows` to `out`; print the tables
    and put them in `markdown_path`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    write_csv(rows, out / f"{name}.csv")
    plot_fronts(rows, out / f"{name}_fronts.png")
    (out / f"{name}.json").write_text(json.dumps({"setting": setting, "rows": rows, "summary": summary},
                                                 indent=1, default=str))
    body = markdown(rows, summary, setting, plot=f"benchmarks/results/{name}_fronts.png")
    (out / f"{name}.md").write_text(body + "\n")
    print(body)
    if markdown_path:
        update_section(Path(markdown_path), SECTION_HEADING, SECTION_BEGIN, SECTION_END, body)
        logger.info("updated %s", markdown_path)
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
