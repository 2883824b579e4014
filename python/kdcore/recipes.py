"""Recipes: one distillation experiment described in YAML, run once per seed into a folder.

    recipe = kdcore.recipes.load("recipes/kd.yaml", sets=["epochs=2"])   # validated, defaults filled
    kdcore.recipes.run_one(recipe, seed=0, out="runs")                   # -> runs/kd/seed-0/
    kdcore.recipes.report("runs")                                        # rows: mean/std per (recipe, method)
    kdcore.recipes.compare("runs", baseline="scratch")                   # paired differences to a baseline

The command line (``python -m kdcore run|report``, kdcore/__main__.py) is a thin layer over
these functions. A recipe (every key but ``method`` optional; defaults are kdcore's):

    name: kd                       # the run folder's name (default: the file's stem)
    teacher:                       # a zoo model trained here and cached by its configuration,
      model: resnet8x4             #   or loaded: checkpoint: path (a kdcore checkpoint, or a
      epochs: 8                    #   PyTorch .pt/.pth state dict, torch_key: nested key)
      optimizer: sgd               # training keys of the teacher: epochs, optimizer, lr,
      lr: 0.1                      #   schedule, batch_size, augment, train_size, seed
      schedule: cosine
      augment: true                #   snapshot: N, the teacher after N of its epochs (ESKD);
                                   #   seed: [0, 1, 2], one teacher per seed (multi-teacher KD)
    student: {model: resnet8}      # zoo name; width (cnn), hidden/dropout/batchnorm (mlp)
    data:
      source: fashion_mnist        # or an .npz file with X_train, y_train, X_test, y_test (and
                                   #   optionally mean, std: both sets' normalisation, per channel
                                   #   on the [0, 1] pixel scale, instead of X_train's own)
      train_size: 6000             # the student's labelled images, drawn with the seed
      repeat: 4                    # each drawn training image 4 times per epoch (default 1), so
                                   #   that a small transfer set takes as many steps per epoch
      val_split: 5000              # carved from the training set with the seed (int or fraction)
      test_size: null              # the first N test images (all by default)
    method: kd                     # scratch, any kdcore.losses.METHODS name, mutual, slkd, tf_kd_reg,
                                   #   tf_kd_self, born_again, snapshot_distill
    options: {T: 4}                # keyword arguments of the training function, checked; slkd's
                                   #   sl_optimizer: a name or {name, lr, momentum, ...}
    losses:                        # instead of a method's reference terms: kdcore.losses terms
      - {kind: CE, weight: 1}
      - {kind: AT, weight: 1000, p: 2}
    optimizer: {name: sgd, momentum: 0.9, weight_decay: 5.0e-4}
    lr: 0.1
    schedule: cosine               # constant, cosine, or {name: multistep, milestones: [4, 6]}
    epochs: 8
    batch_size: 128
    augment: false                 # true (crop 2 + flip) or {crop_padding, hflip, noise_std, randaugment}
    seeds: [0, 1, 2]

The whole schema is ``SCHEMA`` below; ``load`` refuses unknown keys and wrong types with the
key's path (``kd.yaml: student.width: expected an int >= 1, got 'wide'``).

Per seed, the run trains the student from initial weights drawn with that seed on the
training subset drawn with that seed, measures it on the test set after every epoch, and
writes (``run_one``) the resolved recipe (``config.yaml``, rerunnable as it stands), the
History (``history.csv``, ``history.json``), the student (``student.safetensors``,
kdcore.save, as after the last epoch), the final numbers (``metrics.json``) and the
environment (``env.txt``); ``done.json`` is written last, atomically, and marks the run
finished: a rerun of the same configuration skips it. Methods that train models before the
student (tf_kd_self's pretrained copy, born_again's earlier generations) also write each of
them (``stage-<k>.safetensors``, k from 0) and their test accuracies after their last epochs
(``stage_last_test_acc`` in metrics.json, the student's last).

Measured per epoch (History columns, from the training function's per-epoch callback): the
training function's own columns (``train_loss``, ..., and ``val_acc``/``val_loss`` when the
recipe has ``val_split``), and from one eval-mode forward of the student over the test set
``test_acc``, ``test_nll`` (mean -log p(label)) and ``test_ece`` (15 equal-width bins), as
kdcore.metrics.calibration computes them; with a teacher also ``test_agreement`` (top-1
agreement) and ``test_kl`` (KL(p_s || p_t) at T=1, as kdcore.metrics.kl_divergence), against
the teacher's test logits computed once before training.

Best epoch: the epoch of highest validation accuracy when the recipe has ``val_split``, else
of highest test accuracy (as RepDistiller and mdistiller report it: an optimistic number);
``metrics.json`` says which (``best_selected_on``; ``best_val_acc``). Epochs count from 0, as
in the History. ``metrics.json`` holds each per-epoch test number at that epoch and at the
last one: ``best_test_acc``, ``best_test_nll``, ``best_test_ece``, ``best_test_agreement``,
``best_test_kl`` and their ``last_`` forms (agreement and KL only with a teacher);
``test_acc`` is the final student's (the last epoch's), ``report`` kdcore.metrics.report of
the final student against the teacher. ``time`` and ``cpu_time``: the run's wall-clock and
CPU seconds (the process's, every thread), preparation and per-epoch measurements included;
``teacher.cpu_time``: the CPU seconds its teacher's training took (stored with the cached
teacher; None for a checkpoint or a cache written without it).

A study is a set of recipes (or a sweep's grid points) run over the same seeds. ``report``
gives mean ± std per (recipe, method); ``compare(out, baseline, metric)`` pairs each group's
runs with the baseline's by seed (a seed fixes the training subset, the validation split and
the initial student, so a pair differs by the method alone) and gives the mean paired
difference, its std (ddof=1) and a Student-t confidence interval with n-1 degrees of freedom
(NaN for a single pair); ``python -m kdcore report runs --baseline scratch`` prints both.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import sys
import time
import traceback

import numpy as np

__all__ = ["RecipeError", "SCHEMA", "METHODS", "load", "validate", "prepare", "run_one", "run_dir", "teacher_path",
           "report", "format_report", "compare", "paired", "format_compare", "Trial", "trials", "sweep"]


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file and the key's path."""


def _yaml():
    try:
        import yaml
    except ImportError:
        raise RecipeError("kdcore recipes need PyYAML: pip install pyyaml (or the 'recipes' extra of "
                          "kdcore's pyproject.toml)") from None
    return yaml


# ---- the schema -------------------------------------------------------------------------

def _show(v):
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    return repr(v)


class _Spec:
    """One value of the schema: ``check(value, path)`` returns the value (converted where
    YAML needs help) or raises RecipeError naming the path."""
    what = "a value"

    def accepts(self, v):
        return True

    def check(self, v, path):
        return v

    def fail(self, v, path):
        raise RecipeError(f"{path}: expected {self.what}, got {_show(v)}")


class Any_(_Spec):
    pass


class Int(_Spec):
    def __init__(self, lo=None):
        self.lo = lo
        self.what = "an int" + (f" >= {lo}" if lo is not None else "")

    def accepts(self, v):
        return isinstance(v, int) and not isinstance(v, bool)

    def check(self, v, path):
        if not self.accepts(v) or (self.lo is not None and v < self.lo):
            self.fail(v, path)
        return v


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class Float(_Spec):
    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        rng = []
        if lo is not None:
            rng.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            rng.append(f"{'<' if hi_open else '<='} {hi:g}")
        self.what = "a number" + (" " + " and ".join(rng) if rng else "")

    def accepts(self, v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool)) or \
            (isinstance(v, str) and bool(_FLOAT_RE.match(v.strip())))

    def check(self, v, path):
        if not self.accepts(v):
            self.fail(v, path)
        # PyYAML follows YAML 1.1, where 5e-4 (no dot) is a string: read it as the number meant.
        f = float(v)
        if not math.isfinite(f) or (self.lo is not None and (f < self.lo or (self.lo_open and f == self.lo))) or \
                (self.hi is not None and (f > self.hi or (self.hi_open and f == self.hi))):
            self.fail(v, path)
        return f


class Bool(_Spec):
    what = "true or false"

    def accepts(self, v):
        return isinstance(v, bool)

    def check(self, v, path):
        if not self.accepts(v):
            self.fail(v, path)
        return v


class Str(_Spec):
    def __init__(self, choices=None, pattern=None, what=None):
        self.choices = None if choices is None else list(choices)
        self.pattern = pattern
        self.what = what or ("a string" if choices is None else "one of " + ", ".join(self.choices))

    def accepts(self, v):
        return isinstance(v, str)

    def check(self, v, path):
        if not self.accepts(v):
            self.fail(v, path)
        if self.choices is not None and v not in self.choices:
            self.fail(v, path)
        if self.pattern is not None and not re.match(self.pattern, v):
            self.fail(v, path)
        return v


class List(_Spec):
    def __init__(self, item, min_len=0, max_len=None):
        self.item, self.min_len, self.max_len = item, min_len, max_len
        n = f"{min_len}" if max_len == min_len else f"at least {min_len}" if min_len else ""
        self.what = f"a list of {n + ' ' if n else ''}{item.what.replace('an ', '').replace('a ', '')}s".replace(
            "ss", "s")

    def accepts(self, v):
        return isinstance(v, list)

    def check(self, v, path):
        if not self.accepts(v) or len(v) < self.min_len or (self.max_len is not None and len(v) > self.max_len):
            self.fail(v, path)
        return [self.item.check(x, f"{path}[{i}]") for i, x in enumerate(v)]


REQUIRED = object()


class Map(_Spec):
    """A mapping with known keys: ``fields`` maps each key to (spec, default); REQUIRED marks
    a key that must be given. ``extra``: the spec of any other key (None: unknown keys are
    refused)."""

    def __init__(self, fields, extra=None, what="a mapping", drop_none=False):
        self.fields, self.extra, self.what, self.drop_none = fields, extra, what, drop_none

    def accepts(self, v):
        return isinstance(v, dict)

    def check(self, v, path):
        if not self.accepts(v):
            self.fail(v, path)
        out = {}
        for k, x in v.items():
            p = f"{path}.{k}" if path else str(k)
            if k in self.fields:
                out[k] = None if x is None and self.fields[k][1] is None else self.fields[k][0].check(x, p)
            elif self.extra is not None:
                out[k] = self.extra.check(x, p)
            else:
                raise RecipeError(f"{p}: unknown key; {'known' if path else 'recipe'} keys: "
                                  f"{', '.join(self.fields)}")
        for k, (spec, default) in self.fields.items():
            if k not in out:
                if default is REQUIRED:
                    raise RecipeError(f"{path + '.' if path else ''}{k}: required")
                out[k] = copy.deepcopy(default)   # the schema's defaults are shared
        # schema order, so that resolved recipes read alike; unset options of a model or an
        # optimizer are left out rather than written as nulls
        order = [k for k in self.fields if k in out] + [k for k in out if k not in self.fields]
        return {k: out[k] for k in order if not (self.drop_none and out[k] is None)}


class OneOf(_Spec):
    """The first alternative whose Python type matches decides (so that a mapping's error
    names the key inside it, not the whole alternative)."""

    def __init__(self, *alts):
        self.alts = alts
        self.what = " or ".join(a.what for a in alts)

    def accepts(self, v):
        return any(a.accepts(v) for a in self.alts)

    def check(self, v, path):
        for a in self.alts:
            if a.accepts(v):
                try:
                    return a.check(v, path)
                except RecipeError as e:
                    if str(e).startswith(f"{path}: expected"):   # a scalar out of range: name every alternative
                        self.fail(v, path)
                    raise
        self.fail(v, path)


def _zoo_names():
    from . import models
    return models.names()


_OPTIMIZERS = ("sgd", "adam", "adamw")
_OPTIMIZER_FIELDS = {
    "name": (Str(_OPTIMIZERS), REQUIRED), "momentum": (Float(0, 1, hi_open=True), None),
    "weight_decay": (Float(0), None), "nesterov": (Bool(), None), "dampening": (Float(0, 1), None),
    "betas": (List(Float(0, 1, hi_open=True), 2, 2), None), "eps": (Float(0, lo_open=True), None),
    "decay_bn_and_bias": (Bool(), None)}
_OPTIMIZER = OneOf(Str(_OPTIMIZERS), Map(_OPTIMIZER_FIELDS, what="an optimizer mapping", drop_none=True))
# slkd's sl_optimizer: an optimizer of its own, so its mapping carries its lr too
_SL_OPTIMIZER = OneOf(Str(_OPTIMIZERS), Map(dict(_OPTIMIZER_FIELDS, lr=(Float(0), None)),
                                            what="an optimizer mapping (with lr)", drop_none=True))
_SCHEDULES = ("constant", "cosine", "multistep")
_SCHEDULE = OneOf(Str(_SCHEDULES[:2]), Map({
    "name": (Str(_SCHEDULES), REQUIRED), "milestones": (List(Int(1), 1), None), "gamma": (Float(0), None),
    "min_lr": (Float(0), None), "warmup_epochs": (Int(0), None)}, what="a schedule mapping", drop_none=True))
_AUGMENT = OneOf(Bool(), Map({"crop_padding": (Int(0), 0), "hflip": (Bool(), False), "noise_std": (Float(0), 0.0),
                              "randaugment": (Int(0), 0)}, what="an augment mapping"))
_MODEL_FIELDS = {
    "model": (Str(what="a zoo model name (kdcore.models.names())"), REQUIRED),
    "width": (Int(1), None),                   # cnn
    "hidden": (List(Int(1), 1), None),         # mlp: hidden sizes (input and output come from the data)
    "dropout": (Float(0, 1, hi_open=True), None),   # mlp
    "batchnorm": (Bool(), None),               # mlp
}
# Which zoo models take which extra keys (kdcore.models' builders).
_MODEL_KEYS = {"width": ("cnn",), "hidden": ("mlp",), "dropout": ("mlp",), "batchnorm": ("mlp",)}
_MODEL = Map(dict(_MODEL_FIELDS), drop_none=True)
_TEACHER = Map(dict(_MODEL_FIELDS, **{
    "checkpoint": (Str(), None), "torch_key": (Str(), None),
    "epochs": (Int(1), 10), "optimizer": (_OPTIMIZER, "sgd"), "lr": (Float(0), None), "schedule": (_SCHEDULE, None),
    "batch_size": (Int(1), 128), "augment": (_AUGMENT, None), "train_size": (Int(1), None),
    "seed": (OneOf(Int(0), List(Int(0), 2)), 0), "snapshot": (Int(1), None)}),
    drop_none=True)
_TEACHER_TRAINING = ("epochs", "optimizer", "lr", "schedule", "batch_size", "augment", "train_size", "seed",
                     "snapshot")
_DATA = Map({"source": (Str(), "fashion_mnist"), "train_size": (Int(1), None), "repeat": (Int(1), None),
             "val_split": (OneOf(Int(1), Float(0, 1, lo_open=True, hi_open=True)), None),
             "test_size": (Int(1), None)})
_LOSS = Map({"kind": (Str(what="a kdcore.losses term name (CE, KD, AT, ...)"), REQUIRED)}, extra=Any_())

SCHEMA = Map({
    "name": (Str(pattern=r"^[A-Za-z0-9_.+=-]+$", what="a name of letters, digits and _.+=-"), None),
    "teacher": (_TEACHER, None),
    "student": (_MODEL, REQUIRED),
    "data": (_DATA, {"source": "fashion_mnist", "train_size": None, "val_split": None, "test_size": None}),
    "method": (Str(what="a method name"), REQUIRED),
    "options": (Map({}, extra=Any_()), {}),
    "losses": (List(_LOSS, 1), None),
    "optimizer": (_OPTIMIZER, "sgd"),
    "lr": (Float(0), None),
    "schedule": (_SCHEDULE, None),
    "epochs": (Int(1), 10),
    "batch_size": (Int(1), 128),
    "augment": (_AUGMENT, None),
    "seeds": (List(Int(0), 1), [0]),
})

# Methods besides kdcore.losses.METHODS (all run by kdcore.distill).
_EXTRA_METHODS = {"scratch": "kdcore.fit: the student alone, no teacher",
                  "mutual": "kdcore.mutual: deep mutual learning among the student and options.peers - 1 peers "
                            "(of the student's architecture, or options.peer_model's: a model section)",
                  "slkd": "kdcore.slkd: self-learning teachers trained with the student",
                  "tf_kd_reg": "kdcore.tf_kd(mode='virtual'): teacher-free KD from a hand-made virtual teacher",
                  "tf_kd_self": "kdcore.tf_kd(mode='self'): the student learns from a copy of itself pretrained for "
                                "options.teacher_epochs (default: epochs)",
                  "born_again": "kdcore.born_again: options.generations models of the student's architecture, each "
                                "distilled from the one before (the first from labels); the student is the last",
                  "snapshot_distill": "kdcore.snapshot_distill: options.cycles cosine cycles over the recipe's "
                                      "epochs, each cycle after the first distilled from the model at the end of "
                                      "the one before"}
# Methods that train without a teacher (a teacher section, if any, is only measured against).
_NO_TEACHER = ("scratch", "mutual", "tf_kd_reg", "tf_kd_self", "born_again", "snapshot_distill")
# Methods whose stages train models besides the student: run_one saves them as stage-<k>.safetensors.
_STAGED = ("tf_kd_self", "born_again")


def _methods():
    from . import losses
    return list(losses.METHODS) + list(_EXTRA_METHODS)


class _MethodsView:
    """``METHODS``: every name ``method:`` accepts (computed from kdcore.losses at use)."""

    def __iter__(self):
        return iter(_methods())

    def __contains__(self, name):
        return name in _methods()

    def __repr__(self):
        return repr(_methods())


METHODS = _MethodsView()

# Keyword arguments the recipe sets itself, or that hold Python objects a YAML file cannot.
_RECIPE_SETS = {"epochs": "epochs", "epochs_per_cycle": "epochs (over options.cycles)", "batch_size": "batch_size",
                "optimizer": "optimizer", "lr": "lr", "schedule": "schedule", "augment": "augment", "seed": "seeds",
                "method": "method", "losses": "losses", "val": "data.val_split"}
_NOT_OPTIONS = {"student", "teacher", "train", "models", "model", "val", "progress", "callback", "callback_every",
                "checkpoint", "checkpoint_every", "checkpoint_best", "resume", "sl_teachers", "keep_snapshots",
                "mode", "teacher_epochs", "num_classes", "distill_kw", "fit_kw"}
# Options whose default (None) says nothing of their type.
_OPTION_SPECS = {"T": Float(0, lo_open=True), "ce_weight": Float(0), "kd_weight": Float(0), "max_steps": Int(1),
                 "warmup_epochs": Int(0), "kd_stop_epoch": Int(1), "init_epochs": Int(1), "hint_epochs": Int(0),
                 "teacher_weights": List(Float(0), 1), "tolerant": List(Float(0), 2, 2),
                 "cache": OneOf(Bool(), Str(["auto"])), "sl_optimizer": _SL_OPTIMIZER, "generations": Int(1),
                 "teacher_epochs": Int(1), "cycles": Int(1), "min_lr": Float(0)}
# tf_kd's options whose default (None) says nothing of their type; its alpha is not DKD's.
_TF_KD_SPECS = {"alpha": Float(0, 1), "a": Float(0, 1, lo_open=True, hi_open=True), "multiplier": Float(0),
                "form": Str(["code", "paper"])}
# Options of one method only: the recipe's own (peers, peer_model: not keyword arguments of the
# training function), and the training function's that the other mode of tf_kd ignores or refuses.
_METHOD_ONLY = {"peers": ("mutual", Int(2)), "peer_model": ("mutual", None), "teacher_epochs": ("tf_kd_self", None),
                "a": ("tf_kd_reg", None), "form": ("tf_kd_reg", None)}
# distill's options for the logit methods only (it refuses them with feature methods and losses=).
_LOGIT_ONLY = {"T", "alpha", "beta", "warmup_epochs", "kd_stop_epoch", "conditional", "teacher_weights", "multi",
               "learn_gates", "gate_lr", "teacher_drop", "fickle", "student_noise", "tolerant"}


def _train_fn(method):
    import kdcore
    return {"scratch": kdcore.fit, "mutual": kdcore.mutual, "slkd": kdcore.slkd, "tf_kd_reg": kdcore.tf_kd,
            "tf_kd_self": kdcore.tf_kd, "born_again": kdcore.born_again,
            "snapshot_distill": kdcore.snapshot_distill}.get(method, kdcore.distill)


def _check_options(method, options, uses_losses):
    params = inspect.signature(_train_fn(method)).parameters
    own = [k for k, (m, _) in _METHOD_ONLY.items() if m == method]
    out = {}
    for k, v in options.items():
        p = f"options.{k}"
        if k in _RECIPE_SETS:
            raise RecipeError(f"{p}: set by the recipe's {_RECIPE_SETS[k]}, not options")
        if k == "peer_model" and method == "mutual":
            out[k] = _check_model_section(_MODEL.check(v, p), p)
            continue
        if k in own and _METHOD_ONLY[k][1] is not None:
            out[k] = _METHOD_ONLY[k][1].check(v, p)
            continue
        if k not in params or (k in _NOT_OPTIONS and k not in own) or (k in _METHOD_ONLY and k not in own):
            known = sorted(n for n in set(params) | set(own) if (n not in _NOT_OPTIONS or n in own)
                           and n not in _RECIPE_SETS and (n not in _METHOD_ONLY or n in own))
            raise RecipeError(f"{p}: not an option of method {method!r}; options: {', '.join(known)}")
        from .distill import _KINDS as logit_methods
        feature = uses_losses or method not in logit_methods
        if _train_fn(method).__name__ == "distill" and k in _LOGIT_ONLY and feature:
            raise RecipeError(f"{p}: applies to methods kd, dkd and mse only; set it on the loss terms (losses:)")
        if k in ("ce_weight", "kd_weight") and uses_losses:
            raise RecipeError(f"{p}: with losses:, give each term its weight")
        default = params[k].default
        spec = (_TF_KD_SPECS.get(k) if method.startswith("tf_kd") else None) or _OPTION_SPECS.get(k) or \
            (Bool() if isinstance(default, bool) else Int() if isinstance(default, int)
             else Float() if isinstance(default, float) else Str() if isinstance(default, str) else Any_())
        out[k] = None if v is None else spec.check(v, p)
    return out


def _loss_classes():
    from . import losses
    return {n.lower(): getattr(losses, n) for n in losses.__all__
            if isinstance(getattr(losses, n), type) and issubclass(getattr(losses, n), losses.Loss)
            and getattr(losses, n) is not losses.Loss}


def _loss_params(cls):
    names = []
    for c in cls.__mro__:
        if "__init__" in vars(c):
            names += [n for n, p in inspect.signature(c.__init__).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in names]
    return names


def _build_losses(specs):
    """kdcore.losses terms from the recipe's ``losses`` list (checked: term kinds, keys, and
    the values through the terms' own constructors)."""
    classes = _loss_classes()
    out = []
    for i, spec in enumerate(specs):
        p = f"losses[{i}]"
        cls = classes.get(spec["kind"].lower())
        if cls is None:
            raise RecipeError(f"{p}.kind: expected one of {', '.join(c.__name__ for c in classes.values())}, "
                              f"got {spec['kind']!r}")
        kw = {k: v for k, v in spec.items() if k != "kind"}
        allowed = _loss_params(cls)
        for k in kw:
            if k not in allowed:
                raise RecipeError(f"{p}.{k}: not an option of {cls.__name__}; options: {', '.join(allowed)}")
        for k in ("weight",):
            if k in kw:
                kw[k] = Float(0).check(kw[k], f"{p}.{k}")
        try:
            out.append(cls(**kw))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{p}: {e}") from None
    return out


def _method_label(cfg):
    if cfg["losses"]:
        return "+".join(t["kind"].lower() for t in cfg["losses"])
    return cfg["method"]


def validate(raw, source="recipe"):
    """The resolved recipe (a plain dict, defaults filled in) of a parsed YAML document, or
    RecipeError naming ``source`` and the offending key's path."""
    try:
        return _validate(raw)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def _check_model_section(m, role):
    """A schema-checked model section (student, teacher, mutual's peer_model) with its zoo name
    checked and lower-cased, its keys checked against the model, mlp's default hidden filled."""
    zoo = _zoo_names()
    if m["model"].lower() not in zoo:
        raise RecipeError(f"{role}.model: expected one of {', '.join(zoo)}, got {m['model']!r}")
    m["model"] = m["model"].lower()
    for k, models in _MODEL_KEYS.items():
        if m.get(k) is not None and m["model"] not in models:
            raise RecipeError(f"{role}.{k}: only for model {' or '.join(models)}, not {m['model']}")
    if m["model"] == "mlp" and m.get("hidden") is None:
        m["hidden"] = [256]
    return m


def _validate(raw):
    if not isinstance(raw, dict):
        raise RecipeError(f"expected a mapping of recipe keys, got {_show(raw)}")
    cfg = SCHEMA.check(raw, "")
    for role in ("teacher", "student"):
        if cfg[role] is not None:
            _check_model_section(cfg[role], role)
    t = cfg["teacher"]
    if t is not None and t.get("checkpoint") is not None:
        given = [k for k in _TEACHER_TRAINING if k in (raw.get("teacher") or {})]
        if given:
            raise RecipeError(f"teacher.{given[0]}: a teacher loaded from teacher.checkpoint is not trained")
    if t is not None and t.get("torch_key") is not None and t.get("checkpoint") is None:
        raise RecipeError("teacher.torch_key: needs teacher.checkpoint")
    if t is not None and t.get("snapshot") is not None and t["snapshot"] > t["epochs"]:
        raise RecipeError(f"teacher.snapshot: {t['snapshot']} is past the teacher's {t['epochs']} epochs")
    if t is not None and t.get("snapshot") == t["epochs"]:
        del t["snapshot"]   # the end of the run: the same teacher, cached once
    if cfg["data"].get("repeat") in (None, 1):
        cfg["data"].pop("repeat", None)   # the plain epoch: recipes without the key resolve as before it existed
    method = cfg["method"]
    if method not in _methods():
        raise RecipeError(f"method: expected one of {', '.join(_methods())}, got {method!r}")
    if t is not None and isinstance(t["seed"], list):
        if len(set(t["seed"])) != len(t["seed"]):
            raise RecipeError(f"teacher.seed: a seed appears twice in {t['seed']}")
        if _train_fn(method).__name__ != "distill":
            raise RecipeError(f"teacher.seed: a list of seeds (several teachers) is for kdcore.distill's methods, "
                              f"not {method!r}")
    if cfg["losses"] is not None:
        if _train_fn(method).__name__ != "distill":
            raise RecipeError(f"losses: only for kdcore.distill's methods, not {method!r}")
        _build_losses(cfg["losses"])
    if t is None and method not in _NO_TEACHER:
        raise RecipeError(f"teacher: required by method {method!r}")
    cfg["options"] = _check_options(method, cfg["options"], cfg["losses"] is not None)
    for where in ("", "teacher."):
        c = cfg if not where else t
        if c is None:
            continue
        s = c.get("schedule")
        if isinstance(s, dict) and (s["name"] == "multistep") != (s.get("milestones") is not None):
            raise RecipeError(f"{where}schedule.milestones: " + ("required by multistep" if s.get("milestones") is None
                                                                  else "only for multistep"))
        optimizers = [(f"{where}optimizer", c.get("optimizer"))]
        if not where:
            optimizers.append(("options.sl_optimizer", cfg["options"].get("sl_optimizer")))
        for name, o in optimizers:
            if isinstance(o, dict):
                sgd_only, adam_only = ("momentum", "nesterov", "dampening"), ("betas", "eps")
                for k in sgd_only if o["name"] != "sgd" else adam_only:
                    if o.get(k) is not None:
                        raise RecipeError(f"{name}.{k}: not an option of {o['name']}")
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise RecipeError(f"seeds: a seed appears twice in {cfg['seeds']}")
    if method == "snapshot_distill":
        cycles = cfg["options"].get("cycles") or _snapshot_cycles()
        if cfg["epochs"] % cycles:
            raise RecipeError(f"epochs: {cfg['epochs']} is not a multiple of options.cycles ({cycles})")
        if cfg["schedule"] not in (None, "cosine"):
            raise RecipeError("schedule: snapshot_distill restarts a cosine schedule each cycle; give cosine or "
                              "leave it out")
    return cfg


def _snapshot_cycles():
    """kdcore.snapshot_distill's default number of cycles."""
    import kdcore
    return inspect.signature(kdcore.snapshot_distill).parameters["cycles"].default


# ---- loading ----------------------------------------------------------------------------

_PATH_KEYS = (("data", "source"), ("teacher", "checkpoint"))


def _absolutise(raw, base, only=None):
    """Relative data/teacher files: relative to the recipe's folder (to the working directory
    for --set values), so that the resolved recipe runs from anywhere."""
    for a, b in _PATH_KEYS:
        if only is not None and (a, b) != only:
            continue
        sec = raw.get(a) if isinstance(raw, dict) else None
        if isinstance(sec, dict) and isinstance(sec.get(b), str) and sec[b] != "fashion_mnist" \
                and not os.path.isabs(sec[b]):
            sec[b] = os.path.normpath(os.path.join(base, os.path.expanduser(sec[b])))


def _apply_set(raw, item, source):
    """One ``key.path=value`` override; the value is read as YAML (numbers, lists, true...)."""
    if not isinstance(item, str) or "=" not in item:
        raise RecipeError(f"{source}: --set {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"{source}: --set {item!r}: expected key.path=value")
    try:
        value = _yaml().safe_load(text) if text.strip() else None
    except _yaml().YAMLError as e:
        raise RecipeError(f"{source}: --set {key}: the value is not YAML: {e}") from None
    _set_path(raw, parts, value, f"{source}: --set {key}")


def _set_path(raw, parts, value, where):
    """raw[parts[0]][parts[1]]... = value, making the mappings on the way; where: the start of
    the error message (the source and the option that set it)."""
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise RecipeError(f"{where}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value
    if tuple(parts) in _PATH_KEYS:
        _absolutise(raw, os.getcwd(), only=tuple(parts))


def _read(path):
    """(raw document, source name) of a recipe file, its relative paths made absolute."""
    yaml = _yaml()
    path = os.fspath(path)
    source = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        _absolutise(raw, os.path.dirname(os.path.abspath(path)))
        raw.setdefault("name", os.path.splitext(source)[0])
    return raw, source


def load(path, sets=(), seeds=None):
    """Read, override and validate a recipe file: the resolved recipe (a dict; ``name``
    defaults to the file's stem). sets: ``"key.path=value"`` overrides (values read as YAML);
    seeds: a list replacing the recipe's. RecipeError names the file and the key's path."""
    raw, source = _read(path)
    if isinstance(raw, dict):
        for item in sets:
            _apply_set(raw, item, source)
        if seeds is not None:
            raw["seeds"] = list(seeds)
    return validate(raw, source)


# ---- data and models --------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _source(source, stamp):
    """(train, test) Datasets of a data source; stamp (the file's mtime and size) keys the
    cache so an edited .npz is read again."""
    from . import datasets
    if source == "fashion_mnist":
        return datasets.fashion_mnist("train"), datasets.fashion_mnist("test")
    try:
        with np.load(source, allow_pickle=False) as z:
            missing = [k for k in ("X_train", "y_train", "X_test", "y_test") if k not in z.files]
            if missing:
                raise RecipeError(f"data.source: {source} lacks {', '.join(missing)} (has {', '.join(z.files)})")
            arrays = {k: z[k] for k in ("X_train", "y_train", "X_test", "y_test")}
            if ("mean" in z.files) != ("std" in z.files):
                raise RecipeError(f"data.source: {source} has {'mean' if 'mean' in z.files else 'std'} without "
                                  f"{'std' if 'mean' in z.files else 'mean'}; give both or neither")
            fixed = (z["mean"], z["std"]) if "mean" in z.files else None
    except (OSError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"data.source: cannot read {source} as .npz: {e}") from None
    try:
        k = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
        if fixed is not None:
            # the file's own normalisation: a transfer set (synthetic images, say) in a space it did not define
            fixed = tuple(tuple(float(v) for v in np.atleast_1d(a).ravel()) for a in fixed)
        train = datasets.from_arrays(arrays["X_train"], arrays["y_train"], num_classes=k, name="train",
                                     normalize="auto" if fixed is None else fixed)
        # the test images get the training set's normalisation, as any held-out data would
        norm = None if train.mean is None else (train.mean, train.std)
        test = datasets.from_arrays(arrays["X_test"], arrays["y_test"], normalize=norm, num_classes=k, name="test")
    except (TypeError, ValueError) as e:
        raise RecipeError(f"data.source: {source}: {e}") from None
    if train.shape != test.shape:
        raise RecipeError(f"data.source: {source}: X_train samples are {train.shape}, X_test {test.shape}")
    return train, test


def _load_source(source):
    if source == "fashion_mnist":
        return _source(source, None)
    try:
        st = os.stat(source)
    except OSError as e:
        raise RecipeError(f"data.source: {source}: {e.strerror}") from None
    return _source(source, (st.st_mtime_ns, st.st_size))


def _splits(cfg, seed):
    """(train, val or None, test) for one seed: val carved from the training set and the
    training subset drawn with the seed (each image data.repeat times); the test set is the
    same for every seed (paired)."""
    d = cfg["data"]
    full, test = _load_source(d["source"])
    n = len(full)
    perm = np.random.default_rng(seed).permutation(n)
    vs = d["val_split"]
    n_val = 0 if vs is None else vs if isinstance(vs, int) else int(round(vs * n))
    if n_val >= n:
        raise RecipeError(f"data.val_split: {vs} leaves no training images of {n}")
    val = full.subset(perm[:n_val]) if n_val else None
    rest = perm[n_val:]
    if d["train_size"] is not None:
        if d["train_size"] > len(rest):
            raise RecipeError(f"data.train_size: {d['train_size']} > the {len(rest)} training images"
                              + (" left after val_split" if n_val else ""))
        rest = rest[:d["train_size"]]
    train = full.subset(np.sort(np.tile(rest, d.get("repeat", 1))))
    if d["test_size"] is not None and d["test_size"] < len(test):
        test = test.subset(np.arange(d["test_size"]))
    return full, train, val, test


def _build_model(spec, data, seed, role):
    from . import models
    shape = tuple(data.shape)
    k = data.num_classes
    try:
        if spec["model"] == "mlp":
            kw = {key: spec[key] for key in ("dropout", "batchnorm") if spec.get(key) is not None}
            return models.mlp([int(np.prod(shape))] + list(spec.get("hidden")) + [k], seed=seed, **kw)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise RecipeError(f"{role}.model: {spec['model']} needs square images (C, H, H); the data's samples "
                              f"are {shape} (use mlp)")
        kw = {"width": spec["width"]} if spec.get("width") is not None else {}
        return models.get(spec["model"], num_classes=k, in_channels=shape[0], input_size=shape[1], seed=seed, **kw)
    except (TypeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"{role}: {e}") from None


def _optimizer(spec, lr, where):
    from . import optim
    if isinstance(spec, str):
        return optim.make_optimizer(spec, lr)
    cls = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[spec["name"]]
    kw = {k: (tuple(v) if k == "betas" else v) for k, v in spec.items() if k != "name"}
    if lr is not None:
        kw["lr"] = lr
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}optimizer: {e}") from None


def _schedule(spec, where):
    from . import optim
    if spec is None or isinstance(spec, str):
        return optim.make_schedule(spec)
    kw = {k: v for k, v in spec.items() if k != "name" and v is not None}
    cls = {"constant": optim.Constant, "cosine": optim.Cosine, "multistep": optim.MultiStep}[spec["name"]]
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}schedule: {e}") from None


def _digest(obj, n=12):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _teacher_key(cfg, t=None):
    """What a trained teacher depends on: its own section (``t``, default the recipe's) and the
    data it saw (an .npz by content, so that a replaced file is not mistaken for the old one).
    A section without ``snapshot`` keys as before that key existed, so caches stay valid."""
    src = cfg["data"]["source"]
    data_id = src if src == "fashion_mnist" else _file_digest(src)
    t = cfg["teacher"] if t is None else t
    return dict(teacher={k: v for k, v in t.items() if k not in ("checkpoint", "torch_key")
                         and not (k == "snapshot" and v is None)}, data=data_id)


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock on path (a file next to the teacher), so that parallel runs of one
    configuration train its teacher once."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _teacher(cfg, full, cache, log, train=True):
    """The teacher model and where it came from: loaded from teacher.checkpoint, from the
    cache, or trained now on the training set (teacher.train_size images drawn with
    teacher.seed) and cached under a hash of its configuration. With teacher.snapshot = N the
    training stops after N of its ``epochs`` epochs (the schedule still spans ``epochs``), so
    the model is the full run's after epoch N, bitwise. With a list of seeds: (a list of
    models, a list of their origins), one teacher per seed."""
    t = cfg["teacher"]
    if isinstance(t["seed"], list):
        pairs = [_one_teacher(cfg, dict(t, seed=s), full, cache, log, train) for s in t["seed"]]
        return [m for m, _ in pairs], [i for _, i in pairs]
    return _one_teacher(cfg, t, full, cache, log, train)


def _cache_path(cache, t, key):
    return os.path.join(cache, f"teacher-{t['model']}-{_digest(key)}.safetensors")


def teacher_path(cfg, cache):
    """The file in the teacher cache that holds (or, once trained, will hold) the single
    teacher a recipe trains: e.g. for other recipes to load as their teacher.checkpoint."""
    t = cfg["teacher"]
    if t is None or t.get("checkpoint") is not None or isinstance(t["seed"], list):
        raise RecipeError("teacher: teacher_path is for a single teacher the recipe trains, not "
                          + ("none" if t is None else "a checkpoint" if t.get("checkpoint") is not None
                             else "a list of seeds"))
    return _cache_path(os.fspath(cache), t, _teacher_key(cfg, t))


def _one_teacher(cfg, t, full, cache, log, train):
    import kdcore
    model = _build_model(t, full, t["seed"], "teacher")
    if t.get("checkpoint") is not None:
        path = t.get("checkpoint")
        if not os.path.exists(path):
            raise RecipeError(f"teacher.checkpoint: {path}: no such file")
        try:
            if path.endswith((".pt", ".pth", ".bin")):
                kdcore.load_torch(path, model, key=t.get("torch_key"))
            else:
                kdcore.load(path, model)
        except (OSError, KeyError, ValueError, ImportError) as e:
            raise RecipeError(f"teacher.checkpoint: {path}: {e}") from None
        model.eval()
        return model, dict(source="checkpoint", path=path)
    key = _teacher_key(cfg, t)
    path = _cache_path(cache, t, key)
    if not train:
        return model, dict(source="untrained", path=path)
    with _locked(path + ".lock"):
        if os.path.exists(path):
            saved = kdcore.load(path, model)
            log(f"teacher {t['model']}: cached {path}")
            model.eval()
            return model, dict(source="cache", path=path, cpu_time=saved.get("cpu_time"))
        data = full
        if t.get("train_size") is not None and t.get("train_size") < len(full):
            data = full.subset(np.sort(np.random.default_rng(t["seed"]).permutation(len(full))[:t.get("train_size")]))
        stop = t.get("snapshot")
        log(f"teacher {t['model']}: training {t['epochs']} epochs on {len(data)} images"
            + (f", kept after epoch {stop}" if stop else "") + f"; cache {path}")
        t0, c0 = time.perf_counter(), time.process_time()
        hist = kdcore.fit(model, data, epochs=t["epochs"], batch_size=t["batch_size"],
                          optimizer=_optimizer(t["optimizer"], t.get("lr"), "teacher."),
                          schedule=_schedule(t.get("schedule"), "teacher."), augment=t.get("augment"), seed=t["seed"],
                          progress=False, callback=None if stop is None else lambda e, row: e + 1 >= stop)
        cpu = time.process_time() - c0
        kdcore.save(path, model, config=key, history=dict(hist), train_time=time.perf_counter() - t0, cpu_time=cpu)
    model.eval()
    return model, dict(source="trained", path=path, cpu_time=cpu)


def prepare(cfg, seed, cache=None, train_teacher=True, log=None):
    """Everything a run needs, nothing trained but (when not cached) the teacher: a dict with
    ``train``, ``val``, ``test`` (Datasets), ``student``, ``teacher`` (None for scratch
    without one; a list with a list of teacher seeds), ``teacher_info`` (a list likewise),
    ``losses`` (the terms or None), ``optimizer``, ``schedule``. train_teacher=False builds an
    untrained teacher (checking a recipe)."""
    log = log or (lambda msg: None)
    cache = cache or os.path.join("runs", "_teachers")
    full, train, val, test = _splits(cfg, seed)
    student = _build_model(cfg["student"], full, seed, "student")
    teacher, tinfo = (None, None) if cfg["teacher"] is None else _teacher(cfg, full, cache, log, train_teacher)
    for m in teacher if isinstance(teacher, list) else [] if teacher is None else [teacher]:
        m.eval()
    return dict(train=train, val=val, test=test, student=student, teacher=teacher, teacher_info=tinfo,
                losses=None if cfg["losses"] is None else _build_losses(cfg["losses"]),
                optimizer=_optimizer(cfg["optimizer"], cfg["lr"], ""), schedule=_schedule(cfg["schedule"], ""))


# ---- one run ----------------------------------------------------------------------------

def run_dir(out, cfg, seed):
    """The folder of one (recipe, seed) run: <out>/<name>/seed-<seed>."""
    return os.path.join(os.fspath(out), cfg["name"], f"seed-{seed}")


def _config_hash(cfg, seed):
    return _digest(dict(cfg, seeds=[seed]), 64)


def _write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None   # strict JSON has no NaN; null reads back everywhere
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


def _dump_json(obj):
    return json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n"


def _history_csv(hist):
    import csv
    n = len(hist.get("epoch", []))
    cols = ["epoch"] + [k for k, v in hist.items() if k != "epoch" and isinstance(v, list) and len(v) == n]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for i in range(n):
        w.writerow(["" if isinstance(hist[c][i], float) and not math.isfinite(hist[c][i]) else
                    repr(hist[c][i]) if isinstance(hist[c][i], float) else hist[c][i] for c in cols])
    return buf.getvalue()


def _environment(argv):
    import kdcore
    buf = io.StringIO()
    kdcore.show_config(file=buf)
    lines = [buf.getvalue().rstrip()]
    try:
        import yaml
        lines.append(f"pyyaml {yaml.__version__}")
    except ImportError:
        pass
    if "torch" in sys.modules:   # not imported for this: torch is slow to import
        lines.append(f"torch {sys.modules['torch'].__version__}")
    lines += [f"platform {platform.platform()}", f"host {platform.node()}",
              f"cpus {os.cpu_count()}", f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', '')}",
              f"KDCORE_ISA {os.environ.get('KDCORE_ISA', '')}",
              f"command {' '.join(argv)}", f"finished {datetime.datetime.now().isoformat(timespec='seconds')}"]
    return "\n".join(lines) + "\n"


def _train(cfg, p, seed, callback):
    """Calls the method's training function; returns (the student's History, the trained
    student, the earlier stages' models: [] but for the _STAGED methods). born_again's
    student is its last generation, a model of its own: p["student"] is its template."""
    import kdcore
    method, opts = cfg["method"], dict(cfg["options"])
    common = dict(epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer=p["optimizer"], lr=cfg["lr"],
                  schedule=p["schedule"], augment=cfg["augment"], val=p["val"], seed=seed, progress=False,
                  callback=callback)
    student, teacher, train = p["student"], p["teacher"], p["train"]
    if method == "scratch":
        return kdcore.fit(student, train, **common, **opts), student, []
    if method == "mutual":
        spec = opts.pop("peer_model", None)
        peers = [student] + [student.fresh(seed=seed + 7919 * k) if spec is None else
                             _build_model(spec, train, seed + 7919 * k, "options.peer_model")
                             for k in range(1, opts.pop("peers", 2))]
        return kdcore.mutual(peers, train, **common, **opts), student, []
    if method == "slkd":
        if isinstance(opts.get("sl_optimizer"), dict):   # its lr is one of the mapping's keys
            opts["sl_optimizer"] = _optimizer(opts["sl_optimizer"], None, "options.sl_")
        return kdcore.slkd(student, teacher, train, **common, **opts), student, []
    if method in ("tf_kd_reg", "tf_kd_self"):
        mode = {"tf_kd_reg": "virtual", "tf_kd_self": "self"}[method]
        r = kdcore.tf_kd(student, train, mode=mode, **common, **opts)
        return r.student_history, student, [] if r.teacher_history is None else [r.teacher]
    if method == "born_again":
        r = kdcore.born_again(student, train, **common, **opts)
        return r.histories[-1], r.model, r.models[:-1]
    if method == "snapshot_distill":
        cycles = opts.pop("cycles", _snapshot_cycles())
        del common["schedule"]   # its own cosine cycles (validate allows only cosine)
        r = kdcore.snapshot_distill(student, train, cycles=cycles, epochs_per_cycle=common.pop("epochs") // cycles,
                                    **common, **opts)
        return r.history, student, []
    if p["losses"] is not None:
        return kdcore.distill(student, teacher, train, losses=p["losses"], **common, **opts), student, []
    return kdcore.distill(student, teacher, train, method=method, **common, **opts), student, []


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _finished(cfg, seed, out):
    """Whether run_dir(out, cfg, seed) holds a finished run of this configuration (done.json);
    RecipeError if it holds one of another configuration."""
    folder = run_dir(out, cfg, seed)
    done = _read_json(os.path.join(folder, "done.json"))
    if done is None:
        return False
    if done.get("config_sha256") != _config_hash(cfg, seed):
        raise RecipeError(f"{folder} holds a finished run of another configuration of {cfg['name']!r} "
                          f"(config.yaml there); remove the folder or use another --out")
    return True


_EVAL_BATCH = 512    # kdcore.metrics' default, so that its functions reproduce the per-epoch numbers
_ECE_BINS = 15


def _epoch_measures(student, test, teacher_logits):
    """The per-epoch test measurements of ``run_one``: one eval-mode forward of the student
    over the test set; ``test_acc``, ``test_nll`` (mean -log p(label)) and ``test_ece``
    (``_ECE_BINS`` bins) as kdcore.metrics.calibration computes them, and with the teacher's
    test logits ``test_agreement`` (top-1 agreement) and ``test_kl`` (KL(p_s || p_t) at T=1,
    as kdcore.metrics.kl_divergence)."""
    import kdcore
    from . import metrics as M
    zs = kdcore.predict(student, test, batch_size=_EVAL_BATCH)
    cal = M._calibration(zs, test.y, _ECE_BINS)
    out = dict(test_acc=cal["accuracy"], test_nll=cal["nll"], test_ece=cal["ece"])
    if teacher_logits is not None:
        out["test_agreement"] = float(np.mean(zs.argmax(1) == teacher_logits.argmax(1)))
        out["test_kl"] = M._mean_kl(M._log_softmax(zs), M._log_softmax(teacher_logits))
    return out


class _Measure:
    """run_one's per-epoch callback: measures (``_epoch_measures``) the model being trained,
    which the training loop names in ``on_train_begin`` (kdcore.callbacks' protocol) -- the
    student, or a stage before it (born_again's earlier generations, tf_kd's pretrained copy).
    ``rows``: one dict of measures per epoch, every stage in order; ``starts``: the index in
    rows where each stage began."""

    def __init__(self, model, test, teacher_logits, log):
        self.model, self.test, self.zt, self.log = model, test, teacher_logits, log
        self.rows, self.starts = [], []

    def on_train_begin(self, models):
        self.model = models[0]
        self.starts.append(len(self.rows))

    def __call__(self, epoch, row):
        self.rows.append(_epoch_measures(self.model, self.test, self.zt))
        self.log(epoch, row, self.rows[-1]["test_acc"])
        return False

    def stage_last(self):
        """The test accuracy after each stage's last epoch."""
        return [self.rows[e - 1]["test_acc"] for e in self.starts[1:] + [len(self.rows)] if e > 0]


def _teacher_logits(teacher, test):
    """The teacher's test logits; for several teachers, the log of their mean probabilities
    (the mixture distill's default multi='avg_prob' learns from, at T=1): its argmax is the
    ensemble's vote, its softmax the mixture."""
    import kdcore
    if not isinstance(teacher, list):
        return kdcore.predict(teacher, test, batch_size=_EVAL_BATCH)
    from . import metrics as M
    logp = np.stack([M._log_softmax(kdcore.predict(t, test, batch_size=_EVAL_BATCH)) for t in teacher])
    top = logp.max(0)
    return (top + np.log(np.exp(logp - top).mean(0))).astype(np.float32)


def _mixture_report(student, teachers, test, zt):
    """kdcore.metrics.report's keys for several teachers, the teacher being their mixture
    (``zt``, _teacher_logits); ``teacher_accuracies``: each teacher's own."""
    import kdcore
    from . import metrics as M
    zs = kdcore.predict(student, test, batch_size=_EVAL_BATCH)
    cs, ct = M._calibration(zs, test.y, _ECE_BINS), M._calibration(zt, test.y, _ECE_BINS)
    return dict(student_accuracy=cs["accuracy"], teacher_accuracy=ct["accuracy"],
                agreement=float(np.mean(zs.argmax(1) == zt.argmax(1))),
                kl_student_teacher=M._mean_kl(M._log_softmax(zs), M._log_softmax(zt)),
                student_ece=cs["ece"], teacher_ece=ct["ece"], student_nll=cs["nll"], teacher_nll=ct["nll"],
                teacher_accuracies=[kdcore.evaluate(t, test, batch_size=_EVAL_BATCH)["accuracy"] for t in teachers])


def run_one(cfg, seed, out, cache=None, log=None, argv=None):
    """Run one (recipe, seed) into ``run_dir(out, cfg, seed)`` and return its metrics (the
    contents of metrics.json). A folder already marked finished (done.json) for the same
    configuration is not rerun: its metrics are returned, with ``skipped=True``; one finished
    with another configuration raises RecipeError (remove it or choose another ``out``). A
    folder without the marker (an interrupted run) is run again from the start.

    cfg: a resolved recipe (``load``/``validate``). cache: the teacher cache folder (default
    <out>/_teachers). log: a function of one string (progress lines; default silent). The
    function holds no global state besides kdcore's thread settings, so a pool of processes
    can run many (recipe, seed) pairs at once; parallel runs needing the same teacher train
    it once (a file lock)."""
    log = log or (lambda msg: None)
    seed = Int(0).check(seed, "seed")
    folder = run_dir(out, cfg, seed)
    h = _config_hash(cfg, seed)
    if _finished(cfg, seed, out):
        m = _read_json(os.path.join(folder, "metrics.json")) or {}
        log(f"{cfg['name']} seed {seed}: finished earlier, skipped ({folder})")
        return dict(m, skipped=True)
    os.makedirs(folder, exist_ok=True)
    cache = cache or os.path.join(os.fspath(out), "_teachers")
    import kdcore
    yaml = _yaml()
    resolved = dict(cfg, seeds=[seed])
    _write_atomic(os.path.join(folder, "config.yaml"),
                  "# resolved recipe of this run (kdcore " + kdcore.__version__ + "); rerunnable as it stands\n"
                  + yaml.safe_dump(resolved, sort_keys=False))
    t0, c0 = time.perf_counter(), time.process_time()
    p = prepare(cfg, seed, cache, log=log)
    teacher, test = p["teacher"], p["test"]
    # the teacher is frozen: its test logits are computed once, not per epoch
    zt = None if teacher is None else _teacher_logits(teacher, test)
    measure = _Measure(p["student"], test, zt, lambda epoch, row, acc: log(
        f"{cfg['name']} seed {seed} epoch {epoch}: loss {row.get('train_loss', float('nan')):.4f}"
        + (f" val {row['val_acc']:.4f}" if "val_acc" in row else "") + f" test {acc:.4f} ({row.get('time', 0):.1f} s)"))
    hist, student, stages = _train(cfg, p, seed, measure)
    # the History describes the last stage(s): the measures of its epochs, the last ones taken
    n = len(hist["epoch"])
    per_epoch = {k: [v[k] for v in measure.rows[-n:]] for k in measure.rows[-1]}
    for k, v in per_epoch.items():
        hist[k] = list(v)
    test_acc = per_epoch["test_acc"]
    train_time = time.perf_counter() - t0
    selected = "val" if p["val"] is not None and hist.get("val_acc") else "test"
    best = int(np.argmax(hist["val_acc"] if selected == "val" else test_acc))
    final = kdcore.evaluate(student, test, batch_size=500)["accuracy"]
    metrics = dict(recipe=cfg["name"], method=_method_label(cfg), seed=seed, epochs=len(test_acc),
                   test_acc=final, best_epoch=best, best_selected_on=selected)
    if selected == "val":
        metrics["best_val_acc"] = hist["val_acc"][best]
    for k, v in per_epoch.items():   # test_acc -> last_test_acc, best_test_acc; test_nll -> ...
        metrics["last_" + k], metrics["best_" + k] = v[-1], v[best]
    metrics.update(train_size=len(p["train"]) // cfg["data"].get("repeat", 1),
                   val_size=0 if p["val"] is None else len(p["val"]), test_size=len(test), time=train_time,
                   cpu_time=time.process_time() - c0, teacher=p["teacher_info"])
    if stages:
        metrics["stage_last_test_acc"] = [float(a) for a in measure.stage_last()]
    if isinstance(teacher, list):
        metrics["report"] = _mixture_report(student, teacher, test, zt)
    elif teacher is not None:
        metrics["report"] = kdcore.metrics.report(student, teacher, test)
    for k, m in enumerate(stages):
        kdcore.save(os.path.join(folder, f"stage-{k}.safetensors"), m, seed=seed)
    _write_atomic(os.path.join(folder, "history.json"), _dump_json(dict(hist)))
    _write_atomic(os.path.join(folder, "history.csv"), _history_csv(hist))
    kdcore.save(os.path.join(folder, "student.safetensors"), student, config=_jsonable(resolved), seed=seed,
                history=_jsonable(dict(hist)), metrics=_jsonable(metrics))
    _write_atomic(os.path.join(folder, "metrics.json"), _dump_json(metrics))
    _write_atomic(os.path.join(folder, "env.txt"), _environment(argv or sys.argv))
    # last: the marker says every file above is complete
    _write_atomic(os.path.join(folder, "done.json"),
                  _dump_json(dict(config_sha256=h, finished=datetime.datetime.now().isoformat(timespec="seconds"))))
    log(f"{cfg['name']} seed {seed}: test accuracy {final:.4f} (best {test_acc[best]:.4f} at epoch {best}, on "
        f"{selected}); {train_time:.0f} s -> {folder}")
    return dict(metrics, skipped=False)


# ---- the report -------------------------------------------------------------------------

def _groups(out):
    """{(recipe, method): [(folder, metrics), ...] sorted by seed} of the finished runs under
    ``out`` (folders with done.json and a readable metrics.json)."""
    groups = {}
    for root, dirs, files in os.walk(os.fspath(out)):
        dirs.sort()
        if "done.json" not in files:
            continue
        m = _read_json(os.path.join(root, "metrics.json"))
        if m is None:
            continue
        groups.setdefault((m["recipe"], m["method"]), []).append((root, m))
    for runs in groups.values():
        runs.sort(key=lambda r: r[1]["seed"])
    return dict(sorted(groups.items()))


def report(out):
    """Finished runs under ``out`` (folders with done.json), grouped by (recipe, method):
    a list of dicts with ``recipe``, ``method``, ``seeds`` (sorted), ``n``, ``last_mean``,
    ``last_std``, ``best_mean``, ``best_std`` (test accuracy in %, std over seeds with
    ddof=0 as benchmarks/ reports it), ``teacher_mean`` and ``agreement_mean`` (NaN without
    a teacher) and ``runs`` (the folders). ``compare`` gives paired differences to a baseline."""
    rows = []
    for (recipe, method), runs in _groups(out).items():
        last = np.array([m["last_test_acc"] for _, m in runs], float) * 100
        best = np.array([m["best_test_acc"] for _, m in runs], float) * 100
        rep = [m.get("report") or {} for _, m in runs]
        teacher = np.array([r.get("teacher_accuracy", np.nan) for r in rep], float) * 100
        agree = np.array([r.get("agreement", np.nan) for r in rep], float) * 100
        rows.append(dict(recipe=recipe, method=method, seeds=[m["seed"] for _, m in runs], n=len(runs),
                         last_mean=float(last.mean()), last_std=float(last.std()),
                         best_mean=float(best.mean()), best_std=float(best.std()),
                         teacher_mean=float(teacher.mean()), agreement_mean=float(agree.mean()),
                         runs=[r for r, _ in runs]))
    return rows


_COLUMNS = ("recipe", "method", "seeds", "last epoch", "best epoch", "teacher", "agreement")


def _cells(r):
    nan = lambda v: "" if math.isnan(v) else f"{v:.2f}"  # noqa: E731
    return [r["recipe"], r["method"], ",".join(map(str, r["seeds"])),
            f"{r['last_mean']:.2f} ± {r['last_std']:.2f}", f"{r['best_mean']:.2f} ± {r['best_std']:.2f}",
            nan(r["teacher_mean"]), nan(r["agreement_mean"])]


def _table(columns, cells, n_left, markdown):
    """An aligned text table (the first n_left columns left-aligned, the others right) or a
    Markdown one."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---" if i < n_left else "---:" for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
    def fmt(c):
        return "  ".join(x.ljust(w) if i < n_left else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))
    return "\n".join([fmt(columns), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells]) + "\n"


def format_report(rows, markdown=False):
    """The report as text: an aligned table, or a Markdown table (markdown=True). Test
    accuracy in %, mean ± std over seeds; teacher: its test accuracy; agreement: how often
    the student predicts the teacher's class on the test set."""
    return _table(_COLUMNS, [_cells(r) for r in rows], 3, markdown)


# ---- paired comparisons -------------------------------------------------------------------

def _betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b), from its continued fraction
    (evaluated by the modified Lentz method); where that converges slowly,
    x > (a + 1) / (a + b + 2), from the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) \
        - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    # I_x = front / (1 + d1 / (1 + d2 / (1 + ...))), d_2m = m (b - m) x / ((a + 2m - 1)(a + 2m)),
    # d_2m+1 = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for j in range(1, 10000):
        if j == 1:
            num = 1.0
        else:
            k = j - 1
            m = k // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if k % 2 == 0 else \
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f


def _t_quantile(p, df):
    """The p quantile of Student's t distribution with df degrees of freedom (no scipy): the
    t > 0 whose upper tail, (1/2) I_{df/(df+t^2)}(df/2, 1/2), is 1 - p, found by bisection
    on x = df / (df + t^2) to float precision; t_{0.975, 1} = 12.7062..."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -_t_quantile(1.0 - p, df)
    target = 2.0 * (1.0 - p)          # I_x(df/2, 1/2) grows with x
    lo, hi = 0.0, 1.0
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(0.5 * df, 0.5, mid) < target:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return math.sqrt(df * (1.0 - x) / x)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def compare(out, baseline, metric="best_test_acc", level=0.95):
    """Paired-seed comparison of every group of finished runs under ``out`` (a group is a
    (recipe, method) pair, as in ``report``) with a baseline group: per group, the differences
    ``metric(group, seed) - metric(baseline, seed)`` over the seeds both have (a seed fixes the
    training subset, the validation split and the student's initial weights, so a pair differs
    only by the method), their mean, standard deviation and a ``level`` confidence interval.

    baseline: a recipe name (matched first), or a method label (``metrics.json``'s ``method``)
    that exactly one group has; an unknown or ambiguous one is refused (RecipeError naming it). metric: a number
    in every run's metrics.json, in its units there (fractions for accuracies):
    ``best_test_acc`` (default: the test accuracy at the epoch chosen on validation, or on test
    without val_split), ``last_test_acc``, ``best_test_nll``, ``best_test_ece``,
    ``best_test_agreement``, ``best_test_kl``, their ``last_`` forms, ``test_acc``, ...; a run
    without it (a scratch run has no agreement) is left out of the pairs.

    The interval is Student's t: mean ± t_{(1 + level)/2, n-1} · s / sqrt(n), with s the
    standard deviation of the n paired differences with ddof=1 (n - 1 degrees of freedom);
    the t quantile is computed here, without scipy. With n = 1, s and the interval are NaN
    (undefined), with n = 0 every number is.

    Returns a list of dicts, one per other group in ``report``'s order: ``recipe``,
    ``method``, ``baseline`` (the baseline's recipe), ``baseline_method``, ``metric``,
    ``level``, ``n`` (pairs), ``seeds`` (the paired seeds), ``unpaired`` (seeds only one side
    has), ``mean`` and ``baseline_mean`` (the metric's mean over the paired seeds),
    ``diff_mean``, ``diff_std``, ``ci_low``, ``ci_high``. ``format_compare`` prints it."""
    if not isinstance(baseline, str) or not baseline:
        raise RecipeError(f"baseline: expected a recipe name or method label, got {_show(baseline)}")
    if not isinstance(metric, str) or not metric:
        raise RecipeError(f"metric: expected a metrics.json key such as best_test_acc, got {_show(metric)}")
    level = Float(0, 1, lo_open=True, hi_open=True).check(level, "level")
    groups = _groups(out)
    if not groups:
        raise RecipeError(f"{os.fspath(out)}: no finished runs (folders with done.json)")
    base = [g for g in groups if g[0] == baseline] or [g for g in groups if g[1] == baseline]
    if not base:
        raise RecipeError(f"baseline: {baseline!r} is neither a recipe nor a method of the finished runs in "
                          f"{os.fspath(out)}; recipes: {', '.join(r for r, _ in groups)}")
    if len(base) > 1:
        raise RecipeError(f"baseline: method {baseline!r} is run by several recipes "
                          f"({', '.join(r for r, _ in base)}); name one of them")
    if not any(_is_number(m.get(metric)) for runs in groups.values() for _, m in runs):
        numbers = sorted({k for runs in groups.values() for _, m in runs for k, v in m.items() if _is_number(v)})
        raise RecipeError(f"metric: {metric!r} is not a number in the runs' metrics.json; numbers there: "
                          f"{', '.join(numbers)}")
    values = {g: {m["seed"]: float(m[metric]) for _, m in runs if _is_number(m.get(metric))}
              for g, runs in groups.items()}
    b = values[base[0]]
    nan = float("nan")
    rows = []
    for g in groups:
        if g == base[0]:
            continue
        v = values[g]
        seeds = sorted(set(v) & set(b))
        rows.append(dict(recipe=g[0], method=g[1], baseline=base[0][0], baseline_method=base[0][1],
                         metric=metric, level=level, seeds=seeds, unpaired=sorted(set(v) ^ set(b)),
                         **paired([v[s] for s in seeds], [b[s] for s in seeds], level)))
    return rows


def paired(values, baseline, level=0.95):
    """The paired difference of two equally long lists of numbers (values[i] - baseline[i]),
    as ``compare`` reports it: a dict with ``n``, ``mean``, ``baseline_mean``, ``diff_mean``,
    ``diff_std`` (ddof=1) and the Student-t ``level`` interval ``ci_low``, ``ci_high`` (NaN
    where undefined: with n = 1 the std and the interval, with n = 0 everything)."""
    if len(values) != len(baseline):
        raise ValueError(f"values and baseline must be equally long, got {len(values)} and {len(baseline)}")
    d = np.array([float(a) - float(b) for a, b in zip(values, baseline)], float)
    n, nan = len(d), float("nan")
    mean = float(d.mean()) if n else nan
    std = float(d.std(ddof=1)) if n > 1 else nan
    half = _t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n) if n > 1 else nan
    return dict(n=n, mean=float(np.mean(values)) if n else nan, baseline_mean=float(np.mean(baseline)) if n else nan,
                diff_mean=mean, diff_std=std, ci_low=mean - half, ci_high=mean + half)


def _compare_cells(r):
    num = lambda v, sign="": "n/a" if math.isnan(v) else f"{v:{sign}.4f}"  # noqa: E731
    ci = "n/a" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
    return [r["recipe"], r["method"], str(r["n"]), num(r["mean"]), num(r["baseline_mean"]),
            num(r["diff_mean"], "+"), num(r["diff_std"]), ci]


def format_compare(rows, markdown=False):
    """``compare``'s rows as text (an aligned table) or Markdown (markdown=True): per group,
    the number of paired seeds, the metric's mean for the group and for the baseline over
    those seeds, the mean paired difference (group - baseline), its standard deviation
    (ddof=1) and the Student-t confidence interval of the mean difference (n/a with one pair)."""
    if not rows:
        return "(no other group to compare with the baseline)\n"
    r0 = rows[0]
    level = f"{100 * r0['level']:g}% CI"
    columns = ("recipe", "method", "pairs", r0["metric"], r0["baseline"], "difference", "std", level)
    return _table(columns, [_compare_cells(r) for r in rows], 2, markdown)


# ---- sweeps -----------------------------------------------------------------------------

_GRID_KEY = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_DASK_MISSING = 'kdcore sweeps run on Dask, which is not installed: pip install "dask[distributed]"'
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _dask():
    """(dask, distributed), or ImportError naming the package to install."""
    try:
        import dask
        import distributed
    except ImportError:
        raise ImportError(_DASK_MISSING) from None
    return dask, distributed


def _cores():
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _slug(v):
    """A grid value as a part of a folder name: the value's text (JSON but for strings) when it
    is made of letters, digits and _.+- and short, else its first such characters, each run of
    others made one _, and a digest of the value (so that two values never share a folder)."""
    text = v if isinstance(v, str) else json.dumps(_jsonable(v), separators=(",", ":"))
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)
    if safe != text or not text or len(safe) > 40:
        safe = (safe.strip("_")[:32] + "_" if safe.strip("_") else "") + _digest([type(v).__name__, _jsonable(v)], 6)
    return safe


def _grid_keys(grid):
    """The grid's keys, checked: key paths, non-empty lists without repeated values."""
    if not isinstance(grid, dict):
        raise RecipeError(f"grid: expected a mapping of key paths to lists of values, got {_show(grid)}")
    keys = list(grid)
    for k in keys:
        if not isinstance(k, str) or not _GRID_KEY.match(k):
            raise RecipeError(f"grid: {k!r}: expected a key path such as method or options.T")
        if k.split(".")[0] in ("name", "seeds"):
            raise RecipeError(f"grid: {k}: set by the sweep (the trials' names; seeds= or --seeds), not a grid key")
        vals = grid[k]
        if not isinstance(vals, (list, tuple)) or not vals:
            raise RecipeError(f"grid: {k}: expected a non-empty list of values, got {_show(vals)}")
        for i, v in enumerate(vals):
            if any(type(v) is type(w) and v == w for w in vals[:i]):
                raise RecipeError(f"grid: {k}: the value {v!r} appears twice")
    for a in keys:
        for b in keys:
            if b.startswith(a + "."):
                raise RecipeError(f"grid: {b} lies inside {a}, also a grid key")
    return keys


class Trial(dict):
    """One trial of a sweep (a grid point and a seed) and its outcome: ``name`` (the run
    folder's name, from the recipe's name and the grid values), ``grid`` (key path -> value),
    ``seed``, ``folder``, ``status`` ("finished", "skipped": finished by an earlier
    invocation, "failed" or "pending"), ``metrics`` (metrics.json's contents, with
    ``threads``: kdcore's thread count in the trial), ``error`` and ``traceback`` (text, for
    a failed trial). A dict, so that it prints and serialises as one."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


def trials(recipe, grid=None, seeds=None, sets=(), out="runs"):
    """The trials of a sweep, validated, in order (grid keys as given, each key's values as
    given, the last key varying fastest, seeds innermost): a list of ``Trial`` with
    ``cfg`` (the resolved recipe of the grid point) and status "pending", or RecipeError
    naming the grid point and the key. recipe: a recipe file or a resolved recipe (a dict);
    grid: {key path: [values]} (a value replaces the recipe's, as ``--set`` does, and may
    be any YAML-able value); seeds: replacing the recipe's; sets: ``"key.path=value"``
    overrides applied before the grid."""
    grid = {} if grid is None else grid
    keys = _grid_keys(grid)
    if isinstance(recipe, dict):
        raw0, source = copy.deepcopy(recipe), str(recipe.get("name") or "recipe")
    else:
        raw0, source = _read(recipe)
    if not isinstance(raw0, dict):
        validate(raw0, source)   # raises: not a mapping
    for item in sets:
        _apply_set(raw0, item, source)
    if seeds is not None:
        raw0["seeds"] = list(seeds) if isinstance(seeds, (list, tuple)) else seeds
    base = raw0.get("name")
    out_list, names = [], {}
    for point in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, point))
        raw = copy.deepcopy(raw0)
        for k, v in values.items():
            _set_path(raw, k.split("."), copy.deepcopy(v), f"{source}: grid {k}")
        name = base
        if keys and isinstance(base, str):
            name = base + "-" + "-".join(f"{k}={_slug(v)}" for k, v in values.items())
            raw["name"] = name
        where = source + (" [" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + "]" if keys else "")
        cfg = validate(raw, where)
        if cfg["name"] in names:
            raise RecipeError(f"grid: the points {names[cfg['name']]} and {values} would share the folder "
                              f"{cfg['name']}")
        names[cfg["name"]] = values
        for seed in cfg["seeds"]:
            out_list.append(Trial(name=cfg["name"], grid=values, seed=seed, folder=run_dir(out, cfg, seed),
                                  cfg=cfg, status="pending", metrics=None, error=None, traceback=None))
    return out_list


def _trial(cfg, seed, out, cache, threads, deterministic, argv):
    """One trial, in a Dask worker: kdcore's thread count (and deterministic mode) set before
    any kdcore work, then ``run_one``; its metrics with ``threads`` added."""
    import kdcore
    kdcore.set_num_threads(threads)
    kdcore.set_deterministic(deterministic)
    m = run_one(cfg, seed, out, cache=cache, argv=argv)
    return dict(m, threads=kdcore.get_num_threads(), pid=os.getpid(), host=platform.node())


def _plan_threads(workers, threads, local):
    """(workers, threads per trial) of a sweep, or RecipeError naming the argument."""
    if workers is not None:
        workers = Int(1).check(workers, "workers")
    if threads is not None:
        threads = Int(1).check(threads, "threads")
    if not local:
        if workers is not None:
            raise RecipeError("workers: only for the local cluster; a scheduler's workers are its own")
        return None, threads or 1
    cores = _cores()
    if workers is None:
        workers = max(1, cores // threads) if threads else cores
    if threads is None:
        threads = max(1, cores // workers)
    if workers * threads > cores:
        raise RecipeError(f"workers x threads: {workers} workers x {threads} kdcore threads = {workers * threads} "
                          f"> the {cores} cores here; trials would compete for the cores (and, for a given "
                          f"thread count, be no faster): lower workers or threads")
    return workers, threads


def _error_text(e):
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def sweep(recipe, grid=None, seeds=None, out="runs", workers=None, threads=None, scheduler=None, sets=(),
          cache=None, log=None, argv=None):
    """Run a recipe over a grid of overrides and seeds, one Dask task per trial (a grid point
    and a seed), each into its own run folder; return the trials (``Trial``, in the order of
    ``trials``) with their outcome.

        kdcore.recipes.sweep("recipes/kd.yaml", grid={"options.T": [2, 4]}, seeds=[0, 1], out="runs")
        # -> runs/kd-options.T=2/seed-0, ..., runs/kd-options.T=4/seed-1

    Each trial is ``run_one`` of the grid point's resolved recipe, named
    ``<name>-<key>=<value>-...`` (its config.yaml reruns with ``python -m kdcore run``). Every
    point is validated before anything runs (RecipeError naming the point and the key).
    Trials finished by an earlier sweep are skipped without a worker; failed or interrupted
    ones run again; a folder holding a finished run of another configuration is refused
    (RecipeError), as by ``run_one``.

    scheduler None: a LocalCluster on 127.0.0.1 of ``workers`` processes (default: as many
    as fit the cores at ``threads`` each) of one thread each, a trial per process, with
    OMP_NUM_THREADS (and OpenBLAS's, MKL's) set to ``threads`` (default: cores // workers);
    workers x threads above the cores is refused. A worker that dies fails its trial at once
    (no retry). scheduler "tcp://host:port": that Dask cluster's workers, as many trials at
    once as they have threads; ``threads`` (default 1) is set in each trial; ``out`` (and
    ``cache``) must be a folder every worker sees. Either way the task sets kdcore's thread
    count (``kdcore.set_num_threads``) and the caller's deterministic mode before any kdcore
    work, so a trial gives the bits ``run_one`` gives in-process at that thread count.

    A trial that raises, or whose worker dies, is marked failed (``error``, ``traceback``)
    and the others go on. cache: the teachers' cache (default <out>/_teachers; trials needing
    one teacher train it once). log: a function of one string (a line per finished trial).
    Needs dask and distributed (``pip install "dask[distributed]"``), imported here."""
    log = log or (lambda msg: None)
    out = os.path.abspath(os.fspath(out))
    ts = trials(recipe, grid, seeds, sets, out)
    local = scheduler is None
    if not local and not isinstance(scheduler, str):
        raise RecipeError(f"scheduler: expected an address such as tcp://host:8786, got {_show(scheduler)}")
    workers, threads = _plan_threads(workers, threads, local)
    dask, distributed = _dask()
    cache = os.path.abspath(os.fspath(cache)) if cache is not None else os.path.join(out, "_teachers")
    import kdcore
    deterministic = kdcore.get_deterministic()
    argv = list(argv or [sys.executable, "-m", "kdcore.recipes.sweep"])
    todo = []
    for t in ts:
        if _finished(t.cfg, t.seed, out):
            t.update(status="skipped", metrics=_read_json(os.path.join(t.folder, "metrics.json")))
        else:
            todo.append(t)
    points = len({t.name for t in ts})
    log(f"sweep: {len(ts)} trials ({points} grid points x {len(ts) // max(points, 1)} seeds), "
        f"{len(ts) - len(todo)} finished earlier (skipped), {len(todo)} to run")
    if not todo:
        return ts
    with contextlib.ExitStack() as stack:
        if local:
            env = {v: str(threads) for v in _THREAD_VARS}   # Dask's workers default them to 1
            # allowed-failures 0: a worker that dies fails its trial instead of retrying it (and
            # dying again) on the other workers; saturation 1: no second trial queued on a worker.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                                  "distributed.scheduler.worker-saturation": 1.0}):
                cluster = stack.enter_context(distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, env=env, silence_logs=logging.CRITICAL))   # failures: reported below
            client = stack.enter_context(distributed.Client(cluster, set_as_default=False))
            where = f"local cluster {cluster.scheduler_address}: {workers} workers x {threads} kdcore threads"
        else:
            try:
                client = stack.enter_context(distributed.Client(scheduler, set_as_default=False, timeout=30))
            except OSError as e:
                raise RecipeError(f"scheduler: cannot reach {scheduler}: {e}") from None
            where = f"scheduler {scheduler}: {threads} kdcore threads per trial"
        log(f"sweep: {where}")
        _run_trials(client, todo, out, cache, threads, deterministic, argv, log)
    return ts


def _run_trials(client, todo, out, cache, threads, deterministic, argv, log):
    """Submits the trials, as many at a time as the workers have threads (a trial waiting in a
    worker's queue would fail with it if it died), and records each outcome."""
    pending, running, n_done = list(todo), {}, 0
    token = os.urandom(4).hex()   # keys unique on a shared scheduler
    looked = -math.inf
    while pending or running:
        if pending and time.monotonic() - looked > 2:   # workers may come and go
            looked = time.monotonic()
            slots = max(1, sum(client.nthreads().values()))
            while pending and len(running) < slots:
                t = pending.pop(0)
                key = f"kdcore-trial-{t.name}-seed-{t.seed}-{token}"
                running[client.submit(_trial, t.cfg, t.seed, out, cache, threads, deterministic, argv,
                                      key=key, pure=False)] = t
        finished = [f for f in running if f.done()]
        if not finished:
            time.sleep(0.1)
            continue
        looked = -math.inf
        for f in finished:
            t = running.pop(f)
            n_done += 1
            head = f"[{n_done}/{len(todo)}] {t.name} seed {t.seed}"
            if f.status == "finished":
                m = f.result()   # skipped=True: run twice (a worker holding the result died), finished here
                t.update(status="finished", metrics=m)
                log(f"{head}: test accuracy {m.get('test_acc', float('nan')):.4f} ({m.get('time', 0):.0f} s, "
                    f"{m.get('threads')} threads)")
            else:
                try:
                    e = f.exception()
                    tb = f.traceback()
                except BaseException as exc:   # cancelled: the scheduler lost the task
                    e, tb = exc, None
                text = "".join(traceback.format_exception(type(e), e, tb)) if tb is not None else _error_text(e)
                t.update(status="failed", error=_error_text(e), traceback=text)
                log(f"{head}: FAILED: {t.error}")
            f.release()
