"""Sweep MuE's exit thresholds on one split: quality vs measured and expected time, Pareto plot,
and calibration of the fastest setting that keeps a quality target.

    python -m mue_fairseq.cli.sweep DATA --path ckpt.pt --user-dir mue_fairseq --task snli_ve \
        --gen-subset valid --batch-size 16 --results-path sweep/ \
        --model-overrides "{'bpe_dir': '...'}" \
        --image-thresholds 1,0.97,0.95,0.9 --text-thresholds 1,0.97,0.95 --decoder-thresholds 1,0.95,0.9 \
        [--search coordinate] [--calibrate --target 0.99]

Every evaluate option applies (beam, batch size, `--mue-kv-policy`, ...); the checkpoint is
loaded once and the thresholds are changed in place between points. The full-depth point
(all thresholds 1) is always measured first, after a few untimed warm-up batches, and is the
reference of the measured speed-ups and of the quality target (`--reference-quality Q` makes the
target a fraction of Q instead: the quality of the checkpoint a fine-tuning started from).

Search: `grid` evaluates the product of the three lists; `coordinate` starts at full depth and,
one stream at a time (image, text, decoder; `--rounds` passes), moves to the fastest value of
that stream that keeps the target, with the other two fixed.

Writes `{subset}_sweep.csv` (one row per point, rewritten after each point) and
`{subset}_sweep_pareto.png` to `--results-path`; with `--calibrate`, `{subset}_calibration.json`
holding the chosen thresholds and the evaluate command line that applies them, which is also
printed.
"""
import argparse
import itertools
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from mue_fairseq.cli.sweep_report import CSV_COLUMNS, plot_pareto, write_csv
from mue_fairseq.exits.selection import (
    FULL_DEPTH, STREAMS, THRESHOLD_OPTIONS, SweepPoint, Thresholds, calibrate, meets_target, pareto_front,
    select_fastest,
)

logger = logging.getLogger("mue_fairseq.sweep")

# Sweep-only options and whether they take a value: removed from the evaluate command line.
SWEEP_OPTIONS = {
    "--image-thresholds": True, "--text-thresholds": True, "--decoder-thresholds": True,
    "--search": True, "--rounds": True, "--repeats": True, "--warmup-batches": True,
    "--time-tolerance": True, "--target": True, "--reference-quality": True, "--calibrate": False,
    "--mue-image-threshold": True, "--mue-text-threshold": True, "--mue-decoder-threshold": True,
}


# ----------------------------------------------------------------------------- evaluation
class Sweeper:
    """Evaluates threshold settings on one loaded model and split, once each (cached)."""

    def __init__(self, models, task, cfg, subset: str, snli_mode: str = "score", repeats: int = 1,
                 on_point: Optional[Callable[[SweepPoint], None]] = None):
        model = models[0]
        if not hasattr(model, "set_exit_options"):
            raise ValueError(f"the sweep needs an mue_ofa model, got {type(model).__name__}; "
                             "load the checkpoint with a --mue-* option")
        if model.mue.policy != "similarity":
            raise ValueError(f"the sweep varies similarity thresholds; --mue-exit-policy is {model.mue.policy!r}")
        if str(model.mue.mue_preset) == "authors":
            # Its decoder still exits at thresholds 1 (the authors' schedule stays below 1), so the
            # sweep's reference point would not be full depth.
            raise ValueError("the sweep's reference (thresholds 1) is full depth only without --mue-preset "
                             "authors; sweep without the preset")
        if repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {repeats}")
        self.models, self.task, self.cfg = models, task, cfg
        self.subset, self.snli_mode, self.repeats = subset, snli_mode, repeats
        self.on_point = on_point
        self.points: Dict[Thresholds, SweepPoint] = {}
        self.planned: Optional[int] = None  # number of points a grid will evaluate, for progress logs

    @property
    def reference(self) -> SweepPoint:
        return self.evaluate(FULL_DEPTH)

    def warm_up(self, num_batches: int) -> None:
        """Run `num_batches` untimed batches at full depth, so one-time costs (allocations, kernel
        selection) do not land on the first timed point."""
        if num_batches <= 0:
            return
        from fairseq import utils

        model = self.models[0]
        model.set_exit_options(**dict(zip(THRESHOLD_OPTIONS, FULL_DEPTH)))
        self.task.load_dataset(self.subset)
        itr = self.task.get_batch_iterator(
            dataset=self.task.dataset(self.subset), max_sentences=self.cfg.dataset.batch_size,
        ).next_epoch_itr(shuffle=False)
        scoring = hasattr(self.task, "score_answers") and self.snli_mode == "score"
        generator = None if scoring else self.task.build_generator(self.models, self.cfg.generation)
        use_cuda = next(model.parameters()).is_cuda
        with torch.no_grad():
            for _, sample in zip(range(num_batches), itr):
                sample = utils.move_to_cuda(sample) if use_cuda else sample
                if self.cfg.common.fp16:
                    sample = utils.apply_to_sample(lambda t: t.half() if t.is_floating_point() else t, sample)
                if scoring:
                    net_input = {k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
                    self.task.score_answers(model, sample, encoder_out=model.encoder(**net_input))
                else:
                    self.task.inference_step(generator, self.models, sample)
        logger.info("warm-up: %d batch(es) at full depth", num_batches)

    def evaluate(self, thresholds: Iterable[float]) -> SweepPoint:
        from mue_fairseq.cli.evaluate import run_evaluation

        key: Thresholds = tuple(float(value) for value in thresholds)  # type: ignore[assignment]
        if key in self.points:
            return self.points[key]
        if key != FULL_DEPTH and FULL_DEPTH not in self.points:
            self.evaluate(FULL_DEPTH)
        self.models[0].set_exit_options(**dict(zip(THRESHOLD_OPTIONS, key)))
        seconds, result, stats = math.inf, None, None
        for _ in range(self.repeats):
            run, run_stats = run_evaluation(self.models, self.task, self.cfg, subset=self.subset,
                                            snli_mode=self.snli_mode, progress=False)
            if result is None:
                result, stats = run, run_stats
            seconds = min(seconds, run.seconds)
        point = point_from_evaluation(key, result, stats, seconds)
        self.points[key] = point
        self._log(point)
        if self.on_point is not None:
            self.on_point(point)
        return point

    def _log(self, point: SweepPoint) -> None:
        reference = self.points.get(FULL_DEPTH, point)
        layers = point.mean_exit_layers
        flops = point.expected_reduction_flops
        logger.info(
            "point %d%s: %s -> %s %.2f (full %.2f) | layers img %s txt %s dec %s | expected -%.1f%% layers%s | "
            "%.3f s, x%.2f", len(self.points), f"/{self.planned}" if self.planned else "", point.describe(),
            point.metric, point.quality, reference.quality,
            _fmt(layers.get("image")), _fmt(layers.get("text")), _fmt(layers.get("decoder")),
            100 * (point.expected_reduction_layers or 0.0),
            "" if flops is None else f", -{100 * flops:.1f}% FLOPs", point.seconds,
            reference.seconds / point.seconds if point.seconds else float("nan"),
        )

    # ------------------------------------------------------------------ searches
    def grid(self, grid: Sequence[Sequence[float]]) -> List[SweepPoint]:
        """Every combination of the image, text and decoder lists (full depth first)."""
        combinations = list(itertools.product(*grid))
        self.planned = len(set(combinations) | {FULL_DEPTH} | set(self.points))
        logger.info("grid search: %d points", self.planned)
        self.evaluate(FULL_DEPTH)
        return [self.evaluate(thresholds) for thresholds in combinations]

    def coordinate_descent(self, grid: Sequence[Sequence[float]], target: float, rounds: int = 2,
                           time_tolerance: float = 0.0, reference_quality: Optional[float] = None) -> SweepPoint:
        """Per stream in turn, move to its fastest value that keeps the target (a fraction of full
        depth, or of `reference_quality`); stop after `rounds` passes or a pass that changes nothing.
        Returns the final setting."""
        current = self.evaluate(FULL_DEPTH)
        for round_index in range(rounds):
            changed = False
            for stream_index, stream in enumerate(STREAMS):
                candidates = [current]
                for value in grid[stream_index]:
                    thresholds = list(current.thresholds)
                    thresholds[stream_index] = float(value)
                    candidates.append(self.evaluate(thresholds))
                chosen = calibrate(candidates, self.reference, target, time_tolerance, reference_quality)
                if chosen.thresholds != current.thresholds:
                    logger.info("round %d, %s stream: %s -> %s", round_index + 1, stream, current.describe(),
                                chosen.describe())
                    current, changed = chosen, True
            if not changed:
                break
        return current


def point_from_evaluation(thresholds: Thresholds, result, stats, seconds: float) -> SweepPoint:
    summary = stats.summary() if len(stats) else {}
    flops = summary.get("time_reduction_flops") or {}
    metric = "accuracy" if "accuracy" in result.scores else "CIDEr" if "CIDEr" in result.scores else "cider_d"
    return SweepPoint(
        thresholds=thresholds, metric=metric, quality=float(result.quality()), num_samples=result.num_samples,
        mean_exit_layers={stream: summary.get("mean_exit_layers", {}).get(stream) for stream in STREAMS},
        expected_reduction_layers=summary.get("time_reduction_layers", {}).get("combined"),
        expected_reduction_flops=flops.get("reduction"), ideal_speedup_flops=flops.get("ideal_speedup"),
        seconds=float(seconds), scores=dict(result.scores),
    )


def evaluate_command(argv: Sequence[str], point: SweepPoint) -> List[str]:
    """The evaluate command line for `point`: the sweep's own arguments without the sweep options,
    plus the chosen thresholds."""
    kept: List[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        name = token.split("=", 1)[0]
        if name in SWEEP_OPTIONS:
            skip_value = SWEEP_OPTIONS[name] and "=" not in token
            continue
        kept.append(token)
    thresholds = [item for option, value in point.as_options().items()
                  for item in ("--" + option.replace("_", "-"), repr(float(value)))]
    return ["python", "-m", "mue_fairseq.cli.evaluate", *kept, *thresholds]


# ----------------------------------------------------------------------------- CLI
def parse_thresholds(text: str, option: str) -> List[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from error
    if not values:
        raise ValueError(f"{option}: no threshold given")
    bad = [value for value in values if not 0.0 <= value <= 1.0]
    if bad:
        raise ValueError(f"{option}: thresholds must be in [0, 1], got {bad}")
    return list(dict.fromkeys(values))


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("threshold sweep")
    default = "1,0.99,0.97,0.95,0.9"
    for stream in STREAMS:
        group.add_argument(f"--{stream}-thresholds", default=default,
                           help=f"comma-separated {stream} thresholds (default {default})")
    group.add_argument("--search", choices=["grid", "coordinate"], default="grid",
                       help="grid: every combination; coordinate: per stream in turn, keeping --target")
    group.add_argument("--rounds", type=int, default=2, help="coordinate search: passes over the streams")
    group.add_argument("--repeats", type=int, default=1, help="timed runs per point; the fastest counts")
    group.add_argument("--warmup-batches", type=int, default=2, help="untimed full-depth batches before timing")
    group.add_argument("--time-tolerance", type=float, default=0.02,
                       help="measured times within this fraction of the fastest count as tied; "
                            "the least expected time breaks ties")
    group.add_argument("--calibrate", action="store_true",
                       help="pick the fastest point keeping --target x full-depth quality, write it as JSON "
                            "and print the evaluate command that uses it")
    group.add_argument("--target", type=float, default=0.99, help="quality target as a fraction of full depth")
    group.add_argument("--reference-quality", type=float, default=None,
                       help="make --target a fraction of this quality instead of the checkpoint's full depth "
                            "(e.g. the full-depth quality of the checkpoint a fine-tuning started from)")


def run_sweep(args: argparse.Namespace, argv: Sequence[str], write: bool = True) -> dict:
    """Load once, sweep, write CSV + plot (+ calibration); returns paths and the chosen point.

    On several processes every rank evaluates its shard of each point and sees the same merged
    points (so all take the same search path); only the one given `write` writes files.
    """
    from mue_fairseq.cli.evaluate import load_for_evaluation

    grid = [parse_thresholds(getattr(args, f"{stream}_thresholds"), f"--{stream}-thresholds") for stream in STREAMS]
    if not 0.0 < args.target <= 1.0:
        raise ValueError(f"--target must be in (0, 1], got {args.target}")
    reference_quality = args.reference_quality
    if reference_quality is not None and not (math.isfinite(reference_quality) and reference_quality > 0):
        raise ValueError(f"--reference-quality must be a positive number, got {reference_quality}")
    if args.rounds < 1 or args.time_tolerance < 0:
        raise ValueError(f"--rounds must be >= 1 and --time-tolerance >= 0, got {args.rounds}, {args.time_tolerance}")
    for option in THRESHOLD_OPTIONS:  # load as mue_ofa whatever the checkpoint; the sweep sets them
        setattr(args, option, 1.0)
    models, task, cfg = load_for_evaluation(args)
    subset = cfg.dataset.gen_subset
    out = Path(cfg.common_eval.results_path or "sweep_results")
    if write:
        out.mkdir(parents=True, exist_ok=True)
    csv_path, plot_path = out / f"{subset}_sweep.csv", out / f"{subset}_sweep_pareto.png"

    sweeper = Sweeper(models, task, cfg, subset, snli_mode=args.snli_mode, repeats=args.repeats)
    # rewrite the CSV after every point, so an interrupted sweep keeps what it measured
    if write:
        sweeper.on_point = lambda _: write_csv(list(sweeper.points.values()), sweeper.reference, args.target,
                                               csv_path, reference_quality)
    sweeper.warm_up(args.warmup_batches)
    if args.search == "grid":
        sweeper.grid(grid)
    else:
        sweeper.coordinate_descent(grid, args.target, args.rounds, args.time_tolerance, reference_quality)
    points, reference = list(sweeper.points.values()), sweeper.reference
    chosen = (calibrate(points, reference, args.target, args.time_tolerance, reference_quality)
              if args.calibrate else None)
    output = {"csv": csv_path, "plot": plot_path, "points": points, "reference": reference, "chosen": chosen}
    if not write:
        return output
    write_csv(points, reference, args.target, csv_path, reference_quality)
    plot_pareto(points, reference, plot_path, target=args.target if args.calibrate else None, chosen=chosen,
                reference_quality=reference_quality)
    logger.info("wrote %s, %s (%d points)", csv_path, plot_path, len(points))
    if chosen is not None:
        command = evaluate_command(argv, chosen)
        calibration = {
            "subset": subset, "target": args.target, "metric": reference.metric,
            "full_depth_quality": reference.quality, "full_depth_seconds": reference.seconds,
            "reference_quality": reference.quality if reference_quality is None else reference_quality,
            "meets_target": meets_target(chosen, reference, args.target, reference_quality),
            "thresholds": chosen.as_options(), "quality": chosen.quality, "seconds": chosen.seconds,
            "measured_speedup": reference.seconds / chosen.seconds if chosen.seconds else None,
            "expected_reduction_layers": chosen.expected_reduction_layers,
            "expected_reduction_flops": chosen.expected_reduction_flops,
            "mean_exit_layers": chosen.mean_exit_layers, "scores": chosen.scores,
            "evaluate_argv": command, "evaluate_command": shlex.join(command),
        }
        output["calibration"] = out / f"{subset}_calibration.json"
        output["calibration"].write_text(json.dumps(calibration, indent=1))
        if not calibration["meets_target"]:
            logger.warning("no setting keeps %g x %.2f on %s, full depth included (%.2f): calibrated to full depth",
                           args.target, calibration["reference_quality"], subset, reference.quality)
        logger.info("calibrated on %s: %s gives %.2f (target %g x %.2f), %.3f s vs %.3f s full depth; wrote %s. "
                    "Evaluate it (on the test split: change the data file and --gen-subset) with:",
                    subset, chosen.describe(), chosen.quality, args.target, calibration["reference_quality"],
                    chosen.seconds, reference.seconds, output["calibration"])
        print(shlex.join(command), flush=True)
    return output


def cli_main(argv: Optional[List[str]] = None) -> dict:
    from mue_fairseq.cli.distributed_eval import close_processes, configure_logging, init_processes
    from mue_fairseq.cli.evaluate import parse_evaluation_args

    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_evaluation_args(argv, extra_arguments=add_sweep_arguments)
    processes = init_processes(args)
    configure_logging(processes)
    try:
        return run_sweep(args, [a for a in argv if not a.startswith(("--local-rank", "--local_rank"))],
                         write=processes.is_main)
    finally:
        close_processes(processes)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


__all__ = ["SweepPoint", "Sweeper", "calibrate", "select_fastest", "pareto_front", "write_csv", "plot_pareto",
           "evaluate_command", "run_sweep", "cli_main", "CSV_COLUMNS"]


if __name__ == "__main__":
    cli_main()
