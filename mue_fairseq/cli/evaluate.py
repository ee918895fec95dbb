"""Evaluate an OFA / MuE checkpoint on a split, as OFA's `evaluate.py` does, with exit statistics.

    python -m mue_fairseq.cli.evaluate DATA --path ckpt.pt --user-dir mue_fairseq --task caption \
        --gen-subset test --batch-size 16 --beam 5 --max-len-b 16 --no-repeat-ngram-size 3 \
        --results-path results/ --model-overrides "{'bpe_dir': '...'}" \
        --mue-image-threshold 0.9 --mue-text-threshold 0.9 --mue-decoder-threshold 0.9

Any `--mue-*` option loads the checkpoint as `mue_ofa` with that setting (no option: the model
as saved). Writes `{subset}_predict.json`, `{subset}_scores.json`, `{subset}_exit_stats.json`
and exit-layer histograms (PNG) to `--results-path`; timing covers the model only (device
synchronised), not data loading or scoring.
"""
import argparse
import ast
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fairseq import options, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar

from mue_fairseq.cli.distributed_eval import (
    EvalProcesses, add_launcher_arguments, all_gather_floats, barrier, broadcast_from_main, close_processes,
    configure_logging, current_processes, gather_shards, init_processes, interleave_batches,
)

logger = logging.getLogger("mue_fairseq.evaluate")


@dataclass
class EvaluationResult:
    task: str
    subset: str
    num_samples: int
    scores: Dict[str, float]
    exit_summary: dict
    seconds: float  # model time, summed over ranks
    predictions: list
    rank_seconds: List[float] = field(default_factory=list)  # model time of each rank
    rank_samples: List[int] = field(default_factory=list)  # samples each rank evaluated
    wall_seconds: Optional[float] = None  # the whole run (data, model, merge), slowest rank
    truncated_images: List[str] = field(default_factory=list)  # rows whose image data ended early

    def quality(self) -> float:
        """The headline metric: SNLI-VE accuracy, or caption CIDEr."""
        return self.scores.get("accuracy", self.scores.get("CIDEr", self.scores.get("cider_d", float("nan"))))


def add_mue_arguments(parser: argparse.ArgumentParser) -> None:
    """MuE options as evaluation flags; only those given become model overrides."""
    from mue_fairseq.exits.config import MuEConfig

    group = parser.add_argument_group("MuE exits (given options override the checkpoint's)")
    for f in fields(MuEConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = float if f.type is float else int if f.type is int else str
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--snli-mode", choices=["score", "generate"], default="score",
                        help="SNLI-VE: OFA's answer scoring, or constrained generation of the answer")
    parser.add_argument("--beam-search-vqa-eval", action="store_true",
                        help="vqa_gen: answer by constrained beam search instead of scoring every candidate "
                        "(OFA's evaluate.py option; it sets val_inference_type)")
    parser.add_argument("--ema-eval", action="store_true",
                        help="evaluate the EMA weights the checkpoint stores (trained with --store-ema), as OFA's "
                        "evaluate.py --ema-eval does")
    parser.add_argument("--no-plots", action="store_true", help="do not draw exit-layer histograms")
    parser.add_argument("--official-caption-scores", action="store_true",
                        help="also score captions with pycocoevalcap (Java): BLEU, METEOR, ROUGE-L, CIDEr")


def mue_options_from_args(args: argparse.Namespace) -> Dict[str, object]:
    from mue_fairseq.exits.config import MuEConfig

    return {f.name: getattr(args, f.name) for f in fields(MuEConfig) if hasattr(args, f.name)}


def load_for_evaluation(args: argparse.Namespace):
    """(models, task, cfg) with `--model-overrides` and the given MuE options applied."""
    from mue_fairseq.exits.config import mue_overrides
    from mue_fairseq.ofa.checkpoint import load_ofa_ensemble

    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    mue = mue_options_from_args(args)
    if mue:
        overrides.update(mue_overrides(**mue))
    if args.data:
        overrides["data"] = args.data
    # fairseq's generation parser defaults to translation, which means no --task was given.
    asked_task = args.task if args.task != "translation" else None
    if asked_task == "vqa_gen":  # as OFA's evaluate.py: the flag decides vqa_gen's inference type
        overrides["val_inference_type"] = "beamsearch" if getattr(args, "beam_search_vqa_eval", False) else "allcand"
    models, _, task = load_ofa_ensemble(utils.split_paths(cfg.common_eval.path), arg_overrides=overrides,
                                        task_name=asked_task)
    if getattr(args, "ema_eval", False):
        for model, path in zip(models, utils.split_paths(cfg.common_eval.path)):
            load_ema_weights(model, path)
    # A task option, which the checkpoint's task config (OFA's: no such field) cannot carry.
    task.strict_images = task.strict_images or bool(getattr(args, "strict_images", False))
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    if cfg.common.fp16 and not use_cuda:
        # OFA's scripts pass --fp16 for their GPUs; half precision on the CPU is slow or unsupported.
        logger.warning("--fp16 needs a CUDA device: evaluating in float32 on the CPU")
        cfg.common.fp16 = False
    for model in models:
        model.eval()
        if cfg.common.fp16:
            model.half()
        if use_cuda:
            model.cuda()
    return models, task, cfg


def load_ema_weights(model, path: str) -> None:
    """Replace `model`'s weights by the EMA weights that checkpoint `path` stores (fairseq's
    ``extra_state["ema"]``, written with ``--store-ema``), strictly."""
    from mue_fairseq.ofa.checkpoint import read_checkpoint

    state = read_checkpoint(path)
    ema = (state.get("extra_state") or {}).get("ema")
    if not ema:
        raise ValueError(f"--ema-eval: the checkpoint {path} stores no EMA weights (extra_state['ema']); "
                         "it was trained without --store-ema: evaluate it without --ema-eval")
    # fp16 EMA copies load as float32, as OFA's load_ema_from_checkpoint does
    weights = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.half else v for k, v in ema.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"--ema-eval: the EMA weights in {path} do not fit its model: {err}") from err
    logger.info("loaded the EMA weights of %s", path)


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class BatchOutput:
    """What one batch gives the merged result: its rows in order (to gather them across ranks)."""

    predictions: list
    hyps: List[str]
    refs: List[List[str]]
    correct: List[float]
    exits: list  # SampleExits of its samples (none without exit records)
    seconds: float
    truncated_images: List[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.predictions)


def run_evaluation(models, task, cfg, subset: Optional[str] = None, snli_mode: str = "score",
                   official_caption_scores: bool = False, progress: bool = True,
                   processes: Optional[EvalProcesses] = None):
    """Evaluate `models[0]` on `subset`; returns (EvaluationResult, ExitStatistics).

    Only the model is timed (device synchronised), not data loading or scoring. On several
    processes each rank evaluates its shard of the batches and every rank returns the same
    merged result, rows in one-process order (`mue_fairseq.cli.distributed_eval`).
    """
    from mue_fairseq.metrics.exit_stats import ExitStatistics

    processes = processes or current_processes()
    subset = subset or cfg.dataset.gen_subset
    model = models[0]
    task_name = task.__class__.__name__
    task.load_dataset(subset)
    barrier(processes)  # the run's wall-clock starts when every rank is ready
    run_start = time.perf_counter()
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=cfg.dataset.max_tokens, max_sentences=cfg.dataset.batch_size,
        num_shards=processes.world_size, shard_id=processes.rank, num_workers=cfg.dataset.num_workers,
    ).next_epoch_itr(shuffle=False)
    bar = progress_bar.progress_bar(itr, log_format=cfg.common.log_format if progress else "none",
                                    log_interval=cfg.common.log_interval, default_log_format="tqdm")
    use_cuda = next(model.parameters()).is_cuda
    beam = cfg.generation.beam
    is_snli = hasattr(task, "score_answers")
    # The FLOP model describes generation; SNLI-VE scoring (one teacher-forced pass over prompt and
    # candidates) is reported by layer counts and wall-clock only.
    scoring = _scores_candidates(task, snli_mode)
    stats = ExitStatistics.for_model(model, image_size=None if scoring else task.cfg.patch_image_size,
                                     beam=1 if is_snli else beam)
    generator = None
    if not scoring:
        generator = task.build_generator(models, cfg.generation)
    batches: List[BatchOutput] = []
    error = None
    try:
        with torch.no_grad():
            for sample in bar:
                if not sample:  # fairseq pads a short shard with empty batches
                    continue
                batches.append(_evaluate_batch(task, models, generator, cfg, stats, sample, use_cuda, scoring))
    except Exception as err:  # the other ranks must learn of it: see gather_shards
        error = err
    shards = gather_shards(processes, batches, error)
    rank_seconds = [sum(b.seconds for b in shard) for shard in shards]
    rank_samples = [sum(b.num_samples for b in shard) for shard in shards]
    logger.info("%s %s: rank %d of %d evaluated %d samples in %d batches, model time %.2f s", task_name, subset,
                processes.rank, processes.world_size, rank_samples[processes.rank], len(batches),
                rank_seconds[processes.rank])

    merged = interleave_batches(shards)
    merged_stats = ExitStatistics(stats.encoder_layers, stats.decoder_layers, stats.flop_model)
    predictions, hyps, refs, correct, truncated = [], [], [], [], []
    for batch in merged:
        truncated += batch.truncated_images
        predictions += batch.predictions
        hyps += batch.hyps
        refs += batch.refs
        correct += batch.correct
        merged_stats.samples.extend(batch.exits)
        merged_stats.add_wall_clock(batch.seconds, batch.num_samples)
    scores = None
    if processes.is_main:  # once (pycocoevalcap starts a JVM); every rank gets the same scores
        if is_snli or hasattr(task, "evaluation_rows"):
            scores = {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)}
        else:
            scores = caption_scores(hyps, refs, official_caption_scores)
    scores = broadcast_from_main(processes, scores)
    wall_seconds = max(all_gather_floats(processes, time.perf_counter() - run_start))
    result = EvaluationResult(task_name, subset, len(predictions), scores,
                              merged_stats.summary() if len(merged_stats) else {}, sum(rank_seconds), predictions,
                              rank_seconds=rank_seconds, rank_samples=rank_samples, wall_seconds=wall_seconds,
                              truncated_images=truncated)
    return result, merged_stats


def _evaluate_batch(task, models, generator, cfg, stats, sample, use_cuda: bool, scoring: bool) -> BatchOutput:
    """Run the model on one batch (timed) and turn its output into rows; exits go to `stats`."""
    model = models[0]
    is_snli = hasattr(task, "score_answers")
    sample = utils.move_to_cuda(sample) if use_cuda else sample
    if cfg.common.fp16:
        sample = utils.apply_to_sample(lambda t: t.half() if t.is_floating_point() else t, sample)
    ids = sample["id"].tolist()
    first_exit = len(stats)
    _synchronize()
    start = time.perf_counter()
    if scoring:
        answers, image_layers, text_layers, decoder_layers = task.answer_with_exits(model, sample)
        _synchronize()
        elapsed = time.perf_counter() - start
        width = int(sample["net_input"]["src_tokens"].size(1))
        for row, sample_id in enumerate(ids):
            # One decoder depth per sample (its candidates stop together): the first pass's.
            stats.add_sample(sample_id, image_layers[row], text_layers[row], decoder_layers[row][:1], width,
                             len(ids))
    else:
        hypos = task.inference_step(generator, models, sample)
        _synchronize()
        elapsed = time.perf_counter() - start
        if "exit_layers" in hypos[0][0]:
            stats.add_generated(sample, hypos)
        if hasattr(task, "evaluation_rows"):
            answers = hypos
        else:
            answers = (task.generated_answers(sample, hypos) if is_snli
                       else [task.decode(h[0]["tokens"]).strip() for h in hypos])
    out = BatchOutput([], [], [], [], stats.samples[first_exit:], elapsed, list(sample.get("truncated_images", [])))
    if hasattr(task, "evaluation_rows"):
        # Tasks with their own prediction rows and per-row scores (refcoco, vqa_gen), as OFA writes them.
        out.predictions, out.correct = task.evaluation_rows(sample, answers)
    elif is_snli:
        for sample_id, answer, ref_dict in zip(ids, answers, sample["ref_dict"]):
            out.predictions.append({"uniq_id": sample_id, "answer": answer})
            out.correct.append(ref_dict.get(answer, 0))
    else:
        from mue_fairseq.data.caption_dataset import strip_punctuation

        for i, (sample_id, text) in enumerate(zip(ids, answers)):
            caption = strip_punctuation(text).strip()
            out.predictions.append({"image_id": sample_id, "caption": caption})
            out.hyps.append(caption)
            target = utils.strip_pad(sample["target"][i], task.tgt_dict.pad())
            out.refs.append([strip_punctuation(r).strip() for r in task.decode(target).split("&&")])
    return out


def _scores_candidates(task, snli_mode: str) -> bool:
    """Whether answers come from scoring every candidate in one pass (SNLI-VE's default, vqa_gen's
    allcand) rather than from generation."""
    if hasattr(task, "answers_by_scoring"):
        return task.answers_by_scoring
    return hasattr(task, "score_answers") and snli_mode == "score"


def caption_scores(hyps: List[str], refs: List[List[str]], official: bool) -> Dict[str, float]:
    """CIDEr-D (no Java, corpus document frequencies) and, if asked, pycocoevalcap's scores."""
    from mue_fairseq.metrics.cider import CiderD

    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    cider_d, _ = CiderD("corpus").compute_score(gts, res)
    scores = {"cider_d": 100.0 * float(cider_d)}
    if official:
        from mue_fairseq.metrics.caption_scores import score_captions

        official_scores = score_captions({str(i): hyp for i, hyp in enumerate(hyps)},
                                         {str(i): r for i, r in gts.items()})
        scores.update({k: 100.0 * v for k, v in official_scores.items()})
    return scores


def check_results_path(results_path: str) -> Path:
    """The results folder, made if needed; an error naming it if it cannot hold results.

    Checked before the model is loaded, so a bad path does not cost a whole evaluation.
    """
    out = Path(results_path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--results-path {out} is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--results-path {out}: {parent} is a file, not a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"--results-path {out}: cannot make the folder ({err.strerror})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--results-path {out}: the folder is not writable")
    return out


def remove_stale_exit_files(out: Path, subset: str, keep_json: bool) -> List[Path]:
    """Delete exit statistics / histograms of an earlier run that this run does not write again."""
    stale = sorted(out.glob(f"{subset}_exit_stats.*_exits.png"))
    if not keep_json and (out / f"{subset}_exit_stats.json").exists():
        stale.append(out / f"{subset}_exit_stats.json")
    for path in stale:
        path.unlink()
    return stale


def write_results(result: EvaluationResult, stats, results_path: str, plots: bool = True) -> Dict[str, Path]:
    """Write predictions, scores and exit statistics (and plots) to `results_path`.

    Each file is written under a temporary name and all are renamed at the end, so a run that
    fails leaves no file that looks complete.
    """
    out = Path(results_path)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": out / f"{result.subset}_predict.json",
        "scores": out / f"{result.subset}_scores.json",
        "exit_stats": out / f"{result.subset}_exit_stats.json",
    }
    texts = {
        "predictions": json.dumps(result.predictions, indent=1),
        "scores": json.dumps({"num_samples": result.num_samples, "seconds": result.seconds, **result.scores,
                              "processes": len(result.rank_seconds) or 1, "rank_seconds": result.rank_seconds,
                              "rank_samples": result.rank_samples, "wall_seconds": result.wall_seconds,
                              "truncated_images": len(result.truncated_images),
                              "truncated_image_rows": result.truncated_images}, indent=1),
    }
    if len(stats):
        texts["exit_stats"] = json.dumps(stats.to_json(), indent=1)
    else:
        del paths["exit_stats"]
    temporary = {key: path.with_name(f".{path.name}.{os.getpid()}.tmp") for key, path in paths.items()}
    try:
        for key, text in texts.items():
            temporary[key].write_text(text)
        for key in texts:
            os.replace(temporary[key], paths[key])
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    # Files of an earlier run into the same folder must not sit beside this run's as if they were its own.
    stale = remove_stale_exit_files(out, result.subset, keep_json=bool(len(stats)))
    if stale:
        logger.warning("removed %s: left by an earlier run, not produced by this one", ", ".join(map(str, stale)))
    if len(stats) and plots:
        from mue_fairseq.metrics.plots import plot_exit_histograms

        paths.update({f"plot_{k}": v for k, v in plot_exit_histograms(paths["exit_stats"]).items()})
    return paths


def parse_evaluation_args(argv: Optional[List[str]] = None, extra_arguments=None) -> argparse.Namespace:
    """fairseq's generation options, MuE's, and what OFA's launcher passes (`--local-rank`)."""
    parser = options.get_generation_parser()
    add_mue_arguments(parser)
    add_launcher_arguments(parser)
    if extra_arguments is not None:
        extra_arguments(parser)
    args = options.parse_args_and_arch(parser, argv)
    if not args.path:
        parser.error("--path is required")
    return args


def cli_main(argv: Optional[List[str]] = None) -> EvaluationResult:
    configure_logging()
    args = parse_evaluation_args(argv)
    processes = init_processes(args)
    configure_logging(processes)
    try:
        return _evaluate_and_write(args, processes)
    finally:
        close_processes(processes)


def _evaluate_and_write(args: argparse.Namespace, processes: EvalProcesses) -> EvaluationResult:
    if args.results_path and processes.is_main:
        check_results_path(args.results_path)
    models, task, cfg = load_for_evaluation(args)
    result, stats = run_evaluation(models, task, cfg, snli_mode=args.snli_mode,
                                   official_caption_scores=args.official_caption_scores, processes=processes)
    if cfg.common_eval.results_path and processes.is_main:
        paths = write_results(result, stats, cfg.common_eval.results_path, plots=not args.no_plots)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    if len(stats):
        stats.log_to_fairseq_metrics()
    summary = result.exit_summary
    logger.info("%s %s: %d samples, %s, model time %.2f s%s", result.task, result.subset, result.num_samples,
                ", ".join(f"{k} {v:.2f}" for k, v in result.scores.items()), result.seconds,
                f" ({' + '.join(f'{s:.2f}' for s in result.rank_seconds)} on {processes.world_size} processes), "
                f"run {result.wall_seconds:.2f} s" if processes.distributed else "")
    if summary:
        logger.info("exit summary: %s", json.dumps(summary.get("mean_exit_layers", summary))[:500])
    if result.truncated_images:
        logger.warning("%d image(s) were truncated and loaded as far as their data goes (as OFA does): %s; "
                       "--strict-images makes this an error", len(result.truncated_images),
                       "; ".join(result.truncated_images[:5]) + (" ..." if len(result.truncated_images) > 5 else ""))
    return result


if __name__ == "__main__":
    cli_main()
