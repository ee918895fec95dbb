"""Relative-position bucket tables of OFA (saved in checkpoints as `*_rp_bucket` buffers)."""
import math

import torch

MAX_POSITIONS = 1024


def token_relative_buckets(bucket_size: int, max_position: int = MAX_POSITIONS) -> torch.Tensor:
    """(max_position x max_position) bucket ids for 1-D token offsets.

    Offsets inside (-bucket_size/2, bucket_size/2) keep their own bucket; larger ones share
    log-spaced buckets up to `max_position`. Ids are shifted to start at 0 (2*bucket_size-1 ids).
    """
    positions = torch.arange(max_position, dtype=torch.long)
    offset = positions[:, None] - positions[None, :]
    half = bucket_size // 2
    sign = torch.sign(offset)
    near = (offset < half) & (offset > -half)
    magnitude = torch.where(near, torch.full_like(offset, half - 1), offset.abs())
    log_bucket = torch.ceil(
        torch.log(magnitude / half) / math.log((max_position - 1) / half) * (half - 1)
    ).int() + half
    bucket = torch.where(magnitude.le(half), offset, log_bucket * sign).long()
    return bucket + bucket_size - 1


def image_relative_buckets(bucket_size: int) -> torch.Tensor:
    """((b*b+1) x (b*b+1)) bucket ids for 2-D offsets on a b x b patch grid.

    Row/column 0 stand for a position outside the grid and get the three last ids
    (num_ids - 3 for row 0, num_ids - 2 for column 0, num_ids - 1 for the corner).
    """
    num_ids = (2 * bucket_size - 1) ** 2 + 3
    rows, cols = torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + bucket_size - 1
    d_col = cols[:, None] - cols[None, :] + bucket_size - 1
    table = torch.zeros((bucket_size * bucket_size + 1,) * 2, dtype=torch.long)
    table[1:, 1:] = d_row * (2 * bucket_size - 1) + d_col
    table[0, :] = num_ids - 3
    table[:, 0] = num_ids - 2
    table[0, 0] = num_ids - 1
    return table


def image_position_ids(height: int, width: int, bucket_size: int) -> torch.Tensor:
    """Ids of a height x width patch grid (row-major) in the bucket_size-wide table; 0 is reserved."""
    rows = torch.arange(height).unsqueeze(1) * bucket_size
    cols = torch.arange(width).unsqueeze(0)
    return (rows + cols + 1).view(-1)


def decoder_code_position_ids(code_image_size: int, bucket_size: int) -> torch.Tensor:
    """The decoder's `image_position_idx` buffer: bos, a code grid, then 769 filler ids (1024).

    Only image-code generation reads it; it is rebuilt rather than trusted from checkpoints.
    """
    window = code_image_size // 8
    grid = image_position_ids(window, window, bucket_size)
    filler = torch.full((769,), MAX_POSITIONS, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), grid, filler])
