"""Where does a built-in-task model lose the picture? Linear probes of each grid cell's object.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grounding_probe.py --work-dir work_dirs/exit_policies_backbone \
        --checkpoint work_dirs/exit_policies_backbone/checkpoints_caption/checkpoint_last.pt --out probe.json

For the caption model's image positions, it pools features to the scene's 3 x 3 grid and fits a
logistic regression (the classes of `pretrain_backbone`: empty, or size + colour + shape) on
training scenes, scored on the validation scenes, at two places: the ResNet's output and the
encoder's output (image stream, full depth). With `--resnet` the ResNet's weights are first
replaced by a backbone file (e.g. the pre-trained one, to tell a lost backbone from a lost
encoder). It also reports how much the encoder's image positions still differ from each other.
"""
import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mue_fairseq.cli import quickstart  # noqa: E402
from mue_fairseq.cli.pretrain_backbone import CELL_CLASSES, GRID, load_scenes, normalise  # noqa: E402

logger = logging.getLogger("grounding_probe")


@torch.no_grad()
def cell_features(model, dictionary, images: torch.Tensor, batch_size: int = 50) -> Dict[str, torch.Tensor]:
    """Per-cell features (N x GRID*GRID x C) at the ResNet's and the encoder's output, plus the mean
    standard deviation of the encoder's image states across positions and across images."""
    encoder = model.encoder
    pooled = {"resnet": [], "encoder": []}
    spread = []
    for start in range(0, len(images), batch_size):
        pixels = normalise(images[start:start + batch_size])
        batch = pixels.size(0)
        resnet = encoder.embed_images(pixels)
        pooled["resnet"].append(F.adaptive_avg_pool2d(resnet, GRID).flatten(2).transpose(1, 2))
        # The shortest prompt (bos, eos): the image stream does not see the text in the decomposed encoder.
        tokens = torch.tensor([[dictionary.bos(), dictionary.eos()]]).expand(batch, -1)
        out = encoder(tokens, src_lengths=torch.full((batch,), 2), patch_images=pixels,
                      patch_masks=torch.ones(batch, dtype=torch.bool))
        height, width = resnet.shape[-2:]
        image_states = out["encoder_out"][0][: height * width].transpose(0, 1)  # B x N x C
        spread.append((image_states.std(1).mean(), image_states.mean(1)))
        grid = image_states.transpose(1, 2).reshape(batch, -1, height, width)
        pooled["encoder"].append(F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2))
    features = {name: torch.cat(parts) for name, parts in pooled.items()}
    features["across_positions"] = torch.stack([s for s, _ in spread]).mean()
    features["across_images"] = torch.cat([m for _, m in spread]).std(0).mean()
    return features


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          steps: int = 300) -> Dict[str, float]:
    """Multinomial logistic regression (Adam, small L2) on standardised features; held-out accuracy."""
    train_x, test_x = train_x.flatten(0, 1), test_x.flatten(0, 1)
    train_y, test_y = train_y.flatten(), test_y.flatten()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.size(1), len(CELL_CLASSES), requires_grad=True)
    bias = torch.zeros(len(CELL_CLASSES), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 1e-4 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(1)
    occupied = test_y != 0
    return {"cell_accuracy": 100.0 * (predicted == test_y).float().mean().item(),
            "object_accuracy": 100.0 * (predicted[occupied] == test_y[occupied]).float().mean().item()}


@torch.no_grad()
def word_losses(model, task, valid_file: Path, rows: int = 320) -> Dict[str, Dict[str, float]]:
    """Teacher-forced loss and accuracy of the reference caption's words, by kind (colour, shape,
    size, other): does the decoder read the picture, or only the caption language? With no
    picture, a shape word costs ln 5 = 1.61 nats (5 shapes, uniform) and 20% accuracy."""
    from mue_fairseq.metrics.synthetic_content import COLOR_WORDS, HOLLOW, SHAPES, SIZES

    kinds = {**{w: "colour" for w in list(COLOR_WORDS) + [HOLLOW]}, **{w: "shape" for w in SHAPES},
             **{w: "size" for w in SIZES}}
    # Evaluation rows hold every reference joined by "&&"; score the first one alone.
    with tempfile.TemporaryDirectory() as scratch:
        single = Path(scratch) / "caption_valid_first_reference.tsv"
        with open(valid_file, encoding="utf-8") as source, open(single, "w", encoding="utf-8") as target_file:
            for line in source:
                columns = line.rstrip("\n").split("\t")
                columns[2] = columns[2].split("&&")[0]
                target_file.write("\t".join(columns) + "\n")
        task.cfg.data = str(single)
        task.load_dataset("valid")
        return _word_losses(model, task, task.dataset("valid"), rows, kinds)


def _word_losses(model, task, dataset, rows: int, kinds: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    totals: Dict[str, list] = {}
    for start in range(0, min(rows, len(dataset)), 16):
        sample = dataset.collater([dataset[i] for i in range(start, min(start + 16, len(dataset)))])
        log_probs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        target = sample["target"]
        nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        right = log_probs.argmax(-1) == target
        for row, col in target.ne(task.tgt_dict.pad()).nonzero().tolist():
            symbol = task.tgt_dict[target[row, col]]
            word = task.bpe.decode(symbol).strip() if symbol.isdigit() else symbol  # BPE ids are numbers; </s> is not
            entry = totals.setdefault(kinds.get(word, "other"), [0.0, 0, 0])
            entry[0] += nll[row, col].item()
            entry[1] += int(right[row, col])
            entry[2] += 1
    return {kind: {"nll": total / count, "accuracy": 100.0 * hits / count, "tokens": count}
            for kind, (total, hits, count) in sorted(totals.items())}


def main(argv: Optional[list] = None) -> Dict:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="quickstart-style work dir (its data/ is used)")
    parser.add_argument("--checkpoint", required=True, help="caption checkpoint to probe")
    parser.add_argument("--resnet", default=None, help="ResNet state dict to put into the model first")
    parser.add_argument("--train-scenes", type=int, default=1500, help="training scenes the probe is fitted on")
    parser.add_argument("--bpe-dir", default=str(REPO.parent / "shared" / "ofa_bpe"))
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    data = Path(args.work_dir) / "data"
    models, task, _ = quickstart.load("caption", Path(args.checkpoint), data, args.bpe_dir, 16)
    model = models[0].eval()
    if args.resnet:
        model.encoder.embed_images.load_state_dict(torch.load(args.resnet, map_location="cpu"))
    size = task.cfg.patch_image_size
    train_images, train_cells = load_scenes(str(data / "caption_train.tsv"), size)
    test_images, test_cells = load_scenes(str(data / "caption_valid.tsv"), size)
    train_images, train_cells = train_images[: args.train_scenes], train_cells[: args.train_scenes]
    train, test = (cell_features(model, task.src_dict, images) for images in (train_images, test_images))
    result = {"checkpoint": args.checkpoint, "resnet": args.resnet, "train_scenes": len(train_images),
              "test_scenes": len(test_images),
              "encoder_image_std_across_positions": train["across_positions"].item(),
              "encoder_image_std_across_images": train["across_images"].item()}
    for place in ("resnet", "encoder"):
        result[place] = probe(train[place], train_cells, test[place], test_cells)
        logger.info("%s output: held-out cell accuracy %.1f%%, object accuracy %.1f%% (%d classes)", place,
                    result[place]["cell_accuracy"], result[place]["object_accuracy"], len(CELL_CLASSES))
    logger.info("encoder image states: std %.3f across positions, %.3f across images",
                result["encoder_image_std_across_positions"], result["encoder_image_std_across_images"])
    result["decoder_word_losses"] = word_losses(model, task, data / "caption_valid.tsv")
    for kind, numbers in result["decoder_word_losses"].items():
        logger.info("reference %s words: %.3f nats, %.1f%% predicted (%d tokens)", kind, numbers["nll"],
                    numbers["accuracy"], numbers["tokens"])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
