"""Losses as functions for custom loops: each returns (loss, gradient w.r.t. the logits)."""
from __future__ import annotations

import numpy as np

from . import _kdcore
from .nn import _check_float

__all__ = ["cross_entropy"]


def cross_entropy(logits, target, label_smoothing=0.0):
    """Softmax cross-entropy, mean over the batch (torch.nn.functional.cross_entropy).

    logits: float32 (N, classes); target: int64 (N,). Returns (loss: float, dlogits: float32
    (N, classes)), dlogits being the gradient of the mean loss.
    """
    label_smoothing = _check_float("label_smoothing", label_smoothing, 0, 1)
    if isinstance(target, np.ndarray) and target.dtype.kind in "iu" and target.dtype != np.int64:
        target = target.astype(np.int64)
    return _kdcore.cross_entropy(logits, target, label_smoothing)
