"""OFA's unified encoder: ResNet patches and text tokens in one sequence [image; text].

Positions are not added to the embeddings: every layer gets an additive attention bias made of
an absolute term (shared by all layers) plus per-layer relative terms for the text x text and
image x image blocks. The bias helpers are separate methods so that the MuE encoder can build
the same terms for one modality at a time.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.models import FairseqEncoder
from fairseq.modules import FairseqDropout, LayerNorm
from torch import Tensor, nn

from .layers import OFAEncoderLayer
from .position import image_position_ids, image_relative_buckets, token_relative_buckets
from .resnet import build_resnet

EncoderOut = Dict[str, List[Tensor]]


def OFAEmbedding(num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None, zero_init=False):
    m = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
    if zero_init:
        nn.init.zeros_(m.weight)
    else:
        nn.init.normal_(m.weight, mean=0, std=embedding_dim ** -0.5)
        if padding_idx is not None:
            nn.init.zeros_(m.weight[padding_idx])
    return m


class PositionBiasMixin:
    """Position embeddings and biases shared by OFA's encoder and decoder.

    Absolute bias q(P_i)·k(P_j) is scaled like attention (OFA's `pos_scaling`); relative biases
    come from per-layer tables indexed by the saved `*_rp_bucket` buffers.
    """

    def _build_position_embeddings(self, args, embed_dim: int, max_positions: int) -> None:
        self.embed_positions = OFAEmbedding(max_positions + 2, embed_dim)
        self.embed_image_positions = OFAEmbedding(args.image_bucket_size ** 2 + 1, embed_dim)
        self.pos_ln = LayerNorm(embed_dim)
        self.image_pos_ln = LayerNorm(embed_dim)
        self.pos_scaling = float(embed_dim / self.num_attention_heads * args.attn_scale_factor) ** -0.5

    def _build_relative_tables(self, args, num_layers: int) -> None:
        heads = self.num_attention_heads
        image_ids = (2 * args.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            [OFAEmbedding(2 * args.token_bucket_size - 1, heads, zero_init=True) for _ in range(num_layers)]
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            [OFAEmbedding(image_ids, heads, zero_init=True) for _ in range(num_layers)]
        )
        self.register_buffer("token_rp_bucket", token_relative_buckets(args.token_bucket_size))
        self.register_buffer("image_rp_bucket", image_relative_buckets(args.image_bucket_size))

    def _pair_bias(self, q_linear: nn.Linear, k_linear: nn.Linear, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """(B x Tq x C), (B x Tk x C) -> (B x H x Tq x Tk)."""
        batch, heads = query_pos.size(0), self.num_attention_heads
        q = q_linear(query_pos).view(batch, query_pos.size(1), heads, -1).transpose(1, 2) * self.pos_scaling
        k = k_linear(key_pos).view(batch, key_pos.size(1), heads, -1).transpose(1, 2)
        return torch.matmul(q, k.transpose(2, 3))

    def token_relative_bias(self, length: int, layer_idx: int) -> Tensor:
        """(H x L x L) relative bias of a text block of `length` tokens at layer `layer_idx`."""
        buckets = self.token_rp_bucket[:length, :length]
        return F.embedding(buckets, self.token_rel_pos_table_list[layer_idx].weight).permute(2, 0, 1)


class OFAEncoder(PositionBiasMixin, FairseqEncoder):
    def __init__(self, args, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        self.args = args
        self.register_buffer("version", torch.Tensor([3]))
        embed_dim = embed_tokens.embedding_dim
        self.embed_dim = embed_dim
        self.padding_idx = embed_tokens.padding_idx
        self.max_source_positions = args.max_source_positions
        self.num_attention_heads = args.encoder_attention_heads
        self.image_bucket_size = args.image_bucket_size
        self.dropout_module = FairseqDropout(args.dropout, module_name=type(self).__name__)
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if args.no_scale_embedding else embed_dim ** 0.5
        self.entangle_position_embedding = getattr(args, "entangle_position_embedding", False)

        self.layernorm_embedding = LayerNorm(embed_dim) if getattr(args, "layernorm_embedding", False) else None
        self.type_embedding = OFAEmbedding(2, embed_dim) if getattr(args, "add_type_embedding", False) else None
        if getattr(args, "sync_bn", False):
            raise NotImplementedError("--sync-bn is not supported; use plain or frozen BatchNorm")
        self.embed_images = build_resnet(
            args.resnet_type, getattr(args, "freeze_resnet", False), args.resnet_drop_path_rate
        )
        self.image_proj = nn.Linear(self.embed_images.out_channels, embed_dim)
        nn.init.xavier_uniform_(self.image_proj.weight)
        nn.init.zeros_(self.image_proj.bias)
        self.patch_layernorm_embedding = (
            LayerNorm(embed_dim) if getattr(args, "patch_layernorm_embedding", False) else None
        )

        self._build_position_embeddings(args, embed_dim, args.max_source_positions)
        self.pos_q_linear = nn.Linear(embed_dim, embed_dim)
        self.pos_k_linear = nn.Linear(embed_dim, embed_dim)

        drop_path_rates = torch.linspace(0, args.encoder_drop_path_rate, args.encoder_layers).tolist()
        self.layers = nn.ModuleList([OFAEncoderLayer(args, rate) for rate in drop_path_rates])
        self.num_layers = len(self.layers)
        self.layer_norm = LayerNorm(embed_dim) if args.encoder_normalize_before else None

        self._build_relative_tables(args, self.num_layers)

    # ----------------------------------------------------------------- embeddings
    def embed_image_patches(
        self, patch_images: Tensor, patch_masks: Optional[Tensor], sample_patch_num: Optional[int] = None
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """ResNet features of `patch_images` as embedded patches.

        Returns (patches B x N x C after projection/type/norm/dropout, padding B x N,
        position ids B x N, raw position embeddings B x N x C).
        """
        features = self.embed_images(patch_images)
        height, width = features.shape[-2:]
        batch = patch_images.size(0)
        patches = features.flatten(2).transpose(1, 2)
        position_ids = image_position_ids(height, width, self.image_bucket_size).to(patch_images.device)
        position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        padding = patch_images.new_zeros(batch, height * width, dtype=torch.bool)
        if patch_masks is not None:
            padding = padding | ~patch_masks.bool().unsqueeze(1)
        if sample_patch_num is not None:
            order = torch.stack(
                [torch.randperm(height * width, device=patch_images.device)[:sample_patch_num] for _ in range(batch)]
            )
            patches = patches.gather(1, order.unsqueeze(2).expand(-1, -1, patches.size(2)))
            padding = padding.gather(1, order)
            position_ids = position_ids.gather(1, order)
        position_embed = self.embed_image_positions(position_ids)

        x = self.embed_scale * self.image_proj(patches)
        if self.entangle_position_embedding:
            x = x + position_embed
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[1]
        if self.patch_layernorm_embedding is not None:
            x = self.patch_layernorm_embedding(x)
        return self.dropout_module(x), padding, position_ids, position_embed

    def embed_text(self, src_tokens: Tensor, token_embeddings: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns (tokens B x S x C, padding B x S, raw position embeddings B x S x C)."""
        positions = torch.arange(src_tokens.size(1), device=src_tokens.device)
        position_embed = self.embed_positions(positions).unsqueeze(0).expand(src_tokens.size(0), -1, -1)
        if token_embeddings is None:
            token_embeddings = self.embed_tokens(src_tokens)
        x = self.embed_scale * token_embeddings
        if self.entangle_position_embedding:
            x = x + position_embed
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[0]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x), src_tokens.eq(self.padding_idx), position_embed

    def image_relative_bias(self, position_ids: Tensor, layer_idx: int) -> Tensor:
        """(B x H x N x N) relative bias between the patches `position_ids` (B x N)."""
        if bool((position_ids == position_ids[:1]).all()):
            # Every sample has the same grid (always so outside pretraining): build it once.
            ids = position_ids[0]
            buckets = self.image_rp_bucket[ids][:, ids]
            bias = F.embedding(buckets, self.image_rel_pos_table_list[layer_idx].weight).permute(2, 0, 1)
            return bias.unsqueeze(0).expand(position_ids.size(0), -1, -1, -1)
        buckets = self.image_rp_bucket[position_ids.unsqueeze(2), position_ids.unsqueeze(1)]
        return F.embedding(buckets, self.image_rel_pos_table_list[layer_idx].weight).permute(0, 3, 1, 2)

    def absolute_position_bias(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """(B x H x Tq x Tk) from normalised position embeddings."""
        return self._pair_bias(self.pos_q_linear, self.pos_k_linear, query_pos, key_pos)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        patch_images: Optional[Tensor] = None,
        patch_images_2: Optional[Tensor] = None,
        patch_masks: Optional[Tensor] = None,
        code_masks: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        sample_patch_num: Optional[int] = None,
    ) -> EncoderOut:
        if patch_images_2 is not None:
            raise NotImplementedError("patch_images_2 (two-image inputs) is not supported by mue-fairseq")
        text_x, text_padding, text_pos = self.embed_text(src_tokens, token_embeddings)
        text_pos = self.pos_ln(text_pos)
        num_patches = 0
        image_position_ids_ = None
        if patch_images is not None:
            image_x, image_padding, image_position_ids_, image_pos = self.embed_image_patches(
                patch_images, patch_masks, sample_patch_num
            )
            num_patches = image_x.size(1)
            x = torch.cat([image_x, text_x], dim=1)
            padding_mask = torch.cat([image_padding, text_padding], dim=1)
            pos_embed = torch.cat([self.image_pos_ln(image_pos), text_pos], dim=1)
        else:
            x, padding_mask, pos_embed = text_x, text_padding, text_pos

        has_pads = bool(padding_mask.any())
        if has_pads:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)
        # Without patch sampling every sample has the same positions: one bias serves the batch.
        shared = sample_patch_num is None
        bias_pos = pos_embed[:1] if shared else pos_embed
        abs_bias = self.absolute_position_bias(bias_pos, bias_pos)
        if num_patches and shared:
            image_position_ids_ = image_position_ids_[:1]

        states = [x] if return_all_hiddens else []
        text_len = src_tokens.size(1)
        for idx, layer in enumerate(self.layers):
            bias = abs_bias.clone()
            bias[:, :, -text_len:, -text_len:] += self.token_relative_bias(text_len, idx).unsqueeze(0)
            if num_patches:
                bias[:, :, :num_patches, :num_patches] += self.image_relative_bias(image_position_ids_, idx)
            x = layer(x, padding_mask if has_pads else None, bias)
            if return_all_hiddens:
                states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [padding_mask],  # B x T
            "encoder_embedding": [],
            "encoder_states": states,  # list of T x B x C
            "src_tokens": [],
            "src_lengths": [],
            "position_embeddings": [pos_embed],  # B x T x C
        }

    def reorder_encoder_out(self, encoder_out: EncoderOut, new_order: Tensor) -> EncoderOut:
        """Select samples `new_order` (beam expansion or reordering) in every batch-indexed entry."""
        batch_dims = {"encoder_out": 1, "encoder_states": 1}
        reordered = {}
        for key, values in encoder_out.items():
            dim = batch_dims.get(key, 0)
            reordered[key] = [v.index_select(dim, new_order) for v in values]
        return reordered

    def max_positions(self) -> int:
        return self.max_source_positions
