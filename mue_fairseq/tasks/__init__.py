"""OFA-format tasks; importing this package registers `caption`, `snli_ve`, `refcoco` and `vqa_gen` with fairseq."""
from . import caption, refcoco, snli_ve, vqa_gen  # noqa: F401
