"""Exit statistics of MuE inference: where each stream and token stopped, and what that saves.

`ExitStatistics` is fed after each generated batch (`add_generated`: the best hypothesis of
each sample, with the `exit_layers` / `encoder_exit_layers` that `OFASequenceGenerator`
records) or sample by sample (`add_sample`). It reports:

* per sample: image and text stream exit layers, the decoder exit layer of every token and
  their mean;
* per stream: the mean exit layer and a histogram (index = layers run; an image stream at 0
  means the sample had no image);
* expected time reduction
  (a) by layer count: image and text streams, decoder (token-weighted, and weighted by the
      step index as the authors' captioning script did), and combined, where one stream pass
      and one token's decoder depth each count as one unit of layers;
  (b) by FLOPs (`mue_fairseq.metrics.flops`): per component and in total, against the same
      samples at full depth through MuE's decomposed encoder, and against OFA's joint encoder;
* wall-clock time that the caller measures and adds (`add_wall_clock`).
"""
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from fairseq.logging import metrics
from torch import Tensor

from .flops import DECODER_PARTS, ENCODER_PARTS, OFAFlopModel

logger = logging.getLogger(__name__)

STREAMS = ("image", "text", "decoder")
JSON_FORMAT_VERSION = 1


@dataclass
class SampleExits:
    """The exits of one sample (its best hypothesis)."""

    sample_id: Union[int, str]
    image_layers: int
    text_layers: int
    decoder_layers: List[int]
    text_length: Optional[int] = None  # source length computed (padded length of its batch)
    batch_size: int = 1  # size of the batch it ran in (shares per-batch costs)
    flops: Optional[Dict[str, float]] = None  # executed, by component
    flops_full: Optional[Dict[str, float]] = None  # same sample at full depth (decomposed encoder)
    flops_full_ofa: Optional[Dict[str, float]] = None  # same sample at full depth, OFA's joint encoder

    @property
    def decoder_mean(self) -> float:
        return sum(self.decoder_layers) / len(self.decoder_layers) if self.decoder_layers else 0.0

    def to_json(self) -> dict:
        out = {
            "id": self.sample_id,
            "image_layers": self.image_layers,
            "text_layers": self.text_layers,
            "decoder_layers": list(self.decoder_layers),
            "decoder_mean": self.decoder_mean,
            "text_length": self.text_length,
            "batch_size": self.batch_size,
        }
        for name in ("flops", "flops_full", "flops_full_ofa"):
            if getattr(self, name) is not None:
                out[name] = dict(getattr(self, name))
        return out

    @classmethod
    def from_json(cls, values: dict) -> "SampleExits":
        try:
            return cls(
                sample_id=_sample_id(values["id"]),
                image_layers=int(values["image_layers"]),
                text_layers=int(values["text_layers"]),
                decoder_layers=[int(v) for v in values["decoder_layers"]],
                text_length=values.get("text_length"),
                batch_size=int(values.get("batch_size", 1)),
                flops=values.get("flops"),
                flops_full=values.get("flops_full"),
                flops_full_ofa=values.get("flops_full_ofa"),
            )
        except KeyError as err:
            raise ValueError(f"exit statistics sample {values.get('id', '?')!r} lacks key {err.args[0]!r}") from None


@dataclass
class WallClock:
    """Seconds measured by the caller, one entry per timed batch."""

    seconds: List[float] = field(default_factory=list)
    samples: List[int] = field(default_factory=list)

    def to_json(self) -> dict:
        total, count = sum(self.seconds), sum(self.samples)
        per_sample = [s / n for s, n in zip(self.seconds, self.samples)]
        return {
            "total_seconds": total,
            "num_samples": count,
            "seconds_per_sample": total / count if count else None,
            "median_seconds_per_sample": statistics.median(per_sample) if per_sample else None,
            "batches": [{"seconds": s, "samples": n} for s, n in zip(self.seconds, self.samples)],
        }


def _as_int_list(values: Union[Tensor, Sequence[int]]) -> List[int]:
    if isinstance(values, Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _sample_id(value) -> Union[int, str]:
    """A sample id as an int where it is one; OFA's grounding ids ("79_1") stay strings."""
    text = str(value)
    return int(text) if text.lstrip("-").isdigit() else text


def _reduction(executed: float, full: float) -> Optional[float]:
    return 1.0 - executed / full if full else None


class ExitStatistics:
    """Accumulates exit layers over an evaluation and summarises them (see the module doc)."""

    def __init__(self, encoder_layers: int, decoder_layers: int, flop_model: Optional[OFAFlopModel] = None):
        if encoder_layers < 1 or decoder_layers < 1:
            raise ValueError(f"layer counts must be >= 1, got encoder {encoder_layers}, decoder {decoder_layers}")
        if flop_model is not None and (flop_model.encoder_layers, flop_model.decoder_layers) != (
            encoder_layers, decoder_layers
        ):
            raise ValueError(
                f"FLOP model has {flop_model.encoder_layers}+{flop_model.decoder_layers} layers, "
                f"statistics {encoder_layers}+{decoder_layers}"
            )
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.flop_model = flop_model
        self.samples: List[SampleExits] = []
        self.wall_clock = WallClock()

    @classmethod
    def for_model(cls, model, image_size: Optional[int] = None, beam: int = 1) -> "ExitStatistics":
        """Statistics for a built model; with `image_size`, FLOPs are accounted too."""
        args = model.args
        flop_model = OFAFlopModel.from_model(model, image_size, beam) if image_size is not None else None
        return cls(args.encoder_layers, args.decoder_layers, flop_model)

    # -------------------------------------------------------------- feeding
    def add_sample(
        self,
        sample_id: int,
        image_layers: int,
        text_layers: int,
        decoder_layers: Union[Tensor, Sequence[int]],
        text_length: Optional[int] = None,
        batch_size: int = 1,
    ) -> SampleExits:
        """Record one sample. `decoder_layers`: layers run for each generated token (eos included);
        `text_length` (source tokens computed) is needed for FLOPs; `batch_size` shares per-batch costs."""
        record = self._record(sample_id, image_layers, text_layers, decoder_layers, text_length, batch_size)
        self.samples.append(record)
        return record

    def add_generated(self, sample: dict, hypos: List[List[dict]]) -> None:
        """Record a generated batch: `sample` as given to the generator, `hypos` its output.

        The best (first) hypothesis of each sample is used; the text length is the batch's
        source length (what the text stream computed). A bad hypothesis rejects the whole batch.
        """
        ids = [_sample_id(v) for v in (sample["id"].tolist() if hasattr(sample["id"], "tolist") else sample["id"])]
        if len(ids) != len(hypos):
            raise ValueError(f"batch has {len(ids)} sample ids but {len(hypos)} hypothesis lists")
        text_length = int(sample["net_input"]["src_tokens"].size(1))
        records = []
        for sample_id, sample_hypos in zip(ids, hypos):
            if not sample_hypos:
                raise ValueError(f"sample {sample_id}: the generator returned no hypothesis")
            best = sample_hypos[0]
            for key in ("exit_layers", "encoder_exit_layers"):
                if key not in best:
                    raise ValueError(
                        f"sample {sample_id}: hypothesis has no {key!r}; exit statistics need an mue_ofa "
                        "model decoded by OFASequenceGenerator"
                    )
            image_layers, text_layers = _as_int_list(best["encoder_exit_layers"])
            records.append(self._record(sample_id, image_layers, text_layers, best["exit_layers"],
                                        text_length, len(ids)))
        self.samples.extend(records)

    def _record(self, sample_id, image_layers, text_layers, decoder_layers, text_length, batch_size) -> SampleExits:
        """A validated record of one sample, with its FLOPs when there is a FLOP model."""
        decoder = _as_int_list(decoder_layers)
        where = f"sample {sample_id}"
        if not 0 <= int(image_layers) <= self.encoder_layers:
            raise ValueError(f"{where}: image exit layer {image_layers} is outside 0..{self.encoder_layers}")
        if not 1 <= int(text_layers) <= self.encoder_layers:
            raise ValueError(f"{where}: text exit layer {text_layers} is outside 1..{self.encoder_layers}")
        if not decoder:
            raise ValueError(f"{where}: no decoder exit layers (a hypothesis has at least its eos token)")
        bad = [v for v in decoder if not 1 <= v <= self.decoder_layers]
        if bad:
            raise ValueError(f"{where}: decoder exit layers {bad} are outside 1..{self.decoder_layers}")
        record = SampleExits(_sample_id(sample_id), int(image_layers), int(text_layers), decoder,
                             None if text_length is None else int(text_length), int(batch_size))
        if self.flop_model is not None:
            if text_length is None:
                raise ValueError(f"{where}: FLOP accounting needs the source text length")
            fm, length, has_image = self.flop_model, record.text_length, record.image_layers > 0
            record.flops = fm.sample_flops(length, record.image_layers, record.text_layers, decoder, record.batch_size)
            record.flops_full = fm.full_depth_flops(length, len(decoder), has_image, record.batch_size)
            record.flops_full_ofa = fm.full_depth_flops(length, len(decoder), has_image, record.batch_size,
                                                        joint_encoder=True)
        return record

    def add_wall_clock(self, seconds: float, num_samples: int) -> None:
        """Add a measured time (synchronise the device before reading the clock) for `num_samples`."""
        if seconds < 0 or num_samples < 1:
            raise ValueError(f"bad wall-clock entry: {seconds} s for {num_samples} samples")
        self.wall_clock.seconds.append(float(seconds))
        self.wall_clock.samples.append(int(num_samples))

    def extend(self, other: "ExitStatistics") -> None:
        """Merge another accumulator (e.g. of another data shard) into this one."""
        if (other.encoder_layers, other.decoder_layers) != (self.encoder_layers, self.decoder_layers):
            raise ValueError("cannot merge exit statistics of models with different depths")
        self.samples.extend(other.samples)
        self.wall_clock.seconds.extend(other.wall_clock.seconds)
        self.wall_clock.samples.extend(other.wall_clock.samples)

    # -------------------------------------------------------------- summaries
    def __len__(self) -> int:
        return len(self.samples)

    def histograms(self) -> Dict[str, List[int]]:
        """Counts per number of layers run (index 0..layers): samples for the encoder streams,
        tokens for the decoder."""
        image = [0] * (self.encoder_layers + 1)
        text = [0] * (self.encoder_layers + 1)
        decoder = [0] * (self.decoder_layers + 1)
        for s in self.samples:
            image[s.image_layers] += 1
            text[s.text_layers] += 1
            for v in s.decoder_layers:
                decoder[v] += 1
        return {"image": image, "text": text, "decoder": decoder}

    def mean_exit_layers(self) -> Dict[str, Optional[float]]:
        """Means over samples (encoder streams; image over samples that have one) and tokens (decoder)."""
        with_image = [s.image_layers for s in self.samples if s.image_layers > 0]
        tokens = [v for s in self.samples for v in s.decoder_layers]
        mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
        return {
            "image": mean(with_image),
            "text": mean([s.text_layers for s in self.samples]),
            "decoder": mean(tokens),
            "decoder_per_sample": mean([s.decoder_mean for s in self.samples]),
        }

    def decoder_by_position(self) -> Dict[str, list]:
        """Per generated-token position t (0 = first token after the prompt; eos included): the
        tokens seen there, their mean decoder exit layer and its histogram. For grounding the
        first four positions are the box's x0, y0, x1, y1, so this shows where each coordinate stopped."""
        length = max((len(s.decoder_layers) for s in self.samples), default=0)
        counts = [[0] * (self.decoder_layers + 1) for _ in range(length)]
        for s in self.samples:
            for t, v in enumerate(s.decoder_layers):
                counts[t][v] += 1
        tokens = [sum(row) for row in counts]
        means = [sum(v * n for v, n in enumerate(row)) / total for row, total in zip(counts, tokens)]
        return {"tokens": tokens, "mean": means, "histograms": counts}

    def layer_time_reduction(self) -> Dict[str, Optional[float]]:
        """Expected time reduction by layer count: 1 - layers run / layers at full depth."""
        enc, dec = self.encoder_layers, self.decoder_layers
        image = sum(s.image_layers for s in self.samples)
        image_full = sum(enc for s in self.samples if s.image_layers > 0)
        text = sum(s.text_layers for s in self.samples)
        text_full = enc * len(self.samples)
        tokens = sum(sum(s.decoder_layers) for s in self.samples)
        tokens_full = dec * sum(len(s.decoder_layers) for s in self.samples)
        step_weighted = sum(v * (t + 1) for s in self.samples for t, v in enumerate(s.decoder_layers))
        step_weighted_full = sum(dec * (t + 1) for s in self.samples for t in range(len(s.decoder_layers)))
        combined = image + text + sum(s.decoder_mean for s in self.samples)
        combined_full = image_full + text_full + dec * len(self.samples)
        return {
            "image": _reduction(image, image_full),
            "text": _reduction(text, text_full),
            "decoder": _reduction(tokens, tokens_full),
            "decoder_step_weighted": _reduction(step_weighted, step_weighted_full),
            "combined": _reduction(combined, combined_full),
        }

    def flop_summary(self) -> Optional[dict]:
        """Total FLOPs executed vs full depth, by component; None without a FLOP model."""
        if self.flop_model is None or not self.samples:
            return None
        executed: Dict[str, float] = {}
        full: Dict[str, float] = {}
        full_ofa = 0.0
        for s in self.samples:
            for name, value in s.flops.items():
                executed[name] = executed.get(name, 0.0) + value
            for name, value in s.flops_full.items():
                full[name] = full.get(name, 0.0) + value
            full_ofa += sum(s.flops_full_ofa.values())
        components = {
            name: {"executed": executed.get(name, 0.0), "full": full.get(name, 0.0),
                   "reduction": _reduction(executed.get(name, 0.0), full.get(name, 0.0))}
            for name in full
        }
        total, total_full = sum(executed.values()), sum(full.values())

        def group(names):
            done, whole = sum(executed.get(n, 0.0) for n in names), sum(full.get(n, 0.0) for n in names)
            return {"executed": done, "full": whole, "reduction": _reduction(done, whole)}

        return {
            "model": self.flop_model.to_dict(),
            "components": components,
            "encoder": group(ENCODER_PARTS),
            "decoder": group(DECODER_PARTS),
            "executed": total,
            "full": total_full,
            "reduction": _reduction(total, total_full),
            "ideal_speedup": total_full / total if total else None,
            "executed_per_sample": total / len(self.samples),
            "full_ofa": full_ofa,
            "reduction_vs_ofa": _reduction(total, full_ofa),
        }

    def summary(self) -> dict:
        return {
            "num_samples": len(self.samples),
            "num_decoder_tokens": sum(len(s.decoder_layers) for s in self.samples),
            "layers": {"encoder": self.encoder_layers, "decoder": self.decoder_layers},
            "mean_exit_layers": self.mean_exit_layers(),
            "histograms": self.histograms(),
            "decoder_by_position": self.decoder_by_position(),
            "time_reduction_layers": self.layer_time_reduction(),
            "time_reduction_flops": self.flop_summary(),
            "wall_clock": self.wall_clock.to_json(),
        }

    # -------------------------------------------------------------- output
    def to_json(self) -> dict:
        return {
            "format_version": JSON_FORMAT_VERSION,
            "summary": self.summary(),
            "samples": [s.to_json() for s in self.samples],
        }

    def write_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        logger.info("wrote exit statistics of %d samples to %s", len(self.samples), path)
        return path

    @classmethod
    def from_json(cls, values: dict) -> "ExitStatistics":
        """Rebuild an accumulator from `to_json()` output (per-sample FLOPs are kept as stored)."""
        if values.get("format_version") != JSON_FORMAT_VERSION:
            raise ValueError(f"unsupported exit statistics format {values.get('format_version')!r}")
        summary = values["summary"]
        flops = summary.get("time_reduction_flops")
        flop_model = OFAFlopModel.from_dict(flops["model"]) if flops else None
        stats = cls(summary["layers"]["encoder"], summary["layers"]["decoder"], flop_model)
        stats.samples = [SampleExits.from_json(s) for s in values["samples"]]
        for batch in summary["wall_clock"]["batches"]:
            stats.add_wall_clock(batch["seconds"], batch["samples"])
        return stats

    @classmethod
    def read_json(cls, path: Union[str, Path]) -> "ExitStatistics":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls.from_json(values)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: bad exit statistics: {err}") from None

    def log_to_fairseq_metrics(self, prefix: str = "mue") -> None:
        """Log means and reductions with weights, so fairseq's aggregation averages them correctly
        over batches (sample-weighted for the encoder, token-weighted for the decoder, FLOP-weighted
        for the FLOP reduction)."""
        if not self.samples:
            return
        means = self.mean_exit_layers()
        reductions = self.layer_time_reduction()
        num_samples = len(self.samples)
        with_image = sum(1 for s in self.samples if s.image_layers > 0)
        num_tokens = sum(len(s.decoder_layers) for s in self.samples)
        if means["image"] is not None:
            metrics.log_scalar(f"{prefix}_image_layers", means["image"], weight=with_image, round=3)
            metrics.log_scalar(f"{prefix}_image_reduction", reductions["image"], weight=with_image, round=4)
        metrics.log_scalar(f"{prefix}_text_layers", means["text"], weight=num_samples, round=3)
        metrics.log_scalar(f"{prefix}_text_reduction", reductions["text"], weight=num_samples, round=4)
        metrics.log_scalar(f"{prefix}_decoder_layers", means["decoder"], weight=num_tokens, round=3)
        metrics.log_scalar(f"{prefix}_decoder_reduction", reductions["decoder"], weight=num_tokens, round=4)
        flops = self.flop_summary()
        if flops is not None:
            metrics.log_scalar(f"{prefix}_flop_reduction", flops["reduction"], weight=flops["full"], round=4)
            metrics.log_scalar(f"{prefix}_gflops_per_sample", flops["executed_per_sample"] / 1e9,
                               weight=num_samples, round=3)
        wall = self.wall_clock.to_json()
        if wall["num_samples"]:
            metrics.log_scalar(f"{prefix}_ms_per_sample", 1000 * wall["seconds_per_sample"],
                               weight=wall["num_samples"], round=2)
