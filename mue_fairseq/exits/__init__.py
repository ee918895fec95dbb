"""Exit options, similarity measures, threshold schedules, exit decisions and replays of recorded exits."""
from .config import MuEConfig, mue_overrides  # noqa: F401
