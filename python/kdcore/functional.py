"""Losses as functions for custom loops. Each returns (loss, gradient of the loss with
respect to the student logits), computed in C in double precision with the row maximum
subtracted (finite for |logits| up to 1e4 and any T > 0).

Conventions (RepDistiller / mdistiller): p = softmax(z / T); KL summed over classes, mean
over the batch, multiplied by T^2.
"""
from __future__ import annotations

import numpy as np

from . import _kdcore
from .nn import _check_bool, _check_float, _check_int

__all__ = ["cross_entropy", "kd_loss", "dkd_loss", "soft_target_loss", "logit_mse_loss", "tolerant_loss",
           "softmax", "virtual_teacher"]


def _labels(target):
    if isinstance(target, np.ndarray) and target.dtype.kind in "iu" and target.dtype != np.int64:
        return target.astype(np.int64)
    return target


def cross_entropy(logits, target, label_smoothing=0.0):
    """Softmax cross-entropy, mean over the batch (torch.nn.functional.cross_entropy).

    logits: float32 (N, classes); target: int64 (N,). Returns (loss, dlogits)."""
    label_smoothing = _check_float("label_smoothing", label_smoothing, 0, 1)
    return _kdcore.cross_entropy(logits, _labels(target), label_smoothing)


def kd_loss(student_logits, teacher_logits, T=4.0, teacher_grad=False):
    """Hinton KD: T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T)).

    Returns (loss, dstudent), or (loss, dstudent, dteacher) with teacher_grad=True (for
    schemes where the teacher learns too)."""
    T = _check_float("T", T, 0, lo_open=True)
    return _kdcore.kd_loss(student_logits, teacher_logits, T, _check_bool("teacher_grad", teacher_grad))


def soft_target_loss(student_logits, q, T=4.0):
    """T^2 * mean_i KL(q_i || softmax(s_i/T)) for target probabilities q (rows sum to 1),
    e.g. the average of several teachers' softened outputs (seed 002 eq. 23)."""
    T = _check_float("T", T, 0, lo_open=True)
    return _kdcore.soft_loss(student_logits, q, T)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, T=4.0, return_parts=False):
    """Decoupled KD: alpha * TCKD + beta * NCKD, each T^2-scaled (mdistiller's defaults).

    Computed exactly (mdistiller masks the target class by subtracting 1000 and takes the log
    of the binary probabilities without epsilon; here the non-target normaliser is exact).
    Returns (loss, dstudent), or (loss, dstudent, (tckd, nckd)) with return_parts=True."""
    T = _check_float("T", T, 0, lo_open=True)
    alpha = _check_float("alpha", alpha)
    beta = _check_float("beta", beta)
    loss, d, tc, nc = _kdcore.dkd_loss(student_logits, teacher_logits, _labels(target), alpha, beta, T)
    return (loss, d, (tc, nc)) if return_parts else (loss, d)


def logit_mse_loss(student_logits, teacher_logits):
    """Logit regression (Ba & Caruana): mean over all entries of (s - t)^2 (F.mse_loss). The
    paper's 1/2 ||s - t||^2 per sample is classes/2 times this."""
    return _kdcore.mse_loss(student_logits, teacher_logits)


def tolerant_loss(logits, K=5):
    """Tolerant-teacher term (seed 002 eq. 8): mean_i [z_(1) - mean(z_(2..K))], the gap between
    each sample's largest logit and the next K-1; returns (loss, dlogits)."""
    return _kdcore.tolerant_loss(logits, _check_int("K", K, 2))


def softmax(logits, T=1.0):
    """softmax(logits / T) row-wise, float32."""
    return _kdcore.softmax(logits, _check_float("T", T, 0, lo_open=True))


def virtual_teacher(target, num_classes, a=0.99):
    """Teacher-free KD's hand-made teacher (Yuan et al. 2020): a distribution with a at the
    label and (1-a)/(K-1) elsewhere, as an (N, K) float32 array. distill() with
    method='kd' and these values as teacher "logits" is the authors' code form (their
    softmax(p^d / T)); pass np.log of them for the paper's form (softened p^d)."""
    target = np.asarray(target)
    if target.ndim != 1 or target.dtype.kind not in "iu":
        raise TypeError("target must be a 1-D integer array")
    K = _check_int("num_classes", num_classes, 2)
    a = _check_float("a", a, 0, 1, lo_open=True, hi_open=True)
    if target.size and (target.min() < 0 or target.max() >= K):
        raise ValueError(f"target values must be in [0, num_classes={K})")
    q = np.full((target.size, K), (1 - a) / (K - 1), np.float32)
    q[np.arange(target.size), target] = a
    return q
