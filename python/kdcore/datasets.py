"""Datasets: numpy arrays that the C loops read directly (no copies per epoch).

Images are (N, C, H, W) uint8 or float32 (uint8 is scaled by 1/255 in C); flat features are
(N, D). Labels are int64. Normalisation (per-channel mean/std) and augmentation happen in C
when a batch is assembled.
"""
from __future__ import annotations

import os

import numpy as np

from . import _kdcore
from .nn import _check_bool

__all__ = ["Dataset", "from_arrays", "fashion_mnist", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Mean and std of the Fashion-MNIST training images in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


class Dataset:
    """Samples ``X`` with labels ``y`` (or None), plus how to normalise them.

    X: (N, C, H, W) images or (N, features), uint8 (scaled by 1/255 in C) or float32
    (float64 is converted once; (N, H, W) is read as one channel). y: int labels 0..classes-1.
    mean, std: per-channel normalisation applied in C when a batch is assembled (both or
    neither; values on the [0, 1] scale for uint8). num_classes: default max(y) + 1. The
    arrays are used in place (no copy per epoch). ``kdcore.datasets.from_arrays`` computes
    mean/std for you; to normalise a test set like its training set, pass the training
    set's: ``Dataset(X_test, y_test, train.mean, train.std)``.

    Attributes: ``X``, ``y``, ``mean``, ``std``, ``num_classes``, ``shape`` (per sample).
    """

    def __init__(self, X, y=None, mean=None, std=None, num_classes=None, name=None):
        X, y = _check_xy(X, y)
        self.X, self.y = X, y
        self.scale = 1.0 / 255.0 if X.dtype == np.uint8 else 1.0
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together")
        c = X.shape[1]
        if mean is not None:
            mean, std = _per_channel("mean", mean, c), _per_channel("std", std, c)
            if any(s <= 0 for s in std):
                raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = mean, std
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y is not None else 0
        elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.name = name
        self._c = _kdcore.Dataset(X, y, scale=self.scale, mean=mean, std=std, num_classes=self.num_classes)

    @property
    def shape(self):
        """One sample's shape: (C, H, W) for images, (features,) for flat data."""
        return self.X.shape[1:]

    def __len__(self):
        return self.X.shape[0]

    def subset(self, idx):
        """A new Dataset with the samples at ``idx`` (a copy), same normalisation."""
        idx = np.asarray(idx)
        n = len(self)
        if idx.dtype == np.bool_ and idx.shape == (n,):
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"idx must be a 1-D array of sample indices (or a boolean mask of {n}), "
                            f"got dtype {idx.dtype} and shape {idx.shape}")
        if idx.size == 0:
            raise ValueError("idx selects no samples")
        if idx.min() < -n or idx.max() >= n:
            raise ValueError(f"idx values must be in [-{n}, {n}), got [{idx.min()}, {idx.max()}]")
        y = None if self.y is None else self.y[idx]
        return Dataset(self.X[idx], y, self.mean, self.std, self.num_classes, self.name)

    def batch(self, indices, augment=None, seed=0):
        """The normalised (and optionally augmented) float32 batch the C loop would see."""
        aug = _augment_kwargs(augment)
        return self._c.batch(np.asarray(indices, dtype=np.int64), seed=seed, **aug)

    def __repr__(self):
        nm = f"{self.name}, " if self.name else ""
        return (f"Dataset({nm}{len(self)} samples of {tuple(self.shape)} {self.X.dtype}, "
                f"{self.num_classes} classes{', normalised' if self.mean else ''})")


def _per_channel(name, v, c):
    items = list(np.ravel(v)) if isinstance(v, np.ndarray) else list(v) if isinstance(v, (list, tuple)) else [v]
    for a in items:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number or one number per channel, got {type(a).__name__} in {v!r}")
    v = tuple(float(a) for a in items)
    if len(v) == 1 and c > 1:
        v = v * c
    if len(v) != c:
        raise ValueError(f"{name} needs one value per channel ({c}), got {len(v)}")
    if c > 4:
        raise ValueError(f"per-channel normalisation supports at most 4 channels, got {c}")
    if not all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_xy(X, y):
    if not isinstance(X, np.ndarray):
        raise TypeError(f"X must be a numpy.ndarray, got {type(X).__name__}")
    if X.dtype == np.float64:
        X = X.astype(np.float32)   # one documented copy, at construction only
    if X.dtype not in (np.uint8, np.float32):
        raise TypeError(f"X must have dtype uint8, float32 or float64, got {X.dtype}")
    if X.ndim == 3:
        X = X[:, None]             # (N, H, W) greyscale -> (N, 1, H, W)
    if X.ndim not in (2, 4):
        raise ValueError(f"X must be (N, features), (N, H, W) or (N, C, H, W), got {X.ndim}-D")
    if X.shape[0] == 0 or X.size == 0:
        raise ValueError(f"X is empty (shape {X.shape})")
    X = np.ascontiguousarray(X)
    if y is not None:
        if not isinstance(y, np.ndarray):
            y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(f"y must be 1-D with one label per sample of X ({X.shape[0]}), got shape {y.shape}")
        if y.size and y.min() < 0:
            i = int(np.argmax(y < 0))
            raise ValueError(f"y[{i}] = {int(y[i])} is negative; labels must be in [0, num_classes)")
        y = np.ascontiguousarray(y, dtype=np.int64)
    return X, y


def from_arrays(X, y=None, normalize="auto", num_classes=None, name=None, layout="auto"):
    """A Dataset over numpy arrays.

    normalize: "auto" (per-channel mean/std computed from X), None (no normalisation), or a
    pair (mean, std) with one value per channel (values on the [0, 1] scale for uint8 X).
    layout of 4-D images: "auto" (default) takes (N, C, H, W) but raises ValueError for a shape
    that looks channels-last, (N, H, W, C) with C 1 or 3 and the second dimension not 1 or 3,
    such as (N, 28, 28, 1); "NCHW" takes any 4-D shape as (N, C, H, W) (for data that only
    looks channels-last); "NHWC" transposes channels-last images to (N, C, H, W) (a copy).
    """
    if not isinstance(layout, str) or layout not in ("auto", "NCHW", "NHWC"):
        raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    if isinstance(X, np.ndarray) and X.ndim == 4:
        if layout == "NHWC":
            X = X.transpose(0, 3, 1, 2)
        elif layout == "auto" and X.shape[3] in (1, 3) and X.shape[1] not in (1, 3):
            raise ValueError(f"X has shape {X.shape}, which looks like channels-last (N, H, W, C) images; kdcore "
                             f"expects (N, C, H, W): pass X.transpose(0, 3, 1, 2) (or layout='NHWC'). If "
                             f"{X.shape[1]} really is the channel count, pass layout='NCHW'")
    X, y = _check_xy(X, y)
    mean = std = None
    if isinstance(normalize, str):
        if normalize != "auto":
            raise ValueError(f"normalize must be 'auto', None or (mean, std), got {normalize!r}")
        if X.ndim == 4:
            scale = 1.0 / 255.0 if X.dtype == np.uint8 else 1.0
            xs = X.reshape(X.shape[0], X.shape[1], -1)
            mean = tuple(float(xs[:, c].mean(dtype=np.float64) * scale) for c in range(X.shape[1]))
            std = tuple(max(float(xs[:, c].std(dtype=np.float64) * scale), 1e-8) for c in range(X.shape[1]))
            if len(mean) > 4:
                mean = std = None
    elif normalize is not None:
        if not isinstance(normalize, (tuple, list)) or len(normalize) != 2:
            raise ValueError("normalize must be 'auto', None or a pair (mean, std)")
        mean, std = normalize
    return Dataset(X, y, mean, std, num_classes, name)


_FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist(split="train", path=None, normalize=True):
    """Fashion-MNIST from IDX files (read by the C core; nothing is downloaded).

    The location is ``path``, else ``$KDCORE_FASHION_MNIST``, else Debian's
    ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist). Returns a Dataset of
    (N, 1, 28, 28) uint8 images and int64 labels, normalised with the training set's mean/std.
    """
    if not isinstance(split, str) or split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = path or os.environ.get("KDCORE_FASHION_MNIST") or FASHION_MNIST_DIR
    root = os.fspath(root)
    files = [os.path.join(root, f) for f in _FMNIST_FILES[split]]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(
                f"Fashion-MNIST file not found: {f}. Install Debian's package "
                "(apt-get install dataset-fashion-mnist), or pass path=... / set KDCORE_FASHION_MNIST "
                "to a directory holding the four IDX .gz files.")
    X = _kdcore.idx_read(files[0])
    y = _kdcore.idx_read(files[1])
    if X.ndim != 3 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{root}: images {X.shape} and labels {y.shape} do not match")
    if y.max() >= 10:
        raise ValueError(f"{files[1]}: labels must be in [0, 10), found {int(y.max())}")
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if normalize else (None, None)
    return Dataset(X[:, None], y.astype(np.int64), mean, std, 10, name=f"fashion_mnist/{split}")


def _augment_kwargs(augment):
    """augment: None, True (crop padding 2 + flip), or a dict with crop_padding, hflip, noise_std and
    randaugment (operations per image of MLKD's RandAugment, 0 = off; docs/methods/mlkd.md)."""
    if augment is None or augment is False:
        return dict(crop_padding=0, hflip=False, noise_std=0.0)
    if augment is True:
        return dict(crop_padding=2, hflip=True, noise_std=0.0)
    if not isinstance(augment, dict):
        raise TypeError(f"augment must be None, True or a dict, got {type(augment).__name__}")
    unknown = set(augment) - {"crop_padding", "hflip", "noise_std", "randaugment"}
    if unknown:
        raise ValueError(f"unknown augment options {sorted(unknown)}; use crop_padding, hflip, noise_std, randaugment")
    cp = augment.get("crop_padding", 0)
    if isinstance(cp, bool) or not isinstance(cp, (int, np.integer)) or cp < 0:
        raise ValueError(f"augment['crop_padding'] must be an int >= 0, got {cp!r}")
    ns = augment.get("noise_std", 0.0)
    if isinstance(ns, bool) or not isinstance(ns, (int, float)) or not np.isfinite(ns) or ns < 0:
        raise ValueError(f"augment['noise_std'] must be a float >= 0, got {ns!r}")
    out = dict(crop_padding=int(cp), hflip=_check_bool("augment['hflip']", augment.get("hflip", False)), noise_std=float(ns))
    ra = augment.get("randaugment", 0)
    if isinstance(ra, bool) or not isinstance(ra, (int, np.integer)) or not 0 <= ra <= 64:
        raise ValueError(f"augment['randaugment'] must be an int in [0, 64], got {ra!r}")
    if ra:
        out["randaugment"] = int(ra)   # only when on: the training options of other loops stay as they were
    return out
