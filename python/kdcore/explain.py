"""Explaining distillation: what a network keeps of its input, and how it learned it.

Cheng et al. (2020, "Explaining knowledge distillation by quantifying the knowledge") explain
why a distilled student beats the same network trained alone with three hypotheses, each a
measurement of how much of every input pixel a layer discards:

1. the student learns more *visual concepts* on the foreground and fewer on the background
   (a larger ``lam`` = E[N_fg / (N_fg + N_bg)], a larger N_fg);
2. it learns them faster and more simultaneously (smaller ``D_mean`` and ``D_var``: the
   weight distance travelled before an image's concepts peak);
3. it learns them more stably, with fewer detours (a larger ``rho``: the share of the
   concepts ever learned that the final model keeps).

The measurement: for an image x and a tap f, Gaussian noise of per-pixel scale sigma_i is
fitted so that f(x + sigma * eps) stays close to f(x) while the noise is as large as it can
be (``information_discarding``; the optimisation runs in C). The entropy of each noisy pixel,
H_i = log sigma_i + 0.5 log(2 pi e), is how much of pixel i the tap discards. Pixels with
much lower entropy than the background's mean (H_bg - H_i > b) are the image's visual
concepts (``visual_concepts``). Tracking them over epochs, with the per-epoch weight changes
that ``fit(..., track_weights=True)`` logs, gives the learning dynamics
(``learning_dynamics``).

The paper leaves the optimisation open; kdcore minimises, per image,

    J(s) = E_eps ||f(x + e^s * eps) - f(x)||^2 / delta2  -  lam * mean_i s_i

by Adam on s = log sigma, with delta2 the tap's spread over the images (the mean squared
distance of f(x) to its mean over the batch of images given). Everything is per input value;
for one-channel images (Fashion-MNIST) that is per pixel.
"""
from __future__ import annotations

import numpy as np

from . import _kdcore
from .nn import Module, _check_float, _check_int

__all__ = ["information_discarding", "Discarding", "feature_spread", "foreground_mask", "visual_concepts",
           "concepts_over_epochs", "learning_dynamics", "plot_discarding", "plot_concepts"]

_HALF_LOG_2PIE = 0.5 * np.log(2 * np.pi * np.e)


def _model(model):
    if not isinstance(model, Module):
        raise TypeError(f"model must be a kdcore model, got {type(model).__name__}")
    return model


def _images(images):
    x = np.asarray(images) if not isinstance(images, np.ndarray) else images
    if x.dtype != np.float32:
        raise TypeError(f"images must be a float32 array (the normalised inputs the model sees: data.batch(indices)), "
                        f"got dtype {x.dtype}")
    if x.ndim not in (2, 4) or x.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) or (N, D) with N >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or Inf")
    return np.ascontiguousarray(x)


def _real_array(name, v):
    """v as a float64 array of finite numbers, or TypeError / ValueError naming `name`."""
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of real numbers, got {type(v).__name__}") from None
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _tap_node(model, tap):
    if tap is None:
        taps = model.feature_taps() or {}
        stages = taps.get("stages")
        return (stages[-1] if stages else None), model._output_index()
    if not isinstance(tap, str):
        raise TypeError(f"tap must be a tap name (str), got {type(tap).__name__}")
    try:
        return tap, model._tap_index(tap)
    except KeyError:
        raise KeyError(f"tap {tap!r} does not exist; model.taps() lists them") from None


def _default_tap(model, tap):
    """The tap the measurement reads: the given one, else the last stage end of a zoo model
    (Cheng et al. read a late convolutional layer), else the output."""
    name, node = _tap_node(model, tap)
    if tap is None and name is not None:
        return name, model._tap_index(name)
    return name, node


def feature_spread(model, images, tap=None):
    """delta2: the mean over images of ||f(x) - mean_x f(x)||^2 at the tap (for one image,
    ||f(x)||^2), in eval mode. The normaliser of the discarding objective."""
    model = _model(model)
    x = _images(images)
    name, node = _default_tap(model, tap)
    was = model.training
    model.eval()
    try:
        model.forward(x)
        f = model.net.tap(node).reshape(len(x), -1).astype(np.float64)
    finally:
        model.train(was)
    if len(f) == 1:
        return float((f ** 2).sum())
    return float(((f - f.mean(0)) ** 2).sum(1).mean())


class Discarding:
    """The result of ``information_discarding``: ``H`` (entropy per input value, the images'
    shape), ``log_sigma``, ``objective`` (mean J over images per Adam step), ``delta2``,
    ``tap``."""

    def __init__(self, log_sigma, objective, delta2, tap, lam):
        self.log_sigma = log_sigma
        self.H = log_sigma.astype(np.float64) + _HALF_LOG_2PIE
        self.objective = objective
        self.delta2 = delta2
        self.tap = tap
        self.lam = lam

    def __repr__(self):
        return (f"Discarding({self.H.shape[0]} images, tap {self.tap!r}, mean H {self.H.mean():.3f}, "
                f"objective {self.objective[0]:.4g} -> {self.objective[-1]:.4g})" if len(self.objective) else
                f"Discarding({self.H.shape[0]} images, tap {self.tap!r})")


def information_discarding(model, images, tap=None, steps=300, samples=16, lr=0.05, lam=1.0, delta2=None,
                           init_sigma=0.01, seed=0):
    """Fits per-pixel noise scales for each image (see the module docstring) and returns a
    ``Discarding`` with the entropies H (same shape as ``images``).

    images: float32 (N, C, H, W), normalised as the model sees them (``data.batch(idx)``).
    tap: the tap the measurement reads (default: the last stage end of a zoo model, else the
    output). steps, samples (noise draws per image per step), lr (Adam on log sigma), lam (the
    entropy weight), delta2 (default: ``feature_spread`` over these images), init_sigma, seed:
    the fit. The model runs in eval mode; its parameter gradients are left zeroed. Images are
    independent problems; results are bitwise repeatable for a seed and thread count."""
    model = _model(model)
    x = _images(images)
    name, node = _default_tap(model, tap)
    steps = _check_int("steps", steps, 0)
    samples = _check_int("samples", samples, 1)
    lr = _check_float("lr", lr, 0, lo_open=True)
    lam = _check_float("lam", lam, 0)
    init_sigma = _check_float("init_sigma", init_sigma, 0, lo_open=True)
    seed = _check_int("seed", seed, 0)
    if delta2 is None:
        delta2 = feature_spread(model, x, name if name is not None else None)
        if not delta2 > 0:
            raise ValueError("the tap's features do not vary over these images (delta2 = 0); give delta2")
    delta2 = _check_float("delta2", delta2, 0, lo_open=True)
    was = model.training
    model.eval()
    try:
        s, obj = _kdcore.explain_sigma(model.net, node, x, steps=steps, samples=samples, lr=lr, lam=lam,
                                       delta2=delta2, init_sigma=init_sigma, seed=seed)
    finally:
        model.train(was)
    return Discarding(s, obj, delta2, name if name is not None else "output", lam)


def foreground_mask(data, indices, threshold=0.05):
    """Boolean foreground mask of the images ``data.X[indices]``: values above ``threshold``
    on the [0, 1] scale (uint8 images are scaled by 1/255). Fashion-MNIST has no object
    annotations; its clothing lies on a black background, so this is the proxy Cheng et al.'s
    measurements need. Any boolean array of the images' shape works as a mask instead."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError("indices must be a 1-D array of integers")
    if idx.size and (idx.min() < -len(data) or idx.max() >= len(data)):
        raise IndexError(f"indices must be in [0, {len(data)}), got {idx.min()}..{idx.max()}")
    threshold = _check_float("threshold", threshold)
    return data.X[idx].astype(np.float32) * np.float32(data.scale) > threshold


def _bool_array(name, v):
    try:
        return np.asarray(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a boolean array, got {type(v).__name__}") from None


def _mask(foreground, shape):
    fg = _bool_array("foreground", foreground)
    if fg.dtype != bool:
        raise TypeError(f"foreground must be a boolean mask, got dtype {fg.dtype}")
    if fg.shape != shape:
        raise ValueError(f"foreground has shape {fg.shape}, the entropies {shape}")
    return fg


def visual_concepts(H, foreground, b=0.5):
    """Visual concepts per image from entropies H (N, ...) and a foreground mask of H's
    shape: H_bg = the mean entropy over the background, a concept = a pixel with
    H_bg - H_i > b (nats). Returns a dict of arrays over images: ``n_fg``, ``n_bg``,
    ``h_bg``, ``ratio`` = n_fg / (n_fg + n_bg) (NaN without concepts), the boolean concept
    masks ``fg_concepts`` and ``bg_concepts``, and the scalar ``lam`` = the mean ratio over
    images that have concepts (Cheng et al.'s lambda; higher is better)."""
    H = _real_array("H", getattr(H, "H", H))
    if H.ndim < 2:
        raise ValueError(f"H must be (N, ...) entropies, got shape {H.shape}")
    fg = _mask(foreground, H.shape)
    b = _check_float("b", b)
    n = H.shape[0]
    flat, fgf = H.reshape(n, -1), fg.reshape(n, -1)
    bg_count = (~fgf).sum(1)
    if (bg_count == 0).any():
        raise ValueError(f"image {int(np.argmax(bg_count == 0))} has no background pixel: the background entropy "
                         f"is undefined (check the mask)")
    h_bg = np.where(~fgf, flat, 0.0).sum(1) / bg_count
    concept = (h_bg[:, None] - flat) > b
    fgc, bgc = concept & fgf, concept & ~fgf
    n_fg, n_bg = fgc.sum(1), bgc.sum(1)
    tot = n_fg + n_bg
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(tot > 0, n_fg / np.maximum(tot, 1), np.nan)
    lam = float(np.nanmean(ratio)) if np.isfinite(ratio).any() else float("nan")
    return dict(n_fg=n_fg, n_bg=n_bg, h_bg=h_bg, ratio=ratio, lam=lam, fg_concepts=fgc.reshape(H.shape),
                bg_concepts=bgc.reshape(H.shape))


def learning_dynamics(fg_concepts, weight_change, weight_norm0):
    """Cheng et al.'s learning speed, simultaneity and stability from concepts tracked over
    epochs 1..M.

    fg_concepts: per epoch k = 1..M, the boolean foreground-concept masks (N, ...) of the
    model after epoch k (``visual_concepts(...)["fg_concepts"]``), as a list or an (M, N, ...)
    array. weight_change: ||w_k - w_{k-1}|| for k = 1..M (``History["weight_change"]`` of a
    run with ``track_weights=True``); weight_norm0: ||w_0||.

    Per image I: m(I) = the epoch with the most foreground concepts (the first if tied);
    D(I) = sum_{k <= m(I)} ||w_k - w_{k-1}|| / ||w_0||, the weight distance travelled until
    then; rho(I) = |S_M(I)| / |union_k S_k(I)| with S_k the foreground concepts after epoch k.
    Returns a dict: ``m`` (1-based epochs), ``D``, ``D_mean`` (lower: learns faster),
    ``D_var`` (lower: learns concepts more simultaneously), ``rho`` (per image, NaN without
    concepts), ``rho_mean`` (higher: fewer detours)."""
    S = _bool_array("fg_concepts", fg_concepts)
    if S.dtype != bool or S.ndim < 2:
        raise TypeError("fg_concepts must be boolean masks per epoch: (epochs, N, ...)")
    M, N = S.shape[0], S.shape[1]
    dw = _real_array("weight_change", weight_change).reshape(-1)
    if dw.shape != (M,):
        raise ValueError(f"weight_change must have one value per epoch ({M}), got {dw.shape[0]}")
    w0 = _check_float("weight_norm0", weight_norm0, 0, lo_open=True)
    counts = S.reshape(M, N, -1).sum(2)               # (M, N)
    m = counts.argmax(0)                               # 0-based epoch of the peak
    cum = np.cumsum(dw) / w0
    D = cum[m]
    union = S.reshape(M, N, -1).any(0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(union > 0, S[-1].reshape(N, -1).sum(1) / np.maximum(union, 1), np.nan)
    return dict(m=m + 1, D=D, D_mean=float(D.mean()), D_var=float(D.var()), rho=rho,
                rho_mean=float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"))


def concepts_over_epochs(model, checkpoints, images, foreground, tap=None, b=0.5, **fit):
    """The visual concepts of ``model`` at each saved epoch: ``checkpoints`` is a list of
    state dicts or of checkpoint paths (kdcore.save files, e.g. a run's per-epoch
    checkpoints), in epoch order; each is loaded into ``model`` (restored afterwards), the
    discarding fit runs on ``images`` (``fit`` options: steps, samples, lr, lam, delta2, seed)
    and ``visual_concepts(..., b)`` is taken. Returns the list of concept dicts; their
    ``fg_concepts`` feed ``learning_dynamics`` with the run's ``weight_change``."""
    model = _model(model)
    if not isinstance(checkpoints, (list, tuple)) or not checkpoints:
        raise TypeError("checkpoints must be a non-empty list of state dicts or checkpoint paths")
    from .checkpoint import load
    before = model.state_dict()
    out = []
    try:
        for k, ck in enumerate(checkpoints):
            if isinstance(ck, dict):
                model.load_state_dict(ck)
            elif isinstance(ck, (str, bytes)) or hasattr(ck, "__fspath__"):
                load(ck, model)
            else:
                raise TypeError(f"checkpoints[{k}] must be a state dict or a path, got {type(ck).__name__}")
            d = information_discarding(model, images, tap=tap, **dict(dict(seed=k), **fit))
            out.append(visual_concepts(d, foreground, b=b))
    finally:
        model.load_state_dict(before)
    return out


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    return plt


def plot_discarding(H, images=None, foreground=None, n=6):
    """Heatmaps of the entropies H (N, C, H, W; channel 0) of the first ``n`` images, under
    the images themselves when given, with the foreground's outline when a mask is given.
    Returns the matplotlib Figure (numeric twin: ``information_discarding(...).H``)."""
    H = _real_array("H", getattr(H, "H", H))
    if H.ndim != 4:
        raise ValueError(f"H must be (N, C, H, W) entropies of images, got shape {H.shape}")
    n = min(_check_int("n", n, 1), H.shape[0])
    plt = _plt()
    rows = 2 if images is not None else 1
    fig, axes = plt.subplots(rows, n, figsize=(2 * n, 2 * rows), squeeze=False)
    for i in range(n):
        if images is not None:
            axes[0, i].imshow(np.asarray(images)[i, 0], cmap="gray")
            axes[0, i].set_axis_off()
        im = axes[rows - 1, i].imshow(H[i, 0], cmap="viridis")
        if foreground is not None:
            axes[rows - 1, i].contour(np.asarray(foreground)[i, 0], levels=[0.5], colors="w", linewidths=0.5)
        axes[rows - 1, i].set_axis_off()
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="H_i (nats)")
    return fig


def plot_concepts(n_fg, n_bg, labels=None):
    """N_fg and N_bg (mean over images) against epochs, one line pair per run: n_fg and n_bg
    are (runs, epochs) or (epochs,) arrays (numeric twin: ``visual_concepts`` per epoch).
    Returns the matplotlib Figure."""
    fg = np.atleast_2d(_real_array("n_fg", n_fg))
    bg = np.atleast_2d(_real_array("n_bg", n_bg))
    if fg.shape != bg.shape:
        raise ValueError(f"n_fg {fg.shape} and n_bg {bg.shape} must have the same shape")
    labels = labels or [f"run {i}" for i in range(fg.shape[0])]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = np.arange(1, fg.shape[1] + 1)
    for i, lab in enumerate(labels):
        line, = ax.plot(ep, fg[i], marker="o", label=f"{lab}: N_fg")
        ax.plot(ep, bg[i], marker="x", ls="--", color=line.get_color(), label=f"{lab}: N_bg")
    ax.set_xlabel("epoch")
    ax.set_ylabel("visual concepts per image")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
