"""When does a caption model trained from scratch start reading the picture? Loss curves per recipe.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grounding_curves.py --data work_dirs/grounding/data \\
        --resnet work_dirs/exit_policies_backbone/backbone_resnet_600_steps.pt --out benchmarks/results/grounding_curves

Trains the quickstart's caption model (its options and data pipeline; the last layer's plain
cross-entropy) for a few hundred updates under each recipe, from the same initialisation and on
the same batches, and records the training loss:

* ``no_picture``: every image blanked, so the loss can only fall to what the caption language
  alone predicts: the floor a model that does not read the picture stays on;
* ``ofa``: the plain recipe;
* ``encoder_1_layer`` / ``decoder_1_layer``: the same with a one-layer encoder / decoder;
* ``encoder_held``: the encoder layers get no updates (``--freeze-encoder-layers-updates``
  covering the whole run), everything else trains.

A curve well below ``no_picture`` reads the picture. The ResNet is the pre-trained backbone, held
fixed, as in the exit-policy benchmark. Writes ``<out>.json`` and ``<out>.png``.
"""
import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("grounding_curves")

RECIPES = {
    "no_picture": [],
    "ofa": [],
    "encoder_1_layer": ["--encoder-layers", "1"],
    "decoder_1_layer": ["--decoder-layers", "1"],
    "encoder_held": ["--freeze-encoder-layers-updates", "1000000"],
}


def build(data: Path, bpe_dir: str, resnet: str, extra: List[str]):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from mue_fairseq.cli import quickstart

    argv = [f"{data / 'caption_train.tsv'},{data / 'caption_valid.tsv'}", "--user-dir", str(REPO / "mue_fairseq"),
            "--task", "caption", "--bpe-dir", bpe_dir, *quickstart.TASKS["caption"]["task_args"],
            *quickstart.MODEL_ARGS, "--resnet-model-path", resnet, "--freeze-resnet", "--freeze-resnet-weights",
            "--criterion", "cross_entropy", "--cpu", *extra]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    torch.manual_seed(1)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    return task, task.build_model(cfg.model)


def train_curve(recipe: str, data: Path, bpe_dir: str, resnet: str, steps: int, batch_size: int, lr: float,
                warmup: int, every: int) -> List[float]:
    """Mean training loss (nats per token) of each block of `every` updates."""
    task, model = build(data, bpe_dir, resnet, RECIPES[recipe])
    dataset = task.dataset("train")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rng = random.Random(1)  # the same batches for every recipe
    model.train()
    losses, curve, started = [], [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        sample = dataset.collater([dataset[rng.randrange(len(dataset))] for _ in range(batch_size)])
        if recipe == "no_picture":
            sample["net_input"]["patch_images"].zero_()
        model.set_num_updates(step)
        log_probs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        loss = torch.nn.functional.nll_loss(log_probs.flatten(0, 1), sample["target"].flatten(),
                                            ignore_index=task.tgt_dict.pad())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % every == 0:
            curve.append(sum(losses[-every:]) / every)
            logger.info("%s: update %d, loss %.3f (%.0f s)", recipe, step + 1, curve[-1], time.time() - started)
    return curve


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    every = result["every"]
    for recipe, curve in result["curves"].items():
        ax.plot([every * (i + 1) for i in range(len(curve))], curve, label=recipe,
                linestyle="--" if recipe == "no_picture" else "-")
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_ylim(0, 2.0)
    ax.set_title(f"captions of {result['data']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> Dict:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of the synthetic task's TSVs")
    parser.add_argument("--resnet", required=True, help="pre-trained ResNet state dict (pretrain_backbone's output)")
    parser.add_argument("--bpe-dir", default=str(REPO.parent / "shared" / "ofa_bpe"))
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the quickstart's)")
    parser.add_argument("--warmup", type=int, default=30, help="linear warm-up updates, then constant")
    parser.add_argument("--every", type=int, default=25, help="updates per logged mean")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .png are written)")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {sorted(RECIPES)}")
    import mue_fairseq  # noqa: F401  (registers the tasks and models)

    command = " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python "
                         f"benchmarks/grounding_curves.py {command}",
              "data": args.data, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "warmup": args.warmup, "every": args.every, "curves": {}}
    for recipe in recipes:
        result["curves"][recipe] = train_curve(recipe, Path(args.data), args.bpe_dir, args.resnet, args.steps,
                                               args.batch_size, args.lr, args.warmup, args.every)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    logger.info("wrote %s and %s", out.with_suffix(".json"), out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
