"""Cost of no-repeat n-gram blocking per decoding step, against no blocking.

Times `RepeatedNGramBlocker` (OFA's rule, vectorised) on the shapes of OFA's caption evaluation
(batch x beam rows, OFA's 59,457-word vocabulary, steps 1..max_len) and, for scale, one whole
beam-search evaluation of the shared OFA fixture (`../shared/ofa_cli/`) with and without
`--no-repeat-ngram-size 3` (both runs generate the full step budget, so the work is the same
apart from blocking).

    OMP_NUM_THREADS=1 python benchmarks/bench_ngram_blocking.py --out benchmarks/results/ngram_blocking.json
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import logging

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mue_fairseq.generation.ngram_blocking import RepeatedNGramBlocker  # noqa: E402


def time_calls(fn, repeats: int) -> float:
    """Fastest of `repeats` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def per_step_costs(rows: int, vocab: int, max_len: int, ngram: int, repeats: int) -> dict:
    """Seconds per step (mean over steps 1..max_len) to block, and to copy the scores (the floor)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 200, (rows, max_len + 2), generator=generator)
    tokens[:, 0] = 0
    lprobs = torch.randn(rows, vocab, generator=generator)
    blocker = RepeatedNGramBlocker(ngram)
    blocking, copying = [], []
    for step in range(1, max_len + 1):
        blocking.append(time_calls(lambda: blocker(tokens, lprobs.clone(), rows, 1, step), repeats))
        copying.append(time_calls(lambda: lprobs.clone(), repeats))
    block = sum(blocking) / len(blocking)
    copy = sum(copying) / len(copying)
    return {"rows": rows, "vocab": vocab, "max_len": max_len, "ngram": ngram,
            "seconds_per_step_blocking": block - copy, "seconds_per_step_clone_floor": copy}


def whole_evaluation(batch_size: int, repeats: int) -> dict:
    """Model time of the fixture's beam-2 caption evaluation with blocking 3 and 0 (fastest pass)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_ofa_cli_parity import generate_all, load_caption

    model, task = load_caption()
    out = {}
    for ngram in (0, 3):
        out[f"seconds_ngram_{ngram}"] = time_calls(lambda: generate_all(model, task, batch_size, ngram), repeats)
    out["blocking_share"] = 1 - out["seconds_ngram_0"] / out["seconds_ngram_3"]
    return {"batch_size": batch_size, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, force=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "load_avg_1min": os.getloadavg()[0]},
        "per_step": [per_step_costs(rows, 59457, 16, 3, args.repeats) for rows in (5, 80)],
        "evaluation": [whole_evaluation(bs, 3) for bs in (1, 4)],
    }
    for row in results["per_step"]:
        print(f"rows {row['rows']:3d} (batch x beam), vocab {row['vocab']}: blocking "
              f"{1e6 * row['seconds_per_step_blocking']:.0f} us/step "
              f"(copying the scores: {1e6 * row['seconds_per_step_clone_floor']:.0f} us)")
    for row in results["evaluation"]:
        print(f"fixture caption evaluation, batch {row['batch_size']}: {row['seconds_ngram_0']:.3f} s without, "
              f"{row['seconds_ngram_3']:.3f} s with 3-gram blocking ({100 * row['blocking_share']:.1f}% of the time)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
