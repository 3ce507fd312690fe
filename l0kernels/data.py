"""Data for the demo, the tests and the examples.

* :func:`load_mnist` reads the four MNIST IDX files (gzip-compressed or raw) from a folder.
* :func:`teacher_task` builds a regression task with a known answer: the target depends on
  ``n_true`` of ``n_features`` inputs only, so an L0 input-gated layer should keep exactly those.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

# IDX type codes -> numpy dtypes (big-endian)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MNIST pixel statistics over the training set (after scaling to [0, 1])
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array of its stored shape and type."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    start = 4 + 4 * ndim
    if len(data) - start < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated ({len(data) - start} bytes of data, need {count * dtype.itemsize})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _find(folder: str, stem: str) -> Optional[str]:
    # both "train-images-idx3-ubyte" and "train-images.idx3-ubyte" spellings are common
    for name in (stem, stem.replace("-idx", ".idx")):
        for ext in (".gz", ""):
            p = os.path.join(folder, name + ext)
            if os.path.isfile(p):
                return p
    return None


def mnist_paths(folder: str) -> Dict[str, str]:
    """The four MNIST file paths in ``folder``; raises ``FileNotFoundError`` naming any missing one."""
    found = {k: _find(folder, stem) for k, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(f"MNIST files not found in {folder!r}: {', '.join(missing)} (.gz or raw IDX)")
    return found  # type: ignore[return-value]


def has_mnist(folder: Optional[str]) -> bool:
    return bool(folder) and os.path.isdir(folder) and all(
        _find(folder, stem) is not None for stem in MNIST_FILES.values())


def load_mnist(folder: str, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``; images float32 ``(n, 1, 28, 28)``, labels int64.

    With ``normalize`` the pixels are scaled to [0, 1] then standardised with MNIST's mean and std.
    """
    p = mnist_paths(folder)
    out = []
    for split in ("train", "test"):
        img = read_idx(p[f"{split}_images"])
        lab = read_idx(p[f"{split}_labels"])
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise ValueError(f"{folder}: unexpected MNIST shapes {img.shape} and {lab.shape}")
        x = torch.from_numpy(img).to(torch.float32).div_(255.0).unsqueeze(1)
        if normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        out += [x, torch.from_numpy(lab.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


@dataclass
class TeacherTask:
    """A regression task whose target uses only the inputs in ``support``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    support: torch.Tensor  # sorted indices of the inputs the teacher uses
    noise_std: float

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def teacher_task(n_features: int = 500, n_true: int = 50, n_train: int = 4096, n_test: int = 2048,
                 noise_std: float = 0.1, nonlinear: bool = True, seed: int = 0) -> TeacherTask:
    """Inputs ``x ~ N(0, I)``; target from a fixed random teacher on ``n_true`` inputs.

    The teacher is ``y = x_S @ w + 0.5 * tanh(x_S @ A) @ b`` (``nonlinear``) or ``y = x_S @ w``,
    with ``|w_i|`` in [0.5, 1.5] so that every true input matters, plus Gaussian noise of
    ``noise_std``. Everything is drawn from a private generator seeded by ``seed``.
    """
    if not 0 < n_true <= n_features:
        raise ValueError(f"n_true must be in [1, n_features={n_features}], got {n_true}")
    g = torch.Generator().manual_seed(int(seed))
    support = torch.randperm(n_features, generator=g)[:n_true].sort().values
    sign = torch.randint(0, 2, (n_true,), generator=g).float() * 2 - 1
    w = sign * (0.5 + torch.rand(n_true, generator=g))
    hidden = 16
    a = torch.randn(n_true, hidden, generator=g) / n_true ** 0.5
    b = torch.randn(hidden, generator=g) / hidden ** 0.5

    def make(n):
        x = torch.randn(n, n_features, generator=g)
        xs = x[:, support]
        y = xs @ w
        if nonlinear:
            y = y + 0.5 * torch.tanh(xs @ a) @ b
        y = y / n_true ** 0.5  # unit-ish scale
        return x, (y + noise_std * torch.randn(n, generator=g)).unsqueeze(1)

    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    return TeacherTask(x_tr, y_tr, x_te, y_te, support, noise_std)
