"""The MuE model (`mue_ofa`) built on the OFA core."""
from .mue_ofa import MuEOFAModel  # noqa: F401  (registers `mue_ofa` and its architectures)
