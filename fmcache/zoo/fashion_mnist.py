"""Fashion-MNIST from its gzip IDX files, as a map-style torch Dataset.

The files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or any folder holding the four standard files::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

IDX layout (produced by the data set's authors; all integers big-endian)::

    u8 0 | u8 0 | u8 dtype code (0x08 = uint8) | u8 ndim | ndim x u32 dims | data

Only uint8 IDX files are read (the only kind Fashion-MNIST has). Each file is decoded once
per process into a read-only uint8 array; a :class:`FashionMNIST` holds those arrays and its
parameters only, so it pickles into spawn workers and is safe under fork.

For the CLI: ``--data fmcache.zoo.fashion_mnist:train`` (or ``:test``).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, DataFileNotFoundError

__all__ = [
    "DEFAULT_DATA_DIR",
    "MEAN",
    "STD",
    "DataError",
    "DataFileNotFoundError",
    "FashionMNIST",
    "load_split",
    "read_idx",
    "test",
    "train",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
#: mean and std of the training pixels scaled to [0, 1] (measurements.md)
MEAN = 0.2860
STD = 0.3530
#: zero padding of the random crop, in pixels (the CIFAR recipe)
CROP_PADDING = 4

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UINT8 = 0x08
_MAX_IDX_NDIM = 4


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a gzip-compressed uint8 IDX file.

    Parameters
    ----------
    path : path-like
        A ``*.gz`` IDX file (magic ``00 00 08 ndim``, big-endian uint32 dims, uint8 data).

    Returns
    -------
    numpy.ndarray
        A fresh, writable uint8 array of the stored shape.

    Raises
    ------
    DataFileNotFoundError
        The file does not exist.
    DataError
        Not gzip, truncated, a bad magic number, or a payload that does not match the
        dims; the message names the file.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero1, zero2, dtype_code, ndim = raw[:4]
    if zero1 != 0 or zero2 != 0:
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()} (must start with 0000)")
    if dtype_code != _IDX_UINT8:
        raise DataError(f"{path}: IDX dtype code 0x{dtype_code:02x}, only uint8 (0x08) is supported")
    if not 1 <= ndim <= _MAX_IDX_NDIM:
        raise DataError(f"{path}: IDX header says {ndim} dimensions, expected 1..{_MAX_IDX_NDIM}")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header_bytes} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header_bytes
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(f"{path}: IDX data {what}: dims {dims} need {expected} bytes, found {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def _resolve_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)


@functools.lru_cache(maxsize=4)
def _load_split_cached(images_path: Path, labels_path: Path, stamp: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    # ``stamp`` (mtimes and sizes) is only part of the key: a changed file is re-read.
    del stamp
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected an N x H x W image file, got dims {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label file, got dims {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    images.setflags(write=False)  # shared by every dataset of this process
    labels.setflags(write=False)
    return images, labels


def load_split(
    split: Literal["train", "test"] = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels (N uint8) of one split, read-only.

    Decoded once per process and file version (a small in-memory cache).

    Raises
    ------
    DataError
        ``split`` is not ``"train"`` or ``"test"``, or a file is malformed.
    DataFileNotFoundError
        A file is missing.
    """
    if split not in _FILES:
        raise DataError(f"split={split!r} is not 'train' or 'test'", hint="Fashion-MNIST has a train and a test split")
    folder = _resolve_dir(data_dir)
    paths = tuple((folder / name).resolve() for name in _FILES[split])
    stamp: list[int] = []
    for path in paths:
        try:
            info = path.stat()
        except FileNotFoundError:
            raise DataFileNotFoundError(f"Fashion-MNIST file {path} not found") from None
        stamp += [info.st_mtime_ns, info.st_size]
    return _load_split_cached(paths[0], paths[1], tuple(stamp))


class FashionMNIST(Dataset[tuple[torch.Tensor, int]]):
    """Fashion-MNIST as float32 ``C x pad_to x pad_to`` tensors with int labels.

    The 28x28 image is centred on a zero canvas of ``pad_to`` pixels, scaled to [0, 1],
    then (``normalize``) standardised with :data:`MEAN` and :data:`STD`, and repeated to
    ``channels`` channels.

    Parameters
    ----------
    split : {"train", "test"}
    data_dir : path-like, optional
        Folder with the four ``.gz`` files; default :data:`DEFAULT_DATA_DIR`.
    pad_to : int
        Output height and width, >= 28 (32 matches CIFAR-style networks).
    channels : {1, 3}
    augment : bool
        Random crop (zero padding 4, before normalisation) and horizontal flip (p = 0.5).
    limit : int, optional
        Keep only the first ``limit`` samples.
    normalize : bool
    seed : int, optional
        With a seed, the augmentation of a sample is a function of (seed, epoch, sample)
        alone (:meth:`set_epoch`), whatever the worker or process. Without one, each call
        draws from torch's global RNG, which ``DataLoader`` seeds differently per worker
        and epoch.

    Raises
    ------
    DataError, DataFileNotFoundError
        Bad parameters, or missing or malformed files.
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        data_dir: str | os.PathLike[str] | None = None,
        pad_to: int = 32,
        channels: int = 1,
        augment: bool = False,
        limit: int | None = None,
        normalize: bool = True,
        seed: int | None = None,
    ) -> None:
        if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 28:
            raise DataError(f"pad_to={pad_to!r} must be an integer >= 28", hint="Fashion-MNIST images are 28x28")
        if channels not in (1, 3) or isinstance(channels, bool):
            raise DataError(f"channels={channels!r} must be 1 or 3", hint="3 repeats the grey channel")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise DataError(f"limit={limit!r} must be None or an integer >= 0", hint="limit keeps the first N samples")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise DataError(f"seed={seed!r} must be None or an integer >= 0", hint="pass e.g. seed=0")
        images, labels = load_split(split, data_dir)
        self.split = split
        self.pad_to = pad_to
        self.channels = channels
        self.augment = bool(augment)
        self.normalize = bool(normalize)
        self.seed = seed
        self.epoch = 0
        self.images = images[:limit]
        self.labels = labels[:limit]

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations a seeded dataset draws."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} is out of range for {len(self)} samples")
        index = index % len(self)
        shift_y = shift_x = 0
        flip = False
        if self.augment:
            shift_y, shift_x, flip = self._draw(index)
        image = self._render(self.images[index], shift_y, shift_x, flip)
        return image, int(self.labels[index])

    def _draw(self, index: int) -> tuple[int, int, bool]:
        generator = torch.Generator()
        if self.seed is None:
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        else:
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint32)
            generator.manual_seed(int(state[0]) << 32 | int(state[1]))
        draws = torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=generator)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        # a crop at offset o of the padded image shifts the content by CROP_PADDING - o
        return CROP_PADDING - int(draws[0]), CROP_PADDING - int(draws[1]), flip

    def _render(self, pixels: np.ndarray, shift_y: int, shift_x: int, flip: bool) -> torch.Tensor:
        size = self.pad_to
        height, width = pixels.shape
        top = (size - height) // 2 + shift_y
        left = (size - width) // 2 + shift_x
        canvas = np.zeros((size, size), dtype=np.float32)
        # paste, clipped to the canvas (the crop drops what is shifted out)
        y0, y1 = max(top, 0), min(top + height, size)
        x0, x1 = max(left, 0), min(left + width, size)
        if y0 < y1 and x0 < x1:
            canvas[y0:y1, x0:x1] = pixels[y0 - top:y1 - top, x0 - left:x1 - left]
        canvas *= np.float32(1 / 255)
        if flip:
            canvas = np.ascontiguousarray(canvas[:, ::-1])
        if self.normalize:
            canvas -= np.float32(MEAN)
            canvas *= np.float32(1 / STD)
        tensor = torch.from_numpy(canvas).unsqueeze(0)
        return tensor.expand(self.channels, size, size).clone() if self.channels > 1 else tensor

    def __repr__(self) -> str:
        return (f"FashionMNIST(split={self.split!r}, n={len(self)}, pad_to={self.pad_to}, channels={self.channels}, "
                f"augment={self.augment}, normalize={self.normalize}, seed={self.seed})")


def train() -> FashionMNIST:
    """The training split with default settings (for ``--data fmcache.zoo.fashion_mnist:train``)."""
    return FashionMNIST("train")


def test() -> FashionMNIST:
    """The test split with default settings (for ``--data fmcache.zoo.fashion_mnist:test``)."""
    return FashionMNIST("test")


# pytest would collect the module-level ``test`` if a test module imported it by name.
test.__test__ = False  # type: ignore[attr-defined]
