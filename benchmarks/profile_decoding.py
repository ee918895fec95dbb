"""Where generation time goes: full depth against one MuE setting, timed in alternating passes and
optionally broken down by operator with `torch.profiler`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_decoding.py --work-dir work_dirs/exit_policies_backbone \
        --checkpoint work_dirs/exit_policies_backbone/checkpoints_caption_8ac10ebb_at_3500/checkpoint_last.pt \
        --batch-size 16 --threshold 0.98 --profile

A quick check beside `bench_exit_policies.py` (which sweeps every policy): the same first test
rows and the same evaluation, but only two settings, so a doubtful speed-up can be re-timed in a
minute, and the operator table shows whether the layers, the gathers of per-row exits, or the
output head take the time.
"""
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_exit_policies import evaluate_point, first_rows  # noqa: E402
from exit_ceiling import model_parser  # noqa: E402
from mue_fairseq.cli import quickstart  # noqa: E402

logger = logging.getLogger("profile_decoding")


def main(argv=None) -> List[Dict]:
    """Returns one record per timed pass: setting, quality, seconds, mean layers run per stream."""
    parser = model_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.98, help="MuE threshold (image = text = decoder)")
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each setting, alternating")
    parser.add_argument("--profile", action="store_true", help="also print each setting's top operators")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint: no checkpoint file {args.checkpoint}")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")

    import torch

    data_dir = Path(args.work_dir) / "data"
    models, task, cfg = quickstart.load(args.task, Path(args.checkpoint), data_dir, args.bpe_dir, args.batch_size)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    test_file = data_dir / quickstart.TASKS[args.task]["files"][2]
    task.cfg.data = str(first_rows(test_file, Path(args.work_dir) / "profile_decoding" / test_file.name,
                                   args.max_samples))  # OFA reads the last --data file for every split but train
    cfg.dataset.batch_size = args.batch_size
    mue = {f"mue_{stream}_threshold": args.threshold for stream in ("image", "text", "decoder")}
    settings = {"full depth": {}, f"MuE {args.threshold}": mue}
    evaluate_point(models, task, cfg, {}, "test", "score")  # warm-up, untimed
    records = []
    for _ in range(args.passes):
        for name, options in settings.items():
            result, stats = evaluate_point(models, task, cfg, options, "test", "score")
            records.append({"setting": name, "quality": result.quality(), "seconds": result.seconds,
                            "layers": stats.summary()["mean_exit_layers"]})
            logger.info("batch %d %s: quality %.2f, %.2f s, layers %s", args.batch_size, name, result.quality(),
                        result.seconds, records[-1]["layers"])
    if args.profile:
        from torch.profiler import profile

        for name, options in settings.items():
            with profile() as prof:
                evaluate_point(models, task, cfg, options, "test", "score")
            print(f"{name}, batch {args.batch_size}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return records


if __name__ == "__main__":
    main()
