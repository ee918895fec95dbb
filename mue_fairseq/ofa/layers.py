"""OFA's transformer layers (NormFormer-style extra norms: attn_ln, ffn_layernorm, c_attn, w_resid)."""
from typing import Optional, Tuple

import torch
from fairseq import utils
from fairseq.modules import LayerNorm
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor, nn

from .attention import IncrementalState, OFAMultiheadAttention
from .resnet import DropPath


def _activation_dropout(args) -> float:
    return float(getattr(args, "activation_dropout", 0) or getattr(args, "relu_dropout", 0) or 0)


class _FeedForwardMixin:
    """Shared FFN block: norm -> fc1 -> act -> (ffn_layernorm) -> fc2, with OFA's residual scale."""

    def _build_ffn(self, args, embed_dim: int, ffn_dim: int):
        self.activation_fn = utils.get_activation_fn(getattr(args, "activation_fn", "relu") or "relu")
        self.activation_dropout_module = FairseqDropout(_activation_dropout(args), module_name=type(self).__name__)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = LayerNorm(ffn_dim) if getattr(args, "scale_fc", False) else None
        self.w_resid = nn.Parameter(torch.ones(embed_dim)) if getattr(args, "scale_resids", False) else None
        self.final_layer_norm = LayerNorm(embed_dim)

    def feed_forward(self, x: Tensor) -> Tensor:
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.activation_dropout_module(self.activation_fn(self.fc1(x)))
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        x = self.dropout_module(self.fc2(x))
        if self.w_resid is not None:
            residual = self.w_resid * residual
        x = residual + self.drop_path(x)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


class OFAEncoderLayer(_FeedForwardMixin, nn.Module):
    def __init__(self, args, drop_path_rate: float = 0.0):
        super().__init__()
        self.embed_dim = args.encoder_embed_dim
        self.normalize_before = args.encoder_normalize_before
        self.self_attn = OFAMultiheadAttention(
            self.embed_dim,
            args.encoder_attention_heads,
            dropout=args.attention_dropout,
            self_attention=True,
            scale_factor=args.attn_scale_factor,
            scale_heads=getattr(args, "scale_heads", False),
        )
        self.self_attn_layer_norm = LayerNorm(self.embed_dim)
        self.attn_ln = LayerNorm(self.embed_dim) if getattr(args, "scale_attn", False) else None
        self.dropout_module = FairseqDropout(args.dropout, module_name=type(self).__name__)
        self.drop_path = DropPath(drop_path_rate, batch_dim=1) if drop_path_rate > 0 else nn.Identity()
        self._build_ffn(args, self.embed_dim, args.encoder_ffn_embed_dim)

    def self_attention_block(
        self, x: Tensor, padding_mask: Optional[Tensor], attn_bias: Optional[Tensor]
    ) -> Tensor:
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=False, attn_bias=attn_bias)
        if self.attn_ln is not None:
            x = self.attn_ln(x)
        x = residual + self.drop_path(self.dropout_module(x))
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        return x

    def forward(
        self, x: Tensor, encoder_padding_mask: Optional[Tensor], self_attn_bias: Optional[Tensor] = None
    ) -> Tensor:
        """x: T x B x C; self_attn_bias: B*H x T x T or broadcastable 1|B x H x T x T."""
        return self.feed_forward(self.self_attention_block(x, encoder_padding_mask, self_attn_bias))


class OFADecoderLayer(_FeedForwardMixin, nn.Module):
    def __init__(self, args, drop_path_rate: float = 0.0):
        super().__init__()
        self.embed_dim = args.decoder_embed_dim
        self.normalize_before = args.decoder_normalize_before
        heads = args.decoder_attention_heads
        scale_attn = getattr(args, "scale_attn", False)
        self.self_attn = OFAMultiheadAttention(
            self.embed_dim,
            heads,
            dropout=args.attention_dropout,
            self_attention=True,
            scale_factor=args.attn_scale_factor,
            scale_heads=getattr(args, "scale_heads", False),
        )
        self.self_attn_ln = LayerNorm(self.embed_dim) if scale_attn else None
        self.self_attn_layer_norm = LayerNorm(self.embed_dim)
        self.encoder_attn = OFAMultiheadAttention(
            self.embed_dim,
            heads,
            kdim=getattr(args, "encoder_embed_dim", None),
            vdim=getattr(args, "encoder_embed_dim", None),
            dropout=args.attention_dropout,
            encoder_decoder_attention=True,
            scale_factor=args.attn_scale_factor,
            scale_heads=getattr(args, "scale_heads", False),
        )
        self.cross_attn_ln = LayerNorm(self.embed_dim) if scale_attn else None
        self.encoder_attn_layer_norm = LayerNorm(self.embed_dim)
        self.dropout_module = FairseqDropout(args.dropout, module_name=type(self).__name__)
        self.drop_path = DropPath(drop_path_rate, batch_dim=1) if drop_path_rate > 0 else nn.Identity()
        self._build_ffn(args, self.embed_dim, args.decoder_ffn_embed_dim)

    def _residual_block(self, x, norm, post_ln, attend):
        residual = x
        if self.normalize_before:
            x = norm(x)
        x, attn = attend(x)
        if post_ln is not None:
            x = post_ln(x)
        x = residual + self.drop_path(self.dropout_module(x))
        if not self.normalize_before:
            x = norm(x)
        return x, attn

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor],
        encoder_padding_mask: Optional[Tensor],
        incremental_state: Optional[IncrementalState] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
        self_attn_bias: Optional[Tensor] = None,
        cross_attn_bias: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor], None]:
        """x: T x B x C. Returns (x, cross-attention weights or None, None) as OFA's layer does."""
        x, _ = self._residual_block(
            x,
            self.self_attn_layer_norm,
            self.self_attn_ln,
            lambda h: self.self_attn(
                h, h, h,
                key_padding_mask=self_attn_padding_mask,
                incremental_state=incremental_state,
                need_weights=False,
                attn_mask=self_attn_mask,
                attn_bias=self_attn_bias,
            ),
        )
        x, attn = self._residual_block(
            x,
            self.encoder_attn_layer_norm,
            self.cross_attn_ln,
            lambda h: self.encoder_attn(
                h, encoder_out, encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or need_head_weights,
                need_head_weights=need_head_weights,
                attn_bias=cross_attn_bias,
            ),
        )
        return self.feed_forward(x), attn, None
