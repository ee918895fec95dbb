"""Record what the MuE authors' code (Tangshengku/OFA) does on a caption TSV, and check ours against it.

    python tools/ofa_harness/authors_fixture.py --tsv ../shared/ofa_cli/caption_test.tsv \
        --checkpoint ../shared/ofa_reference/ofa_tiny_holdout.pt \
        --settings 0.99,0.7,0.9 0.999,0.95,0.9 1,1,1 0.9,0.8,0.7@24 0.5,0.8,0.7@24 \
        --fixture tests/fixtures/authors/caption_holdout.json

For each threshold setting (image, text, decoder, as their `--img_thres --txt_thres
--decoder_thres`), runs their `evaluate.py` at batch 1 in their environment
(setup_authors_env.sh) through `authors_observe.py`, which records each caption with the layers
their code ran (text and image streams, decoder per token); then ours with `--mue-preset authors`
and the same thresholds, and prints how many captions, token lists and exit layers agree. A
setting's `@S` makes both sides scale every layer's residual-branch outputs by S after loading
(authors_observe.scale_residual_branches): the tiny checkpoint's layers barely move the residual
stream, so without it every sample exits alike; with it decoder depths vary by step and sample.
`--fixture` keeps their side, small, for tests/test_authors_preset.py.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from compare import default_bpe_dir, run, sha256  # noqa: E402  (the OFA harness's helpers)

SELECTED_COLS = "1,4,2"


def parse_setting(text: str):
    """'image,text,decoder[@scale]' -> ((image, text, decoder), scale)."""
    values, _, scale = text.partition("@")
    thresholds = tuple(float(v) for v in values.split(","))
    if len(thresholds) != 3 or not all(0 <= v <= 1 for v in thresholds):
        raise argparse.ArgumentTypeError(f"thresholds must be image,text,decoder in [0, 1], got {text!r}")
    return thresholds, float(scale or 1.0)


def peer_evaluate_args(tsv, checkpoint, thresholds, batch_size, beam, max_len_b, no_repeat_ngram_size,
                       results, task="caption", selected_cols=SELECTED_COLS) -> list:
    """evaluate.py's command line as the peers' run scripts give it (one CPU process), run from
    their `run_scripts/<task>/`: OFA's with `thresholds` None, else the authors' with their
    threshold flags and `train_mue` (which switches their MuE encoder and decoder on)."""
    overrides = {"data": str(tsv), "bpe_dir": "../../utils/BPE", "selected_cols": selected_cols,
                 **({"eval_cider": False} if task == "caption" else {})}
    generation = ([f"--beam={beam}", f"--max-len-b={max_len_b}", f"--no-repeat-ngram-size={no_repeat_ngram_size}"]
                  if task == "caption" else [])
    mue = []
    if thresholds is not None:
        image, text, decoder = thresholds
        mue = [f"--img_thres={image}", f"--txt_thres={text}", f"--decoder_thres={decoder}"]
        overrides["train_mue"] = True
    return [str(tsv), f"--path={checkpoint}", "--user-dir=../../ofa_module", f"--task={task}",
            f"--batch-size={batch_size}", "--required-batch-size-multiple=1", "--log-format=simple",
            "--log-interval=1", "--seed=7", "--gen-subset=test", f"--results-path={results}",
            "--num-workers=0", "--cpu", *generation, *mue, f"--model-overrides={overrides!r}"]


def run_authors(peer_dir: Path, tsv, checkpoint, thresholds, beam, max_len_b, no_repeat_ngram_size, work: Path,
                residual_scale: float = 1.0) -> dict:
    """Their captions and exit layers per sample id, at batch 1 (their scripts' batch size)."""
    python, src = peer_dir / "venv" / "bin" / "python", peer_dir / "src"
    if not (src / ".authors-patched").exists():
        sys.exit(f"the authors' environment is not at {peer_dir}: run tools/ofa_harness/setup_authors_env.sh first")
    record = work / "authors_record.json"
    run([python, HERE / "authors_observe.py", "--record", record, f"--residual-scale={residual_scale}", "--",
         *peer_evaluate_args(tsv, checkpoint, thresholds, 1, beam, max_len_b, no_repeat_ngram_size, work / "out")],
        src / "run_scripts" / "caption", {"NLTK_DATA": str(peer_dir / "nltk_data")})
    return json.loads(record.read_text())["samples"]


def preset_overrides(thresholds) -> dict:
    image, text, decoder = thresholds
    return {"mue_preset": "authors", "mue_image_threshold": image, "mue_text_threshold": text,
            "mue_decoder_threshold": decoder}


def our_samples(checkpoint, tsv, thresholds, beam, max_len_b, no_repeat_ngram_size, bpe_dir,
                residual_scale: float = 1.0) -> dict:
    """Ours with `--mue-preset authors` at batch 1: per sample id, as authors_observe.py records theirs."""
    import torch

    from authors_observe import scale_residual_branches
    from compare import batches, load_ours
    from mue_fairseq.data.caption_dataset import strip_punctuation

    model, task = load_ours(checkpoint, tsv, "caption", bpe_dir, SELECTED_COLS, preset_overrides(thresholds))
    scale_residual_branches(model, residual_scale)
    gen_args = argparse.Namespace(beam=beam, max_len_a=0, max_len_b=max_len_b, min_len=1, lenpen=1.0,
                                  unkpen=0.0, temperature=1.0, unnormalized=False,
                                  no_repeat_ngram_size=no_repeat_ngram_size)
    generator = task.build_generator([model], gen_args)
    out = {}
    with torch.no_grad():
        for sample in batches(task, 1):
            hypos = task.inference_step(generator, [model], sample)
            for sample_id, beams in zip(sample["id"].tolist(), hypos):
                best = beams[0]
                image_layers, text_layers = best["encoder_exit_layers"].tolist()
                out[str(sample_id)] = {
                    "caption": strip_punctuation(task.decode(best["tokens"])).strip(), "tokens": best["tokens"].tolist(),
                    "score": float(best["score"]), "text_layers": text_layers, "image_layers": image_layers,
                    "decoder_layers": best["exit_layers"].tolist(),
                }
    return out


def agreement(theirs: dict, ours: dict) -> dict:
    """How many samples agree on each recorded item, and which differ."""
    if sorted(theirs) != sorted(ours):
        raise ValueError(f"sample ids differ: theirs {sorted(theirs)}, ours {sorted(ours)}")
    keys = ("caption", "tokens", "text_layers", "image_layers", "decoder_layers")
    counts = {key: sum(theirs[i][key] == ours[i][key] for i in theirs) for key in keys}
    differing = sorted(i for i in theirs if any(theirs[i][k] != ours[i][k] for k in keys))
    return {"samples": len(theirs), **counts, "differing": differing}


def exit_summary(samples: dict) -> dict:
    decoder = [d for s in samples.values() for d in s["decoder_layers"]]
    n = len(samples)
    return {"text_layers_mean": sum(s["text_layers"] for s in samples.values()) / n,
            "image_layers_mean": sum(s["image_layers"] for s in samples.values()) / n,
            "decoder_layers_mean": sum(decoder) / len(decoder)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tsv", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--settings", type=parse_setting, nargs="+", default=[((0.99, 0.7, 0.9), 1.0)],
                        help="image,text,decoder thresholds per setting (their caption scripts: 0.99,0.7,0.9), "
                             "optionally @S: both sides scale the residual branches by S after loading")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-b", type=int, default=16)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3)
    parser.add_argument("--bpe-dir", type=Path, default=default_bpe_dir())
    parser.add_argument("--peer-dir", type=Path, default=REPO / "work_dirs" / "authors_peer",
                        help="the authors' environment, as built by setup_authors_env.sh")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--fixture", type=Path, help="write their side as a test fixture (JSON)")
    args = parser.parse_args(argv)
    for name in ("tsv", "checkpoint"):
        path = getattr(args, name).resolve()
        if not path.is_file():
            parser.error(f"--{name} {path} does not exist")
        setattr(args, name, path)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="authors_fixture_"))).resolve()
    gen = (args.beam, args.max_len_b, args.no_repeat_ngram_size)
    settings = []
    for thresholds, scale in args.settings:
        tag = "_".join(str(t) for t in thresholds) + f"_s{scale}"
        (work / tag).mkdir(parents=True, exist_ok=True)
        theirs = run_authors(args.peer_dir, args.tsv, args.checkpoint, thresholds, *gen, work / tag, scale)
        ours = our_samples(args.checkpoint, args.tsv, thresholds, *gen, args.bpe_dir, scale)
        report = agreement(theirs, ours)
        print(json.dumps({"thresholds": thresholds, "residual_scale": scale, **report,
                          "authors_exits": exit_summary(theirs), "our_exits": exit_summary(ours)}), flush=True)
        settings.append({"thresholds": list(thresholds), "residual_scale": scale, "samples": theirs})
    if args.fixture:
        header = {"tsv": args.tsv.name, "tsv_sha256": sha256(args.tsv), "checkpoint": args.checkpoint.name,
                  "checkpoint_sha256": sha256(args.checkpoint), "selected_cols": SELECTED_COLS,
                  "batch_size": 1, "generation": dict(zip(("beam", "max_len_b", "no_repeat_ngram_size"), gen)),
                  "authors_commit": (args.peer_dir / "src" / ".ofa-commit").read_text().strip()}
        args.fixture.parent.mkdir(parents=True, exist_ok=True)
        args.fixture.write_text(json.dumps({**header, "settings": settings}, indent=1) + "\n")


if __name__ == "__main__":
    main()
