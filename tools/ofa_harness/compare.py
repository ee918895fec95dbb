"""Differential harness: OFA's own evaluate.py against ours on the same TSV, checkpoint and arguments.

    python tools/ofa_harness/compare.py caption --tsv ../shared/ofa_cli/caption_test.tsv \
        --checkpoint ../shared/ofa_reference/ofa_tiny_holdout.pt --batch-size 16 4 --out report.json

Runs, per batch size: OFA's `evaluate.py` in OFA's environment (tools/ofa_harness/setup_ofa_env.sh)
from OFA's `run_scripts/<task>/`, once plainly and once through `ofa_observe.py`, which records
every beam hypothesis (caption) or the answer-score matrix (SNLI-VE); then ours,
`python -m mue_fairseq.cli.evaluate`, and our generator / answer scorer in this process. Prints
and writes (`--out`) predictions equal (count / total), task scores of both, hypothesis tokens equal,
the largest score difference, and how many differing samples are near-ties (top-2 gap < 1e-4).
`--fixture` keeps OFA's side as a small JSON file that `tests/test_ofa_harness.py` checks ours
against without OFA's environment.
"""
import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent
NEAR_TIE = 1e-4
SELECTED_COLS = {"caption": "1,4,2", "snli_ve": "0,2,3,4,5"}


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(checkpoint) -> str:
    """Digest of the model's tensors (interop_checkpoint.weights_digest), whatever else the file holds."""
    import torch

    sys.path.insert(0, str(HERE))
    from interop_checkpoint import weights_digest as digest

    return digest(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])


def default_bpe_dir() -> Path:
    return Path(os.environ.get("MUE_BPE_DIR", REPO.parent / "shared" / "ofa_bpe"))


def generation_args(args) -> list:
    if args.task != "caption":
        return []
    return [f"--beam={args.beam}", f"--max-len-b={args.max_len_b}",
            f"--no-repeat-ngram-size={args.no_repeat_ngram_size}"]


def evaluate_args(args, batch_size: int, results: Path, bpe_dir: str, user_dir: str) -> list:
    """evaluate.py's command line as OFA's run scripts give it (one CPU process)."""
    overrides = {"data": str(args.tsv), "bpe_dir": bpe_dir, "selected_cols": args.selected_cols,
                 **({"eval_cider": False} if args.task == "caption" else {}), **args.overrides}
    return [str(args.tsv), f"--path={args.checkpoint}", f"--user-dir={user_dir}", f"--task={args.task}",
            f"--batch-size={batch_size}", "--required-batch-size-multiple=1", "--log-format=simple",
            "--log-interval=1", "--seed=7", "--gen-subset=test", f"--results-path={results}",
            "--num-workers=0", "--cpu", *generation_args(args), f"--model-overrides={overrides!r}"]


def run(cmd, cwd, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}) in {cwd}: {' '.join(map(str, cmd))}\n"
                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# ----------------------------------------------------------------------------------- OFA's side
def run_ofa(args, batch_size: int, work: Path) -> dict:
    peer = Path(args.peer_dir)
    python, src = peer / "venv" / "bin" / "python", peer / "src"
    if not (peer / "venv" / ".ofa-installed").exists():
        sys.exit(f"OFA's environment is not at {peer}: run tools/ofa_harness/setup_ofa_env.sh first")
    cwd = src / "run_scripts" / args.task
    env = {"NLTK_DATA": str(peer / "nltk_data")}  # the stand-in CMU dictionary (see setup_ofa_env.sh)
    out = {}
    if not args.skip_plain:
        plain = work / "ofa_plain"
        proc = run([python, "../../evaluate.py",
                    *evaluate_args(args, batch_size, plain, "../../utils/BPE", "../../ofa_module")], cwd, env)
        out["plain_predictions"] = json.loads((plain / "test_predict.json").read_text())
        out["plain_log_tail"] = (proc.stdout + proc.stderr)[-2000:]
    observed = work / "ofa_observed"
    record = work / "ofa_record.json"
    proc = run([python, HERE / "ofa_observe.py", "--record", record, "--",
                *evaluate_args(args, batch_size, observed, "../../utils/BPE", "../../ofa_module")], cwd, env)
    log = proc.stdout + proc.stderr
    out.update(json.loads(record.read_text()))
    out["predictions"] = json.loads((observed / "test_predict.json").read_text())
    score_lines = [line for line in log.splitlines() if "score_sum" in line]
    out["score_line"] = score_lines[-1].split("|")[-1].strip() if score_lines else None
    # merge_results logs "score_sum: tensor([s]), score_cnt: tensor([n]), score: s/n rounded to 4 places"
    out["score"] = float(out["score_line"].rsplit("score:", 1)[1]) if out["score_line"] else None
    return out


# ----------------------------------------------------------------------------------- our side
def run_ours_cli(args, batch_size: int, work: Path) -> dict:
    results = work / "ours"
    run([sys.executable, "-m", "mue_fairseq.cli.evaluate",
         *evaluate_args(args, batch_size, results, str(args.bpe_dir), str(REPO / "mue_fairseq")), "--no-plots"],
        cwd=work, env={"PYTHONPATH": str(REPO)})
    return {"predictions": json.loads((results / "test_predict.json").read_text()),
            "scores": json.loads((results / "test_scores.json").read_text())}


def load_ours(checkpoint, tsv, task_name: str, bpe_dir, selected_cols: str, overrides=None):
    """Our model (eval mode) and task reading `tsv` as the test split."""
    import torch

    from mue_fairseq.ofa.checkpoint import load_ofa_ensemble

    torch.set_num_threads(1)
    arg_overrides = {"data": str(tsv), "bpe_dir": str(bpe_dir), "selected_cols": selected_cols,
                     **({"eval_cider": False} if task_name == "caption" else {}), **(overrides or {})}
    models, _, task = load_ofa_ensemble([str(checkpoint)], arg_overrides=arg_overrides)
    task.load_dataset("test")
    return models[0].eval(), task


def batches(task, batch_size: int):
    return task.get_batch_iterator(dataset=task.dataset("test"), max_sentences=batch_size, num_shards=1,
                                   shard_id=0).next_epoch_itr(shuffle=False)


def our_hypotheses(model, task, batch_size: int, beam: int, max_len_b: int, no_repeat_ngram_size: int) -> dict:
    """{sample id: [{tokens, score, positional_scores}, ...]} from our generator."""
    import torch

    gen_args = argparse.Namespace(beam=beam, max_len_a=0, max_len_b=max_len_b, min_len=1, lenpen=1.0,
                                  unkpen=0.0, temperature=1.0, unnormalized=False,
                                  no_repeat_ngram_size=no_repeat_ngram_size)
    generator = task.build_generator([model], gen_args)
    out = {}
    with torch.no_grad():
        for sample in batches(task, batch_size):
            for sample_id, hypos in zip(sample["id"].tolist(), task.inference_step(generator, [model], sample)):
                out[str(sample_id)] = [{"tokens": h["tokens"].tolist(), "score": float(h["score"]),
                                        "positional_scores": h["positional_scores"].tolist()} for h in hypos]
    return out


def our_answer_scores(model, task, batch_size: int) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for sample in batches(task, batch_size):
            for sample_id, row in zip(sample["id"].tolist(), task.score_answers(model, sample).tolist()):
                out[str(sample_id)] = row
    return out


def source_lengths(task, batch_size: int) -> dict:
    """Per batch, the unpadded source lengths of its rows (to see that rows were padded)."""
    return [sample["net_input"]["src_lengths"].tolist() for sample in batches(task, batch_size)]


# ----------------------------------------------------------------------------------- comparison
def top2_gap(hypos) -> float:
    return hypos[0]["score"] - hypos[1]["score"] if len(hypos) > 1 else float("inf")


def compare_hypotheses(theirs: dict, ours: dict) -> dict:
    """Tokens equal per sample (every beam), the largest |score| and positional-score differences
    where tokens agree, and the differing samples whose top-2 gap (either side) is < NEAR_TIE."""
    assert sorted(theirs) == sorted(ours), (sorted(theirs), sorted(ours))
    equal, max_score, max_positional, differing, near_ties = 0, 0.0, 0.0, [], []
    for key, their_hypos in theirs.items():
        our_hypos = ours[key]
        if [h["tokens"] for h in their_hypos] == [h["tokens"] for h in our_hypos]:
            equal += 1
            for a, b in zip(their_hypos, our_hypos):
                max_score = max(max_score, abs(a["score"] - b["score"]))
                max_positional = max(max_positional, max(abs(x - y) for x, y in
                                                         zip(a["positional_scores"], b["positional_scores"])))
        else:
            differing.append(key)
            if min(top2_gap(their_hypos), top2_gap(our_hypos)) < NEAR_TIE:
                near_ties.append(key)
    return {"samples": len(theirs), "tokens_equal": equal, "max_abs_score_diff": max_score,
            "max_abs_positional_score_diff": max_positional, "differing": differing,
            "differing_near_ties": near_ties,
            "min_top2_gap_ofa": min(top2_gap(h) for h in theirs.values())}


def compare_answer_scores(theirs: dict, ours: dict) -> dict:
    assert sorted(theirs) == sorted(ours)
    diff = max(abs(a - b) for k in theirs for a, b in zip(theirs[k], ours[k]))
    argmax = lambda row: max(range(len(row)), key=row.__getitem__)  # noqa: E731
    same = sum(argmax(theirs[k]) == argmax(ours[k]) for k in theirs)
    gaps = [sorted(row)[-1] - sorted(row)[-2] for row in theirs.values()]
    return {"samples": len(theirs), "argmax_equal": same, "max_abs_score_diff": diff, "min_top2_gap_ofa": min(gaps)}


def predictions_equal(theirs: list, ours: list) -> int:
    key = "image_id" if theirs and "image_id" in theirs[0] else "uniq_id"
    ours_by_id = {str(p[key]): p for p in ours}
    return sum(json.dumps(p, sort_keys=True) == json.dumps(ours_by_id.get(str(p[key])), sort_keys=True)
               for p in theirs)


def caption_cider(predictions: list, tsv: Path, selected_cols: str) -> float:
    """CIDEr-D (ours, corpus document frequencies) of a prediction file against the TSV references;
    the same scorer for both sides."""
    import csv

    from mue_fairseq.cli.evaluate import caption_scores
    from mue_fairseq.data.caption_dataset import strip_punctuation

    image_col, caption_col = (int(c) for c in selected_cols.split(",")[0:3:2])
    csv.field_size_limit(1 << 30)
    with open(tsv, newline="", encoding="utf-8") as f:
        refs = {row[image_col]: row[caption_col].split("&&") for row in csv.reader(f, delimiter="\t")}
    ids = [str(p["image_id"]) for p in predictions]
    return caption_scores([p["caption"] for p in predictions],
                          [[strip_punctuation(r.lower()).strip() for r in refs[i]] for i in ids], False)["cider_d"]


def compare_once(args, batch_size: int, work: Path) -> tuple:
    """(report, fixture) for one batch size: both sides run, OFA's side kept as the fixture."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"[{args.task} batch {batch_size}] OFA's evaluate.py ...", flush=True)
    ofa = run_ofa(args, batch_size, work)
    print(f"[{args.task} batch {batch_size}] ours ...", flush=True)
    ours = run_ours_cli(args, batch_size, work)
    model, task = load_ours(args.checkpoint, args.tsv, args.task, args.bpe_dir, args.selected_cols, args.overrides)
    report = {"batch_size": batch_size, "source_lengths_per_batch": source_lengths(task, batch_size),
              "ofa_predictions": ofa["predictions"],
              "predictions_total": len(ofa["predictions"]),
              "predictions_equal": predictions_equal(ofa["predictions"], ours["predictions"]),
              "ofa_observer_changed_nothing": ofa.get("plain_predictions", ofa["predictions"]) == ofa["predictions"]}
    if args.task == "caption":
        hypos = our_hypotheses(model, task, batch_size, args.beam, args.max_len_b, args.no_repeat_ngram_size)
        report["hypotheses"] = compare_hypotheses(ofa["hypotheses"], hypos)
        report["cider_d_ofa"] = caption_cider(ofa["predictions"], args.tsv, args.selected_cols)
        report["cider_d_ours"] = caption_cider(ours["predictions"], args.tsv, args.selected_cols)
    else:
        report["answer_scores"] = compare_answer_scores(ofa["answer_scores"], our_answer_scores(model, task, batch_size))
        report["accuracy_ofa_line"] = ofa["score_line"]
        report["accuracy_ofa"] = 100.0 * ofa["score"] if ofa["score"] is not None else None
        report["accuracy_ours"] = ours["scores"].get("accuracy")
    fixture = {"batch_size": batch_size, "predictions": ofa["predictions"]}
    if args.task == "caption":
        fixture["hypotheses"] = ofa["hypotheses"]
    else:
        fixture.update(answer_order=ofa["answer_order"], answer_scores=ofa["answer_scores"],
                       score_line=ofa["score_line"])
    return report, fixture


def rotate_images(tsv: Path, column: int, out: Path) -> Path:
    """A copy of `tsv` in which row i holds row i+k's image (cyclically), k the smallest shift that
    gives every row another image (rows of one image are often adjacent)."""
    lines = tsv.read_text(encoding="utf-8").rstrip("\n").split("\n")
    rows = [line.split("\t") for line in lines]
    images = [row[column] for row in rows]
    n = len(rows)
    shifts = [k for k in range(1, n) if all(images[i] != images[(i + k) % n] for i in range(n))]
    if not shifts:
        sys.exit(f"--rotate-images: {tsv} has no shift that changes every row's image")
    for i, row in enumerate(rows):
        row[column] = images[(i + shifts[0]) % n]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(SELECTED_COLS))
    parser.add_argument("--tsv", type=Path, required=True, help="test TSV in OFA's format for the task")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--beam", type=int, default=5, help="caption (OFA's evaluate_caption.sh: 5)")
    parser.add_argument("--max-len-b", type=int, default=16, help="caption (OFA's script: 16)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3, help="caption (OFA's script: 3)")
    parser.add_argument("--selected-cols", help="default: OFA's scripts' columns for the task")
    parser.add_argument("--overrides", default="{}", help="extra --model-overrides for both sides (a dict)")
    parser.add_argument("--bpe-dir", type=Path, default=default_bpe_dir(), help="our BPE files (OFA uses its own)")
    parser.add_argument("--peer-dir", default=str(REPO / "work_dirs" / "ofa_peer"),
                        help="OFA's environment, as built by setup_ofa_env.sh")
    parser.add_argument("--work-dir", type=Path, help="outputs of both runs (default: a temporary folder)")
    parser.add_argument("--skip-plain", action="store_true",
                        help="run OFA only through the observer (not also plainly)")
    parser.add_argument("--rotate-images", action="store_true",
                        help="evaluate a copy of the TSV where each row takes the next row's image: run with "
                             "and without to see whether the predictions depend on the image")
    parser.add_argument("--out", type=Path, help="JSON report")
    parser.add_argument("--fixture", type=Path, help="write OFA's side as a test fixture (JSON)")
    args = parser.parse_args(argv)
    args.selected_cols = args.selected_cols or SELECTED_COLS[args.task]
    args.overrides = ast.literal_eval(args.overrides)
    for name in ("tsv", "checkpoint"):
        path = getattr(args, name).resolve()
        if not path.is_file():
            parser.error(f"--{name} {path} does not exist")
        setattr(args, name, path)
    if not (args.bpe_dir / "dict.txt").is_file():
        parser.error(f"--bpe-dir {args.bpe_dir} has no dict.txt (set MUE_BPE_DIR or pass --bpe-dir)")
    return args


def main(argv=None):
    args = parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="ofa_harness_"))).resolve()
    if args.rotate_images:
        args.tsv = rotate_images(args.tsv, int(args.selected_cols.split(",")[1]), work / f"rotated_{args.tsv.name}")
    reports, fixtures = [], []
    for batch_size in args.batch_size:
        report, fixture = compare_once(args, batch_size, work / f"{args.task}_b{batch_size}")
        reports.append(report)
        fixtures.append(fixture)
        print(json.dumps({k: v for k, v in report.items() if k != "ofa_predictions"}), flush=True)
    header = {"task": args.task, "tsv": str(args.tsv), "tsv_sha256": sha256(args.tsv),
              "checkpoint": str(args.checkpoint), "checkpoint_sha256": sha256(args.checkpoint),
              "checkpoint_weights_digest": weights_digest(args.checkpoint),
              "selected_cols": args.selected_cols, "overrides": args.overrides,
              "generation": ({"beam": args.beam, "max_len_b": args.max_len_b,
                              "no_repeat_ngram_size": args.no_repeat_ngram_size} if args.task == "caption" else None)}
    print("\nbatch  predictions equal" + ("  tokens equal  max |score diff|  near-ties  CIDEr-D OFA / ours"
                                         if args.task == "caption" else "  answers equal  max |score diff|  accuracy OFA / ours"))
    for r in reports:
        if args.task == "caption":
            h = r["hypotheses"]
            print(f"{r['batch_size']:>5}  {r['predictions_equal']:>7} / {r['predictions_total']:<7}  "
                  f"{h['tokens_equal']:>5} / {h['samples']:<5}  {h['max_abs_score_diff']:.2e}  "
                  f"{len(h['differing_near_ties'])} of {len(h['differing'])}  {r['cider_d_ofa']:.2f} / {r['cider_d_ours']:.2f}")
        else:
            a = r["answer_scores"]
            print(f"{r['batch_size']:>5}  {r['predictions_equal']:>7} / {r['predictions_total']:<7}  "
                  f"{a['argmax_equal']:>5} / {a['samples']:<5}  {a['max_abs_score_diff']:.2e}  "
                  f"{r['accuracy_ofa']:.2f} / {r['accuracy_ours']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**header, "runs": reports}, indent=1))
    if args.fixture:
        args.fixture.parent.mkdir(parents=True, exist_ok=True)
        args.fixture.write_text(json.dumps({**header, "ofa": fixtures}))
    return reports


if __name__ == "__main__":
    main()
