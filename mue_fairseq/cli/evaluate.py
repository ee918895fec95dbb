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
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fairseq import options, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar

logger = logging.getLogger("mue_fairseq.evaluate")


@dataclass
class EvaluationResult:
    task: str
    subset: str
    num_samples: int
    scores: Dict[str, float]
    exit_summary: dict
    seconds: float
    predictions: list

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
    models, _, task = load_ofa_ensemble(utils.split_paths(cfg.common_eval.path), arg_overrides=overrides)
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    for model in models:
        model.eval()
        if cfg.common.fp16:
            model.half()
        if use_cuda:
            model.cuda()
    return models, task, cfg


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_evaluation(models, task, cfg, subset: Optional[str] = None, snli_mode: str = "score",
                   official_caption_scores: bool = False, progress: bool = True):
    """Evaluate `models[0]` on `subset`; returns (EvaluationResult, ExitStatistics).

    Only the model is timed (device synchronised), not data loading or scoring.
    """
    from mue_fairseq.metrics.exit_stats import ExitStatistics

    subset = subset or cfg.dataset.gen_subset
    model = models[0]
    task_name = task.__class__.__name__
    task.load_dataset(subset)
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=cfg.dataset.max_tokens, max_sentences=cfg.dataset.batch_size,
        num_shards=1, shard_id=0, num_workers=cfg.dataset.num_workers,
    ).next_epoch_itr(shuffle=False)
    bar = progress_bar.progress_bar(itr, log_format=cfg.common.log_format if progress else "none",
                                    log_interval=cfg.common.log_interval, default_log_format="tqdm")
    use_cuda = next(model.parameters()).is_cuda
    beam = cfg.generation.beam
    is_snli = hasattr(task, "score_answers")
    # The FLOP model describes generation; SNLI-VE scoring (one teacher-forced pass over prompt and
    # candidates) is reported by layer counts and wall-clock only.
    scoring = is_snli and snli_mode == "score"
    stats = ExitStatistics.for_model(model, image_size=None if scoring else task.cfg.patch_image_size,
                                     beam=1 if is_snli else beam)
    generator = None
    if not is_snli or snli_mode == "generate":
        generator = task.build_generator(models, cfg.generation)
    predictions, hyps, refs, correct = [], [], [], []
    seconds = 0.0
    with torch.no_grad():
        for sample in bar:
            sample = utils.move_to_cuda(sample) if use_cuda else sample
            if cfg.common.fp16:
                sample = utils.apply_to_sample(lambda t: t.half() if t.is_floating_point() else t, sample)
            ids = sample["id"].tolist()
            _synchronize()
            start = time.perf_counter()
            if is_snli and snli_mode == "score":
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
                answers = (task.generated_answers(sample, hypos) if is_snli
                           else [task.decode(h[0]["tokens"]).strip() for h in hypos])
            seconds += elapsed
            stats.add_wall_clock(elapsed, len(ids))
            if is_snli:
                for sample_id, answer, ref_dict in zip(ids, answers, sample["ref_dict"]):
                    predictions.append({"uniq_id": sample_id, "answer": answer})
                    correct.append(ref_dict.get(answer, 0))
            else:
                from mue_fairseq.data.caption_dataset import strip_punctuation

                for i, (sample_id, text) in enumerate(zip(ids, answers)):
                    caption = strip_punctuation(text).strip()
                    predictions.append({"image_id": sample_id, "caption": caption})
                    hyps.append(caption)
                    target = utils.strip_pad(sample["target"][i], task.tgt_dict.pad())
                    refs.append([strip_punctuation(r).strip() for r in task.decode(target).split("&&")])
    if is_snli:
        scores = {"accuracy": 100.0 * sum(correct) / max(len(correct), 1)}
    else:
        scores = caption_scores(hyps, refs, official_caption_scores)
    return EvaluationResult(task_name, subset, len(predictions), scores, stats.summary() if len(stats) else {},
                            seconds, predictions), stats


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


def write_results(result: EvaluationResult, stats, results_path: str, plots: bool = True) -> Dict[str, Path]:
    out = Path(results_path)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": out / f"{result.subset}_predict.json",
        "scores": out / f"{result.subset}_scores.json",
        "exit_stats": out / f"{result.subset}_exit_stats.json",
    }
    paths["predictions"].write_text(json.dumps(result.predictions, indent=1))
    paths["scores"].write_text(json.dumps({"num_samples": result.num_samples, "seconds": result.seconds,
                                           **result.scores}, indent=1))
    if len(stats):
        stats.write_json(paths["exit_stats"])
        if plots:
            from mue_fairseq.metrics.plots import plot_exit_histograms

            paths.update({f"plot_{k}": v for k, v in plot_exit_histograms(paths["exit_stats"]).items()})
    return paths


def cli_main(argv: Optional[List[str]] = None) -> EvaluationResult:
    # fairseq's import configures the root logger already: force our format and level.
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout, force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    parser = options.get_generation_parser()
    add_mue_arguments(parser)
    args = options.parse_args_and_arch(parser, argv)
    if not args.path:
        parser.error("--path is required")
    models, task, cfg = load_for_evaluation(args)
    result, stats = run_evaluation(models, task, cfg, snli_mode=args.snli_mode,
                                   official_caption_scores=args.official_caption_scores)
    if cfg.common_eval.results_path:
        paths = write_results(result, stats, cfg.common_eval.results_path, plots=not args.no_plots)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    if len(stats):
        stats.log_to_fairseq_metrics()
    summary = result.exit_summary
    logger.info("%s %s: %d samples, %s, model time %.2f s", result.task, result.subset, result.num_samples,
                ", ".join(f"{k} {v:.2f}" for k, v in result.scores.items()), result.seconds)
    if summary:
        logger.info("exit summary: %s", json.dumps(summary.get("mean_exit_layers", summary))[:500])
    return result


if __name__ == "__main__":
    cli_main()
