"""Caption stage 2 on the built-in task: OFA's SCST against the layer-wise SCST, per exit depth.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_stage2.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_stage2.py --skip-training   # evaluate only
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_stage2.py --name stage2_journey \
        --stage1-checkpoint work_dirs/journey/tuned/checkpoint_last.pt --data-dir work_dirs/journey/ofa_caption/data

1. Stage 1: the quickstart's caption model and recipe (128-d, 6+6 layers, 64 px, `mue_layerwise_ce`,
   `--stage1-updates` updates at batch 16, lr 1e-3) on the built-in task written to `--work-dir`/data.
   Or, with `--stage1-checkpoint` and `--data-dir`, a given stage-1 checkpoint and its caption data
   (the stage-2 TSV, valid and test TSVs and `cider_cached_tokens/coco-train-words.p`, as the built-in
   task and `data_utils/convert_coco.py` write them); stage 2 then builds the model with the sizes and
   layer options that checkpoint's saved config records.
2. Stage 2, from that checkpoint, each for `--stage2-updates` updates with the same options
   (OFA's stage-2 recipe: beam-5 samples of `--scst-args`, CIDEr-D reward from the task's cached
   `coco-train-words.p`, leave-one-out baseline, dropout 0; Adam, polynomial decay), through
   `python -m mue_fairseq.cli.train` on the stage-2 TSV (one row per image, all its captions):
   * `scst`: OFA's `scst_reward_criterion` (the last layer only);
   * `layerwise_scst`: `mue_layerwise_scst`, samples from the full-depth model;
   * `layerwise_scst_exits`: `mue_layerwise_scst --sample-with-exits`, samples from the exiting
     model, whose thresholds are those calibrated on the stage-1 model (step 3).
3. Every model (stage 1 and the three stage-2 ones), on the first `--rows` rows of each split:
   CIDEr-D on test with the decoder stopped at a fixed depth k = 1..L for every token (the
   encoder at full depth; k = L is full depth); MuE's thresholds calibrated on valid (coordinate
   search over image, text and decoder thresholds, the fastest measured setting that keeps
   `--target` x that model's full-depth CIDEr-D on valid); then on test, full depth and the
   calibrated setting timed in `--repeats` interleaved rounds (model time only, best of the
   rounds), their ratio being the measured speed-up.
4. Writes `<name>.json`, `<name>.csv`, `<name>.md` (the tables) and `<name>_depth.png` (CIDEr-D
   per decoder exit depth) to `--out-dir`, `<name>` being `--name` (default `stage2`).

Training reuses what `--work-dir` (default `work_dirs/bench_<name>`) holds (a checkpoint trained with
the same options); `--skip-training` requires it and only evaluates, for re-running the timed part alone.
"""
import argparse
import csv
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_exit_policies import NEUTRAL, first_rows, parse_floats, timed_rounds  # noqa: E402

logger = logging.getLogger("bench_stage2")

VARIANTS = {
    "scst": {"title": "OFA's SCST (scst_reward_criterion)", "criterion": ["--criterion", "scst_reward_criterion"]},
    "layerwise_scst": {"title": "layer-wise SCST, full-depth samples",
                       "criterion": ["--criterion", "mue_layerwise_scst"]},
    "layerwise_scst_exits": {"title": "layer-wise SCST, samples from the exiting model",
                             "criterion": ["--criterion", "mue_layerwise_scst", "--sample-with-exits"]},
}
MODELS = ("stage1", *VARIANTS)
TITLES = {"stage1": "stage 1 (mue_layerwise_ce)", **{name: spec["title"] for name, spec in VARIANTS.items()}}
BUILTIN_TITLE = "Caption stage 2 on the built-in task"
# What a given stage-1 checkpoint needs in its data folder.
DATA_FILES = ("caption_stage2_train.tsv", "caption_valid.tsv", "caption_test.tsv",
              "cider_cached_tokens/coco-train-words.p")
# Model options that decide a checkpoint's parameters or what its layers compute. fairseq builds the
# stage-2 model from the command line and only then loads the restored weights, so these must repeat
# the checkpoint's values (freeze_resnet too: frozen BatchNorm computes differently in training);
# training options (dropout, drop-path, frozen weights or embeddings) are stage 2's own.
SHAPE_VALUES = ("encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
                "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
                "decoder_output_dim", "activation_fn", "resnet_type", "token_bucket_size", "image_bucket_size",
                "attn_scale_factor", "code_image_size")
SHAPE_FLAGS = ("encoder_normalize_before", "decoder_normalize_before", "share_decoder_input_output_embed",
               "share_all_embeddings", "layernorm_embedding", "no_scale_embedding", "add_type_embedding",
               "patch_layernorm_embedding", "code_layernorm_embedding", "entangle_position_embedding",
               "disable_entangle", "scale_attn", "scale_fc", "scale_heads", "scale_resids", "freeze_resnet")


def builtin_model_args() -> List[str]:
    """The quickstart's caption model (the built-in stage 1), without dropout as OFA's stage 2 trains."""
    from mue_fairseq.cli.quickstart import MODEL_ARGS

    model_args = list(MODEL_ARGS)
    model_args[model_args.index("--dropout") + 1] = "0.0"
    return model_args


def _option(holder, name: str):
    """`name` from a saved config section: an argparse Namespace (legacy architectures) or a DictConfig."""
    if holder is None:
        return None
    if isinstance(holder, argparse.Namespace):
        return getattr(holder, name, None)
    return holder.get(name) if name in holder else None


def checkpoint_model_args(checkpoint: Path) -> Tuple[List[str], Optional[str]]:
    """`model_args_from_state` of the checkpoint file `checkpoint`."""
    from mue_fairseq.ofa.checkpoint import allow_fairseq_checkpoint_globals, read_checkpoint

    allow_fairseq_checkpoint_globals()
    return model_args_from_state(read_checkpoint(str(checkpoint)), checkpoint)


def model_args_from_state(state: Dict, checkpoint) -> Tuple[List[str], Optional[str]]:
    """`--arch` and the SHAPE_* options (and `--patch-image-size`) of a loaded caption checkpoint's
    saved config, as a stage-2 command line repeats them, plus `--dropout 0.0` (OFA's stage 2); and
    the criterion the checkpoint was trained with. Errors name `checkpoint` (the file)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from mue_fairseq.ofa.checkpoint import MUE_ARCHITECTURES, OFA_ARCHITECTURES, checkpoint_architecture

    importlib.import_module("mue_fairseq.models")  # registers the mue_ofa_* architectures
    if state.get("cfg") is None:
        raise ValueError(f"{checkpoint}: no saved config ('cfg'): cannot tell the model's sizes")
    model, task = state["cfg"].get("model"), state["cfg"].get("task")
    arch = checkpoint_architecture(state)
    if arch in OFA_ARCHITECTURES:
        arch = f"mue_{arch}"  # the same model with exits (no new parameters)
    if arch not in MUE_ARCHITECTURES:
        raise ValueError(f"{checkpoint}: architecture {arch!r} is not an OFA model; expected one of "
                         f"{list(OFA_ARCHITECTURES + MUE_ARCHITECTURES)}")
    preset = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](preset)  # the values the architecture fills in for options not given
    args = ["--arch", arch]
    for name in SHAPE_VALUES:
        value = _option(model, name)
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    for name in SHAPE_FLAGS:
        value = _option(model, name)
        if value:
            args.append(f"--{name.replace('_', '-')}")
        elif value is not None and getattr(preset, name, False):
            raise ValueError(f"{checkpoint}: {name} is off in the saved config, but architecture {arch} turns it "
                             "on and a command line cannot turn it off")
    size = _option(task, "patch_image_size") or _option(model, "patch_image_size")
    if size is None:
        raise ValueError(f"{checkpoint}: the saved config records no patch_image_size")
    criterion = _option(state["cfg"].get("criterion"), "_name")
    return args + ["--patch-image-size", str(size), "--dropout", "0.0"], criterion


def stage2_command(data_dir: Path, restore: Path, save_dir: Path, variant: str, args,
                   thresholds: Dict[str, float], model_args: Sequence[str] = None) -> List[str]:
    """`python -m mue_fairseq.cli.train` for one stage-2 variant (OFA's stage-2 options where they apply);
    `model_args` the model's options (default: the built-in stage 1's, `builtin_model_args()`)."""
    model_args = builtin_model_args() if model_args is None else list(model_args)
    command = [
        sys.executable, "-m", "mue_fairseq.cli.train",
        f"{data_dir}/caption_stage2_train.tsv,{data_dir}/caption_valid.tsv", "--user-dir", str(REPO / "mue_fairseq"),
        "--task", "caption", "--bpe-dir", args.bpe_dir, "--selected-cols", "1,4,2", "--max-src-length", "40",
        "--max-tgt-length", "20", *model_args,
        "--restore-file", str(restore), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        *VARIANTS[variant]["criterion"], "--scst", "--scst-args", args.scst_args,
        "--scst-cider-cached-tokens", str(data_dir / "cider_cached_tokens" / "coco-train-words.p"),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-08", "--lr", str(args.stage2_lr),
        "--weight-decay", "0.01", "--clip-norm", "1.0", "--lr-scheduler", "polynomial_decay",
        "--warmup-updates", str(max(args.stage2_updates // 10, 1)), "--total-num-update", str(args.stage2_updates),
        "--max-update", str(args.stage2_updates), "--max-epoch", "100", "--batch-size", str(args.stage2_batch_size),
        "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "5", "--seed", "1",
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--no-save-optimizer-state", "--disable-validation",
    ]
    if variant == "layerwise_scst_exits":
        command += [f"--{name.replace('_', '-')}={value}" for name, value in thresholds.items()]
    return command


def train_stage2(command: List[str], save_dir: Path, updates: int) -> Dict:
    """Run `command` unless `save_dir` holds its finished checkpoint; its logged training records."""
    checkpoint, done, log_path = save_dir / "checkpoint_last.pt", save_dir / "command.json", save_dir / "train.log"
    if checkpoint.exists() and done.exists() and json.loads(done.read_text())["command"] == command[1:]:
        logger.info("reusing %s", checkpoint)
    else:
        save_dir.mkdir(parents=True, exist_ok=True)
        logger.info("stage 2, %d updates: %s", updates, " ".join(command))
        start = time.perf_counter()
        with log_path.open("w") as log:
            subprocess.run(command, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        done.write_text(json.dumps({"command": command[1:], "seconds": time.perf_counter() - start}))
    records = []
    for line in log_path.read_text().splitlines():
        parts = [part.strip() for part in line.split(" | ")]
        if len(parts) > 3 and parts[2] == "train":  # the epoch's summary: `key value` fields
            records.append({k: v for k, v in (p.split(" ", 1) for p in parts[3:] if " " in p)})
    return {"checkpoint": str(checkpoint), "train_seconds": json.loads(done.read_text())["seconds"],
            "train_log": records, "command": command[1:]}


def evaluate_model(checkpoint: Path, data_dir: Path, args) -> Dict:
    """Per-depth CIDEr-D on test, thresholds calibrated on valid, and the timed test comparison."""
    import torch

    from mue_fairseq.cli import quickstart
    from mue_fairseq.cli.evaluate import run_evaluation
    from mue_fairseq.cli.sweep import Sweeper
    from mue_fairseq.exits.selection import FULL_DEPTH, THRESHOLD_OPTIONS

    models, task, cfg = quickstart.load("caption", checkpoint, data_dir, args.bpe_dir, args.batch_size)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = models[0]
    cfg.generation.beam = args.beam
    subsets = {split: first_rows(data_dir / f"caption_{split}.tsv", Path(args.work_dir) / "eval" / f"{split}.tsv",
                                 args.rows) for split in ("valid", "test")}

    def evaluate(split: str, options: Dict):
        task.cfg.data = str(subsets[split])  # OFA's tasks read the last --data file for every split but train
        model.set_exit_options(**{**NEUTRAL, **options})
        return run_evaluation(models, task, cfg, subset=split, progress=False)

    num_layers = len(model.decoder.layers)
    depth = {}
    for layers in range(1, num_layers + 1):
        result, _ = evaluate("test", {"mue_exit_policy": "static", "mue_static_decoder_layers": layers}
                             if layers < num_layers else {})
        depth[layers] = result.quality()
        logger.info("%s: decoder depth %d: CIDEr-D %.2f", checkpoint.parent.name, layers, depth[layers])

    evaluate("valid", {})  # warm-up, untimed; leaves the similarity policy at thresholds 1 for the sweep
    task.cfg.data = str(subsets["valid"])
    sweeper = Sweeper(models, task, cfg, "valid")
    grid = [parse_floats(args.thresholds)] * 3
    chosen = sweeper.coordinate_descent(grid, args.target, rounds=1, time_tolerance=args.time_tolerance)
    reference = sweeper.reference

    points = [{"policy": "full depth", "value": "", "options": {}},
              {"policy": "MuE", "value": chosen.describe(), "options": chosen.as_options()}]
    timed = timed_rounds(points, lambda point: evaluate("test", point["options"]), args.repeats)
    (full, full_stats), (exits, exit_stats) = [(entry["result"], entry["stats"]) for entry in timed]
    summary = exit_stats.summary() if len(exit_stats) else {}
    return {
        "checkpoint": str(checkpoint), "decoder_layers": num_layers, "cider_by_decoder_depth": depth,
        "full_depth_cider": full.quality(),
        "valid": {"full_depth_cider": reference.quality, "calibrated_cider": chosen.quality,
                  "points": len(sweeper.points)},
        "calibrated_thresholds": dict(zip(THRESHOLD_OPTIONS, chosen.thresholds)),
        "calibrated_is_full_depth": tuple(chosen.thresholds) == FULL_DEPTH,
        "exit_cider": exits.quality(), "mean_exit_layers": summary.get("mean_exit_layers", {}),
        "expected_reduction_layers": (summary.get("time_reduction_layers") or {}).get("combined"),
        "full_seconds": timed[0]["seconds"], "exit_seconds": timed[1]["seconds"],
        "seconds_repeats": {"full": timed[0]["seconds_repeats"], "exits": timed[1]["seconds_repeats"]},
        "measured_speedup": timed[0]["seconds"] / timed[1]["seconds"],
    }


def exit_thresholds(evaluation: Dict) -> Dict[str, float]:
    """The stage-1 model's calibrated thresholds, or the decoder at 0.9 when calibration kept full depth
    (the exiting model must exit somewhere)."""
    if evaluation["calibrated_is_full_depth"]:
        logger.warning("stage 1 calibrated to full depth: the exiting model samples with decoder threshold 0.9")
        return {"mue_decoder_threshold": 0.9}
    return {name: value for name, value in evaluation["calibrated_thresholds"].items() if value < 1.0}


# ----------------------------------------------------------------------------- output
def write_outputs(results: Dict, out_dir: Path, stem: str = "stage2") -> None:
    """`stem`.json, .csv, .md and `stem`_depth.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    evaluations = results["models"]
    with (out_dir / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "setting", "cider_d", "decoder_layers", "seconds", "measured_speedup"])
        for name, ev in evaluations.items():
            for layers, cider in ev["cider_by_decoder_depth"].items():
                writer.writerow([name, f"decoder depth {layers}", f"{cider:.3f}", layers, "", ""])
            thresholds = " ".join(f"{k.split('_')[1]}={v:g}" for k, v in ev["calibrated_thresholds"].items())
            writer.writerow([name, "full depth (timed)", f"{ev['full_depth_cider']:.3f}", ev["decoder_layers"],
                             f"{ev['full_seconds']:.3f}", "1.000"])
            writer.writerow([name, f"MuE {thresholds}", f"{ev['exit_cider']:.3f}",
                             _fmt(ev["mean_exit_layers"].get("decoder")), f"{ev['exit_seconds']:.3f}",
                             f"{ev['measured_speedup']:.3f}"])
    (out_dir / f"{stem}.md").write_text(markdown(results))
    plot(evaluations, out_dir / f"{stem}_depth.png", results.get("title", BUILTIN_TITLE), results.get("titles"))


def markdown(results: Dict) -> str:
    evaluations = results["models"]
    titles = {**TITLES, **results.get("titles", {})}
    num_layers = max(ev["decoder_layers"] for ev in evaluations.values())
    lines = ["| model | " + " | ".join(f"dec {k}" for k in range(1, num_layers + 1)) + " |",
             "| --- | " + " | ".join("---:" for _ in range(num_layers)) + " |"]
    for name, ev in evaluations.items():
        lines.append(f"| {titles[name]} | " + " | ".join(f"{ev['cider_by_decoder_depth'][k]:.2f}"
                                                       for k in range(1, num_layers + 1)) + " |")
    lines += ["", "| model | full depth | MuE thresholds (img / txt / dec) | CIDEr-D with exits | mean layers "
              "(img / txt / dec) | full s | exits s | speed-up |", "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    for name, ev in evaluations.items():
        t = ev["calibrated_thresholds"]
        layers = ev["mean_exit_layers"]
        lines.append(
            f"| {titles[name]} | {ev['full_depth_cider']:.2f} | {t['mue_image_threshold']:g} / "
            f"{t['mue_text_threshold']:g} / {t['mue_decoder_threshold']:g} | {ev['exit_cider']:.2f} | "
            f"{_fmt(layers.get('image'))} / {_fmt(layers.get('text'))} / {_fmt(layers.get('decoder'))} | "
            f"{ev['full_seconds']:.2f} | {ev['exit_seconds']:.2f} | {ev['measured_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(evaluations: Dict, path: Path, title: str = None, titles: Dict[str, str] = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    titles = {**TITLES, **(titles or {})}
    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name, ev in evaluations.items():
        depths = sorted(ev["cider_by_decoder_depth"], key=int)
        axes.plot([int(k) for k in depths], [ev["cider_by_decoder_depth"][k] for k in depths], "-o", markersize=4,
                  label=titles[name])
    axes.set_xticks(range(1, max(ev["decoder_layers"] for ev in evaluations.values()) + 1))
    axes.set_xlabel("decoder exit depth (every token)")
    axes.set_ylabel("CIDEr-D (test)")
    axes.set_title(title or BUILTIN_TITLE, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] = None) -> Dict:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="stage2",
                        help="the result files' name (<name>.json, .csv, .md, <name>_depth.png) and the default "
                        "--work-dir's (work_dirs/bench_<name>)")
    parser.add_argument("--work-dir", help="checkpoints and evaluation subsets (default work_dirs/bench_<name>)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--stage1-checkpoint",
                        help="start stage 2 from this stage-1 caption checkpoint instead of training the built-in "
                        "one (needs --data-dir); the model's sizes come from its saved config")
    parser.add_argument("--data-dir", help="with --stage1-checkpoint: its caption data (" + ", ".join(DATA_FILES) + ")")
    parser.add_argument("--bpe-dir", default=os.environ.get("MUE_BPE_DIR", str(REPO.parent / "shared" / "ofa_bpe")))
    parser.add_argument("--num-train", type=int, default=1000, help="training images of the built-in task")
    parser.add_argument("--stage1-updates", type=int, default=120)
    parser.add_argument("--stage2-updates", type=int, default=15)
    parser.add_argument("--stage2-batch-size", type=int, default=8, help="images per stage-2 batch (x beam samples)")
    parser.add_argument("--stage2-lr", type=float, default=1e-4)
    parser.add_argument("--scst-args", default='{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}')
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rows", type=int, default=50, help="rows of valid and of test evaluated")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--thresholds", default="0.9,0.8", help="values tried per stream in calibration")
    parser.add_argument("--target", type=float, default=0.96, help="share of full-depth CIDEr-D to keep on valid")
    parser.add_argument("--time-tolerance", type=float, default=0.0,
                        help="calibration: settings within this relative time of the fastest count as tied and the "
                        "one with the least expected time wins (as mue_fairseq.cli.sweep's option)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds on test (best kept)")
    parser.add_argument("--skip-training", action="store_true",
                        help="only evaluate the checkpoints already in --work-dir (error if one is missing)")
    args = parser.parse_args(argv)
    if args.work_dir is None:
        args.work_dir = str(REPO / "work_dirs" / f"bench_{args.name}")
    if bool(args.stage1_checkpoint) != bool(args.data_dir):
        parser.error("--stage1-checkpoint and --data-dir go together (a given stage 1 and the data it was trained on)")
    if args.stage1_checkpoint:
        if not Path(args.stage1_checkpoint).is_file():
            parser.error(f"--stage1-checkpoint: no checkpoint {args.stage1_checkpoint}")
        missing = [name for name in DATA_FILES if not (Path(args.data_dir) / name).is_file()]
        if missing:
            parser.error(f"--data-dir {args.data_dir}: no {', '.join(missing)}")

    from data_utils.synthetic import build_synthetic_task
    from mue_fairseq.cli import quickstart
    from mue_fairseq.data.ofa_bpe import check_bpe_dir

    check_bpe_dir(args.bpe_dir)
    work = Path(args.work_dir)
    data_dir = Path(args.data_dir).absolute() if args.data_dir else work / "data"
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    stage1 = (Path(args.stage1_checkpoint).absolute() if args.stage1_checkpoint
              else work / "stage1" / "checkpoint_last.pt")
    titles = {"stage1": "stage 1 (given checkpoint)"} if args.stage1_checkpoint else {}
    if args.skip_training:
        missing = [str(p) for p in [stage1] + [work / v / "checkpoint_last.pt" for v in variants] if not p.exists()]
        if missing:
            parser.error(f"--skip-training: no checkpoint {', '.join(missing)} (run without it first)")
    elif args.stage1_checkpoint:
        model_args, criterion = checkpoint_model_args(stage1)
        titles["stage1"] = f"stage 1 (given checkpoint, {criterion or 'criterion not recorded'})"
        logger.info("stage 1 given: %s; stage 2's model options from its config: %s", stage1, " ".join(model_args))
    else:
        if not (data_dir / "synthetic_task_info.json").exists():
            build_synthetic_task(data_dir, seed=1, num_train=args.num_train, num_valid=100, num_test=100)
        start = time.perf_counter()
        stage1 = quickstart.train("caption", data_dir, work / "stage1", args.stage1_updates, 16, args.bpe_dir)
        logger.info("stage 1 ready (%.0f s)", time.perf_counter() - start)
        model_args = builtin_model_args()

    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "out_dir", "bpe_dir")},
               "machine": {"threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()},
               "stage1_checkpoint": str(stage1), "training": {}, "models": {}, "titles": titles,
               "title": (f"Caption stage 2 from {args.stage1_checkpoint}" if args.stage1_checkpoint else BUILTIN_TITLE)}
    if not args.skip_training:
        results["stage2_model_args"] = model_args
    results["models"]["stage1"] = evaluate_model(stage1, data_dir, args)
    thresholds = exit_thresholds(results["models"]["stage1"])
    for variant in variants:
        save_dir = work / variant
        if args.skip_training:
            results["training"][variant] = {"checkpoint": str(save_dir / "checkpoint_last.pt")}
        else:
            command = stage2_command(data_dir, stage1, save_dir, variant, args, thresholds, model_args)
            results["training"][variant] = train_stage2(command, save_dir, args.stage2_updates)
        results["models"][variant] = evaluate_model(save_dir / "checkpoint_last.pt", data_dir, args)
        results["machine"]["load_average_end"] = os.getloadavg()
        write_outputs(results, Path(args.out_dir), args.name)  # after each model: an interrupted run keeps its part
    write_outputs(results, Path(args.out_dir), args.name)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
