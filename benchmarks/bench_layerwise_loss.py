"""Training-step time of `mue_layerwise_ce` against OFA's criterion on one OFA-Base-shaped decoder.

One model, one batch, every criterion variant timed in the same run (rounds interleave the
variants so that machine drift hits all alike). A step is the criterion's forward (model
included) plus ``loss.backward()``.

Model: OFA-Base's decoder (6 layers, d=768, 12 heads, FFN 3072, tied output projection over the
real vocabulary size 59,457). By default the encoder is kept small so that a CPU run takes a few
minutes and the decoder dominates (the worst case for a layer-wise loss): one d=768 encoder layer
over a 128 px image (OFA's 3-stage ``resnet18`` backbone, 8x8 = 64 patches) and the text prompt,
batch 8. The real OFA-Base encoder adds the same absolute cost to every variant; measure it with
``--encoder-layers 6 --resnet-type resnet101 --image-size 480 --batch-size 2`` (OFA-Base caption
fine-tuning runs 2 samples per GPU).

Examples:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_layerwise_loss.py --rounds 3
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_layerwise_loss.py --rounds 2 --encoder-layers 6 \
        --resnet-type resnet101 --image-size 480 --batch-size 2 --variants ofa,exact,sampled1
"""
import argparse
import logging
import os
import platform
import statistics
import time
from argparse import Namespace
from typing import Dict, List, Tuple

import torch
from fairseq.data import Dictionary

import mue_fairseq  # noqa: F401
from mue_fairseq.criterions.label_smoothed_ce import AdjustLabelSmoothedCrossEntropyCriterion
from mue_fairseq.criterions.layerwise_ce import LayerwiseCrossEntropyCriterion
from mue_fairseq.ofa.model import OFAModel, ofa_base_architecture

OFA_VOCAB_SIZE = 59457
PAD, EOS = 1, 2


class _Task:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def build_model(dictionary: Dictionary, encoder_layers: int, resnet_type: str) -> OFAModel:
    args = Namespace(
        encoder_layers=encoder_layers,
        resnet_type=resnet_type,
        scale_attn=True,
        scale_fc=True,
        scale_heads=True,
        disable_entangle=True,
    )
    ofa_base_architecture(args)
    return OFAModel.build_model(args, _Task(dictionary))


def build_batch(batch_size: int, src_len: int, max_tgt_len: int, image_size: int, seed: int = 0) -> dict:
    """Caption-like batch: a fixed prompt, targets of 60-100% of the maximum length (+ eos), right-padded."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 50000, (batch_size, src_len), generator=g)
    src[:, 0], src[:, -1] = 0, EOS
    lengths = torch.randint(int(0.6 * max_tgt_len), max_tgt_len + 1, (batch_size,), generator=g)
    target = torch.full((batch_size, max_tgt_len + 1), PAD)
    for row, length in enumerate(lengths.tolist()):
        target[row, :length] = torch.randint(4, 50000, (length,), generator=g)
        target[row, length] = EOS
    prev = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), target[:, :-1]], dim=1)
    prev[prev.eq(EOS)] = PAD
    return {
        "nsentences": batch_size,
        "ntokens": int(target.ne(PAD).sum()),
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((batch_size,), src_len),
            "patch_images": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "patch_masks": torch.ones(batch_size, dtype=torch.bool),
            "prev_output_tokens": prev,
        },
        "target": target,
    }


VARIANTS = {
    "ofa": ("ofa (adjust_label_smoothed_cross_entropy)", None),
    "last": ("mue_layerwise_ce, last layer only (--layer-weights 0,0,0,0,0,1)", dict(layer_weights="0,0,0,0,0,1")),
    "exact": ("mue_layerwise_ce, all 6 layers (exact, the default)", {}),
    "sampled2": ("mue_layerwise_ce --sampled-intermediate-layers 2", dict(sampled_intermediate_layers=2)),
    "sampled1": ("mue_layerwise_ce --sampled-intermediate-layers 1", dict(sampled_intermediate_layers=1)),
}


def build_criteria(
    task, names: List[str], label_smoothing: float, drop_worst_ratio: float
) -> Dict[str, torch.nn.Module]:
    common = dict(sentence_avg=False, label_smoothing=label_smoothing, drop_worst_ratio=drop_worst_ratio)
    criteria = {}
    for name in names:
        title, options = VARIANTS[name]
        criteria[title] = (
            AdjustLabelSmoothedCrossEntropyCriterion(task, **common)
            if options is None
            else LayerwiseCrossEntropyCriterion(task, **common, **options)
        )
    return criteria


def saved_activation_bytes(model, criterion, sample) -> int:
    """Bytes of the tensors autograd keeps for backward in one step (parameters and buffers excluded)."""
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, total = set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _, _ = criterion(model, sample, update_num=10**6)
    loss.backward()
    return total[0]


def time_step(model, criterion, sample) -> Tuple[float, float]:
    """(wall-clock, CPU) seconds of one step; CPU time (this process) is steadier on a shared machine."""
    model.zero_grad(set_to_none=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    loss, _, _ = criterion(model, sample, update_num=10**6)
    loss.backward()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--src-len", type=int, default=8, help="source tokens (OFA's caption prompt is 8)")
    parser.add_argument("--max-tgt-len", type=int, default=20, help="longest target, before eos")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--encoder-layers", type=int, default=1)
    parser.add_argument("--resnet-type", default="resnet18", help="OFA backbone: resnet18/50/101/152")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, first is the baseline: {','.join(VARIANTS)}"
    )
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-worst-ratio", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dictionary = Dictionary()
    while len(dictionary) < OFA_VOCAB_SIZE:
        dictionary.add_symbol(f"tok{len(dictionary)}")
    task = _Task(dictionary)
    model = build_model(dictionary, args.encoder_layers, args.resnet_type).train()
    sample = build_batch(args.batch_size, args.src_len, args.max_tgt_len, args.image_size)
    criteria = build_criteria(task, args.variants.split(","), args.label_smoothing, args.drop_worst_ratio)

    times: Dict[str, List[float]] = {name: [] for name in criteria}
    cpu_times: Dict[str, List[float]] = {name: [] for name in criteria}
    saved = {name: saved_activation_bytes(model, criterion, sample) for name, criterion in criteria.items()}
    for round_index in range(args.warmup + args.rounds):
        for name, criterion in criteria.items():
            torch.manual_seed(round_index)
            elapsed, cpu = time_step(model, criterion, sample)
            logging.info("round %d %s: %.3f s (CPU %.3f s)", round_index, name, elapsed, cpu)
            if round_index >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)

    target = sample["target"]
    n_scored = int(target.ne(PAD).sum())
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(
        f"batch {args.batch_size} x target {target.size(1)} positions ({n_scored} scored, "
        f"{target.numel() - n_scored} pad), source {args.src_len} tokens + {(args.image_size // 16) ** 2} patches, "
        f"encoder layers {args.encoder_layers}, {args.resnet_type}, decoder 6 x d768, vocabulary {len(dictionary)}, "
        f"label smoothing {args.label_smoothing}, drop-worst {args.drop_worst_ratio}; {args.rounds} rounds"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) at the end: {load:.1f}")
    first = next(iter(criteria))
    base, base_cpu = statistics.median(times[first]), statistics.median(cpu_times[first])
    print("| criterion | median step (s) | min (s) | vs OFA (median) | median CPU (s) | vs OFA (CPU) "
          "| saved for backward (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, values in times.items():
        median, cpu = statistics.median(values), statistics.median(cpu_times[name])
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {median / base:.2f}x | {cpu:.3f} | "
              f"{cpu / base_cpu:.2f}x | {saved[name] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
