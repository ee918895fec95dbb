"""MuE options: where and how the encoder streams and decoder tokens may stop early."""
import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Dict, List

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

ENCODER_MODES = ChoiceEnum(["decomposed", "joint"])
EXIT_POLICIES = ChoiceEnum(["similarity", "static", "entropy", "patience", "confidence", "replay"])
KV_POLICIES = ChoiceEnum(["propagate", "copy", "recompute", "none"])
PRESETS = ChoiceEnum(["none", "authors"])

# What the authors' code does, as MuE options (their schedule's 0.9 / 0.1 and tau 1 are our defaults).
AUTHORS_PRESET = {
    "mue_encoder_mode": "decomposed",
    "mue_batch_joint_exit": True,
    "mue_drop_image_rel_bias": True,
    "mue_kv_policy": "none",
    "mue_decoder_beta": 0.9,
    "mue_decoder_tau": 1.0,
    "mue_full_depth_steps": 1 / 3,
}
_CHOICE_FIELDS = ("mue_encoder_mode", "mue_exit_policy", "mue_kv_policy", "mue_preset")
# Slack for float error when a fraction of the step budget lands on a whole number (1/3 * 18).
_STEP_EPS = 1e-9


@dataclass
class MuEConfig(FairseqDataclass):
    mue_encoder_mode: ENCODER_MODES = field(
        default="decomposed",
        metadata={"help": "decomposed: image and text run through the shared encoder layers as two "
                  "streams (image<->image, text<->text attention) that stop independently (MuE); "
                  "joint: OFA's single fused stream"},
    )
    mue_exit_policy: EXIT_POLICIES = field(
        default="similarity",
        metadata={"help": "similarity: MuE's cosine similarity between consecutive layers; static: "
                  "fixed depths (--mue-static-*-layers); entropy (DeeBERT), patience (PABEE) and "
                  "confidence (CALM) decide decoder exits from each layer's prediction, with the "
                  "encoder at static depth; replay: the exit layers an evaluation recorded (its exit "
                  "statistics, attached with MuEOFAModel.set_exit_replay, as benchmarks/"
                  "bench_exit_speed.py --replay does)"},
    )
    mue_image_threshold: float = field(
        default=1.0, metadata={"help": "image stream stops after layer i when cos(h_i, h_{i-1}) >= this; 1 disables"}
    )
    mue_text_threshold: float = field(
        default=1.0, metadata={"help": "text stream stops after layer i when cos(h_i, h_{i-1}) >= this; 1 disables"}
    )
    mue_decoder_threshold: float = field(
        default=1.0,
        metadata={"help": "theta of the decoder schedule Theta(t) = beta*theta + (1-beta)*exp(-tau*t/N); "
                  "a token stops when its layer similarity >= Theta(t); 1 disables decoder exits"},
    )
    mue_decoder_beta: float = field(default=0.9, metadata={"help": "beta of the decoder threshold schedule"})
    mue_decoder_tau: float = field(default=1.0, metadata={"help": "tau (decay rate) of the decoder threshold schedule"})
    mue_full_depth_steps: float = field(
        default=0.0,
        metadata={"help": "first decoding steps kept at full depth: a count (>= 1), or a fraction f < 1 of "
                  "the step budget N = max_len + 1 (the steps with step < f*N); 0 as in the paper, 1/3 as "
                  "the authors' code (6 of 17 steps at --max-len-b 16)"},
    )
    mue_kv_policy: KV_POLICIES = field(
        default="propagate",
        metadata={"help": "keys/values that skipped decoder layers store for later tokens: propagate "
                  "(each skipped layer projects the exit state), copy (the exit layer's key/value), "
                  "recompute (skipped layers still run for the cache; saves no decoder time), none "
                  "(nothing is stored: the authors' behaviour, masked holes with per-row exits)"},
    )
    mue_batch_joint_exit: bool = field(
        default=False,
        metadata={"help": "reproduce the authors' code: one decision per batch from the cosine of the "
                  "flattened batch (with pads). For comparison only; results depend on batch size"},
    )
    mue_drop_image_rel_bias: bool = field(
        default=False,
        metadata={"help": "reproduce the authors' code, which discards the image stream's relative "
                  "position bias in the decomposed encoder"},
    )
    mue_preset: PRESETS = field(
        default="none",
        metadata={"help": "authors: behave as the MuE authors' code (Tangshengku/OFA) does: decomposed "
                  "encoder, --mue-batch-joint-exit, --mue-drop-image-rel-bias, --mue-kv-policy none, "
                  "their schedule 0.9*theta + 0.1*exp(-(step+1)/(max_len+1)) and full depth while "
                  "step < (max_len+1)/3, a stop when the cosine exceeds (>) the threshold (decoder exits even at --mue-decoder-threshold 1, as their "
                  "schedule then stays below 1). Options it sets that are left at their defaults take its "
                  "values; a different explicit value is an error. none: the paper's method"},
    )
    mue_static_image_layers: int = field(
        default=0, metadata={"help": "static depth of the image stream (0 = all layers)"}
    )
    mue_static_text_layers: int = field(default=0, metadata={"help": "static depth of the text stream (0 = all layers)"})
    mue_static_decoder_layers: int = field(
        default=0, metadata={"help": "static decoder depth for every token (0 = all layers)"}
    )
    mue_entropy_threshold: float = field(
        default=0.0, metadata={"help": "entropy policy: a token stops when its prediction entropy (nats) <= this"}
    )
    mue_confidence_threshold: float = field(
        default=1.0, metadata={"help": "confidence policy: a token stops when its top probability >= this"}
    )
    mue_patience: int = field(
        default=0, metadata={"help": "patience policy: a token stops when this many consecutive layers agree on "
                             "the argmax (0 disables)"}
    )

    def __post_init__(self):
        for name in ("mue_image_threshold", "mue_text_threshold", "mue_decoder_threshold",
                     "mue_decoder_beta", "mue_confidence_threshold"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        for name in ("mue_decoder_tau", "mue_full_depth_steps", "mue_entropy_threshold"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("mue_static_image_layers", "mue_static_text_layers", "mue_static_decoder_layers", "mue_patience"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name, choices in (("mue_encoder_mode", ENCODER_MODES), ("mue_exit_policy", EXIT_POLICIES),
                              ("mue_kv_policy", KV_POLICIES), ("mue_preset", PRESETS)):
            allowed = [str(choice) for choice in choices]
            if str(getattr(self, name)) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")
        if str(self.mue_preset) == "authors":
            self._apply_preset(AUTHORS_PRESET)

    def _apply_preset(self, preset: dict) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in preset.items():
            current = getattr(self, name)
            current = str(current) if isinstance(value, str) else current
            if current == value:
                continue
            if current != defaults[name]:
                raise ValueError(f"--mue-preset {self.mue_preset} sets --{name.replace('_', '-')} {value}; "
                                 f"got {current!r}")
            setattr(self, name, value)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "MuEConfig":
        """Read the MuE options from a (legacy) model Namespace, defaults where absent."""
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                values[f.name] = str(value) if f.name in _CHOICE_FIELDS else value
        return cls(**values)

    # -- derived switches, read on the hot path ---------------------------------------
    @property
    def decomposed(self) -> bool:
        return str(self.mue_encoder_mode) == "decomposed"

    @property
    def policy(self) -> str:
        return str(self.mue_exit_policy)

    @property
    def kv_policy(self) -> str:
        return str(self.mue_kv_policy)

    @property
    def similarity_passes(self):
        """The exit test on a cosine: >= the threshold (the paper), or > as the authors' code has it."""
        return torch.gt if str(self.mue_preset) == "authors" else torch.ge

    def encoder_exits_enabled(self) -> bool:
        if self.policy == "similarity":
            return self.mue_image_threshold < 1 or self.mue_text_threshold < 1
        if self.policy == "replay":
            return True
        return self.mue_static_image_layers > 0 or self.mue_static_text_layers > 0

    def decoder_exits_enabled(self) -> bool:
        return {
            # The authors' schedule falls below 1 even for theta = 1 (0.9 + 0.1*exp(-t/N)), and
            # their decoder exits whenever the cosine exceeds it.
            "similarity": self.mue_decoder_threshold < 1 or str(self.mue_preset) == "authors",
            "static": self.mue_static_decoder_layers > 0,
            "entropy": self.mue_entropy_threshold > 0,
            "confidence": self.mue_confidence_threshold < 1,
            "patience": self.mue_patience > 0,
            "replay": True,
        }[self.policy]

    def full_depth_steps(self, num_steps: int) -> int:
        """Number of leading decoding steps that run at full depth, given the step budget.

        A fraction f keeps the steps with step < f * num_steps, i.e. ceil(f * num_steps), as the
        authors' `step < (max_len + 1) / 3`; a product a hair above a whole number (float error,
        e.g. 1/3 * 18) counts as that number.
        """
        value = float(self.mue_full_depth_steps)
        if value >= 1:
            return int(value)
        return max(0, math.ceil(value * num_steps - _STEP_EPS))


# Options read by one exit policy only (with their defaults, which mean "not used").
POLICY_OPTIONS = {
    "similarity": ("mue_image_threshold", "mue_text_threshold", "mue_decoder_threshold", "mue_decoder_beta",
                   "mue_decoder_tau"),
    "static": ("mue_static_image_layers", "mue_static_text_layers", "mue_static_decoder_layers"),
    "entropy": ("mue_static_image_layers", "mue_static_text_layers", "mue_entropy_threshold"),
    "patience": ("mue_static_image_layers", "mue_static_text_layers", "mue_patience"),
    "confidence": ("mue_static_image_layers", "mue_static_text_layers", "mue_confidence_threshold"),
    "replay": (),
}


def ignored_options(options: dict, policy: str) -> Dict[str, List[str]]:
    """{option: policies that would use it} for the given options that `policy` ignores.

    An option at its default is never reported (it asks for nothing).
    """
    defaults = MuEConfig()
    ignored = {}
    for name, value in options.items():
        users = [p for p, names in POLICY_OPTIONS.items() if name in names]
        if users and policy not in users and value != getattr(defaults, name):
            ignored[name] = users
    return ignored


def mue_overrides(**options) -> dict:
    """`--model-overrides` that load any OFA checkpoint as an `mue_ofa` model with these options.

    Any `mue_*` key makes the OFA tasks build `mue_ofa` (no new parameters, same state dict).
    Example: mue_overrides(mue_image_threshold=0.9, mue_decoder_threshold=0.9).
    """
    known = {f.name for f in fields(MuEConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown MuE options {unknown}; known: {sorted(known)}")
    config = MuEConfig(**options)  # validate now rather than at model build
    ignored = ignored_options(options, config.policy)
    if ignored:
        named = ", ".join(f"--{k.replace('_', '-')} (used by --mue-exit-policy {'/'.join(v)})" for k, v in ignored.items())
        raise ValueError(f"--mue-exit-policy {config.policy} ignores {named}")
    return {"mue_encoder_mode": str(config.mue_encoder_mode), **options}
