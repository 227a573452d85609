"""Labelled text and image readers: formats, columns, and errors that name the file and line."""

import gzip
import struct

import numpy as np
import pytest

from moekit.data.images import builtin_digits, read_images
from moekit.data.labelled import WordVocab, label_ids, label_names, read_labelled
from moekit.errors import DataError


def test_tsv_csv_jsonl_read_the_same_rows(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\n")
    (tmp_path / "a.csv").write_text('label,text\npos,good film\nneg,"bad film"\n')
    (tmp_path / "a.jsonl").write_text('{"text": "good film", "label": "pos"}\n\n{"text": "bad film", "label": "neg"}\n')
    for name in ("a.tsv", "a.csv", "a.jsonl"):
        rows = read_labelled(tmp_path / name)
        assert rows.texts == ["good film", "bad film"] and rows.labels == ["pos", "neg"], name
    assert read_labelled(tmp_path / "a.jsonl").lines == [1, 3]


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: expected 2 fields"):
        read_labelled(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\nfine\t1\n \t0\n")
    with pytest.raises(DataError, match=r"empty\.tsv:3: empty or missing text"):
        read_labelled(empty)
    js = tmp_path / "bad.jsonl"
    js.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_labelled(js)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,label\nok,1\nmissing,\n")
    with pytest.raises(DataError, match=r"nolabel\.csv:3: missing label"):
        read_labelled(nolabel)


def test_unknown_label_names_file_and_line(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\na\t0\nb\t1\nc\t10\n")
    names = label_names(read_labelled(train).labels)
    assert names == ["0", "1", "10"]  # numeric order
    dev = tmp_path / "dev.tsv"
    dev.write_text("text\tlabel\na\t0\nb\t7\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3: label '7' is not one of the training labels"):
        label_ids(read_labelled(dev), names)


def test_word_vocab_roundtrip_and_unknown_words():
    vocab = WordVocab.build(["The film, the END!", "a film"])
    ids = vocab.encode("the film zzz", max_length=8)
    assert ids[:2] == [vocab.index["the"], vocab.index["film"]] and ids[2] == 1
    assert WordVocab.from_dict(vocab.to_dict()).words == vocab.words
    assert vocab.encode("", 8) == [1]


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_pair_and_mismatched_counts(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 4, 4)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    data = read_images(tmp_path / "train-images-idx3-ubyte.gz")
    assert tuple(data.pixels.shape) == (3, 1, 4, 4) and data.labels == ["1", "2", "3"]
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2]))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        read_images(tmp_path / "train-images-idx3-ubyte.gz")


def test_folder_with_an_image_of_the_wrong_size(tmp_path):
    from PIL import Image

    for label, size in (("cat", 8), ("dog", 8), ("dog", 9)):
        folder = tmp_path / label
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(folder / f"{size}.png")
    with pytest.raises(DataError, match=r"dog/9\.png: image is 9x9 .*8\.png \(the first image\)"):
        read_images(tmp_path)


def test_npz_and_builtin_digits(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 6, 6), dtype=np.float32), y=np.arange(5))
    data = read_images(tmp_path / "d.npz")
    assert tuple(data.pixels.shape) == (5, 1, 6, 6) and int(data.pixels.max()) == 255
    train, test = builtin_digits("train"), builtin_digits("test")
    assert len(train) + len(test) == 1797 and tuple(train.pixels.shape[1:]) == (1, 8, 8)
    assert not set(train.sources) & set(test.sources)
