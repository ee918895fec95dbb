"""Model `mue_ofa`: OFA with MuE exits. No new parameters: every OFA checkpoint loads strictly.

Architectures `mue_ofa_tiny` ... `mue_ofa_huge` are OFA's presets; `mue_ofa` keeps whatever a
checkpoint records, so `--model-overrides "{'_name': 'mue_ofa', 'arch': 'mue_ofa', ...}"`
(see `mue_fairseq.exits.config.mue_overrides`) turns any OFA checkpoint into a MuE model.
"""
from dataclasses import fields
from typing import Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture

from mue_fairseq.exits.config import MuEConfig
from mue_fairseq.exits.replay import ExitReplay
from mue_fairseq.ofa.checkpoint import OFA_ARCHITECTURES
from mue_fairseq.ofa.model import (
    OFAModel,
    ofa_base_architecture,
    ofa_huge_architecture,
    ofa_large_architecture,
    ofa_medium_architecture,
    ofa_tiny_architecture,
)

from .mue_decoder import MuEDecoder
from .mue_encoder import MuEEncoder


@register_model("mue_ofa")
class MuEOFAModel(OFAModel):
    """OFA whose encoder streams and decoder tokens stop early at inference (training runs full depth)."""

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        # One config object for both halves, so that set_exit_options reaches both.
        self.mue = encoder.mue
        decoder.mue = self.mue

    @staticmethod
    def add_args(parser):
        OFAModel.add_args(parser)
        gen_parser_from_dataclass(parser, MuEConfig())

    @classmethod
    def build_model(cls, args, task):
        MuEConfig.from_namespace(args)  # a bad option fails before anything is built
        record_ofa_architecture(args)
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args, dictionary, embed_tokens) -> MuEEncoder:
        return MuEEncoder(args, dictionary, embed_tokens, MuEConfig.from_namespace(args))

    @classmethod
    def build_decoder(cls, args, dictionary, embed_tokens) -> MuEDecoder:
        return MuEDecoder(args, dictionary, embed_tokens, MuEConfig.from_namespace(args))

    def set_exit_options(self, **options) -> MuEConfig:
        """Change exit options in place (sweeps reuse one loaded model); returns the new config."""
        known = {f.name for f in fields(MuEConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown MuE options {unknown}")
        values = {f.name: getattr(self.mue, f.name) for f in fields(MuEConfig)}
        updated = MuEConfig(**{**values, **options})
        for f in fields(MuEConfig):
            setattr(self.mue, f.name, getattr(updated, f.name))
            setattr(self.args, f.name, getattr(updated, f.name))
        return self.mue

    def set_exit_replay(self, replay: Optional[ExitReplay], **options) -> MuEConfig:
        """Make every row stop where `replay` (recorded exits) says: the `replay` exit policy,
        plus any other exit `options` (e.g. mue_kv_policy). None detaches it; the policy then needs
        setting to another one."""
        depth = (self.args.encoder_layers, self.args.decoder_layers)
        if replay is not None and (replay.encoder_layers, replay.decoder_layers) != depth:
            raise ValueError(f"{replay.source or 'exit replay'}: replay is mapped to "
                             f"{replay.encoder_layers}+{replay.decoder_layers} layers, the model has {depth[0]}+{depth[1]}")
        self.encoder.exit_replay = self.decoder.exit_replay = replay
        if replay is None:
            return self.set_exit_options(**options)
        return self.set_exit_options(mue_exit_policy="replay", **options)


# The OFA architecture whose defaults each MuE architecture applies.
OFA_ARCHITECTURE_OF = {"mue_ofa": "ofa_large", **{f"mue_{arch}": arch for arch in OFA_ARCHITECTURES}}


def record_ofa_architecture(args) -> None:
    """Name the model by its OFA architecture in `args`, which fairseq-train saves as `cfg.model`.

    OFA's own code knows no `mue_ofa*` name and cannot build a model from a checkpoint that records
    one; under OFA's name (MuE adds no parameters) OFA's `evaluate.py` loads it, and our tasks
    still build `mue_ofa` from it because the saved `mue_*` options are there (OFATask.build_model).
    The architecture only fills defaults, and every size is recorded, so nothing else changes.
    """
    arch = OFA_ARCHITECTURE_OF.get(getattr(args, "arch", None), getattr(args, "arch", None))
    if arch in OFA_ARCHITECTURES:
        args.arch = args._name = arch


def _with_mue_defaults(preset):
    def architecture(args):
        for f in fields(MuEConfig):
            if getattr(args, f.name, None) is None:
                setattr(args, f.name, f.default)
        preset(args)

    return architecture


register_model_architecture("mue_ofa", "mue_ofa")(_with_mue_defaults(ofa_large_architecture))
register_model_architecture("mue_ofa", "mue_ofa_tiny")(_with_mue_defaults(ofa_tiny_architecture))
register_model_architecture("mue_ofa", "mue_ofa_medium")(_with_mue_defaults(ofa_medium_architecture))
register_model_architecture("mue_ofa", "mue_ofa_base")(_with_mue_defaults(ofa_base_architecture))
register_model_architecture("mue_ofa", "mue_ofa_large")(_with_mue_defaults(ofa_large_architecture))
register_model_architecture("mue_ofa", "mue_ofa_huge")(_with_mue_defaults(ofa_huge_architecture))
