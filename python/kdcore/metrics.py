"""Measurements of a distilled student: how often it agrees with its teacher, how far its
softened outputs are from the teacher's, how well calibrated it is, where it errs, and how
similar its internal representations are to the teacher's.

    import kdcore
    r = kdcore.metrics.report(student, teacher, test)        # the scalar numbers, as a dict
    cal = kdcore.metrics.calibration(student, test)          # ECE with its bins
    kdcore.metrics.plot_reliability(cal)                     # a matplotlib Figure
    cm = kdcore.metrics.confusion_matrix(student, test, normalize="true")
    kdcore.metrics.linear_cka(student, teacher, test, "layer3", "layer3")

Every metric runs the models in eval mode (outputs from ``kdcore.predict``: the forward
passes run in C, in batches) and leaves each model's training flag as it found it; the
measurements on the outputs are numpy, in float64. ``data`` is a kdcore Dataset or an
``(X, y)`` tuple, read as ``kdcore.evaluate`` reads it (an ``(X, y)`` tuple is normalised with
its own per-channel mean/std); labelled data must have as many classes as the models have
outputs, as ``kdcore.predict`` requires. Conventions:

* KL direction: ``kl_divergence`` is KL(p_s || p_t), student first, as the
  ``kl_student_teacher`` column of a distillation History.
* Calibration bins: ``bins`` equal-width intervals (lo, hi] of (0, 1] over the max softmax
  probability; a confidence on an edge belongs to the bin below it.
* Confusion matrices: rows are the true class, columns the predicted class (scikit-learn's).
* Linear CKA: from d x d feature covariances when both taps have at most as many features
  as there are samples, else from the n x n Gram matrices (same value, other memory cost).
"""
from __future__ import annotations

import contextlib

import numpy as np

from .nn import _check_float, _check_int, _is_choice
from .training import _as_dataset, _check_model, predict

__all__ = ["agreement", "kl_divergence", "calibration", "per_class_accuracy", "confusion_matrix", "linear_cka",
           "report", "weight_noise_sharpness", "plot_reliability", "plot_confusion"]

_NORMALIZE = ("true", "pred", "all")
# Far beyond any useful reliability diagram; the cap turns a typo (bins=2**31) into an error
# instead of gigabytes of empty bins.
_MAX_BINS = 1_000_000
# Each draw is sigmas.size full evaluations; beyond this a typo (draws=2**31) would run for days.
_MAX_DRAWS = 10_000


# ---- shared numerics (also used by kdcore.distill for its History) ----------------------------

def _log_softmax(z, T=1.0):
    """Row-wise log softmax(z / T) in float64, the row max subtracted."""
    z = np.asarray(z, np.float64)
    # Max subtracted before dividing: at a tiny T, z / T alone would overflow to inf - inf = NaN;
    # this way the gaps go to -inf and the top class keeps log p = 0 (the T -> 0 limit).
    with np.errstate(over="ignore"):
        z = (z - z.max(1, keepdims=True)) / T
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _mean_kl(log_p, log_q):
    """mean_i sum_j p_ij (log p_ij - log q_ij), with 0 log 0 = 0; +inf where q_ij = 0 < p_ij."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return float(terms.sum(1).mean())


def _kl_to_probs(zs, q, T=1.0):
    """mean_i KL(softmax(zs_i / T) || q_i) in float64, q given as probabilities (a teacher's
    softmax, or a mixture of several teachers' that has no logits)."""
    # q may come from a float32 softmax and hold exact zeros; the floor keeps their terms finite.
    return _mean_kl(_log_softmax(zs, T), np.log(np.maximum(np.asarray(q, np.float64), 1e-300)))


# ---- inputs ---------------------------------------------------------------------------

def _check_bins(bins):
    bins = _check_int("bins", bins, 1)
    if bins > _MAX_BINS:
        raise ValueError(f"bins must be <= {_MAX_BINS}, got {bins}")
    return bins


def _data(data, labels):
    data = _as_dataset(data, "data")
    if labels and data.y is None:
        raise ValueError("data has no labels (y is None); this metric compares predictions with labels")
    return data


@contextlib.contextmanager
def _eval_mode(*models):
    """Eval mode for the duration; afterwards each model's training flag and forward counter
    are as before, so that measuring a model in the middle of a user's own training loop does
    not shift the dropout draws of that loop's later forwards."""
    saved = [(m, m.training, m._step) for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, training, step in saved:
            m.train(training)
            m._step = step


def _num_outputs(model, data, name):
    """The model's number of outputs, from a forward of one sample (in eval mode). Asked before
    the data set's forward so that a mismatch is reported in the metric's terms: on labelled
    data, the C loop only says the data set's classes are not the net's outputs."""
    out = model(data.batch(np.arange(1)), grad=False)
    if out.ndim != 2:
        raise ValueError(f"{name} must output (N, classes) logits, got outputs of shape {out.shape[1:]} per sample")
    return out.shape[1]


def _logits(model, data, batch_size, name):
    z = predict(model, data, batch_size=batch_size)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name}'s outputs on data are not finite (NaN/Inf): check its parameters")
    return z


def _check_classes(outputs, data, who):
    if outputs != data.num_classes:
        raise ValueError(f"data has {data.num_classes} classes (data.num_classes) but {who} {outputs} "
                         f"outputs; make the data with kdcore.datasets.from_arrays(X, y, num_classes={outputs})")


def _model_logits(model, data, batch_size, labels):
    """(logits, Dataset) of one model; labels=True: data must be labelled. Labelled data must
    have as many classes as the model has outputs."""
    _check_model(model, "model")
    data = _data(data, labels)
    batch_size = _check_int("batch_size", batch_size, 1)
    with _eval_mode(model):
        v = _num_outputs(model, data, "model")
        if data.y is not None:
            _check_classes(v, data, "the model has")
        z = _logits(model, data, batch_size, "model")
    return z, data


def _pair_logits(student, teacher, data, batch_size, labels):
    """(student logits, teacher logits, Dataset), one Dataset for both models (an (X, y) tuple
    is normalised once, so both see the same inputs)."""
    _check_model(student, "student")
    _check_model(teacher, "teacher")
    data = _data(data, labels)
    batch_size = _check_int("batch_size", batch_size, 1)
    with _eval_mode(student, teacher):
        vs, vt = _num_outputs(student, data, "student"), _num_outputs(teacher, data, "teacher")
        if vs != vt:
            raise ValueError(f"student and teacher must have the same number of outputs (classes): the student has "
                             f"{vs}, the teacher {vt}")
        # kdcore.predict refuses labelled data of another class count, labels needed or not
        if data.y is not None:
            _check_classes(vs, data, "the student and the teacher have")
        zs = _logits(student, data, batch_size, "student")
        zt = _logits(teacher, data, batch_size, "teacher")
    return zs, zt, data


# ---- logit metrics ----------------------------------------------------------------------

def agreement(student, teacher, data, batch_size=512):
    """Fraction of the samples of ``data`` on which the student's top-1 prediction (argmax of
    its logits; the first class on a tie) is the teacher's. Labels are not needed."""
    zs, zt, _ = _pair_logits(student, teacher, data, batch_size, labels=False)
    return float(np.mean(zs.argmax(1) == zt.argmax(1)))


def kl_divergence(student, teacher, data, T=1.0, batch_size=512):
    """mean_i KL(p_s,i || p_t,i) = mean_i sum_c p_s,ic (log p_s,ic - log p_t,ic) with
    p = softmax(z / T), student first (the direction of the ``kl_student_teacher`` column of a
    distillation History, which is this at T=1), in float64, no T^2 factor. Labels are not
    needed.

    (Hinton's KD loss is the other direction, KL(p_t || p_s). ``kdcore.kl_divergence`` is the
    same quantity on two logit arrays, computed in float32 in C.)"""
    T = _check_float("T", T, 0, lo_open=True)
    zs, zt, _ = _pair_logits(student, teacher, data, batch_size, labels=False)
    return _mean_kl(_log_softmax(zs, T), _log_softmax(zt, T))


def _calibration(z, y, bins):
    lp = _log_softmax(z)
    n = len(y)
    rows = np.arange(n)
    pred = lp.argmax(1)
    # max_c p_c = 1 / sum_c exp(z_c - max z) rather than exp(max log p): the division is
    # correctly rounded, so k tied top classes give exactly 1/k, and 1/k on a bin edge is
    # binned as an edge, not an ulp to either side of it.
    z64 = np.asarray(z, np.float64)
    conf = 1.0 / np.exp(z64 - z64.max(1, keepdims=True)).sum(1)
    correct = (pred == y).astype(np.float64)
    # k / bins rounds each edge correctly (linspace's k * (1/bins) can be an ulp off), so a
    # confidence equal to k / bins lands on the edge and goes to the bin below it.
    edges = np.arange(bins + 1) / bins
    # side="left": edges[b] < conf <= edges[b + 1] gives b; clip only guards conf == 0.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_conf = np.where(count > 0, sum_conf / count, np.nan)
        bin_acc = np.where(count > 0, sum_acc / count, np.nan)
    return {"ece": float(np.abs(sum_acc - sum_conf).sum() / n), "bin_edges": edges, "bin_confidence": bin_conf,
            "bin_accuracy": bin_acc, "bin_count": count, "nll": float(-lp[rows, y].mean()),
            "accuracy": float(correct.mean())}


def calibration(model, data, bins=15, batch_size=512):
    """Expected calibration error (Guo et al. 2017) of ``model`` on labelled ``data``, with its
    reliability bins, the negative log-likelihood and the accuracy.

    The confidence of a sample is its max softmax probability, its prediction the argmax.
    (0, 1] is split into ``bins`` (1 to 1,000,000) equal-width bins (lo, hi] (a confidence
    on an edge goes to the bin below); ECE = sum_b (n_b / N) |acc_b - conf_b| with acc_b and conf_b the mean
    correctness and confidence of the n_b samples in bin b.

    Returns a dict: ``ece``, ``nll`` (mean -log p(label), natural log), ``accuracy`` (floats);
    ``bin_edges`` (bins + 1 values k / bins), ``bin_confidence``, ``bin_accuracy`` (float64,
    NaN for an empty bin), ``bin_count`` (int64). ``plot_reliability`` draws it."""
    bins = _check_bins(bins)
    z, data = _model_logits(model, data, batch_size, labels=True)
    return _calibration(z, data.y, bins)


def _confusion(z, y, k):
    return np.bincount(y * k + z.argmax(1), minlength=k * k).reshape(k, k)


def confusion_matrix(model, data, normalize=None, batch_size=512):
    """Confusion matrix of ``model`` on labelled ``data``: ``cm[i, j]`` counts the samples of
    true class i predicted as class j (rows true, columns predicted: scikit-learn's
    orientation), for the data set's ``num_classes`` classes.

    normalize: None (int64 counts), ``"true"`` (each row divided by its sum: row i is the
    distribution of predictions for class i), ``"pred"`` (each column divided by its sum) or
    ``"all"`` (divided by the number of samples); a row or column without samples is 0, as in
    scikit-learn. ``plot_confusion`` draws it."""
    if normalize is not None and not _is_choice(normalize, _NORMALIZE):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    z, data = _model_logits(model, data, batch_size, labels=True)
    cm = _confusion(z, data.y, data.num_classes)
    if normalize is None:
        return cm
    total = {"true": cm.sum(1, keepdims=True), "pred": cm.sum(0, keepdims=True), "all": cm.sum()}[normalize]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(cm / total)


def per_class_accuracy(model, data, batch_size=512):
    """Accuracy of ``model`` on the samples of each true class of labelled ``data`` (the
    recall of each class: the diagonal of ``confusion_matrix(..., normalize="true")``), a
    float64 array of ``num_classes`` values; NaN for a class without samples."""
    z, data = _model_logits(model, data, batch_size, labels=True)
    cm = _confusion(z, data.y, data.num_classes)
    n = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.diag(cm) / n, np.nan)


# ---- representations --------------------------------------------------------------------

def _check_tap(model, tap, arg, role):
    if not isinstance(tap, str):
        raise TypeError(f"{arg} must be a tap name (str), got {type(tap).__name__}")
    if tap not in model.taps():
        raise KeyError(f"{arg}: the {role} has no tap named {tap!r}; model.taps() lists them")


def _cka_from_covariances(x_sum, y_sum, xx, yy, yx, n):
    mx, my = x_sum / n, y_sum / n
    cxx = xx - n * np.outer(mx, mx)
    cyy = yy - n * np.outer(my, my)
    cyx = yx - n * np.outer(my, mx)
    return np.sum(cyx * cyx), np.linalg.norm(cxx), np.linalg.norm(cyy)


def _centred_gram(f, chunk=1024):
    """Xc Xc^T of the column-centred features, in float64, a few columns at a time so that
    the float64 copy never holds more than n x chunk values."""
    n, d = f.shape
    mean = f.mean(0, dtype=np.float64)
    k = np.zeros((n, n))
    for j in range(0, d, chunk):
        c = f[:, j:j + chunk].astype(np.float64) - mean[j:j + chunk]
        k += c @ c.T
    return k


def linear_cka(student, teacher, data, student_tap, teacher_tap, batch_size=256):
    """Linear CKA (Kornblith et al. 2019) between the student's ``student_tap`` and the
    teacher's ``teacher_tap`` over all samples of ``data`` (labels not needed), in [0, 1].

    Each tap's output is flattened per sample (n x d_x and n x d_y) and centred over the
    samples; CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), invariant to orthogonal
    transforms and isotropic scaling of either side, 1 for X against itself. ``model.taps()``
    lists the names; student and teacher may be the same model (two layers of one network).

    When both taps have at most n features, X^T X, Y^T Y, Y^T X and the feature sums are
    accumulated batch by batch in float64 (memory O(d^2), the features are not kept);
    otherwise both taps' features are kept (float32) and CKA is computed from the n x n
    centred Gram matrices K = X X^T, L = Y Y^T as <K, L>_F / (||K||_F ||L||_F) (memory
    O(n d + n^2)). NaN when a tap is constant over the samples (its centred features are 0)."""
    _check_model(student, "student")
    _check_model(teacher, "teacher")
    _check_tap(student, student_tap, "student_tap", "student")
    _check_tap(teacher, teacher_tap, "teacher_tap", "teacher")
    data = _data(data, labels=False)
    batch_size = _check_int("batch_size", batch_size, 1)
    n = len(data)
    with _eval_mode(student, teacher):
        acc = None
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            xb = data.batch(idx)
            student(xb)
            fx = student.tap(student_tap).reshape(len(idx), -1)
            if teacher is not student:
                teacher(xb)
            fy = teacher.tap(teacher_tap).reshape(len(idx), -1)
            if acc is None:
                gram = max(fx.shape[1], fy.shape[1]) > n
                if gram:
                    acc = [np.empty((n, fx.shape[1]), np.float32), np.empty((n, fy.shape[1]), np.float32)]
                else:
                    # Moments about the first batch's mean rather than about 0: subtracting
                    # n m m^T from raw moments would cancel digits when the features sit far
                    # from 0 compared with their spread.
                    shift_x, shift_y = fx.mean(0, dtype=np.float64), fy.mean(0, dtype=np.float64)
                    dx, dy = fx.shape[1], fy.shape[1]
                    acc = [np.zeros(dx), np.zeros(dy), np.zeros((dx, dx)), np.zeros((dy, dy)), np.zeros((dy, dx))]
            if gram:
                acc[0][idx], acc[1][idx] = fx, fy
            else:
                x, y = fx - shift_x, fy - shift_y
                acc[0] += x.sum(0)
                acc[1] += y.sum(0)
                acc[2] += x.T @ x
                acc[3] += y.T @ y
                acc[4] += y.T @ x
    if gram:
        k, l_ = _centred_gram(acc[0]), _centred_gram(acc[1])
        hsic_xy, norm_x, norm_y = np.sum(k * l_), np.linalg.norm(k), np.linalg.norm(l_)
    else:
        hsic_xy, norm_x, norm_y = _cka_from_covariances(*acc, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(hsic_xy / (norm_x * norm_y))


# ---- summary ----------------------------------------------------------------------------

def report(student, teacher, data, T=1.0, bins=15, batch_size=512, student_tap=None, teacher_tap=None):
    """The scalar measurements of a student/teacher pair on labelled ``data``, each model run
    once: ``student_accuracy``, ``teacher_accuracy``, ``agreement``, ``kl_student_teacher``
    (KL(p_s || p_t) at temperature T, as ``kl_divergence``), ``student_ece``,
    ``teacher_ece`` (``bins`` bins, as ``calibration``), ``student_nll``, ``teacher_nll``;
    with ``student_tap`` and ``teacher_tap`` also ``linear_cka`` between those taps."""
    T = _check_float("T", T, 0, lo_open=True)
    bins = _check_bins(bins)
    if (student_tap is None) != (teacher_tap is None):
        raise ValueError("give both student_tap and teacher_tap (for linear_cka) or neither")
    zs, zt, data = _pair_logits(student, teacher, data, batch_size, labels=True)
    cs, ct = _calibration(zs, data.y, bins), _calibration(zt, data.y, bins)
    out = {"student_accuracy": cs["accuracy"], "teacher_accuracy": ct["accuracy"],
           "agreement": float(np.mean(zs.argmax(1) == zt.argmax(1))),
           "kl_student_teacher": _mean_kl(_log_softmax(zs, T), _log_softmax(zt, T)),
           "student_ece": cs["ece"], "teacher_ece": ct["ece"], "student_nll": cs["nll"], "teacher_nll": ct["nll"]}
    if student_tap is not None:
        # linear_cka's forwards keep every layer's output, hence its smaller batches
        out["linear_cka"] = linear_cka(student, teacher, data, student_tap, teacher_tap,
                                       batch_size=min(batch_size, 256))
    return out


# ---- plots ------------------------------------------------------------------------------

def weight_noise_sharpness(model, data, sigmas=(0.01, 0.02, 0.05), draws=5, seed=0, batch_size=512):
    """A sharpness proxy (Keskar et al. 2017; Jiang et al. 2020's magnitude-aware noise): how
    much the loss on labelled ``data`` rises when the weights are perturbed by Gaussian noise
    scaled to each tensor. A flatter minimum rises less.

    For each parameter tensor w (BN running statistics are not perturbed) the noise is
    sigma * rms(w) * e, rms(w) = ||w|| / sqrt(w.size), e standard normal, so that its norm is
    about sigma * ||w||. Draw d uses the same e for every sigma (common random numbers): e
    comes from ``numpy.random.default_rng(seed)``, draw after draw, tensor after tensor in
    ``model.named_parameters()`` order, ``standard_normal(w.shape)`` in float64, the perturbed
    weights rounded to float32. The loss is the mean -log p(label) (natural log), as
    ``calibration``'s nll. The model's weights are restored bitwise afterwards (also on error).
    ``draws`` is at most 10,000; a sigma under which the outputs overflow is a ValueError.

    Returns a dict: ``nll`` (unperturbed), ``sigmas`` (list), ``increase`` (per sigma, the
    mean over draws of the perturbed nll minus ``nll``), ``increase_std`` (their std over
    draws, ddof 0) and ``nlls`` (draws x sigmas array of the perturbed nlls).
    """
    _check_model(model, "model")
    data = _data(data, True)
    sig = np.asarray([_check_float("sigmas", v, 0) for v in (sigmas if np.ndim(sigmas) else [sigmas])], np.float64)
    if sig.size == 0:
        raise ValueError("sigmas must hold at least one value")
    draws = _check_int("draws", draws, 1)
    if draws > _MAX_DRAWS:
        raise ValueError(f"draws must be <= {_MAX_DRAWS}, got {draws}")
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    params = list(model.named_parameters())
    saved = [w.copy() for _, w in params]
    rms = [float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) for w in saved]
    rng = np.random.default_rng(seed)

    def nll():
        with _eval_mode(model):
            z = _logits(model, data, batch_size, "model")
        return float(-_log_softmax(z)[np.arange(len(data.y)), data.y].mean())

    try:
        base = nll()
        nlls = np.empty((draws, sig.size))
        for d in range(draws):
            e = [rng.standard_normal(w.shape) for w in saved]
            for j, s in enumerate(sig):
                for (_, w), w0, r, ei in zip(params, saved, rms, e):
                    w[...] = (w0 + s * r * ei).astype(np.float32)
                try:
                    nlls[d, j] = nll()
                except ValueError:
                    raise ValueError(f"sigmas: under noise of sigma {s:g} the model's outputs are not finite "
                                     "(the perturbed weights overflow); use smaller sigmas") from None
    finally:
        for (_, w), w0 in zip(params, saved):
            w[...] = w0
    inc = nlls - base
    return dict(nll=base, sigmas=sig.tolist(), increase=inc.mean(0).tolist(), increase_std=inc.std(0).tolist(),
                nlls=nlls)


def _figure(ax, what, size):
    """(figure, axes): ax's, or a new Figure. The new one is not registered with pyplot, so a
    notebook cell that returns it shows it once (a pyplot figure would show twice)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"{what} needs matplotlib: pip install matplotlib") from None
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _cal_array(cal, key, n, scalar=False):
    """cal[key] as float64: a scalar, or a 1-D array of n values (any length if n is None)."""
    v = cal[key]
    a = np.asarray(v) if not isinstance(v, (str, bytes)) else np.asarray(None)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"cal[{key!r}] must be numeric, got {type(v).__name__}")
    a = a.astype(np.float64)
    if scalar:
        if a.ndim != 0:
            raise ValueError(f"cal[{key!r}] must be a number, got shape {a.shape}")
        return a
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"cal[{key!r}] must be 1-D{f' with {n} values' if n is not None else ''}, got shape {a.shape}")
    return a


def plot_reliability(cal, ax=None):
    """Reliability diagram of ``cal`` (the dict ``calibration`` returns): per bin, the
    accuracy (bars) and the mean confidence (points) against the diagonal of perfect
    calibration; the title gives ECE. Empty bins draw nothing. Returns the matplotlib Figure
    (``ax``: draw into these axes instead of a new figure)."""
    keys = ("ece", "bin_edges", "bin_confidence", "bin_accuracy", "bin_count")
    if not isinstance(cal, dict) or any(k not in cal for k in keys):
        raise TypeError(f"cal must be the dict kdcore.metrics.calibration returns (keys {', '.join(keys)})")
    edges = _cal_array(cal, "bin_edges", None)
    if edges.shape[0] < 2:
        raise ValueError(f"cal['bin_edges'] must hold at least 2 edges, got {edges.shape[0]}")
    count, acc, conf = (_cal_array(cal, k, edges.shape[0] - 1) for k in ("bin_count", "bin_accuracy", "bin_confidence"))
    ece = _cal_array(cal, "ece", None, scalar=True)
    fig, ax = _figure(ax, "plot_reliability", (4.5, 4.5))
    full = count > 0
    ax.bar(edges[:-1][full], acc[full], width=np.diff(edges)[full], align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    centres = (edges[:-1] + edges[1:]) / 2
    ax.plot(centres[full], conf[full], "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {float(ece):.4f}")
    ax.legend(loc="upper left")
    return fig


def plot_confusion(cm, class_names=None, ax=None):
    """Heat map of a confusion matrix (``confusion_matrix``'s: rows true class, columns
    predicted class), values written in the cells when there are at most 20 classes.
    class_names: one label per class (default 0..K-1). Returns the matplotlib Figure
    (``ax``: draw into these axes instead of a new figure)."""
    cm = np.asarray(cm) if not isinstance(cm, (str, bytes)) else np.asarray(None)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0 or cm.dtype.kind not in "iuf":
        raise ValueError(f"cm must be a square numeric matrix (confusion_matrix's result), got shape {cm.shape} "
                         f"and dtype {cm.dtype}")
    if not np.all(np.isfinite(cm)):
        raise ValueError("cm must be finite (confusion_matrix's results are)")
    k = cm.shape[0]
    if isinstance(class_names, np.ndarray):
        class_names = class_names.tolist()
    if class_names is None:
        class_names = [str(i) for i in range(k)]
    elif not isinstance(class_names, (list, tuple)):
        raise TypeError(f"class_names must be a list of names, got {type(class_names).__name__}")
    elif len(class_names) != k:
        raise ValueError(f"class_names must give one name per class (per row of cm: {k}), got {len(class_names)}")
    fig, ax = _figure(ax, "plot_confusion", (1.5 + 0.45 * k, 1.2 + 0.45 * k))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:
        hi = cm.max()
        for i in range(k):
            for j in range(k):
                v = cm[i, j]
                ax.text(j, i, f"{v:d}" if cm.dtype.kind in "iu" else f"{v:.2f}", ha="center", va="center",
                        fontsize=8, color="white" if v > hi / 2 else "black")
    return fig
