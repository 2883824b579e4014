"""Distillation: offline (one or several teachers), online (deep mutual learning, online
ensembles) and SLKD. Every epoch runs in C; Python picks the scheme and logs the History.

Weights, as the reference libraries (RepDistiller, mdistiller) use them:

* ``kd``: loss = ce_weight * CE(y, z_s) + kd_weight * T^2 KL(p_t^T || p_s^T), defaults
  ce_weight=0.1, kd_weight=0.9, T=4. In the surveys' eq. 2 (Dao; Wang & Yoon), L = alpha H(y, p_s) +
  beta H(p_t^T, p_s^T): alpha = ce_weight and beta = kd_weight (our KD term is the KL, which
  differs from H by the teacher entropy, a constant, and carries the T^2 factor).
* ``dkd``: loss = ce_weight * CE + kd_weight * w(e) * (alpha TCKD + beta NCKD), defaults
  ce_weight=1, kd_weight=1, alpha=1, beta=8, T=4, w(e) = min((e+1)/20, 1) (mdistiller).
* ``mse``: logit regression, loss = ce_weight * CE + kd_weight * mean((z_s - z_t)^2).
"""
from __future__ import annotations

import warnings

import numpy as np

from . import _kdcore
from . import losses as _losses
from .metrics import _kl_to_probs
from .nn import Module, _check_bool, _check_float, _check_int, _is_choice
from .optim import _make_optimizer, make_optimizer
from .training import History, _check_model, _Common, predict

__all__ = ["distill", "mutual", "slkd", "adversarial", "multi_exit", "exit_accuracies", "kl_divergence", "teacher_logits"]

_KINDS = {"ce": 0, "kd": 1, "dkd": 2, "mse": 3}
# Operations per image of the strong view's RandAugment (MLKD's loader: RandAugment(2, ...)).
_STRONG_RANDAUGMENT = 2
# method -> defaults (ce_weight, kd_weight, T, warmup_epochs)
_DEFAULTS = {"ce": (1.0, 0.0, 4.0, 0), "kd": (0.1, 0.9, 4.0, 0), "dkd": (1.0, 1.0, 4.0, 20), "mse": (1.0, 1.0, 4.0, 0)}
_MULTI = {"avg_prob": 0, "avg_loss": 1}
# multi_exit's weights when not given: BYOT's (1 - alpha, alpha) with alpha 0.3 without a
# teacher; KD's with one.
_EXIT_DEFAULTS = {"self": dict(ce_weight=0.7, kd_weight=0.3), "teacher": dict(ce_weight=0.1, kd_weight=0.9)}
# Scheme names users pass as distill's method, and the entry point that runs each.
_SCHEMES = {"mutual": "kdcore.mutual(models, train, ...)", "dml": "kdcore.mutual(models, train, ...)",
            "slkd": "kdcore.slkd(student, teacher, train, ...)",
            "adversarial": "kdcore.adversarial(student, teacher, train, ...)",
            "multi_exit": "kdcore.multi_exit(model, train, ...)", "byot": "kdcore.multi_exit(model, train, ...)",
            **{k: f"kdcore.{k}(...) (kdcore.schemes.{k})"
               for k in ("born_again", "takd", "dgkd", "snapshot_distill", "eskd", "tf_kd")},
            "ban": "kdcore.born_again(...) (kdcore.schemes.born_again)"}


def kl_divergence(p_logits, q_logits, T=1.0):
    """mean_i KL(softmax(p_i/T) || softmax(q_i/T)) (no T^2 factor), computed in C."""
    T = _check_float("T", T, 0, lo_open=True)
    loss, _ = _kdcore.kd_loss(np.ascontiguousarray(q_logits, np.float32), np.ascontiguousarray(p_logits, np.float32), T)
    return float(loss) / (T * T)


def _warn_warmup(what, warmup, weight, epochs, stacklevel):
    """A warm-up longer than the run leaves the term below its weight in every epoch: say so,
    with the weights it does get (the C loops' ramp, w(e) = weight * min((e+1)/warmup, 1))."""
    if warmup <= epochs:
        return
    ws = [weight * min((e + 1) / warmup, 1.0) for e in range(epochs)]
    shown = ", ".join(f"{w:.3g}" for w in ws[:6]) + (", ..." if epochs > 6 else "")
    warnings.warn(f"{what}: warmup_epochs={warmup} is longer than the run (epochs={epochs}), so the weight "
                  f"{weight:g} is never reached: the effective weights per epoch are {shown} (last {ws[-1]:.3g}). "
                  f"Pass warmup_epochs <= epochs (0: no warm-up) or train longer", UserWarning, stacklevel=stacklevel)


def teacher_logits(teacher, data, batch_size=512):
    """Eval-mode logits of a teacher (or the mean of several teachers' logits) on a Dataset."""
    return predict(teacher, data, batch_size=batch_size)


def _as_teachers(teacher):
    """A model, a list of models, a (N, V) logits array or a list of arrays."""
    items = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if not items:
        raise ValueError("teacher: give at least one teacher")
    if all(isinstance(t, Module) for t in items):
        return items, None
    if all(isinstance(t, np.ndarray) for t in items):
        return None, [np.ascontiguousarray(t, np.float32) for t in items]
    raise TypeError("teacher must be a kdcore model, a list of models, a logits array (N, classes) or a list of arrays")


def distill(student, teacher, train, method="kd", epochs=10, batch_size=128, optimizer="sgd", lr=None,
            schedule=None, augment=None, val=None, seed=0, progress=True, T=None, ce_weight=None, kd_weight=None,
            alpha=1.0, beta=8.0, warmup_epochs=None, kd_stop_epoch=None, conditional=False, teacher_weights=None,
            multi="avg_prob", learn_gates=False, gate_lr=0.1, teacher_drop=0.0, fickle=False, student_noise=0.0,
            tolerant=None, cache="auto",
            label_smoothing=0.0, drop_last=False, max_steps=None, callback=None, callback_every=20,
            checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False, nonfinite="raise", losses=None,
            hint_epochs=0, init_epochs=None, track_weights=False):
    """Offline distillation of ``student`` from ``teacher``; returns the student's History.

    teacher: a trained model, a list of models (multi-teacher), or precomputed logits
    ((N, classes) arrays aligned with ``train``). method: 'kd' (Hinton), 'dkd', 'mse' (logit
    regression) or 'ce' (no distillation term: the same loop trains a baseline). Weights and
    their defaults: see the module docstring; ``alpha``/``beta`` are DKD's; ce_weight and
    kd_weight override the method's weights of its cross-entropy and distillation terms.
    losses: a list of kdcore.losses terms, trained together instead of a method's recipe.
    hint_epochs: FitNet's two stages (method='fitnet'): that many hint-only epochs first.
    init_epochs: length of the initialisation phase of methods that have one (FSP, AB, FT;
    default epochs // 8). Training options (epochs, batch_size, optimizer, lr, schedule, augment,
    val, seed, progress, label_smoothing, drop_last, max_steps, callback, callback_every): as in
    ``kdcore.fit``.

    Options: warmup_epochs (linear ramp of the distillation weight; DKD default 20),
    kd_stop_epoch (switch the distillation term off from that epoch: ESKD),
    conditional (learn from the teacher where it is right, from the label where it is wrong),
    teacher_weights (gates of eq. 24 / per-teacher loss weights), learn_gates (learn the gates
    of eq. 24: weights softmax(w), w trained by SGD with gate_lr on the KD loss, starting from
    teacher_weights; logged per epoch as ``teacher_weights``. Minimising the student's KD loss
    over the gates favours the teachers closest to the student -- early on, weak high-entropy
    ones -- so this is an ablation tool more than a recipe), multi ('avg_prob': one KD
    term against the weighted mixture of softened teacher outputs, eq. 23-24; 'avg_loss': the
    weighted mean of per-teacher terms, as DGKD; DKD and MSE have no mixture form and always
    use the latter), teacher_drop (DGKD's random teacher drop),
    fickle (teachers run with dropout on, BN frozen), student_noise (Gaussian noise on the
    student's input only, eq. 7), tolerant=(weight, K) (the tolerant-teacher term of eq. 8 on
    the student's logits, to train teachers for later generations).
    cache: 'auto' computes teacher logits once when nothing random touches the teacher's
    input (no augmentation, no fickle dropout), True forces it, False runs the teachers every
    step. The History logs every loss term, train/val accuracy, the learning rate, the
    effective distillation weight and, with ``val``, KL(student || teacher) on it (T=1).
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``kdcore.fit``. The
    checkpoint holds the student (role "student"; teachers are not saved), its optimizer
    state, the learned gates, the history and the epoch; resuming continues after the saved
    epoch, bitwise as the uninterrupted run (same settings, teachers and thread count).
    nonfinite: 'raise' or 'skip', as in ``kdcore.fit`` (a dropped step leaves the learned gates
    as they were too). track_weights: the student's per-epoch weight changes, as in ``kdcore.fit``.
    """
    _check_model(student)
    track_weights = _check_bool("track_weights", track_weights)
    if losses is not None or (isinstance(method, str) and method in _losses.METHODS and method not in _KINDS):
        given = {k: v for k, v in dict(T=T, warmup_epochs=warmup_epochs, kd_stop_epoch=kd_stop_epoch,
                                       teacher_weights=teacher_weights).items() if v is not None}
        given.update({k: v for k, v in dict(alpha=alpha != 1.0, beta=beta != 8.0, conditional=conditional,
                                             multi=multi != "avg_prob", learn_gates=learn_gates,
                                             teacher_drop=teacher_drop != 0.0, fickle=fickle,
                                             student_noise=student_noise != 0.0, tolerant=tolerant is not None).items()
                      if v is True})
        if given:
            raise ValueError(f"{', '.join(sorted(given))} apply to method='kd'/'dkd'/'mse'; with losses= or a "
                             f"feature method, set them on the loss terms (kdcore.losses)")
        terms = _losses.method_terms(method) if losses is None else _losses.check_losses(losses)
        if losses is None:
            for t in terms:   # ce_weight / kd_weight: the weights of the recipe's CE and method terms
                if isinstance(t, _losses.CE) and ce_weight is not None:
                    t.weight = _check_float("ce_weight", ce_weight, 0)
                elif not isinstance(t, _losses.CE) and kd_weight is not None:
                    t.weight = _check_float("kd_weight", kd_weight, 0)
        elif ce_weight is not None or kd_weight is not None:
            raise ValueError("with losses=, give each term its weight (ce_weight/kd_weight are for method=)")
        def common(n_epochs):
            c = _Common(train, n_epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                        label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite)
            c.track_weights = track_weights
            return c
        hint_epochs = _check_int("hint_epochs", hint_epochs, 0)
        if hint_epochs:
            return _two_stage_fitnet(student, teacher, terms, hint_epochs, epochs, common, method, losses, checkpoint,
                                     cache)
        name = method if losses is None else "losses"
        init = [t for t in terms if t.phase in ("all", "init")]
        main = [t for t in terms if t.phase in ("all", "main")]
        if any(t.phase == "init" or t.needs_init for t in terms):
            # An initialisation phase (RepDistiller's --init_epochs for FSP, AB, FT): the
            # 'init' terms alone, then the 'main' ones. Default length: an eighth of the
            # epochs (RepDistiller's 30 of 240).
            n_init = max(1, epochs // 8) if init_epochs is None else _check_int("init_epochs", init_epochs, 1)
            if checkpoint is not None:
                raise ValueError("a method with an initialisation phase does not checkpoint yet; checkpoint "
                                 "each phase's distill call (losses with phase='init', then 'main')")
            from .schemes import _concat_histories
            h1 = _init_phase(student, teacher, common(n_init), init, name + "-init", cache)
            h2 = _distill_terms(student, teacher, common(epochs), main, name, cache, "main")
            return _concat_histories([h1, h2], "stage")
        if init_epochs:
            raise ValueError("init_epochs needs a loss term with phase='init' (method 'fsp', ...)")
        c = common(epochs)
        c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume, None)
        return _distill_terms(student, teacher, c, main, name, cache)
    if isinstance(method, str) and method.lower() in _SCHEMES:
        raise ValueError(f"method must be one of {sorted(_losses.METHODS)} (kdcore.distill); {method!r} is a "
                         f"training scheme of its own: call {_SCHEMES[method.lower()]}")
    if not _is_choice(method, _KINDS):
        raise ValueError(f"method must be one of {sorted(_losses.METHODS)} (kdcore.distill); mutual learning, SLKD, "
                         f"multi-exit, BAN, TAKD, DGKD, ... are kdcore.mutual, kdcore.slkd, kdcore.multi_exit and "
                         f"kdcore.schemes.*; got {method!r}")
    c = _Common(train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite)
    c.track_weights = track_weights
    learn_gates, fickle = _check_bool("learn_gates", learn_gates), _check_bool("fickle", fickle)
    d_ce, d_kd, d_T, d_warm = _DEFAULTS[method]
    opts = dict(kind=_KINDS[method],
                T=_check_float("T", d_T if T is None else T, 0, lo_open=True),
                ce_weight=_check_float("ce_weight", d_ce if ce_weight is None else ce_weight, 0),
                kd_weight=_check_float("kd_weight", d_kd if kd_weight is None else kd_weight, 0),
                dkd_alpha=_check_float("alpha", alpha, 0), dkd_beta=_check_float("beta", beta, 0),
                warmup_epochs=_check_int("warmup_epochs", d_warm if warmup_epochs is None else warmup_epochs, 0),
                kd_stop_epoch=0 if kd_stop_epoch is None else _check_int("kd_stop_epoch", kd_stop_epoch, 1),
                conditional=_check_bool("conditional", conditional), teacher_drop=_check_float("teacher_drop", teacher_drop, 0, 1, hi_open=True),
                teacher_mode=2 if fickle else 0, student_noise=_check_float("student_noise", student_noise, 0))
    if method != "ce":
        _warn_warmup(f"distill(method={method!r})", opts["warmup_epochs"], opts["kd_weight"], c.epochs, 3)
    if not _is_choice(multi, _MULTI):
        raise ValueError(f"multi must be one of {sorted(_MULTI)}, got {multi!r}")
    opts["multi"] = _MULTI[multi]
    if tolerant is not None:
        if not isinstance(tolerant, (tuple, list)) or len(tolerant) != 2:
            raise TypeError("tolerant must be a pair (weight, K)")
        opts["tolerant_weight"] = _check_float("tolerant weight", tolerant[0], 0)
        opts["tolerant_k"] = _check_int("tolerant K", tolerant[1], 2)
    nets, logits = (None, None) if method == "ce" else _as_teachers(teacher)
    n_teachers = 0 if method == "ce" else len(nets or logits)
    if method == "ce":
        opts["kind"] = 0
    weights = None
    if teacher_weights is not None:
        try:
            weights = np.asarray(teacher_weights, dtype=np.float32).ravel()
        except (TypeError, ValueError):
            raise TypeError(f"teacher_weights must be a sequence of numbers, got {teacher_weights!r}") from None
        if weights.size != n_teachers:
            raise ValueError(f"teacher_weights needs one value per teacher ({n_teachers}), got {weights.size}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("teacher_weights must be finite, >= 0 and not all 0")
        weights = weights / weights.sum()
    if not _is_choice(cache, ("auto", True, False)):
        raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
    c.check(student, "student")
    if nets is not None:
        for i, t in enumerate(nets):
            if t is student:
                raise ValueError("the student cannot be its own teacher; use student.copy()")
            c.check(t, "teacher" if len(nets) == 1 else f"teacher {i}")
        cacheable = not c.augmented and not fickle
        if cache is True and not cacheable:
            raise ValueError("teacher outputs cannot be cached with augmentation or a fickle teacher")
        if cache is True or (cache == "auto" and cacheable):
            logits = [predict(t, c.train, batch_size=512) for t in nets]
            nets = None
        else:
            for t in nets:
                t.eval()
    if logits is not None:
        for i, z in enumerate(logits):
            if z.ndim != 2 or z.shape[0] != len(c.train):
                raise ValueError(f"teacher logits [{i}] must be ({len(c.train)}, classes), got {z.shape}")
    gates = None
    if learn_gates:
        if method != "kd" or multi != "avg_prob" or n_teachers < 2:
            raise ValueError("learn_gates needs method='kd', multi='avg_prob' and at least 2 teachers")
        opts["gate_lr"] = _check_float("gate_lr", gate_lr, 0)
        w0 = np.full(n_teachers, 1.0 / n_teachers) if weights is None else weights
        gates = np.log(np.maximum(w0, 1e-12)).astype(np.float32)
    c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume,
                        dict(scheme="distill", method=method, n_teachers=n_teachers, learn_gates=learn_gates,
                             teacher_weights=None if weights is None else weights.tolist(), **opts))
    copt = c.opt.bind(student)
    val_teacher = None

    def extra():
        nonlocal val_teacher
        if val_teacher is None or gates is not None:
            w = weights
            if gates is not None:
                g = np.exp(gates - gates.max())
                w = (g / g.sum()).astype(np.float32)
            val_teacher = _val_teacher_probs(teacher, c.val, w)
        zs = predict(student, c.val, batch_size=512)
        return {"kl_student_teacher": _kl_to_probs(zs, val_teacher) if val_teacher is not None else float("nan")}

    def run(epoch, topts):
        st = _kdcore.distill_epoch(student.net, copt, c.train._c, epoch, topts, opts,
                                   teachers=None if nets is None else [t.net for t in nets],
                                   teacher_logits=logits, teacher_weights=weights, gates=gates)
        row = dict(train_loss=st["loss"], ce=st["ce"], kd=st["kd"])
        if method == "dkd":
            row.update(tckd=st["tckd"], nckd=st["nckd"])
        if tolerant is not None:
            row["tolerant"] = st["tolerant"]
        row.update(train_acc=st["accuracy"], lr=st["lr"], kd_weight=st["kd_weight"], skipped_steps=st["skipped_steps"])
        if method != "ce":
            row["teacher_train_acc"] = st["teacher_accuracy"]
        if gates is not None:
            g = np.exp(gates - gates.max())
            row["teacher_weights"] = (g / g.sum()).tolist()
        return row

    has_val_teacher = method != "ce" and (nets is not None or logits is not None) and \
        all(isinstance(t, Module) for t in (teacher if isinstance(teacher, (list, tuple)) else [teacher]))
    return c.loop([student], run, extra_metrics=extra if has_val_teacher else None, optimizers=[copt],
                  roles=["student"], extra_state=None if gates is None else {"gates": gates})


def _two_stage_fitnet(student, teacher, terms, hint_epochs, epochs, common, method, losses, checkpoint, cache):
    """FitNet as the paper trains it: stage 1 trains the student up to the hint layer on the
    hint loss alone (through the regressor) for hint_epochs; every parameter and BN statistic
    past the hint layer is then put back as it was, and stage 2 trains the whole student with
    Hinton KD (CE 0.1, KD 0.9, T 4). The History runs over both stages (column ``stage``)."""
    from .schemes import _concat_histories
    if method != "fitnet" or losses is not None:
        raise ValueError("hint_epochs is the two-stage form of method='fitnet'")
    if checkpoint is not None:
        raise ValueError("two-stage FitNet (hint_epochs) does not checkpoint; checkpoint each stage's distill call")
    hint = [t for t in terms if isinstance(t, _losses.Hint)]
    tap = hint[0].student_tap or (student.feature_taps() or {}).get("hint")
    if tap is None:
        raise ValueError("the student has no default hint tap; use losses=[kdcore.losses.FitNet(student_tap=...)]")
    h1 = _init_phase(student, teacher, common(hint_epochs), hint, "fitnet-hint", cache)
    h2 = _distill_terms(student, teacher, common(epochs), _losses.method_terms("kd"), "fitnet-kd", cache)
    return _concat_histories([h1, h2], "stage")


def _init_phase(student, teacher, c, terms, method, cache):
    """A phase that trains the student only up to the taps its terms read (FitNet's hint
    stage, the initialisation phase of FSP/AB): the layers past those taps get no gradient,
    and as in PyTorch, where such parameters have no .grad and the optimizer skips them, they
    leave the phase as they entered it (weight decay would otherwise shrink them)."""
    plan = _losses.build_plan(student, [teacher], c.train, terms, "init")
    nodes = [r[1] for t in plan.terms for r in [t["a"]] + ([t["a2"]] if "a2" in t else []) if r[0] == 0]
    nodes += [src[1] for _, src, _, _ in plan.connectors if src is not None and src[0] == 0]
    nodes += [r[1] for rs in plan.extra_inputs.values() for r in rs if r[0] == 0]
    nodes = [student._output_index() if n < 0 else n for n in nodes]
    before = student.state_dict()
    past = _nodes_past(student, nodes)
    hist = _distill_terms(student, teacher, c, terms, method, cache, "init")
    sd = student.state_dict()
    sd.update({k: before[k] for k in sd if k.rsplit(".", 1)[0] in past})
    student.load_state_dict(sd)
    return hist


def _nodes_past(model, node):
    """Names (state-dict prefixes) of the layers that are not on any path into `node` (an
    index or a list of them)."""
    g = model._graph
    on_path = set(node) if isinstance(node, (list, tuple, set)) else {node}
    for i in range(max(on_path, default=-1), -1, -1):
        if i in on_path:
            on_path.update(j for j in g.nodes[i][2:4] if j >= 0)
    return {model._key(n) for i, n in enumerate(g.names) if i not in on_path}


def _distill_terms(student, teacher, c, terms, method, cache, phase="all"):
    """distill() over loss terms: the step engine with the student, the teacher and the terms'
    connectors; the History logs every term."""
    if isinstance(teacher, (list, tuple)):
        raise ValueError("losses= takes one teacher model (several teachers: method='kd' with a list)")
    if not isinstance(teacher, Module):
        raise TypeError(f"teacher must be a kdcore model for feature distillation, got {type(teacher).__name__}")
    _check_model(teacher)
    if teacher is student:
        raise ValueError("the student cannot be its own teacher; use student.copy()")
    c.check(student, "student")
    c.check(teacher, "teacher")
    for t in terms:
        _warn_warmup(f"{type(t).__name__} term", t.warmup_epochs, t.weight, c.epochs, 4)
    plan = _losses.build_plan(student, [teacher], c.train, terms, phase)
    if not _is_choice(cache, ("auto", True, False)):
        raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
    views = plan.views()
    cacheable = not c.augmented and not plan.reads_teacher_taps() and views == [1] * len(views)
    if cache is True and not cacheable:
        raise ValueError("teacher outputs cannot be cached with augmentation or when a term reads the teacher's taps")
    teacher.eval()
    logits = predict(teacher, c.train, batch_size=512) if cache is True or (cache == "auto" and cacheable) else None
    modes = _kdcore.MODES
    # The trained connectors and parameter holders are checkpointed with the student; a frozen
    # connector (FT's paraphraser after its phase) is not.
    trained = [(m, what) for m, _, what, tr in plan.connectors if tr]
    cfg = dict(scheme="distill", method=method, terms=[repr(t) for t in terms],
               connectors=[f"{what}: {m!r}" for m, _, what, _ in plan.connectors])
    c.run_config.update(cfg)
    # A phase whose terms never read the student (FT's paraphraser phase) leaves it alone.
    train_student = plan.reads_student()
    opt_s = c.opt.bind(student) if train_student else None
    opts = {id(m): c.opt.bind(m) for m, _ in trained}
    nets = [dict(net=student.net, opt=opt_s, mode=modes["train"] if train_student else modes["eval"], salt=0x57D0,
                 role="student", views=views[0]),
            dict(net=None if logits is not None else teacher.net, logits=logits, mode=modes["eval"], salt=0x7EAC0,
                 role="teacher", views=views[1])]
    for k, (m, src, what, tr) in enumerate(plan.connectors):
        if src is None:
            nets.append(dict(net=m.net, opt=opts[id(m)], params_only=True, role=what))
        else:
            nets.append(dict(net=m.net, opt=opts[id(m)] if tr else None, mode=modes["train"] if tr else modes["eval"],
                             input=src, inputs=plan.extra_inputs.get(k), salt=0xC0 + k, role="connector",
                             **(dict(detach_input=True) if k in plan.detached else {})))
    extra_state = {f"{name}.{k}": v for name, st in plan.states.items() for k, v in st.views().items()}
    monitor = dict(src=[(1, -1)])
    val_t = None

    # The strong view (terms with view=1): the batch's augmentation plus MLKD's RandAugment.
    view_aug = dict(c.augment, randaugment=_STRONG_RANDAUGMENT) if any(v & 2 for v in views) else None

    def run(epoch, topts):
        st = _kdcore.step_epoch(nets, plan.terms, c.train._c, epoch, topts, monitor=monitor, view_aug=view_aug)
        # The student's objective: its own terms and those of its connectors.
        row = dict(train_loss=sum(st["net_loss"][i] for i in [0] + list(range(2, len(nets)))))
        for (label, parts), v, p, w, t in zip(plan.labels, st["term_value"], st["term_part"], st["term_weight"],
                                             plan.terms):
            row[label] = v
            row.update(zip(parts, p))
            if t.get("warmup_epochs") or t.get("stop_epoch"):
                row[f"{label}_weight"] = w
        row.update(train_acc=st["net_accuracy"][0], teacher_train_acc=st["monitor_accuracy"], lr=st["lr"],
                   skipped_steps=st["skipped_steps"])
        for log in plan.logs:
            row.update(log(epoch))
        return row

    def extra():
        nonlocal val_t
        if val_t is None:
            val_t = _kdcore.softmax(predict(teacher, c.val, batch_size=512), 1.0)
        return {"kl_student_teacher": _kl_to_probs(predict(student, c.val, batch_size=512), val_t)}

    conns = [m for m, _ in trained]
    hist = c.loop([student] + conns, run, extra_metrics=extra, optimizers=[opt_s] + [opts[id(m)] for m in conns],
                  roles=["student"] + [f"connector{k}" for k in range(len(conns))], extra_state=extra_state or None)
    student.connectors = conns
    return hist


def _val_teacher_probs(teacher, val, weights):
    """The teacher's (or the weighted teacher mixture's) probabilities on the validation set."""
    teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher]
    w = np.full(len(teachers), 1.0 / len(teachers), np.float32) if weights is None else weights
    p = None
    for wi, t in zip(w, teachers):
        pi = _kdcore.softmax(predict(t, val, batch_size=512), 1.0)
        p = wi * pi if p is None else p + wi * pi
    return p.astype(np.float32)


def mutual(models, train, epochs=10, batch_size=128, optimizer="sgd", lr=None, schedule=None, augment=None,
           val=None, seed=0, progress=True, T=1.0, ce_weight=1.0, kd_weight=1.0, ensemble=False,
           label_smoothing=0.0, drop_last=False, max_steps=None, callback=None, callback_every=20,
           checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False, nonfinite="raise",
           track_weights=False):
    """Deep mutual learning (eq. 27): the peers train together on the same batches, each
    minimising ce_weight * CE + kd_weight * mean over the other peers of T^2 KL(sg(p_j^T) ||
    p_k^T). ensemble=True: each peer learns instead from the detached average of all peers'
    logits (an online ensemble teacher, eq. 28 without the gate).

    Returns the History of the first peer, with every peer's metrics (``peer{k}_*``) and, with
    ``val``, the validation accuracy of each peer and of the peers' logit average.
    models: the peers, a list of at least 2 models, trained in place. Training options
    (epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress, label_smoothing,
    drop_last, max_steps, callback, callback_every): as in ``kdcore.fit``; a callback sees the first peer's row.
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``kdcore.fit``. The
    checkpoint holds every peer (roles "peer0", "peer1", ...), their optimizer states, the
    history and the epoch; resuming continues after the saved epoch, bitwise as the
    uninterrupted run (same settings and thread count).
    nonfinite: 'raise' or 'skip', as in ``kdcore.fit``; a non-finite term of any peer drops
    the step for all of them.
    track_weights: log the per-epoch weight changes of the first peer (as in ``kdcore.fit``).
    """
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError("mutual needs a list of at least 2 models")
    for m in models:
        _check_model(m)
    if len({id(m) for m in models}) != len(models):
        raise ValueError("the same model appears twice in models")
    c = _Common(train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite)
    c.track_weights = _check_bool("track_weights", track_weights)
    for k, m in enumerate(models):
        c.check(m, f"peer {k} (models[{k}])")
    T = _check_float("T", T, 0, lo_open=True)
    ce_weight = _check_float("ce_weight", ce_weight, 0)
    kd_weight = _check_float("kd_weight", kd_weight, 0)
    ensemble = _check_bool("ensemble", ensemble)
    c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume,
                        dict(scheme="mutual", peers=len(models), T=T, ce_weight=ce_weight, kd_weight=kd_weight,
                             ensemble=ensemble))
    opts = [c.opt.bind(m) for m in models]

    def run(epoch, topts):
        sts = _kdcore.mutual_epoch([m.net for m in models], opts, c.train._c, epoch, topts, T=T,
                                   ce_weight=ce_weight, kd_weight=kd_weight, ensemble=bool(ensemble))
        row = dict(train_loss=sts[0]["loss"], train_acc=sts[0]["accuracy"], lr=sts[0]["lr"],
                   ensemble_train_acc=sts[0]["teacher_accuracy"], skipped_steps=sts[0]["skipped_steps"])
        for k, st in enumerate(sts):
            row.update({f"peer{k}_loss": st["loss"], f"peer{k}_ce": st["ce"], f"peer{k}_kd": st["kd"],
                        f"peer{k}_train_acc": st["accuracy"]})
        return row

    def extra():
        zs = [predict(m, c.val, batch_size=512) for m in models]
        row = {}
        y = c.val.y
        for k, z in enumerate(zs):
            row[f"peer{k}_val_acc"] = float(np.mean(z.argmax(1) == y))
        ens = np.mean(zs, axis=0)
        row["ensemble_val_acc"] = float(np.mean(ens.argmax(1) == y))
        row["kl_peer0_peer1"] = kl_divergence(zs[0], zs[1])
        return row

    return c.loop(list(models), run, extra_metrics=extra, optimizers=opts,
                  roles=[f"peer{k}" for k in range(len(models))])


def slkd(student, teacher, train, sl_teachers=None, n_sl=2, epochs=10, batch_size=128, optimizer="sgd", lr=None,
         schedule=None, augment=None, val=None, seed=0, progress=True, T=4.0, alpha=0.1, lam=1.0, eta=3.0,
         rho=0.5, fuse="logits", sl_tau2=True, sl_grad=False, sequential=False, replay="trajectory", sl_optimizer=None, cache="auto",
         label_smoothing=0.0, drop_last=False, max_steps=None, callback=None, callback_every=20,
         checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False, nonfinite="raise",
         track_weights=False):
    """SLKD (Liu, Li, Cheng 2023): the student learns from the frozen teacher and from self-learning
    teachers (SL-Ts) with the teacher's architecture, trained from scratch alongside it.

    Losses (eqs. 1-7): SL-T j: alpha CE + (1-alpha) KD(T -> SL_j); student:
    lam [alpha CE + (1-alpha) KD(T -> S)] + eta [alpha CE + (1-alpha) KD(sg(z_SL) -> S)] with
    z_SL = rho z_1 + (1-rho) z_2. KD is T^2-scaled KL, as in mdistiller's KD (A4).
    Choices for the paper's ambiguities, each an option (defaults first):
      A1 sl_grad=False: z_SL is detached in the student's loss (eq. 3 minimises over the
         student only); True lets that gradient reach the SL-Ts (DML-like).
      A2 fuse='logits' (eq. 3 divides the fused output by tau, so it is a logit); 'probs'
         fuses softened probabilities.
      A3 sequential=True is SLKD*: phase 1 trains the SL-Ts against the teacher for `epochs`
         epochs, keeping a copy at the end of each epoch; phase 2 trains the student with z_SL
         from the epoch-i copies at student epoch i (replay='trajectory'; both counted from 1:
         the 0-based student epoch e of the History and callback uses the SL-Ts as they were
         after e + 1 epochs, never untrained) or from the final SL-Ts ('final'); the frozen
         SL-Ts run in eval mode. docs/methods/slkd.md says why.
      A4 alpha=0.1 (CE 0.1, KD 0.9 as mdistiller's KD); A5 the student's effective CE weight
         is (lam+eta) alpha and KD weight (lam+eta)(1-alpha): compare with `distill(...,
         ce_weight=(lam+eta)*alpha, kd_weight=(lam+eta)*(1-alpha))` as the control.
      A6 rho=0.5; the SL-Ts' outputs of the current step are used (before their update).
      A8 sl_tau2=True: the student's SL-T term is T^2-scaled like every KD term here;
         False makes it the plain KL(p_SL^T || p_S^T) that eq. 3 writes (an ablation of the
         factor). It applies to the student's term only: L_TS and the SL-Ts' own KD terms
         (eqs. 4-5, and SLKD*'s phase 1) keep T^2, so the SL-Ts train exactly as with True
         and a run differs from the default only in the weight of that one term (T^2 times
         smaller). History's loss_slts is then alpha CE + (1-alpha) KL.
      A7 same optimizer recipe and schedule, separate optimizer states; ``sl_optimizer`` gives
         the SL-Ts a recipe of their own (e.g. the teacher's learning rate when the student's is
         scaled down to offset its 4x loss weight).
    sl_teachers: models to use as SL-Ts (default: ``teacher.fresh(seed)`` with distinct seeds);
    n_sl: how many SL-Ts (1 or 2). cache: as in ``kdcore.distill`` (the frozen teacher's
    logits computed once unless augmentation changes its input). train: Dataset or (X, y).
    Training options (epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress, label_smoothing,
    drop_last, max_steps, callback, callback_every): as in ``kdcore.fit``.
    Returns the student's History, with loss_ts, loss_slts, the SL-Ts' losses and accuracies,
    and with ``val`` KL(student || teacher) and KL(student || fused SL-T) on it (T=1).
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``kdcore.fit``. The
    checkpoint holds the student and the SL-teachers (roles "student", "sl0", "sl1"; not the
    frozen teacher), their optimizer states, the history and the epoch; resuming continues
    after the saved epoch, bitwise as the uninterrupted run (same settings, teacher and thread
    count). With sequential=True (SLKD*) the checkpoint holds the phase-2 student; a resume
    first re-runs phase 1 (the SL-teachers' training, deterministic, so the same trajectory:
    its SHA-256 is kept in the checkpoint's settings, and a different one is reported as
    changed settings) and then continues phase 2 after the saved epoch.
    nonfinite: 'raise' or 'skip', as in ``kdcore.fit``; a non-finite term or gradient of the
    student or an SL-teacher drops the whole step (all of them stay as they were).
    track_weights: log the per-epoch weight changes of the student (as in ``kdcore.fit``).
    """
    _check_model(student)
    _check_model(teacher)
    if student is teacher:
        raise ValueError("the student cannot be its own teacher")
    c = _Common(train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite)
    c.track_weights = _check_bool("track_weights", track_weights)
    n_sl = _check_int("n_sl", n_sl, 1)
    sl_grad, sequential = _check_bool("sl_grad", sl_grad), _check_bool("sequential", sequential)
    if sl_tau2 is None:   # _check_bool reads None as False: here that would drop the factor silently
        raise TypeError("sl_tau2 must be a bool, got None")
    sl_tau2 = _check_bool("sl_tau2", sl_tau2)
    if n_sl > 2:
        raise ValueError(f"n_sl must be 1 or 2, got {n_sl}")
    if not _is_choice(fuse, ("logits", "probs")):
        raise ValueError(f"fuse must be 'logits' or 'probs', got {fuse!r}")
    if not _is_choice(replay, ("trajectory", "final")):
        raise ValueError(f"replay must be 'trajectory' or 'final', got {replay!r}")
    if sl_grad and (fuse == "probs" or sequential):
        raise ValueError("sl_grad needs parallel SLKD with logit fusion")
    opts = dict(T=_check_float("T", T, 0, lo_open=True), alpha=_check_float("alpha", alpha, 0, 1),
                **{"lambda": _check_float("lam", lam, 0)}, eta=_check_float("eta", eta, 0),
                rho=_check_float("rho", rho, 0, 1), fuse_probs=fuse == "probs", sl_grad=_check_bool("sl_grad", sl_grad),
                **({} if sl_tau2 else dict(slts_plain_kl=True)))   # absent by default: older checkpoints' settings
    if sl_teachers is None:
        sl_teachers = [teacher.fresh(seed=1000 + 17 * j + c.seed) for j in range(n_sl)]
    if not isinstance(sl_teachers, (list, tuple)) or len(sl_teachers) != n_sl:
        raise ValueError(f"sl_teachers must be a list of {n_sl} models")
    for s in sl_teachers:
        _check_model(s)
        if s is student or s is teacher:
            raise ValueError("SL-teachers must be distinct from the student and the teacher")
    c.check(student, "student")
    c.check(teacher, "teacher")
    for j, s in enumerate(sl_teachers):
        c.check(s, f"SL-teacher {j}")
    if not _is_choice(cache, ("auto", True, False)):
        raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
    if cache is True and c.augmented:
        raise ValueError("teacher outputs cannot be cached with augmentation")
    use_cache = cache is True or (cache == "auto" and not c.augmented)
    c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume,
                        dict(scheme="slkd", n_sl=n_sl, fuse=fuse, **opts,
                             **(dict(sequential=True, replay=replay) if sequential else {})))
    teacher.eval()
    zt = predict(teacher, c.train, batch_size=512) if use_cache else None
    opt_s = c.opt.bind(student)
    sl_opt = c.opt if sl_optimizer is None else _make_optimizer(sl_optimizer, None, "sl_optimizer")
    opt_sl = [sl_opt.bind(s) for s in sl_teachers]
    if sl_opt is not c.opt:
        # The C loop takes one scheduled lr per step; the SL-Ts' lr is that times this ratio.
        if c.opt.lr <= 0:
            raise ValueError("sl_optimizer needs the student's lr to be > 0")
        opts["sl_lr_scale"] = sl_opt.lr / c.opt.lr
    t_kw = dict(teacher_logits=zt) if use_cache else dict(teacher=teacher.net)
    val_t = None

    def fused_val_probs():
        zs = [predict(s, c.val, batch_size=512) for s in sl_teachers]
        r = rho if n_sl == 2 else 1.0
        if fuse == "logits":
            z = r * zs[0] + ((1 - r) * zs[1] if n_sl == 2 else 0)
            return _kdcore.softmax(z.astype(np.float32), 1.0), zs
        # the monitor is at T=1 as for the teacher (the training mixes the T-softened outputs)
        p = r * _kdcore.softmax(zs[0], 1.0) + ((1 - r) * _kdcore.softmax(zs[1], 1.0) if n_sl == 2 else 0)
        return p.astype(np.float32), zs

    def extra():
        nonlocal val_t
        if val_t is None:
            val_t = _kdcore.softmax(predict(teacher, c.val, batch_size=512), 1.0)
        zs = predict(student, c.val, batch_size=512)
        q, zsl = fused_val_probs()
        row = {"kl_student_teacher": _kl_to_probs(zs, val_t), "kl_student_slt": _kl_to_probs(zs, q)}
        for j, z in enumerate(zsl):
            row[f"sl{j}_val_acc"] = float(np.mean(z.argmax(1) == c.val.y))
        return row

    def row_of(st):
        row = dict(train_loss=st["loss"], loss_ts=st["loss_ts"], loss_slts=st["loss_slts"], train_acc=st["accuracy"],
                   lr=st["lr"], teacher_train_acc=st["teacher_accuracy"], skipped_steps=st["skipped_steps"])
        for j in range(n_sl):
            row[f"sl{j}_loss"] = st["loss_sl"][j]
            row[f"sl{j}_train_acc"] = st["sl_accuracy"][j]
        return row

    if not sequential:
        def run(epoch, topts):
            return row_of(_kdcore.slkd_epoch(student.net, opt_s, [s.net for s in sl_teachers], opt_sl, c.train._c,
                                             epoch, topts, opts, **t_kw))
        hist = c.loop([student] + list(sl_teachers), run, extra_metrics=extra if c.val is not None else None,
                      optimizers=[opt_s] + opt_sl, roles=["student"] + [f"sl{j}" for j in range(n_sl)])
        student.sl_teachers = list(sl_teachers)
        return hist

    # SLKD*: phase 1, the SL-teachers distil from the teacher alone (eqs. 4-5), one copy kept
    # per epoch; phase 2, the student learns with the SL-teachers frozen.
    trajectory = []
    for j, s in enumerate(sl_teachers):
        snaps = []
        distill(s, zt if use_cache else teacher, c.train, method="kd", epochs=c.epochs, batch_size=c.batch_size,
                optimizer=sl_opt, schedule=c.sched, augment=c.augment, seed=c.seed + 1 + j, progress=c.progress,
                T=opts["T"], ce_weight=alpha, kd_weight=1 - alpha, label_smoothing=c.label_smoothing,
                drop_last=c.drop_last, max_steps=c.max_steps or None, nonfinite=c.nonfinite, cache=use_cache,
                callback=lambda e, row, s=s, snaps=snaps: snaps.append(s.state_dict()) and False)
        trajectory.append(snaps)
    frozen = dict(opts, sl_frozen=True)
    final = [s.state_dict() for s in sl_teachers]
    if c.checkpoint is not None:
        # Phase 1 is not checkpointed: a resume re-runs it. Its result fingerprints the run, so
        # that resuming with other SL-teachers (or another teacher) is reported.
        c.run_config["sl_trajectory_sha256"] = _states_digest(trajectory)

    def run_seq(epoch, topts):
        for j, s in enumerate(sl_teachers):
            s.load_state_dict(trajectory[j][min(epoch, len(trajectory[j]) - 1)] if replay == "trajectory" else final[j])
            s.eval()
        return row_of(_kdcore.slkd_epoch(student.net, opt_s, [s.net for s in sl_teachers], None, c.train._c,
                                         epoch, topts, frozen, **t_kw))

    hist = c.loop([student], run_seq, extra_metrics=extra if c.val is not None else None, optimizers=[opt_s],
                  roles=["student"])
    for j, s in enumerate(sl_teachers):
        s.load_state_dict(final[j])
    student.sl_teachers = list(sl_teachers)
    return hist


def _states_digest(trajectory):
    """SHA-256 over a list (per SL-teacher) of lists (per epoch) of state dicts."""
    import hashlib
    h = hashlib.sha256()
    for snaps in trajectory:
        for sd in snaps:
            for k, v in sd.items():
                h.update(k.encode())
                h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def multi_exit(model, train, teacher=None, epochs=10, batch_size=128, optimizer="sgd", lr=None, schedule=None,
               augment=None, val=None, seed=0, progress=True, T=3.0, ce_weight=None, kd_weight=None, cache="auto",
               label_smoothing=0.0, drop_last=False, max_steps=None, callback=None, callback_every=20,
               checkpoint=None, checkpoint_every=1, checkpoint_best=False, resume=False, nonfinite="raise",
               track_weights=False):
    """Train a multi-exit network (``kdcore.nn.MultiExit``, e.g. ``models.with_exits(resnet8(),
    ["layer1", "layer2"])``).

    teacher=None: self-distillation by deep supervision (BYOT-style): every shallow exit k
    minimises ce_weight * CE(y, z_k) + kd_weight * T^2 KL(sg(p_out^T) || p_k^T) and the
    output exit CE; the terms are summed (defaults ce_weight 0.7, kd_weight 0.3, i.e. BYOT's
    (1-alpha) and alpha with alpha = 0.3; BYOT's feature hint term is not included).
    With a teacher (model or logits): Wang & Yoon's review, eq. 9, every exit including the output
    minimises ce_weight * CE + kd_weight * T^2 KL(p_t^T || p_k^T), averaged over the exits
    (defaults 0.1 / 0.9 as KD). History: loss terms of the output exit, the training and (with
    val) validation accuracy of every exit (``exit_<tap>_val_acc``).
    checkpoint / checkpoint_every / checkpoint_best / resume: as in ``kdcore.fit``. The
    checkpoint holds the model (role "model"; not the teacher), its optimizer state, the
    history and the epoch; resuming continues after the saved epoch, bitwise as the
    uninterrupted run (same settings, teacher and thread count).
    nonfinite: 'raise' or 'skip', as in ``kdcore.fit``. train: Dataset or (X, y). cache: as in
    ``kdcore.distill`` (the teacher's logits computed once unless augmentation is on).
    Training options (epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress, label_smoothing,
    drop_last, max_steps, callback, callback_every): as in ``kdcore.fit``.
    track_weights: log the per-epoch weight changes of the model (as in ``kdcore.fit``).
    """
    from .nn import MultiExit
    if not isinstance(model, MultiExit):
        raise TypeError("model must be a kdcore.nn.MultiExit (see kdcore.models.with_exits)")
    c = _Common(train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress,
                label_smoothing, drop_last, max_steps, callback, callback_every, nonfinite)
    c.track_weights = _check_bool("track_weights", track_weights)
    c.check(model, "model")
    self_kd = teacher is None
    d = _EXIT_DEFAULTS["self" if self_kd else "teacher"]
    ce_weight = _check_float("ce_weight", d["ce_weight"] if ce_weight is None else ce_weight, 0)
    kd_weight = _check_float("kd_weight", d["kd_weight"] if kd_weight is None else kd_weight, 0)
    T = _check_float("T", T, 0, lo_open=True)
    model._build()
    exits = list(model.exit_nodes) + [model.output_node]
    names = list(model.exits) + ["output"]
    t_kw = {}
    if not self_kd:
        nets, logits = _as_teachers(teacher)
        if len(nets or logits) != 1:
            raise ValueError("multi_exit takes one teacher")
        if nets is not None:
            c.check(nets[0], "teacher")
            if cache is True or (cache == "auto" and not c.augmented):
                t_kw["teacher_logits"] = predict(nets[0], c.train, batch_size=512)
            else:
                t_kw["teacher"] = nets[0].net
        else:
            t_kw["teacher_logits"] = logits[0]
    c.set_checkpointing(checkpoint, checkpoint_every, checkpoint_best, resume,
                        dict(scheme="multi_exit", exits=names, T=T, ce_weight=ce_weight, kd_weight=kd_weight,
                             self_kd=self_kd))
    copt = c.opt.bind(model)

    def run(epoch, topts):
        st, accs = _kdcore.exits_epoch(model.net, copt, exits, c.train._c, epoch, topts, T=T, ce_weight=ce_weight,
                                       kd_weight=kd_weight, **t_kw)
        row = dict(train_loss=st["loss"], ce=st["ce"], kd=st["kd"], train_acc=st["accuracy"], lr=st["lr"],
                   skipped_steps=st["skipped_steps"])
        row.update({f"exit_{n}_train_acc": a for n, a in zip(names, accs)})
        return row

    def extra():
        return {f"exit_{n}_val_acc": a for n, a in zip(names, exit_accuracies(model, c.val))}

    return c.loop([model], run, extra_metrics=extra, optimizers=[copt], roles=["model"])


def exit_accuracies(model, data, batch_size=500):
    """Eval-mode accuracy of every exit of a MultiExit model on a labelled Dataset (shallow to
    deep, the output last)."""
    correct = None
    model.eval()
    n = len(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        model(data.batch(idx))
        outs = model.exit_outputs()
        hits = [int(np.sum(z.argmax(1) == data.y[idx])) for z in outs]
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
    return [c_ / n for c_ in correct]


# Adversarial KD's defaults that are kdcore's choices (the papers give no value that carries
# over to kdcore's losses): the discriminator's hidden width and the generator-loss weight.
_ADV_HIDDEN = 64


def _adversarial_step(student, teacher, discriminator, twin, bs, bd, lr_ratio, ce_weight, kd_weight, T, w_adv, d_mask,
                      s_mask, labels=None, taps=(-1, -1)):
    """adversarial's engine configuration (nets, terms): the student (net 0), the frozen
    teacher (1), with ``labels`` (the training set's one-hot rows, float32 (n, classes)) the
    cached rows a conditional discriminator reads as its second input (2), the discriminator
    on the teacher's logits (d) and its twin on the student's (d + 1, sharing d's parameters);
    the discriminator's BCE terms in the phases of d_mask, the student's CE, KD and generator
    terms in those of s_mask. bs, bd: bound optimizers; lr_ratio: the discriminator's lr over
    the student's; taps: the (student, teacher) node indices the discriminators read (-1: the
    logits)."""
    modes, K = _kdcore.MODES, _kdcore.TERM_KINDS
    nets = [dict(net=student.net, opt=bs, mode=modes["train"], phases=s_mask, role="student"),
            dict(net=teacher.net, mode=modes["eval"], role="teacher")]
    extra = {}
    if labels is not None:
        nets.append(dict(logits=labels, role="labels"))
        extra = dict(inputs=[(2, -1)])
    d = len(nets)
    nets += [dict(net=discriminator.net, opt=bd, mode=modes["train"], input=(1, taps[1]), phases=d_mask,
                  lr_scale=lr_ratio, salt=0xD15C, role="discriminator", **extra),
             dict(net=twin.net, mode=modes["train"], input=(0, taps[0]), shares=d + 1, salt=0xD15C,
                  role="discriminator (student side)", **extra)]
    terms = [dict(kind=K["bce"], a=(d, -1), target=1.0, phases=d_mask),
             dict(kind=K["bce"], a=(d + 1, -1), target=0.0, phases=d_mask),
             dict(kind=K["ce"], a=(0, -1), weight=ce_weight, phases=s_mask),
             dict(kind=K["kd"], a=(0, -1), src=[(1, -1)], T=T, weight=kd_weight, phases=s_mask),
             dict(kind=K["bce"], a=(d + 1, -1), target=1.0, weight=w_adv, phases=s_mask)]
    return nets, terms


def _adversarial_taps(student, teacher, tap, data_shape):
    """adversarial's ``tap``: the (student, teacher) node indices the discriminator reads and
    the feature's shape (C, H, W); (-1, -1) and None for the logits (tap None)."""
    if tap is None:
        return (-1, -1), None
    if isinstance(tap, str):
        names = (tap, tap)
    elif isinstance(tap, (tuple, list)) and len(tap) == 2 and all(isinstance(n, str) for n in tap):
        names = tuple(tap)
    else:
        raise TypeError(f"tap must be a tap name, a feature_taps() key or a pair (student_tap, teacher_tap) of "
                        f"them, got {tap!r}")
    c, h, w = (tuple(data_shape) + (1, 1))[:3]
    idx, shapes = [], []
    for model, name, who in ((student, names[0], "student"), (teacher, names[1], "teacher")):
        if name not in model.taps():
            default = (model.feature_taps() or {}).get(name)
            if not isinstance(default, str):
                raise ValueError(f"tap: the {who} has no tap named {name!r} and no feature_taps() entry {name!r} "
                                 f"naming one tap (model.taps() lists its taps)")
            name = default
        idx.append(model._tap_index(name))
        shapes.append(tuple(model.net.shapes(1, c, h, w)[idx[-1]]))
    if shapes[0] != shapes[1]:
        raise ValueError(f"tap: the student's feature {names[0]!r} has shape {shapes[0]} and the teacher's "
                         f"{names[1]!r} {shapes[1]}; the discriminator reads both, so they must have the same shape "
                         f"(choose taps of equal shape; no connector is learned)")
    return tuple(idx), shapes[0]


def adversarial(student, teacher, train, epochs=10, batch_size=128, optimizer="sgd", lr=None, schedule=None,
                discriminator=None, d_optimizer=None, ce_weight=0.1, kd_weight=0.9, T=4.0, w_adv=0.1, conditional=False,
                augment=None, val=None, seed=0, progress=True, callback=None, nonfinite="raise", tap=None):
    """Adversarial distillation with a discriminator (Gou et al.'s survey, section 5; Wang et
    al. 2018 "KDGAN", Xu et al. 2018): returns the student's History. A discriminator D (an
    MLP on logits, one output logit) learns to tell the teacher's logits (label 1) from the
    student's (label 0); the student minimises ce_weight * CE + kd_weight * KD(T) + w_adv *
    BCE(D(z_s), 1) (the non-saturating generator loss), the gradient passing through D, which
    is not updated then.

    Each batch runs a cycle of two engine steps on the same samples: phase 0 updates D on
    BCE(D(z_t), 1) + BCE(D(z_s), 0) (the student detached), phase 1 the student. D is applied
    to the student's logits by a twin net that shares its parameters. The History logs per
    epoch ``d_loss`` (the two BCE terms summed), ``d_acc`` (the fraction of teacher and
    student samples D puts on the right side of 0, over both), ``d_teacher``, ``d_student``,
    and the student's ``ce``, ``kd``, ``adv`` (unweighted) and ``train_loss`` (weighted sum).
    The trained discriminator is ``student.discriminator`` afterwards.

    discriminator: a kdcore model from the student's logits to one value, without BatchNorm
    (default ``kdcore.models.discriminator(classes, 64, conditional)``, ``mlp([classes, 64,
    1])`` unconditional). conditional: D also reads the label one-hot, concatenated to the
    logits (Xu et al.'s conditional form): its second input (one KD_LAYER_INPUT node, as
    ``models.discriminator(..., conditional=True)`` has), fed the rows of the training labels;
    not with ``augment`` (the engine's cached rows refuse augmented batches). d_optimizer: its optimizer (default
    Adam(lr 2e-4, betas (0.5, 0.999)), DCGAN's setting); its learning rate follows the
    student's schedule at the ratio of the two optimizers' lr. ce_weight, kd_weight, T:
    kdcore's KD defaults (``distill(method="kd")``). w_adv: kdcore's choice. Both players'
    forwards run in train mode; the student's BN statistics move in both steps of a cycle.

    tap: D reads a feature instead of the logits -- a tap name both models have, a key of
    their ``feature_taps()`` naming one tap (``"pooled"``: the pooled features), or a pair
    (student_tap, teacher_tap) of either. The two features must have the same shape (no
    connector is learned; a mismatch raises ValueError); D reads the feature flattened (C·H·W
    values per sample: a pooled feature is its C channels, a map all its values), and the
    default D is ``models.discriminator(C·H·W, 64)``. The student's CE and KD terms still read
    its logits; the generator loss's gradient enters the student at the tap. Not with
    conditional=True."""
    from .models import discriminator as _discriminator
    from .nn import _INPUT_NODE
    from .optim import Adam, _Optimizer
    _check_model(student, "student")
    _check_model(teacher, "teacher")
    if teacher is student:
        raise ValueError("the student cannot be its own teacher")
    ce_weight, kd_weight, w_adv = (_check_float(n, v, 0) for n, v in
                                   (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("w_adv", w_adv)))
    T = _check_float("T", T, 0, lo_open=True)
    conditional = _check_bool("conditional", conditional)
    c = _Common(train, epochs, batch_size, optimizer, lr, schedule, augment, val, seed, progress, 0.0, False, None,
                callback, 20, nonfinite)
    if conditional and c.augmented:
        raise ValueError("conditional=True cannot run with augment: the labels' rows are cached per sample, and the "
                         "engine refuses cached rows next to augmented batches")
    c.check(student, "student")
    c.check(teacher, "teacher")
    n_cls = c.train.num_classes
    taps, feat = _adversarial_taps(student, teacher, tap, c.train.shape)
    if feat is not None and conditional:
        raise ValueError("tap: conditional=True reads the label next to the logits; a feature tap runs unconditional")
    d_in = n_cls if feat is None else int(np.prod(feat))
    if discriminator is None:
        discriminator = _discriminator(d_in, _ADV_HIDDEN, conditional, seed=seed + 0xD15C)
    elif not isinstance(discriminator, Module):
        raise TypeError(f"discriminator must be a kdcore model, got {type(discriminator).__name__}")
    if discriminator is student or discriminator is teacher:
        raise ValueError("discriminator must be a model of its own, not the student or the teacher")
    label_nodes = [i for i, k in enumerate(discriminator._graph_kinds()) if k == _INPUT_NODE]
    if len(label_nodes) != int(conditional):
        raise ValueError(f"discriminator has {len(label_nodes)} extra input nodes; conditional={conditional} needs "
                         f"{int(conditional)} (models.discriminator(..., conditional=True) builds one)")
    for node in label_nodes:
        discriminator.net.set_input(node, (n_cls, 1, 1))
    try:
        d_out = discriminator.net.shapes(1, *(feat or (n_cls, 1, 1)))[discriminator._output_index()]
    except ValueError as e:
        what = "the logits" if feat is None else f"the tapped feature of shape {feat}"
        raise ValueError(f"discriminator cannot read {what}: {e}") from None
    if int(np.prod(d_out)) != 1:
        raise ValueError(f"discriminator must output one value per sample (a logit), got shape {tuple(d_out)}")
    if discriminator.net.buffers().size:
        raise ValueError("discriminator must have no BatchNorm layers (its twin on the student's logits shares "
                         "parameters only)")
    if d_optimizer is None:
        d_optimizer = Adam(lr=2e-4, betas=(0.5, 0.999))
    elif not isinstance(d_optimizer, _Optimizer):
        raise TypeError(f"d_optimizer must be a kdcore.optim optimizer (SGD, Adam, AdamW), got "
                        f"{type(d_optimizer).__name__}")
    if not c.opt.lr > 0 or not d_optimizer.lr > 0:
        raise ValueError("optimizer and d_optimizer need a learning rate > 0")
    twin = discriminator.copy()
    bs, bd = c.opt.bind(student), d_optimizer.bind(discriminator)
    labels = np.eye(n_cls, dtype=np.float32)[c.train.y] if conditional else None
    nets, terms = _adversarial_step(student, teacher, discriminator, twin, bs, bd, d_optimizer.lr / c.opt.lr,
                                    ce_weight, kd_weight, T, w_adv, 1, 2, labels, taps)
    n_steps = 2 * c.steps()
    c.steps = lambda: n_steps   # engine steps of an epoch: two per batch
    c.run_config.update(scheme="adversarial", ce_weight=ce_weight, kd_weight=kd_weight, T=T, w_adv=w_adv,
                        conditional=conditional, d_optimizer=repr(d_optimizer),
                        tap=None if tap is None else list(tap) if not isinstance(tap, str) else tap)
    teacher.eval()

    def run(epoch, topts):
        st = _kdcore.step_epoch(nets, terms, c.train._c, epoch, topts, logits_net=0, cycle=2, cycle_batch=True)
        v, acc = st["term_value"], st["term_accuracy"]
        return dict(d_loss=v[0] + v[1], d_acc=(acc[0] + acc[1]) / 2, d_teacher=v[0], d_student=v[1], ce=v[2],
                    kd=v[3], adv=v[4], train_loss=ce_weight * v[2] + kd_weight * v[3] + w_adv * v[4], lr=st["lr"],
                    skipped_steps=st["skipped_steps"])

    hist = c.loop([student, discriminator], run, optimizers=[bs, bd], roles=["student", "discriminator"])
    student.discriminator = discriminator
    return hist
