"""OFA's dictionary and GPT-2 BPE, built from a local BPE directory.

A BPE directory holds ``dict.txt`` (fairseq dictionary of GPT-2 BPE ids),
``encoder.json`` and ``vocab.bpe`` (the GPT-2 byte-pair merges). OFA's tasks load
``dict.txt`` and then append ``<mask>``, the image-code tokens ``<code_i>`` and
the location bins ``<bin_i>``; with OFA's files and defaults that gives 59,457
entries, and checkpoint embeddings are indexed by these ids. Text is encoded as
``" " + text`` -> BPE ids -> dictionary ids, without eos (datasets add bos/eos).
"""

import os
from typing import Iterable, List, Optional, Union

import torch
from fairseq.data import Dictionary
from fairseq.data.encoders.gpt2_bpe import GPT2BPE, GPT2BPEConfig

BPE_DIR_FILES = ("dict.txt", "encoder.json", "vocab.bpe")
# GPT-2's byte-level space: a symbol given with it decodes as a separate word.
_GPT2_SPACE = "\u0120"


def check_bpe_dir(bpe_dir: Optional[str]) -> str:
    """Return ``bpe_dir`` if it holds OFA's three BPE files, else raise naming what is missing."""
    if not bpe_dir:
        raise ValueError("--bpe-dir is required: a directory with " + ", ".join(BPE_DIR_FILES))
    if not os.path.isdir(bpe_dir):
        raise FileNotFoundError(
            f"--bpe-dir {bpe_dir} does not exist or is not a directory "
            f"(expected one holding {', '.join(BPE_DIR_FILES)})"
        )
    missing = [name for name in BPE_DIR_FILES if not os.path.isfile(os.path.join(bpe_dir, name))]
    if missing:
        raise FileNotFoundError(f"--bpe-dir {bpe_dir} lacks {', '.join(missing)}")
    return bpe_dir


def load_ofa_dictionary(bpe_dir: str, code_dict_size: int = 8192, num_bins: int = 1000) -> Dictionary:
    """fairseq dictionary of ``bpe_dir/dict.txt`` plus ``<mask>``, ``<code_*>`` and ``<bin_*>``, in OFA's order."""
    check_bpe_dir(bpe_dir)
    dictionary = Dictionary.load(os.path.join(bpe_dir, "dict.txt"))
    dictionary.add_symbol("<mask>")
    for i in range(code_dict_size):
        dictionary.add_symbol(f"<code_{i}>")
    for i in range(num_bins):
        dictionary.add_symbol(f"<bin_{i}>")
    return dictionary


def build_gpt2_bpe(bpe_dir: str) -> GPT2BPE:
    """fairseq's GPT-2 BPE reading ``encoder.json``/``vocab.bpe`` from ``bpe_dir`` (no download)."""
    check_bpe_dir(bpe_dir)
    cfg = GPT2BPEConfig(
        gpt2_encoder_json=os.path.join(bpe_dir, "encoder.json"),
        gpt2_vocab_bpe=os.path.join(bpe_dir, "vocab.bpe"),
    )
    return GPT2BPE(cfg)


def encode_text(text: str, bpe: GPT2BPE, dictionary: Dictionary) -> torch.LongTensor:
    """Dictionary ids of ``text`` as OFA encodes it (the caller adds the leading space); no eos."""
    return dictionary.encode_line(
        line=bpe.encode(text), add_if_not_exist=False, append_eos=False
    ).long()


def decode_tokens(
    tokens: Iterable[int],
    bpe: GPT2BPE,
    dictionary: Dictionary,
    unk_string: str = "<unk>",
) -> str:
    """Text of dictionary ids; bos, eos and pad are dropped, ``<unk>`` becomes ``unk_string``.

    Symbols outside the GPT-2 vocabulary (``<mask>``, ``<code_*>``, ``<bin_*>``,
    ``unk_string``) are written as they are, glued to their neighbours: OFA's GPT2BPE.decode
    joins them without a space ("a<code_5> dog"), and OFA's (and the MuE authors') captions
    are that text without punctuation ("acode5 dog").
    """
    skip = {dictionary.bos(), dictionary.eos(), dictionary.pad()}
    pieces: List[Union[int, str]] = []
    for token in tokens:
        token = int(token)
        if token in skip:
            continue
        symbol = unk_string if token == dictionary.unk() else dictionary[token]
        if symbol.isdigit():
            pieces.append(int(symbol))
        else:
            pieces.append(symbol)
    return bpe.bpe.decode(pieces)


class SymbolAwareGPT2BPE:
    """GPT-2 BPE whose ``decode`` passes OFA's added symbols (``<bin_i>``, ``<code_i>``) through as
    words, so fairseq-generate can print location tokens (fairseq's decode reads every non-special
    symbol as a BPE id)."""

    def __init__(self, bpe: GPT2BPE):
        self.bpe_model = bpe

    def encode(self, text: str) -> str:
        return self.bpe_model.encode(text)

    def decode(self, text: str) -> str:
        pieces: List[Union[int, str]] = []
        for symbol in text.split():
            if symbol.isdigit():
                pieces.append(int(symbol))
            else:
                pieces.append(symbol if symbol in ("<unk>", "<mask>") else _GPT2_SPACE + symbol)
        return self.bpe_model.bpe.decode(pieces).strip()

    def is_beginning_of_word(self, x: str) -> bool:
        return self.bpe_model.is_beginning_of_word(x)
