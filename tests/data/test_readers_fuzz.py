"""Fuzzing the data readers: text corpora (plain and JSONL), labelled TSV/CSV/JSONL files and IDX/NPZ images.
Every file either loads, consistently, or raises a DataError (a MoekitError); never another exception."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.images import read_images
from moekit.data.labelled import read_labelled
from moekit.data.text import load_text
from moekit.errors import DataError
from tests.fuzzing import fuzz, loaded_or_refused


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readers_fuzz")


def _fresh(folder: Path, name: str) -> Path:
    """``folder/name`` after removing what an earlier example left there."""
    path = folder / name
    for stale in folder.glob(f"{path.stem}*"):
        stale.unlink()
    return path


# Text as people's files hold it: any characters, NUL and control bytes, separators and quotes, in UTF-8 or not.
_TEXT = st.text(
    st.one_of(st.characters(), st.sampled_from(["\t", ",", '"', "\n", "\r", "\x00", "\ufeff", " ", "é"])), max_size=40
)
_WORDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 .!?'é]{0,12}", fullmatch=True)  # cells that load
_CELLS = st.one_of(_WORDS, _WORDS, _TEXT)
_ENCODINGS = st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "utf-16"])


def _encoded(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace")


# -- text corpora ----------------------------------------------------------------------------------------------


def _text_or_refused(path: Path) -> str | None:
    text = loaded_or_refused(lambda: load_text(path))
    assert text is None or isinstance(text, str) and text.strip()
    return text


@fuzz(200)
@given(raw=st.one_of(st.binary(max_size=200), st.tuples(_TEXT, _ENCODINGS).map(lambda t: _encoded(*t))))
def test_a_text_file_loads_as_itself_or_is_refused(folder, raw):
    path = _fresh(folder, "corpus.txt")
    path.write_bytes(raw)
    text = _text_or_refused(path)
    if text is not None:
        assert text == raw.decode("utf-8").removeprefix("\ufeff")


_JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_TEXT, inner, max_size=3)),
    max_leaves=6,
)
_JSONL_LINES = st.one_of(
    st.fixed_dictionaries({"text": _WORDS, "label": st.one_of(_WORDS, st.integers(0, 3))}).map(json.dumps),
    st.dictionaries(st.sampled_from(["text", "label", "body", ""]), _JSON_VALUES, max_size=3).map(json.dumps),
    _JSON_VALUES.map(json.dumps),
    _TEXT,
)


@fuzz(200)
@given(lines=st.lists(_JSONL_LINES, max_size=5), ending=st.sampled_from(["\n", "\r\n", "\u2028"]))
def test_a_jsonl_corpus_loads_or_is_refused(folder, lines, ending):
    path = _fresh(folder, "corpus.jsonl")
    path.write_bytes(ending.join(lines).encode("utf-8", errors="surrogatepass"))
    _text_or_refused(path)


@fuzz(60)
@given(files=st.lists(st.tuples(st.sampled_from(["a.txt", "b.jsonl", ".hidden", "c.bin"]), st.binary(max_size=40))))
def test_a_folder_corpus_loads_or_is_refused(folder, files):
    corpus = folder / "corpus_dir"
    corpus.mkdir(exist_ok=True)
    for old in corpus.iterdir():
        old.unlink()
    for name, raw in files:
        (corpus / name).write_bytes(raw)
    _text_or_refused(corpus)


# -- labelled text ---------------------------------------------------------------------------------------------


def _labelled_or_refused(path: Path, require_labels: bool) -> None:
    data = loaded_or_refused(lambda: read_labelled(path, require_labels=require_labels))
    if data is None:
        return
    assert len(data.texts) == len(data.labels) == len(data.lines) >= 1
    assert all(isinstance(t, str) and t and t == t.strip() for t in data.texts)
    assert all(label is None or isinstance(label, str) for label in data.labels)
    assert not require_labels or None not in data.labels
    assert data.lines == sorted(data.lines)


_SUFFIXES = st.sampled_from([".tsv", ".csv", ".txt", ".jsonl", ".json"])


@fuzz(200)
@given(raw=st.binary(max_size=200), suffix=_SUFFIXES, require_labels=st.booleans())
def test_random_bytes_as_labelled_text_load_or_are_refused(folder, raw, suffix, require_labels):
    path = _fresh(folder, f"labelled{suffix}")
    path.write_bytes(raw)
    _labelled_or_refused(path, require_labels)


@st.composite
def _delimited(draw) -> tuple[str, str]:
    """A header (often text/label) and rows with about as many columns, as TSV or CSV."""
    delimiter = draw(st.sampled_from(["\t", ","]))
    header = draw(st.one_of(st.just(["text", "label"]), st.lists(st.sampled_from(["text", "label", "x", ""]))))
    rows = [header]
    for _ in range(draw(st.integers(0, 4))):
        width = max(0, len(header) + draw(st.sampled_from([0, 0, 0, -1, 1])))
        rows.append(draw(st.lists(_CELLS, min_size=width, max_size=width)))
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    return suffix, draw(st.sampled_from(["\n", "\r\n"])).join(delimiter.join(row) for row in rows)


@fuzz(200)
@given(table=_delimited(), encoding=_ENCODINGS, require_labels=st.booleans())
def test_tables_with_odd_cells_load_or_are_refused(folder, table, encoding, require_labels):
    suffix, text = table
    path = _fresh(folder, f"table{suffix}")
    path.write_bytes(_encoded(text, encoding))
    _labelled_or_refused(path, require_labels)


@fuzz(150)
@given(lines=st.lists(_JSONL_LINES, max_size=5), require_labels=st.booleans())
def test_labelled_jsonl_loads_or_is_refused(folder, lines, require_labels):
    path = _fresh(folder, "records.jsonl")
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass"))
    _labelled_or_refused(path, require_labels)


# -- IDX and NPZ images ----------------------------------------------------------------------------------------


def _idx(dtype: int, shape: list[int], body: bytes, dims: int | None = None) -> bytes:
    dims = len(shape) if dims is None else dims
    return struct.pack(">HBB", 0, dtype, dims) + b"".join(struct.pack(">I", d) for d in shape) + body


def _images_or_refused(path: Path) -> None:
    data = loaded_or_refused(lambda: read_images(path))
    if data is None:
        return
    n = len(data)
    assert data.pixels.dtype.is_floating_point is False and data.pixels.ndim == 4 and data.pixels.shape[0] == n
    assert len(data.sources) == n and all(isinstance(label, str) for label in data.labels)


_DIMS = st.one_of(st.integers(0, 4), st.sampled_from([2**32 - 1, 2**31, 65536, 2**21 + 1]))


@st.composite
def _idx_pair(draw) -> tuple[bytes, bytes]:
    """An images file and a labels file, each a real IDX header with some field changed, and bodies of about the
    size the header says."""
    n = draw(st.integers(0, 4))
    shapes = [[n, draw(st.integers(0, 4)), draw(st.integers(0, 4))], [n]]
    change = draw(st.sampled_from(["none", "none", "dim", "size", "dtype", "dims", "cut"]))
    which = draw(st.integers(0, 1))  # the file the change goes into
    if change == "dim":
        shapes[which][draw(st.integers(0, len(shapes[which]) - 1))] = draw(_DIMS)
    files = []
    for i, shape in enumerate(shapes):
        size = math.prod(shape) if max(shape) <= 4 else draw(st.integers(0, 64))
        if change == "size" and i == which:
            size = max(0, size + draw(st.sampled_from([-1, 1, 7])))
        dtype = draw(st.sampled_from([0x09, 0x0D, 0xFF])) if change == "dtype" and i == which else 0x08
        dims = draw(st.sampled_from([0, 1, 2, 3, 4, 255])) if change == "dims" and i == which else None
        raw = _idx(dtype, shape, draw(st.binary(min_size=size, max_size=size)), dims)
        files.append(raw[: draw(st.integers(0, len(raw)))] if change == "cut" and i == which else raw)
    return files[0], files[1]


@fuzz(200)
@given(pair=_idx_pair(), gz=st.sampled_from(["", "", ".gz", "bad.gz"]))
def test_idx_files_with_odd_headers_load_or_are_refused(folder, pair, gz):
    images, labels = pair
    if gz:
        images, labels = gzip.compress(images), gzip.compress(labels)
        if gz == "bad.gz":  # a damaged deflate stream behind an intact gzip header
            images = images[:10] + bytes(b ^ 0x5A for b in images[10:])
    suffix = ".gz" if gz else ""
    path = _fresh(folder, f"train-images-idx3-ubyte{suffix}")
    path.write_bytes(images)
    _fresh(folder, f"train-labels-idx1-ubyte{suffix}").write_bytes(labels)
    _images_or_refused(path)


@fuzz(100)
@given(raw=st.binary(max_size=120), name=st.sampled_from(["x-images-idx3-ubyte", "x-images-idx3-ubyte.gz", "x.npz"]))
def test_random_bytes_as_images_load_or_are_refused(folder, raw, name):
    path = _fresh(folder, name)
    path.write_bytes(raw)
    labels = folder / name.replace("idx3", "idx1").replace("images", "labels")
    if labels != path:
        labels.write_bytes(_idx(0x08, [1], b"\x03"))
    _images_or_refused(path)


_ARRAYS = st.one_of(
    st.integers(0, 3).flatmap(lambda n: st.just(np.zeros((n, 2, 2), dtype=np.uint8))),
    st.just(np.zeros((2, 3, 3, 1), dtype=np.float32)),
    st.just(np.ones((2, 1, 2, 2), dtype=np.float64) * 0.5),
    st.just(np.array(5)),
    st.just(np.array(["a", "b"])),
    st.just(np.zeros((2, 2), dtype=np.complex64)),
    st.just(np.array([np.nan, np.inf])),
    st.just(np.zeros((2, 1, 1, 1, 1), dtype=np.uint8)),
    st.just(np.array([1, 2], dtype=np.int64)),
    st.just(np.array([True, False])),
)


_IMAGE_ARRAYS = st.integers(0, 3).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "x": st.sampled_from([(n, 2, 2), (n, 1, 2, 2), (n, 2, 2, 3)]).map(lambda s: np.ones(s, dtype=np.uint8)),
            "y": st.just(np.arange(n)),
        }
    )
)


@fuzz(100)
@given(
    arrays=st.one_of(
        _IMAGE_ARRAYS,
        st.dictionaries(st.sampled_from(["x", "images", "y", "labels", "other"]), _ARRAYS, max_size=3),
    ),
    damage=st.sampled_from([None, None, 0, 30, 100, -20]),
)
def test_npz_files_of_any_arrays_load_or_are_refused(folder, arrays, damage):
    path = _fresh(folder, "images.npz")
    np.savez(path, **arrays)
    if damage is not None:  # truncate, or flip a byte inside the archive
        raw = path.read_bytes()
        path.write_bytes(
            raw[:damage] if damage >= 0 else raw[:damage] + bytes([raw[damage] ^ 0xFF]) + raw[damage + 1 :]
        )
    _images_or_refused(path)


# -- regressions the fuzzing found ----------------------------------------------------------------------------


def test_idx_dimensions_whose_product_overflows_are_a_data_error(folder):
    path = _fresh(folder, "huge-images-idx3-ubyte")
    # 2**21 * 2**21 * 2**22 = 2**64 wraps around to 0 in numpy's int64 product, "matching" an empty body.
    path.write_bytes(_idx(0x08, [2**21, 2**21, 2**22], b""))
    _fresh(folder, "huge-labels-idx1-ubyte").write_bytes(_idx(0x08, [2**21], b""))
    with pytest.raises(DataError, match=r"header says \(2097152, 2097152, 4194304\) = 18446744073709551616 bytes"):
        read_images(path)


def test_a_damaged_gzipped_idx_file_is_a_data_error(folder):
    raw = gzip.compress(_idx(0x08, [1, 2, 2], b"\1\2\3\4" * 30))
    path = _fresh(folder, "bad-images-idx3-ubyte.gz")
    path.write_bytes(raw[:10] + bytes(b ^ 0x5A for b in raw[10:]))
    _fresh(folder, "bad-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(0x08, [1], b"\0")))
    with pytest.raises(DataError, match=r"bad-images-idx3-ubyte.gz: cannot read \(.*decompress"):
        read_images(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.array(5), "y": np.array([1])}, "no images but 1 labels"),
        ({"x": np.array(["a", "b"]), "y": np.array([1, 2])}, "images must hold numbers, got dtype <U1"),
        ({"x": np.full((1, 2, 2), np.nan), "y": np.array([1])}, "images hold NaN or infinite values"),
        ({"x": np.zeros((2, 2, 2)), "y": np.zeros((2, 2))}, r"labels must be a 1-d array, got shape \(2, 2\)"),
    ],
)
def test_npz_arrays_that_are_not_images_and_labels_are_a_data_error(folder, arrays, message):
    path = _fresh(folder, "odd.npz")
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        read_images(path)


@pytest.mark.parametrize("raw", [b"", b"PK\x03\x04" + b"\0" * 30])
def test_an_npz_file_that_is_empty_or_not_a_zip_is_a_data_error(folder, raw):
    path = _fresh(folder, "broken.npz")
    path.write_bytes(raw)
    with pytest.raises(DataError, match=r"broken.npz: cannot read"):
        read_images(path)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_labelled_text_that_is_not_utf8_is_a_data_error(folder, suffix):
    path = _fresh(folder, f"latin1{suffix}")
    line = '{"text": "café", "label": "x"}' if suffix == ".jsonl" else "text\tlabel\ncafé\tx"
    path.write_bytes(line.replace("\t", "," if suffix == ".csv" else "\t").encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid UTF-8: byte 0xe9 at byte offset \d+"):
        read_labelled(path)


def test_a_field_over_the_csv_size_limit_is_a_data_error(folder):
    path = _fresh(folder, "unclosed.csv")
    path.write_text('text,label\n"an unclosed quote swallows the rest,1\n' + "x" * 200_000)
    with pytest.raises(DataError, match=r"unclosed.csv:\d+: field larger than field limit"):
        read_labelled(path)


@pytest.mark.parametrize("reader", [load_text, read_labelled])
def test_deeply_nested_jsonl_is_a_data_error(folder, reader):
    path = _fresh(folder, "deep.jsonl")
    path.write_text('{"text": "a", "label": "b"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"(, line |:)2: JSON nested too deeply"):
        reader(path)


def test_a_corpus_of_only_a_byte_order_mark_is_empty(folder):
    path = _fresh(folder, "bom.txt")
    path.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(DataError, match=r"bom.txt is empty \(only whitespace\)"):
        load_text(path)


def test_labelled_rows_keep_their_line_numbers_after_the_utf8_check(folder):
    path = _fresh(folder, "lines.tsv")
    path.write_text("text\tlabel\r\n\r\ngood\t1\r\nalso good\t2\n", newline="")
    data = read_labelled(path)
    assert data.texts == ["good", "also good"] and data.labels == ["1", "2"] and data.lines == [3, 4]
