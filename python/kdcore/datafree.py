"""Data-free distillation: the student never sees a training image.

Four methods: DAFL (``dafl``, a generator trained with the student), DeepInversion
(``deepinversion``, images optimised directly; the student is then distilled on them), and
the adversarial DFAD and ZSKT (``dfad``, ``zskt``: the generator plays against the student).

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

DFAD and ZSKT (dfad, zskt below): the generator ascends the student's
discrepancy from the teacher while the student descends it, in alternating steps that run
inside the C epoch as a step cycle (kd_step_cfg.cycle).

Viewing what a generator or DeepInversion made: ``image_grid`` tiles a batch into one array,
``plot_samples`` draws it (matplotlib), with the teacher's (or any) labels as titles.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

from . import _kdcore
from . import models as _models
from .datasets import Dataset
from . import nn as _nn
from . import optim as _optim
from .nn import Module, _check_bool, _check_float, _check_int
from .optim import SGD, Adam, _Optimizer
from .training import History, _Common, _check_model

__all__ = ["dafl", "samples", "deepinversion", "dfad", "zskt", "image_grid", "plot_samples"]

_K = _kdcore.TERM_KINDS


def _set_checkpointing(c, checkpoint, checkpoint_every, checkpoint_best, resume, config):
    """``_Common.set_checkpointing`` for the generator games. Without a real validation set
    the History's best epoch would be the lowest training loss, and that loss is measured on
    the generator's images, which change every epoch: it does not rank students."""
    c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume, config)
    if c.checkpoint_best and c.val is None:
        raise ValueError("checkpoint_best needs val=<a labelled data set>: the losses on generated images do not "
                         "rank students")


def dafl(student, teacher, epochs=10, steps_per_epoch=120, batch_size=256, generator=None, latent_dim=100,
         lr_g=0.2, lr_s=2e-3, oh=1.0, ie=5.0, a=0.1, T=1.0, activation_tap=None, val=None, seed=0, progress=True,
         callback=None, nonfinite="raise", checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False):
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
    steps_per_epoch x batch_size noise vectors make one epoch.
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``kdcore.fit``. The
    checkpoint holds the student and the generator (roles "student", "generator"; not the
    frozen teacher), both optimizers' states and step counts, the history, the epoch and the
    settings. The noise is drawn from (seed, epoch, step), so resuming continues after the
    saved epoch bitwise as the uninterrupted run (same settings, teacher and thread count);
    other settings are reported by a RuntimeWarning naming them, as in fit, and a generator
    or student of another shape raises ``kdcore.CheckpointMismatch``. checkpoint_best needs
    ``val``: the best epoch is the one of the highest val_acc (the losses on generated
    images do not rank students)."""
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
    _set_checkpointing(c, checkpoint, checkpoint_every, checkpoint_best, resume,
                       dict(scheme="dafl", oh=oh, ie=ie, a=a, T=T, lr_g=lr_g, lr_s=lr_s, tap=tap, latent_dim=latent_dim,
                            steps_per_epoch=steps_per_epoch))
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


def _bn_terms(teacher, weight):
    """One BN-statistics term per BatchNorm node of the teacher (net 1 of the step): it reads
    the node's input and is held to the node's running statistics."""
    teacher._build()
    g = teacher._graph
    terms = []
    for i, (kind, name, inp) in enumerate(zip(g.kinds, g.names, (nd[2] for nd in g.nodes))):
        if kind != _nn._BATCHNORM:
            continue
        if inp < 0:
            raise ValueError(f"the teacher's BatchNorm layer {name!r} reads the network input; DeepInversion's "
                             "feature term needs a layer before it")
        terms.append(dict(kind=_K["bnstat"], a=(1, inp), node=i, weight=weight))
    return terms


def deepinversion(teacher, n_images, iterations=2000, batch_size=256, labels=None, student=None, adi=None, bn=10.0,
                  tv=2.5e-5, l2=0.0, tv_l1=False, lr=0.05, betas=(0.9, 0.999), T=3.0, jitter=2, flip=False,
                  chunk=100, seed=0, optimizer=None, checkpoint=None, checkpoint_every=1, resume=False, callback=None):
    """Synthesises ``n_images`` images from a frozen ``teacher`` by DeepInversion (Yin et al.,
    CVPR 2020, "Dreaming to distill"); returns ``(images, labels, history)``: float32 NCHW
    images of the teacher's input shape, their int64 target labels, and a History with one row
    per chunk of ``chunk`` iterations of each batch (columns ``batch``, ``iteration``, the
    unweighted terms ``ce``, ``bn`` (summed over the BN layers), ``tv``, ``l2``, ``adi``, the
    weighted ``loss`` and ``teacher_acc``, the teacher's accuracy on the images against their
    labels; a term of weight 0 is not computed and logs 0).

    Each batch of ``batch_size`` images starts from N(0, 1) noise (seeded by ``seed`` and the
    batch index) and takes ``iterations`` Adam steps (``lr``, ``betas``; fresh state per batch)
    on the images x' = jitter(x)
    ``CE(teacher(x'), y) + bn * sum_l (||var_l - running_var_l|| + ||mu_l - running_mean_l||)
    + tv * TV(x') + l2 * ||x'|| [+ adi * (1 - JS(teacher(x'), student(x')))]``,
    where each step's jitter rolls the batch circularly by up to ``jitter`` pixels in H and W
    (and, with ``flip``, flips it horizontally with probability 1/2), with mu_l, var_l the batch statistics of the input of the teacher's BN layer l (biased
    variance), TV the l2 form (``tv_l1=True``: the l1 form) and JS the authors' clamped
    Jensen-Shannon divergence at temperature ``T``. The teacher runs in eval mode; with a
    ``student`` (Adaptive DeepInversion, ``adi`` default 0.2 then, else 0) the student runs in eval
    mode too and neither net changes. labels: one per image in [0, classes) (default
    ``i % classes``, the authors' CIFAR targets). Defaults: the authors' CIFAR-10 settings.
    optimizer: a ``kdcore.optim`` optimizer to use instead of ``Adam(lr, betas)`` (its own lr).
    Same seed, same bits.

    checkpoint: a path; after every ``checkpoint_every`` chunks of a batch and after its last
    chunk, the run is saved there atomically (``kdcore.save``; a safetensors file): the images
    of the finished batches (``images``), the current batch's images and its optimizer state
    (role "batch_images"), the batch and the iteration reached, the history, the labels and
    the settings (with SHA-256 digests of the teacher's and the student's state dicts).
    resume: if the checkpoint exists, restore it and continue with the next chunk; the result
    is bitwise the uninterrupted run's (same thread count). Different settings, labels,
    teacher or student raise ValueError naming them; a checkpoint written by another entry
    point raises ValueError; a malformed file raises OSError (the strict reader's). A resume
    of a finished run returns its result without a step. callback(i, metrics) runs after
    each chunk (and its checkpoint): i is the History row's index, metrics a copy of the row;
    returning True stops the run, which then returns the images and labels of the finished
    batches only (the checkpoint holds the rest of the state).

    The two-stage recipe: synthesise, then distil the student on the images with the existing
    loops, e.g. ``kdcore.distill(student, teacher, kdcore.datasets.from_arrays(images, labels,
    normalize=None), ...)``."""
    _check_model(teacher, "teacher")
    if student is not None:
        _check_model(student, "student")
        if student is teacher:
            raise ValueError("the student cannot be its own teacher")
    n_images = _check_int("n_images", n_images, 1)
    iterations = _check_int("iterations", iterations, 1)
    batch_size = _check_int("batch_size", batch_size, 2)
    chunk = _check_int("chunk", chunk, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if adi is None:
        adi = 0.2 if student is not None else 0.0
    bn, tv, l2, adi = (_check_float(n, v, 0) for n, v in (("bn", bn), ("tv", tv), ("l2", l2), ("adi", adi)))
    if adi > 0 and student is None:
        raise ValueError("adi > 0 needs a student (the competition term compares teacher and student)")
    if not isinstance(tv_l1, bool):
        raise TypeError(f"tv_l1 must be a bool, got {type(tv_l1).__name__}")
    lr = _check_float("lr", lr, 0, lo_open=True)
    T = _check_float("T", T, 0, lo_open=True)
    jitter = _check_int("jitter", jitter, 0)
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be a bool, got {type(flip).__name__}")
    if optimizer is None:
        optimizer = Adam(lr=lr, betas=betas)
    elif not isinstance(optimizer, _optim._Optimizer):
        raise TypeError(f"optimizer must be a kdcore.optim optimizer, got {type(optimizer).__name__}")
    lr = optimizer.lr
    shape = getattr(teacher, "input_shape", None)
    if not shape or len(shape) != 3:
        raise ValueError("the teacher has no known (C, H, W) input shape (a zoo model, or set teacher.input_shape)")
    shape = tuple(int(v) for v in shape)
    n_cls = teacher.net.shapes(1, *shape)[teacher._output_index()][0]
    if labels is None:
        labels = np.arange(n_images, dtype=np.int64) % n_cls
    else:
        lab = np.asarray(labels)
        if lab.shape != (n_images,) or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
            raise ValueError(f"labels must be {n_images} integers (one per image), got shape {lab.shape} of {lab.dtype}")
        if lab.size and (lab.min() < 0 or lab.max() >= n_cls):
            raise ValueError(f"labels must be in [0, {n_cls}) (the teacher's classes), got {lab.min()}..{lab.max()}")
        labels = lab.astype(np.int64)
    bn_terms = _bn_terms(teacher, bn) if bn > 0 else []
    if bn > 0 and not bn_terms:
        raise ValueError("the teacher has no BatchNorm layers for the feature term; pass bn=0 to run without it")
    if any(b * shape[1] * shape[2] < 2 for b in {min(batch_size, n_images), n_images % batch_size or batch_size}):
        raise ValueError("batch_size: a batch of one 1x1 image has no batch variance")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__}")
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    resume = _check_bool("resume", resume)
    if resume and checkpoint is None:
        raise ValueError("resume needs checkpoint=<path>")
    ck = None
    if checkpoint is not None:
        settings = dict(scheme="deepinversion", n_images=n_images, image_shape=list(shape), iterations=iterations,
                        batch_size=batch_size, chunk=chunk, seed=int(seed), optimizer=repr(optimizer), bn=bn, tv=tv,
                        l2=l2, tv_l1=tv_l1, adi=adi, T=T, jitter=jitter, flip=flip,
                        teacher=_state_digest(teacher), student=None if adi == 0 else _state_digest(student))
        ck = _InversionCheckpoint(os.fspath(checkpoint), checkpoint_every, resume, settings, labels)
    teacher.eval()
    if student is not None:
        student.eval()
    modes = _kdcore.MODES
    chw = shape[0] * shape[1] * shape[2]
    images = np.zeros((n_images,) + shape, np.float32)
    steps = min(chunk, iterations)
    n_batches = -(-n_images // batch_size)
    saved = ck.read(n_batches, steps) if ck is not None else None
    hist = History() if saved is None else saved["history"]
    for b, start in enumerate(range(0, n_images, batch_size)):
        if saved is not None and b < saved["batch"]:
            continue
        B = min(batch_size, n_images - start)
        y = labels[start:start + B]
        # The images are the weight of a bias-free linear layer fed the rows of an identity
        # matrix: row i selects image i exactly, and the weight's gradient is the images'.
        # Its output is the step's jittered batch, which every term reads.
        holder = _nn.Sequential(_nn.Linear(B, chw, bias=False), _nn.Unflatten(1, shape),
                                _nn.Jitter(jitter, 0.5 if flip else 0.0))
        x0 = np.random.default_rng([seed, b]).standard_normal((B, chw)).astype(np.float32)
        holder.load_state_dict({"0.weight": np.ascontiguousarray(x0.T)})
        opt = optimizer.bind(holder)
        done = 0
        if saved is not None and b == saved["batch"]:
            ck.restore(holder, opt, images)
            done = saved["iteration"]
        nets = [dict(net=holder.net, opt=opt, mode=modes["train"], salt=0x7177E5, role="images"),
                dict(net=teacher.net, mode=modes["eval"], input=(0, -1), grad_input=True, role="teacher")]
        terms = [dict(kind=_K["ce"], a=(1, -1), weight=1.0)] + bn_terms + [
            dict(kind=_K["tv"], a=(0, -1), l1=tv_l1, weight=tv),
            dict(kind=_K["l2prior"], a=(0, -1), weight=l2)]
        if adi > 0:
            nets.append(dict(net=student.net, mode=modes["eval"], input=(0, -1), grad_input=True, role="student"))
            terms.append(dict(kind=_K["adi"], a=(1, -1), src=[(2, -1)], grad=True, T=T, weight=adi))
        sel = np.tile(np.eye(B, dtype=np.float32), (steps, 1))
        ds = Dataset(sel, np.tile(y, steps), num_classes=n_cls)
        e = -(-done // steps)   # chunks done: the chunk index is the engine's epoch, which the jitter draws read
        while done < iterations:
            k = min(steps, iterations - done)
            # each batch its own jitter draws: the step seed mixes the batch index in
            topts = dict(batch_size=B, schedule=(0, lr, [], 0, 0.0, 0), shuffle=False, max_steps=k,
                         seed=(int(seed) * 1000003 + b) % 2**63)
            st = _kdcore.step_epoch(nets, terms, ds._c, e, topts, logits_net=1)
            v = st["term_value"]
            nb = len(bn_terms)
            row = dict(batch=b, iteration=done + k, ce=v[0], bn=float(sum(v[1:1 + nb])), tv=v[1 + nb],
                       l2=v[2 + nb], loss=float(sum(st["net_loss"][:len(nets)])), teacher_acc=st["term_accuracy"][0])
            if adi > 0:
                row["adi"] = v[3 + nb]
            hist.append(**row)
            done += k
            e += 1
            finished = start
            if done == iterations:
                images[start:start + B] = holder.state_dict()["0.weight"].T.reshape((B,) + shape)
                finished = start + B
            wrote = ck is not None and (e % ck.every == 0 or done == iterations)
            if wrote:
                ck.save(holder, opt, images, b, done, hist)
            if callback is not None and callback(len(hist["batch"]) - 1, dict(row)):
                if ck is not None and not wrote:   # stopping: keep the state reached
                    ck.save(holder, opt, images, b, done, hist)
                return images[:finished], labels[:finished], hist
    return images, labels, hist


def _state_digest(model):
    """SHA-256 of a model's state dict (keys and bytes): what a resume compares to know the
    teacher (and the student) are the ones the checkpoint was made with."""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


class _InversionCheckpoint:
    """DeepInversion's checkpoint, a kdcore.save file: the current batch's image holder and
    its optimizer (role "batch_images"), the arrays ``images`` (finished batches; zeros
    elsewhere) and ``labels``, and in the metadata the batch, the iteration reached in it, the
    history and the settings."""

    ROLE = "batch_images"

    def __init__(self, path, every, resume, settings, labels):
        self.path, self.every, self.resume = path, every, resume
        self.settings = json.loads(json.dumps(settings))
        self.labels = labels

    def save(self, holder, opt, images, batch, iteration, hist):
        from .checkpoint import save
        save(self.path, {self.ROLE: holder}, {self.ROLE: opt}, scheme="deepinversion", batch=batch,
             iteration=iteration, config=self.settings, history=dict(hist), images=images, labels=self.labels)

    def read(self, n_batches, steps):
        """The saved state's metadata ({'batch', 'iteration', 'history'}), or None without a
        resume or a file. Checks the settings, the labels and that the position fits them
        (steps: iterations per chunk); restores nothing yet."""
        if not self.resume or not os.path.exists(self.path):
            return None
        from .checkpoint import load
        st = load(self.path)
        cfg, b, it, hist = st.get("config"), st.get("batch"), st.get("iteration"), st.get("history")
        if st.get("scheme") != "deepinversion" or not isinstance(cfg, dict) or not isinstance(hist, dict):
            raise ValueError(f"{self.path} is not a DeepInversion checkpoint (no scheme 'deepinversion', settings "
                             "and history); use kdcore.load to read it")
        diff = [k for k in sorted(set(cfg) | set(self.settings)) if cfg.get(k) != self.settings.get(k)]
        if diff:
            what = {"teacher": "the teacher's weights", "student": "the student's weights"}
            raise ValueError(f"cannot resume from {self.path}: the run's settings differ from the checkpoint's: "
                             + "; ".join(f"{what.get(k, k)} ({_short(cfg.get(k))} in the checkpoint, "
                                         f"{_short(self.settings.get(k))} now)" for k in diff)
                             + ". Resume with the checkpoint's settings, or start a new checkpoint")
        lab = st.get("labels")
        if not isinstance(lab, np.ndarray) or lab.shape != self.labels.shape or not np.array_equal(lab, self.labels):
            raise ValueError(f"cannot resume from {self.path}: the labels differ from the checkpoint's")
        iterations = self.settings["iterations"]
        rows = hist.get("batch")
        ok = isinstance(b, int) and isinstance(it, int) and 0 <= b < n_batches and 0 < it <= iterations \
            and isinstance(rows, list) and len(rows) == b * -(-iterations // steps) + -(-it // steps)
        if not ok:
            raise ValueError(f"{self.path}: corrupt DeepInversion checkpoint: batch {b!r}, iteration {it!r} and "
                             f"{len(rows) if isinstance(rows, list) else 'no'} history rows do not fit "
                             f"{n_batches} batches of {iterations} iterations")
        return dict(batch=b, iteration=it, history=hist)

    def restore(self, holder, opt, images):
        """The current batch's images and optimizer state, and the finished images, from the
        file (all checked before anything is written)."""
        from .checkpoint import _load
        _load(self.path, {self.ROLE: holder}, {self.ROLE: opt}, exact_roles=True, arrays={"images": images})


def _short(v):
    """A setting's value for an error message: digests cut to 12 hex digits."""
    return repr(v[:12] + "...") if isinstance(v, str) and len(v) == 64 else repr(v)


# ---- Adversarial data-free distillation (DFAD, ZSKT) --------------------------------------
# One engine configuration for both: the generator (net 0, fed noise), the student (net 1,
# reading the generator's images with the gradient passed back) and the frozen teacher (net 2,
# grad_input). A step cycle alternates a generator phase, in which a reversed copy of the
# discrepancy reaches the generator through both networks, with student phases, in which the
# student descends the discrepancy (and ZSKT's attention terms) on images from the generator.

def _phase_masks(n_g, n_s, generator_first):
    """(generator's, student's) phases of a cycle of n_g + n_s steps, the generator's first
    (ZSKT) or last (DFAD)."""
    gen = ((1 << n_g) - 1) << (0 if generator_first else n_s)
    return gen, ((1 << (n_g + n_s)) - 1) & ~gen


def _adversarial_step(generator, student, teacher, bg, bs, lr_ratio, kind, disc_weight, at_pairs, beta, gen_mask,
                      stu_mask, clip_norm=0.0):
    """The engine configuration (nets, terms, History labels of the terms but the last): the
    student's discrepancy and attention terms in its phases, the reversed discrepancy in the
    generator's. bg, bs: bound optimizers; lr_ratio: the generator's lr over the student's;
    clip_norm: both nets' gradient-norm clipping (0: none)."""
    modes = _kdcore.MODES
    nets = [dict(net=generator.net, opt=bg, mode=modes["train"], noise=1.0, lr_scale=lr_ratio, salt=0xADF6,
                 phases=gen_mask, clip_norm=clip_norm, role="generator"),
            dict(net=student.net, opt=bs, mode=modes["train"], input=(0, -1), phases=stu_mask, salt=0xADF5,
                 clip_norm=clip_norm, role="student"),
            dict(net=teacher.net, mode=modes["eval"], input=(0, -1), grad_input=True, role="teacher")]
    disc = dict(kind=_K[kind], a=(1, -1), src=[(2, -1)], weight=disc_weight, T=1.0)
    terms = [dict(disc, phases=stu_mask)]
    labels = [kind]
    for j, (s_tap, t_tap) in enumerate(at_pairs):
        terms.append(dict(kind=_K["at"], a=(1, student._tap_index(s_tap)), src=[(2, teacher._tap_index(t_tap))],
                          weight=beta, phases=stu_mask))
        labels.append("at" if j == 0 else f"at_{j + 1}")
    terms.append(dict(disc, phases=gen_mask, grad=True, reverse=True))
    return nets, terms, labels


def _adversarial(student, teacher, *, scheme, kind, epochs, iters, batch_size, generator, latent_dim, opt_s, opt_g,
                 schedule, n_g, n_s, generator_first, cycle_batch, disc_weight, at_pairs, beta, val, seed, progress,
                 callback, nonfinite, clip_norm=0.0, checkpoint=None, checkpoint_every=1, checkpoint_best=False,
                 resume=False):
    _check_model(student, "student")
    _check_model(teacher, "teacher")
    if teacher is student:
        raise ValueError("the student cannot be its own teacher")
    iters = _check_int("iters_per_epoch", iters, 1)
    batch_size = _check_int("batch_size", batch_size, 2)
    latent_dim = _check_int("latent_dim", latent_dim, 1)
    n_g = _check_int("n_g", n_g, 1)
    n_s = _check_int("n_s", n_s, 1)
    if n_g + n_s > _kdcore.STEP_MAX_PHASES:
        raise ValueError(f"n_g + n_s ({n_g + n_s}) must be at most {_kdcore.STEP_MAX_PHASES} (steps of one iteration)")
    for name, o in (("student_optimizer", opt_s), ("generator_optimizer", opt_g)):
        if not isinstance(o, _Optimizer):
            raise TypeError(f"{name} must be a kdcore.optim optimizer (SGD, Adam, AdamW), got {type(o).__name__}")
    if not opt_s.lr > 0 or not opt_g.lr > 0:
        raise ValueError("student_optimizer and generator_optimizer need a learning rate > 0")
    shape = getattr(teacher, "input_shape", None) or getattr(student, "input_shape", None)
    if generator is None:
        if not shape or len(shape) != 3:
            raise ValueError("the teacher has no known (C, H, W) input shape; pass a generator")
        tanh = scheme == "dfad"   # DFAD's GeneratorA ends Tanh -> BN, ZSKT's conv -> BN
        generator = _models.dafl_generator(latent_dim, img_size=shape[1], channels=shape[0], seed=seed, bn_eps=1e-5,
                                           tanh=tanh)
    elif not isinstance(generator, Module):
        raise TypeError(f"generator must be a kdcore model, got {type(generator).__name__}")
    if generator is student or generator is teacher:
        raise ValueError("generator must be a model of its own, not the student or the teacher")
    img = generator.net.shapes(1, latent_dim, 1, 1)[generator._output_index()]
    t_out = teacher.net.shapes(1, *img)
    n_cls = t_out[teacher._output_index()][0]
    s_out = student.net.shapes(1, *img)
    if s_out[student._output_index()][0] != n_cls:
        raise ValueError(f"the student outputs {s_out[student._output_index()][0]} values, the teacher {n_cls}")
    cycle = n_g + n_s
    gen_mask, stu_mask = _phase_masks(n_g, n_s, generator_first)
    rows = iters * batch_size * (1 if cycle_batch else cycle)
    noise = Dataset(np.zeros((rows, latent_dim), np.float32), np.zeros(rows, np.int64), num_classes=n_cls)
    c = _Common(noise, epochs, batch_size, opt_s, None, schedule, None, val, seed, progress, 0.0, True, None,
                callback, 20, nonfinite)
    n_steps = iters * cycle
    c.steps = lambda: n_steps   # engine steps of an epoch (with cycle_batch, cycle per batch)
    bs, bg = opt_s.bind(student), opt_g.bind(generator)
    nets, terms, labels = _adversarial_step(generator, student, teacher, bg, bs, opt_g.lr / opt_s.lr, kind, disc_weight,
                                            at_pairs, beta, gen_mask, stu_mask, clip_norm)
    _set_checkpointing(c, checkpoint, checkpoint_every, checkpoint_best, resume,
                       dict(scheme=scheme, n_g=n_g, n_s=n_s, iters_per_epoch=iters, disc_weight=disc_weight, beta=beta,
                            clip_norm=clip_norm, at_taps=[list(p) for p in at_pairs], latent_dim=latent_dim,
                            generator_optimizer=repr(opt_g)))
    teacher.eval()

    def run(epoch, topts):
        st = _kdcore.step_epoch(nets, terms, c.train._c, epoch, topts, logits_net=1, cycle=cycle,
                                cycle_batch=cycle_batch)
        v = st["term_value"]
        row = {lab: v[j] for j, lab in enumerate(labels)}
        s_loss = disc_weight * v[0] + beta * sum(v[1:len(labels)])
        row.update(student_loss=s_loss, generator_loss=-disc_weight * v[-1], train_loss=s_loss, lr=st["lr"],
                   skipped_steps=st["skipped_steps"])
        return row

    hist = c.loop([student, generator], run, optimizers=[bs, bg], roles=["student", "generator"])
    student.generator = generator
    return hist


def dfad(student, teacher, epochs=40, iters_per_epoch=50, batch_size=512, generator=None, latent_dim=100,
         student_optimizer=None, generator_optimizer=None, schedule=None, n_s=5, val=None, seed=0, progress=True,
         callback=None, nonfinite="raise", checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False):
    """Distils ``student`` from ``teacher`` without data by DFAD (Fang et al. 2019, "Data-Free
    Adversarial Distillation"); returns the student's History (``l1``: the student's mean
    absolute logit difference on its steps; ``student_loss`` (the same), ``generator_loss``
    (-L1 on the generator's steps) per epoch; ``val_acc`` on ``val``, a real data set, when
    given). The trained generator is ``student.generator`` afterwards.

    One iteration: n_s student steps, each on a fresh batch of generated images (detached),
    minimising mean |z_s - z_t| (F.l1_loss); then one generator step on a fresh batch with loss
    -mean |z_s - z_t|, the gradient flowing through the frozen teacher and through the student
    (not updated in that step). An epoch is iters_per_epoch iterations, all inside one C call.
    Defaults are the authors' MNIST script: batch 512, 40 epochs of 50 iterations, the student
    SGD(lr 0.01, momentum 0.9, weight decay 1e-4), the generator Adam(lr 1e-3), no schedule
    (their CIFAR script: batch 256, SGD lr 0.1 with weight decay 5e-4, latent 256, 500 epochs,
    MultiStep([100, 200])). The generator's learning rate follows the student's schedule at the
    ratio of the two optimizers' lr. generator: a kdcore model from (N, latent_dim) noise to
    the teacher's input (default: ``dafl_generator(..., bn_eps=1e-5)``, DFAD's GeneratorA: its
    last BN, after the Tanh, has no affine parameters).
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``dafl`` (the student,
    the generator and both optimizers are saved; the noise is drawn from (seed, epoch, step))."""
    opt_s = SGD(lr=0.01, momentum=0.9, weight_decay=1e-4) if student_optimizer is None else student_optimizer
    opt_g = Adam(lr=1e-3) if generator_optimizer is None else generator_optimizer
    return _adversarial(student, teacher, scheme="dfad", kind="l1", epochs=epochs, iters=iters_per_epoch,
                        batch_size=batch_size, generator=generator, latent_dim=latent_dim, opt_s=opt_s, opt_g=opt_g,
                        schedule=schedule, n_g=1, n_s=n_s, generator_first=False, cycle_batch=False,
                        disc_weight=1.0, at_pairs=[], beta=0.0, val=val, seed=seed, progress=progress,
                        callback=callback, nonfinite=nonfinite, checkpoint=checkpoint,
                        checkpoint_every=checkpoint_every, checkpoint_best=checkpoint_best, resume=resume)


def _zskt_at_pairs(student, teacher, at_taps, img):
    """The (student tap, teacher tap) pairs of ZSKT's attention terms: given, or the models'
    stage taps paired in order; their maps must have the same spatial size."""
    if img is None:
        raise ValueError("the teacher has no known (C, H, W) input shape for the attention maps; pass a generator")
    if at_taps is None:
        fs, ft = (student.feature_taps() or {}).get("stages"), (teacher.feature_taps() or {}).get("stages")
        if not fs or not ft or len(fs) != len(ft):
            raise ValueError("beta > 0 needs matching stage taps: the student and the teacher have no default stages "
                             "of the same count; give at_taps=[(student_tap, teacher_tap), ...] or beta=0")
        at_taps = list(zip(fs, ft))
    if not isinstance(at_taps, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in at_taps):
        raise TypeError("at_taps must be a list of (student_tap, teacher_tap) pairs")
    ss, ts = student.net.shapes(1, *img), teacher.net.shapes(1, *img)
    pairs = []
    for s_tap, t_tap in at_taps:
        a, b = ss[student._tap_index(s_tap)], ts[teacher._tap_index(t_tap)]
        if len(a) != 3 or len(b) != 3 or a[1:] != b[1:]:
            raise ValueError(f"at_taps: the student's {s_tap!r} is {tuple(a)} and the teacher's {t_tap!r} is "
                             f"{tuple(b)}; ZSKT's attention maps need the same spatial size (or beta=0)")
        pairs.append((s_tap, t_tap))
    return pairs


def zskt(student, teacher, epochs=10, iters_per_epoch=50, batch_size=128, generator=None, latent_dim=100,
         student_optimizer=None, generator_optimizer=None, schedule="cosine", n_g=1, n_s=10, beta=None,
         at_taps=None, kl_weight=None, clip_norm=5.0, val=None, seed=0, progress=True, callback=None,
         nonfinite="raise", checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False):
    """Distils ``student`` from ``teacher`` without data by ZSKT (Micaelli & Storkey 2019,
    "Zero-shot Knowledge Transfer via Adversarial Belief Matching"); returns the student's
    History (``kd``: KL(p_t || p_s) at T 1 on the student's steps; ``at``, ``at_2``, ...: the
    attention terms; ``student_loss`` = kl_weight kd + beta sum(at), ``generator_loss`` =
    -kl_weight KL on the generator's steps, per epoch; ``val_acc`` on ``val`` when given). The
    trained generator is ``student.generator`` afterwards.

    One iteration draws one batch of noise z and uses it for n_g generator steps (loss -KL,
    the gradient through the frozen teacher and the student, which is not updated) and then
    n_s student steps (KL + beta sum_l AT_l on the generator's images, detached), as the
    authors' repeated pseudo-batch. Defaults are the authors' CIFAR-10 script: n_g 1, n_s 10,
    batch 128, latent 100, Adam with lr 2e-3 (student) and 1e-3 (generator), cosine annealing,
    beta 250 per stage pair; they run 80,000 iterations (epochs x iters_per_epoch here). Their
    F.kl_div uses reduction 'mean', an average over samples and classes: kl_weight (default
    1 / classes) reproduces it on kdcore's batch-mean KL. AT is the attention-transfer code
    form (RepDistiller's, the authors' attention_diff) on at_taps, pairs of (student tap,
    teacher tap) whose maps have the same spatial size (default: the zoo models' stage taps,
    as between WRN-16-1 and WRN-16-2); beta=0 turns AT off. beta=None (default): 250 when
    at_taps are given or the default stage taps pair up with maps of the same spatial size;
    otherwise 0, with a warning that says why. clip_norm: each net's gradient is scaled to an L2 norm of at most clip_norm before
    its update, as the authors' clip_grad_norm_ (0: no clipping). generator default:
    ``dafl_generator(..., bn_eps=1e-5, tanh=False)``, the authors' layout. Not reproduced:
    their cosine schedule moves per iteration, here per epoch.
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``dafl`` (the student,
    the generator and both optimizers are saved; the noise is drawn from (seed, epoch, step))."""
    clip_norm = _check_float("clip_norm", clip_norm, 0)
    opt_s = Adam(lr=2e-3) if student_optimizer is None else student_optimizer
    opt_g = Adam(lr=1e-3) if generator_optimizer is None else generator_optimizer
    _check_model(student, "student")
    _check_model(teacher, "teacher")
    shape = getattr(teacher, "input_shape", None) or getattr(student, "input_shape", None)
    if kl_weight is None:
        if not shape or len(shape) != 3:
            raise ValueError("the teacher has no known (C, H, W) input shape; pass kl_weight and a generator")
        kl_weight = 1.0 / teacher.net.shapes(1, *shape)[teacher._output_index()][0]
    kl_weight = _check_float("kl_weight", kl_weight, 0, lo_open=True)
    img = tuple(shape) if shape and len(shape) == 3 else None
    if generator is not None and isinstance(generator, Module):
        img = tuple(generator.net.shapes(1, _check_int("latent_dim", latent_dim, 1), 1, 1)[generator._output_index()])
    if beta is None and at_taps is None:
        try:
            pairs, beta = _zskt_at_pairs(student, teacher, None, img), 250.0
        except ValueError as e:
            warnings.warn(f"zskt: no attention transfer (beta=0, KL only): {e}", stacklevel=2)
            pairs, beta = [], 0.0
    else:
        beta = 250.0 if beta is None else _check_float("beta", beta, 0)
        pairs = _zskt_at_pairs(student, teacher, at_taps, img) if beta > 0 else []
    return _adversarial(student, teacher, scheme="zskt", kind="kd", epochs=epochs, iters=iters_per_epoch,
                        batch_size=batch_size, generator=generator, latent_dim=latent_dim, opt_s=opt_s, opt_g=opt_g,
                        schedule=schedule, n_g=n_g, n_s=n_s, generator_first=True, cycle_batch=True,
                        disc_weight=kl_weight, at_pairs=pairs, beta=beta, val=val, seed=seed, progress=progress,
                        callback=callback, nonfinite=nonfinite, clip_norm=clip_norm, checkpoint=checkpoint,
                        checkpoint_every=checkpoint_every, checkpoint_best=checkpoint_best, resume=resume)


def image_grid(images, ncols=8, pad=1, normalize=True):
    """The images (N, C, H, W) or (N, H, W), C = 1 or 3, tiled row-major into one array: (rows*(H+pad)-pad,
    ncols*(W+pad)-pad) for one channel, with a trailing axis of 3 for three. normalize: each image
    scaled to [0, 1] by its own minimum and maximum (a constant image becomes 0), as generated images
    have no fixed range; else the values are kept. The gaps between tiles and the unused cells of the
    last row are 0."""
    x = np.asarray(images)
    if x.dtype.kind != "f":
        raise TypeError(f"images must be floating point, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) with C = 1 or 3, or (N, H, W), N >= 1; got shape {np.shape(images)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or infinite values")
    ncols = _check_int("ncols", ncols, 1)
    pad = _check_int("pad", pad, 0)
    n, c, h, w = x.shape
    x = x.astype(np.float64)
    if normalize:
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        span = x.max(axis=(1, 2, 3), keepdims=True) - lo
        x = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)
    cols = min(ncols, n)
    rows = -(-n // cols)
    grid = np.zeros((c, rows * (h + pad) - pad, cols * (w + pad) - pad))
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = x[i]
    return grid[0] if c == 1 else np.moveaxis(grid, 0, -1)


def plot_samples(images, labels=None, ncols=8, class_names=None, ax=None):
    """Draws ``image_grid(images, ncols)`` (each image scaled to its own range; grey for one
    channel) with one title per tile when labels (N integers) are given -- e.g. the teacher's
    predictions, ``teacher.predict(images).argmax(1)``. class_names maps a label to its text.
    Returns the matplotlib Figure (a new one, or ax's)."""
    from .metrics import _figure
    x = np.asarray(images)
    grid = image_grid(x, ncols=ncols, pad=1, normalize=True)
    n = x.shape[0]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be {n} integers (one per image), got shape {labels.shape} dtype {labels.dtype}")
    cols = min(_check_int("ncols", ncols, 1), n)
    rows = -(-n // cols)
    fig, ax = _figure(ax, "plot_samples", (1.1 * cols, 1.25 * rows))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if labels is not None:
        h, w = x.shape[-2], x.shape[-1]
        for i, lab in enumerate(labels.tolist()):
            r, q = divmod(i, cols)
            text = class_names[lab] if class_names is not None else str(lab)
            ax.text(q * (w + 1) + w / 2, r * (h + 1) - 0.5, text, ha="center", va="bottom", fontsize=7)
    return fig
