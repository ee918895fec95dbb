"""Data pipeline: TSV reader, image preprocessing, OFA dictionary/BPE, answer trie and datasets."""
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_fixtures import BPE_DIR, load_reference, require_file, require_fixture
from ofa_tsv_rows import caption_fixture_rows, png_base64, snli_fixture_rows, solid_image_base64, write_tsv

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.caption_dataset import CaptionDataset, clean_caption
from mue_fairseq.data.image_transform import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PatchImageTransform,
    decode_base64_image,
)
from mue_fairseq.data.ofa_bpe import (
    build_gpt2_bpe,
    check_bpe_dir,
    decode_tokens,
    encode_text,
    load_ofa_dictionary,
)
from mue_fairseq.data.ofa_dataset import pre_caption
from mue_fairseq.data.snli_ve_dataset import SnliVeDataset
from mue_fairseq.data.tsv_file import TSVFile

# Bicubic resampling may differ by a grey level or two between Pillow versions: 3/255 before
# normalisation, at most 3 / (255 * 0.225) after it.
IMAGE_ATOL = 3 / (255 * 0.225)


def require_bpe_dir():
    require_file(BPE_DIR)
    return str(BPE_DIR)


@pytest.fixture(scope="module")
def ofa_text():
    """(bpe, dictionary) built from OFA's BPE files."""
    bpe_dir = require_bpe_dir()
    return build_gpt2_bpe(bpe_dir), load_ofa_dictionary(bpe_dir)


# ---------------------------------------------------------------------------- TSV reader
def test_tsv_random_access_selected_columns_in_order(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", [[f"id{i}", f"b{i}", f"c{i}", f"d{i}"] for i in range(5)])
    tsv = TSVFile(str(path), "3,0,2")
    assert len(tsv) == 5
    assert tsv[4] == ["d4", "id4", "c4"]
    assert tsv[1] == ["d1", "id1", "c1"]
    assert tsv[4] == ["d4", "id4", "c4"]
    with pytest.raises(IndexError):
        tsv[5]


def test_tsv_all_columns_by_default_and_empty_lines_skipped(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("a\tb\n\nc\td\r\n\n", encoding="utf-8")
    tsv = TSVFile(str(path))
    assert tsv.selected_cols == [0, 1]
    assert len(tsv) == 2
    assert tsv[1] == ["c", "d"]
    assert tsv.line_number(1) == 3


def test_tsv_short_row_names_file_and_line(tmp_path):
    rows = [["1", "x", "cap"], ["2", "y", "cap"], ["3", "only-two"], ["4", "z", "cap"]]
    path = write_tsv(tmp_path / "short.tsv", rows)
    with pytest.raises(ValueError, match=r"short\.tsv, line 3: row has 2 column\(s\).*needs at least 3"):
        TSVFile(str(path), "0,2")


def test_tsv_unknown_column_names_index_and_column_count(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", [["1", "x", "y"]])
    with pytest.raises(ValueError, match=r"selected column 7 does not exist in .*a\.tsv: its first row has 3 columns"):
        TSVFile(str(path), "0,7")


@pytest.mark.parametrize("cols", ["0,x", "", "0,-1"])
def test_tsv_bad_selected_cols(tmp_path, cols):
    path = write_tsv(tmp_path / "a.tsv", [["1", "x"]])
    with pytest.raises(ValueError, match="selected-cols"):
        TSVFile(str(path), cols)


def test_tsv_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        TSVFile(str(tmp_path / "nope.tsv"))
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match="empty.tsv has no rows"):
        TSVFile(str(tmp_path / "empty.tsv"))


def test_tsv_survives_pickling_for_dataloader_workers(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", [[f"id{i}", f"v{i}"] for i in range(3)])
    tsv = TSVFile(str(path), "1")
    assert tsv[0] == ["v0"]
    clone = pickle.loads(pickle.dumps(tsv))
    assert clone[2] == ["v2"] and clone[0] == ["v0"]


def test_tsv_utf8_offsets(tmp_path):
    path = write_tsv(tmp_path / "u.tsv", [["1", "café über"], ["2", "naïve"], ["3", "plain"]])
    tsv = TSVFile(str(path))
    assert [tsv[i][1] for i in (2, 0, 1)] == ["plain", "café über", "naïve"]


# ----------------------------------------------------------------------- images
def test_image_transform_solid_colour_values():
    image = Image.new("RGB", (7, 5), (255, 0, 51))
    out = PatchImageTransform(4)(image)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(out, expected)
    imagenet = PatchImageTransform.for_task(4, True)(image)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    expected = ((torch.tensor([1.0, 0.0, 0.2]) - mean) / std).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(imagenet, expected)


def test_image_decode_converts_to_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    buffer_b64 = png_base64(np.stack([gray] * 3, axis=-1))
    image = decode_base64_image(buffer_b64, "row-1")
    assert image.mode == "RGB" and image.size == (4, 3)


def test_image_bad_base64_names_row():
    with pytest.raises(ValueError, match=r"row 42: image column is not valid base64"):
        decode_base64_image("abc", 42)


def test_image_not_an_image_names_row():
    import base64

    data = base64.urlsafe_b64encode(b"this is not a picture").decode()
    with pytest.raises(ValueError, match=r"row xyz: image column does not decode to an image"):
        decode_base64_image(data, "xyz")


@pytest.mark.parametrize("name,imagenet", [("caption", False), ("snli_ve", True)])
def test_image_transform_matches_ofa_fixture(name, imagenet):
    require_fixture(name)
    reference = load_reference(name)
    size = reference["patch_images"].shape[-1]
    transform = PatchImageTransform.for_task(size, imagenet)
    for i, pixels in enumerate(reference["raw_images_uint8_hwc"]):
        decoded = decode_base64_image(png_base64(pixels), i)
        torch.testing.assert_close(transform(decoded), reference["patch_images"][i], atol=IMAGE_ATOL, rtol=0)


# ------------------------------------------------------------------ dictionary/BPE
def test_ofa_dictionary_size_and_special_ids(ofa_text):
    _, dictionary = ofa_text
    assert len(dictionary) == 59457
    ids = {
        "bos": dictionary.bos(), "pad": dictionary.pad(), "eos": dictionary.eos(), "unk": dictionary.unk(),
        "mask": dictionary.index("<mask>"), "code_0": dictionary.index("<code_0>"), "bin_0": dictionary.index("<bin_0>"),
    }
    assert ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 50264, "code_0": 50265, "bin_0": 58457}
    assert dictionary.index("<code_8191>") == 58456 and dictionary.index("<bin_999>") == 59456


def test_ofa_dictionary_sizes_follow_options():
    dictionary = load_ofa_dictionary(require_bpe_dir(), code_dict_size=10, num_bins=5)
    assert len(dictionary) == 50265 + 10 + 5


def test_encode_matches_ofa_ids_and_decodes_back(ofa_text):
    bpe, dictionary = ofa_text
    tokens = encode_text(" what does the image describe?", bpe, dictionary)
    assert tokens.tolist() == [99, 473, 5, 2274, 6190, 116]
    assert decode_tokens([0] + tokens.tolist() + [2, 1, 1], bpe, dictionary) == " what does the image describe?"
    assert decode_tokens([dictionary.unk(), 50264, 50265], bpe, dictionary, unk_string="UNK") == "UNK<mask><code_0>"
    # OFA's decode glues symbols outside GPT-2's vocabulary to the words around them.
    dog = encode_text(" dog", bpe, dictionary).tolist()
    assert decode_tokens(dog + [50265, 50265] + dog, bpe, dictionary) == " dog<code_0><code_0> dog"


@pytest.mark.parametrize("missing", ["dict.txt", "encoder.json", "vocab.bpe"])
def test_bpe_dir_missing_file_is_named(tmp_path, missing):
    source = require_bpe_dir()
    for name in ("dict.txt", "encoder.json", "vocab.bpe"):
        if name != missing:
            shutil.copy(f"{source}/{name}", tmp_path / name)
    with pytest.raises(FileNotFoundError, match=rf"--bpe-dir {tmp_path} lacks {missing}"):
        check_bpe_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=missing):
        load_ofa_dictionary(str(tmp_path))


def test_bpe_dir_absent(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--bpe-dir .*nowhere does not exist"):
        build_gpt2_bpe(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--bpe-dir is required"):
        check_bpe_dir(None)


# --------------------------------------------------------------------- answer trie
def test_answer_trie_next_tokens():
    trie = AnswerTrie(eos=2)
    trie.insert([117, 2])
    trie.insert([4420, 2])
    trie.insert([2085, 9, 2])
    assert trie.next_tokens([]) == [117, 4420, 2085]
    assert trie.next_tokens([2085]) == [9]
    assert trie.next_tokens([2085, 9]) == [2]
    assert trie.next_tokens([117, 2]) == []
    assert trie.next_tokens([555]) == [2]


# ------------------------------------------------------------------- text cleaning
def test_pre_caption_like_ofa():
    assert pre_caption("..Two RED-boxes / a  ball\n", 10) == "two red boxes a ball"
    # OFA strips leading punctuation before spaces, so punctuation after a space survives.
    assert pre_caption(" ..a ball", 10) == "..a ball"
    assert pre_caption("<person> walks on the road", 3) == "person walks on"


def test_clean_caption_train_and_references():
    assert clean_caption(" A man, riding a horse!  ", training=True, max_words=3) == "A man riding"
    assert clean_caption("A man, riding.&& a  horse! runs", training=False, max_words=1) == "A man riding&&a horse runs"


# ------------------------------------------------------------------------ datasets
def _caption_dataset(tmp_path, rows, split="valid", **kwargs):
    bpe_dir = require_bpe_dir()
    dictionary = load_ofa_dictionary(bpe_dir)
    path = write_tsv(tmp_path / "caption.tsv", rows)
    return CaptionDataset(
        split, TSVFile(str(path), "0,4,2"), build_gpt2_bpe(bpe_dir), dictionary, dictionary, **kwargs
    )


def _snli_dataset(tmp_path, rows, **kwargs):
    bpe_dir = require_bpe_dir()
    dictionary = load_ofa_dictionary(bpe_dir)
    path = write_tsv(tmp_path / "snli.tsv", rows)
    return SnliVeDataset(
        "valid", TSVFile(str(path), "0,2,3,4,5"), build_gpt2_bpe(bpe_dir), dictionary, dictionary, **kwargs
    )


def _snli_trie(dictionary, bpe):
    trie = AnswerTrie(dictionary.eos())
    for answer in ("no", "yes", "maybe"):
        trie.insert(encode_text(" " + answer, bpe, dictionary).tolist() + [dictionary.eos()])
    return trie


def test_caption_batch_matches_ofa_fixture(tmp_path):
    require_fixture("caption")
    reference = load_reference("caption")
    dataset = _caption_dataset(tmp_path, caption_fixture_rows(reference), patch_image_size=256, max_tgt_length=20)
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    assert [int(i) for i in batch["id"]] == reference["ids"]
    net_input = batch["net_input"]
    assert torch.equal(net_input["src_tokens"], reference["src_tokens"])
    assert torch.equal(net_input["src_lengths"], reference["src_lengths"])
    assert torch.equal(net_input["prev_output_tokens"], reference["prev_output_tokens"])
    assert torch.equal(batch["target"], reference["target"])
    assert torch.equal(net_input["patch_masks"], reference["patch_masks"])
    torch.testing.assert_close(net_input["patch_images"], reference["patch_images"], atol=IMAGE_ATOL, rtol=0)
    assert batch["nsentences"] == 3
    assert batch["ntokens"] == int(reference["target"].ne(1).sum())


def test_caption_train_split_strips_and_truncates(tmp_path, ofa_text):
    bpe, dictionary = ofa_text
    rows = [["7", "i", "A cat, on a mat && sleeping.", "", solid_image_base64()]]
    train = _caption_dataset(tmp_path, rows, split="train", patch_image_size=8, max_tgt_length=4)[0]
    assert decode_tokens(train["target"].tolist(), bpe, dictionary) == " A cat on a"
    assert train["target"][-1] == dictionary.eos() and train["prev_output_tokens"][0] == dictionary.bos()
    assert torch.equal(train["prev_output_tokens"][1:], train["target"][:-1])
    valid = _caption_dataset(tmp_path, rows, split="valid", patch_image_size=8, max_tgt_length=4)[0]
    assert decode_tokens(valid["target"].tolist(), bpe, dictionary) == " A cat on a mat&&sleeping"
    scst = _caption_dataset(tmp_path, rows, split="train", patch_image_size=8, max_tgt_length=4, scst=True)[0]
    assert torch.equal(scst["target"], valid["target"])


def test_caption_bad_image_names_id_file_and_line(tmp_path):
    rows = [["1", "i", "a cat", "", solid_image_base64()], ["2", "i", "a dog", "", "%%%not-base64"]]
    dataset = _caption_dataset(tmp_path, rows, patch_image_size=8)
    assert dataset[0]["patch_image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"row 2 \(.*caption\.tsv, line 2\): image column is not valid base64"):
        dataset[1]


def test_dataset_rejects_wrong_number_of_columns(tmp_path):
    bpe_dir = require_bpe_dir()
    dictionary = load_ofa_dictionary(bpe_dir)
    path = write_tsv(tmp_path / "c.tsv", [["1", "i", "cap", "", "img"]])
    with pytest.raises(ValueError, match=r"reads 3 columns \(id, image, caption\) but --selected-cols gives 2"):
        CaptionDataset("valid", TSVFile(str(path), "0,4"), build_gpt2_bpe(bpe_dir), dictionary, dictionary)


def test_snli_ve_batch_matches_ofa_fixture(tmp_path, ofa_text):
    require_fixture("snli_ve")
    reference = load_reference("snli_ve")
    bpe, dictionary = ofa_text
    trie = _snli_trie(dictionary, bpe)
    dataset = _snli_dataset(
        tmp_path, snli_fixture_rows(reference), max_src_length=80, patch_image_size=288, add_caption=True,
        constraint_trie=trie, imagenet_default_mean_and_std=True, prompt_type="prev_output",
    )
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    net_input = batch["net_input"]
    assert [int(i) for i in batch["id"]] == reference["ids"]
    assert torch.equal(net_input["src_tokens"], reference["src_tokens"])
    assert torch.equal(net_input["src_lengths"], reference["src_lengths"])
    assert torch.equal(net_input["prev_output_tokens"], reference["prev_output_tokens"])
    assert torch.equal(batch["target"], reference["target"])
    assert batch["decoder_prompts"] == reference["decoder_prompts"]
    torch.testing.assert_close(net_input["patch_images"], reference["patch_images"], atol=IMAGE_ATOL, rtol=0)
    assert batch["ref_dict"] == [{"yes": 1.0}, {"no": 1.0}, {"maybe": 1.0}]
    assert batch["ntokens"] == 6

    prompts = reference["decoder_prompts"]
    prefix = batch["prefix_tokens"]
    for i, prompt in enumerate(prompts):
        assert prefix[i, : len(prompt) - 1].tolist() == prompt[1:]
        assert prefix[i, len(prompt) - 1 :].eq(dictionary.pad()).all()

    masks = batch["constraint_masks"]
    assert masks.shape == (3, reference["target"].size(1), len(dictionary))
    answers = sorted(tok[0] for tok in reference["snli_answer_token_ids"])
    for i, prompt in enumerate(prompts):
        answer_pos = len(prompt) - 1
        assert not masks[i, :answer_pos].any()
        assert masks[i, answer_pos].nonzero().flatten().tolist() == answers
        assert masks[i, answer_pos + 1].nonzero().flatten().tolist() == [dictionary.eos()]
        assert masks[i, answer_pos + 2 :].all()


def test_snli_ve_prompt_types(tmp_path, ofa_text):
    bpe, dictionary = ofa_text
    pad, bos, eos = dictionary.pad(), dictionary.bos(), dictionary.eos()
    rows = [["5", "i", solid_image_base64(), "A Dog.", "a park", "neutral"]]
    maybe = encode_text(" maybe", bpe, dictionary).tolist()
    samples = {
        kind: _snli_dataset(tmp_path, rows, patch_image_size=8, prompt_type=kind)[0]
        for kind in ("none", "src", "prev_output")
    }
    source = samples["none"]["source"].tolist()
    hypothesis_only = [bos] + encode_text(' does the image describe " a dog. "?', bpe, dictionary).tolist() + [eos]
    assert source == hypothesis_only
    assert samples["none"]["prev_output_tokens"].tolist() == [bos] + maybe
    assert samples["none"]["target"].tolist() == maybe + [eos]
    assert samples["src"]["prev_output_tokens"].tolist() == source + maybe
    assert samples["src"]["target"].tolist() == [pad] * (len(source) - 1) + maybe + [eos]
    assert samples["prev_output"]["prev_output_tokens"].tolist() == source[:-1] + maybe
    assert samples["prev_output"]["target"].tolist() == [pad] * (len(source) - 2) + maybe + [eos]
    assert samples["src"]["decoder_prompt"].tolist() == source
    assert "constraint_mask" not in samples["none"]
    assert _snli_dataset(tmp_path, rows, patch_image_size=8, prompt_type=None)[0]["target"].tolist() == maybe + [eos]
    with pytest.raises(ValueError, match="--prompt-type must be one of"):
        _snli_dataset(tmp_path, rows, prompt_type="question")


def test_snli_ve_unknown_label_names_row(tmp_path):
    rows = [["9", "i", solid_image_base64(), "a dog", "a park", "entails"]]
    dataset = _snli_dataset(tmp_path, rows, patch_image_size=8)
    with pytest.raises(ValueError, match=r"row 9 \(.*snli\.tsv, line 1\): unknown label 'entails'"):
        dataset[0]
