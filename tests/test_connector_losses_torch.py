"""Losses of the methods with connectors or state (kdcore.h, "Losses with connectors or
state") vs PyTorch autograd of the reference formulas, written here independently in float64
from the libraries' definitions (mdistiller OFD.py / ReviewKD.py, RepDistiller AB.py, FT.py,
VID.py, CC.py, crd/): loss values and every gradient, batch sizes 1, 2 and 64, odd spatial
sizes, different channel counts where the method allows, hard cases (zero maps, margins whose
Gaussian tail underflows, teacher values exactly at the margin, identical inputs), CRD with
the same bank contents and rows as torch, its momentum update, its sampler and in-batch mode,
and argument errors naming the argument.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore

sys.path.insert(0, os.path.dirname(__file__))
from checks import check_close_scaled as check_close  # noqa: E402
from kdcore.functional import (CRDBank, ab_loss, cc_loss, ft_loss, hcl_loss, ofd_loss, ofd_margin, vid_log_scale,
                               vid_loss)

BATCHES = [1, 2, 64]



def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


def maps(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def as4d(x):
    return x if x.ndim == 4 else x.reshape(x.shape[0], x.shape[1], 1, 1)


# ------------------------------------------------------------------------------------------
# references (float64 autograd)


def ref_margin(w, b):
    """mdistiller's init_ofd_modules margins, in float64, limits where |w| = 0."""
    out = []
    for s, m in zip(np.abs(np.asarray(w, np.float64)), np.asarray(b, np.float64)):
        if s == 0:
            out.append(m if m < 0 else 0.0)
            continue
        cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))                 # Phi(-m/s)
        out.append(m - s * math.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi) / cdf if cdf > 0.001 else -3 * s)
    return np.array(out)


def torch_ofd(s, t, margin):
    S, T = t64(as4d(s), True), t64(as4d(t))
    if T.shape[2:] != S.shape[2:]:
        T = TF.adaptive_avg_pool2d(T, S.shape[2:])
    m = t64(margin).view(1, -1, 1, 1)
    e = ((S - m) ** 2 * ((S > m) & (T <= m)) + (S - T) ** 2 * ((S > T) & (T > m) & (T <= 0))
         + (S - T) ** 2 * (T > 0))
    loss = e.abs().mean(0).sum()
    loss.backward()
    return loss.item(), S.grad.numpy().reshape(s.shape)


def torch_ab(s, t, margin):
    S, T = t64(s, True), t64(t)
    e = ((S + margin) ** 2 * ((S > -margin) & (T <= 0)) + (S - margin) ** 2 * ((S <= margin) & (T > 0)))
    loss = e.abs().sum() / s.shape[0]
    loss.backward()
    return loss.item(), S.grad.numpy()


def torch_ft(s, t, p1, p2):
    S, T = t64(s, True), t64(t, True)
    a, b = S, T
    if S.shape[2] > T.shape[2]:
        a = TF.adaptive_avg_pool2d(S, T.shape[2:])
    elif S.shape[2] < T.shape[2]:
        b = TF.adaptive_avg_pool2d(T, S.shape[2:])

    def factor(x):
        return TF.normalize(x.pow(p1).mean(1).reshape(x.shape[0], -1))

    d = factor(a) - factor(b)
    loss = d.abs().mean() if p2 == 1 else d.abs().pow(p2).mean()
    loss.backward()
    return loss.item(), S.grad.numpy(), T.grad.numpy()


def torch_vid(mu, t, log_scale, eps):
    M, T, L = t64(mu, True), t64(t), t64(log_scale, True)
    var = (torch.log(1.0 + torch.exp(L)) + eps).view(1, -1, 1, 1)
    loss = (0.5 * ((M - T) ** 2 / var + torch.log(var))).mean()
    loss.backward()
    return loss.item(), M.grad.numpy(), L.grad.numpy()


def torch_cc(es, et):
    S, T = t64(es, True), t64(et, True)
    delta = (S - T).abs()
    loss = (delta[:-1] * delta[1:]).sum(1).mean()
    loss.backward()
    return loss.item(), S.grad.numpy(), T.grad.numpy()


def torch_hcl(s, t):
    S, T = t64(as4d(s), True), t64(as4d(t))
    h = S.shape[2]
    loss = TF.mse_loss(S, T)
    cnt, tot = 1.0, 1.0
    for lv in (4, 2, 1):
        if lv >= h:
            continue
        cnt /= 2.0
        loss = loss + TF.mse_loss(TF.adaptive_avg_pool2d(S, (lv, lv)), TF.adaptive_avg_pool2d(T, (lv, lv))) * cnt
        tot += cnt
    loss = loss / tot
    loss.backward()
    return loss.item(), S.grad.numpy().reshape(s.shape)


# ------------------------------------------------------------------------------------------
# OFD


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (16, 8, 8), (5, 1, 1), (4, 3, 3)])
def test_ofd_loss_matches_torch(batch, shape, rng):
    c, h, w = shape
    s = maps(rng, batch, c, h, w)
    t = maps(rng, batch, c, h, w)
    margin = ofd_margin(rng.uniform(0.2, 2, c).astype(np.float32), rng.uniform(-1, 1, c).astype(np.float32))
    loss, ds = ofd_loss(s, t, margin)
    want, want_ds = torch_ofd(s, t, margin)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds)


@pytest.mark.parametrize("batch", [1, 2, 64])
def test_ofd_loss_pools_a_larger_teacher(batch, rng):
    """mdistiller pools the teacher to the student's size (adaptive average, odd ratios too)."""
    for (h, w), (H, W) in [((4, 4), (8, 8)), ((3, 5), (7, 11)), ((5, 5), (5, 9))]:
        s = maps(rng, batch, 6, h, w)
        t = maps(rng, batch, 6, H, W)
        margin = ofd_margin(np.ones(6, np.float32), rng.uniform(-1, 0.5, 6).astype(np.float32))
        loss, ds = ofd_loss(s, t, margin)
        want, want_ds = torch_ofd(s, t, margin)
        check_close("loss", loss, want)
        check_close("dstudent", ds, want_ds)


def test_ofd_loss_flat_features(rng):
    s, t = maps(rng, 7, 10), maps(rng, 7, 10)
    margin = np.full(10, -0.5, np.float32)
    loss, ds = ofd_loss(s, t, margin)
    assert ds.shape == s.shape
    want, want_ds = torch_ofd(s, t, margin)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds)


def test_ofd_hard_cases(rng):
    c = 5
    margin = ofd_margin(np.full(c, 0.7, np.float32), np.linspace(-1, 1, c).astype(np.float32))
    s = maps(rng, 3, c, 4, 4)
    # teacher exactly at the margin, exactly 0, and student exactly at the teacher's value
    t = np.broadcast_to(margin.reshape(1, c, 1, 1), s.shape).copy()
    t[:, :, 0, :] = 0.0
    s[:, :, 1, :] = t[:, :, 1, :]
    loss, ds = ofd_loss(s, t, margin)
    want, want_ds = torch_ofd(s, t, margin)
    check_close("loss at the margin", loss, want)
    check_close("dstudent at the margin", ds, want_ds)
    # zero maps: every term is zero (s <= t' <= 0)
    z = np.zeros((2, c, 3, 3), np.float32)
    loss, ds = ofd_loss(z, z, margin)
    assert loss == 0 and not ds.any()
    # identical inputs: zero where t > m; (s - m)^2 where t <= m < s is impossible with s = t
    loss, ds = ofd_loss(s, s.copy(), margin)
    want, want_ds = torch_ofd(s, s, margin)
    assert abs(loss) < 1e-6 and abs(want) < 1e-12
    check_close("dstudent identical", ds, want_ds, atol=1e-7)


def test_ofd_margin_matches_reference():
    w = np.array([1.0, 0.5, 2.0, -1.5, 1.0, 1.0, 0.3, 1.0, 1.0], np.float32)
    b = np.array([0.0, 1.0, -3.0, 0.4, 3.0, 3.2, 12.0, 40.0, -40.0], np.float32)
    m = ofd_margin(w, b)
    assert m.dtype == np.float32 and m.shape == w.shape
    check_close("margin", m, ref_margin(w, b), rtol=1e-6)
    # b/|w| = 3.2, 12, 40: Phi(-b/|w|) <= 0.001 (underflowing at 40) -> -3|w|
    assert m[5] == np.float32(-3.0) and m[6] == np.float32(-3 * np.float64(w[6])) and m[7] == np.float32(-3.0)
    # b/|w| = -40: the tail is the whole mass, E[x | x < 0] = b
    assert m[8] == np.float32(-40.0)
    # the margin is E[x | x < 0] of N(b, w^2): numeric integration where the tail is not tiny
    for wi, bi, mi in zip(w[:5], b[:5], m[:5]):
        sd = abs(float(wi))
        x = np.linspace(float(bi) - 12 * sd, 0.0, 200001)
        pdf = np.exp(-0.5 * ((x - float(bi)) / sd) ** 2)
        assert abs(np.trapezoid(x * pdf, x) / np.trapezoid(pdf, x) - mi) < 1e-5
    # |w| = 0: the limits (mdistiller divides by zero)
    m0 = ofd_margin(np.zeros(3, np.float32), np.array([-2.0, 0.0, 3.0], np.float32))
    assert list(m0) == [-2.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------
# AB


@pytest.mark.parametrize("margin", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (16, 8, 8), (1, 1, 1)])
def test_ab_loss_matches_torch(batch, shape, margin, rng):
    s = maps(rng, batch, *shape, scale=1.5)
    t = maps(rng, batch, *shape)
    loss, ds = ab_loss(s, t, margin=margin)
    want, want_ds = torch_ab(s, t, margin)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds)


def test_ab_hard_cases(rng):
    s = maps(rng, 4, 3, 5, 5)
    t = maps(rng, 4, 3, 5, 5)
    s[:, 0] = 1.0      # s exactly at +margin
    s[:, 1] = -1.0     # s exactly at -margin
    t[:, :, 0] = 0.0   # teacher exactly 0 (counts as "off")
    loss, ds = ab_loss(s, t, 1.0)
    want, want_ds = torch_ab(s, t, 1.0)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds)
    # zero maps: every student value sits inside the margin of an "off" teacher: (0 + 1)^2
    z = np.zeros((2, 3, 4, 4), np.float32)
    loss, ds = ab_loss(z, z, 1.0)
    assert loss == pytest.approx(3 * 4 * 4) and np.all(ds == 1.0)
    # identical inputs are not a zero of AB (it pushes beyond the margin)
    loss, ds = ab_loss(s, s.copy(), 1.0)
    want, want_ds = torch_ab(s, s, 1.0)
    check_close("loss identical", loss, want)
    check_close("dstudent identical", ds, want_ds)


# ------------------------------------------------------------------------------------------
# FT


@pytest.mark.parametrize("p1,p2", [(2, 1.0), (1, 1.0), (2, 2.0), (3, 1.5)])
@pytest.mark.parametrize("batch", BATCHES)
def test_ft_loss_matches_torch(batch, p1, p2, rng):
    s = maps(rng, batch, 4, 5, 7)
    t = maps(rng, batch, 6, 5, 7)          # different channel counts: the channel mean removes them
    loss, ds, dt = ft_loss(s, t, p1=p1, p2=p2)
    want, want_ds, want_dt = torch_ft(s, t, p1, p2)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds, rtol=1e-4)
    check_close("dteacher", dt, want_dt, rtol=1e-4)


@pytest.mark.parametrize("ss,ts", [((8, 8), (4, 4)), ((3, 3), (7, 7)), ((9, 9), (4, 4)), ((6, 10), (3, 5))])
def test_ft_loss_pools_the_larger_map(ss, ts, rng):
    s = maps(rng, 3, 5, *ss)
    t = maps(rng, 3, 2, *ts)
    loss, ds, dt = ft_loss(s, t)
    want, want_ds, want_dt = torch_ft(s, t, 2, 1)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds, rtol=1e-4)
    check_close("dteacher", dt, want_dt, rtol=1e-4)


def test_ft_hard_cases(rng):
    s = maps(rng, 3, 4, 5, 5)
    # identical inputs: loss 0, gradients 0 (|d| has gradient 0 at 0, as torch's abs)
    loss, ds, dt = ft_loss(s, s.copy())
    want, want_ds, want_dt = torch_ft(s, s, 2, 1)
    assert loss == 0 and want == 0
    check_close("dstudent identical", ds, want_ds, atol=1e-7)
    # zero maps: factors 0 (norm below F.normalize's eps), gradient 0 through x^2
    z = np.zeros((2, 3, 4, 4), np.float32)
    t = maps(rng, 2, 3, 4, 4)
    loss, ds, dt = ft_loss(z, t)
    want, want_ds, want_dt = torch_ft(z, t, 2, 1)
    check_close("loss zero student", loss, want)
    check_close("dstudent zero", ds, want_ds, atol=1e-7)
    check_close("dteacher vs zero student", dt, want_dt, rtol=1e-4)
    # scale invariance of the normalised factor
    loss2, _, _ = ft_loss(s * 3, maps(rng, 3, 4, 5, 5))
    assert np.isfinite(loss2)


# ------------------------------------------------------------------------------------------
# VID


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (16, 8, 8), (10, 1, 1)])
def test_vid_loss_matches_torch(batch, shape, rng):
    c = shape[0]
    mu = maps(rng, batch, *shape)
    t = maps(rng, batch, *shape)
    log_scale = rng.uniform(-3, 6, c).astype(np.float32)
    loss, dmu, dls = vid_loss(mu, t, log_scale)
    want, want_dmu, want_dls = torch_vid(mu, t, log_scale, 1e-5)
    check_close("loss", loss, want)
    check_close("dmu", dmu, want_dmu)
    check_close("dlog_scale", dls, want_dls, rtol=1e-4)


def test_vid_initial_log_scale_and_extremes(rng):
    ls = vid_log_scale(4)
    assert ls.dtype == np.float32 and ls.shape == (4,)
    assert np.all(ls == np.float32(np.log(np.exp(5.0 - 1e-5) - 1.0)))    # RepDistiller's value in float32
    check_close("softplus(init) + eps", np.log1p(np.exp(ls.astype(np.float64))) + 1e-5, np.full(4, 5.0), rtol=1e-6)
    # very negative (variance -> eps) and large log_scale; identical and zero maps
    mu = maps(rng, 2, 4, 3, 3)
    log_scale = np.array([-30.0, -8.0, 40.0, 0.0], np.float32)
    for t in (maps(rng, 2, 4, 3, 3), mu.copy(), np.zeros_like(mu)):
        loss, dmu, dls = vid_loss(mu, t, log_scale, eps=1e-5)
        want, want_dmu, want_dls = torch_vid(mu, t, log_scale, 1e-5)
        check_close("loss", loss, want)
        check_close("dmu", dmu, want_dmu)
        check_close("dlog_scale", dls, want_dls, rtol=1e-4, atol=1e-12)
    z = np.zeros((2, 3, 2, 2), np.float32)
    loss, dmu, dls = vid_loss(z, z, np.zeros(3, np.float32), eps=1e-5)
    assert loss == pytest.approx(0.5 * math.log(math.log(2) + 1e-5), rel=1e-6) and not dmu.any()


# ------------------------------------------------------------------------------------------
# CC


@pytest.mark.parametrize("batch", [2, 3, 64])
@pytest.mark.parametrize("dim", [1, 7, 128])
def test_cc_loss_matches_torch(batch, dim, rng):
    es, et = maps(rng, batch, dim), maps(rng, batch, dim)
    loss, ds, dt = cc_loss(es, et)
    want, want_ds, want_dt = torch_cc(es, et)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds)
    check_close("dteacher", dt, want_dt)


def test_cc_hard_cases(rng):
    es = maps(rng, 5, 6)
    loss, ds, dt = cc_loss(es, es.copy())
    assert loss == 0 and not ds.any() and not dt.any()
    et = es.copy()
    et[2] += 1.0     # one row differs: its neighbours' deltas are 0
    loss, ds, dt = cc_loss(es, et)
    want, want_ds, want_dt = torch_cc(es, et)
    check_close("loss", loss, want, atol=1e-7)
    check_close("dstudent", ds, want_ds, atol=1e-7)
    with pytest.raises(ValueError, match="student_embed"):
        cc_loss(es[:1].copy(), et[:1].copy())


# ------------------------------------------------------------------------------------------
# ReviewKD HCL


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 7, 7), (4, 5, 3), (3, 3, 3), (2, 2, 2), (5, 1, 1), (2, 16, 16),
                                   (2, 4, 4)])
def test_hcl_loss_matches_torch(batch, shape, rng):
    s = maps(rng, batch, *shape)
    t = maps(rng, batch, *shape)
    loss, ds = hcl_loss(s, t)
    want, want_ds = torch_hcl(s, t)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds)


def test_hcl_hard_cases(rng):
    s = maps(rng, 2, 3, 6, 6)
    loss, ds = hcl_loss(s, s.copy())
    assert loss == 0 and not ds.any()
    z = np.zeros((2, 3, 6, 6), np.float32)
    loss, ds = hcl_loss(z, z)
    assert loss == 0 and not ds.any()
    loss, ds = hcl_loss(s.reshape(2, -1).copy(), z.reshape(2, -1))     # flat: mse only
    check_close("flat", loss, np.mean(s.astype(np.float64) ** 2))


# ------------------------------------------------------------------------------------------
# CRD


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def torch_crd(es, et, bank_s, bank_t, rows, n_data, T, z=None):
    """RepDistiller's ContrastMemory scores + two ContrastLoss terms, float64. rows (n, K+1)
    index both banks, column 0 positive. z = (Z_v1, Z_v2) or None (set from this batch).
    Returns loss, des, det, (Z_v1, Z_v2)."""
    S, Tt = t64(es, True), t64(et, True)
    R = torch.tensor(rows)
    w_s, w_t = t64(bank_s)[R], t64(bank_t)[R]                       # (n, K+1, dim)
    out_v2 = torch.exp(torch.bmm(w_s, Tt.unsqueeze(2)).squeeze(2) / T)   # teacher anchor, student bank
    out_v1 = torch.exp(torch.bmm(w_t, S.unsqueeze(2)).squeeze(2) / T)    # student anchor, teacher bank
    if z is None:
        z = (out_v1.mean().item() * n_data, out_v2.mean().item() * n_data)
    K = rows.shape[1] - 1

    def nce(x):
        pn = 1.0 / n_data
        p_pos, p_neg = x[:, 0], x[:, 1:]
        log_d1 = torch.log(p_pos / (p_pos + K * pn + 1e-7))
        log_d0 = torch.log((K * pn) / (p_neg + K * pn + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

    loss = nce(out_v1 / z[0]) + nce(out_v2 / z[1])
    loss.backward()
    return loss.item(), S.grad.numpy(), Tt.grad.numpy(), z


def torch_crd_in_batch(es, et, n_data, T, labels=None, z=None):
    """In-batch negatives: the other side's embeddings of the batch as the bank (gradients
    through both, the embeddings being inputs); anchor i's rows are i (positive) and every
    j != i (of another class when labels are given)."""
    S, Tt = t64(es, True), t64(et, True)
    n = es.shape[0]
    sc_s = torch.exp(S @ Tt.T / T)        # student anchor i vs teacher embeddings j
    sc_t = torch.exp(Tt @ S.T / T)
    keep = [[j for j in range(n) if j != i and (labels is None or labels[j] != labels[i])] for i in range(n)]
    if z is None:
        tot = sum(1 + len(k) for k in keep)   # Z is a constant (a Python float), as RepDistiller's
        z = tuple(float(sum(sc[i, [i] + keep[i]].sum().item() for i in range(n))) / tot * n_data for sc in (sc_s, sc_t))
    pn = 1.0 / n_data
    loss = 0
    for sc, zz in ((sc_s, z[0]), (sc_t, z[1])):
        for i in range(n):
            K = len(keep[i])
            p_pos = sc[i, i] / zz
            loss = loss - torch.log(p_pos / (p_pos + K * pn + 1e-7))
            if K:
                p_neg = sc[i, keep[i]] / zz
                loss = loss - torch.log((K * pn) / (p_neg + K * pn + 1e-7)).sum()
    loss = loss / n
    loss.backward()
    return loss.item(), S.grad.numpy(), Tt.grad.numpy(), z


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dim,n_neg,n_data", [(8, 16, 200), (128, 100, 1000), (5, 3, 4)])
def test_crd_loss_matches_torch(batch, dim, n_neg, n_data, rng):
    bank = CRDBank(n_data, dim=dim, n_neg=n_neg, T=0.07, momentum=0.5, seed=7)
    assert bank.student_bank.shape == (n_data, dim) and bank.teacher_bank.shape == (n_data, dim)
    es, et = unit(rng, batch, dim), unit(rng, batch, dim)
    idx = rng.integers(0, n_data, batch)
    for step in range(3):
        rows = bank.sample(idx)
        assert rows.shape == (batch, n_neg + 1) and np.array_equal(rows[:, 0], idx)
        z_before = bank.z
        bs, bt = bank.student_bank.copy(), bank.teacher_bank.copy()
        loss, des, det = bank.loss(es, et, idx)
        assert bank.steps == step + 1
        if step == 0:
            # Z set from this first batch (float32-rounded, as RepDistiller's params buffer)
            _, _, _, z_ref = torch_crd(es, et, bs, bt, rows, n_data, 0.07)
            check_close("Z", bank.z, z_ref, rtol=1e-6)
        else:
            assert bank.z == z_before
        want, want_des, want_det, _ = torch_crd(es, et, bs, bt, rows, n_data, 0.07, z=bank.z)
        check_close("loss", loss, want, rtol=1e-5)
        check_close("dstudent", des, want_des, rtol=1e-4)
        check_close("dteacher", det, want_det, rtol=1e-4)
        # the explicit-rows form gives the same bits
        l2, d2s, d2t = bank.loss_idx(es, et, rows)
        assert l2 == loss and np.array_equal(d2s, des) and np.array_equal(d2t, det)
        bank.update(es, et, idx)
        es, et = unit(rng, batch, dim), unit(rng, batch, dim)


def test_crd_momentum_update_matches_torch(rng):
    n_data, dim, m = 50, 16, 0.5
    bank = CRDBank(n_data, dim=dim, n_neg=4, momentum=m, seed=3)
    es, et = unit(rng, 6, dim), unit(rng, 6, dim)
    idx = np.array([3, 7, 49, 0, 7, 12])          # 7 twice: the later sample's row wins
    before = (bank.student_bank.copy(), bank.teacher_bank.copy())
    bank.update(es, et, idx)
    for b0, v, got in ((before[0], es, bank.student_bank), (before[1], et, bank.teacher_bank)):
        want = torch.tensor(b0, dtype=torch.float64)
        rows = want[torch.tensor(idx)] * m + torch.tensor(v, dtype=torch.float64) * (1 - m)
        rows = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
        for i, r in enumerate(idx):                  # index_copy_ in order: last write wins
            want[r] = rows[i]
        check_close("bank", got, want.numpy(), rtol=1e-6, atol=1e-7)
        untouched = np.setdiff1d(np.arange(n_data), idx)
        assert np.array_equal(got[untouched], b0[untouched])


def test_crd_banks_initialisation_and_memory():
    n_data, dim = 3000, 24
    a = CRDBank(n_data, dim=dim, n_neg=8, seed=1)
    b = CRDBank(n_data, dim=dim, n_neg=8, seed=1)
    c = CRDBank(n_data, dim=dim, n_neg=8, seed=2)
    stdv = 1 / math.sqrt(dim / 3)
    for bk in (a.student_bank, a.teacher_bank):
        assert bk.dtype == np.float32 and bk.shape == (n_data, dim) and bk.flags.c_contiguous
        assert bk.min() >= -stdv and bk.max() < stdv
        assert abs(bk.mean()) < 0.01 and abs(bk.std() - stdv / math.sqrt(3)) < 0.01
    assert not np.array_equal(a.student_bank, a.teacher_bank)
    assert np.array_equal(a.student_bank, b.student_bank) and not np.array_equal(a.student_bank, c.student_bank)
    # one block of exactly 2 * n_data * dim floats: the teacher bank follows the student bank
    s_ptr = a.student_bank.__array_interface__["data"][0]
    t_ptr = a.teacher_bank.__array_interface__["data"][0]
    assert t_ptr - s_ptr == n_data * dim * 4
    assert a.z == (-1.0, -1.0) and a.steps == 0
    ib = CRDBank(n_data, dim=dim, in_batch=True)
    assert ib.student_bank is None and ib.teacher_bank is None


def test_crd_sampler(rng):
    n_data = 40
    bank = CRDBank(n_data, dim=4, n_neg=12, seed=5)
    idx = np.array([0, 5, 39, 5])
    rows = bank.sample(idx)
    for i, r in enumerate(rows):
        neg = r[1:]
        assert np.all(neg != idx[i]) and np.all((neg >= 0) & (neg < n_data))
        assert len(set(neg.tolist())) == len(neg)           # without replacement (K <= pool)
    assert np.array_equal(rows[1], rows[3])                 # keyed by the data-set index
    # independent of the batch order; changes with the draw counter and the seed
    perm = np.array([2, 0, 3, 1])
    assert np.array_equal(bank.sample(idx[perm]), rows[perm])
    bank.steps = 1
    assert not np.array_equal(bank.sample(idx), rows)
    bank.steps = 0
    assert np.array_equal(bank.sample(idx), rows)
    assert not np.array_equal(CRDBank(n_data, dim=4, n_neg=12, seed=6).sample(idx), rows)
    # K larger than the pool: with replacement, still never the sample itself
    small = CRDBank(5, dim=4, n_neg=9, seed=1)
    r = small.sample(np.array([2]))
    assert np.all(r[0, 1:] != 2) and r.shape == (1, 10)
    # uniform over the other samples: every index of a 10-sample set shows up about equally
    u = CRDBank(10, dim=2, n_neg=3, seed=11)
    counts = np.zeros(10)
    for step in range(3000):
        u.steps = step
        counts += np.bincount(u.sample(np.array([4]))[0, 1:], minlength=10)
    assert counts[4] == 0
    others = np.delete(counts, 4)
    assert np.all(np.abs(others / others.mean() - 1) < 0.1), counts


def test_crd_negatives_from_other_classes(rng):
    n_data = 60
    labels = rng.integers(0, 4, n_data)
    bank = CRDBank(n_data, dim=8, n_neg=10, seed=9)
    with pytest.raises(RuntimeError, match="kd_crd_set_labels"):
        bank.loss(unit(rng, 2, 8), unit(rng, 2, 8), np.array([0, 1]), labels[[0, 1]])
    bank.set_labels(labels)
    idx = rng.integers(0, n_data, 16)
    rows = bank.sample(idx, labels[idx])
    for i, r in enumerate(rows):
        assert np.all(labels[r[1:]] != labels[idx[i]])
        assert len(set(r[1:].tolist())) == len(r) - 1
    # loss with labels = loss_idx on those rows = torch
    es, et = unit(rng, 16, 8), unit(rng, 16, 8)
    bs, bt = bank.student_bank.copy(), bank.teacher_bank.copy()
    loss, des, det = bank.loss(es, et, idx, labels[idx])
    want, want_des, want_det, _ = torch_crd(es, et, bs, bt, rows, n_data, 0.07, z=bank.z)
    check_close("loss", loss, want)
    check_close("dstudent", des, want_des, rtol=1e-4)
    check_close("dteacher", det, want_det, rtol=1e-4)
    # batch labels must agree with the data set's
    bad = labels[idx].copy()
    bad[3] = (bad[3] + 1) % 4
    with pytest.raises(ValueError, match="labels"):
        bank.loss(es, et, idx, bad)


@pytest.mark.parametrize("batch", [2, 3, 64])
@pytest.mark.parametrize("with_labels", [False, True])
def test_crd_in_batch_matches_torch(batch, with_labels, rng):
    dim, n_data = 16, 5000
    bank = CRDBank(n_data, dim=dim, T=0.07, in_batch=True)
    labels = rng.integers(0, 3, batch) if with_labels else None
    es, et = unit(rng, batch, dim), unit(rng, batch, dim)
    loss, des, det = bank.loss(es, et, labels=labels)
    want, want_des, want_det, z = torch_crd_in_batch(es, et, n_data, 0.07, labels)
    check_close("Z", bank.z, z, rtol=1e-6)
    want, want_des, want_det, _ = torch_crd_in_batch(es, et, n_data, 0.07, labels, z=bank.z)
    check_close("loss", loss, want)
    check_close("dstudent", des, want_des, rtol=1e-4)
    check_close("dteacher", det, want_det, rtol=1e-4)
    # a second batch uses the fixed Z
    es2, et2 = unit(rng, batch, dim), unit(rng, batch, dim)
    loss2, des2, det2 = bank.loss(es2, et2, labels=labels)
    want2, want_des2, _, _ = torch_crd_in_batch(es2, et2, n_data, 0.07, labels, z=bank.z)
    check_close("loss 2", loss2, want2)
    check_close("dstudent 2", des2, want_des2, rtol=1e-4)
    assert bank.update(es, et, np.arange(batch)) is None     # nothing to update


def test_crd_thread_count_independent(rng):
    dim, n = 32, 64
    es, et = unit(rng, n, dim), unit(rng, n, dim)
    idx = rng.integers(0, 2000, n)
    out = []
    old = kdcore.get_num_threads() if hasattr(kdcore, "get_num_threads") else None
    for threads in (1, 2):
        kdcore.set_num_threads(threads)
        bank = CRDBank(2000, dim=dim, n_neg=300, seed=4)
        out.append(bank.loss(es, et, idx) + (bank.student_bank.copy(),))
        s = maps(np.random.default_rng(1), 64, 16, 9, 9)
        t = maps(np.random.default_rng(2), 64, 16, 9, 9)
        out[-1] += (hcl_loss(s, t), vid_loss(s, t, np.zeros(16, np.float32)), ft_loss(s, t),
                    ofd_loss(s, t, np.full(16, -0.3, np.float32)))
    if old is not None:
        kdcore.set_num_threads(old)
    a, b = out
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    for x, y in zip(a[4:], b[4:]):
        assert x[0] == y[0] and all(np.array_equal(p, q) for p, q in zip(x[1:], y[1:]))


def test_crd_state_dict_round_trip(rng):
    a = CRDBank(100, dim=8, n_neg=5, seed=1)
    es, et = unit(rng, 4, 8), unit(rng, 4, 8)
    idx = np.array([1, 2, 3, 4])
    a.loss(es, et, idx)
    a.update(es, et, idx)
    st = a.state_dict()
    assert set(st) == {"student_bank", "teacher_bank", "z", "steps"}
    b = CRDBank(100, dim=8, n_neg=5, seed=1)
    b.load_state_dict(st)
    assert b.z == a.z and b.steps == a.steps and np.array_equal(b.student_bank, a.student_bank)
    es2, et2 = unit(rng, 4, 8), unit(rng, 4, 8)
    la, lb = a.loss(es2, et2, idx), b.loss(es2, et2, idx)
    assert la[0] == lb[0] and np.array_equal(la[1], lb[1])
    with pytest.raises(ValueError, match="student_bank"):
        b.load_state_dict(dict(st, student_bank=st["student_bank"][:5]))
    with pytest.raises(KeyError):
        b.load_state_dict({"z": st["z"]})


# ------------------------------------------------------------------------------------------
# argument errors


def test_feature_loss_argument_errors(rng):
    s, t = maps(rng, 2, 3, 4, 4), maps(rng, 2, 3, 4, 4)
    m = np.full(3, -0.5, np.float32)
    with pytest.raises(TypeError, match="student"):
        ofd_loss(s.astype(np.float64), t, m)
    with pytest.raises(TypeError, match="teacher"):
        ofd_loss(s, t.tolist(), m)
    with pytest.raises(ValueError, match="teacher"):
        ofd_loss(s, t[:, :2].copy(), m)
    with pytest.raises(ValueError, match="margin"):
        ofd_loss(s, t, m[:2].copy())
    with pytest.raises(ValueError, match="student"):
        ofd_loss(s[0].copy(), t, m)                          # 3-D
    nan = s.copy()
    nan[0, 1, 2, 3] = np.nan
    for call in (lambda: ofd_loss(nan, t, m), lambda: ab_loss(nan, t), lambda: hcl_loss(nan, t)):
        with pytest.raises(ValueError, match="student"):
            call()
    with pytest.raises(ValueError, match="margin"):
        ofd_loss(s, t, np.array([0, np.inf, 0], np.float32))
    with pytest.raises(ValueError, match="bn_bias"):
        ofd_margin(np.ones(3, np.float32), np.ones(2, np.float32))
    with pytest.raises(TypeError, match="bn_weight"):
        ofd_margin(np.ones(3), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="teacher"):
        ab_loss(s, t[:, :, :3].copy())
    with pytest.raises(ValueError, match="margin"):
        ab_loss(s, t, margin=-1.0)
    with pytest.raises(ValueError, match="teacher"):
        hcl_loss(s, t[:1].copy())
    with pytest.raises(ValueError, match="student"):
        hcl_loss(np.zeros((0, 3, 4, 4), np.float32), np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="teacher_factor"):
        ft_loss(s, t[:1].copy())
    with pytest.raises(ValueError, match="spatial"):
        ft_loss(s, maps(rng, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="p1"):
        ft_loss(s, t, p1=0)
    with pytest.raises(TypeError, match="p1"):
        ft_loss(s, t, p1=1.5)
    with pytest.raises(ValueError, match="p2"):
        ft_loss(s, t, p2=0.5)
    with pytest.raises(ValueError, match="teacher"):
        vid_loss(s, t[:, :, :, :3].copy(), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="log_scale"):
        vid_loss(s, t, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="log_scale"):
        vid_loss(s, t, np.array([0, np.nan, 0], np.float32))
    with pytest.raises(ValueError, match="eps"):
        vid_loss(s, t, np.zeros(3, np.float32), eps=-1.0)
    with pytest.raises(TypeError, match="mu"):
        vid_loss(s.astype(np.float16), t, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="teacher_embed"):
        cc_loss(s.reshape(2, -1), t.reshape(2, -1)[:, :5].copy())
    with pytest.raises(TypeError, match="student_embed"):
        cc_loss(s.reshape(2, -1).astype(np.float64), t.reshape(2, -1))


def test_crd_argument_errors(rng):
    with pytest.raises(ValueError, match="n_data"):
        CRDBank(1, dim=4)
    with pytest.raises(ValueError, match="dim"):
        CRDBank(10, dim=0)
    with pytest.raises(ValueError, match="n_neg"):
        CRDBank(10, dim=4, n_neg=0)
    with pytest.raises(ValueError, match="momentum"):
        CRDBank(10, dim=4, momentum=1.0)
    with pytest.raises(ValueError, match="T"):
        CRDBank(10, dim=4, T=0.0)
    with pytest.raises(TypeError, match="seed"):
        CRDBank(10, dim=4, seed=1.5)
    bank = CRDBank(10, dim=4, n_neg=3)
    es, et = unit(rng, 3, 4), unit(rng, 3, 4)
    idx = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="idx"):
        bank.loss(es, et, np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="idx"):
        bank.loss(es, et, np.array([0, 1]))
    with pytest.raises(TypeError, match="idx"):
        bank.loss(es, et)
    with pytest.raises(ValueError, match="teacher_embed"):
        bank.loss(es, unit(rng, 3, 5), idx)
    with pytest.raises(ValueError, match="student_embed"):
        bank.loss(unit(rng, 3, 5), unit(rng, 3, 5), idx)
    with pytest.raises(TypeError, match="student_embed"):
        bank.loss(es.astype(np.float64), et, idx)
    bad = es.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="student_embed"):
        bank.loss(bad, et, idx)
    with pytest.raises(ValueError, match="sample_idx"):
        bank.loss_idx(es, et, np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="sample_idx"):
        bank.loss_idx(es, et, np.full((3, 4), 10, np.int64))
    with pytest.raises(ValueError, match="labels"):
        bank.set_labels(np.zeros(9, np.int64))
    with pytest.raises(ValueError, match="labels"):
        bank.set_labels(np.full(10, -1, np.int64))
    with pytest.raises(ValueError, match="idx"):
        bank.update(es, et, np.array([0, 1, -1]))
    assert bank.steps == 0 and bank.z == (-1.0, -1.0)    # failed calls change nothing
    ib = CRDBank(10, dim=4, in_batch=True)
    with pytest.raises(ValueError, match="2 rows"):
        ib.loss(es[:1].copy(), et[:1].copy())
    with pytest.raises(RuntimeError, match="banks"):
        ib.sample(idx)
    with pytest.raises(RuntimeError, match="banks"):
        ib.loss_idx(es, et, np.zeros((3, 1), np.int64))


def test_refcounts_unchanged_over_many_calls_success_and_error_paths(rng):
    """The new entry points hold no references to their inputs or outputs after 500 calls, on
    the success and on the error path."""
    import gc
    import sys
    K = kdcore._kdcore
    s, t = maps(rng, 2, 3, 4, 4), maps(rng, 2, 3, 4, 4)
    m = np.full(3, -0.5, np.float32)
    es, et = unit(rng, 4, 8), unit(rng, 4, 8)
    idx = np.array([0, 1, 2, 3], np.int64)
    bad = s.astype(np.float64)
    crd = K.CRD(10, 8, 3, 0.07, 0.5, 0, False)
    rows = crd.sample(idx)
    objs = dict(s=s, t=t, m=m, es=es, et=et, idx=idx, bad=bad, crd=crd, rows=rows)

    def expect_error(fn, *a):
        try:
            fn(*a)
        except (TypeError, ValueError):
            return
        raise AssertionError(f"{fn} did not raise")

    def round_():
        outs = [K.ofd_loss(s, t, m), K.ab_loss(s, t, 1.0), K.ft_loss(s, t, 2, 1.0), K.vid_loss(s, t, m, 1e-5),
                K.cc_loss(es, et), K.hcl_loss(s, t), K.ofd_margin(m, m), crd.loss(es, et, idx), crd.loss_idx(es, et, rows),
                crd.sample(idx), crd.bank(0)]
        crd.update(es, et, idx)
        for fn, a in ((K.ofd_loss, (bad, t, m)), (K.ab_loss, (s, bad, 1.0)), (K.ft_loss, (bad, t, 2, 1.0)),
                      (K.vid_loss, (s, t, bad, 1e-5)), (K.cc_loss, (es, bad)), (K.hcl_loss, (s, bad)),
                      (crd.loss, (es, et, idx[:2])), (crd.update, (es, bad, idx)), (crd.loss_idx, (es, et, idx))):
            expect_error(fn, *a)
        return outs

    for _ in range(10):
        outs = round_()
    gc.collect()
    before = {k: sys.getrefcount(v) for k, v in objs.items()}
    for _ in range(500):
        outs = round_()
    gc.collect()
    after = {k: sys.getrefcount(v) for k, v in objs.items()}
    assert after == before
    counts = [sys.getrefcount(outs[i]) for i in range(len(outs))]
    assert counts == [2] * len(counts)
