"""A benchmark's generated block in BENCHMARKS.md: replaced in place on reruns, other sections untouched."""
import re
from pathlib import Path


def update_section(path: Path, heading: str, begin: str, end: str, body: str) -> None:
    """Put `body` between the `begin` and `end` markers of `path`; append `heading` and the block
    when the markers are absent."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)
