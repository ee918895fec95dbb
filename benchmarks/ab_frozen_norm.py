"""A/B timing of the frozen batch norm's forward in OFA's ResNet (the SNLI-VE batch-16 hot spot).

Variants of `FrozenBatchNorm2d.forward`, each swapped in for the whole ResNet:

* `two_pass`  x * scale + shift into new tensors (the forward before, still used when x needs
              gradients);
* `in_place`  the same two products, written into the convolution's output (no new tensor;
              same roundings, so bit-identical): the forward now, when x needs no gradient;
* `fused`     one pass through torch's own batch-norm kernel (`F.batch_norm`, statistics fixed).

The variants alternate (A B C, then rotated) for `--repeats` rounds; medians of wall-clock and of
this process's CPU time are printed, and each variant's output is compared with `two_pass`.

    OMP_NUM_THREADS=1 python benchmarks/ab_frozen_norm.py  # resnet50, 288 px, batch 16 and 1
    OMP_NUM_THREADS=1 python benchmarks/ab_frozen_norm.py --snli-ve  # whole SNLI-VE evaluation

With `--snli-ve`, the variants `two_pass` and `in_place` instead time our SNLI-VE evaluation (model
time of `mue_fairseq.cli.evaluate`, full depth) of the OFA-tiny fixture checkpoint (resnet18,
288 px, frozen norm) on the 64 rows of the peer benchmark, at batch 16 and 1, and check that the
predictions and scores agree.
"""
import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mue_fairseq.ofa.resnet import FrozenBatchNorm2d, build_resnet


def _affine(norm):
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def two_pass(self, x):
    scale, shift = _affine(self)
    return x * scale + shift


def in_place(self, x):
    scale, shift = _affine(self)
    return x.mul_(scale).add_(shift)


def fused(self, x):
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


VARIANTS = {"two_pass": two_pass, "in_place": in_place, "fused": fused}
REPO = Path(__file__).resolve().parents[1]


def snli_ve(args) -> None:
    from fairseq import options

    from mue_fairseq.cli.evaluate import add_mue_arguments, load_for_evaluation, run_evaluation

    if args.tsv is None:
        from bench_peers import TASKS, repeat_tsv  # benchmarks/, the script's own folder

        spec = TASKS["snli_ve"]
        args.tsv = str(repeat_tsv(spec["tsv"], Path(tempfile.mkdtemp()) / "snli_ve_64.tsv", 64, spec["id_cols"]))
    logging.getLogger("PIL").setLevel(logging.WARNING)  # fairseq's set-up leaves the root logger at DEBUG
    parser = options.get_generation_parser()
    add_mue_arguments(parser)
    argv = [args.tsv, "--path", args.checkpoint, "--user-dir", str(REPO / "mue_fairseq"), "--task", "snli_ve",
            "--batch-size", "16", "--cpu", "--log-format", "none", "--num-workers", "0", "--gen-subset", "test",
            "--model-overrides", json.dumps({"bpe_dir": str(REPO.parent / "shared" / "ofa_bpe"),
                                             "selected_cols": "0,2,3,4,5"})]
    models, task, cfg = load_for_evaluation(options.parse_args_and_arch(parser, argv))
    names = ["two_pass", "in_place"]
    for batch in args.batch_sizes:
        cfg.dataset.batch_size = batch
        seconds = {name: [] for name in names}
        results = {}
        for round_idx in range(args.repeats + 1):  # round 0 warms up
            for name in (names if round_idx % 2 == 0 else names[::-1]):
                FrozenBatchNorm2d.forward = VARIANTS[name]
                result, _ = run_evaluation(models, task, cfg, progress=False)
                results[name] = result
                if round_idx:
                    seconds[name].append(result.seconds)
        same = results["two_pass"].predictions == results["in_place"].predictions
        print(f"SNLI-VE {results['two_pass'].num_samples} rows, batch {batch}, {args.repeats} rounds, model time "
              f"medians: " + ", ".join(f"{n} {statistics.median(seconds[n]):.2f} s" for n in names)
              + f"; predictions equal: {same}; scores {results['two_pass'].scores} / {results['in_place'].scores}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resnet-type", default="resnet50")
    p.add_argument("--image-size", type=int, default=288)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--snli-ve", action="store_true", help="time the whole SNLI-VE evaluation instead")
    p.add_argument("--tsv", default=None,
                   help="--snli-ve: the rows (default: the shared test TSV cycled to 64 rows, as bench_peers.py does)")
    p.add_argument("--checkpoint", default=str(REPO.parent / "shared" / "ofa_reference" / "ofa_tiny_snli_ve.pt"))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    original = FrozenBatchNorm2d.forward
    if args.snli_ve:
        try:
            snli_ve(args)
        finally:
            FrozenBatchNorm2d.forward = original
        return
    resnet = build_resnet(args.resnet_type, frozen_norm=True, drop_path_rate=0.0).eval()
    with torch.no_grad():  # statistics away from the identity, as a trained backbone has
        for module in resnet.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    try:
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
            wall = {name: [] for name in VARIANTS}
            cpu = {name: [] for name in VARIANTS}
            outputs = {}
            names = list(VARIANTS)
            for round_idx in range(args.repeats + 1):  # round 0 warms up
                order = names[round_idx % len(names):] + names[:round_idx % len(names)]
                for name in order:
                    FrozenBatchNorm2d.forward = VARIANTS[name]
                    start, start_cpu = time.perf_counter(), time.process_time()
                    with torch.no_grad():
                        outputs[name] = resnet(images)
                    if round_idx:
                        wall[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
            reference = outputs["two_pass"]
            print(f"{args.resnet_type} {args.image_size} px batch {batch}, {args.repeats} rounds (medians):")
            for name in names:
                diff = (outputs[name] - reference).abs().max().item()
                print(f"  {name:9s} wall {statistics.median(wall[name]):7.3f} s  "
                      f"cpu {statistics.median(cpu[name]):7.3f} s  max |diff| to two_pass {diff:.2e} "
                      f"(bit-identical: {torch.equal(outputs[name], reference)})")
    finally:
        FrozenBatchNorm2d.forward = original


if __name__ == "__main__":
    main()
