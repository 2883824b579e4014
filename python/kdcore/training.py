"""The training driver: Python describes the run, each epoch runs inside C with the GIL
released, calling back every few steps for the progress bar and Ctrl-C."""
from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np

from . import _kdcore
from .datasets import Dataset, _augment_kwargs, from_arrays
from .nn import Module, _check_bool, _check_float, _check_int, _expected_input
from .optim import make_optimizer, make_schedule

__all__ = ["fit", "evaluate", "predict", "History", "lr_find", "LRFind"]


class History(dict):
    """Per-epoch metrics: ``history['val_acc'][e]`` etc. (lists indexed by epoch).

    The ``epoch`` column is 0-based, as ``callback(epoch, ...)``, ``keep_snapshots`` and
    checkpoints count epochs; the progress line and ``plot()`` number epochs from 1 (row
    ``epoch == 0`` is "epoch 1/N"). ``train_loss`` is the training objective (the weighted sum of
    the run's loss terms, averaged over the epoch's batches as the model trained);
    ``val_loss`` is the eval-mode cross-entropy on the validation data after the epoch.
    ``.last`` and ``.best`` are dicts of one epoch's metrics (best = highest val_acc, or
    lowest train_loss without validation); ``.to_pandas()`` and ``.plot()`` for notebooks.
    """

    def append(self, **metrics):
        """Add one epoch's metrics (each key's list grows by one)."""
        for k, v in metrics.items():
            self.setdefault(k, []).append(v)

    def _epoch(self, i):
        return {k: v[i] for k, v in self.items() if len(v) > i}

    @property
    def epochs(self):
        """Number of epochs recorded."""
        return len(self.get("epoch", []))

    @property
    def last(self):
        """The last epoch's metrics (a dict)."""
        return self._epoch(self.epochs - 1) if self.epochs else {}

    @property
    def best_epoch(self):
        """Index of the best epoch: highest val_acc, or lowest train_loss without validation."""
        if not self.epochs:
            return None
        if self.get("val_acc"):
            return int(np.argmax(self["val_acc"]))
        return int(np.argmin(self["train_loss"]))

    @property
    def best(self):
        """The best epoch's metrics (a dict; see ``best_epoch``)."""
        b = self.best_epoch
        return {} if b is None else self._epoch(b)

    def to_pandas(self):
        """A pandas DataFrame with one row per epoch, indexed by the 0-based ``epoch`` column;
        columns not logged every epoch are left out."""
        import pandas as pd
        return pd.DataFrame({k: v for k, v in self.items() if len(v) == self.epochs}).set_index("epoch")

    _LABELS = {"train_loss": "train objective (weighted terms)", "val_loss": "val cross-entropy",
               "train_acc": "train accuracy (during the epoch)", "val_acc": "val accuracy"}

    def plot(self, keys=None, axes=None):
        """Two matplotlib panels against the epoch (numbered from 1): losses on the first,
        accuracies (keys ending in "acc") on the second. The training objective (weighted loss
        terms) and the validation cross-entropy are labelled as such: they are different
        quantities. keys: the columns to draw (default train_loss, val_loss, train_acc,
        val_acc, those present); axes: two Axes to draw on (default: a new figure). Returns
        the two Axes."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
        keys = keys or [k for k in ("train_loss", "val_loss", "train_acc", "val_acc") if k in self]
        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
        x = [e + 1 for e in self["epoch"]]
        groups = ([k for k in keys if not k.endswith("acc")], [k for k in keys if k.endswith("acc")])
        for ax, ks, what in zip(axes, groups, ("loss", "accuracy")):
            for k in ks:
                ax.plot(x[:len(self[k])], self[k], marker="o", label=self._LABELS.get(k, k))
            ax.set_xlabel("epoch")
            ax.set_ylabel(what)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ks:
                ax.legend()
        return axes

    def __repr__(self):
        if not self.epochs:
            return "History(empty)"
        last, best = self.last, self.best
        fmt = lambda d: ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())  # noqa: E731
        return f"History({self.epochs} epochs; last: {fmt(last)}; best: {fmt(best)})"


def _as_dataset(data, name, like=None):
    """A Dataset from a Dataset or an (X, y) tuple. like: the Dataset whose normalisation and
    class count a tuple takes -- the training set for a validation tuple, so that a shift
    between the two sets is measured instead of normalised away."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        kw = {}
        if like is not None:
            kw["normalize"] = None if like.mean is None else (like.mean, like.std)
            if like.num_classes:
                kw["num_classes"] = like.num_classes   # a class absent from val is still a class
        try:
            return from_arrays(*data, **kw)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
    raise TypeError(f"{name} must be a kdcore Dataset or a tuple (X, y), got {type(data).__name__}")


def _model_dataset(model, data, name):
    """evaluate's data, checked against the model: an (X, y) tuple is normalised as the
    model's training set was (``model.train_normalization``, set by the training entry points)."""
    if not (isinstance(data, tuple) and len(data) == 2):
        data = _as_dataset(data, name)
        _check_fits(model, data, "model", name)
        return data
    norm = getattr(model, "train_normalization", None)
    if norm is None:
        warnings.warn(f"{name} is an (X, y) tuple and the model's training normalisation is unknown (it was not "
                      "trained by kdcore.fit/distill/... in this session), so the tuple is normalised with its own "
                      "mean/std, which hides any shift from the training data. Pass a kdcore Dataset with the "
                      "training set's mean/std, or set model.train_normalization = (mean, std) ((None, None): "
                      "no normalisation)", UserWarning, stacklevel=3)
        data = _as_dataset(data, name)
        _check_fits(model, data, "model", name)
        return data
    # Checked before normalising, so that a misfit is reported as such.
    _check_fits(model, _as_dataset(data, name), "model", name)
    try:
        return from_arrays(*data, normalize=None if norm[0] is None else tuple(norm))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


def _check_model(model, name="model"):
    if not isinstance(model, Module):
        raise TypeError(f"{name} must be a kdcore.nn.Module, got {type(model).__name__}")


def _check_fits(model, data, role, what="data"):
    """Checks, before any C loop runs, that ``data`` fits ``model``: its samples are the
    model's input and it has as many classes as the model outputs. The errors name the
    model's role (student, teacher, ...) and the data, which the C checks cannot."""
    c, h, w = (tuple(data.shape) + (1, 1))[:3]
    try:
        shapes = model.net.shapes(1, c, h, w)
    except ValueError as e:
        raise ValueError(f"the {role} cannot read {what}: {e}{_expected_input(model, data.shape, what)}") from None
    v = int(np.prod(shapes[model._output_index()]))
    if data.y is None or data.num_classes == v:
        return
    msg = (f"the {role} outputs {v} values but {what} has {data.num_classes} classes "
           f"(largest label in y: {int(data.y.max())})")
    if data.y.min() == 1 and data.num_classes == v + 1:
        msg += (f": its labels run from 1 to {v}, and kdcore counts classes from 0 (labels 0..{v - 1}); "
                "pass y - 1")
    raise ValueError(msg)


def _in_notebook():
    """A Jupyter kernel runs this process (where tqdm.auto wants ipywidgets)."""
    ip = sys.modules.get("IPython")
    try:
        shell = ip.get_ipython() if ip is not None else None
    except Exception:  # noqa: BLE001 - an odd IPython must not stop training
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _has_widgets():
    import importlib.util
    return importlib.util.find_spec("ipywidgets") is not None


class _Progress:
    """A per-step bar: tqdm.auto when installed, plain text in a terminal otherwise; none when
    disabled, or in a notebook without ipywidgets, where tqdm.auto would warn at every epoch
    and a text bar would add a line per update: there the epoch's summary line (loop) is the
    only output."""

    def __init__(self, enabled, epoch, epochs, steps):
        self.bar = None
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.last = 0
        self.enabled = enabled and not (_in_notebook() and not _has_widgets())
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="step")
        except ImportError:
            self.bar = None

    def __call__(self, epoch, step, steps_total, loss_sum, correct, seen, lr):
        if not self.enabled:
            return False
        loss, acc = loss_sum / max(seen, 1), correct / max(seen, 1)
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", lr=f"{lr:.3g}", refresh=False)
        else:
            text = (f"epoch {epoch + 1}/{self.epochs} step {step}/{steps_total} "
                    f"loss {loss:.4f} acc {acc:.4f} lr {lr:.3g}")
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
            self.width = len(text)
        self.last = step
        return False

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            # Blank the step text: the epoch's summary line takes its place.
            sys.stderr.write("\r" + " " * getattr(self, "width", 0) + "\r")


def _epoch_line(row, epochs):
    """The progress line after an epoch, numbered from 1 as the bar is: 'epoch 1/3 train_loss ...'."""
    rest = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "epoch")
    return f"epoch {row['epoch'] + 1}/{epochs} {rest}"


def _train_options(batch_size, schedule, base_lr, epochs, seed, augment, label_smoothing, drop_last, max_steps,
                   callback_every, bar, nonfinite="raise"):
    """The dict the C loops read (see parse_train_cfg in python/binding/loops.c)."""
    return dict(batch_size=batch_size, schedule=schedule._tuple(base_lr, epochs), gamma=schedule._gamma(),
                seed=seed, shuffle=True, drop_last=drop_last, max_steps=max_steps,
                label_smoothing=label_smoothing, callback=bar, callback_every=callback_every, nonfinite=nonfinite,
                **augment)


_NONFINITE = ("raise", "skip")


def _check_nonfinite(nonfinite):
    if not isinstance(nonfinite, str) or nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    return nonfinite


class _Common:
    """Options every training entry point shares, validated once."""

    def __init__(self, train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                 label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite="raise"):
        self.train = _as_dataset(train, "train")
        self.nonfinite = _check_nonfinite(nonfinite)
        self.val = None if val is None else _as_dataset(val, "val", like=self.train)
        self.epochs = _check_int("epochs", epochs, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.callback_every = _check_int("callback_every", callback_every, 1)
        self.label_smoothing = _check_float("label_smoothing", label_smoothing, 0, 1)
        self.max_steps = 0 if max_steps is None else _check_int("max_steps", max_steps, 1)
        self.drop_last = _check_bool("drop_last", drop_last)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        self.callback = callback
        self.progress = _check_bool("progress", progress)
        self.opt = make_optimizer(optimizer)
        if lr is not None:
            self.opt.lr = _check_float("lr", lr, 0)
        self.sched = make_schedule(schedule)
        self.augment = _augment_kwargs(augment)
        self.augmented = (self.augment["crop_padding"] > 0 or self.augment["hflip"] or self.augment["noise_std"] > 0
                          or self.augment.get("randaugment", 0) > 0)
        self.checkpoint, self.checkpoint_every, self.checkpoint_best, self.resume = None, 1, False, False
        self.run_config = {}
        self.track_weights = False

    def check(self, model, role):
        """model fits the training data (and the validation data): _check_fits."""
        _check_fits(model, self.train, role, "the training data (train)")
        if self.val is not None:
            _check_fits(model, self.val, role, "the validation data (val)")

    def set_checkpointing(self, checkpoint, checkpoint_every, checkpoint_best, resume, config=None):
        """Checkpoint options of fit/distill/...; config: the scheme's settings (JSON-able), kept in
        the checkpoint and compared on resume."""
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__}")
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
        self.checkpoint_best = _check_bool("checkpoint_best", checkpoint_best)
        self.resume = _check_bool("resume", resume)
        if (self.resume or self.checkpoint_best) and self.checkpoint is None:
            raise ValueError("resume and checkpoint_best need checkpoint=<path>")
        self.run_config = dict(config or {})

    def config(self):
        """The run's settings as JSON-able values (stored in checkpoints)."""
        return dict(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, optimizer=repr(self.opt),
                    schedule=[type(self.sched).__name__, list(self.sched._tuple(self.opt.lr, self.epochs)),
                              self.sched._gamma()],
                    augment=dict(self.augment), label_smoothing=self.label_smoothing, drop_last=self.drop_last,
                    max_steps=self.max_steps, train_size=len(self.train), **self.run_config)

    def steps(self):
        n = len(self.train)
        steps = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(steps, self.max_steps or steps)

    def options(self, bar, seed_offset=0):
        return _train_options(self.batch_size, self.sched, self.opt.lr, self.epochs, self.seed + seed_offset,
                              self.augment, self.label_smoothing, self.drop_last, self.max_steps,
                              self.callback_every, bar, self.nonfinite)

    def loop(self, models, run_epoch, extra_metrics=None, history=None, optimizers=None, roles=None,
             extra_state=None):
        """Runs the epochs: run_epoch(epoch, train_options) -> dict of training metrics. After
        each epoch, validation metrics of models[0] (and extra_metrics()) join the row.

        Checkpointing (set_checkpointing): optimizers (one per model, None for a frozen one) and
        roles (names, e.g. "student", "sl0") say what a checkpoint holds; extra_state: arrays
        the scheme updates in place (learned gates), saved and restored with the models. With
        resume, training continues after the checkpoint's epoch. Every random draw derives from
        (seed, epoch, step), so resuming at an epoch boundary reproduces the uninterrupted run
        bit for bit (same seed, settings and thread count)."""
        hist = History() if history is None else history
        primary = models[0]
        primary.history = hist
        ck = None
        if self.checkpoint is not None:
            from .checkpoint import _RunCheckpoint
            ck = _RunCheckpoint(self, models, optimizers, roles, extra_state)
        start = ck.resume(hist) if ck is not None else 0
        for m in models:
            m.train()
            # evaluate() normalises an (X, y) tuple with these, as training did
            m.train_normalization = (self.train.mean, self.train.std)
        # track_weights: the parameter distance each epoch travels (Cheng et al.'s learning
        # speed, kdcore.explain.learning_dynamics); ||w_0|| is repeated in every row so that a
        # resumed run still knows it.
        w_prev = primary.net.params().astype(np.float64) if self.track_weights else None
        w0 = (hist["weight_norm0"][0] if hist.get("weight_norm0") else float(np.linalg.norm(w_prev))) \
            if self.track_weights else None
        if hasattr(self.callback, "on_train_begin"):   # kdcore.callbacks' protocol (EarlyStopping)
            self.callback.on_train_begin(list(models))
        for epoch in range(start, self.epochs):
            t0 = time.perf_counter()
            bar = _Progress(self.progress, epoch, self.epochs, self.steps())
            try:
                row = dict(epoch=epoch, **run_epoch(epoch, self.options(bar)))
            finally:
                bar.close()
            row["time"] = time.perf_counter() - t0
            if w_prev is not None:
                w = primary.net.params().astype(np.float64)
                row.update(weight_change=float(np.linalg.norm(w - w_prev)), weight_norm=float(np.linalg.norm(w)),
                           weight_norm0=w0)
                w_prev = w
            if self.val is not None:
                m = evaluate(primary, self.val, batch_size=max(self.batch_size, 256))
                row.update(val_loss=m["loss"], val_acc=m["accuracy"])
                if extra_metrics is not None:
                    row.update(extra_metrics())
                for m_ in models:
                    m_.train()
            hist.append(**row)
            saved = ck.after_epoch(epoch, hist) if ck is not None else False
            if self.progress:
                print(_epoch_line(row, self.epochs), file=sys.stderr)
            if self.callback is not None and self.callback(epoch, dict(row)):
                if ck is not None and not saved:   # stopping early: keep the last epoch
                    ck.save(epoch, hist, ck.path)
                break
        if hasattr(self.callback, "on_train_end"):
            self.callback.on_train_end(list(models))
        for m in models:
            m.eval()
        return hist


def fit(model, train, epochs=10, batch_size=128, optimizer="sgd", lr=None, schedule=None, augment=None,
        val=None, seed=0, progress=True, label_smoothing=0.0, drop_last=False, max_steps=None,
        callback=None, callback_every=20, keep_snapshots=(), checkpoint=None, checkpoint_every=1,
        checkpoint_best=False, resume=False, nonfinite="raise", track_weights=False):
    """Train ``model`` with softmax cross-entropy; returns a History.

    train / val: Dataset or (X, y); val is evaluated after each epoch (val_loss, val_acc), a
    val tuple normalised with the training set's mean/std. epochs: number of passes over
    train; batch_size: samples per step. optimizer: 'sgd' | 'adam' | 'adamw' or a kdcore.optim
    object (lr overrides its learning rate). seed: the shuffling, augmentation and dropout
    draws derive from it (and the epoch and step). progress: a per-step bar (tqdm if
    installed; none in a notebook without ipywidgets) and one line per epoch on stderr, epochs
    numbered from 1. label_smoothing: of the cross-entropy targets, as PyTorch's.
    drop_last: skip each epoch's last incomplete batch. callback_every: steps between the C
    loop's calls back into Python (progress updates and Ctrl-C checks). schedule: None (constant), 'cosine', or a
    kdcore.optim schedule (MultiStep, Cosine; warmup_epochs on either). augment: None, True
    (random crop with 2-pixel zero padding + horizontal flip) or a dict (crop_padding, hflip,
    noise_std, randaugment: operations per image of MLKD's RandAugment, docs/methods/mlkd.md). max_steps: stop each epoch after this many steps (quick experiments).
    callback(epoch, metrics) runs after each epoch; returning True stops training (see
    kdcore.callbacks: ``EarlyStopping(monitor="val_acc", patience=3, restore_best=True)``).
    keep_snapshots: epochs (0-based) after which a copy of the state dict is kept in
    ``history.snapshots[epoch]`` (early-stopped teachers, ESKD).
    checkpoint: a path; after every ``checkpoint_every`` epochs (and the last) the model, the
    optimizer state, the history, the epoch and the settings are saved there atomically
    (kdcore.save; a safetensors file). checkpoint_best: also save to "<name>-best<ext>" when
    the epoch is the best so far (highest val_acc; lowest train_loss without val).
    resume: if the checkpoint exists, restore it and continue with the next epoch; with the
    same settings, seed and thread count the result is bitwise the uninterrupted run's.
    (Snapshots kept before the interruption are not in the checkpoint.)
    Ctrl-C stops within a step: the model keeps the last completed step, KeyboardInterrupt
    propagates, and the history so far is in ``model.history``.
    nonfinite: what a step with a NaN/Inf loss term or gradient does. 'raise' (default): stop
    with RuntimeError naming the epoch, the step, the term and the network. 'skip': drop
    the step -- parameters, optimizer state, BN running statistics (and learned gates in
    distill) stay bitwise as before it -- and go on; the history's ``skipped_steps`` counts
    the dropped steps of each epoch, whose samples are left out of train_loss/train_acc.
    track_weights: log per epoch ``weight_change`` = ||w_e - w_(e-1)|| over all parameters,
    ``weight_norm`` = ||w_e|| and ``weight_norm0`` = ||w_0|| (the weights before training),
    for kdcore.explain.learning_dynamics.
    """
    _check_model(model)
    c = _Common(train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite)
    c.check(model, "model")
    c.track_weights = _check_bool("track_weights", track_weights)
    if not isinstance(keep_snapshots, (list, tuple, set, range)):
        raise TypeError(f"keep_snapshots must be a list of epochs, got {type(keep_snapshots).__name__}")
    snaps = {_check_int("keep_snapshots[]", e, 0) for e in keep_snapshots}
    copt = c.opt.bind(model)
    c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume, dict(scheme="fit"))
    hist = History()
    hist.snapshots = {}

    def run(epoch, topts):
        st = _kdcore.train_epoch(model.net, copt, c.train._c, epoch, topts)
        if epoch in snaps:
            hist.snapshots[epoch] = model.state_dict()
        return dict(train_loss=st["loss"], train_acc=st["accuracy"], lr=st["lr"], skipped_steps=st["skipped_steps"])

    return c.loop([model], run, history=hist, optimizers=[copt], roles=["model"])


def evaluate(model, data, batch_size=256):
    """Eval-mode loss and accuracy over a labelled dataset: {'loss': ..., 'accuracy': ...}.
    The model's train/eval mode is left as it was.

    data: a Dataset (normalised as it says), or an (X, y) tuple, normalised with the mean/std
    of the data the model was trained on (``model.train_normalization``, set by fit, distill
    and the other training entry points); for a model whose training normalisation is
    unknown (loaded from a file, say) the tuple is normalised with its own statistics, with
    a UserWarning."""
    _check_model(model)
    data = _model_dataset(model, data, "data")
    if data.y is None:
        raise ValueError("data has no labels; use kdcore.predict for logits")
    batch_size = _check_int("batch_size", batch_size, 1)
    _, loss, acc = _kdcore.evaluate(model.net, data._c, batch_size, logits=False)
    return {"loss": loss, "accuracy": acc}


def predict(model, X, batch_size=256):
    """Eval-mode outputs (logits) for X (a Dataset, or an array normalised like the model's
    training inputs), computed in batches in C."""
    _check_model(model)
    if isinstance(X, Dataset):
        data = X
    elif isinstance(X, np.ndarray):
        if X.dtype != np.float32:
            raise TypeError(f"X must have dtype float32 (or pass a kdcore Dataset), got {X.dtype}")
        data = from_arrays(X, None, normalize=None)
    else:
        raise TypeError(f"X must be a numpy array or a kdcore Dataset, got {type(X).__name__}")
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_fits(model, data, "model", "X")
    logits, _, _ = _kdcore.evaluate(model.net, data._c, batch_size, logits=True)
    return logits


class LRFind(tuple):
    """lr_find's result: ``lrs, losses, suggested_lr = kdcore.lr_find(...)``, also as
    attributes; ``.plot()`` draws the loss against the learning rate (log scale)."""

    def __new__(cls, lrs, losses, suggested_lr):
        return super().__new__(cls, (lrs, losses, suggested_lr))

    lrs = property(lambda self: self[0], doc="The learning rates tried, one per step (increasing).")
    losses = property(lambda self: self[1], doc="The smoothed training loss at each of them.")
    suggested_lr = property(lambda self: self[2], doc="A tenth of the lr with the lowest smoothed loss.")

    def plot(self, ax=None):
        """The smoothed loss against the learning rate (log x axis), the suggestion marked;
        returns the Axes."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(constrained_layout=True)
        ax.plot(self.lrs, self.losses)
        ax.axvline(self.suggested_lr, color="gray", linestyle="--", label=f"suggested lr {self.suggested_lr:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss (smoothed)")
        ax.legend()
        return ax


def lr_find(model, data, min_lr=1e-6, max_lr=1.0, steps=200, batch_size=128, optimizer="sgd", seed=0,
            augment=None, smoothing=0.98, diverge=4.0):
    """Learning-rate range test (Smith 2017; fastai's lr_find): ``steps`` training steps of
    cross-entropy with the learning rate rising exponentially from ``min_lr`` to ``max_lr``,
    each step in C (``kdcore.fit``'s epoch loop, one step per lr), on ``data`` (a Dataset or
    (X, y)) in batches of ``batch_size``, with ``augment`` and ``seed`` as in fit. Returns
    ``(lrs, losses, suggested_lr)`` (an LRFind, with ``.plot()``): the losses are an
    exponential moving average (``smoothing``, bias-corrected) of the step losses; the test
    stops early once the smoothed loss exceeds ``diverge`` times its minimum or a step is not
    finite. suggested_lr is a tenth of the lr at the lowest smoothed loss, a usual starting
    point. The model's weights, BN statistics and train/eval mode are put back exactly as
    they were (the optimizer is a fresh one of the given recipe, its lr overridden)."""
    _check_model(model)
    data = _as_dataset(data, "data")
    if data.y is None:
        raise ValueError("data has no labels (y is None); lr_find trains on labelled data")
    _check_fits(model, data, "model")
    min_lr = _check_float("min_lr", min_lr, 0, lo_open=True)
    max_lr = _check_float("max_lr", max_lr, min_lr, lo_open=True)
    steps = _check_int("steps", steps, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    smoothing = _check_float("smoothing", smoothing, 0, 1, hi_open=True)
    diverge = _check_float("diverge", diverge, 1, lo_open=True)
    opt = make_optimizer(optimizer)
    aug = _augment_kwargs(augment)
    sched = make_schedule(None)
    before, training, fwd = model.state_dict(), model.training, model._step
    lrs, losses = [], []
    avg, best = 0.0, float("inf")
    try:
        model.train()
        copt = opt.bind(model)
        for i, lr in enumerate(np.geomspace(min_lr, max_lr, steps)):
            # One step per call: the epoch index varies the batch; the lr is the schedule's base.
            topts = _train_options(batch_size, sched, float(lr), 1, seed, aug, 0.0, False, 1, 1, None, "skip")
            st = _kdcore.train_epoch(model.net, copt, data._c, i, topts)
            loss = st["loss"]
            if st["skipped_steps"] or not np.isfinite(loss):
                break
            avg = smoothing * avg + (1 - smoothing) * loss
            smooth = avg / (1 - smoothing ** (i + 1))
            lrs.append(float(lr))
            losses.append(float(smooth))
            best = min(best, smooth)
            if smooth > diverge * best:
                break
    finally:
        model.load_state_dict(before)
        model.train(training)
        model._step = fwd
    if not losses:
        raise RuntimeError(f"lr_find: the first step (lr {min_lr:g}) was not finite; lower min_lr")
    suggested = lrs[int(np.argmin(losses))] / 10
    return LRFind(np.array(lrs), np.array(losses), suggested)
