"""OFA's multi-head attention: additive position biases, per-head output scales, incremental cache."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]


def merge_key_padding_masks(
    previous: Optional[Tensor], current: Optional[Tensor], batch_size: int, total_len: int, static_kv: bool
) -> Optional[Tensor]:
    """Padding mask over cached + new keys; missing parts count as not padded."""
    if static_kv:
        return previous if previous is not None else current
    if previous is None and current is None:
        return None
    if previous is None:
        previous = current.new_zeros(batch_size, total_len - current.size(1))
    if current is None:
        current = previous.new_zeros(batch_size, total_len - previous.size(1))
    return torch.cat([previous.bool(), current.bool()], dim=1)


@with_incremental_state
class OFAMultiheadAttention(nn.Module):
    """Attention as OFA computes it.

    Differences from fairseq's: queries are scaled by (head_dim * scale_factor)^-0.5, an
    additive `attn_bias` (B*H x T x S) carries absolute and relative position terms, and
    `c_attn` (with `--scale-heads`) multiplies each head's output before `out_proj`.
    Cached keys/values have shape (B, H, L, head_dim) under `prev_key`/`prev_value`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        dropout: float = 0.0,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        scale_factor: float = 2.0,
        scale_heads: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = float(self.head_dim * scale_factor) ** -0.5
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.dropout_module = FairseqDropout(dropout, module_name=self.__class__.__name__)
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        gain = 2 ** -0.5 if (kdim or embed_dim) == embed_dim and (vdim or embed_dim) == embed_dim else 1.0
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: Tensor) -> Tensor:
        """(L x B x C) -> (B*H x L x head_dim)."""
        length, batch = x.shape[:2]
        return x.reshape(length, batch * self.num_heads, self.head_dim).transpose(0, 1)

    def project_key_value(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values of `x` (L x B x C), each as (B x H x L x head_dim)."""
        length, batch = x.shape[:2]
        shape = (batch, self.num_heads, length, self.head_dim)
        k = self.split_heads(self.k_proj(x)).view(shape)
        v = self.split_heads(self.v_proj(x)).view(shape)
        return k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        attn_bias: Optional[Tensor] = None,
        need_weights: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention of scaled queries q (B*H x T x d) over k, v (B*H x S x d); returns (T x B x C, weights).

        attn_bias: (B*H x T x S) or broadcastable (1|B x H x T x S).
        """
        bh, tgt_len, _ = q.shape
        batch = bh // self.num_heads
        src_len = k.size(1)
        scores = torch.bmm(q, k.transpose(1, 2))
        if attn_bias is not None:
            # Right-aligned, as OFA slices it: the bias of the newest keys. A 4-D bias
            # (1 or B, H, T, S) is broadcast over the batch instead of being copied per sample.
            attn_bias = attn_bias[..., -src_len:]
            if attn_bias.dim() == 4:
                scores = (scores.view(batch, self.num_heads, tgt_len, src_len) + attn_bias).view(bh, tgt_len, src_len)
            else:
                scores = scores + attn_bias
        if attn_mask is not None:
            scores = scores + attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            scores = scores.view(batch, self.num_heads, tgt_len, src_len).masked_fill(
                key_padding_mask.view(batch, 1, 1, src_len).bool(), float("-inf")
            ).view(bh, tgt_len, src_len)
        probs_float = F.softmax(scores.float(), dim=-1)
        probs = self.dropout_module(probs_float.type_as(scores))
        out = torch.bmm(probs, v)  # B*H x T x d
        out = out.transpose(0, 1).reshape(tgt_len, batch, self.num_heads, self.head_dim)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, 1, -1, 1)
        out = self.out_proj(out.reshape(tgt_len, batch, self.embed_dim))
        weights = None
        if need_weights or need_head_weights:
            weights = probs_float.view(batch, self.num_heads, tgt_len, src_len).transpose(0, 1)
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return out, weights

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        need_head_weights: bool = False,
        attn_bias: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        tgt_len, batch, _ = query.shape
        q = self.split_heads(self.q_proj(query) * self.scaling)

        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        reuse_static = static_kv and saved is not None and "prev_key" in saved
        if reuse_static:
            k = v = None
        else:
            source = query if self.self_attention else key
            k, v = self.project_key_value(source)  # B x H x L x d

        if saved is not None:
            if "prev_key" in saved:
                if static_kv:
                    k, v = saved["prev_key"], saved["prev_value"]
                else:
                    k = torch.cat([saved["prev_key"], k], dim=2)
                    v = torch.cat([saved["prev_value"], v], dim=2)
            key_padding_mask = merge_key_padding_masks(
                saved.get("prev_key_padding_mask"), key_padding_mask, batch, k.size(2), static_kv
            )
            saved["prev_key"], saved["prev_value"] = k, v
            saved["prev_key_padding_mask"] = key_padding_mask
            self._set_input_buffer(incremental_state, saved)

        src_len = k.size(2)
        k = k.reshape(batch * self.num_heads, src_len, self.head_dim)
        v = v.reshape(batch * self.num_heads, src_len, self.head_dim)
        return self.attend(
            q, k, v, key_padding_mask, attn_mask, attn_bias, need_weights, need_head_weights
        )

    def _get_input_buffer(self, incremental_state: Optional[IncrementalState]) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state: IncrementalState, buffer: Dict[str, Optional[Tensor]]):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        """Follow beam search: select cached rows in `new_order`."""
        buffer = self._get_input_buffer(incremental_state)
        if not buffer:
            return
        for name, value in list(buffer.items()):
            if value is None:
                continue
            if self.encoder_decoder_attention and value.size(0) == new_order.size(0):
                # Encoder keys are identical across the beams of a sentence: nothing moves.
                break
            buffer[name] = value.index_select(0, new_order)
        self._set_input_buffer(incremental_state, buffer)
