"""Prefix tree over the token sequences of a closed answer set.

SNLI-VE answers a question with one of a few fixed answers (" yes", " no",
" maybe"). Training masks (``constraint_masks``), candidate scoring and
constrained generation all ask the same question: after these answer tokens,
which tokens may come next? Sequences are stored without the leading bos and
usually end with eos, so ``next_tokens([])`` gives the first tokens of every
answer and ``next_tokens(answer)`` gives ``[eos]``.
"""

from typing import Dict, Iterable, List


class AnswerTrie:
    """Prefix tree of token-id sequences."""

    def __init__(self, eos: int):
        self.eos = eos
        self._root: Dict[int, dict] = {}

    def insert(self, tokens: Iterable[int]) -> None:
        """Add one sequence (typically answer tokens followed by eos)."""
        node = self._root
        for token in tokens:
            node = node.setdefault(int(token), {})

    def next_tokens(self, prefix: Iterable[int]) -> List[int]:
        """Tokens that may follow ``prefix`` (the tokens generated after bos), in insertion order.

        A prefix that leaves the tree allows only eos, as OFA's trie does; a
        complete sequence allows nothing.
        """
        node = self._root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return [self.eos]
        return list(node.keys())
