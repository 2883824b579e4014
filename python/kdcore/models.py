"""The model zoo: networks of the KD literature, with PyTorch-style parameter names so that a
state dict of the reference implementation (RepDistiller / mdistiller) loads directly."""
from __future__ import annotations

from .nn import (AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d, Block, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                 Module, ReLU, Sequential, _check_float, _check_int, _join)

__all__ = ["mlp", "cnn"]


def _seeded(model, seed):
    model._seed = _check_int("seed", seed, 0)
    return model


def mlp(sizes, dropout=0.0, batchnorm=False, seed=0):
    """Multi-layer perceptron: ``mlp([784, 1200, 1200, 10])`` = Flatten, then Linear+ReLU
    (+ Dropout) between consecutive sizes, the last Linear without activation.

    Keys follow ``nn.Sequential``: "1.weight" is the first Linear (index 0 is Flatten)."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise ValueError(f"sizes must list at least input and output sizes, got {sizes!r}")
    sizes = [_check_int(f"sizes[{i}]", s, 1) for i, s in enumerate(sizes)]
    dropout = _check_float("dropout", dropout, 0, 1, hi_open=True)
    layers = [Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(BatchNorm1d(sizes[i + 1]))
            layers.append(ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
    m = Sequential(*layers)
    m.input_shape = (sizes[0],)
    return _seeded(m, seed)


def cnn(num_classes=10, in_channels=1, input_size=28, width=32, seed=0):
    """A small plain CNN: [conv3x3-BN-ReLU] x2 + maxpool, [conv3x3-BN-ReLU] x2 + maxpool,
    global average pool, linear. Channels width, width, 2*width, 2*width."""
    num_classes = _check_int("num_classes", num_classes, 1)
    in_channels = _check_int("in_channels", in_channels, 1)
    input_size = _check_int("input_size", input_size, 4)
    w = _check_int("width", width, 1)
    m = Sequential(
        Conv2d(in_channels, w, 3, padding=1, bias=False), BatchNorm2d(w), ReLU(),
        Conv2d(w, w, 3, padding=1, bias=False), BatchNorm2d(w), ReLU(),
        MaxPool2d(2),
        Conv2d(w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), ReLU(),
        Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), ReLU(),
        MaxPool2d(2),
        AdaptiveAvgPool2d(1), Flatten(), Linear(2 * w, num_classes),
    )
    m.input_shape = (in_channels, input_size, input_size)
    return _seeded(m, seed)
