"""The output head is one 2-D product, whether or not the shared embedding is frozen.

A checkpoint trained with OFA's --freeze-encoder-embedding / --freeze-decoder-embedding stores a
weight that needs no gradient. For a decoding step's [rows, 1, C] features (a transposed view),
torch's matmul then broadcasts the whole vocabulary matrix into a batched product instead of folding
the rows: 5-10x slower decoding and other roundings than the same checkpoint unfrozen.
"""
import pytest
import torch

from mue_fairseq.ofa.model import OFAModel
from tiny_models import TinyTask, tiny_args, tiny_dictionary


@pytest.mark.parametrize("frozen", [False, True])
def test_output_layer_folds_step_rows_into_one_matrix_product(frozen):
    dictionary = tiny_dictionary(size=300)
    torch.manual_seed(0)
    args = tiny_args("ofa_tiny", freeze_encoder_embedding=frozen, freeze_decoder_embedding=frozen)
    model = OFAModel.build_model(args, TinyTask(dictionary)).eval()
    head = model.decoder.output_projection
    assert head.weight.requires_grad is not frozen

    seen_inputs = []
    head.register_forward_pre_hook(lambda module, inputs: seen_inputs.append(inputs[0]))
    # One decoding step of 7 rows, laid out as the decoder leaves it: time-first, then transposed.
    features = torch.randn(1, 7, head.in_features).transpose(0, 1)
    with torch.no_grad():
        logits = model.decoder.output_layer(features)

    assert [tuple(x.shape) for x in seen_inputs] == [(7, head.in_features)]
    assert logits.shape == (7, 1, len(dictionary))
    expected = features.reshape(7, -1) @ head.weight.detach().t()
    # A 32-term float32 dot product in any summation order: error below 32 * 2**-24 of the sum of
    # |terms|, which is at most 32 * max|feature| * max|weight|.
    bound = 32 * 2.0 ** -24 * 32 * features.abs().max().item() * head.weight.abs().max().item()
    torch.testing.assert_close(logits.view(7, -1), expected, rtol=0, atol=bound)
