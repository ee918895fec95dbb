"""Replaying recorded exits: every row stops where an evaluation's exit statistics say it did.

A trade-off measured on a small trained model (its `{subset}_exit_stats.json`, written by
`mue_fairseq.cli.evaluate`) can then be timed on another model, e.g. OFA-Base's shape with random
weights (`benchmarks/bench_exit_speed.py --replay`). The replay is an exit policy (`replay`):
the encoder streams and decoder tokens stop through the same code as real exits (rows leave the
computation, the KV policy fills the skipped layers' caches); only the decision is looked up
instead of computed.

* Samples: each encoder call takes the next `batch` recorded samples, in order, cycling when the
  recording has fewer samples than rows; `rewind` starts again from the first.
* Decoder: row r of a step belongs to sample r // beam (fairseq's row order); step t uses the
  sample's recorded layer of token t, cycling over its tokens when decoding runs longer than
  the recorded hypothesis. Rows must keep their places for the whole generation (fixed length,
  `min_len = max_len`): a generator that drops finished samples is an error.
* Depth: recorded layers map to the target model's depth, `equal` (depths must match) or
  `proportional` (round(layers * target / recorded), halves up, kept within 1..target), so that
  full depth stays full depth.
"""
import math
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from mue_fairseq.metrics.exit_stats import ExitStatistics

DEPTH_MAPPINGS = ("proportional", "equal")


def map_depth(layers: int, recorded_depth: int, target_depth: int, mapping: str) -> int:
    """A recorded exit layer (1..recorded_depth) at the target depth."""
    if mapping == "equal":
        if recorded_depth != target_depth:
            raise ValueError(f"depth mapping 'equal' needs the same depth, recorded {recorded_depth}, "
                             f"target {target_depth}")
        return layers
    if mapping != "proportional":
        raise ValueError(f"unknown depth mapping {mapping!r}; known: {list(DEPTH_MAPPINGS)}")
    return min(target_depth, max(1, math.floor(layers * target_depth / recorded_depth + 0.5)))


class ExitReplay:
    """Recorded exit layers at a target model's depth, handed out batch by batch (see module doc)."""

    def __init__(self, image: List[int], text: List[int], decoder: List[List[int]], encoder_layers: int,
                 decoder_layers: int, source: str = ""):
        if not image:
            raise ValueError(f"{source or 'exit replay'}: no recorded samples to replay")
        self.image, self.text, self.decoder = image, text, decoder
        self.encoder_layers, self.decoder_layers = encoder_layers, decoder_layers
        self.source = source
        self._cursor = 0
        self._batch: List[int] = []
        self._rows: Optional[int] = None
        # The current batch's recorded decoder layers (B x longest, padded) and token counts (B,),
        # built once per batch so that a decoding step only indexes them on the device.
        self._decoder_table: Optional[Tensor] = None
        self._decoder_lengths: Optional[Tensor] = None

    @classmethod
    def from_statistics(cls, stats: ExitStatistics, encoder_layers: int, decoder_layers: int,
                        mapping: str = "proportional", source: str = "") -> "ExitReplay":
        where = source or "exit statistics"
        if mapping not in DEPTH_MAPPINGS:
            raise ValueError(f"unknown depth mapping {mapping!r}; known: {list(DEPTH_MAPPINGS)}")
        if mapping == "equal" and (stats.encoder_layers, stats.decoder_layers) != (encoder_layers, decoder_layers):
            raise ValueError(f"{where}: recorded on a {stats.encoder_layers}+{stats.decoder_layers}-layer model, "
                             f"the target has {encoder_layers}+{decoder_layers}; depth mapping 'equal' needs "
                             "the same depth (use 'proportional')")
        image, text, decoder = [], [], []
        for s in stats.samples:
            if s.image_layers == 0:
                raise ValueError(f"{where}: sample {s.sample_id!r} had no image (image layers 0); a replay "
                                 "needs every sample's image stream")
            image.append(map_depth(s.image_layers, stats.encoder_layers, encoder_layers, mapping))
            text.append(map_depth(s.text_layers, stats.encoder_layers, encoder_layers, mapping))
            decoder.append([map_depth(v, stats.decoder_layers, decoder_layers, mapping) for v in s.decoder_layers])
        return cls(image, text, decoder, encoder_layers, decoder_layers, source)

    @classmethod
    def read_json(cls, path: Union[str, Path], encoder_layers: int, decoder_layers: int,
                  mapping: str = "proportional") -> "ExitReplay":
        """Read `mue_fairseq.cli.evaluate`'s exit statistics JSON; errors name the file."""
        stats = ExitStatistics.read_json(path)
        return cls.from_statistics(stats, encoder_layers, decoder_layers, mapping, source=str(path))

    def __len__(self) -> int:
        return len(self.image)

    # ------------------------------------------------------------------ cursor
    def rewind(self, position: int = 0) -> None:
        """The next batch starts at recorded sample `position` (modulo the recording)."""
        self._cursor = position % len(self)

    def sample_index(self, position: int) -> int:
        return position % len(self)

    def targets(self, position: int, num_steps: int) -> Tuple[int, int, List[int]]:
        """(image, text, decoder layers of steps 0..num_steps-1) replayed for the row that takes
        recorded position `position` (counted from a rewind to 0, cycling)."""
        i = self.sample_index(position)
        tokens = self.decoder[i]
        return self.image[i], self.text[i], [tokens[t % len(tokens)] for t in range(num_steps)]

    # ------------------------------------------------------------------ policy hooks
    def start_batch(self, batch_size: int, device) -> Tuple[Tensor, Tensor]:
        """Assign the next `batch_size` recorded samples to an encoder batch; returns their image
        and text exit layers (B,)."""
        self._batch = [self.sample_index(self._cursor + i) for i in range(batch_size)]
        self._cursor = self.sample_index(self._cursor + batch_size)
        self._rows = None
        recorded = [self.decoder[i] for i in self._batch]
        longest = max(len(tokens) for tokens in recorded)
        self._decoder_table = torch.tensor([tokens + [0] * (longest - len(tokens)) for tokens in recorded],
                                           dtype=torch.long, device=device)
        self._decoder_lengths = torch.tensor([len(tokens) for tokens in recorded], dtype=torch.long, device=device)
        image = torch.tensor([self.image[i] for i in self._batch], dtype=torch.long, device=device)
        text = torch.tensor([self.text[i] for i in self._batch], dtype=torch.long, device=device)
        return image, text

    def decoder_layers_at(self, step: int, num_rows: int, device) -> Tensor:
        """Exit layers (R,) of the rows of decoding step `step` of the current batch."""
        if not self._batch:
            raise RuntimeError("exit replay: the decoder ran before the encoder assigned a batch")
        if self._rows is None:
            if num_rows % len(self._batch):
                raise RuntimeError(f"exit replay: {num_rows} decoder rows for a batch of {len(self._batch)}")
            self._rows = num_rows
        elif num_rows != self._rows:
            raise RuntimeError(
                f"exit replay: the step has {num_rows} rows, the batch started with {self._rows}; a replay "
                "needs every row to decode to the same length (min_len = max_len)"
            )
        beam = num_rows // len(self._batch)
        samples = torch.arange(len(self._batch), device=self._decoder_table.device)
        layers = self._decoder_table[samples, step % self._decoder_lengths]  # cycling over each sample's tokens
        return layers.repeat_interleave(beam).to(device)
