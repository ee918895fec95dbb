"""The fastest any exit policy can make a built-in model: full depth against one layer everywhere.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/exit_ceiling.py --work-dir work_dirs/exit_policies_backbone \
        --task caption --checkpoint C --out benchmarks/results/exit_ceiling_caption.json

Every exit policy runs at least one layer per stream and per token, and none of them skips the
ResNet, the embeddings, the output head (at every decoding step: the projection onto the whole
vocabulary, log-softmax and the beam's top-k) or the search itself. So the time with every stream
and token stopped after layer 1 is a floor no policy gets under, and full depth / that time is the
largest measured speed-up any of them can reach on this model (Amdahl's bound), whatever it costs in
quality. Timed like `bench_exit_policies.py` (model only, the same first test rows), full depth and
depth 1 alternating, the fastest of `--repeats` kept for each.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_exit_policies import evaluate_point, first_rows, static_depth_options  # noqa: E402
from mue_fairseq.cli import quickstart  # noqa: E402

logger = logging.getLogger("exit_ceiling")


def model_parser(description: str) -> argparse.ArgumentParser:
    """Logging to stdout and the arguments that name a trained built-in model and its test rows
    (shared with `profile_decoding.py`)."""
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="quickstart-style work dir (data/)")
    parser.add_argument("--task", choices=sorted(quickstart.TASKS), default="caption")
    parser.add_argument("--checkpoint", required=True, help="the model's checkpoint")
    parser.add_argument("--bpe-dir", default=str(REPO.parent / "shared" / "ofa_bpe"))
    parser.add_argument("--max-samples", type=int, default=48, help="first test rows timed")
    return parser


def main(argv=None) -> Dict:
    parser = model_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each setting (fastest kept)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint: no checkpoint file {args.checkpoint}")

    import torch

    work = Path(args.work_dir)
    data_dir = work / "data"
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    models, task, cfg = quickstart.load(args.task, Path(args.checkpoint), data_dir, args.bpe_dir, batch_sizes[0])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    test_file = data_dir / quickstart.TASKS[args.task]["files"][2]
    task.cfg.data = str(first_rows(test_file, work / "exit_ceiling" / f"{args.task}_test_first{args.max_samples}.tsv",
                                   args.max_samples))  # OFA reads the last --data file for every split but train
    settings = {"full depth": {}, "depth 1": static_depth_options(1)}
    rows: List[Dict] = []
    for batch_size in batch_sizes:
        cfg.dataset.batch_size = batch_size
        evaluate_point(models, task, cfg, {}, "test", "score")  # warm-up, untimed
        seconds = {name: [] for name in settings}
        quality, layers = {}, {}
        for _ in range(args.repeats):
            for name, options in settings.items():
                result, stats = evaluate_point(models, task, cfg, options, "test", "score")
                seconds[name].append(result.seconds)
                quality[name] = result.quality()
                layers[name] = stats.summary()["mean_exit_layers"]
        fastest = {name: min(values) for name, values in seconds.items()}
        row = {
            "task": args.task, "batch_size": batch_size, "num_samples": result.num_samples,
            "ms_per_sample": {name: 1000 * value / result.num_samples for name, value in fastest.items()},
            "seconds_repeats": seconds, "quality": quality, "mean_exit_layers": layers,
            "ceiling_speedup": fastest["full depth"] / fastest["depth 1"],
        }
        logger.info("%s batch %d: full depth %.1f ms/sample, depth 1 %.1f ms/sample: ceiling %.2fx "
                    "(quality %.2f -> %.2f)", args.task, batch_size, row["ms_per_sample"]["full depth"],
                    row["ms_per_sample"]["depth 1"], row["ceiling_speedup"], quality["full depth"], quality["depth 1"])
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": args.checkpoint, "threads": torch.get_num_threads(), "rows": rows,
              "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    out.write_text(json.dumps(report, indent=1))
    logger.info("wrote %s", out)
    return report


if __name__ == "__main__":
    main()
