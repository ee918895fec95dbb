"""Model `ofa` and its architectures `ofa_tiny` ... `ofa_huge`, as OFA registers them.

OFA is a legacy (argparse) fairseq model: its checkpoints store `cfg["model"]` as an
`argparse.Namespace` whose `_name`/`arch` is one of the architectures below, so the same
registry names, option names and defaults are kept here.
"""
import logging
import os
from typing import Optional

import torch
from fairseq import utils
from fairseq.models import FairseqEncoderDecoderModel, register_model, register_model_architecture
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from torch import Tensor

from .decoder import OFADecoder
from .encoder import OFAEmbedding, OFAEncoder
from .resnet import RESNET_STAGE_BLOCKS

logger = logging.getLogger(__name__)

DEFAULT_MAX_POSITIONS = 1024

# (flag, argparse kwargs) of every OFA model option; store_true flags cannot be switched off,
# as in OFA, where the architecture functions set the defaults.
_FLOAT, _INT, _STR, _FLAG = {"type": float}, {"type": int}, {"type": str}, {"action": "store_true"}
OFA_MODEL_OPTIONS = [
    ("--activation-fn", {"choices": utils.get_available_activation_fns()}, "activation function"),
    ("--dropout", _FLOAT, "dropout probability"),
    ("--attention-dropout", _FLOAT, "dropout probability of attention weights"),
    ("--activation-dropout", _FLOAT, "dropout probability after the FFN activation"),
    ("--encoder-embed-path", _STR, "path to pre-trained encoder embeddings"),
    ("--encoder-embed-dim", _INT, "encoder embedding dimension"),
    ("--encoder-ffn-embed-dim", _INT, "encoder FFN dimension"),
    ("--encoder-layers", _INT, "number of encoder layers"),
    ("--encoder-attention-heads", _INT, "number of encoder attention heads"),
    ("--encoder-normalize-before", _FLAG, "layer norm before each encoder block"),
    ("--encoder-learned-pos", _FLAG, "learned encoder positions (always, in OFA)"),
    ("--decoder-embed-path", _STR, "path to pre-trained decoder embeddings"),
    ("--decoder-embed-dim", _INT, "decoder embedding dimension"),
    ("--decoder-ffn-embed-dim", _INT, "decoder FFN dimension"),
    ("--decoder-layers", _INT, "number of decoder layers"),
    ("--decoder-attention-heads", _INT, "number of decoder attention heads"),
    ("--decoder-learned-pos", _FLAG, "learned decoder positions (always, in OFA)"),
    ("--decoder-normalize-before", _FLAG, "layer norm before each decoder block"),
    ("--decoder-output-dim", _INT, "decoder output dimension (must equal the embed dim)"),
    ("--share-decoder-input-output-embed", _FLAG, "tie decoder input and output embeddings"),
    ("--share-all-embeddings", _FLAG, "share encoder, decoder and output embeddings"),
    ("--layernorm-embedding", _FLAG, "layer norm on token embeddings"),
    ("--no-scale-embedding", _FLAG, "do not scale embeddings by sqrt(dim)"),
    ("--encoder-drop-path-rate", _FLOAT, "encoder drop-path rate (linear over layers)"),
    ("--decoder-drop-path-rate", _FLOAT, "decoder drop-path rate (linear over layers)"),
    ("--resnet-drop-path-rate", _FLOAT, "ResNet drop-path rate"),
    ("--token-bucket-size", _INT, "token relative-position bucket size"),
    ("--image-bucket-size", _INT, "image relative-position grid size"),
    ("--attn-scale-factor", _FLOAT, "attention scale factor: q is scaled by (head_dim*f)^-0.5"),
    ("--freeze-resnet", _FLAG, "frozen BatchNorm in the ResNet"),
    ("--freeze-encoder-embedding", _FLAG, "do not train the encoder token embeddings"),
    ("--freeze-decoder-embedding", _FLAG, "do not train the decoder token embeddings"),
    ("--add-type-embedding", _FLAG, "add text/image type embeddings"),
    ("--resnet-type", {"choices": sorted(RESNET_STAGE_BLOCKS)}, "ResNet backbone depth"),
    ("--resnet-model-path", _STR, "optional ResNet weights to load at build time"),
    ("--code-image-size", _INT, "image-code grid size (image generation)"),
    ("--patch-layernorm-embedding", _FLAG, "layer norm on patch embeddings"),
    ("--code-layernorm-embedding", _FLAG, "layer norm on code embeddings"),
    ("--entangle-position-embedding", _FLAG, "add positions to encoder embeddings"),
    ("--disable-entangle", _FLAG, "do not add positions to decoder embeddings"),
    ("--sync-bn", _FLAG, "synchronised BatchNorm (not supported)"),
    ("--scale-attn", _FLAG, "layer norm after attention (attn_ln)"),
    ("--scale-fc", _FLAG, "layer norm inside the FFN (ffn_layernorm)"),
    ("--scale-heads", _FLAG, "learned per-head output scales (c_attn)"),
    ("--scale-resids", _FLAG, "learned FFN residual scale (w_resid)"),
    ("--max-source-positions", _INT, "maximum source length"),
    ("--max-target-positions", _INT, "maximum target length"),
    ("--pooler-dropout", _FLOAT, "classification-head dropout (unused by these tasks)"),
    ("--pooler-classifier", {"choices": ["mlp", "linear"]}, "classification-head type (unused)"),
    ("--pooler-activation-fn", {"choices": utils.get_available_activation_fns()}, "classification-head activation"),
]
# Model options of this plugin, not OFA's (an OFA checkpoint's config simply lacks them).
PLUGIN_MODEL_OPTIONS = [
    ("--freeze-resnet-weights", _FLAG,
     "do not train the ResNet's weights: a pre-trained backbone (--resnet-model-path) stays a fixed feature "
     "extractor; in a small model, Adam's per-parameter steps on the ResNet's tiny gradients erase it"),
    ("--freeze-encoder-layers-updates", {"type": int, "default": 0},
     "the encoder's transformer layers get no weight updates during the first N updates (the embeddings, the "
     "image projection and the decoder still train). Trained from scratch, the decoder first learns the "
     "caption language, and meanwhile the encoder layers wash the picture out of the image stream; held "
     "fixed, they pass it through until the decoder reads it. 0 = off (OFA's behaviour)"),
]


@register_model("ofa")
class OFAModel(FairseqEncoderDecoderModel):
    """OFA: a ResNet + transformer encoder over [image; text] and a transformer decoder."""

    def __init__(self, args, encoder: OFAEncoder, decoder: OFADecoder):
        super().__init__(encoder, decoder)
        self.args = args
        self.apply(init_bert_params)
        self.eos = encoder.dictionary.eos()
        self.num_updates = 0  # set by fairseq's trainer before each training step

    @staticmethod
    def add_args(parser):
        for flag, kwargs, help_text in OFA_MODEL_OPTIONS + PLUGIN_MODEL_OPTIONS:
            parser.add_argument(flag, help=help_text, **kwargs)

    @classmethod
    def build_model(cls, args, task):
        ofa_large_architecture(args)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        if args.share_all_embeddings and src_dict != tgt_dict:
            raise ValueError("--share-all-embeddings requires a joined dictionary")
        encoder_embed = OFAEmbedding(len(src_dict), args.encoder_embed_dim, src_dict.pad())
        if args.share_all_embeddings:
            decoder_embed = encoder_embed
            args.share_decoder_input_output_embed = True
        else:
            decoder_embed = OFAEmbedding(len(tgt_dict), args.decoder_embed_dim, tgt_dict.pad())
        if getattr(args, "freeze_encoder_embedding", False):
            encoder_embed.weight.requires_grad = False
        if getattr(args, "freeze_decoder_embedding", False):
            decoder_embed.weight.requires_grad = False
        encoder = cls.build_encoder(args, src_dict, encoder_embed)
        decoder = cls.build_decoder(args, tgt_dict, decoder_embed)
        if getattr(args, "resnet_model_path", None):
            cls.load_resnet_weights(encoder, args.resnet_model_path)
        if getattr(args, "freeze_resnet_weights", False):
            encoder.embed_images.requires_grad_(False)
        cls.check_encoder_hold(args)
        return cls(args, encoder, decoder)

    @staticmethod
    def check_encoder_hold(args) -> None:
        """Refuse --freeze-encoder-layers-updates settings that training would get wrong."""
        hold = getattr(args, "freeze_encoder_layers_updates", 0) or 0
        if hold < 0:
            raise ValueError(f"--freeze-encoder-layers-updates must be >= 0, got {hold}")
        if not hold:
            return
        if getattr(args, "distributed_world_size", 1) > 1 and not getattr(args, "find_unused_parameters", False):
            raise ValueError("--freeze-encoder-layers-updates with several processes needs --find-unused-parameters: "
                             "DDP must not wait for the held layers' gradients")
        half = [flag for flag in ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16")
                if getattr(args, flag, False)]
        if half:
            raise ValueError(f"--freeze-encoder-layers-updates does not work with --{half[0].replace('_', '-')}: "
                             "fairseq's half-precision optimizers copy gradients by the parameters that need "
                             "them, and the held layers change that set during training; train in float32")

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def hold_encoder_layers(self) -> None:
        """Switch the encoder layers' gradients off inside the --freeze-encoder-layers-updates window.

        Done at forward time, not at build time: fairseq builds the optimizer over the parameters
        that need gradients then, and the layers must be in it for when the window ends. Without a
        gradient a parameter is skipped by the optimizer (no step, no weight decay)."""
        hold = getattr(self.args, "freeze_encoder_layers_updates", 0) or 0
        if hold:
            self.encoder.layers.requires_grad_(self.num_updates >= hold)

    @staticmethod
    def load_resnet_weights(encoder: OFAEncoder, path: str) -> None:
        """Initialise the ResNet from a state dict of its own keys (`--resnet-model-path`)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resnet-model-path {path}: no such file")
        state = torch.load(path, map_location="cpu")
        try:
            encoder.embed_images.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"--resnet-model-path {path}: not weights of this --resnet-type ({err})") from err

    @classmethod
    def build_encoder(cls, args, dictionary, embed_tokens) -> OFAEncoder:
        return OFAEncoder(args, dictionary, embed_tokens)

    @classmethod
    def build_decoder(cls, args, dictionary, embed_tokens) -> OFADecoder:
        return OFADecoder(args, dictionary, embed_tokens)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Tensor,
        prev_output_tokens: Tensor,
        patch_images: Optional[Tensor] = None,
        patch_images_2: Optional[Tensor] = None,
        patch_masks: Optional[Tensor] = None,
        code_masks: Optional[Tensor] = None,
        sample_patch_num: Optional[int] = None,
        features_only: bool = False,
        classification_head_name: Optional[str] = None,
        token_embeddings: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        if classification_head_name is not None:
            raise NotImplementedError("OFA classification heads are not supported by mue-fairseq")
        if self.training:
            self.hold_encoder_layers()
        encoder_out = self.encoder(
            src_tokens, src_lengths=src_lengths, token_embeddings=token_embeddings,
            patch_images=patch_images, patch_images_2=patch_images_2, patch_masks=patch_masks,
            sample_patch_num=sample_patch_num, return_all_hiddens=return_all_hiddens,
        )
        return self.decoder(
            prev_output_tokens, code_masks=code_masks, encoder_out=encoder_out, src_lengths=src_lengths,
            features_only=features_only, return_all_hiddens=return_all_hiddens,
            alignment_layer=alignment_layer, alignment_heads=alignment_heads,
        )

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        prefix = f"{name}." if name else ""
        key = f"{prefix}encoder.embed_tokens.weight"
        if key in state_dict and state_dict[key].size(0) != len(self.encoder.dictionary):
            raise ValueError(
                f"checkpoint key {key} has {state_dict[key].size(0)} rows but the task dictionary has "
                f"{len(self.encoder.dictionary)} entries: the checkpoint was trained with another "
                "dictionary (check --bpe-dir, --code-dict-size and --num-bins)"
            )


def _setdefault(args, name: str, value):
    if getattr(args, name, None) is None:
        setattr(args, name, value)


@register_model_architecture("ofa", "ofa_large")
def ofa_large_architecture(args):
    _setdefault(args, "encoder_embed_dim", 1024)
    _setdefault(args, "encoder_ffn_embed_dim", 4 * args.encoder_embed_dim)
    _setdefault(args, "encoder_layers", 12)
    _setdefault(args, "encoder_attention_heads", 16)
    _setdefault(args, "decoder_embed_dim", args.encoder_embed_dim)
    _setdefault(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    _setdefault(args, "decoder_layers", 12)
    _setdefault(args, "decoder_attention_heads", 16)
    _setdefault(args, "resnet_type", "resnet152")
    for name, value in {
        "encoder_normalize_before": True,
        "encoder_learned_pos": True,
        "decoder_normalize_before": True,
        "decoder_learned_pos": True,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "relu_dropout": 0.0,
        "dropout": 0.0,
        "max_source_positions": DEFAULT_MAX_POSITIONS,
        "max_target_positions": DEFAULT_MAX_POSITIONS,
        "share_decoder_input_output_embed": True,
        "share_all_embeddings": True,
        "no_scale_embedding": True,
        "layernorm_embedding": True,
        "activation_fn": "gelu",
        "pooler_activation_fn": "tanh",
        "pooler_dropout": 0.0,
        "pooler_classifier": "mlp",
        "resnet_drop_path_rate": 0.0,
        "encoder_drop_path_rate": 0.0,
        "decoder_drop_path_rate": 0.0,
        "token_bucket_size": 256,
        "image_bucket_size": 42,
        "freeze_resnet_weights": False,
        "freeze_encoder_layers_updates": 0,
        "freeze_encoder_embedding": False,
        "freeze_decoder_embedding": False,
        "add_type_embedding": True,
        "attn_scale_factor": 2,
        "code_image_size": 128,
        "patch_layernorm_embedding": True,
        "code_layernorm_embedding": True,
        "entangle_position_embedding": False,
        "disable_entangle": False,
        "sync_bn": False,
        "scale_attn": False,
        "scale_fc": False,
        "scale_heads": False,
        "scale_resids": False,
    }.items():
        _setdefault(args, name, value)
    _setdefault(args, "decoder_output_dim", args.decoder_embed_dim)
    _setdefault(args, "decoder_input_dim", args.decoder_embed_dim)


def _preset(encoder_embed_dim, layers, heads, resnet_type, encoder_layers=None):
    def architecture(args):
        _setdefault(args, "encoder_embed_dim", encoder_embed_dim)
        _setdefault(args, "encoder_ffn_embed_dim", 4 * encoder_embed_dim)
        _setdefault(args, "encoder_layers", encoder_layers or layers)
        _setdefault(args, "encoder_attention_heads", heads)
        _setdefault(args, "decoder_layers", layers)
        _setdefault(args, "decoder_attention_heads", heads)
        _setdefault(args, "resnet_type", resnet_type)
        ofa_large_architecture(args)

    return architecture


ofa_tiny_architecture = register_model_architecture("ofa", "ofa_tiny")(_preset(256, 4, 4, "resnet50"))
ofa_medium_architecture = register_model_architecture("ofa", "ofa_medium")(_preset(512, 4, 8, "resnet101"))
ofa_base_architecture = register_model_architecture("ofa", "ofa_base")(_preset(768, 6, 12, "resnet101"))
ofa_huge_architecture = register_model_architecture("ofa", "ofa_huge")(
    _preset(1280, 12, 16, "resnet152", encoder_layers=24)
)
