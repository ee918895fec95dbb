"""OFA-format tasks; importing this package registers `caption` and `snli_ve` with fairseq."""
from . import caption, snli_ve  # noqa: F401
