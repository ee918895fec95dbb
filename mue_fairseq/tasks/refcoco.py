"""Task ``refcoco``: OFA visual grounding (RefCOCO, RefCOCO+ and RefCOCOg data), scored by Acc@0.5.

The model generates a box as four ``<bin_i>`` location tokens (OFA's scripts decode with
``--min-len 4 --max-len-a 0 --max-len-b 4``, so exactly four tokens and eos; OFA puts no other
constraint on them, and ``--constraint-range {V - num_bins},{V}`` for a dictionary of V entries
keeps generation to the location tokens and the specials). Boxes decode back to pixels of the
original image (`location_tokens`); a hit is IoU >= 0.5 with the reference box.

Validation with ``--eval-acc`` generates with ``--eval-args`` and logs ``score`` (Acc@0.5, OFA's
name, 0-1) at full depth, and ``score_mue`` with a MuE model's exits, with exit statistics.
"""

import logging
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.tasks import register_task

from mue_fairseq.data.location_tokens import bin_offset, bins_to_boxes, box_hits
from mue_fairseq.data.ofa_bpe import SymbolAwareGPT2BPE
from mue_fairseq.data.refcoco_dataset import RefcocoDataset
from mue_fairseq.tasks.caption import _parse_json_option
from mue_fairseq.tasks.exit_validation import (
    full_depth,
    hypothesis_exit_layers,
    reduce_exit_metrics,
    validate_with_exits,
)
from mue_fairseq.tasks.ofa_task import OFAConfig, OFATask, reduce_score

logger = logging.getLogger(__name__)


@dataclass
class RefcocoConfig(OFAConfig):
    eval_acc: bool = field(default=False, metadata={"help": "validate by generating boxes and scoring Acc@0.5"})
    eval_args: Optional[str] = field(
        default="{}", metadata={"help": 'generation args for validation, e.g. \'{"beam": 5, "min_len": 4}\', as JSON'}
    )
    eval_print_samples: bool = field(default=False, metadata={"help": "log a sample box during validation"})
    max_image_size: int = field(
        default=512, metadata={"help": "boxes are divided by this before quantisation (OFA's normalisation)"}
    )
    scst: bool = field(default=False, metadata={"help": "self-critical sequence training (not supported)"})
    scst_args: str = field(default="{}", metadata={"help": "generation args for SCST (not supported)"})


@register_task("refcoco", dataclass=RefcocoConfig)
class RefcocoTask(OFATask):
    cfg: RefcocoConfig
    dataset_class = RefcocoDataset

    def __init__(self, cfg: RefcocoConfig, src_dict, tgt_dict):
        if cfg.scst:
            raise ValueError("refcoco task: --scst is not supported")
        if cfg.num_bins < 2:
            raise ValueError(f"--num-bins must be at least 2, got {cfg.num_bins}")
        if cfg.max_image_size <= 0:
            raise ValueError(f"--max-image-size must be positive, got {cfg.max_image_size}")
        super().__init__(cfg, src_dict, tgt_dict)
        self.eval_args = _parse_json_option("eval_args", cfg.eval_args)
        self.sequence_generator = None

    def dataset_options(self) -> Dict[str, Any]:
        return {
            "max_src_length": self.cfg.max_src_length,
            "num_bins": self.cfg.num_bins,
            "max_image_size": self.cfg.max_image_size,
        }

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.eval_acc:
            self.sequence_generator = self.build_generator([model], Namespace(**self.eval_args))
        return model

    def build_bpe(self, args):
        """The task's BPE, printing ``<bin_i>`` tokens as they are (for fairseq-generate)."""
        bpe = super().build_bpe(args)
        return SymbolAwareGPT2BPE(bpe) if bpe is self.bpe else bpe

    # ------------------------------------------------------------ boxes
    def hypothesis_bins(self, hypos) -> torch.Tensor:
        """B x 4 bin indices of each sample's best hypothesis (OFA's arithmetic: a token that is not a
        location token gives an index outside 0..num_bins-1, and a box that scores as a miss)."""
        offset = bin_offset(len(self.src_dict), self.cfg.num_bins)
        rows = []
        for sample_hypos in hypos:
            tokens = sample_hypos[0]["tokens"][:-1]
            if tokens.numel() != 4:
                raise ValueError(
                    f"refcoco: a hypothesis has {tokens.numel()} tokens before eos, a box needs 4: "
                    "decode with --min-len 4 --max-len-a 0 --max-len-b 4 (OFA's settings)"
                )
            rows.append(tokens - offset)
        return torch.stack(rows, dim=0)

    def boxes_and_hits(self, sample, hypos) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B x 4 predicted boxes in original pixels, B hits at IoU >= 0.5), as OFA's eval_refcoco."""
        boxes = bins_to_boxes(self.hypothesis_bins(hypos), sample["w_resize_ratios"], sample["h_resize_ratios"],
                              self.cfg.num_bins, self.cfg.max_image_size)
        return boxes, box_hits(boxes, sample["region_coords"].float())

    def evaluation_rows(self, sample, hypos) -> Tuple[List[dict], List[float]]:
        """Rows of OFA's ``{subset}_predict.json`` (uniq_id, box in pixels) and each row's hit (0/1)."""
        boxes, hits = self.boxes_and_hits(sample, hypos)
        rows = [{"uniq_id": sample_id, "box": [float(v) for v in box.tolist()]}
                for sample_id, box in zip(sample["id"].tolist(), boxes)]
        return rows, hits.tolist()

    # -------------------------------------------------------- validation
    def valid_step(self, sample, model, criterion):
        with full_depth(model):
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.eval_acc:
            validate_with_exits(model, sample, self._hypotheses, self._score_logging, logging_output)
        return loss, sample_size, logging_output

    def _hypotheses(self, model, sample):
        hypos = self.inference_step(self.sequence_generator, [model], sample)
        return (hypos, *hypothesis_exit_layers(model, hypos))

    def _score_logging(self, sample, hypos, suffix: str) -> Dict[str, float]:
        boxes, hits = self.boxes_and_hits(sample, hypos)
        if self.cfg.eval_print_samples:
            logger.info("example box: %s, reference: %s", boxes[0].tolist(), sample["region_coords"][0].tolist())
        return {f"_score_sum{suffix}": float(hits.sum()), f"_score_cnt{suffix}": int(hits.numel())}

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        for suffix in ("", "_mue"):
            reduce_score(logging_outputs, f"_score_sum{suffix}", f"_score_cnt{suffix}", f"score{suffix}")
        reduce_exit_metrics(logging_outputs)

