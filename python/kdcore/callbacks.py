"""Callbacks for the training entry points' ``callback=`` (fit, distill, mutual, slkd,
multi_exit and the schemes).

A callback is any callable ``callback(epoch, metrics) -> bool`` run after each epoch
(``True`` stops training). An object may also define ``on_train_begin(models)`` and
``on_train_end(models)``, which the loop calls with the models it trains (the first is the
one the History describes: the model, the student, peer 0), before the first epoch and
after the last, including one it stopped at.
"""
from __future__ import annotations

import numpy as np

from .nn import _check_bool, _check_float, _check_int, _is_choice

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` epochs (Keras' and
    Lightning's EarlyStopping); with ``restore_best``, the models end with the weights (and BN
    statistics) of the best epoch, kept in memory, bitwise.

    monitor: a History column logged every epoch ("val_acc", "val_loss", "train_loss", ...).
    mode: "max", "min" or "auto" (max for names containing "acc", else min). min_delta: how
    much better than the best so far counts as an improvement. After training, ``best_epoch``
    (0-based, as the History's ``epoch``), ``best`` (the monitored value there) and
    ``stopped_epoch`` (None if the run went to the end) describe what happened. The optimizer
    state is not rewound (as in Keras), and a checkpoint written during training holds the
    epoch it was written at.

        stop = kdcore.callbacks.EarlyStopping(monitor="val_acc", patience=3)
        kdcore.fit(model, train, epochs=50, val=test, callback=stop)
    """

    def __init__(self, monitor="val_acc", patience=3, mode="auto", min_delta=0.0, restore_best=True):
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a History column name (str), got {monitor!r}")
        if not _is_choice(mode, ("auto", "min", "max")):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.patience = _check_int("patience", patience, 0)
        self.mode = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.min_delta = _check_float("min_delta", min_delta, 0)
        self.restore_best = _check_bool("restore_best", restore_best)
        self.on_train_begin([])

    def on_train_begin(self, models):
        """Reset, and remember the models whose best weights to keep."""
        self._models = list(models)
        self.best = self.best_epoch = self.stopped_epoch = None
        self._wait = 0
        self._states = None

    def _improved(self, v):
        if self.best is None:
            return True
        return v > self.best + self.min_delta if self.mode == "max" else v < self.best - self.min_delta

    def __call__(self, epoch, metrics):
        """After each epoch: record an improvement (and the weights), or count towards patience."""
        if self.monitor not in metrics:
            raise ValueError(f"EarlyStopping: monitor={self.monitor!r} is not logged by this run (logged: "
                             f"{', '.join(sorted(metrics))}); 'val_*' columns need val=")
        v = float(metrics[self.monitor])
        if np.isfinite(v) and self._improved(v):
            self.best, self.best_epoch, self._wait = v, epoch, 0
            if self.restore_best:
                self._states = [m.state_dict() for m in self._models]
            return False
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, models):
        """Put back the best epoch's weights (restore_best)."""
        if self.restore_best and self._states is not None:
            for m, sd in zip(self._models, self._states):
                m.load_state_dict(sd)

    def __repr__(self):
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, mode={self.mode!r}, "
                f"min_delta={self.min_delta}, restore_best={self.restore_best})")
