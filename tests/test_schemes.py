"""kdcore.schemes (born_again, takd, dgkd, snapshot_distill, eskd, tf_kd) and the cyclic
learning-rate schedule (KD_SCHED_CYCLIC / kdcore.optim.Cyclic).

Small real data (3000 Fashion-MNIST training images, 1000 test images), tiny MLPs, 1-3 epochs.
Each scheme is checked against the stages written by hand with fit/distill (same seeds give
bit-identical weights), and a wrapper around kdcore.schemes.distill records what each stage
was given (teachers, weights, schedule).
"""
import ctypes

import numpy as np
import pytest
import torch

import kdcore
from kdcore import _kdcore, schemes
from kdcore.functional import virtual_teacher

LR = 0.05
FKW = dict(progress=False, lr=LR, batch_size=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The 784-64-10 MLPs are far too small for OpenMP; a busy machine makes threads slow.
    old = kdcore.get_num_threads()
    kdcore.set_num_threads(1)
    yield
    kdcore.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    tr = kdcore.datasets.fashion_mnist("train").subset(np.arange(3000))
    te = kdcore.datasets.fashion_mnist("test").subset(np.arange(1000))
    return tr, te


def mlp(hidden, seed=0):
    return kdcore.models.mlp([784, hidden, 10], seed=seed)


def same_weights(a, b):
    sa, sb = a.state_dict() if isinstance(a, kdcore.nn.Module) else a, \
        b.state_dict() if isinstance(b, kdcore.nn.Module) else b
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def record(monkeypatch):
    """Wraps kdcore.schemes.distill: records each call's student, teacher, kwargs and the
    student's / teachers' weights at call time, then runs the real distill."""
    calls = []
    real = schemes.distill

    def wrapper(student, teacher, train, **kw):
        ts = teacher if isinstance(teacher, list) else [teacher]
        calls.append(dict(student=student, teacher=teacher, kw=kw,
                          student_state=student.state_dict(),
                          teacher_states=[t.state_dict() if isinstance(t, kdcore.nn.Module) else None for t in ts],
                          teacher_array=teacher.copy() if isinstance(teacher, np.ndarray) else None))
        return real(student, teacher, train, **kw)

    monkeypatch.setattr(schemes, "distill", wrapper)
    return calls


# ------------------------------------------------------------------------------------------
# the cyclic schedule


class _Sched(ctypes.Structure):
    # struct kd_schedule (kdcore.h)
    _fields_ = [("kind", ctypes.c_int), ("base_lr", ctypes.c_float), ("gamma", ctypes.c_float),
                ("milestones", ctypes.c_int * 16), ("n_milestones", ctypes.c_int),
                ("total_epochs", ctypes.c_int), ("min_lr", ctypes.c_float), ("warmup_epochs", ctypes.c_int)]


KD_SCHED_CYCLIC = 3


def c_schedule_lr():
    lib = ctypes.CDLL(_kdcore.__file__)
    f = lib.kd_schedule_lr
    f.restype = ctypes.c_float
    f.argtypes = [ctypes.POINTER(_Sched), ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return f


def torch_warm_restarts(base_lr, T_0, eta_min, epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=T_0, eta_min=eta_min)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return np.array(out)


@pytest.mark.parametrize("base_lr,T_0,eta_min", [(0.1, 4, 0.0), (0.05, 3, 1e-3), (1.0, 1, 0.0), (0.2, 7, 0.01)])
def test_cyclic_c_matches_torch_warm_restarts(base_lr, T_0, eta_min):
    f = c_schedule_lr()
    s = _Sched(kind=KD_SCHED_CYCLIC, base_lr=base_lr, gamma=0.1, total_epochs=T_0, min_lr=eta_min)
    want = torch_warm_restarts(base_lr, T_0, eta_min, 4 * T_0 + 2)
    for step in (0, 5):   # per-epoch schedule: the same lr at every step of an epoch
        got = np.array([f(ctypes.byref(s), e, step, 10) for e in range(len(want))])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_cyclic_c_warmup_is_the_shared_per_step_factor():
    f = c_schedule_lr()
    s = _Sched(kind=KD_SCHED_CYCLIC, base_lr=0.1, gamma=0.1, total_epochs=3, min_lr=0.0, warmup_epochs=2)
    plain = torch_warm_restarts(0.1, 3, 0.0, 6)
    for e in range(6):
        for step in range(4):
            factor = min(1.0, (e * 4 + step + 1) / 8)
            assert f(ctypes.byref(s), e, step, 4) == pytest.approx(plain[e] * factor, rel=1e-6)


def test_cyclic_class_matches_torch():
    for base_lr, T_0, eta_min in [(0.1, 4, 0.0), (0.05, 3, 1e-3)]:
        s = kdcore.optim.Cyclic(T_0, min_lr=eta_min)
        got = [s.lr(base_lr, e, 20) for e in range(3 * T_0 + 1)]
        np.testing.assert_allclose(got, torch_warm_restarts(base_lr, T_0, eta_min, 3 * T_0 + 1), rtol=1e-6, atol=1e-8)


def test_cyclic_schedule_in_fit(data):
    tr, _ = data
    h = kdcore.fit(mlp(16), tr.subset(np.arange(256)), epochs=7, schedule=kdcore.optim.Cyclic(3, min_lr=1e-3),
                   **FKW)
    np.testing.assert_allclose(h["lr"], torch_warm_restarts(LR, 3, 1e-3, 7), rtol=1e-6)


def test_cyclic_arguments():
    c = kdcore.optim.Cyclic(5, min_lr=0.001, warmup_epochs=1)
    assert (c.cycle_epochs, c.min_lr, c.warmup_epochs) == (5, 0.001, 1)
    assert c._tuple(0.1, 100) == (3, 0.1, [], 5, 0.001, 1)   # the period is the cycle, not the run
    assert "Cyclic(cycle_epochs=5" in repr(c)
    assert kdcore.optim.make_schedule(c) is c
    with pytest.raises(ValueError, match="cycle_epochs"):
        kdcore.optim.Cyclic(0)
    with pytest.raises(TypeError, match="cycle_epochs"):
        kdcore.optim.Cyclic(2.5)
    with pytest.raises(ValueError, match="min_lr"):
        kdcore.optim.Cyclic(3, min_lr=-1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        kdcore.optim.Cyclic(3, warmup_epochs=-1)


# ------------------------------------------------------------------------------------------
# born-again networks


def test_born_again_generations_and_ensemble(data, record):
    tr, te = data
    model = mlp(64, seed=3)
    before = model.state_dict()
    r = kdcore.born_again(model, tr, generations=3, epochs=2, val=te, seed=5, **FKW)
    assert len(r.models) == len(r.histories) == len(r.val_acc) == len(r.ensemble_val_acc) == 3
    assert r.model is r.models[-1]
    assert same_weights(model, before)                       # the template is not trained
    assert all(h.epochs == 2 and "val_acc" in h for h in r.histories)
    assert all(0.5 < a <= 1 for a in r.val_acc)
    # generation 0 = plain fit of model.fresh(seed)
    g0 = model.fresh(5)
    kdcore.fit(g0, tr, epochs=2, seed=5, **FKW)
    assert same_weights(g0, r.models[0])
    # generation k learns from generation k-1: the teacher passed is that object, and
    # repeating the stage by hand with it as teacher gives the same weights
    assert len(record) == 2
    for k in (1, 2):
        call = record[k - 1]
        assert call["teacher"] is r.models[k - 1] and call["student"] is r.models[k]
        assert call["kw"]["method"] == "kd" and call["kw"]["T"] == 1.0
        assert call["kw"]["ce_weight"] == 1.0 and call["kw"]["kd_weight"] == 1.0
        assert same_weights(call["teacher_states"][0], r.models[k - 1])
        m = model.fresh(5 + k)
        assert same_weights(m, call["student_state"])        # a fresh init of the same architecture
        kdcore.distill(m, r.models[k - 1], tr, method="kd", epochs=2, seed=5 + k, T=1.0, ce_weight=1.0,
                       kd_weight=1.0, **FKW)
        assert same_weights(m, r.models[k])
    # accuracies: each generation's own, and the mean of logits of generations 0..k
    zs = [kdcore.predict(m, te) for m in r.models]
    for k in range(3):
        assert r.val_acc[k] == pytest.approx(np.mean(zs[k].argmax(1) == te.y))
        ens = np.mean(zs[:k + 1], axis=0)
        assert r.ensemble_val_acc[k] == pytest.approx(np.mean(ens.argmax(1) == te.y))
        np.testing.assert_allclose(r.ensemble_logits(te, upto=k), ens, rtol=1e-5, atol=1e-5)
    assert r.ensemble_val_acc[0] == r.val_acc[0]


def test_born_again_reproducible_and_seeded(data):
    tr, _ = data
    a = kdcore.born_again(mlp(32), tr, generations=2, epochs=1, seed=1, **FKW)
    b = kdcore.born_again(mlp(32), tr, generations=2, epochs=1, seed=1, **FKW)
    c = kdcore.born_again(mlp(32), tr, generations=2, epochs=1, seed=2, **FKW)
    assert all(same_weights(x, y) for x, y in zip(a.models, b.models))
    assert not same_weights(a.models[1], c.models[1])
    assert a.val_acc is None and a.ensemble_val_acc is None


def test_born_again_tolerant_first_generation(data, record):
    tr, _ = data
    r = kdcore.born_again(mlp(32), tr, generations=2, epochs=1, tolerant=(0.5, 3), T=2.0, ce_weight=0.3,
                          kd_weight=0.7, seed=0, **FKW)
    assert "tolerant" in r.histories[0] and "tolerant" not in r.histories[1]
    assert record[0]["kw"]["method"] == "ce" and record[0]["kw"]["tolerant"] == (0.5, 3)
    assert "tolerant" not in record[1]["kw"] and record[1]["kw"]["T"] == 2.0
    g0 = mlp(32).fresh(0)
    kdcore.distill(g0, None, tr, method="ce", epochs=1, seed=0, tolerant=(0.5, 3), **FKW)
    assert same_weights(g0, r.models[0])


# ------------------------------------------------------------------------------------------
# teacher assistants and densely guided assistants


@pytest.fixture(scope="module")
def teacher(data, one_thread):
    t = mlp(128, seed=11)
    kdcore.fit(t, data[0], epochs=2, seed=0, **FKW)
    return t


def test_takd_chain(data, teacher, record):
    tr, te = data
    t_state = teacher.state_dict()
    a, s = mlp(64, seed=1), mlp(16, seed=2)
    a0, s0 = a.copy(), s.copy()
    r = kdcore.takd(teacher, a, s, tr, epochs=2, assistant_epochs=1, T=3.0, val=te, seed=4, **FKW)
    assert r.assistants == [a] and r.student is s
    assert r.assistant_history.epochs == 1 and r.student_history.epochs == 2
    assert r.histories == [r.assistant_history, r.student_history]
    assert "kl_student_teacher" in r.student_history
    assert same_weights(teacher, t_state)                    # the teacher is not trained
    assert [c["teacher"] for c in record] == [teacher, a] and [c["student"] for c in record] == [a, s]
    kdcore.distill(a0, teacher, tr, epochs=1, seed=4, T=3.0, **FKW)
    kdcore.distill(s0, a0, tr, epochs=2, seed=5, T=3.0, **FKW)
    assert same_weights(a0, a) and same_weights(s0, s)


def test_takd_longer_chain(data, teacher, record):
    tr, _ = data
    a1, a2, s = mlp(64), mlp(32), mlp(16)
    r = kdcore.takd(teacher, [a1, a2], s, tr, epochs=1, **FKW)
    assert [c["teacher"] for c in record] == [teacher, a1, a2]
    assert len(r.assistant_histories) == 2


def test_dgkd_teacher_sets(data, teacher, record):
    tr, te = data
    a1, a2, s = mlp(64, seed=1), mlp(32, seed=2), mlp(16, seed=3)
    copies = [m.copy() for m in (a1, a2, s)]
    r = kdcore.dgkd(teacher, [a1, a2], s, tr, teacher_drop=0.4, epochs=2, val=te, seed=7, **FKW)
    assert r.teacher_sets == [["teacher"], ["teacher", "assistant0"], ["teacher", "assistant0", "assistant1"]]
    assert [c["student"] for c in record] == [a1, a2, s]
    assert [c["teacher"] for c in record] == [[teacher], [teacher, a1], [teacher, a1, a2]]
    for c in record:
        assert c["kw"]["multi"] == "avg_loss" and c["kw"]["teacher_drop"] == 0.4
    # the guidance models are used with the weights they had after their own stage
    assert same_weights(record[2]["teacher_states"][1], a1) and same_weights(record[2]["teacher_states"][2], a2)
    assert len(r.histories) == 3 and all(h.epochs == 2 for h in r.histories)
    # the same stages by hand
    ha1, ha2, hs = copies
    kdcore.distill(ha1, [teacher], tr, epochs=2, seed=7, multi="avg_loss", teacher_drop=0.4, **FKW)
    kdcore.distill(ha2, [teacher, ha1], tr, epochs=2, seed=8, multi="avg_loss", teacher_drop=0.4, **FKW)
    kdcore.distill(hs, [teacher, ha1, ha2], tr, epochs=2, seed=9, multi="avg_loss", teacher_drop=0.4, **FKW)
    assert same_weights(ha1, a1) and same_weights(ha2, a2) and same_weights(hs, s)


def test_dgkd_drop_changes_training_and_is_seeded(data, teacher):
    tr, _ = data
    runs = []
    for drop, seed in [(0.5, 0), (0.5, 0), (0.0, 0)]:
        a, s = mlp(64, seed=1), mlp(16, seed=2)
        kdcore.dgkd(teacher, a, s, tr, teacher_drop=drop, epochs=1, seed=seed, **FKW)
        runs.append(s)
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])


# ------------------------------------------------------------------------------------------
# snapshot distillation


def test_snapshot_distill_frozen_snapshot_teachers(data, record):
    tr, te = data
    model = mlp(64, seed=2)
    start = model.copy()
    r = kdcore.snapshot_distill(model, tr, cycles=3, epochs_per_cycle=2, min_lr=1e-3, val=te, seed=3, **FKW)
    assert r.model is model and len(r.teachers) == 2 and len(r.histories) == 3
    assert len(record) == 3 and record[0]["kw"]["method"] == "ce"
    for cyc in (1, 2):
        call = record[cyc]
        t = r.teachers[cyc - 1]
        assert call["teacher"] is t and t is not model and call["kw"]["method"] == "kd"
        # the teacher is the model as it was at the end of the previous cycle, and stayed frozen
        assert same_weights(call["teacher_states"][0], call["student_state"])
        assert same_weights(t, call["teacher_states"][0])
        assert not same_weights(t, model)
    assert not same_weights(r.teachers[0], r.teachers[1])
    # cycle 0 has no distillation term, later cycles do
    assert r.histories[0]["kd"] == [0.0, 0.0]
    assert all(v > 0 for h in r.histories[1:] for v in h["kd"])
    # merged history and per-cycle accuracies
    h = r.history
    assert h["epoch"] == list(range(6)) and h["cycle"] == [0, 0, 1, 1, 2, 2]
    assert model.history is h and r.cycle_val_acc == [hh["val_acc"][-1] for hh in r.histories]
    assert np.isnan(h["teacher_train_acc"][0]) and not np.isnan(h["teacher_train_acc"][2])
    # the lr over the whole run is SGDR (torch CosineAnnealingWarmRestarts, T_0 = a cycle)
    np.testing.assert_allclose(h["lr"], torch_warm_restarts(LR, 2, 1e-3, 6), rtol=1e-6)
    # by hand: cycle 0 with CE, then distil from a copy, with the same schedule and seeds
    sched = kdcore.optim.Cosine(T_max=2, min_lr=1e-3)
    kdcore.distill(start, None, tr, method="ce", epochs=2, schedule=sched, seed=3, **FKW)
    for cyc in (1, 2):
        kdcore.distill(start, start.copy(), tr, method="kd", epochs=2, schedule=sched, seed=3 + cyc, **FKW)
    assert same_weights(start, model)


def test_snapshot_distill_reproducible(data):
    tr, _ = data
    a, b = mlp(32), mlp(32)
    kdcore.snapshot_distill(a, tr, cycles=2, epochs_per_cycle=1, seed=1, **FKW)
    kdcore.snapshot_distill(b, tr, cycles=2, epochs_per_cycle=1, seed=1, **FKW)
    assert same_weights(a, b)


# ------------------------------------------------------------------------------------------
# early-stopped teacher


def test_eskd_uses_the_requested_epoch(data, record):
    tr, te = data
    t, s = mlp(128, seed=1), mlp(16, seed=2)
    s0 = s.copy()
    r = kdcore.eskd(t, s, tr, teacher_epochs=3, stop_epoch=2, epochs=3, kd_stop_epoch=2, val=te, seed=6, **FKW)
    assert r.stop_epoch == 2 and r.teacher_history.epochs == 3
    assert set(r.teacher_history.snapshots) == {1}
    assert same_weights(r.teacher, r.teacher_history.snapshots[1])
    assert not same_weights(r.teacher, t)                     # t went on training to epoch 3
    assert record[0]["teacher"] is r.teacher and same_weights(record[0]["teacher_states"][0], r.teacher)
    assert r.student_history["kd_weight"] == pytest.approx([0.9, 0.9, 0.0])
    assert r.student_history["kd"][2] == 0.0
    # by hand: the epoch-2 snapshot as teacher
    early = t.copy()
    early.load_state_dict(r.teacher_history.snapshots[1])
    kdcore.distill(s0, early, tr, epochs=3, kd_stop_epoch=2, seed=7, **FKW)
    assert same_weights(s0, s)


def test_eskd_checkpoint_and_fitted_snapshots(data):
    tr, _ = data
    t = mlp(64, seed=1)
    h = kdcore.fit(t, tr, epochs=2, keep_snapshots=[0], seed=0, **FKW)
    s1, s2 = mlp(16, seed=2), mlp(16, seed=2)
    r1 = kdcore.eskd(t, s1, tr, stop_epoch=1, epochs=1, **FKW)             # teacher.history.snapshots
    r2 = kdcore.eskd(t, s2, tr, checkpoint=h.snapshots[0], epochs=1, **FKW)
    assert r1.teacher_history is None and same_weights(r1.teacher, h.snapshots[0])
    assert same_weights(r2.teacher, h.snapshots[0]) and same_weights(s1, s2)
    with pytest.raises(ValueError, match="stop_epoch"):
        kdcore.eskd(t, mlp(16), tr, stop_epoch=2, epochs=1, **FKW)       # no snapshot after epoch 2


# ------------------------------------------------------------------------------------------
# teacher-free KD


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _kl(p_logits, q_logits, T):
    lp, lq = _log_softmax(np.asarray(p_logits) / T), _log_softmax(np.asarray(q_logits) / T)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("form", ["code", "paper"])
def test_tf_kd_virtual_teacher_targets(data, record, form):
    tr, _ = data
    small = tr.subset(np.arange(512))
    s = mlp(32, seed=4)
    z0 = kdcore.predict(s, small)
    # lr 0 and one full batch: the logged terms are the losses of the initial model on all samples
    r = kdcore.tf_kd(s, small, mode="virtual", form=form, epochs=1, seed=0, progress=False, lr=0.0,
                     batch_size=512, max_steps=1)
    q = virtual_teacher(small.y, 10, 0.99)
    assert np.allclose(q.sum(1), 1) and np.all(q[np.arange(512), small.y] == np.float32(0.99))
    kw = record[0]["kw"]
    assert kw["method"] == "kd" and kw["ce_weight"] == pytest.approx(0.9) and kw["kd_weight"] == pytest.approx(0.1)
    zt = record[0]["teacher_array"]
    if form == "code":   # KL(softmax(p^d / 20) || softmax(z)), student at T = 1
        np.testing.assert_allclose(zt, q / 20, rtol=1e-6)
        assert kw["T"] == 1.0
        want_kd = _kl(q.astype(np.float64) / 20, z0, 1.0)
    else:                # 20^2 KL(softmax(log p^d / 20) || softmax(z / 20))
        np.testing.assert_allclose(zt, np.log(q), rtol=1e-6)
        assert kw["T"] == 20.0
        want_kd = 400 * _kl(np.log(q.astype(np.float64)), z0, 20.0)
    assert r.teacher is zt or np.array_equal(r.teacher, zt)
    assert r.form == form and r.settings["a"] == 0.99
    h = r.student_history
    assert h["kd"][0] == pytest.approx(want_kd, rel=1e-4)
    ce = -_log_softmax(z0)[np.arange(512), small.y].mean()
    assert h["train_loss"][0] == pytest.approx(0.9 * ce + 0.1 * want_kd, rel=1e-4)


def test_tf_kd_multiplier_and_alpha(data, record):
    tr, _ = data
    kdcore.tf_kd(mlp(16), tr, mode="virtual", alpha=0.4, multiplier=1.0, T=10.0, epochs=1, **FKW)
    kw = record[0]["kw"]
    assert kw["ce_weight"] == pytest.approx(0.6) and kw["kd_weight"] == pytest.approx(0.4 / 10)
    np.testing.assert_allclose(record[0]["teacher_array"], virtual_teacher(tr.y, 10, 0.99) / 10, rtol=1e-6)


def test_tf_kd_self(data, record):
    tr, te = data
    s = mlp(64, seed=5)
    s0 = s.copy()
    r = kdcore.tf_kd(s, tr, mode="self", epochs=2, teacher_epochs=1, val=te, seed=2, **FKW)
    assert r.student is s and r.teacher is not s and r.teacher_history.epochs == 1
    assert record[0]["teacher"] is r.teacher and same_weights(record[0]["teacher_states"][0], r.teacher)
    kw = record[0]["kw"]
    assert kw["T"] == 6.0 and kw["ce_weight"] == pytest.approx(0.05) and kw["kd_weight"] == pytest.approx(0.95)
    # by hand: pretrain a copy, then the student learns from it
    t = s0.copy()
    kdcore.fit(t, tr, epochs=1, seed=2, **FKW)
    assert same_weights(t, r.teacher)
    kdcore.distill(s0, t, tr, epochs=2, seed=3, T=6.0, ce_weight=1 - 0.95, kd_weight=0.95, **FKW)
    assert same_weights(s0, s)
    # a given trained teacher is used as is
    s2 = mlp(64, seed=5)
    r2 = kdcore.tf_kd(s2, tr, mode="self", teacher=t, epochs=1, **FKW)
    assert r2.teacher is t and r2.teacher_history is None


# ------------------------------------------------------------------------------------------
# argument validation


def _bad_calls(tr, t):
    m = mlp(16)
    return [
        (lambda: kdcore.born_again("m", tr), TypeError, "model"),
        (lambda: kdcore.born_again(m, tr, generations=0), ValueError, "generations"),
        (lambda: kdcore.born_again(m, tr, epochs=1.5), TypeError, "epochs"),
        (lambda: kdcore.born_again(m, tr, T=0), ValueError, "T"),
        (lambda: kdcore.born_again(m, tr, ce_weight=-1), ValueError, "ce_weight"),
        (lambda: kdcore.born_again(m, tr, kd_weight="x"), TypeError, "kd_weight"),
        (lambda: kdcore.born_again(m, tr, tolerant=0.5), TypeError, "tolerant"),
        (lambda: kdcore.born_again(m, tr, tolerant=(0.5, 1)), ValueError, "tolerant K"),
        (lambda: kdcore.born_again(m, tr, seed=-1), ValueError, "seed"),
        (lambda: kdcore.born_again(m, tr, epoch=3), TypeError, "epoch"),
        (lambda: kdcore.born_again(m, tr, distill_kw={"bogus": 1}), TypeError, "bogus"),
        (lambda: kdcore.born_again(m, tr, distill_kw={"T": 2}), TypeError, "'T'"),
        (lambda: kdcore.born_again(m, tr, distill_kw=[1]), TypeError, "distill_kw"),
        (lambda: kdcore.born_again(m, [1, 2]), TypeError, "train"),
        (lambda: kdcore.takd(t, m, m, tr), ValueError, "student"),
        (lambda: kdcore.takd(t, [], mlp(8), tr), ValueError, "assistant"),
        (lambda: kdcore.takd(t, "a", mlp(8), tr), TypeError, "assistant"),
        (lambda: kdcore.takd(t, m, mlp(8), tr, method="ce"), ValueError, "method"),
        (lambda: kdcore.takd(t, m, mlp(8), tr, assistant_epochs=0), ValueError, "assistant_epochs"),
        (lambda: kdcore.takd(None, m, mlp(8), tr), TypeError, "teacher"),
        (lambda: kdcore.dgkd(t, [m], mlp(8), tr, teacher_drop=1.0), ValueError, "teacher_drop"),
        (lambda: kdcore.dgkd(t, [m, m], mlp(8), tr), ValueError, "assistants"),
        (lambda: kdcore.dgkd(t, [m], mlp(8), tr, distill_kw={"multi": "avg_prob"}), TypeError, "multi"),
        (lambda: kdcore.snapshot_distill(m, tr, cycles=0), ValueError, "cycles"),
        (lambda: kdcore.snapshot_distill(m, tr, epochs_per_cycle=0), ValueError, "epochs_per_cycle"),
        (lambda: kdcore.snapshot_distill(m, tr, min_lr=-1), ValueError, "min_lr"),
        (lambda: kdcore.snapshot_distill(m, tr, schedule="cosine"), TypeError, "schedule"),
        (lambda: kdcore.eskd(t, m, tr, teacher_epochs=2), ValueError, "stop_epoch"),
        (lambda: kdcore.eskd(t, m, tr, teacher_epochs=2, stop_epoch=3), ValueError, "stop_epoch"),
        (lambda: kdcore.eskd(t, m, tr, teacher_epochs=2, stop_epoch=0), ValueError, "stop_epoch"),
        (lambda: kdcore.eskd(t, m, tr, teacher_epochs=0, stop_epoch=1), ValueError, "teacher_epochs"),
        (lambda: kdcore.eskd(t, m, tr, teacher_epochs=2, checkpoint={}), ValueError, "teacher_epochs"),
        (lambda: kdcore.eskd(t, m, tr, checkpoint=[1]), TypeError, "checkpoint"),
        (lambda: kdcore.eskd(t, m, tr, teacher_epochs=2, stop_epoch=1, kd_stop_epoch=0), ValueError,
         "kd_stop_epoch"),
        (lambda: kdcore.eskd(t, t, tr, teacher_epochs=2, stop_epoch=1), ValueError, "student"),
        (lambda: kdcore.tf_kd(m, tr, mode="other"), ValueError, "mode"),
        (lambda: kdcore.tf_kd(m, tr, alpha=1.5), ValueError, "alpha"),
        (lambda: kdcore.tf_kd(m, tr, mode="virtual", a=1.0), ValueError, "a must"),
        (lambda: kdcore.tf_kd(m, tr, mode="virtual", form="book"), ValueError, "form"),
        (lambda: kdcore.tf_kd(m, tr, mode="virtual", teacher=t), ValueError, "teacher"),
        (lambda: kdcore.tf_kd(m, tr, mode="virtual", teacher_epochs=2), ValueError, "teacher_epochs"),
        (lambda: kdcore.tf_kd(m, tr, mode="self", form="code"), ValueError, "form"),
        (lambda: kdcore.tf_kd(m, tr, mode="self", teacher=t, teacher_epochs=1), ValueError, "teacher_epochs"),
        (lambda: kdcore.tf_kd(m, tr, multiplier=-1), ValueError, "multiplier"),
        (lambda: kdcore.tf_kd(m, tr, num_classes=1), ValueError, "num_classes"),
        (lambda: kdcore.tf_kd(m, tr, T=0.0), ValueError, "T"),
    ]


def test_bad_arguments_name_the_argument(data, teacher):
    tr, _ = data
    small = tr.subset(np.arange(64))
    calls = _bad_calls(small, teacher)
    for call, exc, name in calls:
        with pytest.raises(exc, match=name):
            call()
