"""FLOP model of OFA / MuE inference: what a forward pass costs, part by part.

Conventions
-----------
* One multiply-accumulate counts as 2 FLOPs. Only matrix products are counted (linear layers,
  convolutions, attention score and value products, position-bias products), the same
  convention as `torch.utils.flop_counter`; layer norms, softmax, activations, residual adds,
  embedding look-ups and the exit tests (cosines) are left out: they are a few percent at most.
* The number of attention heads does not change these FLOPs (heads x head_dim = embed dim);
  it is part of the shape only to check that the width splits into heads.
* Sequence lengths are the lengths actually computed: a batch's text stream runs over the
  padded source length.

Costs by component (d = embed dim, F = FFN dim, N = image patches, L = text tokens,
S = N + L encoder memory, V = vocabulary, s = decoding step from 0):
* ResNet stem and stages 1-3 (`resnet_flops`) and the patch projection (N x 1024 -> d):
  always paid, an exit never skips them.
* Encoder layer over T tokens attending to C tokens (`encoder_layer_flops`):
  q/k/v/out projections 4*T*d*d, scores and weighted sum 2*T*C*d, FFN 2*T*d*F (MACs).
  MuE's decomposed encoder runs the image stream (T = C = N) and the text stream (T = C = L)
  separately; OFA's joint encoder runs T = C = N + L.
* Decoder layer, one token at step s (`decoder_token_layer_flops`): self-attention
  projections 4*d*d and scores over the s + 1 cached positions 2*(s+1)*d; cross-attention
  q/out projections 2*d*d and scores over the memory 2*S*d; FFN 2*d*F.
* Cross-attention keys/values of the encoder memory (`cross_kv_flops`, 2*S*d*d per layer
  and hypothesis row): computed once, for each layer that some token reaches.
* Output projection d*V, once per generated token (from whatever layer it exits).
* Position biases (`position_bias_flops`): OFA computes absolute position biases from
  projected position embeddings. The encoder's (per stream) and the decoder's self-attention
  bias are the same for every sample and computed once per batch; the decoder's
  cross-attention bias has a per-row part (key projection of the encoder positions once,
  a 1 x S product per step).
* Exit extras: `propagate` projects keys/values of each skipped decoder layer (2*d*d per
  skipped layer and token). The decoder defers them until a later token runs that layer, so
  only the skipped layers that a later token of the row reaches again are counted (exact for
  a row alone, or for a batch whose rows exit alike; in a mixed batch, another row running the
  layer may force the projection: an undercount). `copy` and `none` cost nothing;
  `recompute` runs the skipped layers anyway (no decoder saving);
  the prediction-based policies (entropy, confidence, patience) evaluate the output head
  (d*V) at each decision, counted as min(exit, layers - 1) decisions per token (an upper
  bound when leading steps are kept at full depth).

Beam search runs the decoder on `beam` rows per sample; per-sample decoder costs are the
best hypothesis's costs times the beam size (exact when all beams exit alike).

With equal exits for all rows, the totals equal what `torch.utils.flop_counter` counts while
the models generate (see tests/test_exit_stats.py). FLOPs are not time: at small batches the
per-token matrix-vector products are bound by reading weights (the output projection alone
reads V*d weights per step), while the cross-attention keys/values are one large, efficient
product, so FLOP ratios over-state decoder savings there (BENCHMARKS.md).
"""
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Sequence

from mue_fairseq.ofa.resnet import RESNET_STAGE_BLOCKS

RESNET_OUT_CHANNELS = 1024  # stage 3 of a Bottleneck ResNet: 256 x 4
PREDICTION_POLICIES = ("entropy", "confidence", "patience")
KV_POLICIES = ("propagate", "copy", "recompute", "none")
# Components of `OFAFlopModel.sample_flops`, grouped by the half of the model that spends them.
ENCODER_PARTS = ("resnet", "image_stream", "text_stream", "joint_encoder", "encoder_position_bias")
DECODER_PARTS = ("decoder_layers", "cross_kv", "output_projection", "exit_extras", "decoder_position_bias")


# ---------------------------------------------------------------------------- primitives
def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """FLOPs of a linear map applied to `rows` vectors (bias adds not counted)."""
    return 2 * rows * in_features * out_features


def conv2d_flops(in_channels: int, out_channels: int, kernel: int, out_height: int, out_width: int) -> int:
    """FLOPs of a dense 2-D convolution, given its output size."""
    return 2 * in_channels * out_channels * kernel * kernel * out_height * out_width


def halved(size: int) -> int:
    """Output size of OFA's stride-2 convolutions and pooling (padding keeps it at ceil(size/2))."""
    return (size + 1) // 2


def resnet_grid_size(image_size: int) -> int:
    """Side of the patch grid after the stem (stride 4) and stages 2-3 (stride 2 each)."""
    return halved(halved(halved(halved(image_size))))


def num_image_patches(image_size: int) -> int:
    return resnet_grid_size(image_size) ** 2


def resnet_flops(resnet_type: str, image_size: int) -> int:
    """Stem (7x7/2 conv, 3x3/2 max-pool) and Bottleneck stages 1-3 of OFA's ResNet on one image.

    Stage widths 64/128/256 (x4 outputs); stages 2 and 3 downsample in the first block's 3x3
    conv and its 1x1 shortcut; BatchNorm, ReLU and pooling cost no matrix FLOPs.
    """
    if resnet_type not in RESNET_STAGE_BLOCKS:
        raise ValueError(f"unknown resnet type {resnet_type!r}; known: {sorted(RESNET_STAGE_BLOCKS)}")
    size = halved(image_size)
    total = conv2d_flops(3, 64, 7, size, size)
    size = halved(size)  # max-pool
    in_channels = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256), RESNET_STAGE_BLOCKS[resnet_type])):
        out_channels = 4 * width
        for block in range(blocks):
            in_size = size
            if block == 0 and stage > 0:
                size = halved(size)
            total += conv2d_flops(in_channels, width, 1, in_size, in_size)
            total += conv2d_flops(width, width, 3, size, size)
            total += conv2d_flops(width, out_channels, 1, size, size)
            if block == 0:  # shortcut projection (channel change, and stride in stages 2-3)
                total += conv2d_flops(in_channels, out_channels, 1, size, size)
            in_channels = out_channels
    return total


def attention_score_flops(query_len: int, key_len: int, embed_dim: int) -> int:
    """Scores q.k and the weighted sum of values, over all heads."""
    return 2 * (2 * query_len * key_len * embed_dim)


def position_bias_flops(query_rows: int, key_rows: int, embed_dim: int, score_rows: Optional[int] = None) -> int:
    """OFA's absolute position bias q(P_q).k(P_k): two projections and one product.

    `score_rows` (default `query_rows`) is the number of query positions the product covers.
    """
    score_rows = query_rows if score_rows is None else score_rows
    return (linear_flops(query_rows, embed_dim, embed_dim) + linear_flops(key_rows, embed_dim, embed_dim)
            + 2 * score_rows * key_rows * embed_dim)


def ffn_flops(rows: int, embed_dim: int, ffn_dim: int) -> int:
    return linear_flops(rows, embed_dim, ffn_dim) + linear_flops(rows, ffn_dim, embed_dim)


def encoder_layer_flops(tokens: int, embed_dim: int, ffn_dim: int, context: Optional[int] = None) -> int:
    """One encoder layer over `tokens` positions that attend to `context` positions (default: themselves)."""
    context = tokens if context is None else context
    return (4 * linear_flops(tokens, embed_dim, embed_dim) + attention_score_flops(tokens, context, embed_dim)
            + ffn_flops(tokens, embed_dim, ffn_dim))


def decoder_token_layer_flops(step: int, memory_len: int, embed_dim: int, ffn_dim: int) -> int:
    """One decoder layer for one token at decoding step `step` (0-based), cached keys/values reused."""
    self_attn = 4 * linear_flops(1, embed_dim, embed_dim) + attention_score_flops(1, step + 1, embed_dim)
    cross_attn = 2 * linear_flops(1, embed_dim, embed_dim) + attention_score_flops(1, memory_len, embed_dim)
    return self_attn + cross_attn + ffn_flops(1, embed_dim, ffn_dim)


def cross_kv_flops(memory_len: int, embed_dim: int) -> int:
    """Keys and values of the encoder memory for one decoder layer and one hypothesis row."""
    return 2 * linear_flops(memory_len, embed_dim, embed_dim)


def output_projection_flops(embed_dim: int, vocab_size: int) -> int:
    return linear_flops(1, embed_dim, vocab_size)


def propagate_kv_flops(embed_dim: int) -> int:
    """Key and value projections a skipped decoder layer stores for a token (`propagate` policy)."""
    return 2 * linear_flops(1, embed_dim, embed_dim)


# ---------------------------------------------------------------------------- the model
@dataclass
class OFAFlopModel:
    """Shape of an OFA / MuE model and its inference setting, with per-sample costs.

    `sample_flops` gives what one sample of a batch costs with the layers it actually ran;
    `full_depth_flops` the same sample at full depth, either through MuE's decomposed
    encoder (the reference for exit savings) or through OFA's joint encoder. `decomposed`
    says which encoder the model runs (`--mue-encoder-mode`); the OFA core's is joint.
    """

    embed_dim: int
    ffn_dim: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    resnet_type: str
    image_size: int
    beam: int = 1
    kv_policy: str = "propagate"
    exit_policy: str = "similarity"
    decomposed: bool = True
    defer_skipped_kv: bool = True  # MuEDecoder.defer_skipped_kv (propagate only)
    num_patches: int = field(init=False)

    def __post_init__(self):
        if self.embed_dim % self.heads:
            raise ValueError(f"embed dim {self.embed_dim} does not split into {self.heads} heads")
        for name in ("embed_dim", "ffn_dim", "encoder_layers", "decoder_layers", "vocab_size", "image_size", "beam"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resnet_type not in RESNET_STAGE_BLOCKS:
            raise ValueError(f"unknown resnet type {self.resnet_type!r}; known: {sorted(RESNET_STAGE_BLOCKS)}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"unknown kv policy {self.kv_policy!r}; known: {list(KV_POLICIES)}")
        self.num_patches = num_image_patches(self.image_size)

    @classmethod
    def from_model(cls, model, image_size: int, beam: int = 1) -> "OFAFlopModel":
        """Shape of a built `ofa` / `mue_ofa` model (its args and MuE options)."""
        args = model.args
        mue = getattr(model, "mue", None)
        return cls(
            embed_dim=args.encoder_embed_dim,
            ffn_dim=args.encoder_ffn_embed_dim,
            heads=args.encoder_attention_heads,
            encoder_layers=args.encoder_layers,
            decoder_layers=args.decoder_layers,
            vocab_size=len(model.decoder.dictionary),
            resnet_type=args.resnet_type,
            image_size=image_size,
            beam=beam,
            kv_policy=mue.kv_policy if mue is not None else "propagate",
            exit_policy=mue.policy if mue is not None else "similarity",
            decomposed=mue.decomposed if mue is not None else False,
            defer_skipped_kv=getattr(model.decoder, "defer_skipped_kv", False),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "OFAFlopModel":
        """Inverse of `to_dict` (the derived `num_patches` is recomputed)."""
        return cls(**{k: v for k, v in values.items() if k != "num_patches"})

    # -------------------------------------------------------------- parts
    def image_embedding_flops(self, has_image: bool = True) -> int:
        """ResNet and patch projection of one image (never skipped)."""
        if not has_image:
            return 0
        return resnet_flops(self.resnet_type, self.image_size) + linear_flops(
            self.num_patches, RESNET_OUT_CHANNELS, self.embed_dim
        )

    def encoder_stream_flops(self, tokens: int, layers: int) -> int:
        """`layers` layers of one decomposed stream of `tokens` positions."""
        return layers * encoder_layer_flops(tokens, self.embed_dim, self.ffn_dim)

    def encoder_position_bias_flops(self, text_len: int, has_image: bool = True, joint: bool = False) -> int:
        """Absolute position biases of the encoder (shared by a batch): per stream, or joint."""
        patches = self.num_patches if has_image else 0
        if joint:
            return position_bias_flops(patches + text_len, patches + text_len, self.embed_dim)
        total = position_bias_flops(text_len, text_len, self.embed_dim)
        if patches:
            total += position_bias_flops(patches, patches, self.embed_dim)
        return total

    def decoder_flops(self, exit_layers: Sequence[int], memory_len: int) -> Dict[str, int]:
        """Decoder cost of one hypothesis row whose token at step s ran exit_layers[s] layers."""
        d, layers = self.embed_dim, self.decoder_layers
        recompute = self.kv_policy == "recompute"
        out = {"decoder_layers": 0, "cross_kv": 0, "output_projection": 0, "exit_extras": 0, "position_bias_row": 0}
        deepest = 0
        # The deepest layer any later step of the row runs: deferred keys/values below it get made.
        reached_later = [0] * (len(exit_layers) + 1)
        for step in reversed(range(len(exit_layers))):
            reached_later[step] = max(reached_later[step + 1], int(exit_layers[step]))
        for step, ran in enumerate(exit_layers):
            ran = int(ran)
            if not 1 <= ran <= layers:
                raise ValueError(f"decoder exit layer {ran} at step {step} is outside 1..{layers}")
            layer_cost = decoder_token_layer_flops(step, memory_len, d, self.ffn_dim)
            out["decoder_layers"] += ran * layer_cost
            out["output_projection"] += output_projection_flops(d, self.vocab_size)
            out["position_bias_row"] += 2 * memory_len * d  # this step's cross-bias row
            skipped = layers - ran
            if recompute:
                out["exit_extras"] += skipped * layer_cost
            elif self.kv_policy == "propagate":
                projected = max(0, min(layers, reached_later[step + 1]) - ran) if self.defer_skipped_kv else skipped
                out["exit_extras"] += projected * propagate_kv_flops(d)
            if self.exit_policy in PREDICTION_POLICIES:
                out["exit_extras"] += min(ran, layers - 1) * output_projection_flops(d, self.vocab_size)
            deepest = max(deepest, layers if recompute else ran)
        out["cross_kv"] = deepest * cross_kv_flops(memory_len, d)
        if exit_layers:
            out["position_bias_row"] += linear_flops(memory_len, d, d)  # cross-bias keys, once per row
        return out

    def decoder_shared_flops(self, num_steps: int) -> int:
        """Per-batch decoder cost of `num_steps` steps: self-attention position bias, cross-bias query."""
        d = self.embed_dim
        total = 0
        for step in range(num_steps):
            total += position_bias_flops(1, step + 1, d) + linear_flops(1, d, d)
        return total

    # -------------------------------------------------------------- per sample
    def sample_flops(
        self,
        text_len: int,
        image_layers: int,
        text_layers: int,
        decoder_exit_layers: Sequence[int],
        batch_size: int = 1,
        joint_encoder: Optional[bool] = None,
    ) -> Dict[str, float]:
        """Cost of one sample, by component; batch-shared costs are split evenly over `batch_size`.

        image_layers == 0 means the sample had no image (no ResNet, no image stream).
        joint_encoder: price the encoder as OFA's fused one, `text_layers` deep (default: when
        the model is not `decomposed`).
        """
        joint_encoder = not self.decomposed if joint_encoder is None else joint_encoder
        if text_len < 1:
            raise ValueError(f"text length must be >= 1, got {text_len}")
        for name, value in (("image", image_layers), ("text", text_layers)):
            if not 0 <= int(value) <= self.encoder_layers:
                raise ValueError(f"{name} exit layer {value} is outside 0..{self.encoder_layers}")
        has_image = int(image_layers) > 0
        patches = self.num_patches if has_image else 0
        memory_len = patches + text_len
        parts: Dict[str, float] = {"resnet": float(self.image_embedding_flops(has_image))}
        if joint_encoder:
            parts["joint_encoder"] = float(
                text_layers * encoder_layer_flops(memory_len, self.embed_dim, self.ffn_dim)
            )
        else:
            parts["image_stream"] = float(self.encoder_stream_flops(patches, int(image_layers)))
            parts["text_stream"] = float(self.encoder_stream_flops(text_len, int(text_layers)))
        decoder = self.decoder_flops(decoder_exit_layers, memory_len)
        parts["decoder_layers"] = float(decoder["decoder_layers"] * self.beam)
        parts["cross_kv"] = float(decoder["cross_kv"] * self.beam)
        parts["output_projection"] = float(decoder["output_projection"] * self.beam)
        parts["exit_extras"] = float(decoder["exit_extras"] * self.beam)
        encoder_bias = self.encoder_position_bias_flops(text_len, has_image, joint_encoder)
        parts["encoder_position_bias"] = encoder_bias / batch_size
        parts["decoder_position_bias"] = (self.decoder_shared_flops(len(decoder_exit_layers)) / batch_size
                                          + decoder["position_bias_row"] * self.beam)
        return parts

    def full_depth_flops(self, text_len: int, num_tokens: int, has_image: bool = True,
                         batch_size: int = 1, joint_encoder: Optional[bool] = None) -> Dict[str, float]:
        """The same sample with every stream and token at full depth and no exit extras."""
        reference = replace(self, kv_policy="copy", exit_policy="static")
        layers = self.encoder_layers
        return reference.sample_flops(
            text_len, layers if has_image else 0, layers, [self.decoder_layers] * num_tokens,
            batch_size=batch_size, joint_encoder=joint_encoder,
        )
