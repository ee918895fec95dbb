"""OFA's SNLI-VE evaluation: score every candidate answer with one teacher-forced decoder pass.

The encoder runs once per batch; its output is repeated for each candidate.
Each candidate row is the sample's decoder prompt followed by the answer tokens
(row = sample * n_answers + answer); the target is the prompt shifted by one,
the answer and eos. Logits outside the answer trie are set to -inf before the
log-softmax, and a candidate's score is the sum of its answer (and eos)
log-probabilities; prompt positions (no allowed token) and padding count 0.
"""

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq.data import data_utils

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_dataset import collate_bool_masks


def answer_constraint_masks(answers: Sequence[torch.Tensor], trie: AnswerTrie, vocab_size: int) -> List[torch.Tensor]:
    """Per answer, a (len(answer) + 1) x V mask of the tokens the trie allows at each answer step."""
    masks = []
    for answer in answers:
        mask = torch.zeros((len(answer) + 1, vocab_size), dtype=torch.bool)
        for i in range(len(answer) + 1):
            mask[i, trie.next_tokens(answer[:i].tolist())] = True
        masks.append(mask)
    return masks


def build_candidate_batch(
    decoder_prompts: Sequence[Sequence[int]],
    answers: Sequence[torch.Tensor],
    answer_masks: Sequence[torch.Tensor],
    pad: int,
    eos: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prev_output_tokens, targets, constraint_masks) of every (sample, answer) pair, right-padded."""
    prev_items, target_items, mask_items = [], [], []
    eos_item = torch.tensor([eos])
    for prompt in decoder_prompts:
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        for answer, answer_mask in zip(answers, answer_masks):
            prev_items.append(torch.cat([prompt, answer]))
            target_items.append(torch.cat([prompt[1:], answer, eos_item]))
            prompt_rows = answer_mask.new_zeros((len(prompt) - 1, answer_mask.size(1)))
            mask_items.append(torch.cat([prompt_rows, answer_mask], dim=0))
    prev_output = data_utils.collate_tokens(prev_items, pad, eos_idx=eos)
    targets = data_utils.collate_tokens(target_items, pad, eos_idx=eos)
    return prev_output, targets, collate_bool_masks(mask_items)


@torch.no_grad()
def score_snli_ve_candidates(
    model,
    sample: Dict[str, Any],
    answers: Sequence[torch.Tensor],
    answer_trie: AnswerTrie,
    pad: int,
    eos: int,
    answers_per_pass: int = 20,
    encoder_out: Optional[Dict[str, List[torch.Tensor]]] = None,
    decoder_exit_layers: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """B x len(answers) summed log-probabilities of each answer, as OFA's ``eval_snli_ve`` computes them.

    ``model`` follows OFA's signatures: ``model.encoder(src_tokens, src_lengths=,
    patch_images=, patch_masks=)``, ``model.encoder.reorder_encoder_out`` and
    ``model.decoder(prev_output_tokens, encoder_out=)`` -> (logits, extra).
    ``answers_per_pass`` answers share one decoder pass (OFA's ``valid_batch_size``).
    ``encoder_out`` may be given to reuse an encoder output of this batch.
    With a MuE decoder, the candidates of a sample form one exit group (they stop at the same
    layer, so their scores stay comparable; entropy, confidence and patience judge the prediction of
    the first answer token over the tokens that may start an answer); each pass appends the (B,) decoder layers run to
    ``decoder_exit_layers`` when a list is given.
    """
    net_input = sample["net_input"]
    src_tokens = net_input["src_tokens"]
    device = src_tokens.device
    if encoder_out is None:
        encoder_out = model.encoder(
            src_tokens,
            src_lengths=net_input["src_lengths"],
            patch_images=net_input["patch_images"],
            patch_masks=net_input["patch_masks"],
        )
    vocab_size = len(model.decoder.dictionary)
    answer_masks = answer_constraint_masks(answers, answer_trie, vocab_size)
    batch_size = src_tokens.size(0)

    # The tokens that may start an answer: what prediction-based exits judge (a classifier's classes).
    first_answer_tokens = torch.tensor(answer_trie.next_tokens([]), dtype=torch.long, device=device)
    results = []
    for start in range(0, len(answers), answers_per_pass):
        chunk = list(answers[start : start + answers_per_pass])
        chunk_masks = answer_masks[start : start + answers_per_pass]
        prev_output, targets, masks = build_candidate_batch(sample["decoder_prompts"], chunk, chunk_masks, pad, eos)
        prev_output, targets, masks = prev_output.to(device), targets.to(device), masks.to(device)
        new_order = torch.arange(batch_size, device=device).repeat_interleave(len(chunk))
        repeated = model.encoder.reorder_encoder_out(encoder_out, new_order)
        if getattr(model.decoder, "supports_exits", False):
            # Prediction-based exits judge the prediction of the first answer token (last prompt position).
            positions = torch.tensor([len(prompt) - 1 for prompt in sample["decoder_prompts"]], device=device)
            features, extra = model.decoder(prev_output, encoder_out=repeated, exit_groups=new_order,
                                            exit_positions=positions.repeat_interleave(len(chunk)),
                                            exit_vocabulary=first_answer_tokens, features_only=True)
            if decoder_exit_layers is not None:
                decoder_exit_layers.append(extra["exit_layers"][0].view(batch_size, len(chunk))[:, 0])
        else:
            features, extra = model.decoder(prev_output, encoder_out=repeated, features_only=True)
        # Only answer positions are scored (prompt and pad positions count 0, as in OFA, which
        # projects every position), and only onto the tokens the trie allows somewhere in this pass:
        # every other logit is -inf in OFA's protocol, so the log-softmax over the allowed tokens is
        # the same number at a fraction of the 59,457-word projection.
        scored = masks.any(dim=2) & targets.ne(pad)
        allowed = masks[scored]
        vocabulary = allowed.any(dim=0).nonzero().squeeze(1)
        weight = model.decoder.output_projection.weight.index_select(0, vocabulary)
        logits = F.linear(features[scored], weight).masked_fill(~allowed[:, vocabulary], -math.inf)
        lprobs = model.get_normalized_probs((logits.unsqueeze(1), extra), log_probs=True).squeeze(1)
        column = torch.full((allowed.size(1),), -1, dtype=torch.long, device=device)
        column[vocabulary] = torch.arange(vocabulary.numel(), device=device)
        target_columns = column[targets[scored]]
        picked = lprobs.gather(dim=-1, index=target_columns.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = features.new_zeros(targets.shape, dtype=lprobs.dtype)
        scores[scored] = picked.masked_fill(target_columns < 0, -math.inf)  # a target the trie forbids
        results.append(scores.sum(dim=1).view(batch_size, len(chunk)))
    return torch.cat(results, dim=1)


def best_answers_with_exits(
    model, sample: Dict[str, Any], score_answers: Callable, index2ans: Mapping[int, str]
) -> Tuple[List[str], List[int], List[int], List[List[int]]]:
    """(answers, image layers, text layers, decoder layers) per sample: the best-scoring candidate and,
    for a MuE model, where its streams and its answer tokens stopped (full depth otherwise).

    ``score_answers(model, sample, encoder_out=, decoder_exit_layers=)`` gives B x n_answers scores
    (the task's); the encoder runs once here and its exit record is read.
    """
    net_input = {k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
    encoder_out = model.encoder(**net_input)
    decoder_layers: List[torch.Tensor] = []
    scores = score_answers(model, sample, encoder_out=encoder_out, decoder_exit_layers=decoder_layers)
    answers = [index2ans[i] for i in scores.argmax(dim=1).tolist()]
    rows = len(answers)
    encoder_depth, decoder_depth = model.args.encoder_layers, model.args.decoder_layers
    recorded = encoder_out.get("exit_layers") or [None]
    if recorded[0] is not None:
        image_layers, text_layers = (list(column) for column in zip(*recorded[0].tolist()))
    else:
        image_layers, text_layers = [encoder_depth] * rows, [encoder_depth] * rows
    # Candidates of a sample stop together: one decoder depth per sample, counted per answer pass.
    passes = [layers.tolist() for layers in decoder_layers] or [[decoder_depth] * rows]
    per_sample = [[int(layers[row]) for layers in passes] for row in range(rows)]
    return answers, image_layers, text_layers, per_sample
