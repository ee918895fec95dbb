"""CIDEr-D without Java: the consensus caption metric used for OFA's in-training validation and SCST.

Formula (Vedantam et al. 2015, the "-D" variant of the COCO evaluation server): every sentence is a
bag of 1..n-grams weighted by tf-idf, ``tf * (log(N) - log(max(1, df)))``, where ``df`` counts the
images whose references contain the n-gram and ``N`` is the number of images. For each n the
candidate and each reference are compared by a cosine whose numerator clips the candidate weights
at the reference weights, multiplied by a Gaussian length penalty ``exp(-(len_c - len_r)^2 /
(2 sigma^2))``. The per-n similarities are averaged over n and over the references, then scaled by 10.

The document frequencies come either from the references being scored (``df="corpus"``) or from a
cached file (OFA's ``coco-valid-words.p`` / ``coco-train-words.p`` pickles, or a JSON written by
:func:`save_document_frequency`), which makes scores of small batches comparable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import string
from collections import Counter, defaultdict
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

NGram = tuple[str, ...]

# The word ending every sentence of OFA's SCST scoring and of its cached training n-grams.
CIDER_EOS = "<eos>"

_PUNCT_RE = re.compile("[" + re.escape(string.punctuation) + "]")


def simple_tokenize(sentence: str) -> list[str]:
    """Lower-case, turn ASCII punctuation into spaces and split on whitespace.

    This stands in for the PTB tokenizer on the Java-free path; text that is already lower-case and
    free of punctuation (OFA's detokenized hypotheses) passes through unchanged.
    """
    return _PUNCT_RE.sub(" ", sentence.lower()).split()


def count_ngrams(words: Sequence[str], n: int = 4) -> Counter:
    """Counts of all 1..n-grams of a token list."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def document_frequency(
    refs: Iterable[Sequence[str]], n: int = 4, end_word: str | None = None
) -> dict[NGram, float]:
    """Number of reference sets (images) in which each n-gram occurs at least once.

    ``refs`` yields, per image, its list of reference sentences (raw strings); ``end_word``, when
    given, ends every tokenized sentence (OFA's SCST n-grams end with ``<eos>``).
    """
    suffix = [end_word] if end_word else []
    df: Counter = Counter()
    for ref_list in refs:
        seen: set[NGram] = set()
        for ref in ref_list:
            seen.update(count_ngrams(simple_tokenize(ref) + suffix, n))
        df.update(seen)
    return {k: float(v) for k, v in df.items()}


def save_document_frequency(
    refs: Mapping[Hashable, Sequence[str]], path: str, n: int = 4, end_word: str | None = None
) -> None:
    """Cache the document frequencies of a reference corpus (``refs``: image -> its references).

    A path ending in ``.p`` / ``.pkl`` gets OFA's pickle layout (``coco-*-words.p``:
    ``{"document_frequency": {ngram tuple: count}, "ref_len": number of images}``); any other path
    gets JSON with n-grams joined by spaces and the number of images under ``num_images``.
    ``end_word="<eos>"`` ends every reference with that word, as the n-grams of OFA's
    ``coco-train-words.p`` (read by SCST, which scores sentences ending in ``<eos>``) do.
    """
    if not refs:
        raise ValueError("cannot compute document frequencies of an empty reference corpus")
    df = document_frequency(refs.values(), n, end_word)
    if path.endswith((".p", ".pkl")):
        # A defaultdict, as OFA's files hold: OFA's scorer looks up unseen n-grams without .get().
        with open(path, "wb") as f:
            # n-grams sorted: the same corpus gives the same bytes whatever the hash seed.
            table = defaultdict(float, sorted(df.items()))
            pickle.dump({"document_frequency": table, "ref_len": float(len(refs))}, f)
        return
    payload = {"n": n, "num_images": len(refs), "document_frequency": {" ".join(k): v for k, v in df.items()}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, sort_keys=True)


def load_document_frequency(path: str) -> tuple[dict[NGram, float], float]:
    """Read cached document frequencies: OFA's pickle or the JSON of :func:`save_document_frequency`.

    Returns ``(df, log(number of images))``. OFA's pickles store the number of images under
    ``ref_len`` and OFA's scorer takes its log when it loads them; so does this.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIDEr-D document-frequency file not found: {path}")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if isinstance(payload, dict) and "num_images" not in payload and "ref_len" in payload:
            raise ValueError(
                f"{path}: written by an earlier mue-fairseq (log of the image count under 'ref_len'); "
                "write it again with save_document_frequency"
            )
        size_key = "num_images"
    else:
        try:
            with open(path, "rb") as f:
                payload = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: not a CIDEr-D document-frequency pickle ({err})") from err
        size_key = "ref_len"
    return _statistics(payload, size_key, path)


def _statistics(payload, size_key: str, where: str) -> tuple[dict[NGram, float], float]:
    """(n-gram table, log(number of images)) from a loaded document-frequency payload."""
    for key in ("document_frequency", size_key):
        if not isinstance(payload, dict) or key not in payload:
            raise KeyError(f"{where}: missing key {key!r} in CIDEr-D document-frequency file")
    num_images = float(payload[size_key])
    if num_images < 1:
        raise ValueError(f"{where}: {size_key} must count the reference images (>= 1), got {num_images}")
    return _ngram_table(payload["document_frequency"]), math.log(num_images)


def _ngram_table(raw: Mapping) -> dict[NGram, float]:
    """Document frequencies keyed by n-gram tuples; string keys are space-joined n-grams."""
    return {(tuple(k.split(" ")) if isinstance(k, str) else tuple(k)): float(v) for k, v in raw.items()}


class CiderD:
    """CIDEr-D scorer.

    Args:
        df: ``"corpus"`` or ``None`` to take document frequencies from the references passed to
            :meth:`compute_score`; a path to a cached pickle/JSON; or a mapping in OFA's pickle
            layout ``{"document_frequency": {ngram_tuple: count}, "ref_len": number of images}``.
        n: largest n-gram order.
        sigma: standard deviation of the Gaussian length penalty.
        tokenize: sentence -> words. The default lower-cases and drops punctuation (a stand-in for
            the PTB tokenizer); OFA's in-training scorer splits on whitespace only (``str.split``).
    """

    def __init__(self, df: str | dict | None = None, n: int = 4, sigma: float = 6.0,
                 tokenize: Callable[[str], list[str]] = simple_tokenize) -> None:
        self.n = n
        self.sigma = sigma
        self.tokenize = tokenize
        self._df: dict[NGram, float] | None = None
        self._ref_len: float | None = None
        if isinstance(df, Mapping):
            self._df, self._ref_len = _statistics(df, "ref_len", "document-frequency mapping")
        elif df is not None and df != "corpus":
            self._df, self._ref_len = load_document_frequency(df)

    def _vector(
        self, counts: Counter, df: Mapping[NGram, float], ref_len: float
    ) -> tuple[list[dict[NGram, float]], np.ndarray, int]:
        vec: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        norm = np.zeros(self.n)
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            weight = float(tf) * (ref_len - math.log(max(1.0, df.get(ngram, 0.0))))
            vec[k][ngram] = weight
            norm[k] += weight * weight
            if k == 0:
                length += tf
        return vec, np.sqrt(norm), length

    def _similarity(self, hyp, ref) -> np.ndarray:
        vec_h, norm_h, len_h = hyp
        vec_r, norm_r, len_r = ref
        penalty = math.exp(-((len_h - len_r) ** 2) / (2.0 * self.sigma**2))
        val = np.zeros(self.n)
        for k in range(self.n):
            dot = 0.0
            for ngram, w_h in vec_h[k].items():
                w_r = vec_r[k].get(ngram)
                if w_r is not None:
                    dot += min(w_h, w_r) * w_r
            if norm_h[k] != 0 and norm_r[k] != 0:
                dot /= norm_h[k] * norm_r[k]
            val[k] = dot * penalty
        return val

    def compute_score(
        self, gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
    ) -> tuple[float, np.ndarray]:
        """Score one hypothesis per key against that key's references.

        Args:
            gts: key -> list of reference sentences (at least one).
            res: key -> list holding exactly one hypothesis; keys must equal those of ``gts``.

        Returns:
            ``(mean score, per-key scores in the order of res's keys)``.
        """
        if set(gts) != set(res):
            only_res = sorted(map(str, set(res) - set(gts)))[:5]
            only_gts = sorted(map(str, set(gts) - set(res)))[:5]
            raise KeyError(
                f"CIDEr-D: keys of gts and res differ (only in res: {only_res}, only in gts: {only_gts})"
            )
        if not res:
            raise ValueError("CIDEr-D: nothing to score")
        keys = list(res)
        hyp_counts = []
        ref_counts = []
        for key in keys:
            hyp = res[key]
            if isinstance(hyp, str) or len(hyp) != 1:
                raise ValueError(f"CIDEr-D: res[{key!r}] must be a list with one hypothesis, got {hyp!r}")
            refs = gts[key]
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"CIDEr-D: gts[{key!r}] must be a non-empty list of references")
            hyp_counts.append(count_ngrams(self.tokenize(hyp[0]), self.n))
            ref_counts.append([count_ngrams(self.tokenize(r), self.n) for r in refs])

        if self._df is None:
            df: Counter = Counter()
            for counts in ref_counts:
                df.update(set().union(*[c.keys() for c in counts]))
            doc_freq: Mapping[NGram, float] = df
            ref_len = math.log(float(len(ref_counts)))
        else:
            doc_freq, ref_len = self._df, self._ref_len

        scores = np.zeros(len(keys))
        for i, (h_counts, r_counts_list) in enumerate(zip(hyp_counts, ref_counts)):
            hyp = self._vector(h_counts, doc_freq, ref_len)
            total = np.zeros(self.n)
            for r_counts in r_counts_list:
                total += self._similarity(hyp, self._vector(r_counts, doc_freq, ref_len))
            scores[i] = float(np.mean(total)) / len(r_counts_list) * 10.0
        return float(np.mean(scores)), scores
