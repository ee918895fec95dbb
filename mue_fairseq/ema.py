"""fairseq's EMA (``--store-ema``) on OFA models: integer state entries are copied, not averaged.

fairseq-fixed's EMA multiplies every entry of the model's state dict by the decay at each update.
An OFA model has integer entries (the ResNet's BatchNorm counters ``num_batches_tracked`` and the
relative-position tables ``token_rp_bucket`` / ``image_rp_bucket`` / ``image_position_idx``), and an
integer tensor cannot hold a float product, so ``fairseq-train --store-ema`` stops at the first
update with "result type Float can't be cast to the desired output type Long". OFA's fork of
fairseq copies non-float entries at each update instead. fairseq's EMA already does exactly that
for the keys it is given as ``skip_keys``; its trainer just never passes any. `install()` makes the
trainer's EMA skip the model's integer entries, which changes only runs that failed before.
"""
from typing import Callable, Dict, Set

import torch

_originals: Dict[str, Callable] = {}


def integer_state_keys(model: torch.nn.Module) -> Set[str]:
    """The model's state-dict keys that hold non-floating-point tensors (counters, index tables)."""
    return {key for key, value in model.state_dict().items()
            if torch.is_tensor(value) and not torch.is_floating_point(value)}


def build_ema(model, cfg, device, skip_keys=None):
    """fairseq's `build_ema`; for our OFA models, with their integer entries added to ``skip_keys``
    (copied at each update, as OFA's fork of fairseq does, instead of decayed). Other models get
    fairseq's own EMA unchanged."""
    from fairseq.models.ema import EMA

    from .ofa.model import OFAModel

    if not isinstance(model, OFAModel):
        return EMA(model, cfg, device, skip_keys=skip_keys)
    return EMA(model, cfg, device, skip_keys=set(skip_keys or ()) | integer_state_keys(model))


def install() -> None:
    """Give the trainer `build_ema` (idempotent)."""
    from fairseq import trainer

    if _originals:
        return
    _originals["build_ema"] = trainer.build_ema
    trainer.build_ema = build_ema


def uninstall() -> None:
    """Restore fairseq's own `build_ema` in the trainer."""
    from fairseq import trainer

    if _originals:
        trainer.build_ema = _originals.pop("build_ema")
