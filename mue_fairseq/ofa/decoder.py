"""OFA's incremental decoder: position information only through attention biases.

Self-attention gets an absolute bias from the target positions plus a per-layer token
relative bias; cross-attention gets an absolute bias between target positions and the
encoder's `position_embeddings`. In incremental mode only the newest row of each bias is
computed.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.models import FairseqIncrementalDecoder
from fairseq.modules import FairseqDropout, LayerNorm
from torch import Tensor, nn

from .attention import IncrementalState
from .encoder import EncoderOut, PositionBiasMixin
from .layers import OFADecoderLayer
from .position import decoder_code_position_ids


class OFADecoder(PositionBiasMixin, FairseqIncrementalDecoder):
    def __init__(self, args, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        self.args = args
        self.register_buffer("version", torch.Tensor([3]))
        embed_dim = args.decoder_embed_dim
        if embed_tokens.embedding_dim != embed_dim or getattr(args, "decoder_output_dim", embed_dim) != embed_dim:
            raise ValueError("OFA decoders need decoder embed/input/output dims to be equal")
        self.embed_dim = embed_dim
        self.padding_idx = embed_tokens.padding_idx
        self.max_target_positions = args.max_target_positions
        self.num_attention_heads = args.decoder_attention_heads
        self.share_input_output_embed = args.share_decoder_input_output_embed
        self.dropout_module = FairseqDropout(args.dropout, module_name=type(self).__name__)
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if args.no_scale_embedding else embed_dim ** 0.5
        # OFA adds absolute positions to the token embeddings unless --disable-entangle.
        self.add_positions_to_embeddings = not getattr(args, "disable_entangle", False)

        self.layernorm_embedding = LayerNorm(embed_dim) if getattr(args, "layernorm_embedding", False) else None
        self.code_layernorm_embedding = (
            LayerNorm(embed_dim) if getattr(args, "code_layernorm_embedding", False) else None
        )
        self._build_position_embeddings(args, embed_dim, args.max_target_positions)
        self.self_pos_q_linear = nn.Linear(embed_dim, embed_dim)
        self.self_pos_k_linear = nn.Linear(embed_dim, embed_dim)
        self.cross_pos_q_linear = nn.Linear(embed_dim, embed_dim)
        self.cross_pos_k_linear = nn.Linear(embed_dim, embed_dim)

        drop_path_rates = torch.linspace(0, args.decoder_drop_path_rate, args.decoder_layers).tolist()
        self.layers = nn.ModuleList([OFADecoderLayer(args, rate) for rate in drop_path_rates])
        self.num_layers = len(self.layers)
        self.layer_norm = LayerNorm(embed_dim) if args.decoder_normalize_before else None

        self.output_projection = nn.Linear(embed_dim, len(dictionary), bias=False)
        if self.share_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=embed_dim ** -0.5)

        self._build_relative_tables(args, self.num_layers)
        self.register_buffer(
            "image_position_idx", decoder_code_position_ids(args.code_image_size, args.image_bucket_size)
        )
        self._future_mask = torch.empty(0)

    # ----------------------------------------------------------------- pieces MuE reuses
    def self_position_bias(self, tgt_pos: Tensor, query_from: int = 0) -> Tensor:
        """(1 x H x Tq x T) absolute self-attention bias for query positions query_from..T-1.

        Target positions are the same for every row, so one bias is broadcast over the batch.
        """
        pos = tgt_pos.unsqueeze(0)
        return self._pair_bias(self.self_pos_q_linear, self.self_pos_k_linear, pos[:, query_from:], pos)

    def cross_position_bias(
        self, tgt_pos: Tensor, encoder_out: EncoderOut, incremental_state: Optional[IncrementalState], query_from: int = 0
    ) -> Tensor:
        """(B x H x Tq x S) absolute cross-attention bias against the encoder's positions.

        The key side depends only on the encoder output, so decoding computes it once and
        keeps it in the incremental state (reordered with the beams like the attention caches).
        """
        heads = self.num_attention_heads
        pos_k = self.get_incremental_state(incremental_state, "cross_pos_k") if incremental_state is not None else None
        if pos_k is None:
            src_pos = encoder_out["position_embeddings"][0]
            pos_k = self.cross_pos_k_linear(src_pos).view(src_pos.size(0), src_pos.size(1), heads, -1).transpose(1, 2)
            if incremental_state is not None:
                self.set_incremental_state(incremental_state, "cross_pos_k", pos_k)
        batch = pos_k.size(0)
        q = self.cross_pos_q_linear(tgt_pos[query_from:]).view(1, -1, heads, pos_k.size(-1)).transpose(1, 2)
        return torch.matmul(q * self.pos_scaling, pos_k.transpose(2, 3)).expand(batch, -1, -1, -1)

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        pos_k = self.get_incremental_state(incremental_state, "cross_pos_k")
        if pos_k is not None and pos_k.size(0) != new_order.size(0):
            # Identical across the beams of a sentence: only a shrinking batch needs a copy.
            self.set_incremental_state(incremental_state, "cross_pos_k", pos_k.index_select(0, new_order))

    def embed_target(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings (B x T x C) of `tokens`, whose raw position embeddings are `positions`."""
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.add_positions_to_embeddings:
            x = x + positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x)

    def buffered_future_mask(self, tensor: Tensor) -> Tensor:
        dim = tensor.size(0)
        if self._future_mask.size(0) < dim or self._future_mask.device != tensor.device:
            self._future_mask = torch.triu(utils.fill_with_neg_inf(torch.zeros(dim, dim)), 1)
        self._future_mask = self._future_mask.to(tensor)
        return self._future_mask[:dim, :dim]

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        prev_output_tokens: Tensor,
        code_masks: Optional[Tensor] = None,
        encoder_out: Optional[EncoderOut] = None,
        incremental_state: Optional[IncrementalState] = None,
        features_only: bool = False,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
        src_lengths: Optional[Any] = None,
        return_all_hiddens: bool = False,
    ) -> Tuple[Tensor, Dict[str, List[Optional[Tensor]]]]:
        features, extra = self.extract_features(
            prev_output_tokens, code_masks, encoder_out, incremental_state,
            full_context_alignment, alignment_layer, alignment_heads,
        )
        return (features if features_only else self.output_layer(features)), extra

    def extract_features(
        self,
        prev_output_tokens: Tensor,
        code_masks: Optional[Tensor] = None,
        encoder_out: Optional[EncoderOut] = None,
        incremental_state: Optional[IncrementalState] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ) -> Tuple[Tensor, Dict[str, List[Optional[Tensor]]]]:
        if code_masks is not None and bool(code_masks.any()):
            raise NotImplementedError("image-code generation (code_masks) is not supported by mue-fairseq")
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        tgt_len = prev_output_tokens.size(1)
        enc = encoder_out["encoder_out"][0]
        enc_padding = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        raw_positions = self.embed_positions(torch.arange(tgt_len, device=prev_output_tokens.device))
        tgt_pos = self.pos_ln(raw_positions)

        query_from = tgt_len - 1 if incremental_state is not None else 0
        tokens = prev_output_tokens[:, query_from:]
        self_bias = self.self_position_bias(tgt_pos, query_from)
        cross_bias = self.cross_position_bias(tgt_pos, encoder_out, incremental_state, query_from)

        x = self.embed_target(tokens, raw_positions[query_from:]).transpose(0, 1)
        self_padding = tokens.eq(self.padding_idx) if bool(tokens.eq(self.padding_idx).any()) else None

        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        for idx, layer in enumerate(self.layers):
            causal = self.buffered_future_mask(x) if incremental_state is None and not full_context_alignment else None
            bias = self_bias + self.token_relative_bias(tgt_len, idx)[:, query_from:].unsqueeze(0)
            x, layer_attn, _ = layer(
                x,
                enc,
                enc_padding,
                incremental_state,
                self_attn_mask=causal,
                self_attn_padding_mask=self_padding,
                need_attn=idx == alignment_layer,
                need_head_weights=idx == alignment_layer,
                self_attn_bias=bias,
                cross_attn_bias=cross_bias,
            )
            inner_states.append(x)
            if idx == alignment_layer and layer_attn is not None:
                # the alignment: this layer's cross-attention averaged over its first heads (all by default)
                attn = layer_attn.float().to(x)[:alignment_heads].mean(dim=0)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x.transpose(0, 1), {"attn": [attn], "inner_states": inner_states}

    def output_layer(self, features: Tensor) -> Tensor:
        # As a 2-D product. A decoding step's [rows, 1, C] features come from a transpose, and for
        # such a 3-D input torch's matmul broadcasts the weight into a batched product when the
        # weight needs no gradient (OFA's --freeze-*-embedding): 5-10x slower, other roundings.
        flat = self.output_projection(features.reshape(-1, features.size(-1)))
        return flat.view(*features.shape[:-1], flat.size(-1))

    def max_positions(self) -> int:
        return self.max_target_positions

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str):
        # The code-grid index table is derived, and OFA itself rebuilds it on load.
        state_dict[f"{name}.image_position_idx"] = self.image_position_idx
        if f"{name}.output_projection.weight" not in state_dict and self.share_input_output_embed:
            tied = state_dict.get(f"{name}.embed_tokens.weight")
            if tied is not None:
                state_dict[f"{name}.output_projection.weight"] = tied
        return state_dict
