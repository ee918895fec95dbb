"""Wall-clock speed of MuE's exits on an OFA-Base-shaped model, against the FLOP model.

One run times, on the same random-weight model and the same batches:

* `ofa`        the plain OFA core (model `ofa`), full depth;
* `mue_full`   the MuE code path (`mue_ofa`, same weights) with every similarity threshold at 1,
               i.e. full depth through the decomposed encoder and the exit-aware decoder;
* `mue_exit`   forced exits through the static policy (default: image 3 of 6 layers, text 2 of 6,
               decoder 3 of 6 for every token, `propagate` keys/values).

and reports, per batch size, for the encoder, the decoder (generation minus encoder) and in
total: the measured speed-up of `mue_exit` over `mue_full`, the ideal speed-up the FLOP model
(`mue_fairseq.metrics.flops`) predicts from the exits actually taken, their ratio, and the
overhead of `mue_full` over `ofa`. Generation has a fixed length (`min_len = max_len_b`), so
every configuration decodes the same number of steps. Each timing is the median over repeats
after warm-up; configurations alternate within each repeat so that machine drift hits all alike.
Time is read after synchronising the device; on the CPU the process's CPU time is reported too.
A last phase measures the overhead precisely: encoder-only and decoder-only runs of OFA and MuE
in back-to-back pairs at batch 1 (`--overhead-repeats`).

With `--replay EXIT_STATS.json` the exits are instead a replay of recorded ones: the exit layers
an evaluation of a trained model wrote (`mue_fairseq.cli.evaluate`'s `{subset}_exit_stats.json`),
per sample for the image and text streams and per token for the decoder, made on this random-
weight model through the `replay` exit policy (`mue_fairseq.exits.replay`: same code paths and KV
policy as real exits, only the decisions are looked up). `mue_full` is timed against the replay
on the same inputs (no `ofa` run, no overhead phase); the ideal is the FLOP model's speed-up of
the replayed exits. Batch 1 times `--replay-batch1-samples` generations (recorded samples 0..n-1)
per round, larger batches one batch (recorded samples 0..b-1, cycled when the recording is
smaller); every round starts the replay from sample 0.

Results go to benchmarks/results/exit_speed_<device>_<dtype>_<px>px<tag>.{json,csv}; with
`--markdown`, the tables replace this benchmark's block in BENCHMARKS.md (other sections stay).

Examples (the default CPU run takes 4-7 minutes on the shared 2-core machine):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_exit_speed.py --markdown BENCHMARKS.md
    python benchmarks/bench_exit_speed.py --device cuda --dtype float16 --image-size 480 --batch-sizes 1 32
    bash benchmarks/gpu_speed.sh  # the prepared GPU run (480 px, float16 and float32, batch 1 and 32)
    OMP_NUM_THREADS=1 python benchmarks/bench_exit_speed.py --image-size 480 \
        --replay benchmarks/results/exit_stats_caption_quickstart_test.json
"""
import argparse
import csv
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY

import mue_fairseq  # noqa: F401  (registers the models)
from mue_fairseq.exits.replay import DEPTH_MAPPINGS, ExitReplay
from mue_fairseq.generation.sequence_generator import OFASequenceGenerator
from mue_fairseq.metrics.exit_stats import ExitStatistics
from mue_fairseq.metrics.flops import num_image_patches
from mue_fairseq.models.mue_ofa import MuEOFAModel
from mue_fairseq.ofa.model import OFAModel, ofa_base_architecture

from markdown_section import update_section  # benchmarks/, the script's own folder

logger = logging.getLogger("bench_exit_speed")
OFA_VOCAB_SIZE = 59457
BOS, EOS = 0, 2
CONFIGS = ("ofa", "mue_full", "mue_exit")
REPLAY_CONFIGS = ("mue_full", "mue_exit")  # mue_exit: the replayed exits
PARTS = ("encoder", "decoder", "total")
CLOCKS = ("wall", "cpu")
SECTION_BEGIN = "<!-- bench_exit_speed:begin -->"
SECTION_END = "<!-- bench_exit_speed:end -->"
SECTION_HEADING = "## Early-exit speed: measured vs FLOP model (`benchmarks/bench_exit_speed.py`)"
REPLAY_SECTION_BEGIN = "<!-- bench_exit_speed_replay:begin -->"
REPLAY_SECTION_END = "<!-- bench_exit_speed_replay:end -->"
REPLAY_SECTION_HEADING = ("## Early-exit speed at OFA-Base shape, replaying recorded exits "
                          "(`benchmarks/bench_exit_speed.py --replay`)")
TARGETS = {1: 0.9}  # measured/ideal total speed-up at batch 1; larger batches: DEFAULT_TARGET
DEFAULT_TARGET = 0.8
OVERHEAD_TARGET = 0.03


class _Task:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def padded_dictionary(size: int) -> Dictionary:
    """A dictionary of exactly `size` symbols (OFA's vocabulary size; the symbols do not matter)."""
    dictionary = Dictionary()
    for i in range(size - len(dictionary)):
        dictionary.add_symbol(f"<sym_{i}>")
    return dictionary


def build_models(dictionary: Dictionary, resnet_type: str):
    """OFA-Base-shaped `ofa` model (random weights, OFA's base-script flags) and an `mue_ofa` copy."""
    torch.manual_seed(0)
    base = dict(resnet_type=resnet_type, scale_attn=True, scale_fc=True, scale_heads=True, disable_entangle=True)
    ofa_args = Namespace(**base)
    ofa_base_architecture(ofa_args)
    ofa = OFAModel.build_model(ofa_args, _Task(dictionary))
    mue_args = Namespace(**base)
    ARCH_CONFIG_REGISTRY["mue_ofa_base"](mue_args)
    mue = MuEOFAModel.build_model(mue_args, _Task(dictionary))
    mue.load_state_dict(ofa.state_dict(), strict=True)
    return ofa.eval(), mue.eval()


def make_sample(batch: int, src_len: int, image_size: int, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 50000, (batch, src_len), generator=g)
    src[:, 0], src[:, -1] = BOS, EOS
    images = torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1
    return {
        "id": torch.arange(batch),
        "net_input": {
            "src_tokens": src.to(device),
            "src_lengths": torch.full((batch,), src_len, device=device),
            "patch_images": images.to(device=device, dtype=dtype),
            "patch_masks": torch.ones(batch, dtype=torch.bool, device=device),
        },
    }


class TimedGenerator:
    """An OFA generator whose encoder call and whole generation are timed (device synchronised).

    Each run reports wall-clock seconds and, on the CPU, this process's CPU seconds too: on a
    machine shared with other jobs the CPU time is the steadier of the two.
    """

    def __init__(self, model, dictionary, device, beam: int, length: int):
        self.model = model
        self.generator = OFASequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0,
                                              max_len_b=length, min_len=length)
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.encoder_times = (0.0, 0.0)
        ensemble = self.generator.model
        forward_encoder = ensemble.forward_encoder

        def timed_forward_encoder(net_input):
            self.sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = forward_encoder(net_input)
            self.sync()
            self.encoder_times = (time.perf_counter() - start, time.process_time() - start_cpu)
            return out

        ensemble.forward_encoder = timed_forward_encoder

    def run(self, sample):
        """Returns ({clock: {part: seconds}} for clocks wall and cpu, hypotheses)."""
        self.sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            hypos = self.generator.generate([self.model], sample)
        self.sync()
        totals = (time.perf_counter() - start, time.process_time() - start_cpu)
        times = {
            clock: {"encoder": encoder, "decoder": total - encoder, "total": total}
            for clock, encoder, total in zip(CLOCKS, self.encoder_times, totals)
        }
        return times, hypos


def exit_options(args, config: str) -> dict:
    if config == "mue_full":
        return dict(mue_exit_policy="similarity", mue_image_threshold=1.0, mue_text_threshold=1.0,
                    mue_decoder_threshold=1.0)
    return dict(mue_exit_policy="static", mue_static_image_layers=args.exit_image,
                mue_static_text_layers=args.exit_text, mue_static_decoder_layers=args.exit_decoder,
                mue_kv_policy=args.kv_policy)


def part_flops(stats: ExitStatistics) -> Dict[str, Dict[str, float]]:
    """FLOPs per sample by part: executed by the run, and OFA's joint-encoder full depth."""
    summary = stats.flop_summary()
    n = len(stats)
    executed = {"encoder": summary["encoder"]["executed"] / n, "decoder": summary["decoder"]["executed"] / n}
    executed["total"] = executed["encoder"] + executed["decoder"]
    # OFA's joint encoder differs from the decomposed one only in the encoder part.
    ofa_encoder = sum(
        sum(v for k, v in s.flops_full_ofa.items() if k in ("resnet", "joint_encoder", "encoder_position_bias"))
        for s in stats.samples) / n
    ofa = {"encoder": ofa_encoder, "decoder": summary["decoder"]["full"] / n}
    ofa["total"] = ofa["encoder"] + ofa["decoder"]
    return {"executed": executed, "ofa": ofa}


def _record_round(times: Dict, config: str, measured: Dict) -> None:
    """Append one timed round's seconds (per clock and part) to `times[clock][config][part]`."""
    for clock in CLOCKS:
        for part in PARTS:
            times[clock][config][part].append(measured[clock][part])


def bench_batch(args, batch: int, models, generators) -> dict:
    """Time every configuration on one batch; FLOPs and exits from the last run of each."""
    sample = make_sample(batch, args.src_len, args.image_size, args.device, args.dtype, seed=batch)
    repeats = args.repeats if batch == 1 else args.repeats_batched
    warmup = args.warmup if batch == 1 else args.warmup_batched
    times = {clock: {c: {p: [] for p in PARTS} for c in CONFIGS} for clock in CLOCKS}
    last_hypos = {}
    for round_idx in range(warmup + repeats):
        order = CONFIGS[round_idx % len(CONFIGS):] + CONFIGS[:round_idx % len(CONFIGS)]
        for config in order:
            if config != "ofa":
                models["mue"].set_exit_options(**exit_options(args, config))
            measured, last_hypos[config] = generators["ofa" if config == "ofa" else "mue"].run(sample)
            if round_idx >= warmup:
                _record_round(times, config, measured)
        logger.info("batch %d round %d/%d done", batch, round_idx + 1, warmup + repeats)

    for config in CONFIGS:
        lengths = {len(h[0]["tokens"]) for h in last_hypos[config]}
        if lengths != {args.length + 1}:
            raise RuntimeError(f"{config}: generated lengths {lengths}, expected {args.length + 1} for every sample")
    flops = {}
    exits = {}
    for config in ("mue_full", "mue_exit"):
        models["mue"].set_exit_options(**exit_options(args, config))
        stats = ExitStatistics.for_model(models["mue"], image_size=args.image_size, beam=args.beam)
        stats.add_generated(sample, last_hypos[config])
        flops[config] = part_flops(stats)["executed"]
        exits[config] = stats.mean_exit_layers()
        if config == "mue_full":
            flops["ofa"] = part_flops(stats)["ofa"]
    expected = (args.exit_image, args.exit_text, args.exit_decoder)
    taken = tuple(exits["mue_exit"][k] for k in ("image", "text", "decoder"))
    if taken != expected:
        raise RuntimeError(f"forced exits took {taken} layers (image, text, decoder), expected {expected}")

    median = {clock: {c: {p: statistics.median(times[clock][c][p]) for p in PARTS} for c in CONFIGS}
              for clock in CLOCKS}
    speedup = speedups(median, flops)
    overhead = {clock: {} for clock in CLOCKS}
    for clock in CLOCKS:
        for part in PARTS:
            overhead[clock][part] = {"measured": median[clock]["mue_full"][part] / median[clock]["ofa"][part] - 1,
                                     "flops": flops["mue_full"][part] / flops["ofa"][part] - 1}
    return {
        "batch_size": batch,
        "repeats": repeats,
        "warmup": warmup,
        "seconds": times,
        "median_seconds": median,
        "gflops_per_sample": {c: {p: v / 1e9 for p, v in flops[c].items()} for c in CONFIGS},
        "mean_exit_layers": exits,
        "speedup": speedup,
        "overhead": overhead,
        "target_ratio": TARGETS.get(batch, DEFAULT_TARGET),
    }


def speedups(median: dict, flops: dict) -> dict:
    """{clock: {part: measured, ideal and their ratio}} of `mue_exit` over `mue_full`."""
    out = {clock: {} for clock in CLOCKS}
    for clock in CLOCKS:
        for part in PARTS:
            measured = median[clock]["mue_full"][part] / median[clock]["mue_exit"][part]
            ideal = flops["mue_full"][part] / flops["mue_exit"][part]
            out[clock][part] = {"measured": measured, "ideal": ideal, "ratio": measured / ideal}
    return out


def set_config(args, model, config: str, replay: ExitReplay) -> None:
    if config == "mue_exit":
        model.set_exit_replay(replay, mue_kv_policy=args.kv_policy)
    else:
        model.set_exit_options(**exit_options(args, config))


def check_replayed(replay: ExitReplay, batch: int, hypos_per_generation: List[list], steps: int) -> None:
    """The exits the generator recorded are the replayed ones, row by row and token by token."""
    for generation, hypos in enumerate(hypos_per_generation):
        for row, sample_hypos in enumerate(hypos):
            position = generation * batch + row
            image, text, decoder = replay.targets(position, steps)
            best = sample_hypos[0]
            taken = (best["encoder_exit_layers"].tolist(), best["exit_layers"].tolist())
            if taken != ([image, text], decoder):
                raise RuntimeError(f"replay of recorded sample {replay.sample_index(position)} took image/text "
                                   f"{taken[0]}, decoder {taken[1]}; expected {[image, text]}, {decoder}")


def bench_replay_batch(args, batch: int, model, generator: "TimedGenerator", replay: ExitReplay) -> dict:
    """Time full depth against the replayed exits at one batch size (see the module doc)."""
    generations = args.replay_batch1_samples if batch == 1 else 1
    samples = [make_sample(batch, args.src_len, args.image_size, args.device, args.dtype, seed=1000 * batch + g)
               for g in range(generations)]
    repeats = args.repeats if batch == 1 else args.repeats_batched
    warmup = args.warmup if batch == 1 else args.warmup_batched
    times = {clock: {c: {p: [] for p in PARTS} for c in REPLAY_CONFIGS} for clock in CLOCKS}
    last_hypos = {}
    for round_idx in range(warmup + repeats):
        order = REPLAY_CONFIGS if round_idx % 2 == 0 else REPLAY_CONFIGS[::-1]
        for config in order:
            set_config(args, model, config, replay)
            replay.rewind()
            totals = {clock: dict.fromkeys(PARTS, 0.0) for clock in CLOCKS}
            last_hypos[config] = []
            for sample in samples:
                measured, hypos = generator.run(sample)
                last_hypos[config].append(hypos)
                for clock in CLOCKS:
                    for part in PARTS:
                        totals[clock][part] += measured[clock][part]
            if round_idx >= warmup:
                _record_round(times, config, totals)
        logger.info("replay batch %d round %d/%d done", batch, round_idx + 1, warmup + repeats)

    for config in REPLAY_CONFIGS:
        lengths = {len(h[0]["tokens"]) for hypos in last_hypos[config] for h in hypos}
        if lengths != {args.length + 1}:
            raise RuntimeError(f"{config}: generated lengths {lengths}, expected {args.length + 1} for every sample")
    check_replayed(replay, batch, last_hypos["mue_exit"], args.length + 1)
    flops, exits = {}, {}
    for config in REPLAY_CONFIGS:
        set_config(args, model, config, replay)
        stats = ExitStatistics.for_model(model, image_size=args.image_size, beam=args.beam)
        for sample, hypos in zip(samples, last_hypos[config]):
            stats.add_generated(sample, hypos)
        flops[config] = part_flops(stats)["executed"]
        exits[config] = stats.mean_exit_layers()
    median = {clock: {c: {p: statistics.median(times[clock][c][p]) for p in PARTS} for c in REPLAY_CONFIGS}
              for clock in CLOCKS}
    rows = generations * batch
    return {
        "batch_size": batch,
        "generations": generations,
        "rows": rows,  # samples per timed round; per-sample figures divide by this
        "replayed_samples": sorted({replay.sample_index(p) for p in range(rows)}),
        "repeats": repeats,
        "warmup": warmup,
        "seconds": times,
        "median_seconds": median,
        "gflops_per_sample": {c: {p: v / 1e9 for p, v in flops[c].items()} for c in REPLAY_CONFIGS},
        "mean_exit_layers": exits,
        "speedup": speedups(median, flops),
        "target_ratio": TARGETS.get(batch, DEFAULT_TARGET),
    }


def paired_overhead(args, models, repeats: int) -> dict:
    """Overhead of `mue_full` over `ofa`, measured precisely in pairs at batch 1.

    The encoder alone, and the decoder alone (the fixed-length incremental decoding the
    generator does, output projection included), run back to back for OFA and MuE in each
    pair; the overhead is the median of the per-pair time ratios (drift of a shared machine
    hits both halves of a pair alike) and the ratio of the fastest runs. Clock: CPU seconds
    of this process on the CPU, synchronised wall-clock on a GPU.
    """
    sample = make_sample(1, args.src_len, args.image_size, args.device, args.dtype, seed=1)["net_input"]
    models["mue"].set_exit_options(**exit_options(args, "mue_full"))
    cuda = torch.device(args.device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, 50000, (1, args.length + 1), generator=g).to(args.device)
    tokens[:, 0] = BOS

    def encode(model):
        return model.encoder(**sample)

    def decode(model, encoder_out):
        if getattr(model.decoder, "supports_exits", False):
            model.decoder.begin_decoding(args.length + 1)
        state: dict = {}
        for step in range(args.length + 1):
            model.decoder(tokens[:, : step + 1], encoder_out=encoder_out, incremental_state=state)

    def timed(fn, *inputs):
        sync()
        start = clock()
        out = fn(*inputs)
        sync()
        return clock() - start, out

    seconds = {part: {name: [] for name in ("ofa", "mue")} for part in ("encoder", "decoder")}
    with torch.no_grad():
        memories = {name: encode(model) for name, model in models.items()}
        for name, model in models.items():  # warm-up
            decode(model, memories[name])
        for pair in range(repeats):
            order = ("ofa", "mue") if pair % 2 == 0 else ("mue", "ofa")
            for name in order:
                seconds["encoder"][name].append(timed(encode, models[name])[0])
            for name in order:
                seconds["decoder"][name].append(timed(decode, models[name], memories[name])[0])
    result = {"repeats": repeats, "clock": "wall" if cuda else "cpu", "seconds": seconds}
    for part, times in seconds.items():
        ratios = [m / o for m, o in zip(times["mue"], times["ofa"])]
        result[part] = {"median_pair_overhead": statistics.median(ratios) - 1,
                        "min_overhead": min(times["mue"]) / min(times["ofa"]) - 1,
                        "ofa_median_seconds": statistics.median(times["ofa"]),
                        "mue_median_seconds": statistics.median(times["mue"])}
    logger.info("paired overhead: encoder %+.1f%%, decoder %+.1f%%",
                100 * result["encoder"]["median_pair_overhead"], 100 * result["decoder"]["median_pair_overhead"])
    return result


def environment(args) -> dict:
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "dtype": str(args.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = os.getloadavg()[0]
    return env


def _target_mark(ratio: float, target: float) -> str:
    return " (met)" if ratio >= target else f" (**< {target}**)"


def _speedup_rows(result: dict, cpu: bool) -> List[str]:
    """The speed-up table's rows, per batch and part: full depth against the exits (forced or
    replayed), per sample (a batch's `rows`: samples per timed round), with the target marks."""
    lines = []
    for b in result["batches"]:
        n, rows, target = b["batch_size"], b.get("rows", b["batch_size"]), b["target_ratio"]
        for part in PARTS:
            wall, cpu_time = b["speedup"]["wall"][part], b["speedup"]["cpu"][part]
            mark = _target_mark(wall["ratio"], target) if part == "total" else ""
            row = (
                f"| {n} | {part} | {1000 * b['median_seconds']['wall']['mue_full'][part] / rows:.1f} | "
                f"{1000 * b['median_seconds']['wall']['mue_exit'][part] / rows:.1f} | {wall['measured']:.2f}x | "
                f"{wall['ideal']:.2f}x | {wall['ratio']:.2f}{mark} |"
            )
            if cpu:
                mark = _target_mark(cpu_time["ratio"], target) if part == "total" else ""
                row += f" {cpu_time['measured']:.2f}x | {cpu_time['ratio']:.2f}{mark} |"
            lines.append(row)
    return lines


def markdown(result: dict) -> str:
    """The generated part of the BENCHMARKS.md section."""
    setting, env = result["setting"], result["environment"]
    cpu = env["device"] == "cpu"
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"OFA-Base shape with random weights: d=768, FFN 3072, 12 heads, 6+6 layers, {setting['resnet_type']}, "
        f"{setting['image_size']} px ({setting['num_patches']} patches), vocabulary {OFA_VOCAB_SIZE:,}, "
        f"{setting['src_len']} source tokens, beam {setting['beam']}, {setting['length']} tokens + eos per sample. "
        f"{env['device']} {env['dtype']}, {env['threads']} threads, torch {env['torch']}, {env['date']}; "
        f"load average before/after the run {env.get('load_average_1min', float('nan')):.1f}/"
        f"{result['load_average_after']:.1f} on {env['cpu_count']} cores. Medians of "
        + ", ".join(f"{b['repeats']} repeats after {b['warmup']} warm-up round(s) (batch {b['batch_size']})"
                    for b in result["batches"]) + "; configurations alternate within each round.",
        "",
        f"**Forced exits** (static policy: image {setting['exit_image']}/6, text {setting['exit_text']}/6, "
        f"decoder {setting['exit_decoder']}/6, kv `{setting['kv_policy']}`) against full depth (`mue_full`). "
        "Ideal = FLOP-model speed-up of the exits actually taken. Targets (total): measured >= "
        f"{TARGETS[1]} x ideal at batch 1, >= {DEFAULT_TARGET} x ideal at larger batches."
        + (" CPU time = this process's CPU seconds, steadier than wall-clock on a shared machine." if cpu else ""),
        "",
        "| batch | part | full ms/sample | exits ms/sample | speed-up | ideal (FLOPs) | speed-up / ideal |"
        + (" CPU-time speed-up | CPU-time / ideal |" if cpu else ""),
        "|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else ""),
    ]
    lines += _speedup_rows(result, cpu)
    lines += [
        "",
        "**Overhead of the MuE code path** with every threshold at 1 (`mue_full`) against the plain OFA core "
        f"(`ofa`, same weights); target <= {OVERHEAD_TARGET:.0%}. The FLOP column is the compute difference of "
        "the decomposed encoder (no image-text attention), which is not overhead.",
        "",
        "| batch | part | OFA ms/sample | MuE ms/sample | overhead | " + ("CPU-time overhead | " if cpu else "")
        + "FLOP difference |",
        "|---:|---|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|",
    ]
    for b in result["batches"]:
        n = b["batch_size"]
        for part in PARTS:
            wall, cpu_time = b["overhead"]["wall"][part], b["overhead"]["cpu"][part]
            lines.append(
                f"| {n} | {part} | {1000 * b['median_seconds']['wall']['ofa'][part] / n:.1f} | "
                f"{1000 * b['median_seconds']['wall']['mue_full'][part] / n:.1f} | {wall['measured']:+.1%} | "
                + (f"{cpu_time['measured']:+.1%} | " if cpu else "") + f"{wall['flops']:+.2%} |"
            )
    paired = result.get("paired_overhead")
    if paired:
        lines += [
            "",
            f"Paired measurement at batch 1 ({paired['repeats']} OFA/MuE pairs back to back, {paired['clock']} "
            "clock; median of per-pair ratios, and ratio of the fastest runs): encoder "
            f"{paired['encoder']['median_pair_overhead']:+.1%} ({paired['encoder']['min_overhead']:+.1%}), "
            f"decoder {paired['decoder']['median_pair_overhead']:+.1%} "
            f"({paired['decoder']['min_overhead']:+.1%}); medians OFA / MuE: encoder "
            f"{1000 * paired['encoder']['ofa_median_seconds']:.0f} / "
            f"{1000 * paired['encoder']['mue_median_seconds']:.0f} ms, "
            f"decoder {1000 * paired['decoder']['ofa_median_seconds']:.0f} / "
            f"{1000 * paired['decoder']['mue_median_seconds']:.0f} ms ({result['setting']['length']} tokens + eos, "
            "no beam search).",
        ]
    first = result["batches"][0]
    lines += [
        "",
        f"GFLOPs per sample (batch {first['batch_size']}; encoder / decoder / total): "
        + "; ".join(f"`{c}` {g['encoder']:.1f} / {g['decoder']:.1f} / {g['total']:.1f}"
                    for c, g in first["gflops_per_sample"].items())
        + f". Raw timings: `{result['json_path']}` (and `.csv`).",
    ]
    return "\n".join(lines)


def markdown_replay(result: dict) -> str:
    """The generated part of the replay section: says plainly that the exits are replayed."""
    setting, env, replay = result["setting"], result["environment"], result["replay"]
    cpu = env["device"] == "cpu"
    recorded = replay["recorded_mean_exit_layers"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"**Replay, not the model's own decisions.** Exit layers recorded by an evaluation of a trained model "
        f"(`{replay['path']}`: {replay['num_samples']} samples, {replay['recorded_depth'][0]}+"
        f"{replay['recorded_depth'][1]} layers, mean exits image {recorded['image']:.2f}, text "
        f"{recorded['text']:.2f}, decoder {recorded['decoder']:.2f} over {replay['mean_tokens']:.1f} tokens per "
        f"sample; depth mapping `{replay['mapping']}`), replayed per sample (image and text streams) and per "
        f"token (decoder; tokens past a recorded caption's end cycle over its tokens) on an OFA-Base-shaped model "
        f"with random weights through the `replay` exit policy, i.e. the code paths of real exits (rows leave the "
        f"batch, kv `{setting['kv_policy']}` fills the skipped layers' caches). Model: d=768, FFN 3072, 12 heads, "
        f"6+6 layers, {setting['resnet_type']}, {setting['image_size']} px ({setting['num_patches']} patches), "
        f"vocabulary {OFA_VOCAB_SIZE:,}, {setting['src_len']} source tokens, beam {setting['beam']}, "
        f"{setting['length']} tokens + eos per sample. {env['device']} {env['dtype']}, {env['threads']} threads, "
        f"torch {env['torch']}, {env['date']}; load average before/after the run "
        f"{env.get('load_average_1min', float('nan')):.1f}/{result['load_average_after']:.1f} on "
        f"{env['cpu_count']} cores. Medians of "
        + ", ".join(f"{b['repeats']} rounds after {b['warmup']} warm-up round(s) at batch {b['batch_size']} "
                    f"({b['generations']} generation(s), recorded samples {b['replayed_samples'][0]}-"
                    f"{b['replayed_samples'][-1]}, per round)" for b in result["batches"])
        + "; full depth and replay alternate within each round.",
        "",
        "Full depth (`mue_full`, every threshold 1) against the replayed exits on the same inputs. Ideal = "
        "FLOP-model speed-up (`mue_fairseq.metrics.flops`) of the exits the replay took (checked equal to the "
        f"recorded ones). Targets (total): measured >= {TARGETS[1]} x ideal at batch 1, >= {DEFAULT_TARGET} x "
        "ideal at larger batches."
        + (" CPU time = this process's CPU seconds, steadier than wall-clock on a shared machine." if cpu else ""),
        "",
        "| batch | part | full ms/sample | replay ms/sample | speed-up | ideal (FLOPs) | speed-up / ideal |"
        + (" CPU-time speed-up | CPU-time / ideal |" if cpu else ""),
        "|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else ""),
    ]
    lines += _speedup_rows(result, cpu)
    lines += [""]
    for b in result["batches"]:
        taken = b["mean_exit_layers"]["mue_exit"]
        g = b["gflops_per_sample"]
        lines.append(
            f"Batch {b['batch_size']}: replayed mean exits image {taken['image']:.2f}, text {taken['text']:.2f}, "
            f"decoder {taken['decoder']:.2f}; GFLOPs per sample (encoder / decoder / total) full "
            f"{g['mue_full']['encoder']:.1f} / {g['mue_full']['decoder']:.1f} / {g['mue_full']['total']:.1f}, "
            f"replay {g['mue_exit']['encoder']:.1f} / {g['mue_exit']['decoder']:.1f} / {g['mue_exit']['total']:.1f}.")
    lines += ["", f"Raw timings: `{result['json_path']}` (and `.csv`)."]
    return "\n".join(lines)


def summarize(paths: List[str]) -> str:
    """A compact table (wall-clock, totals) over several result JSONs, e.g. float16 and float32 runs."""
    lines = [
        "| device | dtype | px | batch | full ms/sample | exits ms/sample | speed-up | ideal | measured/ideal "
        "| MuE overhead (enc / dec / total) | paired overhead (enc / dec) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for path in paths:
        result = json.loads(Path(path).read_text())
        env, setting, paired = result["environment"], result["setting"], result.get("paired_overhead")
        label = " (replay)" if result.get("replay") else ""
        for b in result["batches"]:
            n, s, o = b["batch_size"], b["speedup"]["wall"]["total"], b.get("overhead", {}).get("wall")
            rows = b.get("rows", n)
            median = b["median_seconds"]["wall"]
            lines.append(
                f"| {env.get('gpu', env['device'])}{label} | {env['dtype']} | {setting['image_size']} | {n} | "
                f"{1000 * median['mue_full']['total'] / rows:.2f} | {1000 * median['mue_exit']['total'] / rows:.2f} | "
                f"{s['measured']:.2f}x | {s['ideal']:.2f}x | {s['ratio']:.2f} | "
                + (" / ".join(f"{o[p]['measured']:+.1%}" for p in PARTS) if o else "-") + " | "
                + (" / ".join(f"{paired[p]['median_pair_overhead']:+.1%}" for p in ("encoder", "decoder"))
                   if paired else "-") + " |"
            )
    return "\n".join(lines)


def write_csv(path: Path, result: dict) -> None:
    """One row per batch size, configuration, clock and part."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["batch_size", "config", "clock", "part", "median_seconds", "ms_per_sample",
                         "gflops_per_sample", "speedup_measured", "speedup_ideal", "speedup_ratio",
                         "overhead_vs_ofa"])
        for b in result["batches"]:
            n, rows = b["batch_size"], b.get("rows", b["batch_size"])
            for config in b["median_seconds"]["wall"]:
                for clock in CLOCKS:
                    for part in PARTS:
                        sec = b["median_seconds"][clock][config][part]
                        s = b["speedup"][clock][part] if config == "mue_exit" else None
                        o = b["overhead"][clock][part]["measured"] if config == "mue_full" and "overhead" in b else None
                        speedup = [f"{s[k]:.4f}" for k in ("measured", "ideal", "ratio")] if s else ["", "", ""]
                        writer.writerow([n, config, clock, part, f"{sec:.6f}", f"{1000 * sec / rows:.3f}",
                                         f"{b['gflops_per_sample'][config][part]:.4f}", *speedup,
                                         "" if o is None else f"{o:.4f}"])


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on the CPU; 1 by default: on a shared 2-core machine two "
                   "threads that wait for each other slow down several-fold and vary widely")
    p.add_argument("--image-size", type=int, default=256, help="256 px -> 16x16 patches; 480 px -> 30x30")
    p.add_argument("--resnet-type", default="resnet101")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--src-len", type=int, default=8, help="source tokens incl. bos/eos (a caption prompt is 8)")
    p.add_argument("--length", type=int, default=16, help="generated tokens before eos (min_len = max_len_b)")
    p.add_argument("--exit-image", type=int, default=3)
    p.add_argument("--exit-text", type=int, default=2)
    p.add_argument("--exit-decoder", type=int, default=3)
    p.add_argument("--kv-policy", default="propagate", choices=["propagate", "copy", "none"])
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds at batch 1 (every configuration once)")
    p.add_argument("--warmup-batched", type=int, default=0,
                   help="warm-up rounds at larger batches (the models are warm by then; a slower first "
                   "round moves the median little)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds at batch 1")
    p.add_argument("--repeats-batched", type=int, default=3, help="timed rounds at larger batches")
    p.add_argument("--overhead-repeats", type=int, default=8,
                   help="pairs of OFA/MuE encoder-only and decoder-only runs at batch 1 for a precise "
                   "overhead figure (0: skip)")
    p.add_argument("--replay", metavar="EXIT_STATS_JSON", default=None,
                   help="time a replay of the exits recorded in this exit statistics file (an evaluation's "
                   "{subset}_exit_stats.json) against full depth, instead of forced uniform exits")
    p.add_argument("--replay-mapping", default="proportional", choices=DEPTH_MAPPINGS,
                   help="how recorded exit layers map to this model's 6+6 layers when the recording's depth "
                   "differs: proportional (round(layers * 6 / recorded depth), halves up) or equal (depths must match)")
    p.add_argument("--replay-batch1-samples", type=int, default=4,
                   help="replay: generations per round at batch 1 (recorded samples 0..n-1); larger batches "
                   "run one batch of recorded samples 0..b-1 per round")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--markdown", default=None, help="BENCHMARKS.md to update with the result tables")
    p.add_argument("--summarize", nargs="+", metavar="JSON",
                   help="only print a compact table of earlier result files (no benchmark run)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return {}
    args.dtype = getattr(torch, args.dtype)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
        if args.dtype != torch.float32:
            logger.warning("half precision on the CPU is slow and not what this benchmark is about")
    env = environment(args)
    threads_env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cli = argv if argv is not None else sys.argv[1:]
    command = f"{threads_env}python benchmarks/bench_exit_speed.py " + " ".join(cli)

    dictionary = padded_dictionary(OFA_VOCAB_SIZE)
    start = time.perf_counter()
    ofa, mue = build_models(dictionary, args.resnet_type)
    ofa.to(device=args.device, dtype=args.dtype)
    mue.to(device=args.device, dtype=args.dtype)
    logger.info("built models in %.1f s", time.perf_counter() - start)
    models = {"ofa": ofa, "mue": mue}
    replay_info = None
    if args.replay:
        del models["ofa"]  # a replay compares MuE's full depth with the replayed exits only
        replay = ExitReplay.read_json(args.replay, mue.args.encoder_layers, mue.args.decoder_layers,
                                      args.replay_mapping)
        recorded = ExitStatistics.read_json(args.replay)
        replay_info = {
            "path": args.replay,
            "num_samples": len(recorded),
            "recorded_depth": [recorded.encoder_layers, recorded.decoder_layers],
            "mapping": args.replay_mapping,
            "recorded_mean_exit_layers": recorded.mean_exit_layers(),
            "mean_tokens": sum(len(s.decoder_layers) for s in recorded.samples) / len(recorded),
        }
    generators = {name: TimedGenerator(model, dictionary, args.device, args.beam, args.length)
                  for name, model in models.items()}

    if args.replay:
        batches = [bench_replay_batch(args, batch, mue, generators["mue"], replay) for batch in args.batch_sizes]
        overhead = None
    else:
        batches = [bench_batch(args, batch, models, generators) for batch in args.batch_sizes]
        overhead = paired_overhead(args, models, args.overhead_repeats) if args.overhead_repeats else None
    setting = {k: v for k, v in vars(args).items() if k not in ("dtype", "markdown", "out_dir", "tag")}
    setting["num_patches"] = num_image_patches(args.image_size)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = env["dtype"]
    stem = (f"exit_speed_{torch.device(args.device).type}_{dtype_name}_{args.image_size}px"
            f"{'_replay' if args.replay else ''}{args.tag}")
    result = {
        "command": command.strip(),
        "setting": setting,
        "environment": env,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "json_path": str(out_dir / f"{stem}.json"),
        "batches": batches,
        "paired_overhead": overhead,
        "replay": replay_info,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_csv(out_dir / f"{stem}.csv", result)
    table = markdown_replay(result) if args.replay else markdown(result)
    print(table)
    if args.markdown:
        heading, begin, end = ((REPLAY_SECTION_HEADING, REPLAY_SECTION_BEGIN, REPLAY_SECTION_END) if args.replay
                               else (SECTION_HEADING, SECTION_BEGIN, SECTION_END))
        update_section(Path(args.markdown), heading, begin, end, table)
        logger.info("updated %s", args.markdown)
    return result


if __name__ == "__main__":
    main()
