"""Tiny OFA / MuE models built in the test itself (no checkpoint needed)."""
import argparse
from typing import Tuple

import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY

import mue_fairseq  # noqa: F401  (registers the plugin)
from mue_fairseq.models.mue_ofa import MuEOFAModel
from mue_fairseq.ofa.model import OFAModel

IMAGE_SIZE = 64  # ResNet stride 16 -> a 4 x 4 patch grid


class TinyTask:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def tiny_dictionary(size: int = 60) -> Dictionary:
    dictionary = Dictionary()
    for i in range(size):
        dictionary.add_symbol(f"w{i}")
    return dictionary


def tiny_args(arch: str = "ofa_tiny", **overrides) -> argparse.Namespace:
    args = argparse.Namespace(
        arch=arch, _name=arch, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_layers=3,
        encoder_attention_heads=4, decoder_layers=3, decoder_attention_heads=4, resnet_type="resnet18",
        token_bucket_size=32, image_bucket_size=8, scale_attn=True, scale_fc=True, scale_heads=True,
        disable_entangle=True, dropout=0.0, **overrides,
    )
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def build_pair(seed: int = 0, **mue_options) -> Tuple[OFAModel, MuEOFAModel, Dictionary]:
    """A tiny OFA model and a MuE model with the same weights (seeded, perturbed away from init)."""
    dictionary = tiny_dictionary()
    torch.manual_seed(seed)
    ofa = OFAModel.build_model(tiny_args("ofa_tiny"), TinyTask(dictionary))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, tensor in ofa.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("version"):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    mue = MuEOFAModel.build_model(tiny_args("mue_ofa_tiny", **mue_options), TinyTask(dictionary))
    mue.load_state_dict(ofa.state_dict(), strict=True)
    return ofa.eval(), mue.eval(), dictionary


def tiny_batch(dictionary: Dictionary, batch: int = 3, seed: int = 0, lengths=None, with_image=None):
    """Right-padded prompts [bos, words..., eos] with random images."""
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or [5 + (i % 3) for i in range(batch)]
    src = torch.full((batch, max(lengths)), dictionary.pad(), dtype=torch.long)
    for i, length in enumerate(lengths):
        words = torch.randint(dictionary.nspecial, len(dictionary), (length - 2,), generator=generator)
        src[i, :length] = torch.cat([torch.tensor([dictionary.bos()]), words, torch.tensor([dictionary.eos()])])
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    masks = torch.ones(batch, dtype=torch.bool) if with_image is None else torch.tensor(with_image)
    return {
        "id": torch.arange(batch),
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.tensor(lengths),
            "patch_images": images,
            "patch_masks": masks,
        },
    }


def select(sample: dict, rows) -> dict:
    """The sub-batch `rows` of a tiny batch, with padding trimmed to its own longest prompt."""
    rows = torch.as_tensor(rows)
    net = sample["net_input"]
    width = int(net["src_lengths"][rows].max())
    return {
        "id": sample["id"][rows],
        "net_input": {
            "src_tokens": net["src_tokens"][rows, :width],
            "src_lengths": net["src_lengths"][rows],
            "patch_images": net["patch_images"][rows],
            "patch_masks": net["patch_masks"][rows],
        },
    }
