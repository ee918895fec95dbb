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
"""
import argparse
import statistics
import time

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resnet-type", default="resnet50")
    p.add_argument("--image-size", type=int, default=288)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    resnet = build_resnet(args.resnet_type, frozen_norm=True, drop_path_rate=0.0).eval()
    with torch.no_grad():  # statistics away from the identity, as a trained backbone has
        for module in resnet.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    original = FrozenBatchNorm2d.forward
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
