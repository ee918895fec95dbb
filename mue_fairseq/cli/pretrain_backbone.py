"""Pre-train OFA's ResNet backbone on the built-in task's scenes, for ``--resnet-model-path``.

OFA never trains its ResNet from scratch: it starts from ImageNet weights, so its encoder sees
objects before any caption or entailment training. The built-in task has no such weights, and a
small model trained from scratch on it learns the caption language but not the pictures (its
captions name the right coloured shapes in ~4% of images). This stage is the built-in stand-in
for ImageNet: the ResNet learns to name what each cell of the scene grid holds (size, colour and
shape, or nothing), from the generator's scene records, so its feature map says what is where.

    python -m mue_fairseq.cli.pretrain_backbone --data DIR/caption_train.tsv --out resnet.pt

The saved file is the ResNet's state dict alone (the keys of ``encoder.embed_images``), which
``--resnet-model-path`` loads when a model is built; a JSON with the held-out cell accuracy is
written beside it.
"""
import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mue_fairseq.metrics.synthetic_content import COLOR_WORDS, GRID, HOLLOW, SHAPES, SIZES, load_meta
from mue_fairseq.data.image_transform import (
    OFA_DEFAULT_MEAN, OFA_DEFAULT_STD, PatchImageTransform, decode_base64_image,
)
from mue_fairseq.ofa.resnet import build_resnet

logger = logging.getLogger("mue_fairseq.pretrain_backbone")

# One class per (size, colour, shape) an object can have, plus 0 for an empty cell.
CELL_CLASSES = ["empty"] + [
    f"{size} {colour} {shape}" for size in SIZES for colour in sorted(COLOR_WORDS) + [HOLLOW] for shape in SHAPES
]
_CLASS_INDEX = {name: i for i, name in enumerate(CELL_CLASSES)}


def cell_targets(record: Dict, path: str) -> List[int]:
    """The GRID*GRID cell classes of a scene from its meta record ("large red circle r0c2")."""
    cells = [0] * (GRID * GRID)
    for obj in record["objects"]:
        *name, where = obj.split()
        key = " ".join(name)
        if key not in _CLASS_INDEX or len(where) != 4 or where[0] != "r" or where[2] != "c":
            raise ValueError(f"{path}: image {record.get('image_id')}: cannot read object {obj!r}")
        cells[int(where[1]) * GRID + int(where[3])] = _CLASS_INDEX[key]
    return cells


def load_scenes(tsv_path: str, patch_image_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distinct images of a synthetic caption TSV (uint8, N x 3 x S x S) and their cell targets."""
    meta_path = str(Path(tsv_path).with_suffix(".meta.jsonl"))
    if not Path(tsv_path).is_file():
        raise FileNotFoundError(f"no caption TSV at {tsv_path}")
    if not Path(meta_path).is_file():
        raise FileNotFoundError(f"{tsv_path}: no scene records beside it ({meta_path}); "
                                "backbone pre-training needs the synthetic task's meta files")
    meta = load_meta(meta_path)
    resize = PatchImageTransform(patch_image_size, mean=(0, 0, 0), std=(1 / 255,) * 3)
    images, targets, seen = [], [], set()
    csv.field_size_limit(sys.maxsize)
    with open(tsv_path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) != 5:
                raise ValueError(f"{tsv_path}:{line_no}: expected 5 caption columns, got {len(row)}")
            if not row[0].strip().isdigit():
                raise ValueError(f"{tsv_path}:{line_no}: uniq-id {row[0]!r} is not a number")
            uniq_id, image_id, image_b64 = int(row[0]), row[1], row[4]
            if image_id in seen:
                continue
            seen.add(image_id)
            if uniq_id not in meta:
                raise ValueError(f"{tsv_path}:{line_no}: row {uniq_id} has no record in {meta_path}")
            image = decode_base64_image(image_b64, f"{tsv_path}:{line_no}")
            images.append(resize(image).round().clamp(0, 255).to(torch.uint8))
            targets.append(cell_targets(meta[uniq_id], meta_path))
    return torch.stack(images), torch.tensor(targets, dtype=torch.long)


class CellClassifier(nn.Module):
    """ResNet feature map -> GRID x GRID average pool -> linear class scores per cell."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet
        self.head = nn.Conv2d(resnet.out_channels, len(CELL_CLASSES), kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(self.resnet(images), GRID)
        return self.head(cells).flatten(2)  # B x classes x cells


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> OFA's default normalisation, as the tasks apply it."""
    mean = torch.tensor(OFA_DEFAULT_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(OFA_DEFAULT_STD).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def cell_accuracy(model: CellClassifier, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> Dict:
    model.eval()
    right_cells, right_objects, objects = 0, 0, 0
    for start in range(0, len(images), batch_size):
        predicted = model(normalise(images[start:start + batch_size])).argmax(1)
        target = targets[start:start + batch_size]
        right_cells += (predicted == target).sum().item()
        occupied = target != 0
        right_objects += (predicted[occupied] == target[occupied]).sum().item()
        objects += occupied.sum().item()
    model.train()
    return {"cell_accuracy": 100.0 * right_cells / targets.numel(),
            "object_accuracy": 100.0 * right_objects / max(objects, 1)}


def pretrain(args: argparse.Namespace) -> Dict:
    torch.manual_seed(args.seed)
    images, targets = load_scenes(args.data, args.patch_image_size)
    valid_images, valid_targets = load_scenes(args.valid_data, args.patch_image_size) if args.valid_data else (None, None)
    logger.info("%d train scenes%s, %d cell classes", len(images),
                f", {len(valid_images)} held-out scenes" if valid_images is not None else "", len(CELL_CLASSES))
    model = CellClassifier(build_resnet(args.resnet_type, False, 0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(args.steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    started, running = time.time(), []
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(images), (args.batch_size,), generator=generator)
        batch_images, batch_targets = images[batch], targets[batch].view(-1, GRID, GRID)
        if args.flip:  # mirror half the batch with its cell grid: more layouts from the same scenes
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch_images = torch.where(flip[:, None, None, None], batch_images.flip(-1), batch_images)
            batch_targets = torch.where(flip[:, None, None], batch_targets.flip(-1), batch_targets)
        loss = F.cross_entropy(model(normalise(batch_images)), batch_targets.flatten(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % args.log_interval == 0 or step == args.steps:
            logger.info("step %d/%d | loss %.3f | lr %.2e | %.1f s", step, args.steps, np.mean(running),
                        schedule.get_last_lr()[0], time.time() - started)
            running = []
    result = {"steps": args.steps, "train_scenes": len(images), "seconds": round(time.time() - started, 1)}
    if valid_images is not None:
        result.update(cell_accuracy(model, valid_images, valid_targets, 4 * args.batch_size))
        logger.info("held-out scenes: cell accuracy %.1f%%, object accuracy %.1f%% (size, colour and shape right)",
                    result["cell_accuracy"], result["object_accuracy"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.resnet.state_dict(), out)
    out.with_suffix(".json").write_text(json.dumps({**vars(args), **result}, indent=1) + "\n")
    logger.info("wrote %s", out)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="synthetic caption TSV (train split); its .meta.jsonl beside it")
    parser.add_argument("--valid-data", default=None, help="held-out caption TSV for the reported cell accuracy")
    parser.add_argument("--out", required=True, help="where to write the ResNet state dict (.pt)")
    parser.add_argument("--resnet-type", default="resnet18", help="OFA ResNet type, as --resnet-type")
    parser.add_argument("--patch-image-size", type=int, default=64, help="as the task's --patch-image-size")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="scenes per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal mirroring")
    parser.add_argument("--log-interval", type=int, default=50, help="steps between progress lines")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def cli_main(argv=None) -> Dict:
    # force: importing fairseq has already configured the root logger at DEBUG (PIL floods it)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    return pretrain(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli_main()
