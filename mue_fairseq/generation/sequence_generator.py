"""OFA's sequence generator as a thin subclass of fairseq's.

OFA differs from stock fairseq in two ways that matter for these tasks: decoding starts from
bos (not eos), and an optional answer trie or ``--constraint-range start,end`` restricts each
step's logits *before* the log-softmax, so the allowed tokens are renormalised among themselves
(the range keeps the specials 0-3 and ids ``start..end-1``, as OFA's generator does).
"""
import math
from typing import Dict, List, Optional

import torch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from torch import Tensor

from mue_fairseq.generation.ngram_blocking import RepeatedNGramBlocker


class OFAEnsembleModel(EnsembleModel):
    """fairseq's ensemble wrapper with OFA's constraint-trie masking of the last-step logits."""

    def __init__(self, models, constraint_trie=None, constraint_range=None):
        super().__init__(models)
        if constraint_trie is not None and constraint_range is not None:
            raise ValueError("an answer trie and --constraint-range exclude each other (OFA's generator asserts so)")
        self.constraint_trie = constraint_trie
        self.constraint_range = constraint_range
        self._range_mask: Optional[Tensor] = None  # --constraint-range as a (V,) mask, once built
        # Forced prefix length of each batch row, kept in step with fairseq's reordering of the rows.
        self.prefix_lengths: Optional[Tensor] = None
        # What the last generate() left behind, for exit statistics.
        self.encoder_exit_layers: Optional[Tensor] = None
        self.incremental_states: Optional[List[Dict]] = None

    @torch.jit.unused
    def forward_encoder(self, net_input: Dict[str, Tensor]):
        encoder_outs = super().forward_encoder(net_input)
        exits = encoder_outs[0].get("exit_layers") if encoder_outs else None
        self.encoder_exit_layers = exits[0] if exits else None
        return encoder_outs

    @torch.jit.unused
    def reorder_encoder_out(self, encoder_outs, new_order):
        # fairseq reorders the encoder output whenever rows move (beam expansion, beam selection,
        # finished sentences dropped): the prefix lengths follow the same rows.
        if self.prefix_lengths is not None:
            self.prefix_lengths = self.prefix_lengths.index_select(0, new_order.to(self.prefix_lengths.device))
        return super().reorder_encoder_out(encoder_outs, new_order)

    def _allowed_mask(self, tokens: Tensor, vocab_size: int) -> Tensor:
        """(rows x V) mask of the tokens the trie allows after each row's generated prefix."""
        mask = torch.zeros((tokens.size(0), vocab_size), dtype=torch.bool, device=tokens.device)
        prefix_lengths = self.prefix_lengths.tolist() if self.prefix_lengths is not None else [0] * len(tokens)
        for row, history in enumerate(tokens.tolist()):
            prefix_len = prefix_lengths[row]
            if len(history) > prefix_len:
                # Trie paths hold the answer tokens after bos; forced prefix tokens are not part of them.
                allowed = self.constraint_trie.next_tokens(history[prefix_len + 1 :])
                mask[row, allowed] = True
            else:
                mask[row] = True
        return mask

    def _allowed_tokens(self, tokens: Tensor, vocab_size: int) -> Optional[Tensor]:
        """(rows x V) mask of the tokens this step may emit, or None when every token may be."""
        if self.constraint_trie is not None:
            return self._allowed_mask(tokens, vocab_size)
        if self.constraint_range is not None:  # the same for every row and step: built once
            mask = self._range_mask
            if mask is None or mask.numel() != vocab_size or mask.device != tokens.device:
                start, end = self.constraint_range  # OFA keeps the specials 0-3 and start..end-1
                mask = torch.zeros(vocab_size, dtype=torch.bool, device=tokens.device)
                mask[:4] = True
                mask[start:end] = True
                self._range_mask = mask
            return mask.unsqueeze(0).expand(tokens.size(0), vocab_size)
        return None

    @torch.jit.unused
    def forward_decoder(
        self,
        tokens: Tensor,
        encoder_outs: List[Dict[str, List[Tensor]]],
        incremental_states: List[Dict[str, Dict[str, Optional[Tensor]]]],
        temperature: float = 1.0,
    ):
        self.incremental_states = incremental_states
        log_probs, avg_attn = [], None
        for i, model in enumerate(self.models):
            decoder = model.decoder
            allowed = self._allowed_tokens(tokens, len(decoder.dictionary))
            judges_allowed = hasattr(decoder, "exit_allowed_tokens")  # MuE: its exit policies judge these tokens
            if judges_allowed:
                decoder.exit_allowed_tokens = allowed
            try:
                decoder_out = decoder.forward(tokens, encoder_out=encoder_outs[i], incremental_state=incremental_states[i])
            finally:
                if judges_allowed:  # never left over for a later, unconstrained forward
                    decoder.exit_allowed_tokens = None
            attn = decoder_out[1]["attn"][0] if decoder_out[1] is not None else None
            if attn is not None:
                attn = attn[:, -1, :]
            logits = decoder_out[0][:, -1:, :].div_(temperature)
            if allowed is not None:
                logits.masked_fill_(~allowed.unsqueeze(1), -math.inf)
            probs = model.get_normalized_probs((logits, decoder_out[1]), log_probs=True, sample=None)[:, -1, :]
            if self.models_size == 1:
                return probs, attn
            log_probs.append(probs)
            if attn is not None:
                avg_attn = attn if avg_attn is None else avg_attn + attn
        avg_probs = torch.logsumexp(torch.stack(log_probs, dim=0), dim=0) - math.log(self.models_size)
        if avg_attn is not None:
            avg_attn = avg_attn / self.models_size
        return avg_probs, avg_attn


class OFASequenceGenerator(SequenceGenerator):
    """Beam search that starts from bos, honours an answer trie and blocks repeated n-grams as OFA's
    generator does."""

    def __init__(self, models, tgt_dict, constraint_trie=None, constraint_range=None, **kwargs):
        from mue_fairseq.criterions.label_smoothed_ce import parse_constraint_range

        constraint_range = parse_constraint_range(constraint_range)
        ensemble = (models if isinstance(models, EnsembleModel)
                    else OFAEnsembleModel(models, constraint_trie, constraint_range))
        super().__init__(ensemble, tgt_dict, **kwargs)
        self.bos = tgt_dict.bos()
        if self.repeat_ngram_blocker is not None:
            # fairseq-fixed's CPU fallback never bans anything (it reads padding); use OFA's rule.
            self.repeat_ngram_blocker = RepeatedNGramBlocker(self.repeat_ngram_blocker.no_repeat_ngram_size)
        self.constraint_trie = constraint_trie

    def _generate(self, sample: Dict[str, Dict[str, Tensor]], prefix_tokens: Optional[Tensor] = None,
                  constraints: Optional[Tensor] = None, bos_token: Optional[int] = None):
        self.model.prefix_lengths = None if prefix_tokens is None else prefix_tokens.ne(self.pad).sum(dim=1)
        if self.model.models_size > 1:
            from mue_fairseq.tasks.exit_validation import has_exits

            if any(has_exits(model) for model in self.model.models):
                raise ValueError(
                    f"MuE exits work with one model, not an ensemble of {self.model.models_size}: the ensemble "
                    "averages every step's prediction over all models, so no model can stop early on its own. "
                    "Evaluate one checkpoint at a time, or leave the thresholds at 1 for the ensemble"
                )
        for model in self.model.models:
            if getattr(model.decoder, "supports_exits", False):
                # The decoder's threshold schedule decays over the step budget N = max_len + 1.
                model.decoder.begin_decoding(self._max_len(sample) + 1)
        finalized = super()._generate(
            sample, prefix_tokens=prefix_tokens, constraints=constraints,
            bos_token=self.bos if bos_token is None else bos_token,
        )
        encoder_exits = self.model.encoder_exit_layers
        if encoder_exits is not None:
            for sentence, hypos in enumerate(finalized):
                for hypo in hypos:
                    hypo["encoder_exit_layers"] = encoder_exits[sentence]
        return finalized

    def _max_len(self, sample) -> int:
        """The step budget fairseq's beam search computes for this batch."""
        src_tokens = sample["net_input"]["src_tokens"]
        if self.match_source_len:
            return int(src_tokens.ne(self.eos).logical_and(src_tokens.ne(self.pad)).sum(1).max())
        return min(int(self.max_len_a * src_tokens.size(1) + self.max_len_b), self.max_len - 1)

    def finalize_hypos(self, step, bbsz_idx, eos_scores, tokens, scores, finalized, finished, beam_size,
                       attn, src_lengths, max_len):
        """fairseq's bookkeeping, plus each finished hypothesis's decoder exit layers per token."""
        record = None
        if self.model.models_size == 1 and getattr(self.model.single_model.decoder, "supports_exits", False):
            record = self.model.single_model.decoder.exit_record(self.model.incremental_states[0])
        # Batch row r belongs to the (r // beam)-th unfinished sentence, as in fairseq.
        active = [sentence for sentence, done in enumerate(finished) if not done]
        counts = [len(hypos) for hypos in finalized]
        newly_finished = super().finalize_hypos(
            step, bbsz_idx, eos_scores, tokens, scores, finalized, finished, beam_size, attn, src_lengths, max_len
        )
        if record is not None:
            # Replay fairseq's appends (in bbsz_idx order, up to beam_size per sentence).
            for row in bbsz_idx.tolist():
                sentence = active[row // beam_size]
                if counts[sentence] < beam_size:
                    finalized[sentence][counts[sentence]]["exit_layers"] = record[row, : step + 1]
                    counts[sentence] += 1
        return newly_finished
