"""Validation of MuE models during fairseq-train: the task metric at full depth and with exits.

A `mue_ofa` model whose options enable exits is validated twice per batch: once with every exit
off (the metric OFA's name keeps, e.g. ``snli_score``, so ``--best-checkpoint-metric`` works as in
OFA) and once with the configured exits (the same name with ``_mue``), plus where the streams and
tokens stopped. All of it travels as summable logging entries, so fairseq's all-gather reduces it
correctly over processes:

* ``mue_image_layers`` / ``mue_text_layers``: mean encoder layers run per stream (image over
  samples that have one), ``mue_decoder_layers``: mean decoder layers per scored/generated token;
* ``mue_layer_reduction``: expected time reduction by layer count (one stream pass or one token's
  decoder depth is one unit each, as `ExitStatistics.layer_time_reduction` counts "combined");
* ``mue_speedup``: model time at full depth / model time with exits, both measured here (noisy
  while training: a sanity check, not a benchmark).

Training and the validation loss always run at full depth.
"""
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from fairseq.logging import metrics

from .ofa_task import ratio_of_meters, sum_logs

# Options that turn every exit off (the static policy with no depth limit runs every layer).
FULL_DEPTH_OPTIONS = {
    "mue_exit_policy": "static",
    "mue_static_image_layers": 0,
    "mue_static_text_layers": 0,
    "mue_static_decoder_layers": 0,
}
EXIT_SUM_KEYS = (
    "_mue_samples", "_mue_image_samples", "_mue_image_layers", "_mue_text_layers", "_mue_decoder_tokens",
    "_mue_decoder_layers", "_mue_units_run", "_mue_units_full", "_mue_seconds_full", "_mue_seconds_exit",
)


def has_exits(model) -> bool:
    """Whether ``model`` is a MuE model with some exit enabled."""
    mue = getattr(model, "mue", None)
    return mue is not None and (mue.encoder_exits_enabled() or mue.decoder_exits_enabled())


@contextmanager
def full_depth(model) -> Iterator[None]:
    """Every exit of a MuE model off inside the block (nothing to do for other models)."""
    if getattr(model, "mue", None) is None:
        yield
        return
    saved = {name: getattr(model.mue, name) for name in FULL_DEPTH_OPTIONS}
    model.set_exit_options(**FULL_DEPTH_OPTIONS)
    try:
        yield
    finally:
        model.set_exit_options(**saved)


def timed(function, *args, **kwargs):
    """(result, seconds) of ``function(*args, **kwargs)``, with the device synchronised."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def exit_logging(
    model,
    image_layers: Sequence[int],
    text_layers: Sequence[int],
    decoder_layers: Sequence[Sequence[int]],
    seconds_full: float,
    seconds_exit: float,
) -> Dict[str, float]:
    """Summable logging entries of one validation batch: per sample its stream exit layers (image 0 =
    no image) and the decoder layers of each of its tokens."""
    encoder_depth, decoder_depth = model.args.encoder_layers, model.args.decoder_layers
    image_samples = sum(1 for layers in image_layers if layers > 0)
    tokens = sum(len(layers) for layers in decoder_layers)
    decoder_run = sum(sum(layers) for layers in decoder_layers)
    per_sample_decoder = sum(sum(layers) / len(layers) for layers in decoder_layers if layers)
    return {
        "_mue_samples": len(text_layers),
        "_mue_image_samples": image_samples,
        "_mue_image_layers": sum(image_layers),
        "_mue_text_layers": sum(text_layers),
        "_mue_decoder_tokens": tokens,
        "_mue_decoder_layers": decoder_run,
        "_mue_units_run": sum(image_layers) + sum(text_layers) + per_sample_decoder,
        "_mue_units_full": encoder_depth * (image_samples + len(text_layers)) + decoder_depth * len(text_layers),
        "_mue_seconds_full": seconds_full,
        "_mue_seconds_exit": seconds_exit,
    }


def hypothesis_exit_layers(model, hypos) -> Tuple[Sequence[int], Sequence[int], List[List[int]]]:
    """(image layers, text layers, decoder layers per token) of each sample's best hypothesis; a
    generator that reports no exit layers ran at full depth."""
    best = [sample_hypos[0] for sample_hypos in hypos]
    depth = model.args.encoder_layers
    if "encoder_exit_layers" in best[0]:
        image, text = zip(*(h["encoder_exit_layers"].tolist() for h in best))
    else:
        image, text = [depth] * len(best), [depth] * len(best)
    decoder = [h["exit_layers"].tolist() if "exit_layers" in h else [] for h in best]
    return image, text, decoder


def validate_with_exits(
    model,
    sample,
    predict: Callable[[Any, Dict[str, Any]], Tuple[Any, Sequence[int], Sequence[int], List[List[int]]]],
    score_logging: Callable[[Dict[str, Any], Any, str], Dict[str, float]],
    logging_output: Dict[str, Any],
) -> Dict[str, Any]:
    """Add to ``logging_output`` the task metric of ``model`` on a validation batch at full depth
    and, for a model with exits, again with its exits and where it stopped.

    ``predict(model, sample)`` gives (outputs, image layers, text layers, decoder layers per sample);
    the layers are read from the pass with exits only. ``score_logging(sample, outputs, suffix)``
    gives the metric's summable entries, ``suffix`` "" at full depth and "_mue" with exits.
    """
    with full_depth(model):
        model.eval()
        with torch.no_grad():
            (outputs, *_), seconds_full = timed(predict, model, sample)
    logging_output.update(score_logging(sample, outputs, ""))
    if has_exits(model):
        with torch.no_grad():
            (outputs, image, text, decoder), seconds_exit = timed(predict, model, sample)
        logging_output.update(score_logging(sample, outputs, "_mue"))
        logging_output.update(exit_logging(model, image, text, decoder, seconds_full, seconds_exit))
    return logging_output


def reduce_exit_metrics(logging_outputs) -> None:
    """Log the exit statistics of `exit_logging` entries, summed over batches and processes."""
    if sum_logs(logging_outputs, "_mue_samples") <= 0:
        return
    for key in EXIT_SUM_KEYS:
        metrics.log_scalar(key, sum_logs(logging_outputs, key))
    metrics.log_derived("mue_image_layers", lambda m: _ratio(m, "_mue_image_layers", "_mue_image_samples", 3))
    metrics.log_derived("mue_text_layers", lambda m: _ratio(m, "_mue_text_layers", "_mue_samples", 3))
    metrics.log_derived("mue_decoder_layers", lambda m: _ratio(m, "_mue_decoder_layers", "_mue_decoder_tokens", 3))
    metrics.log_derived("mue_layer_reduction", lambda m: round(1 - _ratio(m, "_mue_units_run", "_mue_units_full", 6), 4))
    metrics.log_derived("mue_speedup", lambda m: _ratio(m, "_mue_seconds_full", "_mue_seconds_exit", 3))


def _ratio(meters, numerator: str, denominator: str, digits: int) -> Optional[float]:
    if meters[denominator].sum == 0:
        return float("nan")
    return ratio_of_meters(meters, numerator, denominator, digits)
