"""Criteria: OFA's `adjust_label_smoothed_cross_entropy` and MuE's layer-wise `mue_layerwise_ce`.

References are computed here token by token from the formulas, independently of the criteria.
"""
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.logging import metrics
from torch import nn

import mue_fairseq  # noqa: F401  (registers the core model)
from mue_fairseq.criterions.label_smoothed_ce import AdjustLabelSmoothedCrossEntropyCriterion
from mue_fairseq.criterions.layerwise_ce import LayerwiseCrossEntropyCriterion
from mue_fairseq.ofa.model import OFAModel, ofa_tiny_architecture

torch.set_num_threads(1)
PAD, EOS = 1, 2
NUM_DECODER_LAYERS = 3


class FakeTask:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = self.target_dictionary = self.tgt_dict = dictionary


def tiny_dictionary(num_words: int = 50) -> Dictionary:
    dictionary = Dictionary()
    for i in range(num_words):
        dictionary.add_symbol(f"w{i}")
    return dictionary


def build_tiny_ofa(dictionary: Dictionary, decoder_layers: int = NUM_DECODER_LAYERS) -> OFAModel:
    torch.manual_seed(0)
    args = Namespace(
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        decoder_layers=decoder_layers,
        decoder_attention_heads=4,
        resnet_type="resnet18",
        token_bucket_size=16,
        image_bucket_size=8,
        scale_attn=True,
        scale_fc=True,
        scale_heads=True,
        disable_entangle=True,
    )
    ofa_tiny_architecture(args)
    model = OFAModel.build_model(args, FakeTask(dictionary))
    with torch.no_grad():  # spread the logits so that tokens and layers differ clearly
        model.encoder.embed_tokens.weight.normal_(0, 0.5)
        model.encoder.embed_tokens.weight[PAD] = 0
        for layer in model.decoder.layers:
            layer.fc2.weight.normal_(0, 0.3)
    return model.eval()


def make_batch(vocab_size: int, constraint: bool = False) -> dict:
    generator = torch.Generator().manual_seed(1)
    src_tokens = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1], [0, 10, 2, 1, 1]])
    lengths = [5, 3, 1]
    target = torch.full((3, 6), PAD)
    for row, length in enumerate(lengths):
        target[row, :length] = torch.randint(4, vocab_size, (length,), generator=generator)
        target[row, length] = EOS
    prev_output_tokens = torch.cat([torch.zeros(3, 1, dtype=torch.long), target[:, :-1]], dim=1)
    prev_output_tokens[prev_output_tokens.eq(EOS)] = PAD
    sample = {
        "id": torch.arange(3),
        "nsentences": 3,
        "ntokens": int(target.ne(PAD).sum()),
        "net_input": {
            "src_tokens": src_tokens,
            "src_lengths": src_tokens.ne(PAD).sum(1),
            "patch_images": torch.randn(3, 3, 64, 64, generator=generator),
            "patch_masks": torch.ones(3, dtype=torch.bool),
            "prev_output_tokens": prev_output_tokens,
        },
        "target": target,
    }
    if constraint:
        masks = torch.rand(3, 6, vocab_size, generator=generator) < 0.3
        masks.scatter_(2, target.unsqueeze(-1), True)
        sample["constraint_masks"] = masks
    return sample


def num(value) -> float:
    """A Python float of a number or a (possibly grad-requiring) scalar tensor."""
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def criterion_args(**overrides) -> dict:
    args = dict(sentence_avg=False, label_smoothing=0.0)
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def dictionary():
    return tiny_dictionary()


@pytest.fixture(scope="module")
def task(dictionary):
    return FakeTask(dictionary)


@pytest.fixture(scope="module")
def model(dictionary):
    return build_tiny_ofa(dictionary)


@pytest.fixture(scope="module")
def model64(dictionary):
    """The same tiny model in float64, where gradient identities hold to rounding on any CPU."""
    return build_tiny_ofa(dictionary).double()


# --------------------------------------------------------------------------- references
def reference_token_loss(lprobs: torch.Tensor, target: int, eps: float, allowed=None):
    """OFA's smoothed loss of one token: lprobs (V) over the allowed tokens (all when None)."""
    if allowed is None:
        eps_i = eps / (lprobs.numel() - 1)
        smooth = -lprobs.sum()
    else:
        eps_i = eps / (int(allowed.sum()) - 1 + 1e-6)
        smooth = -lprobs[allowed].sum()
    nll = -lprobs[target]
    return num((1 - eps - eps_i) * nll + eps_i * smooth), num(nll)


def reference_loss(logits, target, eps=0.0, masks=None, keep_ratio=None, ignore=None):
    """(loss sum, nll sum, kept) of B x T x V logits: each non-pad token's loss, worst dropped if asked."""
    losses = []
    for b in range(target.size(0)):
        for t in range(target.size(1)):
            if target[b, t] == PAD or (ignore is not None and ignore[b, t]):
                continue
            row = logits[b, t]
            allowed = masks[b, t] if masks is not None else None
            if allowed is not None:
                row = row.masked_fill(~allowed, -math.inf)
            losses.append(reference_token_loss(F.log_softmax(row.double(), -1), int(target[b, t]), eps, allowed))
    if keep_ratio is not None:
        losses = sorted(losses)[: int(len(losses) * keep_ratio)]
    return sum(l for l, _ in losses), sum(n for _, n in losses), len(losses)


def layer_logits_direct(model, sample):
    """Full B x T x V logits of every decoder layer, from the model's own modules."""
    _, extra = model(**sample["net_input"], features_only=True)
    decoder = model.decoder
    return [decoder.output_layer(decoder.layer_norm(h.transpose(0, 1))) for h in extra["inner_states"][1:]]


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def in_float64(sample: dict) -> dict:
    from fairseq import utils

    return utils.apply_to_sample(lambda t: t.double() if t.is_floating_point() else t, sample)


def assert_gradients_equal(ours: dict, reference: dict, rel: float = 1e-5) -> None:
    """Gradients computed two mathematically equal ways (the model in float64).

    fairseq's log-softmax still runs in float32, so every gradient carries a rounding error of a
    few float32 epsilons (1.2e-7) of the magnitudes that flow into it; measured: at most 1.3e-7 of a
    tensor's largest entry. An entry is therefore compared at `rel` (about 100 epsilons) of its
    tensor's scale, and that scale is at least 1% of the model's largest gradient: some tensors'
    gradients are zero in exact arithmetic (attention key biases: softmax ignores a shift), so
    what is left in them is rounding from upstream terms of the model's scale. A real difference
    (a wrong layer weight) moves gradients by a sizeable fraction of their scale.
    """
    assert ours.keys() == reference.keys()
    model_scale = max(float(grad.abs().max()) for grad in reference.values())
    for name, grad in reference.items():
        assert grad.dtype == torch.float64
        scale = max(float(grad.abs().max()), 1e-2 * model_scale)
        torch.testing.assert_close(ours[name], grad, rtol=0, atol=rel * scale, msg=name)


# --------------------------------------------------------------------------- layer-wise criterion
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_per_layer_losses_equal_direct_computation(model, task, eps):
    sample = make_batch(len(task.target_dictionary))
    criterion = LayerwiseCrossEntropyCriterion(task, **criterion_args(label_smoothing=eps, report_accuracy=True))
    loss, sample_size, log = criterion(model, sample)
    with torch.no_grad():
        logits = layer_logits_direct(model, sample)
    references = [reference_loss(layer, sample["target"], eps) for layer in logits]
    assert sample_size == int(sample["target"].ne(PAD).sum()) == references[0][2]
    for layer, (ref_loss, ref_nll, _) in enumerate(references, start=1):
        assert num(log[f"loss_layer{layer}"]) == pytest.approx(ref_loss, rel=1e-5)
        assert num(log[f"nll_loss_layer{layer}"]) == pytest.approx(ref_nll, rel=1e-5)
        mask = sample["target"].ne(PAD)
        correct = int(logits[layer - 1].argmax(-1)[mask].eq(sample["target"][mask]).sum())
        assert int(log[f"n_correct_layer{layer}"]) == correct
        assert log[f"total_layer{layer}"] == sample_size
    per_layer = [r[0] for r in references]
    assert num(loss) == pytest.approx(sum(per_layer) / NUM_DECODER_LAYERS, rel=1e-5)
    assert len(set(round(v, 3) for v in per_layer)) == NUM_DECODER_LAYERS, "layers should differ"


def test_reductions_and_weights(model, model64, task):
    sample = make_batch(len(task.target_dictionary))
    mean_crit = LayerwiseCrossEntropyCriterion(task, **criterion_args(label_smoothing=0.1))
    sum_crit = LayerwiseCrossEntropyCriterion(task, **criterion_args(label_smoothing=0.1, layer_reduction="sum"))
    weighted = LayerwiseCrossEntropyCriterion(task, **criterion_args(label_smoothing=0.1, layer_weights="0.5,0,2"))

    mean_loss, _, log = mean_crit(model, sample)
    per_layer = [num(log[f"loss_layer{i}"]) for i in range(1, NUM_DECODER_LAYERS + 1)]
    sum_loss, _, _ = sum_crit(model, sample)
    weighted_loss, _, weighted_log = weighted(model, sample)

    assert num(mean_loss) == pytest.approx(sum(per_layer) / NUM_DECODER_LAYERS, rel=1e-6)
    assert num(sum_loss) == pytest.approx(sum(per_layer), rel=1e-6)
    assert num(weighted_loss) == pytest.approx(0.5 * per_layer[0] + 2 * per_layer[2], rel=1e-6)
    assert weighted_log["sample_size_layer2"] == 0 and num(weighted_log["loss_layer2"]) == 0
    assert num(weighted_log["loss_layer1"]) == pytest.approx(per_layer[0], rel=1e-6)

    sample64 = in_float64(sample)
    mean_grads = gradients(model64, mean_crit(model64, sample64)[0])
    sum_grads = gradients(model64, sum_crit(model64, sample64)[0])
    assert_gradients_equal(sum_grads, {name: grad * NUM_DECODER_LAYERS for name, grad in mean_grads.items()})

    with pytest.raises(ValueError, match="--layer-weights has 2 values but the decoder has 3 layers"):
        LayerwiseCrossEntropyCriterion(task, **criterion_args(layer_weights="1,1"))(model, sample)
    with pytest.raises(ValueError, match="--layer-weights"):
        LayerwiseCrossEntropyCriterion(task, **criterion_args(layer_weights="0,a,1"))


@pytest.mark.parametrize(
    "options, constraint",
    [
        (dict(label_smoothing=0.1, drop_worst_ratio=0.3), False),
        (dict(label_smoothing=0.2), True),
        (dict(label_smoothing=0.1, ignore_eos=True, ignore_prefix_size=1, constraint_range="10,40"), False),
        (dict(use_rdrop=True, reg_alpha=0.5, drop_worst_ratio=0.25), False),
    ],
)
def test_last_layer_only_equals_ofa_criterion(model, model64, task, options, constraint):
    sample = make_batch(len(task.target_dictionary), constraint=constraint)
    args = criterion_args(report_accuracy=True, **options)
    ofa = AdjustLabelSmoothedCrossEntropyCriterion(task, **args)
    last_only = LayerwiseCrossEntropyCriterion(task, layer_weights="0,0,1", **args)

    ofa_loss, ofa_size, ofa_log = ofa(model, sample, update_num=1)
    loss, size, log = last_only(model, sample, update_num=1)
    assert size == ofa_size
    assert num(loss) == pytest.approx(num(ofa_loss), rel=1e-5)
    for key in ("nll_loss", "ntokens", "nsentences", "sample_size", "n_correct", "total"):
        assert num(log[key]) == pytest.approx(num(ofa_log[key]), rel=1e-5), key
    assert log["sample_size_layer1"] == log["sample_size_layer2"] == 0

    sample64 = in_float64(sample)
    ofa_grads = gradients(model64, ofa(model64, sample64, update_num=1)[0])
    grads = gradients(model64, last_only(model64, sample64, update_num=1)[0])
    assert_gradients_equal(grads, ofa_grads)


def test_drop_worst_selects_per_layer(model, task):
    sample = make_batch(len(task.target_dictionary))
    criterion = LayerwiseCrossEntropyCriterion(
        task, **criterion_args(label_smoothing=0.1, drop_worst_ratio=0.4, drop_worst_after=5)
    )
    with torch.no_grad():
        logits = layer_logits_direct(model, sample)
    _, size_before, log_before = criterion(model, sample, update_num=5)
    _, size, log = criterion(model, sample, update_num=6)
    n = int(sample["target"].ne(PAD).sum())
    assert size_before == n and size == int(n * 0.6)
    for layer, layer_logits in enumerate(logits, start=1):
        full = reference_loss(layer_logits, sample["target"], 0.1)
        kept = reference_loss(layer_logits, sample["target"], 0.1, keep_ratio=0.6)
        assert num(log_before[f"loss_layer{layer}"]) == pytest.approx(full[0], rel=1e-5)
        assert num(log[f"loss_layer{layer}"]) == pytest.approx(kept[0], rel=1e-5)


def test_sampled_intermediate_layers_are_unbiased(task):
    model = build_tiny_ofa(task.target_dictionary).train()  # own model: BatchNorm statistics change in training
    sample = make_batch(len(task.target_dictionary))
    full_crit = LayerwiseCrossEntropyCriterion(task, **criterion_args())
    sampled = LayerwiseCrossEntropyCriterion(task, **criterion_args(sampled_intermediate_layers=1))
    full_loss, _, log = full_crit(model, sample)
    per_layer = [num(log[f"loss_layer{i}"]) for i in (1, 2, 3)]
    # one of layers 1, 2 is drawn and weighted 2/3 (= 1/3 * 2 candidates / 1 drawn)
    outcomes = {
        1: per_layer[2] / 3 + 2 * per_layer[0] / 3,
        2: per_layer[2] / 3 + 2 * per_layer[1] / 3,
    }
    assert (outcomes[1] + outcomes[2]) / 2 == pytest.approx(num(full_loss), rel=1e-6)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        loss, _, slog = sampled(model, sample)
        drawn = [i for i in (1, 2) if slog[f"sample_size_layer{i}"] > 0]
        assert len(drawn) == 1 and slog["sample_size_layer3"] > 0
        assert num(loss) == pytest.approx(outcomes[drawn[0]], rel=1e-5)
        seen.add(drawn[0])
    assert seen == {1, 2}
    model.eval()  # validation scores every layer
    assert num(sampled(model, sample)[0]) == pytest.approx(num(full_crit(model, sample)[0]), rel=1e-6)


def test_layer_metrics_are_reduced(model, task):
    sample = make_batch(len(task.target_dictionary))
    criterion = LayerwiseCrossEntropyCriterion(task, **criterion_args(report_accuracy=True))
    logs = [criterion(model, sample)[2], criterion(model, sample)[2]]
    with metrics.aggregate() as agg:
        LayerwiseCrossEntropyCriterion.reduce_metrics(logs)
    for layer in (1, 2, 3):
        expected = 2 * num(logs[0][f"loss_layer{layer}"]) / (2 * logs[0][f"sample_size_layer{layer}"])
        assert agg[f"loss_layer{layer}"].avg == pytest.approx(expected, abs=1e-3)
        accuracy = 100.0 * int(logs[0][f"n_correct_layer{layer}"]) / logs[0][f"total_layer{layer}"]
        assert agg[f"accuracy_layer{layer}"].avg == pytest.approx(accuracy, abs=1e-3)
    smoothed = agg.get_smoothed_values()
    assert smoothed["loss"] == pytest.approx(num(logs[0]["loss"]) / logs[0]["sample_size"], abs=1e-3)
    assert smoothed["ppl"] == pytest.approx(math.exp(smoothed["nll_loss"]), rel=1e-2)


def test_layerwise_on_mue_model():
    """The MuE model in training (decomposed encoder, every decoder layer run) gives per-layer losses."""
    from tiny_models import build_pair

    _, mue, dictionary = build_pair(mue_decoder_threshold=0.5)
    task = FakeTask(dictionary)
    sample = make_batch(len(dictionary))
    criterion = LayerwiseCrossEntropyCriterion(task, **criterion_args(label_smoothing=0.1))
    mue.train()
    loss, _, log = criterion(mue, sample)
    _, extra = mue(**sample["net_input"], features_only=True)
    references = [
        reference_loss(mue.decoder.predict(h).transpose(0, 1).detach(), sample["target"], 0.1)[0]
        for h in extra["inner_states"][1:]
    ]
    for layer, ref in enumerate(references, start=1):
        assert num(log[f"loss_layer{layer}"]) == pytest.approx(ref, rel=1e-5)
    assert num(loss) == pytest.approx(sum(references) / len(references), rel=1e-5)
    mue.eval()  # decoder exits active in evaluation: the per-layer states are not all there
    with pytest.raises(RuntimeError, match="needs the output of every decoder layer"):
        criterion(mue, sample)


# --------------------------------------------------------------------------- OFA formulas, small vocabulary
class LogitsModel(nn.Module):
    """A 'model' whose logits are a learned table indexed by the decoder input tokens."""

    def __init__(self, vocab_size: int):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=generator) * 2)

    def forward(self, prev_output_tokens, **unused):
        return self.table[prev_output_tokens], {}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return F.log_softmax(net_output[0].float(), dim=-1)


def table_logits(model: LogitsModel, sample: dict) -> torch.Tensor:
    return model.table[sample["net_input"]["prev_output_tokens"]].detach()


@pytest.fixture(scope="module")
def small_task():
    return FakeTask(tiny_dictionary(6))  # 10 symbols


def small_sample(constraint_masks=None, conf=None):
    target = torch.tensor([[4, 7, 9, 2, 1], [5, 6, 2, 1, 1]])
    prev = torch.tensor([[0, 4, 7, 9, 1], [0, 5, 6, 1, 1]])
    sample = {
        "ntokens": 7,
        "nsentences": 2,
        "net_input": {"prev_output_tokens": prev},
        "target": target,
    }
    if constraint_masks is not None:
        sample["constraint_masks"] = constraint_masks
    if conf is not None:
        sample["conf"] = conf
    return sample


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_formula(small_task, eps):
    model = LogitsModel(10)
    sample = small_sample()
    loss, size, log = AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args(label_smoothing=eps))(
        model, sample
    )
    ref_loss, ref_nll, n = reference_loss(table_logits(model, sample), sample["target"], eps)
    assert size == n == 7
    assert num(loss) == pytest.approx(ref_loss, rel=1e-6)
    assert num(log["nll_loss"]) == pytest.approx(ref_nll, rel=1e-6)


def test_constraint_masks_restrict_smoothing(small_task):
    model = LogitsModel(10)
    masks = torch.zeros(2, 5, 10, dtype=torch.bool)
    masks[..., [2, 4, 5, 6, 7, 9]] = True
    masks[0, 0, :] = True  # a position where everything is allowed
    sample = small_sample(constraint_masks=masks)
    loss, _, log = AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args(label_smoothing=0.1))(
        model, sample
    )
    logits = table_logits(model, sample)
    ref_loss, ref_nll, _ = reference_loss(logits, sample["target"], 0.1, masks=masks)
    assert num(loss) == pytest.approx(ref_loss, rel=1e-6)
    assert num(log["nll_loss"]) == pytest.approx(ref_nll, rel=1e-6)
    unconstrained, _, _ = reference_loss(logits, sample["target"], 0.1)
    assert abs(ref_loss - unconstrained) > 1e-3


def test_constraint_range(small_task):
    model = LogitsModel(10)
    sample = small_sample()
    sample["target"] = torch.tensor([[4, 5, 2, 1, 1], [5, 4, 5, 2, 1]])
    loss, _, _ = AdjustLabelSmoothedCrossEntropyCriterion(
        small_task, **criterion_args(label_smoothing=0.1, constraint_range="4,6")
    )(model, sample)
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[[0, 1, 2, 3, 4, 5]] = True
    masks = allowed.expand(2, 5, 10)
    ref_loss, _, _ = reference_loss(table_logits(model, sample), sample["target"], 0.1, masks=masks)
    assert num(loss) == pytest.approx(ref_loss, rel=1e-6)
    with pytest.raises(ValueError, match="--constraint-range"):
        AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args(constraint_range="4"))


def test_drop_worst_after_and_ratio(small_task):
    model = LogitsModel(10)
    sample = small_sample()
    criterion = AdjustLabelSmoothedCrossEntropyCriterion(
        small_task, **criterion_args(label_smoothing=0.1, drop_worst_ratio=0.5, drop_worst_after=10)
    )
    logits = table_logits(model, sample)
    loss, size, _ = criterion(model, sample, update_num=10)
    assert size == 7 and num(loss) == pytest.approx(reference_loss(logits, sample["target"], 0.1)[0], rel=1e-6)
    loss, size, log = criterion(model, sample, update_num=11)
    ref_loss, _, kept = reference_loss(logits, sample["target"], 0.1, keep_ratio=0.5)
    assert size == kept == 3 and log["ntokens"] == 7
    assert num(loss) == pytest.approx(ref_loss, rel=1e-6)


def test_ignore_prefix_and_eos(small_task):
    model = LogitsModel(10)
    sample = small_sample()
    logits = table_logits(model, sample)
    ignore = sample["target"].eq(EOS)
    ignore[:, :1] = True
    loss, size, _ = AdjustLabelSmoothedCrossEntropyCriterion(
        small_task, **criterion_args(ignore_eos=True, ignore_prefix_size=1)
    )(model, sample)
    ref_loss, _, n = reference_loss(logits, sample["target"], ignore=ignore)
    assert size == n == 3
    assert num(loss) == pytest.approx(ref_loss, rel=1e-6)


def test_conf_scales_each_sample(small_task):
    model = LogitsModel(10)
    plain = AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args())
    loss, _, _ = plain(model, small_sample(conf=torch.tensor([0.5, 2.0])))
    logits = table_logits(model, small_sample())
    target = small_sample()["target"]
    row0 = reference_loss(logits[:1], target[:1])[0]
    row1 = reference_loss(logits[1:], target[1:])[0]
    assert num(loss) == pytest.approx(0.5 * row0 + 2.0 * row1, rel=1e-6)


def test_rdrop_doubles_batch_and_adds_kl(small_task, model, task):
    # Identical copies (deterministic model): the KL term is 0 and the loss doubles.
    small = LogitsModel(10)
    plain = AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args())
    single, single_size, _ = plain(small, small_sample())
    rdrop = AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args(use_rdrop=True, reg_alpha=3.0))
    loss, size, log = rdrop(small, small_sample())
    assert size == 2 * single_size and log["nsentences"] == 4
    assert num(loss) == pytest.approx(2 * num(single), rel=1e-6)
    # With dropout the copies differ and the KL term is positive.
    sample = make_batch(len(task.target_dictionary))
    noisy = build_tiny_ofa(task.target_dictionary)
    for module in noisy.decoder.modules():
        if hasattr(module, "p") and isinstance(module.p, float):
            module.p = 0.3
    noisy.train()
    torch.manual_seed(0)
    with_kl = AdjustLabelSmoothedCrossEntropyCriterion(task, **criterion_args(use_rdrop=True, reg_alpha=1.0))
    without_kl = AdjustLabelSmoothedCrossEntropyCriterion(task, **criterion_args(use_rdrop=True, reg_alpha=0.0))
    torch.manual_seed(0)
    a = num(with_kl(noisy, sample)[0])
    torch.manual_seed(0)
    b = num(without_kl(noisy, sample)[0])
    assert a > b + 1e-4


def test_accuracy_and_pair_samples(small_task):
    model = LogitsModel(10)
    criterion = AdjustLabelSmoothedCrossEntropyCriterion(small_task, **criterion_args(report_accuracy=True))
    sample = small_sample()
    _, size, log = criterion(model, sample)
    logits = table_logits(model, sample)
    mask = sample["target"].ne(PAD)
    assert log["n_correct"] == int(logits.argmax(-1)[mask].eq(sample["target"][mask]).sum())
    assert log["total"] == 7

    loss, pair_size, pair_log = criterion(model, [small_sample(), small_sample()])
    single, _, _ = criterion(model, small_sample())
    assert pair_size == 1 and pair_log["sample_size_v1"] == size
    assert num(loss) == pytest.approx(2 * num(single) / size, rel=1e-6)


# --------------------------------------------------------------------------- fairseq integration
def test_criteria_build_from_fairseq_command_line(task):
    from fairseq import options
    from fairseq.criterions import build_criterion
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            "--task", "dummy_lm", "--arch", "ofa_tiny", "--criterion", "mue_layerwise_ce",
            "--label-smoothing", "0.1", "--drop-worst-ratio", "0.2", "--drop-worst-after", "6000",
            "--layer-reduction", "sum", "--layer-weights", "1,2,3", "--sampled-intermediate-layers", "1",
        ],
    )
    cfg = convert_namespace_to_omegaconf(args)
    criterion = build_criterion(cfg.criterion, task)
    assert isinstance(criterion, LayerwiseCrossEntropyCriterion)
    assert (criterion.eps, criterion.drop_worst_ratio, criterion.drop_worst_after) == (0.1, 0.2, 6000)
    assert criterion.layer_weights(3) == [1.0, 2.0, 3.0] and criterion.sampled_intermediate_layers == 1


def test_ofa_checkpoint_criterion_reproduces_reference_loss():
    """The caption fixture's recorded criterion section builds our criterion; its loss matches the reference logits."""
    from ofa_fixtures import load_fixture_model, load_reference, require_fixture

    require_fixture("caption")
    import mue_fairseq.tasks  # noqa: F401

    model, cfg, fixture_task = load_fixture_model("caption")
    criterion = fixture_task.build_criterion(cfg.criterion)
    assert isinstance(criterion, AdjustLabelSmoothedCrossEntropyCriterion) and criterion.eps == 0.1
    ref = load_reference("caption")
    target = ref["target"]
    sample = {
        "ntokens": int(target.ne(PAD).sum()),
        "nsentences": target.size(0),
        "target": target,
        "net_input": {
            key: ref[key] for key in ("src_tokens", "src_lengths", "patch_images", "patch_masks", "prev_output_tokens")
        },
    }
    with torch.no_grad():
        loss, size, log = criterion(model, sample, update_num=0)
    ref_loss, ref_nll, n = reference_loss(ref["decoder_logits"], target, eps=0.1)
    assert size == n
    assert num(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert num(log["nll_loss"]) == pytest.approx(-num(ref["target_token_logprobs"].sum()), rel=1e-5)
