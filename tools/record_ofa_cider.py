"""Record what OFA's own CIDEr-D scorer computes from a cached document-frequency pickle.

Runs the scorer of OFA's repository (`utils/cider/pyciderevalcap/ciderD`, OFA-Sys/OFA at a36b91ce)
unchanged, from a bare git copy of the repository (the search tool's `fetch github:OFA-Sys/OFA`),
on a pickle in OFA's `coco-*-words.p` layout written by `save_document_frequency`, and stores the
case and OFA's scores as a small JSON fixture that `tests/test_metrics.py` checks our scorer
against. Needs numpy and six only.

    python tools/record_ofa_cider.py --ofa-git-dir /work/.mirror/OFA-Sys+OFA/repo \
        --out tests/fixtures/ofa_cider_cached.json
"""
import argparse
import csv
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mue_fairseq.metrics.cider import save_document_frequency  # noqa: E402

OFA_COMMIT = "a36b91ce86ff105ac8d9e513aa88f42b85e33479"
SCORER_FILES = ("__init__.py", "ciderD.py", "ciderD_scorer.py")

# Hypotheses for the eight photographs of ../shared/ofa_cli/caption_test.tsv: good, partial, off,
# one with capitals and punctuation (OFA's validation scorer splits on whitespace only).
HYPOTHESES = [
    "an astronaut in an orange suit in front of a flag",
    "a cup of coffee on a wooden table",
    "a cat",
    "a rocket on the launch pad",
    "a red car parked on the street",
    "galaxies and stars in a dark sky",
    "A man with a camera, outdoors.",
    "many old coins in rows",
]


def import_ofa_scorer(git_dir: str, workdir: Path):
    package = workdir / "ofa_ciderD"
    package.mkdir()
    for name in SCORER_FILES:
        source = subprocess.run(["git", f"--git-dir={git_dir}", "show",
                                 f"{OFA_COMMIT}:utils/cider/pyciderevalcap/ciderD/{name}"],
                                check=True, capture_output=True, text=True).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(workdir))
    return importlib.import_module("ofa_ciderD.ciderD").CiderD


def read_references(tsv: Path) -> dict:
    csv.field_size_limit(1 << 30)
    with open(tsv, newline="", encoding="utf-8") as f:
        return {row[1]: row[2].split("&&") for row in csv.reader(f, delimiter="\t")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ofa-git-dir", required=True, help="bare git directory of OFA-Sys/OFA")
    parser.add_argument("--tsv", default=str(REPO.parent / "shared" / "ofa_cli" / "caption_test.tsv"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    refs = read_references(Path(args.tsv))
    # The cached statistics come from a larger corpus than the scored images, as in OFA (valid set).
    corpus = dict(refs)
    corpus["extra-1"] = ["a dog running on the grass", "a brown dog in a park"]
    corpus["extra-2"] = ["a red car on the street", "a car parked in front of a house"]
    corpus["extra-3"] = ["a man riding a red motorcycle", "a person on a motorbike"]
    with tempfile.TemporaryDirectory() as tmp:
        pickle_path = str(Path(tmp) / "coco-valid-words.p")
        save_document_frequency(corpus, pickle_path)
        ofa_ciderd = import_ofa_scorer(args.ofa_git_dir, Path(tmp))
        gts = {image_id: [r.strip() for r in image_refs] for image_id, image_refs in refs.items()}
        res = [{"image_id": image_id, "caption": [hyp]} for image_id, hyp in zip(refs, HYPOTHESES)]
        mean, scores = ofa_ciderd(df=pickle_path).compute_score(gts, res)
        corpus_mean, corpus_scores = ofa_ciderd(df="corpus").compute_score(gts, res)
    record = {
        "what": "OFA's CiderD (utils/cider/pyciderevalcap/ciderD, OFA-Sys/OFA a36b91ce) on a cached pickle",
        "made_by": "python tools/record_ofa_cider.py --ofa-git-dir DIR --out tests/fixtures/ofa_cider_cached.json",
        "document_frequency_corpus": corpus,
        "gts": gts,
        "hypotheses": dict(zip(refs, HYPOTHESES)),
        "ofa_cached_mean": float(mean),
        "ofa_cached_scores": [float(s) for s in scores],
        "ofa_corpus_mean": float(corpus_mean),
        "ofa_corpus_scores": [float(s) for s in corpus_scores],
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"OFA CIDEr-D: cached {mean:.6f}, corpus {corpus_mean:.6f} -> {args.out}")


if __name__ == "__main__":
    main()
