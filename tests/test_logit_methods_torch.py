"""Logit methods published since DKD, vs PyTorch autograd (float64) on the same logits and
weights: each loss's value and gradient (hard cases included), and one full distillation
step per method (student update, reported terms).

DIST's reference is written here from the paper's definition (Pearson correlations of the
softened distributions, per sample and per class)."""
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
