"""MuE decoder: every token of every hypothesis stops at its own depth.

While decoding, each step runs the layers over the rows (hypotheses) that are still going;
a row stops after layer i when its exit test passes (similarity with the decaying threshold
Theta(t), or a baseline policy), and its logits come from the shared final norm and output
projection. The self-attention cache of every layer still gets exactly one entry per step for
every row (by the time a row reads it), as the KV policy says:

* propagate: each skipped layer projects its own key/value from the exit state. A layer that
  every row skips at a step does this later, in one call for all the steps it missed, when a
  row next runs it (or `settle_caches` asks): until then its cache lags and the exit states
  wait in the incremental state ("exit_states", rows x steps x C);
* copy: the exit layer's key/value for that position;
* recompute: the skipped layers still run on the row (exact cache, no decoder saving);
* none: nothing real is stored; per-row exits store a masked hole, and the authors'
  batch-level mode (`--mue-batch-joint-exit`) stores nothing at all, as their code did.

Cross-attention keys/values stay each layer's own (computed for all rows on first use).
The layers run per step, per row, are recorded in the incremental state ("exit_layers",
rows x steps) and follow beam reordering.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mue_fairseq.exits.config import MuEConfig
from mue_fairseq.exits.policies import TokenExitDecider
from mue_fairseq.exits.replay import ExitReplay
from mue_fairseq.exits.similarity import group_cosine
from mue_fairseq.ofa.attention import IncrementalState
from mue_fairseq.ofa.decoder import OFADecoder
from mue_fairseq.ofa.encoder import EncoderOut

from .mue_encoder import replay_of


class MuEDecoder(OFADecoder):
    supports_exits = True

    def __init__(self, args, dictionary, embed_tokens, mue: MuEConfig):
        super().__init__(args, dictionary, embed_tokens)
        self.mue = mue
        self.num_decoding_steps: int = args.max_target_positions
        # propagate: project the keys/values of layers that no row runs only when a row next
        # runs them. Off gives the same caches step by step (for tests and A/B timing).
        self.defer_skipped_kv = True
        self.exit_replay: Optional[ExitReplay] = None  # the replay policy's recorded exits
        # Set by the generator before each step (rows x V, bool): the tokens it may emit, which the
        # prediction-based exit policies judge their predictions over.
        self.exit_allowed_tokens: Optional[Tensor] = None

    # ----------------------------------------------------------------- public hooks
    def begin_decoding(self, num_steps: int) -> None:
        """Called by the generator: the step budget N of the threshold schedule (max_len + 1)."""
        self.num_decoding_steps = num_steps

    def exit_record(self, incremental_state: IncrementalState) -> Optional[Tensor]:
        """Layers run per (row, step) so far, or None before the first step."""
        return self.get_incremental_state(incremental_state, "exit_layers")

    def predict(self, states: Tensor, vocabulary: Optional[Tensor] = None) -> Tensor:
        """Logits of pre-norm decoder states through the shared final norm and output head;
        with `vocabulary` (token ids), only those tokens' logits (a much smaller projection)."""
        if self.layer_norm is not None:
            states = self.layer_norm(states)
        if vocabulary is None:
            return self.output_layer(states)
        return F.linear(states, self.output_projection.weight.index_select(0, vocabulary))

    def settle_caches(self, incremental_state: IncrementalState) -> None:
        """Bring every layer's self-attention cache up to the steps decoded so far (the deferred
        propagate entries), so that each holds one entry per position."""
        history = self.get_incremental_state(incremental_state, "exit_states")
        if history is None:
            return
        for layer in self.layers:
            self._settle_layer(layer, incremental_state, history, history.size(1))

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        super().reorder_incremental_state(incremental_state, new_order)
        for name in ("exit_layers", "exit_states"):
            value = self.get_incremental_state(incremental_state, name)
            if value is not None:
                self.set_incremental_state(incremental_state, name, value.index_select(0, new_order))

    # ----------------------------------------------------------------- forward
    def extract_features(
        self,
        prev_output_tokens: Tensor,
        code_masks: Optional[Tensor] = None,
        encoder_out: Optional[EncoderOut] = None,
        incremental_state: Optional[IncrementalState] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
        exit_groups: Optional[Tensor] = None,
        exit_positions: Optional[Tensor] = None,
        exit_vocabulary: Optional[Tensor] = None,
    ):
        if incremental_state is not None and not self.training:
            return self._decode_step(prev_output_tokens, encoder_out, incremental_state)
        if not self.training and self.mue.decoder_exits_enabled():
            return self._teacher_forced_with_exits(prev_output_tokens, encoder_out, exit_groups, exit_positions,
                                                   exit_vocabulary)
        x, extra = super().extract_features(
            prev_output_tokens, code_masks, encoder_out, incremental_state,
            full_context_alignment, alignment_layer, alignment_heads,
        )
        extra["exit_layers"] = [prev_output_tokens.new_full((prev_output_tokens.size(0),), self.num_layers)]
        return x, extra

    def forward(self, prev_output_tokens, code_masks=None, encoder_out=None, incremental_state=None,
                features_only=False, full_context_alignment=False, alignment_layer=None,
                alignment_heads=None, src_lengths=None, return_all_hiddens=False, exit_groups=None,
                exit_positions=None, exit_vocabulary=None):
        """OFA's decoder call; `exit_groups` (rows,) makes rows sharing an id exit together in
        teacher-forced evaluation (the SNLI-VE candidates of one sample), and `exit_positions`
        (rows,) names the position whose prediction the entropy, confidence and patience policies
        judge there (default: each row's last non-pad position), over the tokens `exit_vocabulary`
        (default: the whole vocabulary; SNLI-VE: the answers, as a 3-way classifier would)."""
        if code_masks is not None and bool(code_masks.any()):
            raise NotImplementedError("image-code generation (code_masks) is not supported by mue-fairseq")
        x, extra = self.extract_features(
            prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state,
            full_context_alignment=full_context_alignment, alignment_layer=alignment_layer,
            alignment_heads=alignment_heads, exit_groups=exit_groups, exit_positions=exit_positions,
            exit_vocabulary=exit_vocabulary,
        )
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    # ----------------------------------------------------------------- incremental decoding
    def _cross_kv(self, layer, enc: Tensor, incremental_state: IncrementalState) -> Dict[str, Tensor]:
        """The layer's static encoder keys/values for all rows, computed on first use."""
        attn = layer.encoder_attn
        buffer = attn._get_input_buffer(incremental_state)
        if "prev_key" not in buffer:
            buffer["prev_key"], buffer["prev_value"] = attn.project_key_value(enc)
            attn._set_input_buffer(incremental_state, buffer)
        return buffer

    def _decode_step(self, tokens: Tensor, encoder_out: EncoderOut, incremental_state: IncrementalState):
        """One incremental step with per-row exits; returns ((R x 1 x C) features, extra)."""
        step = _Step(self, tokens, encoder_out, incremental_state)
        x = self.embed_target(tokens[:, -1:], step.raw_positions[-1:]).transpose(0, 1)  # 1 x R x C
        replay = replay_of(self) if self.mue.policy == "replay" else None
        decider = TokenExitDecider(self.mue, self.num_layers, self.predict, replay, self.exit_allowed_tokens)
        may_exit = decider.begin_step(step.rows_total, step.index, self.num_decoding_steps, tokens.device)
        rows = _StepRows(x, self.num_layers)
        recompute = self.mue.kv_policy == "recompute"
        defer = self.defer_skipped_kv and self.mue.kv_policy == "propagate" and self.mue.decoder_exits_enabled()
        history = self.get_incremental_state(incremental_state, "exit_states") if defer else None
        h = x
        for idx, layer in enumerate(self.layers):
            if defer:
                if rows.computing.numel() == 0:
                    break  # every row stopped: the deeper layers' entries wait in the history
                if history is not None:
                    self._settle_layer(layer, incremental_state, history, step.index)
            normed = k_new = v_new = None
            if rows.computing.numel():
                normed = layer.self_attn_layer_norm(h) if layer.normalize_before else h
                k_new, v_new = layer.self_attn.project_key_value(normed)  # A x H x 1 x d
            cache = self._extend_self_cache(layer, incremental_state, rows, k_new, v_new)
            if rows.computing.numel() == 0:
                continue  # no row runs this layer; its cache entry is in, the deeper layers' follow
            state = self._run_layer(step, idx, layer, h, normed, cache, rows.computing)
            if may_exit and idx < self.num_layers - 1:
                if recompute:
                    self._exit_and_keep_computing(decider, idx, rows, h, state)
                else:
                    state = self._exit_and_stop(decider, idx, rows, h, state, k_new, v_new)
            h = state
        final = rows.final_states(h, recompute)
        self._record_exits(incremental_state, rows.exit_layers)
        if defer:
            column = final.transpose(0, 1)  # R x 1 x C
            history = column if history is None else torch.cat([history, column], dim=1)
            self.set_incremental_state(incremental_state, "exit_states", history)
        if self.layer_norm is not None:
            final = self.layer_norm(final)
        return final.transpose(0, 1), {"attn": [None], "inner_states": [x], "exit_layers": [rows.exit_layers]}

    def _run_layer(self, step: "_Step", idx: int, layer, h: Tensor, normed: Tensor, cache: Dict[str, Tensor],
                   computing: Tensor) -> Tensor:
        """Layer `idx` on the rows still computing (h: 1 x A x C): self-attention over their cache,
        cross-attention over their encoder output, feed-forward."""
        subset = computing.numel() < step.rows_total
        sa = layer.self_attn
        cache_k, cache_v = cache["prev_key"], cache["prev_value"]
        cache_pad = cache.get("prev_key_padding_mask")
        if subset:
            cache_k, cache_v = cache_k.index_select(0, computing), cache_v.index_select(0, computing)
            cache_pad = cache_pad.index_select(0, computing) if cache_pad is not None else None
        q = sa.split_heads(sa.q_proj(normed) * sa.scaling)
        self_bias = step.self_bias + self.token_relative_bias(step.tgt_len, idx)[:, step.index:].unsqueeze(0)
        state, _ = layer._residual_block(
            h, layer.self_attn_layer_norm, layer.self_attn_ln,
            lambda _: sa.attend(q, cache_k.flatten(0, 1), cache_v.flatten(0, 1),
                                key_padding_mask=cache_pad, attn_bias=self_bias),
        )
        cross = self._cross_kv(layer, step.enc, step.incremental_state)
        cross_k, cross_v = cross["prev_key"], cross["prev_value"]
        cross_pad, cross_bias = step.enc_padding, step.cross_bias
        if subset:
            cross_k, cross_v = cross_k.index_select(0, computing), cross_v.index_select(0, computing)
            cross_pad = cross_pad.index_select(0, computing) if cross_pad is not None else None
            cross_bias = cross_bias.index_select(0, computing)
        ea = layer.encoder_attn
        state, _ = layer._residual_block(
            state, layer.encoder_attn_layer_norm, layer.cross_attn_ln,
            lambda q_in: ea.attend(ea.split_heads(ea.q_proj(q_in) * ea.scaling), cross_k.flatten(0, 1),
                                   cross_v.flatten(0, 1), key_padding_mask=cross_pad, attn_bias=cross_bias),
        )
        return layer.feed_forward(state)

    # ----------------------------------------------------------------- exits within a step
    @staticmethod
    def _exit_and_keep_computing(decider: TokenExitDecider, idx: int, rows: "_StepRows", h: Tensor,
                                 state: Tensor) -> None:
        """recompute: every row runs every layer (exact caches); only rows still predicting decide."""
        live = (~rows.exited).nonzero().squeeze(1)
        if live.numel() == 0:
            return
        candidates = state.index_select(1, live)
        done = decider(idx, candidates[0], h.index_select(1, live)[0], live)
        rows.take_exits(idx, live, done, candidates)

    @staticmethod
    def _exit_and_stop(decider: TokenExitDecider, idx: int, rows: "_StepRows", h: Tensor, state: Tensor,
                       k_new: Tensor, v_new: Tensor) -> Tensor:
        """propagate / copy / none: rows that exit leave the computation, keeping what their skipped
        layers' caches will need; returns the states of the rows that go on."""
        done = decider(idx, state[0], h[0], rows.computing)
        leaving = rows.take_exits(idx, rows.computing, done, state)
        if leaving is None:
            return state
        staying = (~done).nonzero().squeeze(1)
        rows.stop(leaving, state, k_new, v_new)
        rows.computing = rows.computing[staying]
        return state.index_select(1, staying)

    # ----------------------------------------------------------------- self-attention caches
    def _extend_self_cache(self, layer, incremental_state: IncrementalState, rows: "_StepRows",
                           k_new: Optional[Tensor], v_new: Optional[Tensor]) -> Dict[str, Tensor]:
        """Append this step's entry of `layer`'s self-attention cache for every row; returns the cache."""
        column = self._cache_column(layer, rows, k_new, v_new)
        cache = layer.self_attn._get_input_buffer(incremental_state)
        if column is not None:
            self._append_to_cache(layer.self_attn, incremental_state, cache, *column)
        return cache

    def _cache_column(self, layer, rows: "_StepRows", k_new: Optional[Tensor], v_new: Optional[Tensor]):
        """This step's self-attention cache entry of `layer` for every row: (k, v, pad) or None.

        Rows still computing contribute their own key/value; rows that stopped earlier in the
        step contribute what the KV policy says.
        """
        if rows.stopped.numel() == 0:
            return k_new, v_new, None
        policy = self.mue.kv_policy
        if policy == "none" and self.mue.mue_batch_joint_exit:
            return None  # the authors' code: skipped layers keep no entry (a hole)
        shape = (rows.total,) + tuple(rows.stopped_kv[0].shape[1:] if k_new is None else k_new.shape[1:])
        column_k = rows.stopped_states.new_zeros(shape)
        column_v = torch.zeros_like(column_k)
        if k_new is not None:
            column_k[rows.computing], column_v[rows.computing] = k_new, v_new
        column_pad = _STOPPED_ROW_ENTRIES[policy](layer, rows, column_k, column_v)
        return column_k, column_v, column_pad

    @staticmethod
    def _propagated_entries(layer, rows: "_StepRows", column_k: Tensor, column_v: Tensor) -> None:
        """propagate: the layer projects its own key/value from each stopped row's exit state."""
        states = rows.stopped_states
        normed = layer.self_attn_layer_norm(states) if layer.normalize_before else states
        column_k[rows.stopped], column_v[rows.stopped] = layer.self_attn.project_key_value(normed)

    @staticmethod
    def _copied_entries(layer, rows: "_StepRows", column_k: Tensor, column_v: Tensor) -> None:
        """copy: each stopped row repeats its exit layer's key/value."""
        column_k[rows.stopped], column_v[rows.stopped] = rows.stopped_kv

    @staticmethod
    def _masked_entries(layer, rows: "_StepRows", column_k: Tensor, column_v: Tensor) -> Tensor:
        """none, per row: a masked hole keeps every row's cache aligned with its positions."""
        column_pad = torch.zeros(rows.total, 1, dtype=torch.bool, device=column_k.device)
        column_pad[rows.stopped] = True
        return column_pad

    @staticmethod
    def _settle_layer(layer, incremental_state: IncrementalState, history: Tensor, upto: int) -> None:
        """Append `layer`'s propagated keys/values for the steps from its cache length to `upto`,
        which every row skipped, projected from their exit states in `history` in one call."""
        sa = layer.self_attn
        buffer = sa._get_input_buffer(incremental_state)
        cached = buffer["prev_key"].size(2) if "prev_key" in buffer else 0
        if cached >= upto:
            return
        states = history[:, cached:upto].transpose(0, 1)  # P x R x C
        normed = layer.self_attn_layer_norm(states) if layer.normalize_before else states
        k, v = sa.project_key_value(normed)  # R x H x P x d
        if cached:
            k, v = torch.cat([buffer["prev_key"], k], dim=2), torch.cat([buffer["prev_value"], v], dim=2)
        buffer["prev_key"], buffer["prev_value"] = k, v
        sa._set_input_buffer(incremental_state, buffer)

    @staticmethod
    def _append_to_cache(sa, incremental_state, buffer, column_k, column_v, column_pad):
        rows_total = column_k.size(0)
        previous_pad = buffer.get("prev_key_padding_mask")
        if "prev_key" in buffer:
            buffer["prev_key"] = torch.cat([buffer["prev_key"], column_k], dim=2)
            buffer["prev_value"] = torch.cat([buffer["prev_value"], column_v], dim=2)
        else:
            buffer["prev_key"], buffer["prev_value"] = column_k, column_v
        if column_pad is not None or previous_pad is not None:
            cached = buffer["prev_key"].size(2)
            if previous_pad is None:
                previous_pad = torch.zeros(rows_total, cached - 1, dtype=torch.bool, device=column_k.device)
            if column_pad is None:
                column_pad = torch.zeros(rows_total, 1, dtype=torch.bool, device=column_k.device)
            buffer["prev_key_padding_mask"] = torch.cat([previous_pad, column_pad], dim=1)
        sa._set_input_buffer(incremental_state, buffer)

    def _record_exits(self, incremental_state: IncrementalState, exit_layers: Tensor) -> None:
        record = self.exit_record(incremental_state)
        column = exit_layers.unsqueeze(1)
        record = column if record is None else torch.cat([record, column], dim=1)
        self.set_incremental_state(incremental_state, "exit_layers", record)

    # ----------------------------------------------------------------- teacher-forced evaluation
    def _teacher_forced_with_exits(self, tokens: Tensor, encoder_out: EncoderOut, exit_groups: Optional[Tensor],
                                   exit_positions: Optional[Tensor] = None, exit_vocabulary: Optional[Tensor] = None):
        """Full-sequence pass where each group of rows (default: each row) stops at its own layer.

        Similarity: a group's decision uses the cosine of all its rows' non-pad states flattened
        together, with the fixed threshold theta (there is no decoding step to decay over).
        Entropy, confidence, patience: each row's prediction at its `exit_positions` entry is
        judged (over `exit_vocabulary` when given); a group stops when all its rows pass.
        """
        cfg = self.mue
        if cfg.policy == "replay":
            raise NotImplementedError("--mue-exit-policy replay replays incremental decoding (generation) only")
        rows_total, tgt_len = tokens.shape
        device = tokens.device
        groups = exit_groups if exit_groups is not None else torch.arange(rows_total, device=device)
        _, groups = torch.unique(groups, return_inverse=True)
        num_groups = int(groups.max()) + 1
        enc = encoder_out["encoder_out"][0]
        enc_padding = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        raw_positions = self.embed_positions(torch.arange(tgt_len, device=device))
        tgt_pos = self.pos_ln(raw_positions)
        self_bias = self.self_position_bias(tgt_pos)
        cross_bias = self.cross_position_bias(tgt_pos, encoder_out, None)
        x = self.embed_target(tokens, raw_positions).transpose(0, 1)
        padding = tokens.eq(self.padding_idx)
        causal = self.buffered_future_mask(x)

        decider = None
        if cfg.policy not in ("similarity", "static"):
            vocabulary = None if exit_vocabulary is None else exit_vocabulary.to(device)
            decider = TokenExitDecider(cfg, self.num_layers, lambda states: self.predict(states, vocabulary))
            decider.start_rows(rows_total, device)
            if exit_positions is None:
                exit_positions = (~padding).sum(dim=1) - 1
            exit_positions = exit_positions.to(device)
        exit_layers = torch.full((rows_total,), self.num_layers, dtype=torch.long, device=device)
        out = x.clone()
        going = torch.arange(rows_total, device=device)
        h = x
        # Inputs of the rows still going; re-gathered only after some rows stop.
        pad, enc_rows, enc_padding_rows, cross_bias_rows = padding, enc, enc_padding, cross_bias
        self_padding = pad if bool(pad.any()) else None
        for idx, layer in enumerate(self.layers):
            state, _, _ = layer(
                h, enc_rows, enc_padding_rows,
                self_attn_mask=causal,
                self_attn_padding_mask=self_padding,
                self_attn_bias=self_bias + self.token_relative_bias(tgt_len, idx).unsqueeze(0),
                cross_attn_bias=cross_bias_rows,
            )
            if idx == self.num_layers - 1:
                h = state
                break
            if cfg.policy == "static":
                group_done = torch.full((num_groups,), 0 < cfg.mue_static_decoder_layers <= idx + 1, device=device)
            elif decider is not None:
                judged = state[exit_positions[going], torch.arange(going.numel(), device=device)]
                # Prediction-based rules read only the new states (no previous-layer states needed).
                row_going = (~decider(idx, judged, judged, going)).long()
                group_done = torch.zeros(num_groups, dtype=torch.long, device=device).index_add_(
                    0, groups[going], row_going).eq(0)
            else:
                sims = group_cosine(state, h, pad, groups[going], num_groups)
                group_done = cfg.similarity_passes(sims, cfg.mue_decoder_threshold)
            done = group_done[groups[going]]
            if bool(done.any()):
                leaving, staying = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
                out[:, going[leaving]] = state.index_select(1, leaving)
                exit_layers[going[leaving]] = idx + 1
                going, h = going[staying], state.index_select(1, staying)
                if going.numel() == 0:
                    break
                pad, enc_rows = padding.index_select(0, going), enc.index_select(1, going)
                self_padding = pad if bool(pad.any()) else None
                enc_padding_rows = enc_padding.index_select(0, going) if enc_padding is not None else None
                cross_bias_rows = cross_bias.index_select(0, going)
            else:
                h = state
        if going.numel():
            out[:, going] = h
        if self.layer_norm is not None:
            out = self.layer_norm(out)
        return out.transpose(0, 1), {"attn": [None], "inner_states": [x], "exit_layers": [exit_layers]}


# What a stopped row's entry in a skipped layer's cache is, per KV policy (recompute stops no row);
# each fills the stopped rows of the column and returns its padding mask (None: no hole).
_STOPPED_ROW_ENTRIES = {
    "propagate": MuEDecoder._propagated_entries,
    "copy": MuEDecoder._copied_entries,
    "none": MuEDecoder._masked_entries,
}


class _Step:
    """What every layer of one incremental step reads: positions, position biases, encoder output."""

    __slots__ = ("rows_total", "tgt_len", "index", "raw_positions", "self_bias", "cross_bias", "enc",
                 "enc_padding", "incremental_state")

    def __init__(self, decoder: MuEDecoder, tokens: Tensor, encoder_out: EncoderOut,
                 incremental_state: IncrementalState):
        self.rows_total, self.tgt_len = tokens.shape
        self.index = self.tgt_len - 1
        self.enc = encoder_out["encoder_out"][0]
        self.enc_padding = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        self.raw_positions = decoder.embed_positions(torch.arange(self.tgt_len, device=tokens.device))
        tgt_pos = decoder.pos_ln(self.raw_positions)
        self.self_bias = decoder.self_position_bias(tgt_pos, self.index)  # 1 x H x 1 x T
        # R x H x 1 x S
        self.cross_bias = decoder.cross_position_bias(tgt_pos, encoder_out, incremental_state, self.index)
        self.incremental_state = incremental_state


class _StepRows:
    """The rows of one step: those still running layers, those that stopped earlier in the step
    (with their exit states and exit layer's key/value, what the KV policies need), and the exits."""

    __slots__ = ("total", "computing", "stopped", "stopped_states", "stopped_kv", "exit_layers", "exited", "final")

    def __init__(self, x: Tensor, num_layers: int):
        self.total = x.size(1)
        device = x.device
        self.computing = torch.arange(self.total, device=device)  # sorted
        self.stopped = self.computing[:0]
        self.stopped_states = x[:, :0]
        self.stopped_kv = (x.new_zeros(0), x.new_zeros(0))
        self.exit_layers = torch.full((self.total,), num_layers, dtype=torch.long, device=device)
        self.exited = torch.zeros(self.total, dtype=torch.bool, device=device)
        self.final: Optional[Tensor] = None  # 1 x R x C, allocated at the first exit

    def take_exits(self, idx: int, candidates: Tensor, done: Tensor, states: Tensor) -> Optional[Tensor]:
        """Rows `candidates[done]` exit after layer `idx` with `states[:, done]`; returns the
        positions of the leaving rows within `candidates` (None when none leaves)."""
        if not bool(done.any()):
            return None
        leaving = done.nonzero().squeeze(1)
        leaving_rows = candidates[leaving]
        if self.final is None:
            self.final = states.new_zeros(1, self.total, states.size(2))
        self.final[:, leaving_rows] = states.index_select(1, leaving)
        self.exit_layers[leaving_rows] = idx + 1
        self.exited[leaving_rows] = True
        return leaving

    def stop(self, leaving: Tensor, states: Tensor, k_new: Tensor, v_new: Tensor) -> None:
        """The computing rows at positions `leaving` stop running layers for the rest of the step."""
        self.stopped = torch.cat([self.stopped, self.computing[leaving]])
        self.stopped_states = torch.cat([self.stopped_states, states.index_select(1, leaving)], dim=1)
        self.stopped_kv = (torch.cat([self.stopped_kv[0], k_new[leaving]]),
                           torch.cat([self.stopped_kv[1], v_new[leaving]]))

    def final_states(self, h: Tensor, recompute: bool) -> Tensor:
        """1 x R x C: each row's state at its exit, or after the last layer where it did not exit."""
        if self.final is None:
            return h
        if recompute:
            self.final[:, ~self.exited] = h[:, ~self.exited]
        elif self.computing.numel():
            self.final[:, self.computing] = h
        return self.final
