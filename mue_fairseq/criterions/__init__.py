"""Training criteria; importing this package registers OFA's `adjust_label_smoothed_cross_entropy`,
`adjust_label_smoothed_encouraging_loss` and `scst_reward_criterion`, and MuE's `mue_layerwise_ce`
and `mue_layerwise_scst`."""
from . import encouraging_loss, label_smoothed_ce, layerwise_ce, layerwise_scst, scst  # noqa: F401
