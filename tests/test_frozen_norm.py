"""The frozen batch norm of OFA's ResNet: OFA's formula, computed in place when no gradient is needed."""
import torch

from mue_fairseq.ofa.resnet import FrozenBatchNorm2d


def frozen_norm(channels: int = 6) -> FrozenBatchNorm2d:
    norm = FrozenBatchNorm2d(channels)
    generator = torch.Generator().manual_seed(0)
    norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=generator))
    norm.running_mean.copy_(torch.randn(channels, generator=generator))
    norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
    return norm


def ofa_formula(norm: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def test_in_place_without_gradients_is_bit_identical_to_ofa():
    norm = frozen_norm()
    x = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(1))
    expected = ofa_formula(norm, x)
    given = x.clone()
    with torch.no_grad():
        out = norm(given)
    assert out.data_ptr() == given.data_ptr()  # written into the input, no new tensor
    assert torch.equal(out, expected)


def test_input_that_needs_gradients_is_left_alone():
    norm = frozen_norm()
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    before = x.detach().clone()
    out = norm(x)
    assert torch.equal(x.detach(), before)
    assert torch.equal(out.detach(), ofa_formula(norm, before))
    out.sum().backward()
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    assert torch.equal(x.grad, scale.view(1, -1, 1, 1).expand_as(x))
