"""Choosing exit thresholds from measured points: Pareto fronts and the fastest setting that
keeps a quality target. Pure functions over `SweepPoint`s; the sweep CLI (`mue_fairseq.cli.sweep`)
measures the points and writes them, the benchmarks reuse the front."""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")

STREAMS = ("image", "text", "decoder")
THRESHOLD_OPTIONS = tuple(f"mue_{stream}_threshold" for stream in STREAMS)
FULL_DEPTH = (1.0, 1.0, 1.0)
Thresholds = Tuple[float, float, float]


@dataclass
class SweepPoint:
    """One evaluated threshold setting."""

    thresholds: Thresholds
    metric: str
    quality: float
    num_samples: int
    mean_exit_layers: Dict[str, Optional[float]]
    expected_reduction_layers: Optional[float]
    expected_reduction_flops: Optional[float]
    ideal_speedup_flops: Optional[float]
    seconds: float
    scores: Dict[str, float] = field(default_factory=dict)

    @property
    def is_full_depth(self) -> bool:
        return all(value >= 1.0 for value in self.thresholds)

    @property
    def expected_time(self) -> float:
        """Expected time as a fraction of full depth: by FLOPs when known, else by layer count."""
        reduction = self.expected_reduction_flops
        if reduction is None:
            reduction = self.expected_reduction_layers
        return 1.0 - (reduction or 0.0)

    def as_options(self) -> Dict[str, float]:
        return dict(zip(THRESHOLD_OPTIONS, self.thresholds))

    def describe(self) -> str:
        return "img {:g} txt {:g} dec {:g}".format(*self.thresholds)


def keeps_target(quality: float, reference_quality: float, target: float) -> bool:
    """`quality` is at least `target` x `reference_quality` (full depth's, or another model's)."""
    return quality >= target * reference_quality


def meets_target(point: SweepPoint, reference: SweepPoint, target: float,
                 reference_quality: Optional[float] = None) -> bool:
    """Quality at least `target` x the full-depth quality, or x `reference_quality` when given (the
    quality of another model, e.g. the checkpoint a fine-tuning started from)."""
    base = reference.quality if reference_quality is None else reference_quality
    return keeps_target(point.quality, base, target)


def select_fastest(points: Sequence[SweepPoint], time_tolerance: float = 0.0) -> SweepPoint:
    """The point with the least measured time; points within `time_tolerance` (relative) of it
    count as tied and the one with the least expected time among them wins."""
    if not points:
        raise ValueError("no point to select from")
    fastest = min(point.seconds for point in points)
    tied = [point for point in points if point.seconds <= fastest * (1.0 + time_tolerance)]
    return min(tied, key=lambda point: (point.expected_time, point.seconds))


def calibrate(points: Sequence[SweepPoint], reference: SweepPoint, target: float,
              time_tolerance: float = 0.0, reference_quality: Optional[float] = None) -> SweepPoint:
    """The fastest point that keeps `target` x the reference's quality (or x `reference_quality`);
    the reference (full depth) when none does."""
    feasible = [point for point in points if meets_target(point, reference, target, reference_quality)]
    return select_fastest(feasible or [reference], time_tolerance)


def pareto_front(items: Sequence[T], cost: Callable[[T], float],
                 quality: Callable[[T], float] = lambda point: point.quality) -> List[T]:
    """The items no other item beats on both cost (lower) and quality (higher), cheapest first.

    Of items equal in cost only the best is kept, and an item must be strictly better than every
    cheaper one on the front.
    """
    front: List[T] = []
    for item in sorted(items, key=lambda item: (cost(item), -quality(item))):
        if not front or quality(item) > quality(front[-1]):
            front.append(item)
    return front
