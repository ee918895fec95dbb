"""Run OFA's evaluate.py as it is and record what its generator and answer scoring returned.

Runs with OFA's Python from OFA's `run_scripts/<task>/` folder (tools/record_ofa_vqa_grounding.sh):

    python ofa_observe_generation.py --record OUT.json -- DATA --path=CKPT --task=refcoco ...

Recorded, without changing OFA's results: every beam hypothesis of `OFATask.inference_step` (tokens,
score, positional scores) by sample id (refcoco, vqa_gen with --beam-search-vqa-eval), and for
vqa_gen's all-candidate scoring the (questions x candidates) score matrix of each batch, read from
the `torch.cat(..., dim=-1)` that `utils.eval_utils.eval_vqa_gen` concatenates its chunks with.
"""
import argparse
import json
import os
import sys

import torch


class _RecordingTorch:
    """Stands in for the name `torch` inside eval_utils; `cat` along the last dim is remembered."""

    def __init__(self):
        self.matrix = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def cat(self, tensors, dim=0, **kwargs):
        result = torch.cat(tensors, dim=dim, **kwargs)
        if dim == -1 and result.dim() == 2:
            self.matrix = result
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", required=True)
    parser.add_argument("evaluate_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    evaluate_args = args.evaluate_args[1:] if args.evaluate_args[:1] == ["--"] else args.evaluate_args
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "..")))

    import evaluate as ofa_evaluate
    from tasks.ofa_task import OFATask
    from utils import eval_utils

    record = {"hypotheses": {}, "candidate_scores": {}, "candidates": None, "torch": torch.__version__}
    original_step = OFATask.inference_step

    def inference_step(self, generator, models, sample, **kwargs):
        hypos = original_step(self, generator, models, sample, **kwargs)
        for sample_id, beams in zip(sample["id"].tolist(), hypos):
            record["hypotheses"][str(sample_id)] = [
                {"tokens": h["tokens"].tolist(), "score": float(h["score"]),
                 "positional_scores": h["positional_scores"].tolist()} for h in beams
            ]
        return hypos

    OFATask.inference_step = inference_step
    original_vqa = eval_utils.eval_vqa_gen

    def eval_vqa_gen(task, generator, models, sample, **kwargs):
        recorder = _RecordingTorch()
        eval_utils.torch = recorder
        try:
            results, scores = original_vqa(task, generator, models, sample, **kwargs)
        finally:
            eval_utils.torch = torch
        if recorder.matrix is not None:
            record["candidates"] = [task.index2ans[i] for i in range(len(task.index2ans))]
            for sample_id, row in zip(sample["id"].tolist(), recorder.matrix.tolist()):
                record["candidate_scores"][str(sample_id)] = row
        return results, scores

    eval_utils.eval_vqa_gen = eval_vqa_gen
    sys.argv = ["evaluate.py"] + evaluate_args
    ofa_evaluate.cli_main()
    with open(args.record, "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
