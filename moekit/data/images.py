"""Labelled images: IDX (MNIST's format, optionally gzipped), NPZ, folders of class subfolders, and
scikit-learn's bundled 8x8 digits (``builtin:digits``, offline).

Every reader returns :class:`LabelledImages`: uint8 pixels [N, C, H, W] and string labels.
Errors name the file (and the image) that is wrong.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from moekit.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm")
BUILTIN_DIGITS = "builtin:digits"


@dataclasses.dataclass
class LabelledImages:
    """``pixels[i]`` (uint8 [C, H, W], 0 = black) has label ``labels[i]``; ``sources[i]`` says where it came from."""

    path: str
    pixels: torch.Tensor
    labels: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_images(path: str | os.PathLike) -> LabelledImages:
    """Read labelled images from an IDX images file (labels from the matching ``labels-idx1`` file),
    an ``.npz`` (arrays ``x``/``images`` and ``y``/``labels``), a folder of class subfolders, or ``builtin:digits``."""
    if str(path).startswith(BUILTIN_DIGITS):
        return builtin_digits(str(path).partition(":digits")[2].lstrip(":") or "all")
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if not p.is_file():
        raise DataError(f"{p}: no such file or folder")
    if p.suffix == ".npz":
        return _read_npz(p)
    if "idx3" in p.name:
        labels_path = p.with_name(p.name.replace("images-idx3", "labels-idx1").replace("idx3", "idx1"))
        if not labels_path.is_file():
            raise DataError(f"{p}: found no labels file {labels_path.name} next to it")
        pixels = _read_idx(p, 3)
        labels = _read_idx(labels_path, 1)
        if len(labels) != len(pixels):
            raise DataError(f"{p} holds {len(pixels)} images but {labels_path} holds {len(labels)} labels")
        return LabelledImages(
            str(p),
            torch.from_numpy(pixels.copy()).unsqueeze(1),
            [str(int(v)) for v in labels],
            [f"{p}#{i}" for i in range(len(labels))],
        )
    raise DataError(f"{p}: unknown image format; use IDX (*-idx3-ubyte[.gz]), .npz, a folder, or {BUILTIN_DIGITS}")


def _read_idx(p: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged .gz
        raise DataError(f"{p}: cannot read ({e})") from None
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{p}: too short for an IDX header")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise DataError(f"{p}: not an IDX file of {ndim}-d unsigned bytes (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):  # exact: numpy's int64 product wraps around for huge dimensions
        raise DataError(f"{p}: header says {shape} = {math.prod(shape)} bytes, the file holds {body.size}")
    return body.reshape(shape)


def _read_npz(p: Path) -> LabelledImages:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{p}: cannot read ({e})") from None
    x = next((arrays[k] for k in ("x", "images", "x_train") if k in arrays), None)
    y = next((arrays[k] for k in ("y", "labels", "y_train") if k in arrays), None)
    if x is None or y is None:
        raise DataError(f"{p}: needs arrays 'x' (or 'images') and 'y' (or 'labels'); it has {sorted(arrays)}")
    if y.ndim != 1:
        raise DataError(f"{p}: labels must be a 1-d array, got shape {y.shape}")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{p}: images must hold numbers, got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{p}: images hold NaN or infinite values")
    if x.ndim == 0 or len(x) != len(y):
        raise DataError(f"{p}: {len(x) if x.ndim else 'no'} images but {len(y)} labels")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4:
        raise DataError(f"{p}: images must be [N, H, W] or [N, C, H, W], got shape {x.shape}")
    if x.dtype != np.uint8:
        scale = 255.0 if float(np.max(x, initial=0)) <= 1.0 else 1.0
        x = np.clip(x * scale, 0, 255).astype(np.uint8)
    return LabelledImages(
        str(p),
        torch.from_numpy(np.ascontiguousarray(x)),
        [str(v) for v in y.tolist()],
        [f"{p}#{i}" for i in range(len(y))],
    )


def _read_folder(root: Path) -> LabelledImages:
    from PIL import Image

    pixels, labels, sources = [], [], []
    shape = None
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    mode = "L" if im.mode in ("L", "1", "I", "P") else "RGB"
                    arr = np.asarray(im.convert(mode))
            except OSError as e:
                raise DataError(f"{f}: not a readable image ({e})") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if shape is None:
                shape, first = arr.shape, f
            elif arr.shape != shape:
                raise DataError(
                    f"{f}: image is {_size(arr.shape)} but {first} (the first image) is {_size(shape)}; "
                    "all images must have the same size and channels"
                )
            pixels.append(arr)
            labels.append(class_dir.name)
            sources.append(str(f))
    if not pixels:
        raise DataError(f"{root}: no images in class subfolders ({', '.join(IMAGE_SUFFIXES)})")
    return LabelledImages(str(root), torch.from_numpy(np.stack(pixels)), labels, sources)


def _size(shape) -> str:
    c, h, w = shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"


def builtin_digits(split: str = "all") -> LabelledImages:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download). ``split``: all, train
    (the first 80%, after a fixed shuffle) or test (the rest)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)  # [N, 1, 8, 8]
    y = [str(int(v)) for v in digits.target]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    if split == "train":
        order = order[:cut]
    elif split == "test":
        order = order[cut:]
    elif split != "all":
        raise DataError(f"{BUILTIN_DIGITS}:{split}: the split must be train, test or all")
    name = f"{BUILTIN_DIGITS}:{split}"
    return LabelledImages(name, x[order], [y[i] for i in order], [f"{name}#{int(i)}" for i in order])


def check_image_size(data: LabelledImages, channels: int, size: int) -> None:
    """Images must match the model: C channels, size x size pixels."""
    _, c, h, w = data.pixels.shape
    if (c, h, w) != (channels, size, size):
        raise DataError(
            f"{data.path}: images are {_size((c, h, w))} but the model takes {_size((channels, size, size))}"
        )
