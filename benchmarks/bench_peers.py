"""Ours against the peers, side by side: OFA's own `evaluate.py`, the MuE authors' `evaluate.py`
(Tangshengku/OFA) and `python -m mue_fairseq.cli.evaluate`, on the same checkpoint, TSV and
arguments, each as a whole command (process start, loading, data, model, scoring, result file).

Runs per task (caption and SNLI-VE):

* `ofa`            OFA's evaluate.py, full depth, at OFA's batch size (`--ofa-batch-size`, 16);
* `authors`        the authors' evaluate.py at their batch size 1 with their thresholds
                   (`--img_thres --txt_thres --decoder_thres`, `train_mue`);
* `ours_full`      ours, full depth (the checkpoint as saved), batch 1 and 16;
* `ours_mue`       ours, MuE as the paper describes it, the same thresholds, batch 1 and 16;
* `ours_preset`    ours with `--mue-preset authors` and the same thresholds, batch 1.

Each round runs every configuration once, in a rotated order (`--repeats` rounds); the fastest
wall-clock of each is kept. Per run: wall-clock of the whole command, model time where the tool
reports it (ours: generation / answer scoring only), time per sample and, for captions, per
generated token (tokens of each caption re-encoded with OFA's BPE, plus EOS), quality with our
scorers on the same references (CIDEr-D; SNLI-VE accuracy), and predictions equal to OFA's.

Peers' environments: tools/ofa_harness/setup_ofa_env.sh and setup_authors_env.sh (the only changes
to their code are the patches those scripts list). One thread everywhere (`OMP_NUM_THREADS=1`).
`--rows N` repeats the TSV's rows to N (distinct ids) for timing.

    python benchmarks/bench_peers.py --rows 64 --repeats 3 --markdown BENCHMARKS.md
    python benchmarks/bench_peers.py --tasks caption --rows 8 --repeats 1   # smoke run

Results: benchmarks/results/peers<tag>.json and .md (the table and the command).
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tools" / "ofa_harness"
for path in (REPO, HARNESS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from authors_fixture import peer_evaluate_args  # noqa: E402

SHARED = Path(os.environ.get("MUE_SHARED_DIR", REPO.parent / "shared"))
TASKS = {
    "caption": {"tsv": SHARED / "ofa_cli" / "caption_test.tsv",
                "checkpoint": SHARED / "ofa_reference" / "ofa_tiny_holdout.pt",
                "selected_cols": "1,4,2", "id_cols": (0, 1), "thresholds": (0.99, 0.7, 0.9)},
    "snli_ve": {"tsv": SHARED / "ofa_cli" / "snli_ve_test.tsv",
                "checkpoint": SHARED / "ofa_reference" / "ofa_tiny_snli_ve.pt",
                "selected_cols": "0,2,3,4,5", "id_cols": (0,), "thresholds": (0.7, 0.99, 0.7)},
}
BEGIN, END = "<!-- bench_peers:begin -->", "<!-- bench_peers:end -->"


def repeat_tsv(src: Path, dst: Path, rows: int, id_cols) -> Path:
    """The rows of `src` cycled to `rows` rows. When a row appears more than once, every copy k
    gets the ids `<id><k>` in `id_cols` (k zero-padded to one width, so ids stay distinct, and
    numeric where they were: our exit statistics take integer ids)."""
    csv.field_size_limit(1 << 30)
    with open(src, newline="", encoding="utf-8") as f:
        base = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not base:
        raise ValueError(f"{src} has no rows")
    copies = -(-rows // len(base))
    width = len(str(copies - 1)) if copies > 1 else 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n", escapechar=None)
        for n in range(rows):
            row, copy = list(base[n % len(base)]), n // len(base)
            if width:
                for col in id_cols:
                    row[col] = f"{row[col]}{copy:0{width}d}"
            writer.writerow(row)
    return dst


# ---------------------------------------------------------------------------- the configurations
def configurations(args, task: str):
    """(name, tool, batch size, MuE options for ours or thresholds for the authors)."""
    thresholds = args.thresholds.get(task, TASKS[task]["thresholds"])
    image, text, decoder = thresholds
    mue = {"mue_image_threshold": image, "mue_text_threshold": text, "mue_decoder_threshold": decoder}
    out = [("ofa", "ofa", args.ofa_batch_size, None), ("authors", "authors", 1, thresholds)]
    for batch in args.our_batch_sizes:
        out.append((f"ours_full_b{batch}", "ours", batch, {}))
    for batch in args.our_batch_sizes:
        out.append((f"ours_mue_b{batch}", "ours", batch, mue))
    out.append(("ours_preset_b1", "ours", 1, {"mue_preset": "authors", **mue}))
    return out


def command(args, task: str, tool: str, batch: int, options, tsv: Path, checkpoint: Path, results: Path):
    """(argv, cwd, extra environment) of one run."""
    spec = TASKS[task]
    gen = (args.beam, args.max_len_b, args.no_repeat_ngram_size)
    if tool in ("ofa", "authors"):
        peer = args.ofa_peer_dir if tool == "ofa" else args.authors_peer_dir
        argv = [peer / "venv" / "bin" / "python", "../../evaluate.py",
                *peer_evaluate_args(tsv, checkpoint, options, batch, *gen, results, task, spec["selected_cols"])]
        return argv, peer / "src" / "run_scripts" / task, {"NLTK_DATA": str(peer / "nltk_data")}
    overrides = {"data": str(tsv), "bpe_dir": str(args.bpe_dir), "selected_cols": spec["selected_cols"],
                 **({"eval_cider": False} if task == "caption" else {})}
    generation = ([f"--beam={args.beam}", f"--max-len-b={args.max_len_b}",
                   f"--no-repeat-ngram-size={args.no_repeat_ngram_size}"] if task == "caption" else [])
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    argv = [sys.executable, "-m", "mue_fairseq.cli.evaluate", tsv, f"--path={checkpoint}",
            f"--user-dir={REPO / 'mue_fairseq'}", f"--task={task}", f"--batch-size={batch}",
            "--required-batch-size-multiple=1", "--log-format=simple", "--seed=7", "--gen-subset=test",
            f"--results-path={results}", "--num-workers=0", "--cpu", *generation, *flags,
            f"--model-overrides={overrides!r}", "--no-plots"]
    return argv, results.parent, {"PYTHONPATH": str(REPO)}


def check_peer(peer: Path, stamp: str, script: str) -> None:
    if not (peer / "venv" / ".ofa-installed").exists() or not (peer / "src" / stamp).exists():
        sys.exit(f"no peer environment at {peer}: run tools/ofa_harness/{script} (or pass its folder)")


# ---------------------------------------------------------------------------- measures
def caption_tokens(captions, bpe_dir: Path) -> int:
    """Generated tokens, counted as the captions re-encoded with OFA's BPE plus one EOS each."""
    from mue_fairseq.data.ofa_bpe import build_gpt2_bpe

    bpe = build_gpt2_bpe(str(bpe_dir))
    return sum(len(bpe.encode(" " + c).split()) + 1 for c in captions)


def by_id(predictions: list) -> dict:
    key = "image_id" if predictions and "image_id" in predictions[0] else "uniq_id"
    value = "caption" if key == "image_id" else "answer"
    return {str(p[key]): p[value] for p in predictions}


def quality(task: str, predictions: dict, tsv: Path, selected_cols: str) -> dict:
    if task == "caption":
        from compare import caption_cider

        listed = [{"image_id": k, "caption": v} for k, v in predictions.items()]
        return {"cider_d": caption_cider(listed, tsv, selected_cols)}
    from mue_fairseq.metrics.accuracy import load_snli_ve_labels, snli_ve_accuracy

    return {"accuracy": 100.0 * snli_ve_accuracy(predictions, load_snli_ve_labels(str(tsv)))["accuracy"]}


def run_once(args, task, config, tsv, checkpoint, work: Path) -> dict:
    name, tool, batch, options = config
    results = work / name / "results"
    results.mkdir(parents=True, exist_ok=True)
    argv, cwd, env = command(args, task, tool, batch, options, tsv, checkpoint, results)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    start = time.perf_counter()
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{task}/{name} failed ({proc.returncode}) in {cwd}:\n{shlex.join(map(str, argv))}\n"
                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    predictions = by_id(json.loads((results / "test_predict.json").read_text()))
    scores_file = results / "test_scores.json"
    model_seconds = json.loads(scores_file.read_text())["seconds"] if scores_file.exists() else None
    exits_file = results / "test_exit_stats.json"
    return {"wall_s": wall, "model_s": model_seconds, "predictions": predictions,
            "exit_stats_summary": (json.loads(exits_file.read_text()).get("summary") if exits_file.exists() else None),
            "command": shlex.join(map(str, argv)), "cwd": str(cwd)}


def bench_task(args, task: str, work: Path) -> dict:
    spec = TASKS[task]
    checkpoint = Path(getattr(args, f"{task}_checkpoint") or spec["checkpoint"]).resolve()
    source = Path(getattr(args, f"{task}_tsv") or spec["tsv"]).resolve()
    for path in (checkpoint, source):
        if not path.is_file():
            sys.exit(f"{task}: {path} does not exist")
    tsv = repeat_tsv(source, work / f"{task}_{args.rows}.tsv", args.rows, spec["id_cols"]) if args.rows else source
    configs = configurations(args, task)
    best, stable = {}, {name: True for name, *_ in configs}
    for round_ in range(args.repeats):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            name = config[0]
            print(f"[{task}] round {round_ + 1}/{args.repeats}: {name} ...", flush=True)
            out = run_once(args, task, config, tsv, checkpoint, work / task)
            if name in best:
                stable[name] &= out["predictions"] == best[name]["predictions"]
            if name not in best or out["wall_s"] < best[name]["wall_s"]:
                best[name] = out
    ofa, authors = best["ofa"]["predictions"], best["authors"]["predictions"]
    rows = []
    for name, tool, batch, options in configs:
        run = best[name]
        preds = run["predictions"]
        row = {"run": name, "tool": tool, "batch_size": batch, "options": options,
               "wall_s": run["wall_s"], "model_s": run["model_s"], "samples": len(preds),
               "wall_ms_per_sample": 1000 * run["wall_s"] / len(preds),
               "equal_to_ofa": sum(preds.get(k) == v for k, v in ofa.items()),
               "equal_to_authors": sum(preds.get(k) == v for k, v in authors.items()),
               "same_predictions_every_round": stable[name], "command": run["command"], "cwd": run["cwd"],
               **quality(task, preds, tsv, spec["selected_cols"])}
        if task == "caption":
            tokens = caption_tokens(preds.values(), args.bpe_dir)
            row.update(tokens=tokens, wall_ms_per_token=1000 * run["wall_s"] / tokens,
                       model_ms_per_token=(1000 * run["model_s"] / tokens if run["model_s"] is not None else None))
        if run["exit_stats_summary"]:
            row["mean_exit_layers"] = run["exit_stats_summary"].get("mean_exit_layers")
        rows.append(row)
    ofa_wall = best["ofa"]["wall_s"]
    authors_wall = best["authors"]["wall_s"]
    for row in rows:
        row["speedup_vs_ofa"] = ofa_wall / row["wall_s"]
        row["speedup_vs_authors"] = authors_wall / row["wall_s"]
    return {"task": task, "tsv": str(source), "rows": len(ofa), "checkpoint": str(checkpoint),
            "thresholds": list(args.thresholds.get(task, spec["thresholds"])), "runs": rows}


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`", "",
             f"{report['date']}, {report['machine']}; one thread; fastest of {report['repeats']} interleaved "
             f"round(s); beam {report['generation']['beam']}, max-len-b {report['generation']['max_len_b']}, "
             f"no-repeat-ngram-size {report['generation']['no_repeat_ngram_size']} (captions).", ""]
    for task in report["tasks"]:
        metric = "CIDEr-D" if task["task"] == "caption" else "accuracy"
        lines += [f"**{task['task']}**: {task['rows']} rows of `{Path(task['tsv']).name}`, checkpoint "
                  f"`{Path(task['checkpoint']).name}`, thresholds image/text/decoder "
                  f"{'/'.join(str(t) for t in task['thresholds'])}", "",
                  f"| run | batch | wall-clock (s) | model (s) | ms / sample | ms / token | {metric} | equal to OFA | equal to authors | x OFA | x authors |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in task["runs"]:
            model = f"{r['model_s']:.2f}" if r["model_s"] is not None else "-"
            per_token = f"{r['wall_ms_per_token']:.1f}" if "wall_ms_per_token" in r else "-"
            value = r.get("cider_d", r.get("accuracy"))
            lines.append(f"| {r['run']} | {r['batch_size']} | {r['wall_s']:.2f} | {model} | {r['wall_ms_per_sample']:.1f} "
                         f"| {per_token} | {value:.2f} | {r['equal_to_ofa']} / {r['samples']} | {r['equal_to_authors']} / {r['samples']} | "
                         f"{r['speedup_vs_ofa']:.2f} | {r['speedup_vs_authors']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def parse_thresholds(items):
    out = {}
    for item in items or []:
        task, _, values = item.partition("=")
        numbers = tuple(float(v) for v in values.split(","))
        if task not in TASKS or len(numbers) != 3:
            raise argparse.ArgumentTypeError(f"--thresholds takes TASK=image,text,decoder, got {item!r}")
        out[task] = numbers
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--rows", type=int, default=64, help="repeat each TSV's rows to this many (0: as is)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest run is kept")
    parser.add_argument("--ofa-batch-size", type=int, default=16)
    parser.add_argument("--our-batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--thresholds", nargs="+", metavar="TASK=I,T,D",
                        help="image,text,decoder thresholds per task (default: the authors' scripts', "
                             "caption 0.99,0.7,0.9 and snli_ve 0.7,0.99,0.7)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-b", type=int, default=16)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3)
    for task in TASKS:
        parser.add_argument(f"--{task.replace('_', '-')}-tsv", help=f"default {TASKS[task]['tsv']}")
        parser.add_argument(f"--{task.replace('_', '-')}-checkpoint", help=f"default {TASKS[task]['checkpoint']}")
    parser.add_argument("--bpe-dir", type=Path, default=Path(os.environ.get("MUE_BPE_DIR", SHARED / "ofa_bpe")))
    parser.add_argument("--ofa-peer-dir", type=Path, default=REPO / "work_dirs" / "ofa_peer")
    parser.add_argument("--authors-peer-dir", type=Path, default=REPO / "work_dirs" / "authors_peer")
    parser.add_argument("--work-dir", type=Path, default=REPO / "work_dirs" / "bench_peers")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--markdown", type=Path, help="also put the table into this file's bench_peers block")
    args = parser.parse_args(argv)
    args.thresholds = parse_thresholds(args.thresholds)
    if args.repeats < 1 or args.rows < 0:
        parser.error("--repeats must be >= 1 and --rows >= 0")
    if not (args.bpe_dir / "dict.txt").is_file():
        parser.error(f"--bpe-dir {args.bpe_dir} has no dict.txt")
    check_peer(args.ofa_peer_dir, ".ofa-commit", "setup_ofa_env.sh")
    check_peer(args.authors_peer_dir, ".authors-patched", "setup_authors_env.sh")
    args.work_dir = args.work_dir.resolve()
    report = {"command": "python benchmarks/bench_peers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "repeats": args.repeats,
              "generation": {"beam": args.beam, "max_len_b": args.max_len_b,
                             "no_repeat_ngram_size": args.no_repeat_ngram_size},
              "tasks": [bench_task(args, task, args.work_dir) for task in args.tasks]}
    out = REPO / "benchmarks" / "results" / f"peers{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    if args.markdown:
        from markdown_section import update_section

        update_section(args.markdown, "## Against the peers: OFA's and the MuE authors' evaluate.py", BEGIN, END, table)


if __name__ == "__main__":
    main()
