"""Exit options, similarity measures, threshold schedules and exit decisions."""
from .config import MuEConfig, mue_overrides  # noqa: F401
