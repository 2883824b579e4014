"""Optimizer and learning-rate schedule descriptions (PyTorch semantics; the updates run in C).

An optimizer here is a recipe: ``fit``/``distill`` bind it to a model's parameter block.
``opt.bind(model)`` gives a stepping object for custom loops.
"""
from __future__ import annotations

from . import _kdcore
from .nn import Module, _check_bool, _check_float, _check_int

__all__ = ["SGD", "Adam", "AdamW", "Constant", "MultiStep", "Cosine", "Cyclic", "make_optimizer", "make_schedule"]


class _Optimizer:
    _kind = 0

    def __init__(self, lr, weight_decay=0.0, decay_bn_and_bias=True):
        self.lr = _check_float("lr", lr, 0)
        self.weight_decay = _check_float("weight_decay", weight_decay, 0)
        self.decay_bn_and_bias = _check_bool("decay_bn_and_bias", decay_bn_and_bias)

    def _kwargs(self):
        return dict(weight_decay=self.weight_decay, decay_bn_and_bias=self.decay_bn_and_bias)

    def bind(self, model):
        """A C optimizer over ``model``'s parameters: ``.step(lr)`` applies one update."""
        if not isinstance(model, Module):
            raise TypeError(f"model must be a kdcore.nn.Module, got {type(model).__name__}")
        return _kdcore.Optimizer(model.net, self._kind, self.lr, **self._kwargs())

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in dict(lr=self.lr, **self._kwargs()).items())
        return f"{type(self).__name__}({args})"


class SGD(_Optimizer):
    """torch.optim.SGD: momentum, dampening, nesterov, L2 weight decay added to the gradient."""
    _kind = 0

    def __init__(self, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, dampening=0.0,
                 decay_bn_and_bias=True):
        super().__init__(lr, weight_decay, decay_bn_and_bias)
        self.momentum = _check_float("momentum", momentum, 0, 1, hi_open=True)
        self.dampening = _check_float("dampening", dampening, 0, 1)
        self.nesterov = _check_bool("nesterov", nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")

    def _kwargs(self):
        return dict(momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov, **super()._kwargs())


class Adam(_Optimizer):
    """torch.optim.Adam (weight decay as L2 added to the gradient)."""
    _kind = 1

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_bn_and_bias=True):
        super().__init__(lr, weight_decay, decay_bn_and_bias)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError("betas must be a pair (beta1, beta2)")
        self.betas = (_check_float("betas[0]", betas[0], 0, 1, hi_open=True),
                      _check_float("betas[1]", betas[1], 0, 1, hi_open=True))
        self.eps = _check_float("eps", eps, 0, lo_open=True)

    def _kwargs(self):
        return dict(beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, **super()._kwargs())


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay: p -= lr * wd * p)."""
    _kind = 2

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, decay_bn_and_bias=True):
        super().__init__(lr, betas, eps, weight_decay, decay_bn_and_bias)


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(spec, lr=None):
    """An optimizer from an instance, or a name ('sgd', 'adam', 'adamw') with defaults."""
    return _make_optimizer(spec, lr, "optimizer")


def _make_optimizer(spec, lr, name):
    if isinstance(spec, _Optimizer):
        return spec
    if isinstance(spec, str):
        cls = _BY_NAME.get(spec.lower())
        if cls is None:
            raise ValueError(f"{name} must be one of {sorted(_BY_NAME)} or an optimizer object, got {spec!r}")
        return cls() if lr is None else cls(lr=lr)
    raise TypeError(f"{name} must be a str or a kdcore.optim optimizer, got {type(spec).__name__}")


class _Schedule:
    _kind = 0

    def __init__(self, warmup_epochs=0):
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)

    def _tuple(self, base_lr, epochs):
        return (self._kind, base_lr, [], 0, 0.0, self.warmup_epochs)

    def _gamma(self):
        return 0.1

    def lr(self, base_lr, epoch, epochs, step=0, steps_per_epoch=1):
        """The learning rate at (epoch, step), as the C loop computes it."""
        base_lr = _check_float("base_lr", base_lr, 0)
        epoch, epochs = _check_int("epoch", epoch, 0), _check_int("epochs", epochs, 1)
        step, steps_per_epoch = _check_int("step", step, 0), _check_int("steps_per_epoch", steps_per_epoch, 1)
        return _kdcore.schedule_lr(self._tuple(base_lr, epochs), self._gamma(), epoch, step, steps_per_epoch)


class Constant(_Schedule):
    """Constant learning rate (optionally after a linear warm-up)."""


class MultiStep(_Schedule):
    """lr *= gamma at each milestone epoch (0-based: from that epoch on), like torch MultiStepLR."""
    _kind = 1

    def __init__(self, milestones, gamma=0.1, warmup_epochs=0):
        super().__init__(warmup_epochs)
        if not isinstance(milestones, (list, tuple)):
            raise TypeError("milestones must be a list of epochs")
        self.milestones = sorted(_check_int("milestones[]", m, 0) for m in milestones)
        if len(self.milestones) > 16:
            raise ValueError("at most 16 milestones")
        self.gamma = _check_float("gamma", gamma, 0, lo_open=True)

    def _gamma(self):
        return self.gamma

    def _tuple(self, base_lr, epochs):
        return (self._kind, base_lr, self.milestones, 0, 0.0, self.warmup_epochs)

    def __repr__(self):
        return f"MultiStep(milestones={self.milestones}, gamma={self.gamma}, warmup_epochs={self.warmup_epochs})"


class Cosine(_Schedule):
    """Cosine annealing to ``min_lr`` over ``T_max`` epochs (default: the run's epochs)."""
    _kind = 2

    def __init__(self, T_max=None, min_lr=0.0, warmup_epochs=0):
        super().__init__(warmup_epochs)
        self.T_max = None if T_max is None else _check_int("T_max", T_max, 1)
        self.min_lr = _check_float("min_lr", min_lr, 0)

    def _tuple(self, base_lr, epochs):
        return (self._kind, base_lr, [], self.T_max or epochs, self.min_lr, self.warmup_epochs)

    def __repr__(self):
        return f"Cosine(T_max={self.T_max}, min_lr={self.min_lr}, warmup_epochs={self.warmup_epochs})"


class Cyclic(_Schedule):
    """Cosine annealing with warm restarts (SGDR), as torch's
    ``CosineAnnealingWarmRestarts(T_0=cycle_epochs, T_mult=1, eta_min=min_lr)`` stepped once
    per epoch: at epoch e the lr is ``min_lr + (lr - min_lr) * (1 + cos(pi * (e mod
    cycle_epochs) / cycle_epochs)) / 2``, so it jumps back to ``lr`` every ``cycle_epochs``
    epochs (snapshot ensembles / snapshot distillation). ``warmup_epochs``: a linear per-step
    warm-up factor over the first epochs of the run, as for the other schedules."""
    _kind = 3

    def __init__(self, cycle_epochs, min_lr=0.0, warmup_epochs=0):
        super().__init__(warmup_epochs)
        self.cycle_epochs = _check_int("cycle_epochs", cycle_epochs, 1)
        self.min_lr = _check_float("min_lr", min_lr, 0)

    def _tuple(self, base_lr, epochs):
        return (self._kind, base_lr, [], self.cycle_epochs, self.min_lr, self.warmup_epochs)

    def __repr__(self):
        return f"Cyclic(cycle_epochs={self.cycle_epochs}, min_lr={self.min_lr}, warmup_epochs={self.warmup_epochs})"


def make_schedule(spec):
    """A schedule from the ``schedule=`` argument: None or "constant" (Constant), "cosine"
    (Cosine over the run), or a kdcore.optim schedule object (returned as is)."""
    if spec is None:
        return Constant()
    if isinstance(spec, _Schedule):
        return spec
    if isinstance(spec, str):
        if spec == "constant":
            return Constant()
        if spec == "cosine":
            return Cosine()
        raise ValueError(f"schedule must be 'constant', 'cosine' or a kdcore.optim schedule, got {spec!r}")
    raise TypeError(f"schedule must be None, a str or a kdcore.optim schedule, got {type(spec).__name__}")
