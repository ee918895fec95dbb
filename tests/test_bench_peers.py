"""The peer benchmark's pieces that need no peer environment (no timing here): the TSV repeater,
the configurations it runs and the table it writes."""
import argparse
import csv
from pathlib import Path

import pytest

from ofa_fixtures import SHARED, require_file
from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def read_tsv(path):
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_repeat_tsv_cycles_rows_with_distinct_ids(bench, tmp_path):
    source = require_file(SHARED / "ofa_cli" / "caption_test.tsv")
    base = read_tsv(source)
    rows = read_tsv(bench.repeat_tsv(source, tmp_path / "caption_20.tsv", 20, (0, 1)))
    assert len(rows) == 20
    assert len({r[1] for r in rows}) == 20 and len({r[0] for r in rows}) == 20
    assert all(r[1].isdigit() for r in rows)  # numeric ids stay numeric
    assert [r[2:] for r in rows] == [r[2:] for r in (base * 3)[:20]]
    assert rows[0][1] == f"{base[0][1]}0" and rows[len(base)][1] == f"{base[0][1]}1"
    # As many rows as the file has, or fewer: the rows as they are.
    assert read_tsv(bench.repeat_tsv(source, tmp_path / "caption_5.tsv", 5, (0, 1))) == base[:5]


def test_configurations_run_the_peers_and_ours_with_the_same_thresholds(bench):
    args = argparse.Namespace(thresholds={}, ofa_batch_size=16, our_batch_sizes=[1, 16])
    configs = {name: (tool, batch, options) for name, tool, batch, options in bench.configurations(args, "caption")}
    assert configs["ofa"] == ("ofa", 16, None)
    assert configs["authors"] == ("authors", 1, (0.99, 0.7, 0.9))
    assert configs["ours_full_b16"] == ("ours", 16, {})
    mue = {"mue_image_threshold": 0.99, "mue_text_threshold": 0.7, "mue_decoder_threshold": 0.9}
    assert configs["ours_mue_b1"] == ("ours", 1, mue)
    assert configs["ours_preset_b1"] == ("ours", 1, {"mue_preset": "authors", **mue})
    assert bench.configurations(argparse.Namespace(thresholds={"snli_ve": (0.5, 0.6, 0.7)}, ofa_batch_size=16,
                                                   our_batch_sizes=[1]), "snli_ve")[1][3] == (0.5, 0.6, 0.7)


def test_peer_commands_carry_their_flags(bench, tmp_path):
    args = argparse.Namespace(beam=5, max_len_b=16, no_repeat_ngram_size=3, bpe_dir=tmp_path,
                              ofa_peer_dir=tmp_path / "ofa", authors_peer_dir=tmp_path / "authors")
    argv, cwd, _ = bench.command(args, "caption", "authors", 1, (0.99, 0.7, 0.9), "t.tsv", "c.pt", tmp_path / "r")
    assert cwd == tmp_path / "authors" / "src" / "run_scripts" / "caption"
    assert "--img_thres=0.99" in argv and "--decoder_thres=0.9" in argv and "--batch-size=1" in argv
    assert "'train_mue': True" in argv[-1]
    argv, _, _ = bench.command(args, "caption", "ofa", 16, None, "t.tsv", "c.pt", tmp_path / "r")
    assert not any("thres" in str(a) or "train_mue" in str(a) for a in argv) and "--batch-size=16" in argv
    argv, _, _ = bench.command(args, "caption", "ours", 1, {"mue_preset": "authors"}, "t.tsv", "c.pt", tmp_path / "r")
    assert "--mue-preset=authors" in argv and "--no-repeat-ngram-size=3" in argv


def test_bad_thresholds_option_is_named(bench):
    with pytest.raises(argparse.ArgumentTypeError, match="--thresholds takes TASK=image,text,decoder"):
        bench.parse_thresholds(["vqa=0.9,0.9,0.9"])
