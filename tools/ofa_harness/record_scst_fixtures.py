"""Write tests/fixtures/ofa_scst_updates.pt and ofa_el_updates.pt: two updates of OFA's own train.py
with OFA's stage-2 (SCST) and encouraging-loss scripts (tests/ofa_stage2_scripts.py) on the built-in
task and the tiny OFA checkpoint, recorded by record_ofa_training.py in OFA's environment.

Run from the repository root with our environment (it starts OFA's for the recording):

    .venv/bin/python tools/ofa_harness/record_scst_fixtures.py --ofa-peer ../wt-harness/work_dirs/ofa_peer

The tiny checkpoint's weights are random, so its captions share no n-gram with the built-in
references and every SCST reward would be 0. The stage-2 file therefore gives each of the four
training images one more reference: the best caption our generator finds for it at the stage-2
beam settings (so the sampled captions overlap the references in part, differently per sample).
The training CIDEr-D document frequencies are computed from these references, as the task does.
"""
import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from ofa_stage2_scripts import EL_RECORDED, SCST_RECORDED, caption_stage1_el_args, caption_stage2_args  # noqa: E402

SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "ofa_reference" / "ofa_tiny_caption.pt"
SYNTHETIC = {"seed": 5, "num_train": 4, "num_valid": 2, "num_test": 1}
# Parameters whose values are kept after each update (small tensors of every part of the model).
KEPT_PARAMS = [
    "decoder.layer_norm.weight", "decoder.layers.1.fc2.bias", "decoder.layers.0.self_attn.q_proj.bias",
    "encoder.layers.1.fc1.bias", "encoder.layer_norm.bias", "encoder.embed_images.layer1.0.bn1.weight",
]


def best_captions(data_dir: Path) -> dict:
    """Our generator's best caption of every stage-2 training image, as TSV-safe text."""
    import mue_fairseq  # noqa: F401
    from fairseq import checkpoint_utils

    overrides = {"bpe_dir": str(SHARED / "ofa_bpe"), "patch_image_size": 64, "selected_cols": "1,4,2",
                 "data": f"{data_dir}/caption_stage2_train.tsv"}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(CHECKPOINT)], arg_overrides=overrides)
    model = models[0].eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    generator = task.build_generator([model], Namespace(beam=5, max_len_b=16, no_repeat_ngram_size=3))
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        hypos = task.inference_step(generator, [model], sample)
    captions = {}
    for row_id, beams in zip(sample["id"].tolist(), hypos):
        text = task.decode(beams[0]["tokens"])
        captions[str(row_id)] = re.sub(r"\s+", " ", text.replace("&", "")).strip()
    return captions


def write_stage2_data(data_dir: Path) -> dict:
    """Add the best caption to each stage-2 row's references; rewrite the training CIDEr-D pickle."""
    from mue_fairseq.metrics.cider import CIDER_EOS, save_document_frequency

    extra = best_captions(data_dir)
    path = data_dir / "caption_stage2_train.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    refs = {}
    for row in rows:
        row[2] = "&&".join([*row[2].split("&&"), extra[row[0]]])
        refs[row[1]] = row[2].split("&&")
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    save_document_frequency(refs, str(data_dir / "cider_cached_tokens" / "coco-train-words.p"), end_word=CIDER_EOS)
    return {row[0]: row[2] for row in rows}


def record(peer: Path, argv, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NLTK_DATA=str(peer / "nltk_data"),
               PYTHONPATH=str(peer / "src"))
    command = [str(peer / "venv" / "bin" / "python"), str(REPO / "tools" / "ofa_harness" / "record_ofa_training.py"),
               "--ofa-src", str(peer / "src"), "--record", str(out), "--keep-params", ",".join(KEPT_PARAMS),
               "--", *argv]
    result = subprocess.run(command, cwd=peer / "src", env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"OFA's train.py failed:\n{(result.stdout + result.stderr)[-5000:]}")
    return torch.load(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ofa-peer", required=True, type=Path, help="the harness's work_dirs/ofa_peer")
    parser.add_argument("--out-dir", type=Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    from data_utils.synthetic import build_synthetic_task

    peer = args.ofa_peer.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        build_synthetic_task(str(data_dir), **SYNTHETIC)
        references = write_stage2_data(data_dir)
        with open(data_dir / "cider_cached_tokens" / "coco-train-words.p", "rb") as f:
            train_df = pickle.load(f)
        ofa = {"user_dir": peer / "src" / "ofa_module", "bpe_dir": peer / "src" / "utils" / "BPE"}
        for name, make_args, extra in (("scst", caption_stage2_args, SCST_RECORDED),
                                       ("el", caption_stage1_el_args, EL_RECORDED)):
            argv = make_args(data_dir, tmp / f"save_{name}", CHECKPOINT, ofa["bpe_dir"], ofa["user_dir"]) + extra
            recorded = record(peer, argv, tmp / f"{name}.pt")
            recorded.update(synthetic=SYNTHETIC, extra_args=extra, kept_params=KEPT_PARAMS)
            if name == "scst":
                recorded.update(stage2_references=references,
                                train_document_frequency={"document_frequency": dict(train_df["document_frequency"]),
                                                          "ref_len": train_df["ref_len"]})
            recorded.pop("argv")
            out = args.out_dir / f"ofa_{name}_updates.pt"
            torch.save(recorded, out)
            print(f"{out}: {len(recorded['updates'])} updates, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
