"""Multi-stage distillation schemes: born-again generations (BAN, tolerant teacher), teacher
assistants (TAKD), densely guided assistants (DGKD), snapshot distillation, early-stopped
teachers (ESKD) and teacher-free KD (Tf-KD). Python only orchestrates the stages; every epoch
runs in C through ``fit`` / ``distill``.

Conventions shared by every scheme:

* The distillation weights are ``distill``'s: loss = ce_weight * CE(y, z_s) + kd_weight *
  T^2 KL(p_t^T || p_s^T) for method 'kd' (see ``kdcore.distill``); each scheme documents its
  defaults and what each weight multiplies.
* ``**fit_kw`` are the training options passed unchanged to every stage: batch_size,
  optimizer, lr, schedule, augment, progress, label_smoothing, drop_last, max_steps,
  callback, callback_every, nonfinite ('raise' or 'skip', see ``kdcore.fit``). ``distill_kw`` (a dict) passes further ``distill`` options
  (warmup_epochs, conditional, cache, alpha/beta for DKD, ...) to the distillation stages.
* Stage i of a scheme (0 = the first model trained) uses the training seed ``seed + i``.
* Each stage logs its own History; with ``val`` every History has val_acc per epoch.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np

from .distill import distill
from .functional import virtual_teacher
from .nn import Module, _check_float, _check_int, _is_choice
from .training import History, _as_dataset, _check_model, fit, predict

__all__ = ["born_again", "takd", "dgkd", "snapshot_distill", "eskd", "tf_kd",
           "BornAgainResult", "TAKDResult", "DGKDResult", "SnapshotResult", "ESKDResult", "TfKDResult"]

# tf_kd's alpha and T when not given, per mode (the authors' code).
_TF_KD_DEFAULTS = {"self": dict(alpha=0.95, T=6.0), "virtual": dict(alpha=0.1, T=20.0)}

_FIT_KEYS = ("batch_size", "optimizer", "lr", "schedule", "augment", "progress", "label_smoothing", "drop_last",
             "max_steps", "callback", "callback_every", "nonfinite")


# ---- results ---------------------------------------------------------------------------

@dataclass
class BornAgainResult:
    """models[k] is generation k (models[0] trained on labels only); histories[k] its
    History. With ``val``: val_acc[k] is generation k's accuracy and ensemble_val_acc[k] the
    accuracy of the mean of the logits of generations 0..k."""
    models: list
    histories: list
    val_acc: list | None = None
    ensemble_val_acc: list | None = None

    @property
    def model(self):
        """The last generation."""
        return self.models[-1]

    def ensemble_logits(self, X, upto=None, batch_size=256):
        """Mean of the eval-mode logits of generations 0..upto (default: all) on X."""
        n = len(self.models) if upto is None else _check_int("upto", upto, 0) + 1
        if n > len(self.models):
            raise ValueError(f"upto must be < {len(self.models)}, got {upto}")
        return np.mean([predict(m, X, batch_size=batch_size) for m in self.models[:n]], axis=0).astype(np.float32)


@dataclass
class TAKDResult:
    """assistant_histories[i]: History of assistants[i] (distilled from the model before it in
    the chain); student_history: the student's, distilled from the last assistant."""
    assistants: list
    student: Module
    assistant_histories: list
    student_history: History

    @property
    def assistant_history(self):
        return self.assistant_histories[0]

    @property
    def histories(self):
        return list(self.assistant_histories) + [self.student_history]


@dataclass
class DGKDResult:
    """teacher_sets[i] names the guidance models of stage i ('teacher', 'assistant0', ...);
    the stages are the assistants in order, then the student (the last entry)."""
    assistants: list
    student: Module
    assistant_histories: list
    student_history: History
    teacher_sets: list

    @property
    def histories(self):
        return list(self.assistant_histories) + [self.student_history]


@dataclass
class SnapshotResult:
    """model: the trained model; teachers[l-1]: the frozen snapshot (taken at the end of
    cycle l-1) that taught cycle l; histories[l]: cycle l's History; history: all cycles
    in one History (global ``epoch``, plus ``cycle``; metrics a cycle lacks are NaN)."""
    model: Module
    teachers: list
    histories: list
    history: History
    cycle_val_acc: list | None = None


@dataclass
class ESKDResult:
    """teacher: the early-stopped teacher (a copy holding the chosen weights);
    teacher_history: the teacher's training History (None when a checkpoint was given);
    student_history: the student's distillation History."""
    teacher: Module
    teacher_history: History | None
    student_history: History
    stop_epoch: int | None = None


@dataclass
class TfKDResult:
    """mode 'self': teacher is the pretrained copy, teacher_history its History. mode
    'virtual': teacher is the (N, K) array passed to distill as teacher logits (see form),
    teacher_history is None."""
    student: Module
    teacher: object
    teacher_history: History | None
    student_history: History
    mode: str = "self"
    form: str | None = None
    settings: dict = field(default_factory=dict)


# ---- argument checks -------------------------------------------------------------------

def _check_fit_kw(fit_kw, exclude=()):
    for k in fit_kw:
        if k not in _FIT_KEYS or k in exclude:
            allowed = sorted(set(_FIT_KEYS) - set(exclude))
            raise TypeError(f"unexpected keyword argument {k!r}; training options are {allowed}")
    return dict(fit_kw)


_DISTILL_PARAMS = set(inspect.signature(distill).parameters)


def _check_distill_kw(distill_kw, scheme_sets):
    if distill_kw is None:
        return {}
    if not isinstance(distill_kw, dict):
        raise TypeError(f"distill_kw must be a dict, got {type(distill_kw).__name__}")
    fixed = {"student", "teacher", "train", "epochs", "val", "seed"} | set(scheme_sets) | set(_FIT_KEYS)
    for k in distill_kw:
        if k not in _DISTILL_PARAMS:
            raise TypeError(f"distill_kw: distill has no option {k!r}")
        if k in fixed:
            where = "**fit_kw" if k in _FIT_KEYS else "the scheme's own argument"
            raise TypeError(f"distill_kw: {k!r} is set through {where}, not distill_kw")
    return dict(distill_kw)


def _opt_float(name, v, lo=None, hi=None, lo_open=False, hi_open=False):
    return None if v is None else _check_float(name, v, lo, hi, lo_open=lo_open, hi_open=hi_open)


def _check_method(method):
    if not isinstance(method, str) or method not in ("kd", "dkd", "mse"):
        raise ValueError(f"method must be 'kd', 'dkd' or 'mse', got {method!r}")
    return method


def _check_distinct(named):
    """named: list of (name, model); every model a Module, no object twice."""
    seen = {}
    for name, m in named:
        if not isinstance(m, Module):
            raise TypeError(f"{name} must be a kdcore.nn.Module, got {type(m).__name__}")
        if id(m) in seen:
            raise ValueError(f"{name} and {seen[id(m)]} are the same model object; use .copy() or .fresh()")
        seen[id(m)] = name


def _model_list(name, v):
    items = [v] if isinstance(v, Module) else list(v) if isinstance(v, (list, tuple)) else None
    if items is None:
        raise TypeError(f"{name} must be a kdcore model or a list of models, got {type(v).__name__}")
    if not items:
        raise ValueError(f"{name}: give at least one model")
    return items


def _datasets(train, val):
    train = _as_dataset(train, "train")
    return train, None if val is None else _as_dataset(val, "val", like=train)


def _accuracy(logits, y):
    return float(np.mean(np.asarray(logits).argmax(1) == y))


def _concat_histories(histories, tag):
    keys = []
    for h in histories:
        keys += [k for k in h if k not in keys]
    out = History()
    e = 0
    for i, h in enumerate(histories):
        for j in range(h.epochs):
            row = {k: (h[k][j] if k in h and len(h[k]) > j else math.nan) for k in keys}
            row["epoch"] = e
            row[tag] = i
            out.append(**row)
            e += 1
    return out


# ---- born-again networks ---------------------------------------------------------------

def born_again(model, train, generations=3, epochs=10, T=1.0, ce_weight=1.0, kd_weight=1.0, val=None,
               tolerant=None, seed=0, distill_kw=None, **fit_kw):
    """Born-again networks (BAN, Furlanello et al. 2018), optionally with a tolerant first teacher (Yang et al. 2019).

    ``model`` is a template and is not trained: generation k is ``model.fresh(seed + k)``,
    trained with the training seed ``seed + k``.
    * Generation 0 learns from the labels: plain ``fit`` (cross-entropy, weight 1), or with
      ``tolerant=(w, K)`` ``distill(method='ce', tolerant=(w, K))``: CE + w * [z_(1) - mean of
      z_(2..K)] (Wang & Yoon's review, eq. 8 with alpha = 1, beta = w). Only generation 0 gets the
      tolerant term (eq. 8 is the teacher's loss); later generations use plain KD.
    * Generation k >= 1 distils from generation k-1 (its logits): loss = ce_weight *
      CE(y, p_k) + kd_weight * T^2 KL(p_{k-1}^T || p_k^T). Defaults ce_weight = kd_weight = 1,
      T = 1: G1's CE(y, p_k) + KL(p_{k-1}^tau || p_k^tau).
    The CWTM / DKPP variants are not implemented.

    Returns a BornAgainResult: models, histories and, with ``val``, each generation's
    accuracy (val_acc) and the accuracy of the ensemble of generations 0..k (mean of logits)
    after each generation k (ensemble_val_acc).
    """
    _check_model(model)
    generations = _check_int("generations", generations, 1)
    epochs = _check_int("epochs", epochs, 1)
    seed = _check_int("seed", seed, 0)
    T = _check_float("T", T, 0, lo_open=True)
    ce_weight = _check_float("ce_weight", ce_weight, 0)
    kd_weight = _check_float("kd_weight", kd_weight, 0)
    if tolerant is not None:
        if not isinstance(tolerant, (tuple, list)) or len(tolerant) != 2:
            raise TypeError("tolerant must be None or a pair (weight, K)")
        tolerant = (_check_float("tolerant weight", tolerant[0], 0), _check_int("tolerant K", tolerant[1], 2))
    fit_kw = _check_fit_kw(fit_kw)
    dkw = _check_distill_kw(distill_kw, {"method", "T", "ce_weight", "kd_weight"})
    train, val = _datasets(train, val)

    models, histories, accs, ens_accs = [], [], [], []
    z_sum = None
    for k in range(generations):
        m = model.fresh(seed + k)
        if k == 0 and tolerant is None:
            h = fit(m, train, epochs=epochs, val=val, seed=seed, **fit_kw)
        elif k == 0:
            h = distill(m, None, train, method="ce", epochs=epochs, val=val, seed=seed, tolerant=tolerant,
                        **fit_kw)
        else:
            h = distill(m, models[k - 1], train, method="kd", epochs=epochs, val=val, seed=seed + k, T=T,
                        ce_weight=ce_weight, kd_weight=kd_weight, **fit_kw, **dkw)
        models.append(m)
        histories.append(h)
        if val is not None:
            z = predict(m, val, batch_size=512).astype(np.float64)
            z_sum = z if z_sum is None else z_sum + z
            accs.append(_accuracy(z, val.y))
            ens_accs.append(_accuracy(z_sum / (k + 1), val.y))
    return BornAgainResult(models, histories, accs if val is not None else None,
                           ens_accs if val is not None else None)


# ---- teacher assistants ----------------------------------------------------------------

def takd(teacher, assistant, student, train, epochs=10, assistant_epochs=None, method="kd", T=None,
         ce_weight=None, kd_weight=None, val=None, seed=0, distill_kw=None, **fit_kw):
    """Teacher-assistant KD (TAKD, Mirzadeh et al. 2020): the trained ``teacher`` teaches the
    ``assistant`` (distill, ``assistant_epochs`` epochs, default ``epochs``), then the
    assistant teaches the ``student`` (``epochs`` epochs). ``assistant`` may be a list,
    ordered large to small: a longer chain T -> A1 -> A2 -> ... -> S.

    Each step is ``distill(method=method)`` with its weights: for 'kd', loss = ce_weight *
    CE + kd_weight * T^2 KL(p_teacher^T || p^T), defaults distill's (0.1, 0.9, T=4). The
    assistants and the student are trained in place from their current weights; the teacher
    is not changed. Returns a TAKDResult (assistant_histories, student_history).
    """
    assistants = _model_list("assistant", assistant)
    _check_distinct([("teacher", teacher)] + [(f"assistant[{i}]", a) for i, a in enumerate(assistants)]
                    + [("student", student)])
    epochs = _check_int("epochs", epochs, 1)
    a_epochs = epochs if assistant_epochs is None else _check_int("assistant_epochs", assistant_epochs, 1)
    seed = _check_int("seed", seed, 0)
    method = _check_method(method)
    kw = dict(method=method, T=_opt_float("T", T, 0, lo_open=True),
              ce_weight=_opt_float("ce_weight", ce_weight, 0), kd_weight=_opt_float("kd_weight", kd_weight, 0))
    fit_kw = _check_fit_kw(fit_kw)
    dkw = _check_distill_kw(distill_kw, set(kw))
    train, val = _datasets(train, val)
    hists = []
    prev = teacher
    for i, a in enumerate(assistants):
        hists.append(distill(a, prev, train, epochs=a_epochs, val=val, seed=seed + i, **kw, **fit_kw, **dkw))
        prev = a
    hs = distill(student, prev, train, epochs=epochs, val=val, seed=seed + len(assistants), **kw, **fit_kw, **dkw)
    return TAKDResult(assistants, student, hists, hs)


def dgkd(teacher, assistants, student, train, teacher_drop=0.5, epochs=10, assistant_epochs=None, method="kd",
         T=None, ce_weight=None, kd_weight=None, val=None, seed=0, distill_kw=None, **fit_kw):
    """Densely guided KD (DGKD, Son et al. 2021): ``assistants`` ordered from large to small;
    assistant i distils from the teacher and assistants 0..i-1, the student from the teacher
    and all assistants. Each stage is ``distill(..., multi='avg_loss',
    teacher_drop=teacher_drop)``: loss = ce_weight * CE + kd_weight * mean over the kept
    guidance models of their KD terms (T^2 KL for 'kd'); each guidance model is dropped
    independently with probability ``teacher_drop`` at every step (at least one is kept).
    Weights default to distill's (0.1, 0.9, T=4). teacher_drop=0.5 is our default, not a
    value from the paper; 0 gives DGKD without stochastic teaching. The paper sums the KD
    terms; here they are averaged over the kept guides (scale kd_weight to compare).

    The assistants and the student are trained in place (``assistant_epochs``, default
    ``epochs``). Returns a DGKDResult with each stage's History and ``teacher_sets``.
    """
    assistants = _model_list("assistants", assistants)
    _check_distinct([("teacher", teacher)] + [(f"assistants[{i}]", a) for i, a in enumerate(assistants)]
                    + [("student", student)])
    teacher_drop = _check_float("teacher_drop", teacher_drop, 0, 1, hi_open=True)
    epochs = _check_int("epochs", epochs, 1)
    a_epochs = epochs if assistant_epochs is None else _check_int("assistant_epochs", assistant_epochs, 1)
    seed = _check_int("seed", seed, 0)
    method = _check_method(method)
    kw = dict(method=method, T=_opt_float("T", T, 0, lo_open=True),
              ce_weight=_opt_float("ce_weight", ce_weight, 0), kd_weight=_opt_float("kd_weight", kd_weight, 0),
              multi="avg_loss", teacher_drop=teacher_drop)
    fit_kw = _check_fit_kw(fit_kw)
    dkw = _check_distill_kw(distill_kw, set(kw))
    train, val = _datasets(train, val)
    guides, names = [teacher], ["teacher"]
    hists, sets = [], []
    for i, a in enumerate(assistants):
        sets.append(list(names))
        hists.append(distill(a, list(guides), train, epochs=a_epochs, val=val, seed=seed + i, **kw, **fit_kw, **dkw))
        guides.append(a)
        names.append(f"assistant{i}")
    sets.append(list(names))
    hs = distill(student, list(guides), train, epochs=epochs, val=val, seed=seed + len(assistants), **kw, **fit_kw,
                 **dkw)
    return DGKDResult(assistants, student, hists, hs, sets)


# ---- snapshot distillation -------------------------------------------------------------

def snapshot_distill(model, train, cycles=3, epochs_per_cycle=10, T=None, ce_weight=None, kd_weight=None,
                     min_lr=0.0, val=None, seed=0, distill_kw=None, **fit_kw):
    """Snapshot distillation (Yang et al. 2019; Wang & Yoon's review, eq. 6 with the student/teacher typo
    fixed): one model, trained in place over ``cycles`` cosine learning-rate cycles of
    ``epochs_per_cycle`` epochs each (SGDR: the lr restarts at its base value, anneals to
    ``min_lr``). Cycle 0 trains with cross-entropy only; in cycle l >= 1 the teacher is a
    frozen copy of the model taken at the end of cycle l-1, and the loss is
    ce_weight * CE(y, p_s^l) + kd_weight * T^2 KL(p_{l-1}^T || p_s^l^T), i.e. eq. 6's
    alpha = ce_weight, beta = kd_weight (KL instead of H: they differ by the teacher's
    entropy, a constant). Defaults: distill's KD defaults (0.1, 0.9, T=4).

    Schedule: each cycle is one ``distill`` call with ``kdcore.optim.Cosine(T_max =
    epochs_per_cycle, min_lr)``, which restarts by construction; the lr values are exactly
    those of ``kdcore.optim.Cyclic(epochs_per_cycle, min_lr)`` over the whole run. The
    optimizer state (momentum) restarts with each cycle. The lr is the optimizer's (or
    ``lr=``); ``schedule`` cannot be given. Cycle l uses the training seed ``seed + l``.

    Returns a SnapshotResult (model, teachers, per-cycle histories, merged history and, with
    ``val``, the accuracy at the end of each cycle).
    """
    from .optim import Cosine
    _check_model(model)
    cycles = _check_int("cycles", cycles, 1)
    epochs_per_cycle = _check_int("epochs_per_cycle", epochs_per_cycle, 1)
    seed = _check_int("seed", seed, 0)
    min_lr = _check_float("min_lr", min_lr, 0)
    kw = dict(T=_opt_float("T", T, 0, lo_open=True), ce_weight=_opt_float("ce_weight", ce_weight, 0),
              kd_weight=_opt_float("kd_weight", kd_weight, 0))
    fit_kw = _check_fit_kw(fit_kw, exclude=("schedule",))
    dkw = _check_distill_kw(distill_kw, {"method", "schedule"} | set(kw))
    train, val = _datasets(train, val)
    sched = Cosine(T_max=epochs_per_cycle, min_lr=min_lr)
    teachers, hists, accs = [], [], []
    for cyc in range(cycles):
        if cyc == 0:
            h = distill(model, None, train, method="ce", epochs=epochs_per_cycle, schedule=sched, val=val, seed=seed,
                        **fit_kw)
        else:
            t = model.copy()
            t.eval()
            teachers.append(t)
            h = distill(model, t, train, method="kd", epochs=epochs_per_cycle, schedule=sched, val=val,
                        seed=seed + cyc, **kw, **fit_kw, **dkw)
        hists.append(h)
        if val is not None:
            accs.append(h["val_acc"][-1])
    merged = _concat_histories(hists, "cycle")
    model.history = merged
    return SnapshotResult(model, teachers, hists, merged, accs if val is not None else None)


# ---- early-stopped teacher -------------------------------------------------------------

def eskd(teacher, student, train, teacher_epochs=None, stop_epoch=None, checkpoint=None, epochs=10, method="kd",
         T=None, ce_weight=None, kd_weight=None, kd_stop_epoch=None, val=None, seed=0, distill_kw=None, **fit_kw):
    """Early-stopped teacher KD (ESKD, Cho and Hariharan 2019).

    The teacher's weights after ``stop_epoch`` epochs (1-based count: the state after epoch
    index stop_epoch - 1) come from one of:
    * ``teacher_epochs``: ``teacher`` is trained here with ``fit`` for teacher_epochs epochs
      (training seed ``seed``), keeping the snapshot after stop_epoch epochs
      (1 <= stop_epoch <= teacher_epochs); ``teacher`` ends fully trained;
    * ``checkpoint``: a state dict to load into a copy of ``teacher``;
    * neither: ``teacher.history.snapshots[stop_epoch - 1]`` from an earlier
      ``fit(teacher, ..., keep_snapshots=[stop_epoch - 1])``.
    The student then distils from a copy of ``teacher`` holding those weights (``epochs``
    epochs, seed ``seed + 1``): loss = ce_weight * CE + w_e * kd_weight * (KD term of
    ``method``; T^2 KL for 'kd'), with w_e = 1 before ``kd_stop_epoch`` and 0 from that
    (0-based) epoch on ("stop KD near convergence"; None = never). Weights default to
    distill's (0.1, 0.9, T=4).

    Returns an ESKDResult (early-stopped teacher copy, teacher and student Histories).
    """
    _check_distinct([("teacher", teacher), ("student", student)])
    epochs = _check_int("epochs", epochs, 1)
    seed = _check_int("seed", seed, 0)
    method = _check_method(method)
    kw = dict(method=method, T=_opt_float("T", T, 0, lo_open=True),
              ce_weight=_opt_float("ce_weight", ce_weight, 0), kd_weight=_opt_float("kd_weight", kd_weight, 0),
              kd_stop_epoch=None if kd_stop_epoch is None else _check_int("kd_stop_epoch", kd_stop_epoch, 1))
    fit_kw = _check_fit_kw(fit_kw)
    dkw = _check_distill_kw(distill_kw, set(kw))
    if stop_epoch is not None:
        stop_epoch = _check_int("stop_epoch", stop_epoch, 1)
    if checkpoint is not None:
        if teacher_epochs is not None:
            raise ValueError("teacher_epochs: give either teacher_epochs (train the teacher here) or checkpoint")
        if not hasattr(checkpoint, "items"):
            raise TypeError(f"checkpoint must be a state dict (mapping), got {type(checkpoint).__name__}")
    elif teacher_epochs is not None:
        teacher_epochs = _check_int("teacher_epochs", teacher_epochs, 1)
        if stop_epoch is None:
            raise ValueError("stop_epoch is required with teacher_epochs")
        if stop_epoch > teacher_epochs:
            raise ValueError(f"stop_epoch must be <= teacher_epochs ({teacher_epochs}), got {stop_epoch}")
    else:
        if stop_epoch is None:
            raise ValueError("stop_epoch: give teacher_epochs and stop_epoch, a checkpoint, or stop_epoch with a "
                             "teacher fitted with keep_snapshots")
        snaps = getattr(getattr(teacher, "history", None), "snapshots", None) or {}
        if stop_epoch - 1 not in snaps:
            raise ValueError(f"stop_epoch: teacher.history.snapshots has no entry {stop_epoch - 1} "
                             f"(have {sorted(snaps)}); fit the teacher with keep_snapshots=[{stop_epoch - 1}]")
        checkpoint = snaps[stop_epoch - 1]
    train, val = _datasets(train, val)
    t_hist = None
    if teacher_epochs is not None:
        t_hist = fit(teacher, train, epochs=teacher_epochs, val=val, seed=seed, keep_snapshots=[stop_epoch - 1],
                     **fit_kw)
        if stop_epoch - 1 not in t_hist.snapshots:
            raise RuntimeError(f"the teacher's training stopped after {t_hist.epochs} epochs, before stop_epoch "
                               f"({stop_epoch}); no snapshot to distil from")
        checkpoint = t_hist.snapshots[stop_epoch - 1]
    early = teacher.copy()
    early.load_state_dict(checkpoint)
    early.eval()
    hs = distill(student, early, train, epochs=epochs, val=val, seed=seed + 1, **kw, **fit_kw, **dkw)
    return ESKDResult(early, t_hist, hs, stop_epoch)


# ---- teacher-free KD -------------------------------------------------------------------

def tf_kd(student, train, mode="self", epochs=10, teacher_epochs=None, teacher=None, alpha=None, T=None, a=0.99,
          multiplier=None, form=None, num_classes=None, val=None, seed=0, distill_kw=None, **fit_kw):
    """Teacher-free KD (Yuan et al. 2020). The student is trained in place.

    Loss, both modes: (1 - alpha) * CE(y, z_s) + alpha * (multiplier / K) * (KD term), so
    ``distill``'s ce_weight = 1 - alpha, kd_weight = alpha * multiplier / K. The authors'
    code multiplies a KLDivLoss averaged over batch *and* classes (K) by ``multiplier``;
    multiplier=None means K, i.e. a batch-mean KL (the paper's form).

    mode='self' (Tf-KD_self, N2): a copy of the student (same weights) is pretrained with
    ``fit`` for ``teacher_epochs`` epochs (default ``epochs``, seed ``seed``) unless a trained
    ``teacher`` is given; then the student learns from it (seed ``seed + 1``) with KD term
    T^2 KL(p_t^T || p_s^T). Defaults alpha = 0.95, T = 6 (authors' code; their other value
    is T = 20).

    mode='virtual' (Tf-KD_reg, N3): the teacher is hand-made,
    p^d = functional.virtual_teacher(y, K, a) (a at the label, (1-a)/(K-1) elsewhere),
    passed to distill as cached teacher logits. Defaults alpha = 0.1, T = 20, a = 0.99.
    * form='code' (default; the authors' code): KD term = KL(softmax(p^d / T) || softmax(z_s)),
      student at T = 1: distill gets teacher logits p^d / T and runs at T = 1.
    * form='paper': KD term = T^2 KL(softmax(log p^d / T) || softmax(z_s / T)) (p^d softened
      by T): distill gets teacher logits log p^d and runs at T.
    K = ``num_classes`` (default: train.num_classes).

    Returns a TfKDResult (student, teacher model or teacher-logit array, Histories, settings).
    """
    _check_model(student)
    if not _is_choice(mode, ("self", "virtual")):
        raise ValueError(f"mode must be 'self' or 'virtual', got {mode!r}")
    epochs = _check_int("epochs", epochs, 1)
    seed = _check_int("seed", seed, 0)
    virtual = mode == "virtual"
    d = _TF_KD_DEFAULTS[mode]
    alpha = _check_float("alpha", d["alpha"] if alpha is None else alpha, 0, 1)
    T = _check_float("T", d["T"] if T is None else T, 0, lo_open=True)
    fit_kw = _check_fit_kw(fit_kw)
    dkw = _check_distill_kw(distill_kw, {"method", "T", "ce_weight", "kd_weight"})
    train, val = _datasets(train, val)
    K = train.num_classes if num_classes is None else _check_int("num_classes", num_classes, 2)
    if K < 2:
        raise ValueError(f"num_classes must be >= 2, got {K}")
    multiplier = float(K) if multiplier is None else _check_float("multiplier", multiplier, 0)
    ce_w, kd_w = 1.0 - alpha, alpha * multiplier / K
    settings = dict(alpha=alpha, T=T, multiplier=multiplier, num_classes=K, ce_weight=ce_w, kd_weight=kd_w)
    if not virtual:
        if form is not None:
            raise ValueError("form applies to mode='virtual' only")
        if teacher is not None:
            if teacher_epochs is not None:
                raise ValueError("teacher_epochs: a trained teacher was given; leave teacher_epochs None")
            _check_distinct([("teacher", teacher), ("student", student)])
            t_hist = None
        else:
            t_epochs = epochs if teacher_epochs is None else _check_int("teacher_epochs", teacher_epochs, 1)
            teacher = student.copy()
            t_hist = fit(teacher, train, epochs=t_epochs, val=val, seed=seed, **fit_kw)
        hs = distill(student, teacher, train, method="kd", epochs=epochs, val=val, seed=seed + 1, T=T,
                     ce_weight=ce_w, kd_weight=kd_w, **fit_kw, **dkw)
        return TfKDResult(student, teacher, t_hist, hs, mode, None, settings)
    if teacher is not None:
        raise ValueError("teacher: mode='virtual' builds its own teacher; leave teacher None")
    if teacher_epochs is not None:
        raise ValueError("teacher_epochs applies to mode='self' only")
    form = "code" if form is None else form
    if not _is_choice(form, ("code", "paper")):
        raise ValueError(f"form must be 'code' or 'paper', got {form!r}")
    if train.y is None:
        raise ValueError("train has no labels")
    a = _check_float("a", a, 0, 1, lo_open=True, hi_open=True)
    q = virtual_teacher(train.y, K, a)
    if form == "code":
        zt, T_run = (q / np.float32(T)).astype(np.float32), 1.0
    else:
        zt, T_run = np.log(q).astype(np.float32), T
    settings.update(a=a, T_distill=T_run)
    hs = distill(student, zt, train, method="kd", epochs=epochs, val=val, seed=seed, T=T_run, ce_weight=ce_w,
                 kd_weight=kd_w, **fit_kw, **dkw)
    return TfKDResult(student, zt, None, hs, mode, form, settings)
