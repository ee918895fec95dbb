"""Do the built-in task's captions say what is in the picture? Content accuracy at every static depth.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/caption_content.py \
        --work-dir work_dirs/exit_policies_depth --out benchmarks/results/caption_content.json

CIDEr-D rewards n-grams shared with the references; on the synthetic task most of them are template
words ("a large ... on the right"), so a model that gets every colour and shape wrong can still score
well. This check reads the generator's scene records (`caption_test.meta.jsonl`) and counts a caption
as right when the (colour, shape) pairs it names are exactly the scene's ("hollow" counts as a
colour). It evaluates full depth and static depth 5..1 on the test split, with the quickstart's
decoding options, and writes CIDEr-D and content accuracy per depth.
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

from bench_exit_policies import evaluate_point, static_depth_options  # noqa: E402
from mue_fairseq.metrics.synthetic_content import caption_content_accuracy, load_meta  # noqa: E402
from mue_fairseq.cli import quickstart  # noqa: E402

logger = logging.getLogger("caption_content")


def main(argv=None) -> Dict:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="quickstart-style work dir (data/, checkpoints_caption/)")
    parser.add_argument("--bpe-dir", default=str(REPO.parent / "shared" / "ofa_bpe"))
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--checkpoint", default=None,
                        help="caption checkpoint (default: WORK_DIR/checkpoints_caption/checkpoint_last.pt)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    data = work / "data"
    checkpoint = Path(args.checkpoint or work / "checkpoints_caption" / "checkpoint_last.pt")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no caption checkpoint at {checkpoint}")
    models, task, cfg = quickstart.load("caption", checkpoint, data, args.bpe_dir, 16)
    task.cfg.data = str(data / "caption_test.tsv")
    meta = load_meta(str(data / "caption_test.meta.jsonl"))
    layers = models[0].args.decoder_layers
    results = {}
    for depth in range(layers, 0, -1):
        options = {} if depth == layers else static_depth_options(depth)
        result, _ = evaluate_point(models, task, cfg, options, "test", "score")
        results[depth] = {"cider_d": result.quality(),
                          "content_accuracy": caption_content_accuracy(result.predictions, meta),
                          "num_samples": result.num_samples, "first_captions": [
                              p["caption"] for p in result.predictions[:3]]}
        logger.info("depth %d: CIDEr-D %.2f, content accuracy %.1f%%", depth, results[depth]["cider_d"],
                    results[depth]["content_accuracy"])
    Path(args.out).write_text(json.dumps({"checkpoint": str(checkpoint), "depths": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
