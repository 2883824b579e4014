"""Adversarial KD with a discriminator (kdcore.adversarial) on the step engine vs the same
steps in PyTorch (float64) on the same weights: the BCE-with-logits loss and its gradient
(large |x| included); one whole cycle (the discriminator's step on the teacher's and the
student's logits, then the student's step with CE + KD + the generator loss through the
discriminator) through the public API; which net each phase updates; the twin net's
configuration errors; the Python API's argument errors and its History."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore
from kdcore import functional as F
from kdcore.distill import _adversarial_step

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)
V, N = 4, 8


# ---- the BCE-with-logits loss --------------------------------------------------------------

@pytest.mark.parametrize("target", [0.0, 1.0, 0.25])
def test_bce_loss_matches_autograd(rng, target):
    x = rng.normal(0, 3, (7, 1)).astype(np.float32)
    x[:4, 0] = [-95.0, -30.0, 40.0, 120.0]   # far tails: the naive form overflows or loses the term
    loss, d = F.bce_with_logits_loss(x, target)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = TF.binary_cross_entropy_with_logits(xt, torch.full_like(xt, target))
    ref.backward()
    check_close("bce", loss, ref.item(), rtol=1e-6)
    check_close("dbce/dx", d, xt.grad.numpy(), rtol=1e-6, atol=1e-9)
    assert np.isfinite(loss) and np.all(np.isfinite(d))


def test_bce_loss_several_columns(rng):
    x = rng.normal(0, 2, (3, 5)).astype(np.float32)
    loss, d = F.bce_with_logits_loss(x, 0.0)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = TF.binary_cross_entropy_with_logits(xt, torch.zeros_like(xt))   # mean over every entry
    ref.backward()
    check_close("bce 3x5", loss, ref.item(), rtol=1e-6)
    check_close("dbce/dx 3x5", d, xt.grad.numpy(), rtol=1e-6)


def test_bce_loss_errors():
    with pytest.raises(ValueError, match="target"):
        F.bce_with_logits_loss(np.zeros((2, 1), np.float32), 1.5)
    with pytest.raises(TypeError, match="target"):
        F.bce_with_logits_loss(np.zeros((2, 1), np.float32), "1")
    with pytest.raises(TypeError, match="logits"):
        F.bce_with_logits_loss(np.zeros((2, 1), np.float64), 1.0)


# ---- one cycle against PyTorch ----------------------------------------------------------------

class TorchConditionalD(torch.nn.Module):
    """models.discriminator(V, 8, conditional=True): the logits and the label one-hot
    concatenated, Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(2 * V, 8)
        self.fc2 = torch.nn.Linear(8, 1)
        self.onehot = None   # the batch's labels, one-hot, set before each use

    def forward(self, z):
        return self.fc2(torch.relu(self.fc1(torch.cat([z, self.onehot], 1))))


def models(student_arch, conditional=False):
    """student (mlp or cnn), teacher (cnn with moved BN statistics), discriminator (an mlp,
    or the conditional one) and their float64 PyTorch twins."""
    if student_arch == "mlp":
        student = kdcore.models.mlp([64, 16, V], seed=2)
        ts = torch_ref.torch_mlp([64, 16, V])
    else:
        student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
        ts = torch_ref.torch_cnn(V, 1, 4)
    teacher = teacher_of(6)
    disc = kdcore.models.discriminator(V, 8, conditional=conditional, seed=5)
    ts = torch_ref.load_into_torch(ts, student.state_dict()).double().train()
    tt = torch_ref.load_into_torch(torch_ref.torch_cnn(V, 1, 6), teacher.state_dict()).double().eval()
    td = TorchConditionalD() if conditional else torch_ref.torch_mlp([V, 8, 1])
    td = torch_ref.load_into_torch(td, disc.state_dict()).double().train()
    return student, teacher, disc, ts, tt, td


def batch():
    r = np.random.default_rng(7)
    x = r.standard_normal((N, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, N)
    return x, y


def bce(z, target):
    return TF.binary_cross_entropy_with_logits(z, torch.full_like(z, target))


@pytest.mark.parametrize("arch, conditional", [("mlp", False), ("cnn", False), ("cnn", True)])
def test_cycle_matches_torch(arch, conditional):
    """One batch, one epoch: the discriminator's step, then the student's, on the same
    samples, through kdcore.adversarial; both nets' updates, the student's BN statistics and
    the History's terms equal the PyTorch loop. Conditional: D also reads the labels."""
    student, teacher, disc, ts, tt, td = models(arch, conditional)
    s0, d0, t0 = student.state_dict(), disc.state_dict(), teacher.state_dict()
    x, y = batch()
    train = kdcore.datasets.from_arrays(x, y, num_classes=V, normalize=None)
    lr_s, lr_d, ce_w, kd_w, T, w_adv = 0.05, 0.2, 0.3, 0.7, 3.0, 0.5
    opt_s = kdcore.optim.SGD(lr=lr_s, momentum=0.9, weight_decay=5e-4)
    opt_d = kdcore.optim.SGD(lr=lr_d, momentum=0.9, weight_decay=0.0)
    hist = kdcore.adversarial(student, teacher, train, epochs=1, batch_size=N, optimizer=opt_s, discriminator=disc,
                              d_optimizer=opt_d, ce_weight=ce_w, kd_weight=kd_w, T=T, w_adv=w_adv,
                              conditional=conditional, progress=False)
    assert student.discriminator is disc

    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    if conditional:
        td.onehot = TF.one_hot(yt, V).double()
    od = torch.optim.SGD(td.parameters(), lr=lr_d, momentum=0.9)
    os_ = torch.optim.SGD(ts.parameters(), lr=lr_s, momentum=0.9, weight_decay=5e-4)
    # phase 0: the discriminator, the student detached (its train-mode forward moves BN)
    with torch.no_grad():
        zt, zs = tt(xt), ts(xt)
    dt, ds = td(zt), td(zs)
    d_t, d_s = bce(dt, 1.0), bce(ds, 0.0)
    d_acc = ((dt > 0).double().mean() + (ds <= 0).double().mean()).item() / 2
    od.zero_grad()
    (d_t + d_s).backward()
    od.step()
    # phase 1: the student through the (updated, not stepped) discriminator
    zs, zt = ts(xt), tt(xt).detach()
    ce = TF.cross_entropy(zs, yt)
    kd = TF.kl_div(TF.log_softmax(zs / T, 1), TF.softmax(zt / T, 1), reduction="batchmean") * T * T
    adv = bce(td(zs), 1.0)
    os_.zero_grad()
    (ce_w * ce + kd_w * kd + w_adv * adv).backward()
    os_.step()

    check_models("student", student, ts, s0)
    check_models("discriminator", disc, td, d0)
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, t0[k])
    for name, want in (("d_teacher", d_t), ("d_student", d_s), ("ce", ce), ("kd", kd), ("adv", adv)):
        check_close(name, hist.last[name], want.item(), rtol=1e-5)
    check_close("d_loss", hist.last["d_loss"], (d_t + d_s).item(), rtol=1e-5)
    assert hist.last["d_acc"] == pytest.approx(d_acc)
    check_close("train_loss", hist.last["train_loss"], (ce_w * ce + kd_w * kd + w_adv * adv).item(), rtol=1e-5)


@pytest.mark.parametrize("arch, width, tap", [("mlp", 8, "pooled"), ("cnn", 4, ("12", "12")), ("cnn", 4, ("11", "12"))])
def test_tap_cycle_matches_torch(arch, width, tap):
    """tap=: the discriminator reads a feature (flattened) of each model instead of the
    logits -- the pooled features through feature_taps(), a map tap pair, and a student tap
    before a ReLU (which a lean training forward would otherwise overwrite). One cycle equals
    PyTorch's, the generator loss's gradient entering the student at its tap."""
    student, _, _, ts, _, _ = models(arch)
    teacher = teacher_of(width)
    tt = torch_ref.load_into_torch(torch_ref.torch_cnn(V, 1, width), teacher.state_dict()).double().eval()
    s_name, t_name = (student.feature_taps()[tap], teacher.feature_taps()[tap]) if isinstance(tap, str) else tap
    x, y = batch()
    feat = int(np.prod(student.net.shapes(1, 1, 8, 8)[student._tap_index(s_name)]))
    disc = kdcore.models.discriminator(feat, 8, seed=5)
    td = torch_ref.load_into_torch(torch_ref.torch_mlp([feat, 8, 1]), disc.state_dict()).double().train()
    s0, d0 = student.state_dict(), disc.state_dict()
    train = kdcore.datasets.from_arrays(x, y, num_classes=V, normalize=None)
    lr_s, lr_d, ce_w, kd_w, T, w_adv = 0.05, 0.2, 0.3, 0.7, 3.0, 0.5
    hist = kdcore.adversarial(student, teacher, train, epochs=1, batch_size=N, discriminator=disc, tap=tap,
                              optimizer=kdcore.optim.SGD(lr=lr_s, momentum=0.9, weight_decay=5e-4),
                              d_optimizer=kdcore.optim.SGD(lr=lr_d, momentum=0.9, weight_decay=0.0), ce_weight=ce_w, kd_weight=kd_w,
                              T=T, w_adv=w_adv, progress=False)

    torch_ref.capture(ts, [s_name])
    torch_ref.capture(tt, [t_name])
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    od = torch.optim.SGD(td.parameters(), lr=lr_d, momentum=0.9)
    os_ = torch.optim.SGD(ts.parameters(), lr=lr_s, momentum=0.9, weight_decay=5e-4)
    with torch.no_grad():
        tt(xt), ts(xt)
        ft, fs = tt.hooked[t_name].flatten(1).clone(), ts.hooked[s_name].flatten(1).clone()
    dt, ds = td(ft), td(fs)
    d_t, d_s = bce(dt, 1.0), bce(ds, 0.0)
    d_acc = ((dt > 0).double().mean() + (ds <= 0).double().mean()).item() / 2
    od.zero_grad()
    (d_t + d_s).backward()
    od.step()
    zs = ts(xt)
    fs = ts.hooked[s_name].flatten(1)
    with torch.no_grad():
        zt = tt(xt)
    ce = TF.cross_entropy(zs, yt)
    kd = TF.kl_div(TF.log_softmax(zs / T, 1), TF.softmax(zt / T, 1), reduction="batchmean") * T * T
    adv = bce(td(fs), 1.0)
    os_.zero_grad()
    (ce_w * ce + kd_w * kd + w_adv * adv).backward()
    os_.step()

    check_models("student", student, ts, s0)
    check_models("discriminator", disc, td, d0)
    for name, want in (("d_teacher", d_t), ("d_student", d_s), ("ce", ce), ("kd", kd), ("adv", adv)):
        check_close(name, hist.last[name], want.item(), rtol=1e-5)
    assert hist.last["d_acc"] == pytest.approx(d_acc)


def test_tap_errors():
    student, teacher, *_ = models("mlp")
    x, y = batch()
    train = kdcore.datasets.from_arrays(x, y, num_classes=V, normalize=None)
    kw = dict(epochs=1, batch_size=N, progress=False)
    with pytest.raises(ValueError, match="tap: the student has no tap named 'nope'"):
        kdcore.adversarial(student, teacher, train, tap="nope", **kw)
    with pytest.raises(ValueError, match="tap: the teacher has no tap named 'fc9'"):
        kdcore.adversarial(student, teacher, train, tap=("2", "fc9"), **kw)
    with pytest.raises(ValueError, match="tap: the student has no tap named 'stages'"):
        kdcore.adversarial(student, teacher, train, tap="stages", **kw)   # a list of taps, not one
    with pytest.raises(ValueError, match=r"tap: .*same shape"):
        kdcore.adversarial(student, teacher, train, tap="pooled", **kw)   # 16 features against the teacher's 12
    with pytest.raises(TypeError, match="tap"):
        kdcore.adversarial(student, teacher, train, tap=("2",), **kw)
    with pytest.raises(TypeError, match="tap"):
        kdcore.adversarial(student, teacher, train, tap=3, **kw)
    wide = teacher_of(8)
    with pytest.raises(ValueError, match="tap: conditional"):
        kdcore.adversarial(student, wide, train, tap="pooled", conditional=True, **kw)
    with pytest.raises(ValueError, match="discriminator cannot read the tapped feature"):
        kdcore.adversarial(student, wide, train, tap="pooled", discriminator=kdcore.models.mlp([V, 8, 1]), **kw)


def test_tap_default_run(rng):
    """The pooled features with the default discriminator (sized for them): every column
    finite, and the student's generator loss pulls D's accuracy on the features down from
    where D alone drives it (w_adv large against w_adv 0)."""
    r = np.random.default_rng(3)
    X = r.standard_normal((256, 1, 8, 8)).astype(np.float32)
    Y = r.integers(0, V, 256)
    X[np.arange(256), 0, Y, :] += 2.0
    train = kdcore.datasets.from_arrays(X, Y, num_classes=V)
    teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=8, seed=1)
    kdcore.fit(teacher, train, epochs=2, batch_size=32, lr=0.05, progress=False)
    accs = {}
    for w_adv in (0.0, 2.0):
        student = kdcore.models.mlp([64, 16, V], seed=2)
        hist = kdcore.adversarial(student, teacher, train, epochs=4, batch_size=32, lr=0.05, w_adv=w_adv,
                                  d_optimizer=kdcore.optim.Adam(lr=1e-3), tap="pooled", progress=False)
        for k in ("d_loss", "d_acc", "adv", "train_loss"):
            assert len(hist[k]) == 4 and all(np.isfinite(hist[k])), k
        assert student.discriminator.net.shapes(1, 16, 1, 1)[student.discriminator._output_index()] == (1, 1, 1)
        accs[w_adv] = hist["d_acc"][-1]
    assert accs[2.0] < accs[0.0], accs


def engine(student, teacher, disc, d_mask, s_mask, lr_d=0.2):
    opt_s = kdcore.optim.SGD(lr=0.05).bind(student)
    opt_d = kdcore.optim.SGD(lr=lr_d, momentum=0.0, weight_decay=0.0).bind(disc)
    twin = disc.copy()
    return _adversarial_step(student, teacher, disc, twin, opt_s, opt_d, lr_d / 0.05, 0.3, 0.7, 3.0, 0.5, d_mask,
                             s_mask) + (twin,)


def run_one_step(nets, terms):
    x, y = batch()
    ds = kdcore.datasets.from_arrays(x, y, num_classes=V, normalize=None)
    topts = dict(batch_size=N, schedule=(0, 0.05, [], 0, 0.0, 0), shuffle=False, max_steps=1)
    return _kdcore.step_epoch(nets, terms, ds._c, 0, topts, logits_net=0, cycle=2, cycle_batch=True)


def params_of(model):
    return {k: v.copy() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}


@pytest.mark.parametrize("first", ["discriminator", "student"])
def test_each_phase_updates_only_its_net(first):
    """The first step of a cycle alone: in the discriminator's phase the student's parameters
    stay (its BN statistics move: a train-mode forward), in the student's the discriminator's
    parameters stay though the generator loss's gradient passes through it."""
    student, teacher, disc, *_ = models("cnn")
    s0, d0 = params_of(student), params_of(disc)
    masks = (1, 2) if first == "discriminator" else (2, 1)
    st = run_one_step(*engine(student, teacher, disc, *masks)[:2])
    s1, d1 = params_of(student), params_of(disc)
    moved_s = any(not np.array_equal(s1[k], s0[k]) for k in s0)
    moved_d = any(not np.array_equal(d1[k], d0[k]) for k in d0)
    if first == "discriminator":
        assert moved_d and not moved_s
        assert st["term_value"][0] > 0 and st["term_value"][4] == 0
    else:
        assert moved_s and not moved_d
        assert st["term_value"][4] > 0 and st["term_value"][0] == 0


def test_discriminator_learns_both_sides():
    """Without the twin's gradient the discriminator would learn from the teacher's logits
    only: its update equals PyTorch's on BCE(D(z_t), 1) + BCE(D(z_s), 0), not on the first."""
    student, teacher, disc, ts, tt, td = models("mlp")
    d0 = disc.state_dict()
    run_one_step(*engine(student, teacher, disc, 1, 2, lr_d=0.5)[:2])
    x, _ = batch()
    xt = torch.tensor(x, dtype=torch.float64)
    with torch.no_grad():
        zt, zs = tt(xt), ts(xt)
    od = torch.optim.SGD(td.parameters(), lr=0.5)
    (bce(td(zt), 1.0) + bce(td(zs), 0.0)).backward()
    od.step()
    check_models("discriminator", disc, td, d0)


# ---- errors -----------------------------------------------------------------------------------

def test_twin_errors():
    student, teacher, disc, *_ = models("mlp")
    nets, terms, twin = engine(student, teacher, disc, 1, 2)
    bad = [dict(n) for n in nets]
    bad[3]["shares"] = 2   # the teacher: not a trained net
    with pytest.raises(ValueError, match="shares"):
        run_one_step(bad, terms)
    bad = [dict(n) for n in nets]
    bad[3]["net"] = kdcore.models.mlp([V, 5, 1]).net   # built differently
    with pytest.raises(ValueError, match="twin must be built"):
        run_one_step(bad, terms)
    bad = [dict(n) for n in nets]
    bad[3]["opt"] = kdcore.optim.SGD(lr=0.1).bind(twin)
    with pytest.raises(ValueError, match="twin needs"):
        run_one_step(bad, terms)
    bad_terms = [dict(t) for t in terms]
    bad_terms[0]["target"] = 2.0
    with pytest.raises(ValueError, match="target"):
        run_one_step(nets, bad_terms)


def test_api_errors():
    student, teacher, disc, *_ = models("mlp")
    x, y = batch()
    train = kdcore.datasets.from_arrays(x, y, num_classes=V, normalize=None)
    kw = dict(epochs=1, batch_size=N, progress=False)
    with pytest.raises(ValueError, match="w_adv"):
        kdcore.adversarial(student, teacher, train, w_adv=-1.0, **kw)
    with pytest.raises(ValueError, match="T"):
        kdcore.adversarial(student, teacher, train, T=0.0, **kw)
    with pytest.raises(TypeError, match="discriminator"):
        kdcore.adversarial(student, teacher, train, discriminator="mlp", **kw)
    with pytest.raises(ValueError, match="discriminator"):
        kdcore.adversarial(student, teacher, train, discriminator=student, **kw)
    with pytest.raises(ValueError, match="one value"):
        kdcore.adversarial(student, teacher, train, discriminator=kdcore.models.mlp([V, 8, 2]), **kw)
    with pytest.raises(ValueError, match="BatchNorm"):
        kdcore.adversarial(student, teacher, train, discriminator=kdcore.models.mlp([V, 8, 1], batchnorm=True), **kw)
    with pytest.raises(TypeError, match="d_optimizer"):
        kdcore.adversarial(student, teacher, train, d_optimizer="adam", **kw)
    with pytest.raises(ValueError, match="own teacher"):
        kdcore.adversarial(student, student, train, **kw)
    with pytest.raises(ValueError, match="adversarial"):
        kdcore.distill(student, teacher, train, method="adversarial", **kw)
    with pytest.raises(ValueError, match="conditional"):
        kdcore.adversarial(student, teacher, train, conditional=True, discriminator=kdcore.models.mlp([V, 8, 1]), **kw)
    with pytest.raises(ValueError, match="conditional"):
        kdcore.adversarial(student, teacher, train, discriminator=kdcore.models.discriminator(V, conditional=True), **kw)
    with pytest.raises(ValueError, match="augment"):
        kdcore.adversarial(student, teacher, train, conditional=True, augment=dict(hflip=True), **kw)
    with pytest.raises(TypeError, match="conditional"):
        kdcore.adversarial(student, teacher, train, conditional="yes", **kw)


def test_default_run_learns(rng):
    """The defaults on a separable toy task: the History has one row per epoch with the
    discriminator's and the student's columns, the student beats chance."""
    x, y = batch()
    r = np.random.default_rng(3)
    X = r.standard_normal((256, 1, 8, 8)).astype(np.float32)
    Y = r.integers(0, V, 256)
    X[np.arange(256), 0, Y, :] += 2.0
    train = kdcore.datasets.from_arrays(X, Y, num_classes=V)
    teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=8, seed=1)
    kdcore.fit(teacher, train, epochs=2, batch_size=32, lr=0.05, progress=False)
    student = kdcore.models.mlp([64, 32, V], seed=2)
    hist = kdcore.adversarial(student, teacher, train, epochs=3, batch_size=32, lr=0.05, val=train, progress=False)
    for k in ("d_loss", "d_acc", "d_teacher", "d_student", "ce", "kd", "adv", "train_loss", "val_acc"):
        assert len(hist[k]) == 3 and all(np.isfinite(hist[k])), k
    assert 0 <= min(hist["d_acc"]) and max(hist["d_acc"]) <= 1
    assert hist["val_acc"][-1] > 0.5
    assert student.discriminator.net.shapes(1, V, 1, 1)[student.discriminator._output_index()] == (1, 1, 1)
