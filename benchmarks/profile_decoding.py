"""Where generation time goes: full depth against one MuE setting, timed in alternating passes and
optionally broken down by operator with `torch.profiler`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_decoding.py --work-dir work_dirs/exit_policies_backbone \
        --checkpoint work_dirs/exit_policies_backbone/checkpoints_caption_8ac10ebb_at_3500/checkpoint_last.pt \
        --batch-size 16 --threshold 0.98 --profile
    # the decoder alone exiting, both encoder streams at full depth:
    ... --batch-size 16 --threshold 1 --decoder-threshold 0.9

A quick check beside `bench_exit_policies.py` (which sweeps every policy): the same first test
rows and the same evaluation, but only two settings, so a doubtful speed-up can be re-timed in a
minute, and the operator table shows whether the layers, the gathers of per-row exits, or the
output head take the time. `--breakdown` runs each setting once more under cProfile and splits its
time by component (ResNet, encoder layers, decoder embeddings and layers, output head,
log-softmax, beam search, the rest); cProfile's own overhead inflates the Python-heavy parts, so read the shares, not the
seconds. `--step-by-step-kv-too` times the MuE setting a third way, with the keys/values of the
layers that every row skips projected at each step instead of deferred (the decoder's
`defer_skipped_kv` off): the outputs are the same, so the difference is what the deferral saves.
"""
import cProfile
import logging
import os
import pstats
import sys
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_exit_policies import evaluate_point, first_rows  # noqa: E402
from exit_ceiling import model_parser  # noqa: E402
from mue_fairseq.cli import quickstart  # noqa: E402

logger = logging.getLogger("profile_decoding")

# (component, file the function is in, function): cumulative cProfile time of each. The ResNet
# runs inside the encoder, so "encoder layers" is the encoder's time less the ResNet's.
COMPONENT_FUNCTIONS: List[Tuple[str, str, str]] = [
    ("generation", "site-packages/fairseq/sequence_generator.py", "generate"),
    ("encoder", "mue_fairseq/models/mue_encoder.py", "forward"),
    ("ResNet and patch embedding", "mue_fairseq/ofa/encoder.py", "embed_image_patches"),
    # The decoder's features: each step's token embedding and position biases, then its layers.
    ("decoder layers (embeddings, exit tests, caches)", "mue_fairseq/models/mue_decoder.py", "extract_features"),
    ("output head (vocabulary projection)", "mue_fairseq/ofa/decoder.py", "output_layer"),
    ("log-softmax", "fairseq/models/fairseq_model.py", "get_normalized_probs"),
    ("beam search step", "fairseq/search.py", "step"),
]


def component_seconds(stats: pstats.Stats) -> Dict[str, float]:
    """Generation time split by component from a cProfile run (cumulative seconds); the parts sum
    to the generation time, the remainder being the generator's own loop (n-gram blocking,
    bookkeeping, cache reordering)."""
    found = {name: 0.0 for name, _, _ in COMPONENT_FUNCTIONS}
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for name, suffix, wanted in COMPONENT_FUNCTIONS:
            if function == wanted and filename.replace(os.sep, "/").endswith(suffix):
                found[name] += cumulative
    parts = {
        "ResNet and patch embedding": found["ResNet and patch embedding"],
        "encoder layers": found["encoder"] - found["ResNet and patch embedding"],
    }
    for name, _, _ in COMPONENT_FUNCTIONS[3:]:
        parts[name] = found[name]
    parts["generator loop and the rest"] = found["generation"] - sum(parts.values())
    return {"generation": found["generation"], **parts}


def breakdown_table(breakdowns: Dict[str, Dict[str, float]]) -> str:
    names = list(breakdowns)
    lines = ["| component | " + " | ".join(f"{n} s | share" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for component in next(iter(breakdowns.values())):
        cells = []
        for name in names:
            seconds, total = breakdowns[name][component], breakdowns[name]["generation"]
            cells.append(f"{seconds:.3f} | {seconds / total:.0%}" if total else f"{seconds:.3f} | -")
        lines.append(f"| {component} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    """Returns {"passes": one record per timed pass (setting, quality, seconds, mean layers run per
    stream), "breakdowns": {setting: seconds per component} with --breakdown}."""
    parser = model_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.98, help="MuE threshold (image = text = decoder)")
    for stream in ("image", "text", "decoder"):
        parser.add_argument(f"--{stream}-threshold", type=float, default=None,
                            help=f"MuE {stream} threshold (default: --threshold)")
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each setting, alternating")
    parser.add_argument("--profile", action="store_true", help="also print each setting's top operators")
    parser.add_argument("--step-by-step-kv-too", action="store_true",
                        help="also time the MuE setting with the skipped layers' keys/values projected at every "
                             "step, as before they were deferred (the same outputs; A/B of the deferral)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print each setting's time by component (one more run each, under cProfile)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint: no checkpoint file {args.checkpoint}")
    thresholds = {stream: args.threshold if getattr(args, f"{stream}_threshold") is None
                  else getattr(args, f"{stream}_threshold") for stream in ("image", "text", "decoder")}
    for name, value in [("threshold", args.threshold)] + [(f"{k}-threshold", v) for k, v in thresholds.items()]:
        if not 0.0 <= value <= 1.0:
            parser.error(f"--{name} must be in [0, 1], got {value}")

    import torch

    data_dir = Path(args.work_dir) / "data"
    models, task, cfg = quickstart.load(args.task, Path(args.checkpoint), data_dir, args.bpe_dir, args.batch_size)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    test_file = data_dir / quickstart.TASKS[args.task]["files"][2]
    task.cfg.data = str(first_rows(test_file, Path(args.work_dir) / "profile_decoding" / test_file.name,
                                   args.max_samples))  # OFA reads the last --data file for every split but train
    cfg.dataset.batch_size = args.batch_size
    mue = {f"mue_{stream}_threshold": value for stream, value in thresholds.items()}
    same = len(set(thresholds.values())) == 1
    name = f"MuE {args.threshold}" if same else "MuE " + " / ".join(f"{k} {v}" for k, v in thresholds.items())
    settings = {"full depth": {}, name: mue}
    step_by_step = f"{name}, keys/values step by step"
    if args.step_by_step_kv_too:
        settings[step_by_step] = mue

    def evaluate(name, options):
        for model in models:
            model.decoder.defer_skipped_kv = name != step_by_step
        try:
            return evaluate_point(models, task, cfg, options, "test", "score")
        finally:
            for model in models:
                model.decoder.defer_skipped_kv = True

    evaluate_point(models, task, cfg, {}, "test", "score")  # warm-up, untimed
    records = []
    for _ in range(args.passes):
        for name, options in settings.items():
            result, stats = evaluate(name, options)
            records.append({"setting": name, "quality": result.quality(), "seconds": result.seconds,
                            "layers": stats.summary()["mean_exit_layers"]})
            logger.info("batch %d %s: quality %.2f, %.2f s, layers %s", args.batch_size, name, result.quality(),
                        result.seconds, records[-1]["layers"])
    if args.profile:
        from torch.profiler import profile

        for name, options in settings.items():
            with profile() as prof:
                evaluate(name, options)
            print(f"{name}, batch {args.batch_size}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    breakdowns = {}
    if args.breakdown:
        for name, options in settings.items():
            profiler = cProfile.Profile()
            profiler.runcall(evaluate, name, options)
            breakdowns[name] = component_seconds(pstats.Stats(profiler))
        print(f"Generation time by component, batch {args.batch_size} (cProfile, cumulative seconds):")
        print(breakdown_table(breakdowns))
    return {"passes": records, "breakdowns": breakdowns}


if __name__ == "__main__":
    main()
