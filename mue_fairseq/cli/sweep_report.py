"""What a threshold sweep writes: one CSV row per point and the Pareto plot (quality against
measured and expected time). The points and fronts come from `mue_fairseq.exits.selection`;
`mue_fairseq.cli.sweep` measures them."""
import csv
from pathlib import Path
from typing import Optional, Sequence

from mue_fairseq.exits.selection import SweepPoint, meets_target, pareto_front

CSV_COLUMNS = (
    "image_threshold", "text_threshold", "decoder_threshold", "full_depth", "metric", "quality",
    "num_samples", "image_layers", "text_layers", "decoder_layers", "expected_reduction_layers",
    "expected_reduction_flops", "ideal_speedup_flops", "seconds", "measured_speedup", "meets_target",
    "pareto_measured", "pareto_expected",
)


def write_csv(points: Sequence[SweepPoint], reference: SweepPoint, target: float, path: Path,
              reference_quality: Optional[float] = None) -> Path:
    """One row per point, full depth first; fronts and target computed over all points."""
    measured = {p.thresholds for p in pareto_front(points, lambda p: p.seconds)}
    expected = {p.thresholds for p in pareto_front(points, lambda p: p.expected_time)}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for point in sorted(points, key=lambda p: not p.is_full_depth):
            writer.writerow(_blank_none({
                "image_threshold": point.thresholds[0], "text_threshold": point.thresholds[1],
                "decoder_threshold": point.thresholds[2], "full_depth": int(point.is_full_depth),
                "metric": point.metric, "quality": point.quality, "num_samples": point.num_samples,
                "image_layers": point.mean_exit_layers.get("image"),
                "text_layers": point.mean_exit_layers.get("text"),
                "decoder_layers": point.mean_exit_layers.get("decoder"),
                "expected_reduction_layers": point.expected_reduction_layers,
                "expected_reduction_flops": point.expected_reduction_flops,
                "ideal_speedup_flops": point.ideal_speedup_flops, "seconds": point.seconds,
                "measured_speedup": reference.seconds / point.seconds if point.seconds else None,
                "meets_target": int(meets_target(point, reference, target, reference_quality)),
                "pareto_measured": int(point.thresholds in measured),
                "pareto_expected": int(point.thresholds in expected),
            }))
    return path


def plot_pareto(points: Sequence[SweepPoint], reference: SweepPoint, path: Path, target: Optional[float] = None,
                chosen: Optional[SweepPoint] = None, reference_quality: Optional[float] = None) -> Path:
    """Quality vs measured time (left) and vs expected time (right), Pareto fronts highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    panels = (
        (lambda p: p.seconds, "measured model time (s)"),
        (lambda p: p.expected_time, "expected time (fraction of full depth, "
         + ("FLOPs)" if reference.expected_reduction_flops is not None else "layers)")),
    )
    for index, (time, label) in enumerate(panels):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.scatter([time(p) for p in points], [p.quality for p in points], s=18, color="0.6", label="points")
        front = pareto_front(points, time)
        axes.plot([time(p) for p in front], [p.quality for p in front], "-o", color="tab:red", markersize=5,
                  drawstyle="steps-post", label="Pareto front")
        for point in front:
            axes.annotate("{:g}/{:g}/{:g}".format(*point.thresholds), (time(point), point.quality),
                          textcoords="offset points", xytext=(3, 4), fontsize=6)
        axes.scatter([time(reference)], [reference.quality], marker="s", s=50, color="black", label="full depth",
                     zorder=3)
        if target is not None:
            base = reference.quality if reference_quality is None else reference_quality
            axes.axhline(target * base, linestyle="--", color="tab:green", linewidth=1,
                         label=f"target {target:g} x {'full' if reference_quality is None else f'{base:.2f}'}")
        if chosen is not None:
            axes.scatter([time(chosen)], [chosen.quality], marker="*", s=160, color="gold", edgecolors="black",
                         label="calibrated", zorder=4)
        axes.set_xlabel(label)
        axes.set_ylabel(reference.metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"MuE threshold sweep (labels: image/text/decoder thresholds), {len(points)} points",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _blank_none(row: dict) -> dict:
    return {key: "" if value is None else value for key, value in row.items()}
