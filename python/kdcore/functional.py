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

The losses of the methods with connectors or state (OFD, AB, FT, VID, CC, ReviewKD's HCL,
CRD) take the connectors' outputs (float32 maps (N, C, H, W), or (N, D) embeddings) and
return the loss as the reference library defines it (no method weight applied) with the
gradients with respect to their inputs. The connectors themselves are ordinary models fed
from a tap; per-stage and per-method weights are the caller's.
"""
from __future__ import annotations

import numpy as np

from . import _kdcore
from .nn import _check_bool, _check_float, _check_int

_DIST = _kdcore.TERM_DEFAULTS["dist"]
_NORMKD = _kdcore.TERM_DEFAULTS["normkd"]
_WTTM = _kdcore.TERM_DEFAULTS["wttm"]
_CTKD = _kdcore.TERM_DEFAULTS["ctkd"]
_MLKD = _kdcore.TERM_DEFAULTS["mlkd"]

__all__ = ["cross_entropy", "kd_loss", "dkd_loss", "dist_loss", "normkd_loss", "wttm_loss", "ctkd_loss", "ctkd_temperature", "ctkd_lambda", "mlkd_loss", "soft_target_loss", "logit_mse_loss", "logit_l1_loss", "bce_with_logits_loss", "tolerant_loss",
           "softmax", "virtual_teacher", "at_loss", "sp_loss", "nst_loss", "rkd_loss", "pkt_loss", "fsp_loss",
           "ofd_margin", "ofd_loss", "ab_loss", "ft_loss", "vid_loss", "vid_log_scale", "cc_loss", "hcl_loss",
           "CRDBank"]


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
    e.g. the average of several teachers' softened outputs (Wang & Yoon's review, eq. 23)."""
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


def dist_loss(student_logits, teacher_logits, beta=_DIST["beta"], gamma=_DIST["gamma"], T=_DIST["T"],
              return_parts=False):
    """DIST (Huang et al. 2022; the authors' dist_kd.py): with p = softmax(z / T),
    T^2 * (beta * (1 - mean_i pearson(p_s[i], p_t[i])) + gamma * (1 - mean_c pearson(p_s[:, c],
    p_t[:, c]))): the inter-class relation per sample and the intra-class relation per class
    over the batch. Defaults: the paper's CIFAR recipe (beta 2, gamma 2, T 4); its ImageNet
    recipe is beta = gamma = T = 1. Returns (loss, dstudent), or (loss, dstudent, (inter,
    intra)) with return_parts=True (each without T^2 and its weight)."""
    T = _check_float("T", T, 0, lo_open=True)
    beta = _check_float("beta", beta, 0)
    gamma = _check_float("gamma", gamma, 0)
    loss, d, inter, intra = _kdcore.dist_loss(student_logits, teacher_logits, beta, gamma, T)
    return (loss, d, (inter, intra)) if return_parts else (loss, d)


def normkd_loss(student_logits, teacher_logits, t_norm=_NORMKD["t_norm"], detach_std=False):
    """NormKD (Chi et al. 2023; the authors' code): a temperature per sample and per side,
    T_t,i = t_norm * std(t_i) and T_s,i = t_norm * std(s_i) (unbiased std over the classes),
    mean_i T_t,i^2 KL(softmax(t_i / T_t,i) || softmax(s_i / T_s,i)). The gradient goes through
    the student's std as in the authors' code; detach_std=True holds it constant. A teacher row
    whose logits are all equal contributes 0; a student row whose logits are all equal (s / std
    undefined) is softened at the teacher's temperature. Default t_norm 2 (the authors'
    CIFAR-100 setting; their ImageNet one is 1). Returns (loss, dstudent)."""
    t_norm = _check_float("t_norm", t_norm, 0, lo_open=True)
    return _kdcore.normkd_loss(student_logits, teacher_logits, t_norm, _check_bool("detach_std", detach_std))


def wttm_loss(student_logits, teacher_logits, gamma=_WTTM["gamma"]):
    """WTTM (Zheng & Yang, ICLR 2024; the authors' wttm.py): the teacher's p = softmax(t)
    power-transformed, p~ = p^gamma / U with U_i = sum_k p_ik^gamma (gamma = 1/T), matched by
    the student at temperature 1 with a per-sample weight U_i: mean_i U_i KL(p~_i ||
    softmax(s_i)); no T^2 factor. gamma = 1 is KD at T = 1 (U = 1). Default gamma 0.2 (the
    authors' CIFAR-100 command). Returns (loss, dstudent)."""
    gamma = _check_float("gamma", gamma, 0, lo_open=True)
    return _kdcore.wttm_loss(student_logits, teacher_logits, gamma)


def _mlkd_temperatures(temperatures):
    """MLKD's temperatures as a tuple of floats: a list, tuple or 1-d array of 1 to
    MLKD_MAX_TEMPS positive numbers, finite as float32 (the C term stores them so)."""
    if not (isinstance(temperatures, (list, tuple)) or (isinstance(temperatures, np.ndarray) and temperatures.ndim == 1)):
        raise TypeError(f"temperatures must be a list or tuple of numbers, got {type(temperatures).__name__}")
    temps = tuple(temperatures)
    if not 1 <= len(temps) <= _kdcore.MLKD_MAX_TEMPS:
        raise ValueError(f"temperatures must hold 1 to {_kdcore.MLKD_MAX_TEMPS} values, got {len(temps)}")
    out = tuple(_check_float(f"temperatures[{j}]", v, 0, lo_open=True) for j, v in enumerate(temps))
    for j, v in enumerate(out):
        if v > float(np.finfo(np.float32).max):
            raise ValueError(f"temperatures[{j}] must be finite as float32, got {v}")
    return out


def mlkd_loss(student_logits, teacher_logits, temperatures=_MLKD["temperatures"], percentile=_MLKD["percentile"],
              return_parts=False):
    """MLKD (Jin, Wang & Lin, CVPR 2023; the authors' code, its weak-view multi-level loss). For each
    temperature T, with P = softmax(s / T) and Q = softmax(t / T) (N x classes): the instance
    term T^2 mean_i KL(Q_i || P_i), the class term sum((Q'Q - P'P)^2) / classes (class
    correlations) and the batch term sum((QQ' - PP')^2) / N (sample correlations). The
    confidence masks come from the teacher at T = 1: f_s is the fraction of samples whose top
    probability is <= the batch's ``percentile`` (np.percentile, linear), f_c the fraction of
    classes whose summed probability is <= the classes' percentile; as in the authors' code a
    mask scales its whole term by that fraction. loss = f_s sum_T instance + f_c sum_T class +
    f_s sum_T batch. Defaults: temperatures (4, 3, 5, 2, 6), percentile 50 (the authors' code).
    Returns (loss, dstudent), or (loss, dstudent, (instance, class + batch)) with
    return_parts=True."""
    temps = _mlkd_temperatures(temperatures)
    percentile = _check_float("percentile", percentile, 0, 100)
    loss, d, inst, rel = _kdcore.mlkd_loss(student_logits, teacher_logits, temps, percentile)
    return (loss, d, (inst, rel)) if _check_bool("return_parts", return_parts) else (loss, d)


def ctkd_loss(student_logits, teacher_logits, T):
    """CTKD's loss (Li et al., AAAI 2023) at temperature T: T^2 mean_i KL(softmax(t_i/T) ||
    softmax(s_i/T)) (mdistiller's KD form). Returns (loss, dstudent, dT) with dT the plain
    derivative of the loss w.r.t. T (the gradient reversal and the curriculum's lambda are the
    step engine's: kdcore.losses.CTKD). T a float32 array of one temperature per row (the
    instance-wise form): mean_i T_i^2 KL_i, and dT the array of d loss / d T_i."""
    if isinstance(T, np.ndarray):
        return _kdcore.ctkd_loss_rows(student_logits, teacher_logits, T)
    T = _check_float("T", T, 0, lo_open=True)
    return _kdcore.ctkd_loss(student_logits, teacher_logits, T)


def ctkd_temperature(p, t_start=_CTKD["t_start"], t_range=_CTKD["t_range"]):
    """CTKD's temperature from its parameter p: t_start + t_range * sigmoid(p) (the authors'
    global temperature; defaults from their CIFAR-100 script). Returns (T, dT/dp)."""
    return _kdcore.ctkd_temperature(_check_float("p", p), _check_float("t_start", t_start, 0, lo_open=True),
                                    _check_float("t_range", t_range, 0))


def ctkd_lambda(epoch, lambda_min=_CTKD["lambda_min"], lambda_max=_CTKD["lambda_max"],
                decay_epochs=_CTKD["decay_epochs"]):
    """CTKD's curriculum at a 0-based epoch: the gradient-reversal factor, lambda_min +
    (lambda_max - lambda_min) * (1 - cos(pi e / decay_epochs)) / 2 with e = min(epoch + 1,
    decay_epochs) (the authors' cosine schedule, evaluated at the 1-based epoch)."""
    return _kdcore.ctkd_lambda(_check_int("epoch", epoch, 0), _check_float("lambda_min", lambda_min),
                               _check_float("lambda_max", lambda_max), _check_int("decay_epochs", decay_epochs, 1))


def logit_l1_loss(student_logits, teacher_logits):
    """Mean absolute error between logits, mean over all entries of |s - t| (F.l1_loss; DFAD's
    discrepancy): (loss, dstudent). The gradient is sign(s - t) / entries (0 where s == t,
    as torch.sign); the teacher's is its opposite."""
    return _kdcore.l1_loss(student_logits, teacher_logits)


def bce_with_logits_loss(logits, target):
    """Binary cross-entropy with logits against one target in [0, 1] for every entry (a
    discriminator's loss; adversarial KD): (loss, dlogits), the loss the mean over all entries
    of max(x, 0) - x y + log(1 + exp(-|x|)) (F.binary_cross_entropy_with_logits), its gradient
    (sigmoid(x) - y) / entries. logits: float32 (N, V) (V = 1 for a discriminator)."""
    return _kdcore.bce_loss(logits, _check_float("target", target, 0, 1))


def logit_mse_loss(student_logits, teacher_logits):
    """Logit regression (Ba & Caruana): mean over all entries of (s - t)^2 (F.mse_loss). The
    paper's 1/2 ||s - t||^2 per sample is classes/2 times this."""
    return _kdcore.mse_loss(student_logits, teacher_logits)


def tolerant_loss(logits, K=5):
    """Tolerant-teacher term (Wang & Yoon's review, eq. 8): mean_i [z_(1) - mean(z_(2..K))], the gap between
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
# Losses with connectors or state (kdcore.h, "Losses with connectors or state")


def _index(v):
    """Integer numpy arrays of any width as int64 (the binding takes int64 only)."""
    if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.dtype != np.int64:
        return v.astype(np.int64)
    return v


def ofd_margin(bn_weight, bn_bias):
    """OFD's per-channel margin from the teacher's BN before a ReLU (mdistiller OFD.py).

    With x ~ N(b, |w|^2) per channel: margin = E[x | x < 0] = b - |w| phi(b/|w|) / Phi(-b/|w|),
    or -3 |w| where Phi(-b/|w|) <= 0.001 (mdistiller's cut-off), computed in double. |w| = 0
    gives the limits (b if b < 0, else 0), where mdistiller divides by zero.
    bn_weight, bn_bias: float32 (C,). Returns float32 (C,)."""
    return _kdcore.ofd_margin(bn_weight, bn_bias)


def ofd_loss(student, teacher, margin):
    """OFD's partial L2 (Heo et al. 2019; mdistiller OFD.py feat_loss), one stage.

    student: the connector output (student pre-ReLU map through conv1x1 + BN), (N, C, h, w);
    teacher: the teacher's pre-ReLU map (N, C, H, W), adaptive-average-pooled to (h, w) when
    the sizes differ; margin: (C,) from ofd_margin. With t' = max(teacher, margin):
    loss = sum over C, h, w, N of (s - t')^2, except 0 where s <= t' <= 0, divided by N
    (mdistiller's .mean(dim=0).sum(); exact masks as mdistiller's, for any margin).
    mdistiller weights stage i of n by 1/2^(n-1-i) and the sum by 1e-3: the caller's.
    Returns (loss, dstudent)."""
    return _kdcore.ofd_loss(student, teacher, margin)


def ab_loss(student, teacher, margin=1.0):
    """Activation-boundary loss (Heo et al. 2019; RepDistiller AB.py), one stage.

    student: the connector output (ConvReg without ReLU on the student's pre-ReLU map);
    teacher: the teacher's pre-ReLU map, same shape. loss = sum((s + m)^2 [s > -m, t <= 0]
    + (s - m)^2 [s <= m, t > 0]) / N, m = margin (1.0). RepDistiller's init stage weights
    stage i of n by 2^(i-n+1) and multiplies by 3/1000: the caller's. Returns (loss, dstudent)."""
    margin = _check_float("margin", margin, 0)
    return _kdcore.ab_loss(student, teacher, margin)


def ft_loss(student_factor, teacher_factor, p1=2, p2=1):
    """Factor-transfer loss (Kim et al. 2018; RepDistiller FT.py FactorTransfer).

    student_factor: the translator's output, teacher_factor: the paraphraser encoder's
    output, (N, C, H, W) each (channel counts may differ; when the sizes differ, the map with
    the larger H is adaptive-average-pooled to the other's size first, as RepDistiller).
    F(x) = L2-normalise over H*W of the channel mean of x^p1 (eps 1e-12); loss = mean over
    N*H*W of |F(s) - F(t)|^p2. Defaults p1=2, p2=1 are RepDistiller's; the paper normalises
    the whole flattened factor and takes the p-norm of the difference per sample. The
    paraphraser is pre-trained with a reconstruction MSE (logit_mse_loss on the flattened
    maps). Returns (loss, dstudent_factor, dteacher_factor)."""
    p1 = _check_int("p1", p1, 1)
    p2 = _check_float("p2", p2, 1)
    return _kdcore.ft_loss(student_factor, teacher_factor, p1, p2)


def vid_loss(mu, teacher, log_scale, eps=1e-5):
    """Variational information distillation (Ahn et al. 2019; RepDistiller VID.py).

    mu: the regressor's output (three 1x1 convs on the student map, whose input is pooled to
    the teacher's size beforehand, as RepDistiller), teacher: the teacher map, same shape;
    log_scale: (C,) learned per-channel parameter, variance = softplus(log_scale) + eps.
    loss = mean over N*C*H*W of 0.5 ((mu - t)^2 / var + log var) (the paper sums over C, H, W
    instead). softplus is computed stably. Returns (loss, dmu, dlog_scale)."""
    eps = _check_float("eps", eps, 0)
    return _kdcore.vid_loss(mu, teacher, log_scale, eps)


def vid_log_scale(channels, init_var=5.0, eps=1e-5):
    """RepDistiller's initial log_scale for a starting variance init_var (5.0):
    log(exp(init_var - eps) - 1) per channel, float32 (channels,)."""
    channels = _check_int("channels", channels, 1)
    init_var = _check_float("init_var", init_var, 0, lo_open=True)
    eps = _check_float("eps", eps, 0)
    return np.full(channels, _kdcore.vid_log_scale_init(init_var, eps), np.float32)


def cc_loss(student_embed, teacher_embed):
    """Correlation congruence (Peng et al. 2019) in RepDistiller's CC.py form (the authors'
    code): delta = |e_s - e_t| for the (N, D) embeddings after each side's Linear;
    loss = mean over i < N-1 of sum_d delta[i, d] * delta[i+1, d] (consecutive samples).
    N >= 2. Returns (loss, dstudent_embed, dteacher_embed)."""
    return _kdcore.cc_loss(student_embed, teacher_embed)


def hcl_loss(student, teacher):
    """ReviewKD's hierarchical context loss (Chen et al. 2021; mdistiller ReviewKD.py
    hcl_loss) for one pair of maps of the same shape (student = the ABF-fused map):
    (mse + sum_l w_l mse(pool_l(s), pool_l(t))) / (1 + sum_l w_l), levels l in (4, 2, 1)
    with l < H (adaptive average pool to l x l), w_l = 1/2, 1/4, 1/8 in the order used.
    Returns (loss, dstudent)."""
    return _kdcore.hcl_loss(student, teacher)


class CRDBank:
    """CRD's memory banks and contrastive loss (Tian et al. 2020; RepDistiller crd/).

    ``CRDBank(n_data, dim=128, n_neg=16384, T=0.07, momentum=0.5, seed=0)`` holds two banks
    of n_data x dim floats (student bank: rows updated from the student embeddings, scored
    against the teacher anchors; teacher bank: the converse), initialised uniform in
    +-1/sqrt(dim/3). Per step::

        loss, ds, dt = bank.loss(es, et, idx)   # es, et: L2-normalised (N, dim) embeddings
        ...                                     # backward through the embedding heads
        bank.update(es, et, idx)                # after a successful step

    Score P = exp(<bank row, anchor> / T) / Z, Z fixed on the first call as
    mean(exp(score / T)) * n_data; NCE with noise probability 1/n_data:
    -log(P_pos / (P_pos + K/n_data + 1e-7)) - sum_neg log((K/n_data) / (P_neg + K/n_data + 1e-7)),
    summed over both directions, mean over the batch (RepDistiller's ContrastLoss).
    Negatives: n_neg per sample from a seeded counter-based generator (seed, draw counter,
    data-set index), without replacement when possible; from every other sample, or with
    ``labels`` (after ``set_labels`` with the data set's labels) from the other classes,
    RepDistiller's default "exact" mode. ``sample`` returns the rows ``loss`` would use;
    ``loss_idx`` takes the rows (RepDistiller's contrast_idx, positive first).

    ``in_batch=True``: no banks (for data sets too large for them); the negatives of each
    sample are the other samples of the batch (with labels: of other classes), the other
    side's embeddings playing the bank's role; the gradients are the loss's full gradients
    (through anchors and candidates). ``update`` does nothing.

    State for checkpoints: ``state_dict()`` / ``load_state_dict()`` (banks, Z, draw counter);
    ``student_bank`` / ``teacher_bank`` are writable views."""

    def __init__(self, n_data, dim=128, n_neg=16384, T=0.07, momentum=0.5, seed=0, in_batch=False):
        self.n_data = _check_int("n_data", n_data, 2)
        self.dim = _check_int("dim", dim, 1)
        self.in_batch = _check_bool("in_batch", in_batch)
        self.n_neg = 0 if self.in_batch else _check_int("n_neg", n_neg, 1)
        self.T = _check_float("T", T, 0, lo_open=True)
        self.momentum = _check_float("momentum", momentum, 0, 1, hi_open=True)
        self.seed = _check_int("seed", seed, 0)
        self._c = _kdcore.CRD(self.n_data, self.dim, max(self.n_neg, 1), self.T, self.momentum, self.seed,
                              self.in_batch)

    def loss(self, student_embed, teacher_embed, idx=None, labels=None):
        """(loss, dstudent_embed, dteacher_embed) with negatives drawn now (the draw counter
        advances). idx: int (N,) data-set indices (optional in in-batch mode)."""
        return self._c.loss(student_embed, teacher_embed, _index(idx), _index(labels))

    def loss_idx(self, student_embed, teacher_embed, sample_idx):
        """The loss with the caller's bank rows: sample_idx int (N, n_neg + 1), column 0 the
        positive (RepDistiller's contrast_idx). No draw."""
        return self._c.loss_idx(student_embed, teacher_embed, _index(sample_idx))

    def sample(self, idx, labels=None):
        """The (N, n_neg + 1) rows the next ``loss`` call draws (column 0 = idx)."""
        return self._c.sample(_index(idx), _index(labels))

    def update(self, student_embed, teacher_embed, idx):
        """Momentum update of the rows idx, renormalised (RepDistiller, momentum 0.5)."""
        return self._c.update(student_embed, teacher_embed, _index(idx))

    def set_labels(self, labels):
        """The data set's labels (n_data,), for negatives from other classes."""
        return self._c.set_labels(_index(labels))

    @property
    def student_bank(self):
        """The memory bank of student embeddings (n_data, feat_dim), a writable view."""
        return self._c.bank(0)

    @property
    def teacher_bank(self):
        """The memory bank of teacher embeddings (n_data, feat_dim), a writable view."""
        return self._c.bank(1)

    @property
    def z(self):
        """(Z of the student anchors, Z of the teacher anchors); negative until the first loss."""
        return self._c.z()

    @z.setter
    def z(self, value):
        self._c.z(tuple(float(v) for v in value))

    @property
    def steps(self):
        """Draws done so far (advanced by each ``loss`` call)."""
        return self._c.steps()

    @steps.setter
    def steps(self, value):
        self._c.steps(value)

    def state_dict(self):
        """Copies of the state: {'student_bank', 'teacher_bank' (absent in in-batch mode),
        'z' float32 (2,), 'steps' int64 ()} (numpy arrays, e.g. for kdcore.save(**...))."""
        d = {"z": np.array(self.z, np.float32), "steps": np.array(self.steps, np.int64)}
        if not self.in_batch:
            d["student_bank"] = self.student_bank.copy()
            d["teacher_bank"] = self.teacher_bank.copy()
        return d

    def load_state_dict(self, state):
        """Restores what state_dict returned (shapes and dtypes checked)."""
        keys = {"z", "steps"} | (set() if self.in_batch else {"student_bank", "teacher_bank"})
        missing = keys - set(state)
        if missing:
            raise KeyError(f"CRD state is missing {sorted(missing)}")
        z = np.asarray(state["z"])
        if z.shape != (2,) or z.dtype.kind != "f":
            raise ValueError(f"z must be a float array of shape (2,), got {z.dtype} {z.shape}")
        steps = np.asarray(state["steps"])
        if steps.shape != () or steps.dtype.kind not in "iu":
            raise ValueError(f"steps must be an integer scalar, got {steps.dtype} {steps.shape}")
        banks = []
        if not self.in_batch:
            for name in ("student_bank", "teacher_bank"):
                b = state[name]
                if not isinstance(b, np.ndarray) or b.dtype != np.float32 or b.shape != (self.n_data, self.dim):
                    raise ValueError(f"{name} must be a float32 array of shape {(self.n_data, self.dim)}")
                if not np.all(np.isfinite(b)):
                    raise ValueError(f"{name} contains NaN or Inf")
                banks.append(b)
        self.z = z
        self.steps = int(steps)
        if banks:
            self.student_bank[...] = banks[0]
            self.teacher_bank[...] = banks[1]

    def __repr__(self):
        mode = "in_batch=True" if self.in_batch else f"n_neg={self.n_neg}, momentum={self.momentum}"
        return f"CRDBank(n_data={self.n_data}, dim={self.dim}, {mode}, T={self.T})"
