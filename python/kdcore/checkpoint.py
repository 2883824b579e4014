"""Checkpoints: models, optimizer state and run metadata in one safetensors file.

    kdcore.save("run.safetensors", model, opt, epoch=3, history=hist)
    state = kdcore.load("run.safetensors", model, opt)   # {'epoch': 3, 'history': {...}, ...}

The file is plain safetensors (``safetensors.numpy.load_file`` reads it; files written by
``safetensors.numpy.save_file`` load here). Tensors:

    model/<role>/<key>     each model's state dict (parameters and BN statistics float32,
                           num_batches_tracked int64 scalars), PyTorch key names
    optim/<role>/state0    momentum (SGD) or first moment (Adam/AdamW), one float per parameter
    optim/<role>/state1    second moment (Adam/AdamW only)
    optim/<role>/steps     the optimizer's step count (int64 scalar)
    state/<key>            numpy arrays passed to save as keyword arguments

and string metadata: ``format``, ``kdcore_version``, ``architecture`` (JSON: per role the
model class, its repr and its forward counter) and ``state`` (JSON of the other keyword
arguments: epoch, step, config, history, ...). A single model has the role "model"; several
are a dict ``{role: model}`` (e.g. "student", "sl0", "sl1" for SLKD, "peer0", ... for DML).

Writes are atomic (temporary file, fsync, rename, fsync of the directory): a crash leaves
the previous checkpoint intact. Reads are strict: a malformed or hostile file raises
OSError naming the file and the rule it breaks; nothing is unpickled or executed.
"""
from __future__ import annotations

import errno
import json
import os
import warnings

import numpy as np

from . import _kdcore
from .nn import Module, _check_bool

__all__ = ["save", "load", "load_torch", "CheckpointMismatch"]

_FORMAT = "kdcore.checkpoint"
_FORMAT_VERSION = "1"
_RESERVED = {"metadata", "models", "optimizers", "tensors", "architecture", "kdcore_version"}


class CheckpointMismatch(KeyError, ValueError):
    """The checkpoint's tensors do not fit the given models or optimizers: the message names
    every missing, unexpected or mis-shaped tensor. A KeyError (as ``load_state_dict`` raises
    for missing keys) and a ValueError (as it raises for shapes)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _model_roles(models):
    if isinstance(models, Module):
        return {"model": models}
    if isinstance(models, dict) and models:
        out = {}
        for role, m in models.items():
            if not isinstance(role, str) or not role or "/" in role:
                raise ValueError(f"model roles must be non-empty str without '/', got {role!r}")
            if not isinstance(m, Module):
                raise TypeError(f"models[{role!r}] must be a kdcore.nn.Module, got {type(m).__name__}")
            out[role] = m
        if len({id(m) for m in out.values()}) != len(out):
            raise ValueError("the same model appears under two roles")
        return out
    raise TypeError("models must be a kdcore.nn.Module or a non-empty dict role -> Module, "
                    f"got {type(models).__name__}")


def _optim_roles(optimizers, roles):
    if optimizers is None:
        return {}
    if isinstance(optimizers, _kdcore.Optimizer):
        if len(roles) != 1:
            raise TypeError(f"optimizers: with several models ({sorted(roles)}) pass a dict role -> optimizer")
        return {next(iter(roles)): optimizers}
    if isinstance(optimizers, dict):
        out = {}
        for role, o in optimizers.items():
            if role not in roles:
                raise ValueError(f"optimizers[{role!r}] has no model with that role (roles: {sorted(roles)})")
            if o is None:
                continue
            if not isinstance(o, _kdcore.Optimizer):
                raise TypeError(f"optimizers[{role!r}] must be a bound optimizer (opt.bind(model)), "
                                f"got {type(o).__name__}")
            out[role] = o
        return out
    raise TypeError("optimizers must be a bound optimizer (kdcore.optim.SGD().bind(model)), a dict role -> "
                    f"optimizer, or None; got {type(optimizers).__name__}")


def _optim_expected(opt, n_params):
    exp = {"steps": ((), np.dtype(np.int64))}
    for which in (0, 1):
        s = opt.state(which)
        if s is not None:
            if s.size != n_params:
                raise ValueError(f"the optimizer has state for {s.size} parameters, its model has {n_params}: "
                                 "was it bound to another model?")
            exp[f"state{which}"] = ((n_params,), np.dtype(np.float32))
    return exp


def _model_expected(model):
    """key -> (shape, dtype) of the model's state dict, without copying it."""
    out = {}
    for key, v, kind in model._state_items():
        out[key] = ((), np.dtype(np.int64)) if kind == "count" else (v.shape, np.dtype(np.float32))
    return out


def _contiguous(v):
    # not np.ascontiguousarray: it turns 0-d arrays (num_batches_tracked, steps) into 1-d ones
    v = np.asarray(v)
    return v if v.flags.c_contiguous else v.copy(order="C")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _describe(model):
    try:
        r = repr(model)
    except Exception:  # noqa: BLE001 - a description must never stop a save
        r = type(model).__name__
    return {"class": type(model).__name__, "repr": r, "forward_steps": int(getattr(model, "_step", 0))}


def _check_path(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


def save(path, models, optimizers=None, **state):
    """Write a checkpoint to ``path`` (atomically; see the module docstring for the layout).

    models: a Module, or a dict role -> Module. optimizers: None, a bound optimizer
    (``opt.bind(model)``, as ``fit`` uses), or a dict role -> optimizer. ``**state``: values
    kept with the checkpoint and returned by ``load``: JSON-serialisable values (epoch,
    history, config, ...) go to the metadata, numpy arrays (float32, int64 or uint8) are
    stored as tensors ``state/<key>``.
    """
    _check_path(path)
    roles = _model_roles(models)
    opts = _optim_roles(optimizers, roles)
    tensors = []
    arch = {}
    for role, m in roles.items():
        for key, v in m.state_dict().items():
            tensors.append((f"model/{role}/{key}", _contiguous(v)))
        arch[role] = _describe(m)
    for role, o in opts.items():
        exp = _optim_expected(o, roles[role].num_parameters())
        for which in (0, 1):
            if f"state{which}" in exp:
                tensors.append((f"optim/{role}/state{which}", o.state(which)))   # a view: no copy
        tensors.append((f"optim/{role}/steps", np.array(o.steps(), np.int64)))
    plain = {}
    for key, v in state.items():
        if key in _RESERVED:
            raise TypeError(f"save: {key!r} is a reserved name (reserved: {sorted(_RESERVED)})")
        if isinstance(v, np.ndarray):
            tensors.append((f"state/{key}", _contiguous(v)))
        else:
            plain[key] = v
    try:
        state_json = json.dumps(plain, default=_json_default)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save: keyword values must be JSON-serialisable or numpy arrays: {e}") from None
    from . import __version__
    meta = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "kdcore_version": __version__,
            "architecture": json.dumps(arch), "state": state_json}
    _kdcore.ckpt_write(os.fspath(path), tensors, meta)


def _names(prefix, keys, limit=12):
    keys = sorted(keys)
    s = ", ".join(f"{prefix}{k}" for k in keys[:limit])
    return s + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _compare(label, expected, given, mismatched):
    """Missing and unexpected names; shape/dtype/finiteness problems appended to mismatched
    (label(key): how messages name the tensor)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    for k, (shape, dtype) in expected.items():
        if k not in given:
            continue
        v = given[k]
        if v.shape != tuple(shape) or v.dtype != dtype:
            mismatched.append(f"{label(k)} is {v.dtype}{list(v.shape)} in the file, expected {dtype}{list(shape)}")
        elif v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            mismatched.append(f"{label(k)} contains NaN or Inf")
    return missing, unexpected


_OPTIM_STATE = {"state0": "momentum / first moment", "state1": "second moment", "steps": "step count"}


def _model_label(role):
    """How a mismatch names a model's tensor: the role and the state-dict key, in the user's
    terms, then the tensor's name in the file (model/<role>/<key>)."""
    return lambda k: f"the {role}'s {k!r} (model/{role}/{k})"


def _optim_label(role):
    return lambda k: f"the {role}'s optimizer {_OPTIM_STATE.get(k, k)} (optim/{role}/{k})"


def load(path, models=None, optimizers=None):
    """Read a checkpoint; with ``models`` (and ``optimizers``), restore them from it.

    Returns a dict: the keyword values given to ``save`` (epoch, history -- a
    ``kdcore.History`` -- ... and arrays),
    plus ``metadata`` (the raw string metadata), ``architecture`` (per role: class, repr)
    and ``kdcore_version``. Without models it also holds ``models`` (role -> state dict),
    ``optimizers`` (role -> {'state0', 'state1', 'steps'}) and ``tensors`` (anything else,
    e.g. every tensor of a file not written by kdcore).

    models: a Module or a dict role -> Module (a subset of the file's roles is fine). A single
    Module takes the file's only model, whatever its role, or -- for a safetensors file with
    no ``model/`` tensors -- the whole file as its state dict. Everything is checked before
    anything is written: missing, unexpected, mis-shaped, mis-typed or non-finite tensors
    raise CheckpointMismatch (a KeyError and a ValueError) naming each one, and the models and
    optimizers are then left exactly as they were. A malformed file raises OSError.
    """
    _check_path(path)
    return _load(path, models, optimizers)


def _load(path, models, optimizers, exact_roles=False, arrays=None):
    """load, plus for the training loop: exact_roles refuses files holding models this run
    does not train; arrays (name -> ndarray) are restored in place from state/<name>."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint file", path)
    tensors, meta = _kdcore.ckpt_read(path)
    ours = meta.get("format") == _FORMAT
    try:
        state = json.loads(meta["state"]) if ours and "state" in meta else {}
        arch = json.loads(meta["architecture"]) if ours and "architecture" in meta else {}
    except json.JSONDecodeError as e:
        raise OSError(f"{path}: the kdcore metadata is not valid JSON: {e}") from None
    if not isinstance(state, dict) or not isinstance(arch, dict):
        raise OSError(f"{path}: the kdcore metadata 'state' and 'architecture' must be JSON objects")
    by_role, optim, other = {}, {}, {}
    for name, arr in tensors.items():
        head, _, rest = name.partition("/")
        role, _, key = rest.partition("/")
        if head == "model" and role and key:
            by_role.setdefault(role, {})[key] = arr
        elif head == "optim" and role and key:
            optim.setdefault(role, {})[key] = arr
        elif ours and head == "state" and rest:
            state[rest] = arr
        else:
            other[name] = arr
    out = dict(state)
    if isinstance(out.get("history"), dict):
        from .training import History
        out["history"] = History(out["history"])   # .plot(), .best, ... as the training call returned it
    out.update(metadata=meta, architecture=arch, kdcore_version=meta.get("kdcore_version"))
    if models is None:
        if optimizers is not None:
            raise TypeError("load: optimizers are restored together with their models; pass models too")
        out["models"] = by_role
        out["optimizers"] = {r: {k: (int(v) if k == "steps" else v) for k, v in d.items()} for r, d in optim.items()}
        out["tensors"] = other
        return out

    if isinstance(models, Module):
        if len(by_role) == 1:
            roles = {next(iter(by_role)): models}
        elif not by_role and not ours and other:
            by_role, other = {"model": other}, {}
            roles = {"model": models}
        elif not by_role:
            raise CheckpointMismatch(f"{path}: the checkpoint holds no model tensors")
        else:
            raise CheckpointMismatch(f"{path} holds {len(by_role)} models ({', '.join(sorted(by_role))}); "
                                     "pass models={role: model}")
    else:
        roles = _model_roles(models)
    opts = _optim_roles(optimizers, roles)

    missing, unexpected, mismatched = [], [], []
    if exact_roles:
        extra_roles = sorted(set(by_role) - set(roles))
        if extra_roles:
            unexpected += [f"a model this run does not train, the {r} (model/{r}/*)" for r in extra_roles]
    for role, m in roles.items():
        if role not in by_role:
            missing.append(f"the {role} (model/{role}/*; the file has models: {', '.join(sorted(by_role)) or 'none'})")
            continue
        label = _model_label(role)
        mi, un = _compare(label, _model_expected(m), by_role[role], mismatched)
        missing += [label(k) for k in mi]
        unexpected += [label(k) for k in un]
    for role, o in opts.items():
        got = optim.get(role, {})
        label = _optim_label(role)
        mi, un = _compare(label, _optim_expected(o, roles[role].num_parameters()), got, mismatched)
        missing += [label(k) for k in mi]
        unexpected += [label(k) for k in un]
    for name, dst in (arrays or {}).items():
        v = state.get(name)
        if not isinstance(v, np.ndarray):
            missing.append(f"state/{name}")
        elif v.shape != dst.shape or v.dtype != dst.dtype:
            mismatched.append(f"state/{name} is {v.dtype}{list(v.shape)} in the file, "
                              f"expected {dst.dtype}{list(dst.shape)}")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_names('', missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_names('', unexpected)}")
        if mismatched:
            parts.append(f"mismatched {len(mismatched)}: {_names('', mismatched)}")
        raise CheckpointMismatch(f"{path} does not match the models/optimizers (nothing was loaded): " +
                                 "; ".join(parts))

    # Everything matches: these writes cannot fail halfway.
    for role, m in roles.items():
        m.load_state_dict(by_role[role])
        steps = arch.get(role, {}).get("forward_steps") if isinstance(arch.get(role), dict) else None
        if isinstance(steps, int):
            m._step = steps
    for role, o in opts.items():
        for which in (0, 1):
            s = o.state(which)
            if s is not None:
                s[...] = optim[role][f"state{which}"]
        o.steps(int(optim[role]["steps"]))
    for name, dst in (arrays or {}).items():
        dst[...] = state[name]
    return out


class _RunCheckpoint:
    """Checkpointing inside a training loop (_Common.loop): saves after epochs, restores on
    resume. roles name the models (and their optimizers, None for frozen ones)."""

    def __init__(self, common, models, optimizers, roles, arrays):
        c = common
        self.path = c.checkpoint
        root, ext = os.path.splitext(self.path)
        self.best_path = root + "-best" + ext
        self.every, self.best, self.resume_ = c.checkpoint_every, c.checkpoint_best, c.resume
        self.epochs, self.seed = c.epochs, c.seed
        if roles is None:
            roles = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
        if len(roles) != len(models) or (optimizers is not None and len(optimizers) != len(models)):
            raise ValueError("internal: one role and one optimizer (or None) per model")
        self.models = dict(zip(roles, models))
        self.optims = {} if optimizers is None else {r: o for r, o in zip(roles, optimizers) if o is not None}
        self.arrays = dict(arrays or {})
        self.config = json.loads(json.dumps(c.config(), default=_json_default))

    def resume(self, hist):
        """Restores models, optimizers, arrays and history; returns the first epoch to run."""
        if not self.resume_ or not os.path.exists(self.path):
            return 0
        st = _load(self.path, self.models, self.optims, exact_roles=True, arrays=self.arrays)
        if not isinstance(st.get("epoch"), int) or not isinstance(st.get("history"), dict):
            raise ValueError(f"{self.path} is not a kdcore training checkpoint (no epoch / history); "
                             "use kdcore.load to read it")
        saved = st.get("config", {})
        diff = sorted(k for k in set(saved) | set(self.config) if k != "epochs" and saved.get(k) != self.config.get(k))
        if diff:
            warnings.warn(f"resuming from {self.path} with different settings ({', '.join(diff)}): the run will not "
                          "match an uninterrupted one", RuntimeWarning, stacklevel=4)
        hist.clear()
        hist.update({k: list(v) for k, v in st["history"].items()})
        return st["epoch"] + 1

    def save(self, epoch, hist, path):
        first = next(iter(self.optims.values()), None)
        save(path, self.models, self.optims, epoch=epoch, step=None if first is None else first.steps(),
             seed=self.seed, config=self.config, history=dict(hist), **self.arrays)

    def after_epoch(self, epoch, hist):
        """Saves as configured; returns whether the regular checkpoint was written."""
        saved = (epoch + 1) % self.every == 0 or epoch == self.epochs - 1
        if saved:
            self.save(epoch, hist, self.path)
        if self.best and hist.best_epoch == hist.epochs - 1:
            self.save(epoch, hist, self.best_path)
        return saved


def load_torch(path, model, strict=True, key=None):
    """Load a PyTorch file (``torch.save(model.state_dict(), path)``) into a kdcore model.

    The file is read with ``torch.load(..., map_location="cpu", weights_only=True)``: only
    tensors and plain containers are unpickled, never arbitrary objects, so a hostile file
    raises instead of running code. ``key`` picks a nested state dict (e.g. RepDistiller's
    checkpoints keep it under ``"model"``). Keys, shapes and values are checked as in
    ``Module.load_state_dict``. Needs torch installed; kdcore itself never pickles.
    """
    _check_path(path)
    if not isinstance(model, Module):
        raise TypeError(f"model must be a kdcore.nn.Module, got {type(model).__name__}")
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str or None, got {type(key).__name__}")
    strict = _check_bool("strict", strict)
    try:
        import torch
    except ImportError as e:
        raise ImportError("load_torch needs PyTorch (pip install torch); kdcore's own files need "
                          "kdcore.load") from e
    import pickle
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise type(e)(e.errno, f"load_torch: cannot read path {os.fsdecode(path)!r}: {e.strerror}") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        # weights_only refuses anything but tensors and plain containers (UnpicklingError),
        # and a truncated or non-PyTorch file fails to parse: both name the file.
        raise ValueError(f"load_torch: {os.fsdecode(path)} is not a weights-only PyTorch state dict "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if key is not None:
        if not isinstance(sd, dict) or key not in sd:
            raise KeyError(f"load_torch: key {key!r} is not an entry of {os.fsdecode(path)}"
                           + (f" (entries: {sorted(map(str, sd))[:10]})" if isinstance(sd, dict) else ""))
        sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"load_torch: {os.fsdecode(path)} holds a {type(sd).__name__}, not a state dict "
                         "(pass key= if it is nested)")
    model.load_state_dict(sd, strict=strict)
    return model
