"""OFA's image backbone: the first three stages of a Bottleneck ResNet (stride 16, 1024 channels).

OFA never uses a fourth stage, pooling or a classifier, and builds every depth (even "resnet18")
from Bottleneck blocks. Module names follow OFA so that `encoder.embed_images.*` keys load as
they are.
"""
from typing import Callable, List, Optional

import torch
from torch import nn

# Blocks per stage for each `--resnet-type` OFA accepts.
RESNET_STAGE_BLOCKS = {
    "resnet18": [2, 2, 2],
    "resnet34": [3, 4, 6],
    "resnet50": [3, 4, 6],
    "resnet101": [3, 4, 23],
    "resnet152": [3, 8, 36],
}


def drop_path(x: torch.Tensor, drop_prob: float, training: bool, batch_dim: int = 0) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescaling the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = [1] * x.dim()
    shape[batch_dim] = x.size(batch_dim)
    keep = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float, batch_dim: int = 0):
        super().__init__()
        self.drop_prob = drop_prob
        self.batch_dim = batch_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.batch_dim)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all stored as buffers (`--freeze-resnet`)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain BatchNorm checkpoint carries a step counter that a frozen norm has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.weight * (self.running_var + self.eps).rsqrt()).view(1, -1, 1, 1)
        shift = (self.bias - self.running_mean * scale.view(-1)).view(1, -1, 1, 1)
        if x.requires_grad:
            return x * scale + shift
        # x is a convolution's fresh output that nothing else reads: scaling it in place gives the
        # same numbers without two new activation-sized tensors (a quarter of the ResNet's time at
        # batch 16 on the CPU, where those activations fall out of cache).
        return x.mul_(scale).add_(shift)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1, with a 4x channel expansion."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        norm_layer: Callable[[int], nn.Module],
        downsample: Optional[nn.Module] = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


class ResNet(nn.Module):
    """Stem (7x7/2 conv, norm, ReLU, 3x3/2 max-pool) and three Bottleneck stages."""

    def __init__(
        self,
        blocks_per_stage: List[int],
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for stage, (width, num_blocks) in enumerate(zip([64, 128, 256], blocks_per_stage), start=1):
            stride = 1 if stage == 1 else 2
            stage_module, in_channels = self._make_stage(
                in_channels, width, num_blocks, stride, norm_layer, drop_path_rate
            )
            self.add_module(f"layer{stage}", stage_module)
        self.out_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_stage(in_channels, width, num_blocks, stride, norm_layer, drop_path_rate):
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_channels),
            )
        # OFA spreads drop-path linearly over the blocks of a stage; its first block has none.
        rates = torch.linspace(0, drop_path_rate, num_blocks).tolist()
        blocks = [Bottleneck(in_channels, width, stride, norm_layer, downsample)]
        blocks += [
            Bottleneck(out_channels, width, 1, norm_layer, drop_path_rate=rates[i])
            for i in range(1, num_blocks)
        ]
        return nn.Sequential(*blocks), out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))


def build_resnet(resnet_type: str, frozen_norm: bool, drop_path_rate: float) -> ResNet:
    if resnet_type not in RESNET_STAGE_BLOCKS:
        raise ValueError(
            f"unknown --resnet-type {resnet_type!r}; OFA knows {sorted(RESNET_STAGE_BLOCKS)}"
        )
    norm_layer = FrozenBatchNorm2d if frozen_norm else None
    return ResNet(RESNET_STAGE_BLOCKS[resnet_type], norm_layer=norm_layer, drop_path_rate=drop_path_rate)
