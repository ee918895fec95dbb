"""The synthetic task's generator settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from data_utils.synthetic.language import HYPOTHESIS_LEVELS
from mue_fairseq.metrics.synthetic_content import SHAPES


@dataclass
class SyntheticTaskConfig:
    """Knobs of the generator; the defaults give a task a small model learns in minutes on CPU."""

    image_size: int = field(default=96, metadata={"help": "canvas side in pixels"})
    min_objects: int = field(default=1, metadata={"help": "fewest shapes per scene"})
    max_objects: int = field(default=4, metadata={"help": "most shapes per scene (<= 5)"})
    hollow_prob: float = field(default=0.4, metadata={"help": "chance that a shape is drawn hollow"})
    clutter_levels: tuple[int, ...] = field(
        default=(0, 4, 10), metadata={"help": "number of grey clutter marks per clutter level"}
    )
    captions_per_image: int = field(default=2, metadata={"help": "caption rows per train image / refs per eval image"})
    hypotheses_per_image: int = field(default=2, metadata={"help": "SNLI-VE rows per image"})
    type_weights: dict[str, float] = field(
        default_factory=lambda: {
            "exists": 1.0,
            "hidden_property": 0.3,
            "count": 1.0,
            "attribute": 1.5,
            "colored_exists": 1.0,
            "relation": 2.5,
            "conjunction": 2.0,
        },
        metadata={"help": "relative frequency of each hypothesis type"},
    )

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(SHAPES)}")
        if self.image_size < 48:
            raise ValueError("image_size must be at least 48 pixels")
        if self.captions_per_image < 1 or self.hypotheses_per_image < 1:
            raise ValueError("captions_per_image and hypotheses_per_image must be >= 1")
        unknown = set(self.type_weights) - set(HYPOTHESIS_LEVELS)
        if unknown:
            raise ValueError(f"unknown hypothesis types {sorted(unknown)}; known: {sorted(HYPOTHESIS_LEVELS)}")
