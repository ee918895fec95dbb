"""Evaluation on two processes (gloo, CPU), started as OFA's scripts start it: the merged files equal
a one-process run's, each sample is evaluated once, and a failing rank stops the run.

The runs use the shared OFA CLI fixtures (real photographs, checkpoints written by OFA's trainer)
and start `mue_fairseq.cli.evaluate` under `torch.distributed.run` / `torch.distributed.launch`
as subprocesses, one thread each.
"""
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ofa_fixtures import BPE_DIR, REFERENCE_DIR, REPO, SHARED

from mue_fairseq.cli.distributed_eval import EvalProcesses, gather_shards, interleave_batches

CLI_DIR = SHARED / "ofa_cli"
TASKS = {
    # task: (TSV, checkpoint, selected columns, rows, arguments of ../shared/ofa_cli/<task>/command.sh)
    "caption": ("caption_test.tsv", "ofa_tiny_holdout.pt", "1,4,2", 8,
                ["--beam=2", "--max-len-b=10", "--no-repeat-ngram-size=3"]),
    "snli_ve": ("snli_ve_test.tsv", "ofa_tiny_snli_ve.pt", "0,2,3,4,5", 9, []),
}
# 8 caption rows in batches of 3 (3 + 3 + 2: rank 0 takes 5 rows, rank 1 three and an empty batch);
# 9 SNLI-VE rows in batches of 2 (rank 0: 2 + 2 + 1, rank 1: 2 + 2 and an empty batch).
BATCH = {"caption": 3, "snli_ve": 2}
RANK_SAMPLES = {"caption": [5, 3], "snli_ve": [5, 4]}
EXITS = ["--mue-image-threshold", "0.9", "--mue-text-threshold", "0.9", "--mue-decoder-threshold", "0.9"]
TIMING_KEYS = ("seconds", "processes", "rank_seconds", "rank_samples", "wall_seconds")


def shared(path: Path) -> Path:
    assert path.exists(), f"shared fixture {path} is missing (set MUE_SHARED_DIR to the shared folder)"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3 in OFA's scripts
    return env


def cli_arguments(task: str, out: Path, *extra: str, data: Path = None, batch: int = None,
                  module: str = "mue_fairseq.cli.evaluate"):
    """`-m module DATA ...` with the fixture's OFA arguments (../shared/ofa_cli/<task>/command.sh)."""
    tsv, checkpoint, cols, _, generation = TASKS[task]
    data = data or shared(CLI_DIR / tsv)
    overrides = {"bpe_dir": str(shared(BPE_DIR)), "selected_cols": cols}
    return [
        "-m", module, str(data), f"--path={shared(REFERENCE_DIR / checkpoint)}",
        "--user-dir=mue_fairseq", f"--task={task}", f"--batch-size={batch or BATCH[task]}",
        "--required-batch-size-multiple=1", "--log-format=simple", "--log-interval=1", "--seed=7",
        "--gen-subset=test", f"--results-path={out}", "--num-workers=0", "--cpu",
        *(["--no-plots"] if module.endswith("evaluate") else []),
        f"--model-overrides={overrides!r}", *generation, *extra,
    ]


def evaluate(task: str, out: Path, nproc: int, *extra: str, **kwargs):
    """Run the evaluate CLI (or the sweep) on `nproc` processes, under torchrun for more than one."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return subprocess.run(launcher + cli_arguments(task, out, *extra, **kwargs), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=600)


def outputs(out: Path):
    """(predictions, scores without timings, exit statistics without wall-clock or None, timings)."""
    predictions = json.loads((out / "test_predict.json").read_text())
    scores = json.loads((out / "test_scores.json").read_text())
    timings = {key: scores.pop(key) for key in TIMING_KEYS}
    exits = None
    if (out / "test_exit_stats.json").exists():
        exits = json.loads((out / "test_exit_stats.json").read_text())
        exits["summary"].pop("wall_clock")
    return predictions, scores, exits, timings


def evaluated_per_rank(log: str, world: int):
    found = {int(r): int(n) for r, n in re.findall(rf"rank (\d+) of {world} evaluated (\d+) samples", log)}
    return [found.get(rank) for rank in range(world)]


def check_ok(run):
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


# ----------------------------------------------------------------------------- merge helpers
@pytest.mark.parametrize("num_batches, world", [(3, 2), (5, 2), (1, 2), (7, 3), (4, 4)])
def test_fairseq_shards_pad_with_empty_batches_and_interleave_restores_the_order(num_batches, world):
    """fairseq gives rank r batches r, r + N, ... and pads a short shard with [] (no repeated
    sample); dropping the padding and interleaving gives every batch once, in order."""
    from fairseq.data.iterators import ShardedIterator

    batches = [[3 * b, 3 * b + 1] for b in range(num_batches)]
    shards = [list(ShardedIterator(batches, world, rank, fill_value=[])) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1  # every rank runs as many batches
    assert all(batch in ([], *batches) for shard in shards for batch in shard)
    assert interleave_batches([[b for b in shard if b] for shard in shards]) == batches


def test_one_process_gather_returns_the_shard_or_raises_its_error():
    assert gather_shards(EvalProcesses(), ["a"]) == [["a"]]
    with pytest.raises(ValueError, match="bad row"):
        gather_shards(EvalProcesses(), [], ValueError("bad row"))


# ----------------------------------------------------------------------------- two processes
@pytest.mark.parametrize("task", ["caption", "snli_ve"])
@pytest.mark.parametrize("exits", [False, True], ids=["full_depth", "exits"])
def test_two_processes_give_the_one_process_files(tmp_path, task, exits):
    extra = EXITS if exits else []
    one = evaluate(task, tmp_path / "one", 1, *extra)
    two = evaluate(task, tmp_path / "two", 2, *extra)
    check_ok(one)
    log = check_ok(two)
    rows = TASKS[task][3]

    assert evaluated_per_rank(log, 2) == RANK_SAMPLES[task]  # each sample once, on one rank
    assert sum(RANK_SAMPLES[task]) == rows
    predictions, scores, exit_stats, timings = outputs(tmp_path / "two")
    assert (predictions, scores, exit_stats) == outputs(tmp_path / "one")[:3]
    key = "image_id" if task == "caption" else "uniq_id"
    assert len({p[key] for p in predictions}) == rows == scores["num_samples"]
    assert timings["processes"] == 2 and timings["rank_samples"] == RANK_SAMPLES[task]
    assert timings["seconds"] == pytest.approx(sum(timings["rank_seconds"]))
    if exit_stats is not None:
        assert exit_stats["summary"]["num_samples"] == rows
        assert [str(s["id"]) for s in exit_stats["samples"]] == [str(p[key]) for p in predictions]
    if exits:
        # some stream stopped early, so the comparison covers exit decisions
        layers = exit_stats["summary"]["layers"]
        assert any(s["image_layers"] < layers["encoder"] or max(s["decoder_layers"]) < layers["decoder"]
                   for s in exit_stats["samples"])
    else:  # an OFA caption model records no exits; SNLI-VE scoring records full depth
        assert exit_stats is None if task == "caption" else exit_stats["summary"]["time_reduction_layers"] == {
            stream: 0.0 for stream in ("image", "text", "decoder", "decoder_step_weighted", "combined")}
    # rank 0 alone wrote the files: no temporary file is left behind
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_a_bad_row_on_one_rank_stops_the_run_and_writes_nothing(tmp_path):
    rows = shared(CLI_DIR / "caption_test.tsv").read_text().split("\n")
    columns = rows[3].split("\t")  # row 4 (id 1004) is in batch 1: rank 1's
    columns[4] = "not-base64!"
    rows[3] = "\t".join(columns)
    bad = tmp_path / "caption_bad.tsv"
    bad.write_text("\n".join(rows))

    run = evaluate("caption", tmp_path / "out", 2, data=bad)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert re.search(r"evaluation failed on rank 1 of 2: ValueError: row 1004 \(.*caption_bad.tsv, line 4\)", log), \
        log[-3000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_fairseq_distributed_options_start_the_ranks_too(tmp_path):
    """Two processes started by hand with fairseq's --distributed-* options, no launcher."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *cli_arguments(
                 "snli_ve", tmp_path / "out", "--distributed-world-size=2", f"--distributed-rank={rank}",
                 f"--distributed-init-method=tcp://127.0.0.1:{port}")],
             cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert [evaluated_per_rank(log, 2)[rank] for rank, log in enumerate(logs)] == RANK_SAMPLES["snli_ve"]
    assert outputs(tmp_path / "out")[0] == json.loads(shared(CLI_DIR / "snli_ve" / "test_predict.json").read_text())


def test_sweep_on_two_processes_sees_the_one_process_points(tmp_path):
    """Every rank sees the same merged points (so all follow one search path); rank 0 writes."""
    sweep = ["--image-thresholds=1,0.9", "--text-thresholds=1", "--decoder-thresholds=1,0.9", "--warmup-batches=1"]
    runs = [evaluate("snli_ve", tmp_path / name, nproc, *sweep, module="mue_fairseq.cli.sweep")
            for name, nproc in (("one", 1), ("two", 2))]
    for run in runs:
        check_ok(run)
    timed = ("seconds", "measured_speedup", "pareto_measured")

    def points(name):
        with open(tmp_path / name / "test_sweep.csv") as handle:
            return [{k: v for k, v in row.items() if k not in timed} for row in csv.DictReader(handle)]

    assert points("two") == points("one") and len(points("one")) == 4
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["test_sweep.csv", "test_sweep_pareto.png"]


# ----------------------------------------------------------------------------- OFA's script
# OFA's run_scripts/snli_ve/evaluate_snli_ve_base.sh (commit a36b91ce); changed: the launcher's process
# count (8 -> 2), CUDA_VISIBLE_DEVICES dropped, `-m mue_fairseq.cli.evaluate` for `../../evaluate.py`,
# and the user dir, BPE and checkpoint paths. `--fp16` stays: on the CPU it is ignored with a warning.
OFA_SNLI_VE_SCRIPT = r"""#!/usr/bin/env bash

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=@PORT@

user_dir=@REPO@/mue_fairseq
bpe_dir=@BPE@

# dev or test
split=$1

data=../../dataset/snli_ve_data/snli_ve_${split}.tsv
path=@CHECKPOINT@
result_path=../../results/snli_ve
selected_cols=0,2,3,4,5

python3 -m torch.distributed.launch --nproc_per_node=2 --master_port=${MASTER_PORT} -m mue_fairseq.cli.evaluate \
    ${data} \
    --path=${path} \
    --user-dir=${user_dir} \
    --task=snli_ve \
    --batch-size=8 \
    --log-format=simple --log-interval=10 \
    --seed=7 \
    --gen-subset=${split} \
    --results-path=${result_path} \
    --fp16 \
    --num-workers=0 \
    --model-overrides="{\"data\":\"${data}\",\"bpe_dir\":\"${bpe_dir}\",\"selected_cols\":\"${selected_cols}\"}"
"""


def test_ofa_snli_ve_script_runs_on_two_processes(tmp_path):
    """torch.distributed.launch passes --local-rank; 9 rows in batches of 8: rank 1 gets one row."""
    tree = tmp_path / "OFA"
    (tree / "run_scripts" / "snli_ve").mkdir(parents=True)
    (tree / "dataset" / "snli_ve_data").mkdir(parents=True)
    shutil.copy(shared(CLI_DIR / "snli_ve_test.tsv"), tree / "dataset" / "snli_ve_data" / "snli_ve_test.tsv")
    script = tree / "run_scripts" / "snli_ve" / "evaluate_snli_ve_base.sh"
    script.write_text(OFA_SNLI_VE_SCRIPT.replace("@PORT@", str(free_port())).replace("@REPO@", str(REPO))
                      .replace("@BPE@", str(shared(BPE_DIR)))
                      .replace("@CHECKPOINT@", str(shared(REFERENCE_DIR / "ofa_tiny_snli_ve.pt"))))
    run = subprocess.run(["bash", script.name, "test"], cwd=script.parent, env=environment(), capture_output=True,
                         text=True, timeout=600)
    log = check_ok(run)
    assert "--fp16 needs a CUDA device" in log
    assert evaluated_per_rank(log, 2) == [8, 1]

    one = evaluate("snli_ve", tmp_path / "one", 1, batch=8)
    check_ok(one)
    merged = outputs(tree / "results" / "snli_ve")
    assert merged[:3] == outputs(tmp_path / "one")[:3]
    # and OFA's own evaluate.py wrote the same predictions for these rows
    assert merged[0] == json.loads(shared(CLI_DIR / "snli_ve" / "test_predict.json").read_text())
    assert merged[1]["accuracy"] == pytest.approx(100 * 3 / 9)
