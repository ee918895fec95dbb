"""OFA-compatible model core: the `ofa` model, its layers and checkpoint loading."""
from .checkpoint import allow_fairseq_checkpoint_globals
from .model import OFAModel  # noqa: F401  (registers `ofa` and its architectures)

allow_fairseq_checkpoint_globals()
