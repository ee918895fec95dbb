"""A built-in synthetic image-text task for trying MuE without OFA weights, COCO or SNLI-VE.

The command line of the generator (``python -m data_utils.synthetic_task --out DIR``); what it
writes is described in ``data_utils/synthetic/__init__.py``.
"""
from __future__ import annotations

import argparse
import json
import logging

from data_utils.synthetic import SyntheticTaskConfig, build_synthetic_task

logger = logging.getLogger(__name__)


def cli_main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=2000, help="train images")
    parser.add_argument("--num-valid", type=int, default=300, help="valid images")
    parser.add_argument("--num-test", type=int, default=300, help="test images")
    defaults = SyntheticTaskConfig()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--min-objects", type=int, default=defaults.min_objects)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--hollow-prob", type=float, default=defaults.hollow_prob)
    parser.add_argument("--captions-per-image", type=int, default=defaults.captions_per_image)
    parser.add_argument("--hypotheses-per-image", type=int, default=defaults.hypotheses_per_image)
    parser.add_argument(
        "--type-weights", default=None,
        help="JSON object overriding hypothesis type weights, e.g. '{\"relation\": 4}'",
    )
    args = parser.parse_args(argv)
    weights = dict(defaults.type_weights)
    if args.type_weights:
        weights.update(json.loads(args.type_weights))
    cfg = SyntheticTaskConfig(
        image_size=args.image_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        hollow_prob=args.hollow_prob,
        captions_per_image=args.captions_per_image,
        hypotheses_per_image=args.hypotheses_per_image,
        type_weights=weights,
    )
    paths = build_synthetic_task(args.out, args.seed, args.num_train, args.num_valid, args.num_test, cfg)
    logger.info("wrote %s", ", ".join(sorted(paths.values())))
    return paths


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
