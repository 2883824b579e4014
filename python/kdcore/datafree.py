"""Data-free distillation: the student never sees a training image.

DAFL (Chen et al. 2019, "Data-free learning of student networks"): a generator G turns
Gaussian noise into images; the frozen teacher classifies them, and G is trained so that
the teacher is confident on them (one-hot loss: cross-entropy against the teacher's own
argmax), excites its features (activation loss: -mean |f_T|, f_T the teacher's pooled
feature) and spreads them over the classes (information-entropy loss: sum_c pbar_c log10
pbar_c of the batch-mean prediction). On the same samples, detached, the student learns
the teacher's outputs by KD (T = 1, the authors' KL). One step updates both, as the
authors' loop does (one backward of the summed losses, then both optimizers).

Every step runs in C on the step engine: the generator is net 0 (fed pure noise: a data set
of zero vectors with Gaussian input noise of std 1, one vector per sample of an epoch), the
student reads its output detached, and the teacher reads it with gradient pass-through.
"""
from __future__ import annotations

import numpy as np

from . import _kdcore
from . import models as _models
from .datasets import Dataset
from .nn import Module, _check_float, _check_int
from .optim import Adam
from .training import _Common, _check_model

__all__ = ["dafl", "samples"]

_K = _kdcore.TERM_KINDS


def dafl(student, teacher, epochs=10, steps_per_epoch=120, batch_size=256, generator=None, latent_dim=100,
         lr_g=0.2, lr_s=2e-3, oh=1.0, ie=5.0, a=0.1, T=1.0, activation_tap=None, val=None, seed=0, progress=True,
         callback=None, nonfinite="raise"):
    """Distils ``student`` from ``teacher`` without data (DAFL); returns the student's History
    (the generator's terms ``onehot``, ``activation``, ``entropy`` and the student's ``kd``
    per epoch; ``val_acc`` on ``val``, a real data set, when given). The trained generator is
    ``student.generator`` afterwards.

    generator: a kdcore model from (N, latent_dim) noise to images of the teacher's input
    shape (default: ``kdcore.models.dafl_generator`` for it). lr_g, lr_s: Adam learning
    rates of generator and student (the authors' MNIST values). oh, ie, a: weights of the
    one-hot, information-entropy and activation losses (the authors' defaults). T: the KD
    temperature (1: the authors' loss; T^2 scaling as kdcore's KD). activation_tap: the
    teacher's feature tap for the activation loss (default: its ``feature_taps()['pooled']``).
    steps_per_epoch x batch_size noise vectors make one epoch."""
    _check_model(student, "student")
    _check_model(teacher, "teacher")
    if teacher is student:
        raise ValueError("the student cannot be its own teacher")
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
    batch_size = _check_int("batch_size", batch_size, 2)
    latent_dim = _check_int("latent_dim", latent_dim, 1)
    lr_g = _check_float("lr_g", lr_g, 0, lo_open=True)
    lr_s = _check_float("lr_s", lr_s, 0, lo_open=True)
    oh, ie, a = (_check_float(n, v, 0) for n, v in (("oh", oh), ("ie", ie), ("a", a)))
    T = _check_float("T", T, 0, lo_open=True)
    shape = getattr(teacher, "input_shape", None) or getattr(student, "input_shape", None)
    if generator is None:
        if not shape or len(shape) != 3:
            raise ValueError("the teacher has no known (C, H, W) input shape; pass a generator")
        generator = _models.dafl_generator(latent_dim, img_size=shape[1], channels=shape[0], seed=seed)
    elif not isinstance(generator, Module):
        raise TypeError(f"generator must be a kdcore model, got {type(generator).__name__}")
    tap = activation_tap if activation_tap is not None else (teacher.feature_taps() or {}).get("pooled")
    if tap is None:
        raise ValueError("the teacher has no default pooled-feature tap; give activation_tap (teacher.taps() lists them)")
    img = generator.net.shapes(1, latent_dim, 1, 1)[generator._output_index()]
    n_cls = teacher.net.shapes(1, *img)[teacher._output_index()][0]
    noise = Dataset(np.zeros((steps_per_epoch * batch_size, latent_dim), np.float32),
                    np.zeros(steps_per_epoch * batch_size, np.int64), num_classes=n_cls)
    c = _Common(noise, epochs, batch_size, Adam(lr=lr_s), None, None, None, val, seed, progress, 0.0, True, None,
                callback, 20, nonfinite)
    opt_s, opt_g = c.opt.bind(student), Adam(lr=lr_g).bind(generator)
    modes = _kdcore.MODES
    nets = [dict(net=generator.net, opt=opt_g, mode=modes["train"], noise=1.0, lr_scale=lr_g / lr_s, salt=0x6E4,
                 role="generator"),
            dict(net=student.net, opt=opt_s, mode=modes["train"], input=(0, -1), detach_input=True, salt=0x57D0,
                 role="student"),
            dict(net=teacher.net, mode=modes["eval"], input=(0, -1), grad_input=True, role="teacher")]
    tnode = teacher._tap_index(tap)
    terms = [dict(kind=_K["onehot"], a=(2, -1), src=[(2, -1)], weight=oh),
             dict(kind=_K["activation"], a=(2, tnode), weight=a),
             dict(kind=_K["entropy"], a=(2, -1), weight=ie),
             dict(kind=_K["kd"], a=(1, -1), src=[(2, -1)], T=T, weight=1.0)]
    labels = ["onehot", "activation", "entropy", "kd"]
    c.run_config.update(scheme="dafl", oh=oh, ie=ie, a=a, T=T, lr_g=lr_g, lr_s=lr_s, tap=tap)
    teacher.eval()

    def run(epoch, topts):
        st = _kdcore.step_epoch(nets, terms, c.train._c, epoch, topts, logits_net=1)
        row = {lab: v for lab, v in zip(labels, st["term_value"])}
        row.update(train_loss=st["net_loss"][1], lr=st["lr"], skipped_steps=st["skipped_steps"])
        return row

    hist = c.loop([student, generator], run, optimizers=[opt_s, opt_g], roles=["student", "generator"])
    student.generator = generator
    return hist


def samples(generator, n, latent_dim=None, seed=0):
    """n images from a trained generator (eval mode: BN running statistics), for inspection."""
    n = _check_int("n", n, 1)
    d = latent_dim or generator.input_shape[0]
    z = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    generator.eval()
    return generator.forward(z, grad=False)
