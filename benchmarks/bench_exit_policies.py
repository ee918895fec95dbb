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
4. Output in `--out-dir`: `exit_policies.csv` (one row per task, batch, policy and knob),
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

    recipe = quickstart.pretrain_backbone(work, data_dir, args.pretrain_backbone_steps) + quickstart.hold_encoder(
        args.freeze_encoder_layers_updates)
    if args.finetune_from_model:  # OFA's way: a task starts from a model that already reads pictures
        recipe += ["--finetune-from-model", args.finetune_from_model]
    checkpoint = quickstart.train(task, data_dir, work / f"checkpoints_{task}", args.updates, args.train_batch_size,
                                  bpe_dir, recipe)
    models, task_obj, cfg = quickstart.load(task, checkpoint, data_dir, bpe_dir, args.batch_sizes[0])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    test_file = data_dir / quickstart.TASKS[task]["files"][2]
    subset_file = first_rows(test_file, work / "exit_policies" / f"{task}_test_first{args.max_samples}.tsv",
                             args.max_samples)
    task_obj.cfg.data = str(subset_file)  # OFA reads the last --data file for every split but train
    snli_mode = "score"
    meta = None
    if task == "snli_ve":  # per-difficulty accuracy, from the generator's meta records of the test rows
        from mue_fairseq.metrics.synthetic_content import load_meta

        meta_file = test_file.with_suffix(".meta.jsonl")
        meta = load_meta(str(meta_file)) if meta_file.exists() else None
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
            row["seconds"], row["seconds_repeats"] = entry["seconds"], entry["seconds_repeats"]
            batch_rows.append(row)
        first = batch_rows[0]
        for row in batch_rows:
            row["measured_speedup"] = first["seconds"] / row["seconds"] if row["seconds"] else float("nan")
            row["quality_ratio"] = row["quality"] / first["quality"] if first["quality"] else float("nan")
            row["meets_target"] = keeps_target(row["quality"], first["quality"], TARGETS[task])
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


def markdown(rows: List[Dict], summary: Dict, setting: Dict) -> str:
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
            met = speedup is not None and speedup >= TARGET_SPEEDUPS[task]
            loss = entry["static_half_loss_points"]
            lines.append(
                f"- {task}, batch {batch_size}: MuE {_fmt(speedup, '{:.2f}x')} at the target quality "
                f"(speed-up target {TARGET_SPEEDUPS[task]:g}x: {'met' if met else 'not met'}; best other policy "
                f"{_fmt(entry['best_other_speedup'], '{:.2f}x')}); static half depth loses "
                f"{_fmt(loss, '{:.2f}')} points"
                + ("" if loss is None or loss >= NEEDS_DEPTH_POINTS else
                   f" (< {NEEDS_DEPTH_POINTS:g}: the model does not need its depth on this task, so no speed-up is claimed on it)")
                + "; " + _dominance(entry["not_dominated_by_mue"]) + "."
            )
    lines += ["", "![fronts](benchmarks/results/exit_policies_fronts.png)"]
    return "\n".join(lines)


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
    parser.add_argument("--tasks", default="snli_ve,caption")
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
        return report(rows, setting, Path(args.out_dir), args.markdown)

    from data_utils.synthetic import build_synthetic_task
    from mue_fairseq.cli import quickstart
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
    out = Path(args.out_dir)
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    setting = {
        "command": "OMP_NUM_THREADS={} .venv/bin/python benchmarks/bench_exit_policies.py {}".format(
            os.environ.get("OMP_NUM_THREADS", "?"), " ".join(argv if argv is not None else sys.argv[1:])),
        "model": "d=128, 6+6 layers, resnet18 at 64 px, vocabulary 59,457; "
                 f"{args.updates} updates of {args.train_batch_size} per task on "
                 + ", ".join(f"{count_lines(data_dir / quickstart.TASKS[task]['files'][0]):,} {task} rows"
                             for task in args.tasks.split(","))
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
    return report(rows, setting, out, args.markdown)


def report(rows: List[Dict], setting: Dict, out: Path, markdown_path: Optional[str]) -> Dict:
    """Write the CSV, plot and JSON of `rows` to `out`; print the tables and put them in `markdown_path`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    write_csv(rows, out / "exit_policies.csv")
    plot_fronts(rows, out / "exit_policies_fronts.png")
    (out / "exit_policies.json").write_text(json.dumps({"setting": setting, "rows": rows, "summary": summary},
                                                       indent=1, default=str))
    body = markdown(rows, summary, setting)
    print(body)
    if markdown_path:
        update_section(Path(markdown_path), SECTION_HEADING, SECTION_BEGIN, SECTION_END, body)
        logger.info("updated %s", markdown_path)
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
