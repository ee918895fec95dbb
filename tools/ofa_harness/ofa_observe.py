"""Run OFA's own evaluate.py unchanged, recording what its generator / answer scorer returned.

Runs in OFA's environment (Python 3.8, torch 1.8.1; see setup_ofa_env.sh), from OFA's
`run_scripts/<task>/` directory, with evaluate.py's own command line after `--`:

    python ofa_observe.py --record OUT.json -- DATA --path=CKPT --user-dir=../../ofa_module ...

It imports OFA's `evaluate` module and calls its `cli_main`; the only additions are observers:
caption: a wrapper around `OFATask.inference_step` that keeps every beam hypothesis (tokens, score,
positional scores) per sample id; SNLI-VE: a stand-in for the `torch` name inside
`utils.eval_utils` whose `cat` keeps the (rows x answers) score matrix `eval_snli_ve` builds before
its argmax. Both return exactly what OFA's code returns, so evaluate.py's results are unchanged.
"""
import argparse
import json
import os
import sys

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True, help="JSON file to write the observations to")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then evaluate.py's arguments")
    args = parser.parse_args()
    evaluate_args = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    ofa_root = os.path.abspath(os.path.join(os.getcwd(), "..", ".."))
    sys.path.insert(0, ofa_root)

    import evaluate as ofa_evaluate  # OFA's evaluate.py
    from tasks.ofa_task import OFATask
    from utils import eval_utils

    record = {"hypotheses": {}, "answer_scores": {}, "answer_order": None}

    inference_step = OFATask.inference_step

    def observed_inference_step(self, generator, models, sample, **kwargs):
        hypos = inference_step(self, generator, models, sample, **kwargs)
        for sample_id, beams in zip(sample["id"].tolist(), hypos):
            record["hypotheses"][str(sample_id)] = [
                {"tokens": h["tokens"].tolist(), "score": float(h["score"]),
                 "positional_scores": h["positional_scores"].tolist()} for h in beams]
        return hypos

    OFATask.inference_step = observed_inference_step

    class TorchWithObservedCat:
        """`torch` as eval_snli_ve sees it; `cat(..., dim=-1)` of score rows is recorded."""

        def __init__(self):
            self.last = None

        def __getattr__(self, name):
            return getattr(torch, name)

        def cat(self, tensors, dim=0, **kwargs):
            out = torch.cat(tensors, dim=dim, **kwargs)
            if dim == -1 and out.dim() == 2 and out.is_floating_point():
                self.last = out
            return out

    eval_snli_ve = eval_utils.eval_snli_ve

    def observed_eval_snli_ve(task, generator, models, sample, **kwargs):
        proxy = TorchWithObservedCat()
        eval_utils.torch = proxy
        try:
            results, scores = eval_snli_ve(task, generator, models, sample, **kwargs)
        finally:
            eval_utils.torch = torch
        record["answer_order"] = [task.index2ans[i] for i in range(len(task.index2ans))]
        for sample_id, row in zip(sample["id"].tolist(), proxy.last.tolist()):
            record["answer_scores"][str(sample_id)] = row
        return results, scores

    eval_utils.eval_snli_ve = observed_eval_snli_ve

    sys.argv = ["evaluate.py"] + evaluate_args
    ofa_evaluate.cli_main()
    record["torch"] = torch.__version__
    with open(args.record, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
