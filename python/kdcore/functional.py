"""Losses as functions for custom loops. Each returns (loss, gradient of the loss with
respect to the student logits), computed in C in double precision with the row maximum
subtracted (finite for |logits| up to 1e4 and any T > 0).

Conventions (RepDistiller / mdistiller): p = softmax(z / T); KL summed over classes, mean
over the batch, multiplied by T^2.

Feature and relation losses (at_loss, sp_loss, nst_loss, rkd_loss, pkt_loss, fsp_loss) take
float32 C-contiguous feature maps, 4-D (n, c, h, w) or 2-D (n, d) (an embedding, a pooled
feature), and return (loss, dstudent), or (loss, dstudent, dteacher) with grad_teacher=True
(for online / mutual schemes where the teacher side learns too). The forms are RepDistiller's
/ mdistiller's; each docstring says where the paper's differs. Where two maps must share a
spatial size (AT, NST, FSP), each is adaptive-average-pooled to the smaller height and the
smaller width (the references' rule for square maps). See kdcore.h, "Feature and relation
losses", for the epsilons and the scratch memory of each.
"""
from __future__ import annotations

import numpy as np

from . import _kdcore
from .nn import _check_bool, _check_float, _check_int

__all__ = ["cross_entropy", "kd_loss", "dkd_loss", "soft_target_loss", "logit_mse_loss", "tolerant_loss",
           "softmax", "virtual_teacher", "at_loss", "sp_loss", "nst_loss", "rkd_loss", "pkt_loss", "fsp_loss"]


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


# ------------------------------------------------------------------------------------------
# Feature and relation losses


def at_loss(s, t, p=2, form="code", grad_teacher=False):
    """Attention transfer (Zagoruyko & Komodakis 2017). Attention map per sample:
    q = k * sum_c |f_c|^p over the h*w positions, a = q / max(||q||_2, 1e-12).

    form="code" (default; RepDistiller / mdistiller, torchdistill ATLoss mode "code", the
    authors' code): k = 1/c (channel mean), loss = mean over n*h*w of (a_s - a_t)^2.
    form="paper" (the paper's eq. 2, torchdistill mode "paper"): k = 1, loss =
    (1/n) sum_i ||a_s,i - a_t,i||_2, not squared; the paper's beta/2 is your weight.

    p >= 1. The references raise f to the power p (f.pow(p)); kdcore uses |f|^p as the paper
    writes it: the same for p = 2, any even p, and non-negative (post-ReLU) maps, which is
    what the references tap. s: (n, c, h, w) student map, t: (n, c', h', w') teacher map;
    channel counts may differ; different spatial sizes are adaptive-average-pooled to the
    smaller (RepDistiller pools the larger to the smaller for square maps). 2-D (n, d) inputs
    are d channels of 1x1. Returns (loss, ds) or, with grad_teacher, (loss, ds, dt)."""
    p = _check_float("p", p, 1)
    if form not in ("code", "paper"):
        raise ValueError(f"form must be 'code' or 'paper', got {form!r}")
    return _kdcore.at_loss(s, t, p, 0 if form == "code" else 1, _check_bool("grad_teacher", grad_teacher))


def sp_loss(s, t, grad_teacher=False):
    """Similarity-preserving KD (Tung & Mori 2019; RepDistiller / mdistiller `similarity_loss`):
    F = each sample's map flattened (n x c*h*w), G = F F^T, rows L2-normalised
    (max(||.||, 1e-12)); loss = ||G_t - G_s||_F^2 / n^2 (the paper's gamma is your weight, 3000
    in RepDistiller). Student and teacher may differ in c, h, w. With n = 1 both G are [1], so
    the loss is 0 (1 if exactly one map is all zero) and the gradient 0.
    Returns (loss, ds) or, with grad_teacher, (loss, ds, dt)."""
    return _kdcore.sp_loss(s, t, _check_bool("grad_teacher", grad_teacher))


def nst_loss(s, t, grad_teacher=False):
    """Neuron selectivity transfer (Huang & Wang 2017; RepDistiller `NSTLoss`, mdistiller
    `nst_loss`): maps pooled to a common size, each channel's h*w vector L2-normalised;
    with k(u, v) = (u . v)^2 over channel pairs of a sample,
    loss = mean k(t, t) + mean k(s, s) - 2 mean k(s, t) (MMD^2, homogeneous poly-2 kernel;
    the paper's lambda/2 is your weight, RepDistiller/mdistiller use 50). Channel counts may
    differ. Computed per sample as GEMMs of (C x hw)(hw x C), not the references'
    n x C x C x hw broadcast. dt is the gradient of the whole MMD^2 (the references detach
    k(t, t) only because their teacher is frozen).
    Returns (loss, ds) or, with grad_teacher, (loss, ds, dt)."""
    return _kdcore.nst_loss(s, t, _check_bool("grad_teacher", grad_teacher))


def rkd_loss(s, t, w_dist=25.0, w_angle=50.0, return_parts=False, grad_teacher=False):
    """Relational KD (Park et al. 2019; RepDistiller `RKDLoss`, mdistiller `rkd_loss`) on the
    flattened features (student and teacher dimensions may differ):

    - distance: D_ij = sqrt(max(||x_i - x_j||^2, 1e-12)) off the diagonal (0 on it) divided by
      its mean over the n(n-1) pairs; L_dist = smooth-L1 (beta 1) mean over n^2 entries;
    - angle: A_abc = e_ab . e_ac with e_ab = (x_b - x_a) / max(||x_b - x_a||, 1e-12), n^3
      values; L_angle = smooth-L1 mean over n^3.

    loss = w_dist * L_dist + w_angle * L_angle (the references' 25 and 50). The paper sums
    where the code averages (same up to the weights). Squared distances are computed directly
    in double (the references' Gram-matrix form loses near pairs to cancellation) and the
    angles from them, in O(n^2) memory. n = 1 has no pairs: loss 0, gradient 0 (the
    references give NaN). Returns (loss, ds[, dt]) plus (L_dist, L_angle), unweighted, as a
    last element with return_parts=True."""
    w_dist = _check_float("w_dist", w_dist, 0)
    w_angle = _check_float("w_angle", w_angle, 0)
    tg = _check_bool("grad_teacher", grad_teacher)
    r = _kdcore.rkd_loss(s, t, w_dist, w_angle, tg)
    return r if _check_bool("return_parts", return_parts) else r[:-1]


def pkt_loss(s, t, grad_teacher=False):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018; RepDistiller `PKT`,
    mdistiller `pkt_loss`, from the authors' code) on the flattened features: rows
    x / (||x|| + 1e-7), cosine matrix S, M = (S + 1)/2, P = M with rows normalised to sum 1
    (diagonal kept); loss = mean over the n^2 entries of P_t log((P_t + 1e-7)/(P_s + 1e-7)).
    The paper sums KL over j != i without the epsilon (n^2 times this, up to the diagonal).
    Because of the epsilon, s = t gives loss 0 but a gradient of order 1e-7/n^2. n = 1 gives
    0. RepDistiller uses weight 30000. Returns (loss, ds) or, with grad_teacher, (loss, ds, dt)."""
    return _kdcore.pkt_loss(s, t, _check_bool("grad_teacher", grad_teacher))


def fsp_loss(s1, s2, t1, t2, grad_teacher=False):
    """Flow of solution procedure (Yim et al. 2017; RepDistiller `FSP`) for one pair of layers
    per network: G = (1/hw) F1 F2^T per sample (C1 x C2), the larger of the two maps of a
    network adaptive-average-pooled to the smaller (torchdistill uses max pooling);
    loss = mean over n*C1*C2 of (G_s - G_t)^2 (the paper sums; torchdistill takes per-sample
    norms). The student's and teacher's channel counts must match (t1 and s1, t2 and s2);
    spatial sizes may differ. Returns (loss, (ds1, ds2)) or, with grad_teacher,
    (loss, (ds1, ds2), (dt1, dt2))."""
    r = _kdcore.fsp_loss(s1, s2, t1, t2, _check_bool("grad_teacher", grad_teacher))
    return (r[0], r[1:3], r[3:5]) if len(r) == 5 else (r[0], r[1:3])
