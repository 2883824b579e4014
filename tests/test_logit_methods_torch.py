"""Logit methods published since DKD, vs PyTorch autograd (float64) on the same logits and
weights: each loss's value and gradient (hard cases included), and one full distillation
step per method (student update, reported terms).

DIST's reference is written here from the paper's definition (Pearson correlations of the
softened distributions, per sample and per class); NormKD's and WTTM's from their papers'
definitions in the form of the authors' code (NormKD: per-sample temperatures t_norm * std,
the student's std differentiated; WTTM: softmax(t)^gamma renormalised, weighted by its power
sum), with kdcore's guard for rows of equal logits."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import functional as F
from kdcore import losses as L

sys.path.insert(0, os.path.dirname(__file__))
from test_connector_methods_torch import SGD, V, Pair, data, run  # noqa: E402,F401
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)


def t_pearson(a, b, eps=1e-8):
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def t_dist(zs, zt, beta, gamma, T):
    ps, pt = TF.softmax(zs / T, 1), TF.softmax(zt / T, 1)
    inter = 1 - t_pearson(ps, pt).mean()
    intra = 1 - t_pearson(ps.t(), pt.t()).mean()
    return T * T * (beta * inter + gamma * intra), inter, intra


def logits(rng, n, v, scale=2.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 64])
@pytest.mark.parametrize("T,beta,gamma", [(4.0, 2.0, 2.0), (1.0, 1.0, 1.0), (2.0, 0.5, 3.0)])
def test_dist_loss(n, T, beta, gamma, rng):
    zs, zt = logits(rng, n, 10), logits(rng, n, 10, 4.0)
    loss, d, (inter, intra) = F.dist_loss(zs, zt, beta=beta, gamma=gamma, T=T, return_parts=True)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    ref, ri, ra = t_dist(s, torch.tensor(zt, dtype=torch.float64), beta, gamma, T)
    ref.backward()
    check_close("loss", loss, ref.item(), rtol=1e-5)
    check_close("inter", inter, ri.item(), rtol=1e-5, atol=1e-7)
    check_close("intra", intra, ra.item(), rtol=1e-5, atol=1e-7)
    g = s.grad.numpy()
    check_close("dstudent", d, g, rtol=1e-4, atol=1e-5 * max(np.abs(g).max(), 1e-12))


@pytest.mark.parametrize("case", ["equal", "large", "near-constant", "two classes"])
def test_dist_loss_hard_cases(case, rng):
    if case == "equal":
        zs = logits(rng, 8, 10)
        zt = zs.copy()
    elif case == "large":
        zs, zt = logits(rng, 8, 10, 60.0), logits(rng, 8, 10, 60.0)
    elif case == "near-constant":
        zs = (np.ones((8, 10)) + rng.standard_normal((8, 10)) * 1e-3).astype(np.float32)
        zt = logits(rng, 8, 10)
    else:
        zs, zt = logits(rng, 8, 2), logits(rng, 8, 2)
    loss, d = F.dist_loss(zs, zt, T=4.0)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    ref = t_dist(s, torch.tensor(zt, dtype=torch.float64), 2.0, 2.0, 4.0)[0]
    ref.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    check_close("loss", loss, ref.item(), rtol=1e-4, atol=1e-6)
    g = s.grad.numpy()
    check_close("dstudent", d, g, rtol=1e-3, atol=1e-4 * max(np.abs(g).max(), 1e-9))


def test_dist_loss_arguments(rng):
    z = logits(rng, 4, 5)
    with pytest.raises(ValueError, match="T"):
        F.dist_loss(z, z, T=0.0)
    with pytest.raises(ValueError, match="gamma"):
        F.dist_loss(z, z, gamma=-1.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        F.dist_loss(z, z[:, :4])


def test_dist_step(data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, [L.CE(1.0), L.DIST(1.5, beta=2.0, gamma=3.0, T=4.0)])
    z = p.forward(X)
    zt = p.tt(torch.tensor(X, dtype=torch.float64)).detach()
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    loss_d, inter, intra = t_dist(z, zt, 2.0, 3.0, 4.0)
    (TF.cross_entropy(z, torch.tensor(y)) + 1.5 * loss_d).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("dist", h["dist"][0], loss_d.item(), rtol=1e-4)
    check_close("dist_inter", h["dist_inter"][0], inter.item(), rtol=1e-4)
    check_close("dist_intra", h["dist_intra"][0], intra.item(), rtol=1e-4)


def test_dist_method_recipe():
    terms = L.method_terms("dist")
    assert [type(t).__name__ for t in terms] == ["CE", "DIST"]
    assert (terms[1].weight, terms[1].beta, terms[1].gamma, terms[1].T) == (1.0, 2.0, 2.0, 4.0)


# ---------------------------------------------------------------------------------------
# logit standardisation (Sun et al. 2024) as a pre-processing of KD, DKD, DIST, MSE

def t_standardize(z):
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))


def t_dkd(zs, zt, y, alpha, beta, T):
    """DKD with exact masks (mdistiller's form up to its epsilon and -1000 mask)."""
    gt = TF.one_hot(y, zs.shape[1]).bool()

    def binary_logs(z):
        lp = TF.log_softmax(z / T, 1)
        return torch.cat([lp.gather(1, y[:, None]), torch.logsumexp(lp.masked_fill(gt, -np.inf), 1, keepdim=True)], 1)

    def kl(lp_t, lp_s):
        return (lp_t.exp() * (lp_t - lp_s)).masked_fill(lp_t.isinf(), 0.0).sum(1).mean()
    tckd = T * T * kl(binary_logs(zt), binary_logs(zs))
    nckd = T * T * kl(TF.log_softmax((zt / T).masked_fill(gt, -np.inf), 1), TF.log_softmax((zs / T).masked_fill(gt, -np.inf), 1))
    return alpha * tckd + beta * nckd


def t_kd(zs, zt, T):
    return T * T * TF.kl_div(TF.log_softmax(zs / T, 1), TF.softmax(zt / T, 1), reduction="batchmean")


@pytest.mark.parametrize("kind", ["kd", "dkd", "dist", "mse"])
def test_standardized_step(kind, data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    term = {"kd": L.KD(9.0, T=2.0, standardize=True), "dkd": L.DKD(1.0, T=2.0, warmup_epochs=0, standardize=True),
            "dist": L.DIST(1.0, standardize=True), "mse": L.LogitMSE(0.5, standardize=True)}[kind]
    h = run(student, teacher, ds, [L.CE(0.1), term])
    z = p.forward(X)
    zt = p.tt(torch.tensor(X, dtype=torch.float64)).detach()
    zs_, zt_ = t_standardize(z), t_standardize(zt)
    yt = torch.tensor(y)
    if kind == "kd":
        d = t_kd(zs_, zt_, 2.0)
    elif kind == "dkd":
        d = t_dkd(zs_, zt_, yt, 1.0, 8.0, 2.0)
    elif kind == "dist":
        d = t_dist(zs_, zt_, 2.0, 2.0, 4.0)[0]
    else:
        d = TF.mse_loss(zs_, zt_)
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    (0.1 * TF.cross_entropy(z, yt) + term.weight * d).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close(term.label, h[term.label][0], d.item(), rtol=1e-4)


def test_standardize_is_refused_where_undefined(data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    with pytest.raises(TypeError, match="standardize must be a bool"):
        L.KD(1.0, standardize="yes")
    terms = [dict(kind=kdcore._kdcore.TERM_KINDS["at"], a=(0, student._tap_index("5")),
                  src=[(1, teacher._tap_index("5"))], standardize=True)]
    nets = [dict(net=student.net, opt=kdcore.optim.SGD(lr=0.1).bind(student), mode=3, role="student"),
            dict(net=teacher.net, mode=0, role="teacher")]
    from test_schemes_torch import train_opts
    opts = train_opts(1)
    with pytest.raises(ValueError, match=r"term 0 \(at\): standardize is defined for KD, DKD, DIST and MSE"):
        kdcore._kdcore.step_epoch(nets, terms, ds._c, 0, opts)
    kd = dict(kind=kdcore._kdcore.TERM_KINDS["kd"], a=(0, -1), src=[(1, -1), (2, -1)], standardize=True)
    with pytest.raises(ValueError, match=r"term 0 \(kd\): standardize needs one detached source"):
        kdcore._kdcore.step_epoch(nets + [dict(net=teacher_of(6, seed=4).net, mode=0, role="teacher")], [kd], ds._c, 0,
                                  opts)


def test_kd_ls_recipe():
    terms = L.method_terms("kd+ls")
    assert [type(t).__name__ for t in terms] == ["CE", "KD"]
    assert (terms[0].weight, terms[1].weight, terms[1].T, terms[1].standardize) == (0.1, 9.0, 2.0, True)


# ---------------------------------------------------------------------------------------
# NormKD (Chi et al. 2023)

def t_normkd(zs, zt, t_norm, detach_std=False):
    """mean_i Tt_i^2 KL(softmax(t_i / Tt_i) || softmax(s_i / Ts_i)), T = t_norm * std (unbiased).
    kdcore's guard: a teacher row of equal logits contributes 0 (a safe temperature keeps its
    NaN out of the backward); a student row of equal logits takes the teacher's temperature."""
    sd_t, sd_s = zt.std(1, keepdim=True), zs.std(1, keepdim=True)
    if detach_std:
        sd_s = sd_s.detach()
    live = sd_t > 0
    Tt = torch.where(live, t_norm * sd_t, torch.ones_like(sd_t))
    Ts = torch.where(sd_s > 0, t_norm * sd_s, Tt)
    kl = TF.kl_div(TF.log_softmax(zs / Ts, 1), TF.softmax(zt / Tt, 1), reduction="none").sum(1, keepdim=True)
    return torch.where(live, kl * Tt ** 2, torch.zeros_like(kl)).mean()


def check_normkd(zs, zt, t_norm, detach_std=False, rtol=1e-5):
    loss, d = F.normkd_loss(zs, zt, t_norm=t_norm, detach_std=detach_std)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    ref = t_normkd(s, torch.tensor(zt, dtype=torch.float64), t_norm, detach_std)
    ref.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    check_close("loss", loss, ref.item(), rtol=rtol, atol=1e-7)
    g = s.grad.numpy()
    # floor 1e-9: with two classes the student's softened distribution does not depend on its
    # logits (z / std is +-sqrt(2)), so the gradient is 0 up to rounding on both sides
    check_close("dstudent", d, g, rtol=10 * rtol, atol=10 * rtol * max(np.abs(g).max(), 1e-9))
    return loss, d, g


@pytest.mark.parametrize("n", [1, 2, 64])
@pytest.mark.parametrize("t_norm,detach_std", [(2.0, False), (1.0, False), (2.0, True), (0.05, False), (30.0, False),
                                               (0.05, True)])
def test_normkd_loss(n, t_norm, detach_std, rng):
    zs, zt = logits(rng, n, 10), logits(rng, n, 10, 4.0)
    check_normkd(zs, zt, t_norm, detach_std)


def test_normkd_student_std_matters(rng):
    """The student's std is differentiated by default: the two forms' gradients differ."""
    zs, zt = logits(rng, 8, 10), logits(rng, 8, 10, 4.0)
    _, d = F.normkd_loss(zs, zt)
    _, d_det = F.normkd_loss(zs, zt, detach_std=True)
    assert np.abs(d - d_det).max() > 1e-2 * np.abs(d).max()


@pytest.mark.parametrize("case", ["student row equal", "teacher row equal", "both rows equal", "large", "huge",
                                  "tiny spread", "two classes"])
@pytest.mark.parametrize("detach_std", [False, True])
def test_normkd_loss_hard_cases(case, detach_std, rng):
    zs, zt = logits(rng, 8, 10), logits(rng, 8, 10, 4.0)
    if case == "student row equal":
        zs[3] = 2.5
    elif case == "teacher row equal":
        zt[5] = -1.0
    elif case == "both rows equal":
        zs[0], zt[0] = 7.0, 7.0
    elif case == "large":
        zs, zt = logits(rng, 8, 10, 60.0), logits(rng, 8, 10, 60.0)
    elif case == "huge":    # the temperature scales with the logits; T^2 KL with them
        zs, zt = logits(rng, 8, 10, 1e4), logits(rng, 8, 10, 3e4)
    elif case == "tiny spread":
        zs = (1.0 + rng.standard_normal((8, 10)) * 1e-5).astype(np.float32)
    else:
        zs, zt = logits(rng, 8, 2), logits(rng, 8, 2)
    loss, d, g = check_normkd(zs, zt, 2.0, detach_std, rtol=1e-4)
    if case == "teacher row equal":
        assert np.all(d[5] == 0)                  # the row's T^2 factor is 0
    if case == "student row equal":
        # softened at the teacher's temperature: KD's gradient there, Tt (p_s - p_t) / N
        Tt = 2.0 * zt[3].astype(np.float64).std(ddof=1)
        pt = np.exp(zt[3] / Tt - np.logaddexp.reduce(zt[3] / Tt))
        check_close("equal row", d[3], Tt * (0.1 - pt) / 8, rtol=1e-4, atol=1e-7)


def test_normkd_loss_arguments(rng):
    z = logits(rng, 4, 5)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="t_norm"):
            F.normkd_loss(z, z, t_norm=bad)
    with pytest.raises(TypeError, match="detach_std"):
        F.normkd_loss(z, z, detach_std="yes")
    with pytest.raises(ValueError, match="teacher_logits"):
        F.normkd_loss(z, z[:, :4])
    with pytest.raises(ValueError, match="at least 2 classes"):
        F.normkd_loss(z[:, :1], z[:, :1])
    with pytest.raises(ValueError, match="t_norm"):
        L.NormKD(t_norm=0.0)
    with pytest.raises(TypeError, match="detach_std"):
        L.NormKD(detach_std="no")


@pytest.mark.parametrize("detach_std", [False, True])
def test_normkd_step(detach_std, data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, [L.CE(0.1), L.NormKD(0.9, t_norm=1.5, detach_std=detach_std)])
    z = p.forward(X)
    zt = p.tt(torch.tensor(X, dtype=torch.float64)).detach()
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    d = t_normkd(z, zt, 1.5, detach_std)
    (0.1 * TF.cross_entropy(z, torch.tensor(y)) + 0.9 * d).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("normkd", h["normkd"][0], d.item(), rtol=1e-4)


def test_normkd_method_recipe():
    terms = L.method_terms("normkd")
    assert [type(t).__name__ for t in terms] == ["CE", "NormKD"]
    assert (terms[0].weight, terms[1].weight, terms[1].t_norm, terms[1].detach_std) == (0.1, 0.9, 2.0, False)
    assert (L.NormKD().weight, L.NormKD().t_norm) == (0.9, 2.0)


# ---------------------------------------------------------------------------------------
# WTTM (Zheng & Yang 2024)

def t_wttm(zs, zt, gamma):
    """mean_i U_i KL(p~_i || softmax(s_i)), p~ = p^gamma / U, U = sum_k p_k^gamma, p = softmax(t);
    p^gamma taken as exp(gamma log p) so that large logits do not underflow p first."""
    pg = torch.exp(gamma * TF.log_softmax(zt, 1))
    U = pg.sum(1)
    kl = TF.kl_div(TF.log_softmax(zs, 1), pg / U[:, None], reduction="none").sum(1)
    return (U * kl).mean()


def check_wttm(zs, zt, gamma, rtol=1e-5):
    loss, d = F.wttm_loss(zs, zt, gamma=gamma)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    ref = t_wttm(s, torch.tensor(zt, dtype=torch.float64), gamma)
    ref.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    check_close("loss", loss, ref.item(), rtol=rtol, atol=1e-7)
    g = s.grad.numpy()
    check_close("dstudent", d, g, rtol=10 * rtol, atol=10 * rtol * max(np.abs(g).max(), 1e-12))
    return loss, d


@pytest.mark.parametrize("n", [1, 2, 64])
@pytest.mark.parametrize("gamma", [0.2, 0.5, 1.0, 0.01, 5.0])
def test_wttm_loss(n, gamma, rng):
    zs, zt = logits(rng, n, 10), logits(rng, n, 10, 4.0)
    check_wttm(zs, zt, gamma)


def test_wttm_weight_is_the_power_sum(rng):
    """gamma = 1 is KD at T = 1 (U = 1); below 1 each sample's KL is scaled by its U."""
    zs, zt = logits(rng, 6, 10), logits(rng, 6, 10, 4.0)
    check_close("gamma 1 = KD(T=1)", F.wttm_loss(zs, zt, gamma=1.0)[0], F.kd_loss(zs, zt, T=1.0)[0], rtol=1e-6)
    for i in range(6):
        pt = np.exp(zt[i] - np.logaddexp.reduce(zt[i].astype(np.float64)))
        U = (pt ** 0.3).sum()
        kd_i = F.kd_loss(zs[i:i + 1], (0.3 * zt[i:i + 1]).astype(np.float32), T=1.0)[0]
        check_close(f"row {i}", F.wttm_loss(zs[i:i + 1], zt[i:i + 1], gamma=0.3)[0], U * kd_i, rtol=1e-5)


@pytest.mark.parametrize("case", ["student row equal", "teacher row equal", "equal", "large", "huge", "two classes"])
@pytest.mark.parametrize("gamma", [0.2, 0.01, 5.0])
def test_wttm_loss_hard_cases(case, gamma, rng):
    zs, zt = logits(rng, 8, 10), logits(rng, 8, 10, 4.0)
    if case == "student row equal":
        zs[3] = 2.5
    elif case == "teacher row equal":
        zt[5] = -1.0
    elif case == "equal":
        zt = zs.copy()
    elif case == "large":
        zs, zt = logits(rng, 8, 10, 60.0), logits(rng, 8, 10, 60.0)
    elif case == "huge":    # teacher probabilities far below double's range, their powers not
        zs, zt = logits(rng, 8, 10, 1e3), logits(rng, 8, 10, 3e3)
    else:
        zs, zt = logits(rng, 8, 2), logits(rng, 8, 2)
    loss, d = check_wttm(zs, zt, gamma, rtol=1e-4)
    if case == "teacher row equal":   # a uniform teacher: U = V^(1 - gamma), p~ uniform
        ps = np.exp(zs[5] - np.logaddexp.reduce(zs[5].astype(np.float64)))
        check_close("uniform teacher row", d[5], 10 ** (1 - gamma) * (ps - 0.1) / 8, rtol=1e-4, atol=1e-9)


def test_wttm_loss_arguments(rng):
    z = logits(rng, 4, 5)
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            F.wttm_loss(z, z, gamma=bad)
    with pytest.raises(TypeError, match="gamma"):
        F.wttm_loss(z, z, gamma="0.2")
    with pytest.raises(ValueError, match="teacher_logits"):
        F.wttm_loss(z, z[:3])
    with pytest.raises(ValueError, match="gamma"):
        L.WTTM(gamma=0.0)
    with pytest.raises(TypeError, match="standardize"):
        L.WTTM(standardize=True)


def test_wttm_step(data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, [L.CE(1.0), L.WTTM(4.0, gamma=0.3)])
    z = p.forward(X)
    zt = p.tt(torch.tensor(X, dtype=torch.float64)).detach()
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    d = t_wttm(z, zt, 0.3)
    (TF.cross_entropy(z, torch.tensor(y)) + 4.0 * d).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("wttm", h["wttm"][0], d.item(), rtol=1e-4)


def test_wttm_method_recipe():
    terms = L.method_terms("wttm")
    assert [type(t).__name__ for t in terms] == ["CE", "WTTM"]
    assert (terms[0].weight, terms[1].weight, terms[1].gamma) == (1.0, 4.0, 0.2)
    assert (L.WTTM().weight, L.WTTM().gamma) == (4.0, pytest.approx(0.2))


@pytest.mark.parametrize("kind,opts,match", [
    ("normkd", dict(t_norm=0.0), r"term 0 \(normkd\): t_norm \(0\) must be > 0"),
    ("normkd", dict(t_norm=float("inf")), r"term 0 \(normkd\): t_norm \(inf\) must be > 0"),
    ("wttm", dict(gamma=-1.0), r"term 0 \(wttm\): gamma \(-1\) must be > 0"),
    ("wttm", dict(gamma="x"), "gamma"),
    ("wttm", dict(t_norm=2.0), "t_norm"),
])
def test_engine_refuses_bad_options(kind, opts, match, data):
    """The engine's own checks (a term built without the Python classes) name the option."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    nets = [dict(net=student.net, opt=kdcore.optim.SGD(lr=0.1).bind(student), mode=3, role="student"),
            dict(net=teacher.net, mode=0, role="teacher")]
    from test_schemes_torch import train_opts
    term = dict(kind=kdcore._kdcore.TERM_KINDS[kind], a=(0, -1), src=[(1, -1)], **opts)
    with pytest.raises((ValueError, TypeError), match=match):
        kdcore._kdcore.step_epoch(nets, [term], ds._c, 0, train_opts(1))
