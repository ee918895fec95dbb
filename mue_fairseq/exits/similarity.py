"""Cosine similarity between consecutive layer states, the saturation signal of MuE."""
from typing import Optional

import torch
from torch import Tensor


def stream_cosine(new: Tensor, old: Tensor, padding: Optional[Tensor] = None) -> Tensor:
    """Per-sample cosine between two (T x B x C) states, each flattened over its non-pad positions.

    Computed in float32: near 1.0 half precision resolves only about 1e-3.
    padding: (B x T), True at pads. Returns (B,).
    """
    new, old = new.float(), old.float()
    if padding is not None:
        keep = (~padding).t().unsqueeze(-1).to(new.dtype)
        new, old = new * keep, old * keep
    dot = (new * old).sum(dim=(0, 2))
    norms = new.norm(dim=(0, 2)) * old.norm(dim=(0, 2))
    return dot / norms.clamp_min(1e-12)


def batch_cosine(new: Tensor, old: Tensor) -> Tensor:
    """One cosine for the whole flattened tensor, pads included (the authors' batch-level decision)."""
    new, old = new.float().flatten(), old.float().flatten()
    return torch.dot(new, old) / (new.norm() * old.norm()).clamp_min(1e-12)


def group_cosine(new: Tensor, old: Tensor, padding: Optional[Tensor], groups: Tensor, num_groups: int) -> Tensor:
    """Cosine per group of rows: rows sharing a group id are flattened together. Returns (num_groups,)."""
    new, old = new.float(), old.float()
    if padding is not None:
        keep = (~padding).t().unsqueeze(-1).to(new.dtype)
        new, old = new * keep, old * keep
    zeros = new.new_zeros(num_groups)
    dot = zeros.index_add(0, groups, (new * old).sum(dim=(0, 2)))
    new_sq = zeros.index_add(0, groups, (new * new).sum(dim=(0, 2)))
    old_sq = zeros.index_add(0, groups, (old * old).sum(dim=(0, 2)))
    return dot / (new_sq.sqrt() * old_sq.sqrt()).clamp_min(1e-12)
