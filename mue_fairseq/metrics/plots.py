"""Histograms of exit layers (image stream, text stream, decoder tokens) as PNG files.

The figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display), and
written next to the exit-statistics JSON they come from: `<name>.json` gives
`<name>.image_exits.png`, `<name>.text_exits.png` and `<name>.decoder_exits.png`.
"""
import logging
from pathlib import Path
from typing import Dict, List, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .exit_stats import STREAMS, ExitStatistics

logger = logging.getLogger(__name__)

_TITLES = {
    "image": "image stream: layers run per sample",
    "text": "text stream: layers run per sample",
    "decoder": "decoder: layers run per token",
}


def plot_histogram(counts: List[int], title: str, path: Union[str, Path], unit: str) -> Path:
    """One bar chart of `counts[i]` = number of samples/tokens that ran i layers (i >= 1; an image
    stream's count at 0, samples without an image, goes into the title)."""
    figure = Figure(figsize=(4.5, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    layers = list(range(1, len(counts)))
    ran = counts[1:]
    total = sum(ran)
    axes.bar(layers, ran, color="tab:blue", width=0.8)
    axes.set_xticks(layers)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("exit layer (layers run)")
    axes.set_ylabel(unit)
    mean = sum(i * c for i, c in zip(layers, ran)) / total if total else 0.0
    extra = f", {counts[0]} without image" if counts[0] else ""
    axes.set_title(f"{title}\nn={total}, mean={mean:.2f}{extra}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def plot_exit_histograms(json_path: Union[str, Path]) -> Dict[str, Path]:
    """Write one histogram per stream next to an exit-statistics JSON; returns stream -> PNG path."""
    json_path = Path(json_path)
    stats = ExitStatistics.read_json(json_path)
    histograms = stats.histograms()
    stem = json_path.with_suffix("")
    written = {}
    for stream in STREAMS:
        unit = "tokens" if stream == "decoder" else "samples"
        written[stream] = plot_histogram(
            histograms[stream], _TITLES[stream], f"{stem}.{stream}_exits.png", unit
        )
    logger.info("wrote exit histograms %s", ", ".join(str(p) for p in written.values()))
    return written
