"""Run the MuE authors' evaluate.py (Tangshengku/OFA) unchanged, recording each caption's beams and
the exit layers their code took.

Runs in the authors' environment (Python 3.8, torch 1.8.1; see setup_authors_env.sh), from their
`run_scripts/caption/` directory, with evaluate.py's own command line after `--`:

    python authors_observe.py --record OUT.json -- DATA --path=CKPT --user-dir=../../ofa_module \
        --task=caption --batch-size=1 ... --img_thres 0.99 --txt_thres 0.7 --decoder_thres 0.9 \
        --model-overrides="{..., 'train_mue': True}"

Their code decides exits inside the encoder's and decoder's layer loops (`break` once the cosine
of consecutive states exceeds the threshold) and keeps no record of it, so we observe the loops
from outside: a forward hook on every encoder and decoder layer logs the index of each layer that
runs. The encoder runs the text stream's loop, then the image stream's, each from layer 0, so a
batch's log splits into text depth then image depth; the decoder's log restarts at layer 0 every
step, giving the depth of each step. Their decisions are per batch (one cosine over the flattened
batch), so at batch 1 these are the sample's exits; the depths of a caption's tokens are those of
the steps that produced them. Hooks return nothing, so their results are unchanged.
"""
import argparse
import json
import os
import sys

import torch


RESIDUAL_BRANCH_OUTPUTS = ("self_attn.out_proj.weight", "self_attn.out_proj.bias", "encoder_attn.out_proj.weight",
                           "encoder_attn.out_proj.bias", "fc2.weight", "fc2.bias")


def scale_residual_branches(model, factor: float) -> int:
    """Multiply the output projections of every layer's residual branches (attention and FFN) by
    `factor`, in place; returns how many tensors changed. A stress test for exit decisions: layers
    of the tiny OFA-trained checkpoint barely move the residual stream, so every sample exits
    alike; larger branches spread the layer-to-layer cosines over the thresholds. Both sides apply
    the same change by parameter name, after loading, so the same weights are compared."""
    if factor == 1.0:
        return 0
    changed = 0
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith(RESIDUAL_BRANCH_OUTPUTS):
            param.data.mul_(factor)
            changed += 1
    if not changed:
        raise ValueError("no residual-branch parameters found to scale")
    return changed


def split_runs(calls):
    """Layer-index log -> depth of each loop (a new loop starts whenever layer 0 runs again)."""
    depths = []
    for index in calls:
        if index == 0 or not depths:
            depths.append(0)
        depths[-1] = index + 1
    return depths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True, help="JSON file to write the observations to")
    parser.add_argument("--residual-scale", type=float, default=1.0,
                        help="scale the layers' residual-branch outputs after loading (see scale_residual_branches)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then evaluate.py's arguments")
    args = parser.parse_args()
    evaluate_args = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "..")))

    import evaluate as authors_evaluate  # the authors' evaluate.py
    from utils import eval_utils

    record = {"samples": {}}
    encoder_calls, decoder_calls = [], []
    hooked = set()

    def hook(model):
        if id(model) in hooked:
            return
        hooked.add(id(model))
        scale_residual_branches(model, args.residual_scale)
        for calls, layers in ((encoder_calls, model.encoder.layers), (decoder_calls, model.decoder.layers)):
            for index, layer in enumerate(layers):
                layer.register_forward_hook(lambda module, inputs, output, i=index, log=calls: log.append(i))

    eval_caption = eval_utils.eval_caption

    def observed_eval_caption(task, generator, models, sample, **kwargs):
        hook(models[0])
        encoder_calls.clear()
        decoder_calls.clear()
        kept = {}
        inference_step = task.inference_step

        def keep_hypos(*a, **kw):
            kept["hypos"] = inference_step(*a, **kw)
            return kept["hypos"]

        task.inference_step = keep_hypos
        try:
            results, scores = eval_caption(task, generator, models, sample, **kwargs)
        finally:
            del task.inference_step
        streams = split_runs(encoder_calls)
        if len(streams) != 2:
            raise RuntimeError(f"expected a text loop then an image loop in the encoder, got depths {streams}")
        steps = split_runs(decoder_calls)
        for sample_id, beams, result in zip(sample["id"].tolist(), kept["hypos"], results):
            best = beams[0]
            record["samples"][str(sample_id)] = {
                "caption": result["caption"],
                "tokens": best["tokens"].tolist(),
                "score": float(best["score"]),
                "text_layers": streams[0],
                "image_layers": streams[1],
                # the steps that produced this caption's tokens (EOS included)
                "decoder_layers": steps[: len(best["tokens"])],
                "batch_size": len(sample["id"]),
            }
        return results, scores

    eval_utils.eval_caption = observed_eval_caption
    sys.argv = ["evaluate.py"] + evaluate_args
    authors_evaluate.cli_main()
    record["torch"] = torch.__version__
    with open(args.record, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
