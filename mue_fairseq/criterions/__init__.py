"""Training criteria; importing this package registers `adjust_label_smoothed_cross_entropy` and `mue_layerwise_ce`."""
from . import label_smoothed_ce, layerwise_ce  # noqa: F401
