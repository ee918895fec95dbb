"""The user's journey, end to end (issue 17): from a caption checkpoint trained by OFA's own
`train.py` to faster evaluation with MuE, measured against OFA's own `evaluate.py` on that checkpoint.

Stages, each skipped when its output exists (`--redo STAGE ...` runs it again):

1. `start`      tools/ofa_harness/train_ofa_caption.sh: OFA's train.py on the built-in caption task
                (OFA's environment; a checkpoint never trained with the layer-wise loss);
2. `finetune`   run_scripts/caption/train_caption_mue.sh: fairseq-train with `--criterion
                mue_layerwise_ce`, arch mue_ofa_tiny of the same shape, restored from the start;
3. `reference`  the start's full-depth CIDEr-D on the valid split (our evaluate without MuE options,
                which gives OFA's captions, checked on test in stage 5);
4. `calibrate`  run_scripts/caption/sweep_caption_mue.sh on the fine-tuned checkpoint and the valid
                split, once per target: the fastest thresholds (coordinate search) that keep
                target x the *start's* CIDEr-D (`--reference-quality`), not the fine-tuned one's;
5. `evaluate`   on test, every run a whole command, interleaved rounds (`--repeats`), fastest kept:
                OFA's evaluate.py on the start at batch 16 (the reference wall-clock), ours on the
                start at full depth, ours on the fine-tuned checkpoint at full depth and with each
                target's thresholds at batch 1 and 16, and the MuE authors' evaluate.py (batch 1) on
                the fine-tuned checkpoint with each target's thresholds.

Speed-ups are OFA's wall-clock over each run's wall-clock; `model` is the generation time our CLI
reports (process start, loading and scoring left out), and its speed-up is over ours on the start at
full depth, batch 16. Runs and their timing come from benchmarks/bench_peers.py.

    python benchmarks/bench_journey.py                       # everything (about 20 min on 2 idle cores)
    python benchmarks/bench_journey.py --redo evaluate       # re-time stage 5 alone

Results: benchmarks/results/journey<tag>.{json,csv,md,png}; the stages' files in --work-dir.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_peers import REPO, SHARED, TASKS, caption_tokens, check_peer, quality, run_once  # noqa: E402

STAGES = ("start", "finetune", "reference", "calibrate", "evaluate")
# The start's shape (tools/ofa_harness/train_ofa_caption.sh): the fine-tuned model must match it.
MODEL_ARGS = ("--encoder-embed-dim 128 --encoder-ffn-embed-dim 256 --encoder-layers 4 --decoder-layers 4 "
              "--encoder-attention-heads 4 --decoder-attention-heads 4 --resnet-type resnet18 "
              "--image-bucket-size 8 --token-bucket-size 32")
FULL_DEPTH = {"mue_image_threshold": 1.0, "mue_text_threshold": 1.0, "mue_decoder_threshold": 1.0}


def target_name(target: float) -> str:
    """0.96 -> 'mue96' (the runs and folders of one calibration target)."""
    return f"mue{round(100 * target):d}"


def calibration_targets(reference_quality: float, targets) -> dict:
    """The absolute quality each target fraction asks for, by target name."""
    if not reference_quality > 0:
        raise ValueError(f"the start's reference quality must be positive, got {reference_quality}")
    return {target_name(t): t * reference_quality for t in targets}


def configurations(targets, thresholds: dict, our_batch_sizes, authors: bool):
    """(name, tool, batch, options, checkpoint key) of stage 5: options are our --mue-* values, the
    authors' (image, text, decoder) thresholds, or None for OFA."""
    runs = [("ofa_start_b16", "ofa", 16, None, "start"),
            ("ours_start_full_b16", "ours", 16, {}, "start"),
            ("ours_tuned_full_b16", "ours", 16, dict(FULL_DEPTH), "tuned")]
    for target in targets:
        name, options = target_name(target), thresholds[target_name(target)]
        runs += [(f"ours_tuned_{name}_b{b}", "ours", b, dict(options), "tuned") for b in our_batch_sizes]
        if authors:
            runs.append((f"authors_tuned_{name}_b1", "authors", 1,
                         tuple(options[k] for k in FULL_DEPTH), "tuned"))
    return runs


# ---------------------------------------------------------------------------- stages 1-4
def run_logged(argv, log: Path, cwd: Path = REPO, env=None) -> None:
    """Run a stage's command, its output into `log`; exit naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(map(str, argv))}  (log: {log})", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run([str(a) for a in argv], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                   "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(map(str, argv))}\n--- {log} (tail):\n"
                 + "".join(log.read_text().splitlines(True)[-30:]))


def train_start(args, work: Path) -> Path:
    checkpoint = work / "ofa_caption" / "checkpoints" / "checkpoint_last.pt"
    if "start" in args.redo or not checkpoint.is_file():
        run_logged(["bash", REPO / "tools" / "ofa_harness" / "train_ofa_caption.sh", work / "ofa_caption"],
                   work / "logs" / "start.log", env={"UPDATES": str(args.start_updates),
                                                      "OFA_PEER_DIR": str(args.ofa_peer_dir)})
    return checkpoint


def finetune(args, work: Path, start: Path, data: Path) -> Path:
    save = work / "tuned"
    checkpoint = save / "checkpoint_last.pt"
    if "finetune" in args.redo or not checkpoint.is_file():
        updates = args.finetune_updates
        env = {"data_dir": str(data), "data": f"{data}/caption_train.tsv,{data}/caption_valid.tsv",
               "restore_file": str(start), "arch": "mue_ofa_tiny", "save_path": str(save),
               "log_dir": str(work / "logs"), "log_file": str(work / "logs" / "finetune_fairseq.log"),
               "bpe_dir": str(args.bpe_dir), "lr": str(args.finetune_lr), "batch_size": "16", "update_freq": "1",
               "max_epoch": "100", "warmup_ratio": "0",  # scheduled in updates (extra_args), not epochs
               "patch_image_size": "64", "dropout": "0.0", "encoder_drop_path_rate": "0.0",
               "decoder_drop_path_rate": "0.0", "drop_worst_ratio": "0.0",
               "save_interval_updates": str(updates), "validate_interval_updates": str(updates),
               "MASTER_PORT": str(args.master_port),
               "extra_args": f"{MODEL_ARGS} --max-update {updates} --total-num-update {updates} "
                             f"--warmup-updates {max(updates // 10, 1)} --seed 1"}
        run_logged(["bash", REPO / "run_scripts" / "caption" / "train_caption_mue.sh"],
                   work / "logs" / "finetune.log", env=env)
    return checkpoint


def start_reference(args, work: Path, start: Path, data: Path) -> float:
    """CIDEr-D of the start at full depth on valid, as the checkpoint is (no MuE option)."""
    out = work / "reference"
    scores = out / "valid_scores.json"
    if "reference" in args.redo or not scores.is_file():
        tsv = data / "caption_valid.tsv"
        overrides = {"data": str(tsv), "bpe_dir": str(args.bpe_dir), "eval_cider": False, "selected_cols": "1,4,2"}
        run_logged([sys.executable, "-m", "mue_fairseq.cli.evaluate", tsv, f"--path={start}",
                    f"--user-dir={REPO / 'mue_fairseq'}", "--task=caption", "--batch-size=16", "--seed=7",
                    "--gen-subset=valid", f"--results-path={out}", "--beam=5", "--max-len-b=16",
                    "--no-repeat-ngram-size=3", "--num-workers=0", "--cpu", "--no-plots",
                    f"--model-overrides={overrides!r}"], work / "logs" / "reference.log")
    values = json.loads(scores.read_text())
    return float(values.get("CIDEr", values["cider_d"]))


def calibrate(args, work: Path, tuned: Path, data: Path, reference: float) -> dict:
    """Per target: the thresholds the sweep calibrated and its calibration record."""
    out = {}
    for target in args.targets:
        name = target_name(target)
        result = work / "sweep" / name
        calibration = result / "valid_calibration.json"
        if "calibrate" in args.redo or not calibration.is_file():
            env = {"data_dir": str(data), "path": str(tuned), "result_path": str(result),
                   "bpe_dir": str(args.bpe_dir), "search": "coordinate", "target": str(target),
                   "image_thresholds": args.image_thresholds, "text_thresholds": args.text_thresholds,
                   "decoder_thresholds": args.decoder_thresholds, "batch_size": "16",
                   "mue_args": f"--reference-quality {reference!r}"}
            run_logged(["bash", REPO / "run_scripts" / "caption" / "sweep_caption_mue.sh", "valid"],
                       work / "logs" / f"sweep_{name}.log", env=env)
        record = json.loads(calibration.read_text())
        out[name] = record
    return out


# ---------------------------------------------------------------------------- stage 5
def evaluate(args, work: Path, checkpoints: dict, thresholds: dict, tsv: Path) -> list:
    spec = TASKS["caption"]
    configs = configurations(args.targets, thresholds, args.our_batch_sizes, not args.no_authors)
    best, stable, failed = {}, {c[0]: True for c in configs}, {}
    for round_ in range(args.repeats):
        shift = round_ % len(configs)
        for name, tool, batch, options, which in configs[shift:] + configs[:shift]:
            if name in failed:
                continue
            print(f"[journey] round {round_ + 1}/{args.repeats}: {name} ...", flush=True)
            try:
                out = run_once(args, "caption", (name, tool, batch, options), tsv, checkpoints[which],
                               work / "evaluate")
            except SystemExit as error:  # a peer that cannot run this checkpoint: reported, not fatal
                if tool != "authors":
                    raise
                failed[name] = str(error)[-3000:]
                print(f"[journey] {name} failed; reported in the results", flush=True)
                continue
            if name in best:
                stable[name] &= out["predictions"] == best[name]["predictions"]
            if name not in best or out["wall_s"] < best[name]["wall_s"]:
                best[name] = out
    ofa = best["ofa_start_b16"]
    start_cider = quality("caption", ofa["predictions"], tsv, spec["selected_cols"])["cider_d"]
    ours_start_model = best["ours_start_full_b16"]["model_s"]
    rows = []
    for name, tool, batch, options, which in configs:
        row = {"run": name, "tool": tool, "batch_size": batch, "checkpoint": which,
               "thresholds": (list(options.values()) if isinstance(options, dict) and options else
                              list(options) if isinstance(options, tuple) else None)}
        if name in failed:
            rows.append({**row, "error": failed[name]})
            continue
        run = best[name]
        preds = run["predictions"]
        cider = quality("caption", preds, tsv, spec["selected_cols"])["cider_d"]
        tokens = caption_tokens(preds.values(), args.bpe_dir)
        row.update({
            "wall_s": run["wall_s"], "model_s": run["model_s"], "samples": len(preds), "tokens": tokens,
            "wall_ms_per_sample": 1000 * run["wall_s"] / len(preds),
            "model_ms_per_sample": 1000 * run["model_s"] / len(preds) if run["model_s"] is not None else None,
            "cider_d": cider, "of_start_cider": cider / start_cider if start_cider else None,
            "equal_to_ofa_start": sum(preds.get(k) == v for k, v in ofa["predictions"].items()),
            "speedup_vs_ofa": ofa["wall_s"] / run["wall_s"],
            "model_speedup_vs_ours_start": (ours_start_model / run["model_s"]
                                            if run["model_s"] and ours_start_model else None),
            "same_predictions_every_round": stable[name], "command": run["command"], "cwd": run["cwd"]})
        if run["exit_stats_summary"]:
            row["mean_exit_layers"] = run["exit_stats_summary"].get("mean_exit_layers")
        rows.append(row)
    return rows


def verdict(rows, targets) -> list:
    """Issue 17's journey target, per calibration target: speed-up over OFA's evaluate.py >= 1.5x."""
    lines = []
    for target in targets:
        name = target_name(target)
        for row in rows:
            if row["run"].startswith(f"ours_tuned_{name}_") and "wall_s" in row:
                met = row["speedup_vs_ofa"] >= 1.5
                lines.append(f"{row['run']}: {row['speedup_vs_ofa']:.2f}x OFA at {100 * row['of_start_cider']:.1f}% of "
                             f"the start's test CIDEr-D ({'met' if met else 'missed'}: target 1.5x)")
    return lines


# ---------------------------------------------------------------------------- output
CSV_COLUMNS = ("run", "tool", "checkpoint", "batch_size", "thresholds", "wall_s", "model_s", "wall_ms_per_sample",
               "model_ms_per_sample", "tokens", "cider_d", "of_start_cider", "equal_to_ofa_start", "speedup_vs_ofa",
               "model_speedup_vs_ours_start", "mean_exit_layers", "error")


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else "" if v is None else v)
                             for k, v in row.items()})


def markdown(report: dict) -> str:
    def layers(row):
        m = row.get("mean_exit_layers") or {}
        return "/".join("-" if m.get(s) is None else f"{m[s]:.2f}" for s in ("image", "text", "decoder")) if m else "-"

    cal = report["calibration"]
    lines = [f"Command: `{report['command']}`", "",
             f"{report['date']}, {report['machine']}, load average {report['load_average']}; one thread; fastest of "
             f"{report['repeats']} interleaved round(s); beam 5, max-len-b 16, no-repeat-ngram-size 3; "
             f"{report['test_rows']} test images.", "",
             f"Start: OFA `train.py`, {report['start_updates']} updates (`tools/ofa_harness/train_ofa_caption.sh`); "
             f"fine-tuned: `mue_layerwise_ce`, {report['finetune_updates']} updates "
             f"(`run_scripts/caption/train_caption_mue.sh`). Start's valid CIDEr-D at full depth "
             f"{report['reference_quality']:.2f}.", "",
             "| target (x start's valid CIDEr-D) | thresholds image/text/decoder | valid CIDEr-D | met on valid |",
             "| --- | --- | ---: | --- |"]
    for name, record in cal.items():
        t = record["thresholds"]
        lines.append(f"| {record['target']:g} ({record['target'] * report['reference_quality']:.2f}) | "
                     f"{t['mue_image_threshold']:g}/{t['mue_text_threshold']:g}/{t['mue_decoder_threshold']:g} | "
                     f"{record['quality']:.2f} | {'yes' if record.get('meets_target', True) else 'no'} |")
    lines += ["", "| run | checkpoint | batch | wall-clock (s) | model (s) | model ms / sample | CIDEr-D | "
              "x start's | equal to OFA (start) | mean exit layers img/txt/dec | x OFA (wall) | x ours start (model) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['checkpoint']} | {r['batch_size']} | failed: see notes | | | | | | | | |")
            continue
        model = f"{r['model_s']:.2f}" if r["model_s"] is not None else "-"
        per = f"{r['model_ms_per_sample']:.1f}" if r["model_ms_per_sample"] is not None else "-"
        mx = f"{r['model_speedup_vs_ours_start']:.2f}" if r["model_speedup_vs_ours_start"] else "-"
        lines.append(f"| {r['run']} | {r['checkpoint']} | {r['batch_size']} | {r['wall_s']:.2f} | {model} | {per} | "
                     f"{r['cider_d']:.2f} | {r['of_start_cider']:.3f} | {r['equal_to_ofa_start']} / {r['samples']} | "
                     f"{layers(r)} | {r['speedup_vs_ofa']:.2f} | {mx} |")
    lines += ["", "Target (issue 17): at 96 % of the OFA checkpoint's CIDEr-D, >= 1.5x OFA's evaluate.py:", ""]
    lines += [f"- {line}" for line in report["verdict"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """CIDEr-D against speed-up over OFA's evaluate.py (wall-clock) and over ours at full depth (model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    runs = [r for r in report["runs"] if "error" not in r]
    start = next(r["cider_d"] for r in runs if r["run"] == "ofa_start_b16")
    colors = {"ofa": "black", "ours": "tab:blue", "authors": "tab:orange"}
    for index, (key, label) in enumerate((("speedup_vs_ofa", "speed-up over OFA's evaluate.py, batch 16 (wall-clock)"),
                                          ("model_speedup_vs_ours_start", "speed-up over ours on the start, batch 16 "
                                                                          "(model time)"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for r in runs:
            if r.get(key):
                axes.scatter([r[key]], [r["cider_d"]], color=colors[r["tool"]], s=30,
                             marker="o" if r["batch_size"] == 1 else "s")
                axes.annotate(r["run"], (r[key], r["cider_d"]), textcoords="offset points", xytext=(3, 3), fontsize=6)
        for target in report["targets"]:
            axes.axhline(target * start, linestyle="--", linewidth=1, color="tab:green")
            axes.annotate(f"{target:g} x start", (axes.get_xlim()[0], target * start), fontsize=6, color="tab:green")
        if index == 0:
            axes.axvline(1.5, linestyle=":", linewidth=1, color="tab:red")
        axes.set_xlabel(label, fontsize=8)
        axes.set_ylabel("CIDEr-D (test)")
        axes.grid(alpha=0.3)
    figure.suptitle("The journey: OFA checkpoint -> layer-wise fine-tuning -> calibrated MuE (circles: batch 1, "
                    "squares: batch 16; black OFA, blue ours, orange authors)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "work_dirs" / "journey")
    parser.add_argument("--redo", nargs="+", choices=STAGES, default=[], help="run these stages even if done")
    parser.add_argument("--start-updates", type=int, default=400, help="OFA train.py updates of the start")
    parser.add_argument("--finetune-updates", type=int, default=200, help="layer-wise fine-tuning updates")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.99, 0.96],
                        help="calibration targets, fractions of the start's valid CIDEr-D")
    parser.add_argument("--image-thresholds", default="1,0.97,0.95,0.9")
    parser.add_argument("--text-thresholds", default="1,0.97,0.95,0.9")
    parser.add_argument("--decoder-thresholds", default="1,0.97,0.95,0.9,0.8")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved evaluation rounds; fastest kept")
    parser.add_argument("--our-batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-authors", action="store_true", help="leave out the MuE authors' evaluate.py")
    parser.add_argument("--bpe-dir", type=Path, default=Path(os.environ.get("MUE_BPE_DIR", SHARED / "ofa_bpe")))
    parser.add_argument("--ofa-peer-dir", type=Path, default=REPO / "work_dirs" / "ofa_peer")
    parser.add_argument("--authors-peer-dir", type=Path, default=REPO / "work_dirs" / "authors_peer")
    parser.add_argument("--master-port", type=int, default=29561, help="fine-tuning's torchrun port")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.start_updates < 1 or args.finetune_updates < 1:
        parser.error("--repeats, --start-updates and --finetune-updates must be >= 1")
    bad = [t for t in args.targets if not 0 < t <= 1]
    if bad:
        parser.error(f"--targets must be fractions in (0, 1], got {bad}")
    if len({target_name(t) for t in args.targets}) != len(args.targets):
        parser.error(f"--targets must differ in whole percent, got {args.targets}")
    # bench_peers' run_once reads these
    args.beam, args.max_len_b, args.no_repeat_ngram_size = 5, 16, 3
    args.work_dir = args.work_dir.resolve()
    return args


def main(argv=None):
    args = parse_args(argv)
    if not (args.bpe_dir / "dict.txt").is_file():
        sys.exit(f"--bpe-dir {args.bpe_dir} has no dict.txt")
    check_peer(args.ofa_peer_dir, ".ofa-commit", "setup_ofa_env.sh")
    if not args.no_authors:
        check_peer(args.authors_peer_dir, ".authors-patched", "setup_authors_env.sh")
    work = args.work_dir
    start = train_start(args, work)
    data = work / "ofa_caption" / "data"
    tuned = finetune(args, work, start, data)
    reference = start_reference(args, work, start, data)
    print(f"[journey] start's valid CIDEr-D {reference:.2f}; targets "
          f"{calibration_targets(reference, args.targets)}", flush=True)
    cal = calibrate(args, work, tuned, data, reference)
    thresholds = {name: record["thresholds"] for name, record in cal.items()}
    rows = evaluate(args, work, {"start": start, "tuned": tuned}, thresholds, data / "caption_test.tsv")
    report = {"command": "python benchmarks/bench_journey.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
              "repeats": args.repeats, "start_updates": args.start_updates,
              "finetune_updates": args.finetune_updates, "finetune_lr": args.finetune_lr,
              "test_rows": rows[0]["samples"], "targets": args.targets, "reference_quality": reference,
              "calibration": cal, "checkpoints": {"start": str(start), "tuned": str(tuned)}, "runs": rows}
    report["verdict"] = verdict(rows, [t for t in args.targets if abs(t - 0.96) < 1e-9] or args.targets)
    out = REPO / "benchmarks" / "results" / f"journey{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_csv(rows, out.with_suffix(".csv"))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    plot(report, out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
