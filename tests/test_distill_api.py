"""The distillation API: option validation, teacher caching, History contents, learned gates
(gradient vs finite differences), multi-exit networks (one step vs PyTorch), SLKD*."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, c = 240, 4
    y = rng.integers(0, c, n)
    X = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    X[np.arange(n), 0, y, :] += 1.5
    tr = kdcore.datasets.from_arrays(X[:160], y[:160], num_classes=c)
    te = kdcore.datasets.from_arrays(X[160:], y[160:], num_classes=c, normalize=(tr.mean, tr.std))
    return tr, te


def mlp(h=16, seed=0):
    return kdcore.models.mlp([64, h, 4], seed=seed)


KW = dict(batch_size=32, progress=False, optimizer=kdcore.optim.SGD(lr=0.05))


@pytest.fixture(scope="module")
def teacher(data):
    t = mlp(64, seed=9)
    kdcore.fit(t, data[0], epochs=4, **KW)
    return t


def test_distill_validates_options(data, teacher):
    tr, _ = data
    s = mlp()
    with pytest.raises(ValueError, match="method"):
        kdcore.distill(s, teacher, tr, method="no_such_method", **KW)
    with pytest.raises(ValueError, match="T must be"):
        kdcore.distill(s, teacher, tr, T=0, **KW)
    with pytest.raises(ValueError, match="teacher_weights"):
        kdcore.distill(s, [teacher, teacher.copy()], tr, teacher_weights=[1.0], **KW)
    with pytest.raises(ValueError, match="multi"):
        kdcore.distill(s, teacher, tr, multi="max", **KW)
    with pytest.raises(ValueError, match="own teacher"):
        kdcore.distill(s, s, tr, **KW)
    with pytest.raises(TypeError, match="teacher must be"):
        kdcore.distill(s, "resnet", tr, **KW)
    with pytest.raises(ValueError, match="teacher logits"):
        kdcore.distill(s, np.zeros((3, 4), np.float32), tr, **KW)
    with pytest.raises(ValueError, match="cached"):
        kdcore.distill(s, teacher, tr, augment={"hflip": True}, cache=True, **KW)
    with pytest.raises(ValueError, match="learn_gates"):
        kdcore.distill(s, teacher, tr, learn_gates=True, **KW)
    with pytest.raises(ValueError, match="unknown distillation options"):
        _kdcore.distill_epoch(s.net, kdcore.optim.SGD().bind(s), tr._c, 0,
                              dict(batch_size=8, schedule=(0, 0.1, [], 0, 0.0, 0)), dict(temperature=4),
                              teacher_logits=[kdcore.predict(teacher, tr)])


def test_cached_and_live_teacher_agree(data, teacher):
    """Without augmentation the cached teacher logits equal the live teacher's outputs up to
    float rounding (BLAS blocks a batch of 512 differently from one of 32), so the two runs
    agree to rounding."""
    tr, te = data
    a, b = mlp(seed=3), mlp(seed=3)
    ha = kdcore.distill(a, teacher, tr, epochs=2, cache=True, val=te, **KW)
    hb = kdcore.distill(b, teacher, tr, epochs=2, cache=False, val=te, **KW)
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(v, b.state_dict()[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=1e-5)
    for key in ("train_loss", "ce", "kd", "train_acc", "teacher_train_acc", "lr", "kd_weight", "val_acc",
                "kl_student_teacher"):
        assert key in ha, key
    # the teacher is not changed by being distilled from
    t0 = teacher.state_dict()
    kdcore.distill(mlp(seed=4), teacher, tr, epochs=1, cache=False, **KW)
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, t0[k])


def test_kd_beats_random_and_logs_dkd_parts(data, teacher):
    tr, te = data
    h = kdcore.distill(mlp(seed=5), teacher, tr, method="dkd", epochs=4, warmup_epochs=2, val=te, **KW)
    assert h["kd_weight"][:2] == [0.5, 1.0]
    assert {"tckd", "nckd"} <= set(h)
    assert h.last["val_acc"] > 0.6


def test_kl_student_teacher_matches_numpy(data, teacher):
    tr, te = data
    s = mlp(seed=6)
    h = kdcore.distill(s, teacher, tr, epochs=1, val=te, **KW)
    zs, zt = kdcore.predict(s, te).astype(np.float64), kdcore.predict(teacher, te).astype(np.float64)
    ps, pt = torch.softmax(torch.tensor(zs), 1), torch.softmax(torch.tensor(zt), 1)
    ref = float((ps * (ps.log() - pt.log())).sum(1).mean())
    assert h.last["kl_student_teacher"] == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_learned_gate_gradient_matches_finite_differences(data):
    """One step with learning rate 0 for the student: the gate update equals -gate_lr * dL/dw,
    with dL/dw from finite differences of the KD loss as a function of the gates."""
    tr, _ = data
    rng = np.random.default_rng(1)
    n = len(tr)
    zt = [rng.normal(0, 2, (n, 4)).astype(np.float32) for _ in range(3)]
    s = mlp(seed=7)
    gates = np.array([0.3, -0.2, 0.1], np.float32)
    g0 = gates.copy()
    opts = dict(kind=1, T=3.0, ce_weight=0.0, kd_weight=1.0, gate_lr=1.0)
    train = dict(batch_size=n, schedule=(0, 0.0, [], 0, 0.0, 0), shuffle=False, max_steps=1)
    zs = kdcore.predict(s, tr)   # eval-mode logits; the step uses train mode: no BN/dropout here
    _kdcore.distill_epoch(s.net, kdcore.optim.SGD(lr=0.0, momentum=0.0, weight_decay=0.0).bind(s), tr._c, 0, train,
                          opts, teacher_logits=zt, gates=gates)

    def loss(w):
        g = torch.softmax(torch.tensor(w, dtype=torch.float64), 0)
        q = sum(g[i] * torch.softmax(torch.tensor(zt[i], dtype=torch.float64) / 3.0, 1) for i in range(3))
        lps = torch.log_softmax(torch.tensor(zs, dtype=torch.float64) / 3.0, 1)
        return float(9.0 * (q * (q.log() - lps)).sum(1).mean())

    eps = 1e-4
    grad = np.array([(loss(g0 + eps * e) - loss(g0 - eps * e)) / (2 * eps) for e in np.eye(3)])
    np.testing.assert_allclose(g0 - gates, grad, rtol=2e-3, atol=1e-6)


def test_multi_exit_self_distillation_step_matches_torch(data):
    """One step of deep supervision (BYOT without the hint term) on a two-exit MLP-like net,
    vs the same step in PyTorch."""
    tr, _ = data
    base = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(64, 16), kdcore.nn.ReLU(),
                                kdcore.nn.Linear(16, 12), kdcore.nn.ReLU(), kdcore.nn.Linear(12, 4))
    m = kdcore.nn.MultiExit(base, {"2": kdcore.nn.Linear(16, 4), "4": kdcore.nn.Linear(12, 4)})
    sd = {k: torch.tensor(v, dtype=torch.float64) for k, v in m.state_dict().items()}
    X = tr.batch(np.arange(len(tr)))
    y = torch.tensor(tr.y)
    T, cw, kw = 3.0, 0.7, 0.3
    opt = kdcore.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4).bind(m)
    st, accs = _kdcore.exits_epoch(m.net, opt, list(m.exit_nodes) + [m.output_node], tr._c, 0,
                                   dict(batch_size=len(tr), schedule=(0, 0.1, [], 0, 0.0, 0), shuffle=False,
                                        max_steps=1), T=T, ce_weight=cw, kd_weight=kw)
    P = {k: v.clone().requires_grad_() for k, v in sd.items()}
    x = torch.tensor(X, dtype=torch.float64).reshape(len(tr), -1)
    h1 = torch.relu(x @ P["1.weight"].T + P["1.bias"])
    h2 = torch.relu(h1 @ P["3.weight"].T + P["3.bias"])
    out = h2 @ P["5.weight"].T + P["5.bias"]
    e1 = h1 @ P["exits.2.weight"].T + P["exits.2.bias"]
    e2 = h2 @ P["exits.4.weight"].T + P["exits.4.bias"]
    pt = torch.softmax(out.detach() / T, 1)
    loss = TF.cross_entropy(out, y)
    for e in (e1, e2):
        kl = (pt * (pt.log() - torch.log_softmax(e / T, 1))).sum(1).mean() * T * T
        loss = loss + cw * TF.cross_entropy(e, y) + kw * kl
    loss.backward()
    assert st["loss"] == pytest.approx(loss.item(), rel=1e-4)
    new = m.state_dict()
    for k, p in P.items():
        want = p.detach() - 0.1 * (p.grad + 5e-4 * p.detach())   # first SGD step: buf = grad
        np.testing.assert_allclose(new[k], want.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
    assert len(accs) == 3


def test_multi_exit_api(data, teacher):
    tr, te = data
    m = kdcore.models.with_exits(kdcore.models.cnn(num_classes=4, input_size=8, width=4), ["6", "13"])
    assert m.exit_names() == ["6", "13", "output"]
    h = kdcore.multi_exit(m, tr, epochs=2, val=te, **KW)
    assert {"exit_6_val_acc", "exit_13_val_acc", "exit_output_val_acc"} <= set(h)
    assert h.last["exit_output_val_acc"] == pytest.approx(h.last["val_acc"])
    h = kdcore.multi_exit(m, tr, teacher=kdcore.models.cnn(num_classes=4, input_size=8, width=4), epochs=1, **KW)
    assert h.epochs == 1
    with pytest.raises(TypeError, match="MultiExit"):
        kdcore.multi_exit(mlp(), tr, **KW)
    with pytest.raises(KeyError, match="not a tap"):
        kdcore.nn.MultiExit(mlp(), {"nope": kdcore.nn.Linear(4, 4)}).net
    # a trained backbone's weights load into the multi-exit model (strict=False)
    b = kdcore.models.cnn(num_classes=4, input_size=8, width=4, seed=3)
    m2 = kdcore.models.with_exits(b, ["13"])
    m2.load_state_dict(b.state_dict(), strict=False)
    x = te.batch(np.arange(5))
    np.testing.assert_allclose(m2.eval()(x), b.eval()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fuse", ["logits", "probs"])
def test_slkd_kl_to_fused_sl_teacher_at_T1(data, teacher, fuse):
    """kl_student_slt is KL(p_s || q) at T=1 on val, q the SL-teachers fused as the run fuses
    them (rho-weighted logits, or rho-weighted probabilities), whatever the training T."""
    tr, te = data
    s = mlp(seed=8)
    h = kdcore.slkd(s, teacher, tr, epochs=1, val=te, fuse=fuse, rho=0.7, T=4.0, **KW)

    def softmax(z):
        z = np.asarray(z, np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    z0, z1 = (kdcore.predict(m, te) for m in s.sl_teachers)
    q = softmax(0.7 * z0 + 0.3 * z1) if fuse == "logits" else 0.7 * softmax(z0) + 0.3 * softmax(z1)
    ps = softmax(kdcore.predict(s, te))
    want = float(np.mean(np.sum(ps * (np.log(ps) - np.log(q)), 1)))
    assert h.last["kl_student_slt"] == pytest.approx(want, rel=1e-4)


def test_slkd_sequential_and_options(data, teacher):
    tr, te = data
    s = mlp(seed=8)
    h = kdcore.slkd(s, teacher, tr, epochs=2, sequential=True, val=te, **KW)
    assert {"loss_ts", "loss_slts", "kl_student_teacher", "kl_student_slt", "sl0_val_acc"} <= set(h)
    assert len(s.sl_teachers) == 2
    with pytest.raises(ValueError, match="n_sl"):
        kdcore.slkd(mlp(), teacher, tr, n_sl=3, **KW)
    with pytest.raises(ValueError, match="fuse"):
        kdcore.slkd(mlp(), teacher, tr, fuse="mean", **KW)
    with pytest.raises(ValueError, match="sl_grad"):
        kdcore.slkd(mlp(), teacher, tr, fuse="probs", sl_grad=True, **KW)
    h = kdcore.slkd(mlp(seed=9), teacher, tr, epochs=1, n_sl=1, **KW)
    assert "sl0_loss" in h and "sl1_loss" not in h


@pytest.mark.parametrize("sequential", [False, True])
def test_slkd_sl_tau2_changes_only_the_students_sl_term(data, teacher, sequential):
    """sl_tau2=False reaches the engine and rescales the student's SL-teacher term alone: the
    SL-teachers (parallel, or SLKD*'s phase 1) train bitwise as with the default, the student
    does not (its SL term is T^2 = 16 times smaller). The step itself is checked against
    PyTorch in test_schemes_torch.py."""
    tr, _ = data
    runs = {}
    for tau2 in (True, False):
        s = mlp(seed=8)
        h = kdcore.slkd(s, teacher, tr, epochs=2, sl_tau2=tau2, sequential=sequential, T=4.0, **KW)
        runs[tau2] = (s, h)
    (s1, h1), (s0, h0) = runs[True], runs[False]
    for j in range(2):
        for k, v in s1.sl_teachers[j].state_dict().items():
            np.testing.assert_array_equal(v, s0.sl_teachers[j].state_dict()[k], err_msg=f"sl{j} {k}")
    assert any(not np.array_equal(v, s0.state_dict()[k]) for k, v in s1.state_dict().items())
    # loss_slts reports the term as optimised: alpha CE + (1 - alpha) KL, the KL part without T^2
    assert h0.last["loss_slts"] < h1.last["loss_slts"]


def test_mutual_logs_every_peer(data):
    tr, te = data
    peers = [mlp(seed=1), mlp(seed=2), mlp(seed=3)]
    h = kdcore.mutual(peers, tr, epochs=2, val=te, **KW)
    assert {"peer0_val_acc", "peer2_val_acc", "ensemble_val_acc", "peer1_kd"} <= set(h)
    with pytest.raises(ValueError, match="twice"):
        kdcore.mutual([peers[0], peers[0]], tr, **KW)


def test_fickle_teacher_runs_dropout_with_frozen_bn(data):
    """fickle=True: the teacher keeps dropout on (its outputs differ step to step, so they are
    not cached) while its BN statistics stay frozen."""
    tr, _ = data
    t = kdcore.models.mlp([64, 64, 4], dropout=0.5, batchnorm=True, seed=2)
    kdcore.fit(t, tr, epochs=2, **KW)
    before = t.state_dict()
    runs = []
    for fickle in (False, True):
        s = mlp(seed=3)
        h = kdcore.distill(s, t, tr, epochs=1, fickle=fickle, **KW)
        runs.append((h.last["teacher_train_acc"], s.state_dict()))
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert runs[0][0] == pytest.approx(float(np.mean(kdcore.predict(t, tr).argmax(1) == tr.y)))
    assert any(not np.allclose(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_student_noise_changes_only_the_student_input(data, teacher):
    tr, _ = data
    a, b = mlp(seed=4), mlp(seed=4)
    ha = kdcore.distill(a, teacher, tr, epochs=1, student_noise=0.0, **KW)
    hb = kdcore.distill(b, teacher, tr, epochs=1, student_noise=0.5, **KW)
    assert ha.last["teacher_train_acc"] == hb.last["teacher_train_acc"]   # the teacher sees clean inputs
    assert ha.last["train_loss"] != hb.last["train_loss"]
