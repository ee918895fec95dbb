"""MuE encoder: image and text as two streams through OFA's shared layers, each stopping early.

[I_p; T_q] = [E_1:p(I_0); E_1:q(T_0)]: a stream attends only to itself, with its own absolute
and relative position biases, and every sample of every stream stops after the first layer whose
output is similar enough to its input. Samples that stop leave the batch (gather the active
samples, run the layer, scatter the finished ones), so a batch saves what its samples save.
The output is OFA's encoder dict, [image; text] through the final layer norm, plus `exit_layers`
(B x 2: image, text layers run).
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from mue_fairseq.exits.config import MuEConfig
from mue_fairseq.exits.policies import StreamExitDecider
from mue_fairseq.exits.replay import ExitReplay
from mue_fairseq.ofa.encoder import EncoderOut, OFAEncoder


class MuEEncoder(OFAEncoder):
    def __init__(self, args, dictionary, embed_tokens, mue: MuEConfig):
        super().__init__(args, dictionary, embed_tokens)
        self.mue = mue
        self.exit_replay: Optional[ExitReplay] = None  # the replay policy's recorded exits

    def run_stream(
        self,
        x: Tensor,
        padding: Tensor,
        layer_bias: Callable[[int], Tensor],
        decide: Optional[Callable[[int, Tensor, Tensor, Optional[Tensor], Tensor], Tensor]],
        active: Optional[Tensor] = None,
        states: Optional[List[Tensor]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Run the layers over a stream x (T x B x C) until each sample stops.

        layer_bias(i): (1 x H x T x T) bias of layer i; decide: exit test or None (full depth), given
        the states after and before the layer, their padding and which samples they are;
        active: samples that enter the stream at all (the others keep x and exit layer 0);
        states: if a list, receives the stream after each layer (stopped samples frozen).
        Returns (output T x B x C, layers run per sample (B,)).
        """
        batch = x.size(1)
        exit_layers = torch.full((batch,), self.num_layers, dtype=torch.long, device=x.device)
        rows = torch.arange(batch, device=x.device)
        out = None  # holds stopped samples; allocated at the first stop
        if active is not None and not bool(active.all()):
            exit_layers[~active] = 0
            rows = active.nonzero().squeeze(1)
            out = x.clone()
        h, pad = x.index_select(1, rows) if out is not None else x, padding.index_select(0, rows)
        key_padding = pad if bool(pad.any()) else None  # re-checked only when the batch shrinks
        for idx, layer in enumerate(self.layers):
            if rows.numel() == 0:
                break
            new = layer(h, key_padding, layer_bias(idx))
            if states is not None:
                snapshot = (x if out is None else out).clone()
                snapshot[:, rows] = new
                states.append(snapshot)
            done = decide(idx, new, h, pad, rows) if decide is not None and idx < self.num_layers - 1 else None
            if done is None or not bool(done.any()):
                h = new
                continue
            if out is None:
                out = x.clone()
            stopped, going = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            out[:, rows[stopped]] = new.index_select(1, stopped)
            exit_layers[rows[stopped]] = idx + 1
            rows, h, pad = rows[going], new.index_select(1, going), pad.index_select(0, going)
            key_padding = pad if bool(pad.any()) else None
        if out is None:
            out = h
        elif rows.numel():
            out[:, rows] = h
        if states is not None:
            # A stream whose samples all stopped early keeps its final state for the layers left.
            states.extend(out.clone() for _ in range(self.num_layers - len(states)))
        return out, exit_layers

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        patch_images: Optional[Tensor] = None,
        patch_images_2: Optional[Tensor] = None,
        patch_masks: Optional[Tensor] = None,
        code_masks: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        sample_patch_num: Optional[int] = None,
    ) -> EncoderOut:
        exits = not self.training and self.mue.encoder_exits_enabled()
        if not self.mue.decomposed:
            if exits:
                raise NotImplementedError(
                    "encoder exits need --mue-encoder-mode decomposed (the joint stream has no "
                    "per-modality depth)"
                )
            out = super().forward(
                src_tokens, src_lengths, patch_images, patch_images_2, patch_masks, code_masks,
                return_all_hiddens, token_embeddings, sample_patch_num,
            )
            out["exit_layers"] = [src_tokens.new_full((src_tokens.size(0), 2), self.num_layers)]
            return out
        if patch_images is None or patch_images_2 is not None:
            raise NotImplementedError("the decomposed encoder needs exactly one image per sample")
        if sample_patch_num is not None:
            raise NotImplementedError("patch sampling is a pretraining option, not supported by MuE")

        text_x, text_pad, text_pos = self.embed_text(src_tokens, token_embeddings)
        image_x, image_pad, image_ids, image_pos = self.embed_image_patches(patch_images, patch_masks)
        text_pos, image_pos = self.pos_ln(text_pos), self.image_pos_ln(image_pos)
        text_x = text_x.masked_fill(text_pad.unsqueeze(-1), 0).transpose(0, 1)
        image_x = image_x.masked_fill(image_pad.unsqueeze(-1), 0).transpose(0, 1)
        has_image = ~image_pad.all(dim=1)

        # Positions are the same for every sample: one bias per stream and layer, broadcast.
        text_abs = self.absolute_position_bias(text_pos[:1], text_pos[:1])
        image_abs = self.absolute_position_bias(image_pos[:1], image_pos[:1])
        text_len = text_x.size(0)

        def text_bias(idx: int) -> Tensor:
            return text_abs + self.token_relative_bias(text_len, idx).unsqueeze(0)

        def image_bias(idx: int) -> Tensor:
            if self.mue.mue_drop_image_rel_bias:
                return image_abs
            return image_abs + self.image_relative_bias(image_ids[:1], idx)

        cfg = self.mue
        image_decide = text_decide = None
        if exits:
            image_replay = text_replay = None
            if cfg.policy == "replay":
                image_replay, text_replay = replay_of(self).start_batch(src_tokens.size(0), src_tokens.device)
            image_decide = StreamExitDecider(cfg, cfg.mue_image_threshold, cfg.mue_static_image_layers, self.num_layers,
                                             image_replay)
            text_decide = StreamExitDecider(cfg, cfg.mue_text_threshold, cfg.mue_static_text_layers, self.num_layers,
                                            text_replay)
            image_decide = image_decide if image_decide.enabled else None
            text_decide = text_decide if text_decide.enabled else None

        image_states: Optional[List[Tensor]] = [] if return_all_hiddens else None
        text_states: Optional[List[Tensor]] = [] if return_all_hiddens else None
        image_out, image_layers = self.run_stream(
            image_x, image_pad, image_bias, image_decide, active=has_image, states=image_states
        )
        text_out, text_layers = self.run_stream(text_x, text_pad, text_bias, text_decide, states=text_states)

        x = torch.cat([image_out, text_out], dim=0)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        encoder_states = []
        if return_all_hiddens:
            encoder_states = [torch.cat([image_x, text_x], dim=0)]
            encoder_states += [torch.cat([i, t], dim=0) for i, t in zip(image_states, text_states)]
        return {
            "encoder_out": [x],
            "encoder_padding_mask": [torch.cat([image_pad, text_pad], dim=1)],
            "encoder_embedding": [],
            "encoder_states": encoder_states,
            "src_tokens": [],
            "src_lengths": [],
            "position_embeddings": [torch.cat([image_pos, text_pos], dim=1)],
            "exit_layers": [torch.stack([image_layers, text_layers], dim=1)],
        }



def replay_of(module) -> ExitReplay:
    """The recorded exits a MuE encoder or decoder replays; a clear error where none is attached."""
    if module.exit_replay is None:
        raise RuntimeError("--mue-exit-policy replay needs recorded exits: attach them with "
                           "MuEOFAModel.set_exit_replay (benchmarks/bench_exit_speed.py --replay does)")
    return module.exit_replay
