"""kdcore.functional feature and relation losses (AT, SP, NST, RKD, PKT, FSP) vs PyTorch
autograd of the same formulas, written here independently in float64 from the reference
definitions (RepDistiller / mdistiller distiller_zoo, torchdistill's ATLoss "paper" mode):
value, gradient w.r.t. the student map and w.r.t. the teacher map (grad_teacher=True).

Cases: batch 1, 2 and 64; odd and unequal spatial sizes (pooling), different channel counts,
flat (n, d) inputs, both AT forms and p != 2, all-zero maps, identical student and teacher,
large values; argument errors naming the argument; the scratch memory at realistic sizes.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from kdcore import _kdcore

sys.path.insert(0, os.path.dirname(__file__))
from checks import check_close_scaled  # noqa: E402
from kdcore.functional import at_loss, fsp_loss, nst_loss, pkt_loss, rkd_loss, sp_loss

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# helpers


def check_close(name, got, want, rtol=1e-5, atol=None):
    """check_close_scaled with an absolute floor of 1e-12 (quantities that are 0 up to rounding)."""
    return check_close_scaled(name, got, want, rtol=rtol, atol=atol, atol_floor=1e-12)



def t64(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def run_torch(fn, *arrays):
    """fn on float64 copies of the arrays; returns (loss, [grad of each array])."""
    ts = [t64(a) for a in arrays]
    loss = fn(*ts)
    loss.backward()
    return loss.item(), [x.grad.numpy() for x in ts]


def maps(rng, shape, kind="normal"):
    x = rng.standard_normal(shape)
    if kind == "relu":
        x = np.maximum(x, 0)
    elif kind == "pos":
        x = np.abs(x) + 0.1
    return x.astype(np.float32)


def pool_to(f, H, W):
    """The common-size rule: adaptive average pooling to (H, W) if the map is larger."""
    return f if tuple(f.shape[2:]) == (H, W) else TF.adaptive_avg_pool2d(f, (H, W))


def pool_common(a, b):
    if a.dim() == 2:
        return a, b
    H, W = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    return pool_to(a, H, W), pool_to(b, H, W)


def as4d(f):
    return f if f.dim() == 4 else f[:, :, None, None]


# ------------------------------------------------------------------------------------------
# reference formulas (float64 torch)


def ref_at(S, T, p=2, form="code", signed_pow=False):
    """RepDistiller/mdistiller `at_loss` (code) and torchdistill ATLoss mode 'paper';
    signed_pow: the references' f.pow(p) instead of |f|^p (same on non-negative maps)."""
    S, T = pool_common(as4d(S), as4d(T))

    def power(f):
        return f.pow(p) if signed_pow else f.abs().pow(p)

    if form == "code":
        def a(f):
            return TF.normalize(power(f).mean(1).reshape(f.shape[0], -1))
        return (a(S) - a(T)).pow(2).mean()

    def a(f):
        return TF.normalize(power(f).sum(1).reshape(f.shape[0], -1))
    return torch.linalg.vector_norm(a(S) - a(T), dim=1).sum() / S.shape[0]


def ref_at_repd(S, T, p=2):
    """RepDistiller's own rule: pool by comparing heights only, to a square (H, H)."""
    sH, tH = S.shape[2], T.shape[2]
    if sH > tH:
        S = TF.adaptive_avg_pool2d(S, (tH, tH))
    elif sH < tH:
        T = TF.adaptive_avg_pool2d(T, (sH, sH))

    def a(f):
        return TF.normalize(f.pow(p).mean(1).view(f.size(0), -1))
    return (a(S) - a(T)).pow(2).mean()


def ref_sp(S, T):
    n = S.shape[0]
    fs, ft = S.reshape(n, -1), T.reshape(n, -1)
    Gs, Gt = TF.normalize(fs @ fs.t()), TF.normalize(ft @ ft.t())
    return ((Gt - Gs) ** 2).sum() / (n * n)


def ref_nst(S, T):
    """MMD^2 with k(u, v) = (u.v)^2 over normalised channels; no detach (dt is the gradient of
    the whole loss); the kernels by einsum (the broadcast is fine at test sizes)."""
    S, T = pool_common(as4d(S), as4d(T))
    fs = TF.normalize(S.reshape(S.shape[0], S.shape[1], -1), dim=2)
    ft = TF.normalize(T.reshape(T.shape[0], T.shape[1], -1), dim=2)

    def k(a, b):
        return torch.einsum("bik,bjk->bij", a, b).pow(2)
    return k(ft, ft).mean() + k(fs, fs).mean() - 2 * k(fs, ft).mean()


def ref_nst_repd(S, T):
    """RepDistiller's NSTLoss.poly_kernel broadcast, literally (B x C x C x HW)."""
    S, T = pool_common(as4d(S), as4d(T))
    fs = TF.normalize(S.reshape(S.shape[0], S.shape[1], -1), dim=2)
    ft = TF.normalize(T.reshape(T.shape[0], T.shape[1], -1), dim=2)

    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
    return poly(ft, ft).mean().detach() + poly(fs, fs).mean() - 2 * poly(fs, ft).mean()


def _pdist(e, eps=1e-12):
    sq = e.pow(2).sum(1)
    res = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def _angles(e):
    v = e.unsqueeze(0) - e.unsqueeze(1)          # v[a, b] = e_b - e_a
    u = TF.normalize(v, p=2, dim=2)
    return torch.bmm(u, u.transpose(1, 2)).reshape(-1)


def ref_rkd_parts(S, T):
    s, t = S.reshape(S.shape[0], -1), T.reshape(T.shape[0], -1)
    dt = _pdist(t)
    dt = dt / dt[dt > 0].mean()
    ds = _pdist(s)
    ds = ds / ds[ds > 0].mean()
    return TF.smooth_l1_loss(ds, dt), TF.smooth_l1_loss(_angles(s), _angles(t))


def ref_rkd(S, T, wd=25.0, wa=50.0):
    ld, la = ref_rkd_parts(S, T)
    return wd * ld + wa * la


def ref_pkt(S, T, eps=1e-7, safe_norm=False):
    """RepDistiller's PKT.cosine_similarity_loss; safe_norm: the norm's gradient taken as 0
    at an all-zero row (torch's sqrt at 0 makes the reference's gradient NaN there)."""
    def unit(x):
        x = x.reshape(x.shape[0], -1)
        q = (x ** 2).sum(1, keepdim=True)
        if safe_norm:
            nrm = torch.where(q > 0, torch.sqrt(torch.where(q > 0, q, torch.ones_like(q))), torch.zeros_like(q))
        else:
            nrm = torch.sqrt(q)
        return x / (nrm + eps)

    xs, xt = unit(S), unit(T)
    ms, mt = (xs @ xs.t() + 1) / 2, (xt @ xt.t() + 1) / 2
    ps, pt = ms / ms.sum(1, keepdim=True), mt / mt.sum(1, keepdim=True)
    return torch.mean(pt * torch.log((pt + eps) / (ps + eps)))


def ref_fsp(S1, S2, T1, T2):
    def fsp(a, b):
        a, b = as4d(a), as4d(b)
        H, W = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
        a, b = pool_to(a, H, W), pool_to(b, H, W)
        # RepDistiller: (bot.unsqueeze(1) * top.unsqueeze(2)).mean(-1), (B, C2, C1)
        return (a.flatten(2).unsqueeze(1) * b.flatten(2).unsqueeze(2)).mean(-1)
    return (fsp(S1, S2) - fsp(T1, T2)).pow(2).mean()


# ------------------------------------------------------------------------------------------
# comparison drivers


def compare(name, ours, ref_fn, s, t, rtol=2e-5, loss_atol=None, grad_rtol=None):
    """ours(s, t, grad_teacher=True) -> (loss, ds, dt) against ref_fn on float64 copies."""
    loss, ds, dt = ours(s, t, grad_teacher=True)[:3]
    want, (gs, gt) = run_torch(ref_fn, s, t)
    check_close(f"{name} loss", loss, want, rtol=rtol, atol=1e-9 if loss_atol is None else loss_atol)
    grad_rtol = grad_rtol or rtol
    check_close(f"{name} dstudent", ds, gs, rtol=grad_rtol)
    check_close(f"{name} dteacher", dt, gt, rtol=grad_rtol)
    # grad_teacher=False returns the same loss and student gradient
    loss2, ds2 = ours(s, t)[:2]
    assert loss2 == loss and np.array_equal(ds2, ds)
    return loss, ds, dt


BATCHES = [1, 2, 64]
# (student shape without n, teacher shape without n)
SHAPES = [((4, 7, 7), (6, 5, 5)),      # odd sizes, student larger: student pooled 7 -> 5
          ((3, 4, 4), (5, 9, 9)),      # teacher larger, 9 -> 4 (overlapping bins)
          ((8, 6, 6), (8, 6, 6)),      # same sizes, same channels
          ((5, 6, 8), (3, 3, 5)),      # non-square maps
          ((32,), (48,))]              # flat (n, d)


# ------------------------------------------------------------------------------------------
# AT


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_at_matches_torch(n, shapes, form, rng):
    s, t = maps(rng, (n,) + shapes[0]), maps(rng, (n,) + shapes[1])
    compare(f"AT/{form}", lambda a, b, **k: at_loss(a, b, form=form, **k),
            lambda a, b: ref_at(a, b, 2, form), s, t)


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0, 4.0])
@pytest.mark.parametrize("form", ["code", "paper"])
def test_at_other_p(p, form, rng):
    # signed maps: |f|^p (the paper's form)
    s, t = maps(rng, (16, 4, 7, 7)), maps(rng, (16, 6, 5, 5))
    compare(f"AT p={p}", lambda a, b, **k: at_loss(a, b, p=p, form=form, **k),
            lambda a, b: ref_at(a, b, p, form), s, t)
    # non-negative (post-ReLU) maps: equal to the references' f.pow(p); for p = 1 away from 0,
    # where torch's f.pow(1) has derivative 1 and |f| has 0 (a ReLU before the tap zeroes both)
    kind = "pos" if p == 1 else "relu"
    s, t = maps(rng, (16, 4, 7, 7), kind), maps(rng, (16, 6, 5, 5), kind)
    if form == "code":
        compare(f"AT p={p} (RepDistiller form)", lambda a, b, **k: at_loss(a, b, p=p, **k),
                lambda a, b: ref_at_repd(a, b, p), s, t)


def test_at_square_maps_equal_repdistiller(rng):
    # for square maps kdcore's pooling rule is RepDistiller's (by height, to a square)
    for ss, ts in [((4, 8, 8), (6, 4, 4)), ((4, 3, 3), (6, 9, 9)), ((2, 7, 7), (3, 5, 5))]:
        s, t = maps(rng, (8,) + ss, "relu"), maps(rng, (8,) + ts, "relu")
        compare("AT vs RepDistiller", at_loss, ref_at_repd, s, t)


# ------------------------------------------------------------------------------------------
# SP, NST, RKD, PKT


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_sp_matches_torch(n, shapes, rng):
    s, t = maps(rng, (n,) + shapes[0]), maps(rng, (n,) + shapes[1])
    loss, ds, dt = compare("SP", sp_loss, ref_sp, s, t, rtol=1e-4)
    if n == 1:   # G normalises to [1] on both sides
        assert loss == 0 and not ds.any() and not dt.any()


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_nst_matches_torch(n, shapes, rng):
    s, t = maps(rng, (n,) + shapes[0], "relu"), maps(rng, (n,) + shapes[1], "relu")
    # the loss is a difference of three terms of order 1: float kernels give ~1e-7 absolute
    compare("NST", nst_loss, ref_nst, s, t, rtol=1e-4, loss_atol=1e-6)


def test_nst_equals_repdistiller_broadcast(rng):
    s, t = maps(rng, (4, 6, 7, 7), "relu"), maps(rng, (4, 5, 5, 5), "relu")
    loss, ds = nst_loss(s, t)
    want, (gs, _) = run_torch(ref_nst_repd, s, t)
    check_close("NST loss vs RepDistiller", loss, want, atol=1e-6)
    check_close("NST dstudent vs RepDistiller", ds, gs, rtol=1e-4)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_rkd_matches_torch(n, shapes, rng):
    s, t = maps(rng, (n,) + shapes[0]), maps(rng, (n,) + shapes[1])
    if n == 1:   # no pairs: 0 (the references' mean over no distances is NaN)
        loss, ds, dt, parts = rkd_loss(s, t, grad_teacher=True, return_parts=True)
        assert loss == 0 and parts == (0.0, 0.0) and not ds.any() and not dt.any()
        return
    compare("RKD", rkd_loss, ref_rkd, s, t, rtol=1e-5)
    loss, ds, parts = rkd_loss(s, t, return_parts=True)
    want_d, want_a = (x.item() for x in ref_rkd_parts(torch.tensor(s, dtype=torch.float64),
                                                      torch.tensor(t, dtype=torch.float64)))
    check_close("RKD L_dist", parts[0], want_d, rtol=1e-5)
    check_close("RKD L_angle", parts[1], want_a, rtol=1e-5)
    check_close("RKD loss = 25 L_dist + 50 L_angle", loss, 25 * parts[0] + 50 * parts[1], rtol=1e-6)


@pytest.mark.parametrize("w", [(1.0, 0.0), (0.0, 1.0), (3.0, 7.0)])
def test_rkd_weights(w, rng):
    s, t = maps(rng, (16, 12)), maps(rng, (16, 20))
    compare(f"RKD w={w}", lambda a, b, **k: rkd_loss(a, b, w_dist=w[0], w_angle=w[1], **k),
            lambda a, b: ref_rkd(a, b, *w), s, t)


def test_rkd_large_differences_use_linear_huber(rng):
    # distances spread so that some normalised differences exceed 1 (the |x| - 1/2 branch)
    s = maps(rng, (12, 8))
    s[0] *= 40
    t = maps(rng, (12, 8))
    loss, ds, dt, parts = rkd_loss(s, t, grad_teacher=True, return_parts=True)
    assert parts[0] > 0.1
    compare("RKD (linear Huber part)", rkd_loss, ref_rkd, s, t)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_pkt_matches_torch(n, shapes, rng):
    s, t = maps(rng, (n,) + shapes[0]), maps(rng, (n,) + shapes[1])
    loss, ds, dt = compare("PKT", pkt_loss, ref_pkt, s, t, rtol=1e-4, loss_atol=1e-9)
    if n == 1:   # P = [1] on both sides
        assert loss == 0 and not ds.any() and not dt.any()


# ------------------------------------------------------------------------------------------
# FSP

FSP_SHAPES = [  # (s1, s2, t1, t2) without n
    ((4, 8, 8), (6, 8, 8), (4, 8, 8), (6, 8, 8)),
    ((4, 9, 9), (6, 4, 4), (4, 7, 7), (6, 7, 7)),      # student layers pooled 9 -> 4
    ((3, 5, 5), (5, 7, 7), (3, 6, 6), (5, 3, 3)),      # first smaller (student), second (teacher)
    ((3, 6, 8), (2, 3, 5), (3, 4, 4), (2, 4, 4)),      # non-square
    ((16,), (8,), (16,), (8,)),                        # flat
]


@pytest.mark.parametrize("shapes", FSP_SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_fsp_matches_torch(n, shapes, rng):
    xs = [maps(rng, (n,) + sh) for sh in shapes]
    loss, (ds1, ds2), (dt1, dt2) = fsp_loss(*xs, grad_teacher=True)
    want, grads = run_torch(ref_fsp, *xs)
    check_close("FSP loss", loss, want, rtol=1e-5)
    for name, got, g in zip(["ds1", "ds2", "dt1", "dt2"], [ds1, ds2, dt1, dt2], grads):
        check_close(f"FSP {name}", got, g, rtol=1e-4)
    loss2, (e1, e2) = fsp_loss(*xs)
    assert loss2 == loss and np.array_equal(e1, ds1) and np.array_equal(e2, ds2)


# ------------------------------------------------------------------------------------------
# hard cases

TWO_MAP = {
    "at_code": (lambda a, b, **k: at_loss(a, b, **k), lambda a, b: ref_at(a, b, 2, "code")),
    "at_paper": (lambda a, b, **k: at_loss(a, b, form="paper", **k), lambda a, b: ref_at(a, b, 2, "paper")),
    "sp": (sp_loss, ref_sp),
    "nst": (nst_loss, ref_nst),
    "rkd": (rkd_loss, ref_rkd),
    "pkt": (pkt_loss, lambda a, b: ref_pkt(a, b, safe_norm=True)),
}


@pytest.mark.parametrize("method", sorted(TWO_MAP))
def test_identical_maps_give_zero(method, rng):
    ours, ref = TWO_MAP[method]
    s = maps(rng, (8, 5, 6, 6), "relu")
    loss, ds, dt = ours(s, s.copy(), grad_teacher=True)[:3]
    assert loss == 0
    if method == "pkt":   # the epsilon in log((P_t + eps)/(P_s + eps)): a 1e-7-sized gradient
        want, (gs, gt) = run_torch(ref, s, s.copy())
        check_close("PKT dstudent at s = t", ds, gs, rtol=1e-3)
        check_close("PKT dteacher at s = t", dt, gt, rtol=1e-3)
        assert np.abs(ds).max() < 1e-6
    else:
        assert not ds.any() and not dt.any(), (np.abs(ds).max(), np.abs(dt).max())


def test_identical_maps_fsp_zero(rng):
    a, b = maps(rng, (4, 3, 6, 6)), maps(rng, (4, 5, 3, 3))
    loss, ds, dt = fsp_loss(a, b, a.copy(), b.copy(), grad_teacher=True)
    assert loss == 0 and not any(g.any() for g in ds + dt)


@pytest.mark.parametrize("method", sorted(TWO_MAP))
def test_zero_student_map(method, rng):
    """An all-zero student map normalises to zero as in the references (epsilon clamps): the
    value and both gradients are the references' (finite); PKT's student gradient is the
    exact derivative where torch's is NaN (sqrt at 0)."""
    ours, ref = TWO_MAP[method]
    s = np.zeros((6, 4, 5, 5), np.float32)
    t = maps(rng, (6, 3, 5, 5), "relu")
    loss, ds, dt = ours(s, t, grad_teacher=True)[:3]
    want, (gs, gt) = run_torch(ref, s, t)
    check_close("loss", loss, want, rtol=1e-5, atol=1e-7)
    check_close("dstudent", ds, gs, rtol=1e-4, atol=1e-7 * max(1.0, np.abs(gs).max()))
    check_close("dteacher", dt, gt, rtol=1e-4)


def test_zero_rows_partial(rng):
    """Some samples all zero on one side (and in SP on both): still the references' values."""
    s, t = maps(rng, (8, 4, 5, 5)), maps(rng, (8, 3, 5, 5))
    s[2] = 0
    t[5] = 0
    for name in ["at_code", "at_paper", "nst", "rkd"]:
        ours, ref = TWO_MAP[name]
        compare(name, ours, ref, s, t, rtol=1e-4)
    s2, t2 = s.copy(), t.copy()
    t2[2] = 0   # sample 2 zero on both sides: SP rows stay finite
    compare("sp", sp_loss, ref_sp, s2, t2, rtol=1e-4)


def test_zero_maps_both_sides(rng):
    z = np.zeros((4, 3, 5, 5), np.float32)
    for name in sorted(TWO_MAP):
        loss, ds, dt = TWO_MAP[name][0](z, z.copy(), grad_teacher=True)[:3]
        assert loss == 0 and np.all(np.isfinite(ds)) and not ds.any() and not dt.any(), name
    loss, ds, dt = fsp_loss(z, z, z, z, grad_teacher=True)
    assert loss == 0 and not any(g.any() for g in ds + dt)


@pytest.mark.parametrize("scale", [1e4, 1e-4])
@pytest.mark.parametrize("method", sorted(TWO_MAP))
def test_scaled_values(method, scale, rng):
    """Every two-map method is scale-invariant (up to its epsilons): the loss of a scaled
    student equals the unscaled one and the gradient scales by 1/scale; and it matches the
    reference formula on the scaled values."""
    ours, ref = TWO_MAP[method]
    s, t = maps(rng, (16, 4, 6, 6), "relu"), maps(rng, (16, 5, 4, 4), "relu")
    loss, ds = ours(s, t)[:2]
    loss_k, ds_k = ours((s * scale).astype(np.float32), t)[:2]
    check_close("scaled loss", loss_k, loss, rtol=1e-4, atol=1e-6)
    check_close("scaled gradient", ds_k * scale, ds, rtol=2e-3)
    compare(f"{method} scaled", ours, ref, (s * scale).astype(np.float32), t, rtol=1e-4, loss_atol=1e-6)


def test_fsp_large_values(rng):
    xs = [maps(rng, (8, 4, 6, 6)) * 1e3, maps(rng, (8, 3, 6, 6)) * 1e3, maps(rng, (8, 4, 6, 6)), maps(rng, (8, 3, 6, 6))]
    xs = [x.astype(np.float32) for x in xs]
    loss, ds, dt = fsp_loss(*xs, grad_teacher=True)
    want, grads = run_torch(ref_fsp, *xs)
    check_close("FSP loss", loss, want, rtol=1e-5)
    for got, g in zip(ds + dt, grads):
        check_close("FSP grad", got, g, rtol=1e-4)


def test_thread_count_independent_in_deterministic_mode(rng):
    import kdcore
    # sizes above the one-thread threshold (2^16 operations) of every method
    s, t = maps(rng, (48, 16, 9, 9), "relu"), maps(rng, (48, 12, 5, 5), "relu")
    before_threads, before_det = kdcore.get_num_threads(), kdcore.get_deterministic()
    try:
        kdcore.set_deterministic(True)
        results = []
        for nt in (1, 2, 3):
            kdcore.set_num_threads(nt)
            out = [f(s, t, grad_teacher=True) for f in (at_loss, sp_loss, nst_loss, rkd_loss, pkt_loss)]
            out.append(fsp_loss(s, s[:, :8, :5, :5].copy(), s * 0.5, s[:, :8, :4, :4].copy(), grad_teacher=True))
            results.append(out)
        for r in results[1:]:
            for a, b in zip(results[0], r):
                assert a[0] == b[0]
                for x, y in zip(a[1:], b[1:]):
                    if isinstance(x, tuple):
                        assert all(np.array_equal(u, v) for u, v in zip(x, y))
                    else:
                        assert np.array_equal(x, y)
    finally:
        kdcore.set_num_threads(before_threads)
        kdcore.set_deterministic(before_det)


# ------------------------------------------------------------------------------------------
# argument errors


def test_argument_errors(rng):
    s, t = maps(rng, (4, 3, 5, 5)), maps(rng, (4, 2, 5, 5))
    for fn in (at_loss, sp_loss, nst_loss, rkd_loss, pkt_loss):
        with pytest.raises(TypeError, match=r"^s must have dtype float32"):
            fn(s.astype(np.float64), t)
        with pytest.raises(TypeError, match=r"^t must be a numpy.ndarray"):
            fn(s, t.tolist())
        with pytest.raises(ValueError, match=r"^s must be a non-empty 2-D \(n, d\) or 4-D"):
            fn(s[0], t)
        with pytest.raises(ValueError, match=r"^t must be a non-empty .* got an empty 2-D"):
            fn(s, np.zeros((4, 0), np.float32))
        bad = t.copy()
        bad[1, 0, 2, 2] = np.nan
        with pytest.raises(ValueError, match=r"^t contains NaN at flat index"):
            fn(s, bad)
        with pytest.raises(ValueError, match=r"^t has 3 samples and s has 4"):
            fn(s, t[:3].copy())
        with pytest.raises(TypeError, match=r"^grad_teacher must be a bool"):
            fn(s, t, grad_teacher="yes")
    with pytest.raises(ValueError, match=r"^p must be >= 1"):
        at_loss(s, t, p=0.5)
    with pytest.raises(ValueError, match=r"^p must be finite"):
        at_loss(s, t, p=float("inf"))
    with pytest.raises(ValueError, match=r"^form must be 'code' or 'paper'"):
        at_loss(s, t, form="torchdistill")
    with pytest.raises(ValueError, match=r"^w_dist must be >= 0"):
        rkd_loss(s, t, w_dist=-1)
    with pytest.raises(TypeError, match=r"^w_angle must be a float"):
        rkd_loss(s, t, w_angle="50")
    # the C checks reached through the binding directly
    with pytest.raises(ValueError, match=r"kd_loss_at: p \(0\.5\) must be finite and >= 1"):
        _kdcore.at_loss(s, t, 0.5)
    with pytest.raises(ValueError, match=r"kd_loss_at: form \(7\) must be KD_AT_CODE or KD_AT_PAPER"):
        _kdcore.at_loss(s, t, 2.0, 7)
    with pytest.raises(ValueError, match=r"kd_loss_rkd: w_angle \(-1\) must be finite and >= 0"):
        _kdcore.rkd_loss(s, t, 25.0, -1.0)


def test_fsp_argument_errors(rng):
    s1, s2 = maps(rng, (4, 3, 6, 6)), maps(rng, (4, 5, 3, 3))
    with pytest.raises(ValueError, match=r"kd_loss_fsp: t1\.c \(4\) must equal s1\.c \(3\).*same channel counts"):
        fsp_loss(s1, s2, maps(rng, (4, 4, 6, 6)), s2)
    with pytest.raises(ValueError, match=r"t2\.c \(6\) must equal s2\.c \(5\)"):
        fsp_loss(s1, s2, s1, maps(rng, (4, 6, 3, 3)))
    with pytest.raises(ValueError, match=r"^t2 has 2 samples and s1 has 4"):
        fsp_loss(s1, s2, s1, s2[:2].copy())
    with pytest.raises(TypeError, match=r"^s2 must have dtype float32"):
        fsp_loss(s1, s2.astype(np.float16), s1, s2)
    with pytest.raises(ValueError, match=r"^t1 must be a non-empty 2-D \(n, d\) or 4-D"):
        fsp_loss(s1, s2, s1[:, :, :, :, None], s2)


def test_non_contiguous_inputs_are_copied(rng):
    s = maps(rng, (8, 6, 6, 3)).transpose(0, 3, 1, 2)   # (8, 3, 6, 6), not C-contiguous
    t = maps(rng, (8, 4, 5, 5))
    for fn in (at_loss, sp_loss, nst_loss, rkd_loss, pkt_loss):
        a = fn(s, t)
        b = fn(np.ascontiguousarray(s), t)
        assert a[0] == b[0] and np.array_equal(a[1], b[1])


# ------------------------------------------------------------------------------------------
# scratch memory at realistic sizes (kdcore.h documents the formulas; the C test checks them
# exactly at small sizes)


def lw(a, k, b):
    """Upper bound of kd_linear_workspace(a, k, b) in floats (kdcore.h, "Feature and relation
    losses": packed operands of the forward and the two backward products)."""
    r8, r32 = (lambda x: -(-x // 8) * 8), (lambda x: -(-x // 32) * 32)
    return max((r8(a) + r32(b) + 4) * k, (r8(a) + 36) * b, (r8(b) + 36) * a) + 64


def test_scratch_memory_is_bounded(rng):
    import kdcore
    threads = kdcore.get_num_threads()
    slack = 64 * 10
    n, c, hw = 128, 256, 64
    s, t = maps(rng, (n, c, 8, 8), "relu"), maps(rng, (n, c, 8, 8), "relu")
    nst_loss(s, t, grad_teacher=True)
    nst = _kdcore.feat_scratch_bytes()
    per_thread = 12 * 2 * c * hw + 8 * 2 * c + 4 * 3 * c * c + 4 * lw(c, hw, c) + 8 * 2 * c * hw + 8 * c * hw
    assert nst <= 8 * n + min(threads, n) * per_thread + slack, nst
    broadcast = n * c * c * hw * 4   # RepDistiller's B x C x C x HW float tensor: 2.1 GB
    assert nst < broadcast / 500
    # per sample: the scratch does not grow with the batch
    nst_loss(s[:16].copy(), t[:16].copy(), grad_teacher=True)
    assert _kdcore.feat_scratch_bytes() >= nst - 8 * n - slack

    D = c * hw
    sp_loss(s, t, grad_teacher=True)
    sp = _kdcore.feat_scratch_bytes()
    # Gram matrices and their gradients (O(n^2)) and the product's packed operands (~2 n D floats)
    assert sp <= 28 * n * n + 16 * n + 4 * lw(n, D, n) + slack, sp
    assert sp <= 2.2 * s.nbytes

    d = 256
    es, et = maps(rng, (n, d)), maps(rng, (n, d))
    rkd_loss(es, et, grad_teacher=True)
    rkd = _kdcore.feat_scratch_bytes()
    assert rkd <= 8 * (6 * n * n + n + threads * d) + slack, rkd   # O(n^2): no n^3, no n^2 d
    assert rkd < n ** 3 * 4                                       # not even n^3 floats
    pkt_loss(es, et, grad_teacher=True)
    pkt = _kdcore.feat_scratch_bytes()
    assert pkt <= 4 * n * 2 * d + 36 * n * n + 32 * n + 4 * lw(n, d, n) + 4 * n * d + slack, pkt


def test_refcounts_unchanged_success_and_error_paths(rng):
    import sys
    s, t = maps(rng, (4, 3, 5, 5)), maps(rng, (4, 2, 4, 4))
    s2 = maps(rng, (4, 2, 5, 5))
    bad = t.astype(np.float64)
    nan = t.copy()
    nan[0, 0, 0, 0] = np.nan
    objs = {"s": s, "t": t, "s2": s2, "bad": bad, "nan": nan}
    calls = [lambda: _kdcore.at_loss(s, t, 2.0, 0, True), lambda: _kdcore.sp_loss(s, t, True),
             lambda: _kdcore.nst_loss(s, t), lambda: _kdcore.rkd_loss(s, t, 25.0, 50.0, True),
             lambda: _kdcore.pkt_loss(s, t, True), lambda: _kdcore.fsp_loss(s, s2, s, s2, True)]
    errors = [lambda: _kdcore.at_loss(s, bad), lambda: _kdcore.sp_loss(s, nan), lambda: _kdcore.nst_loss(s, t[:2]),
              lambda: _kdcore.at_loss(s, t, 0.5), lambda: _kdcore.fsp_loss(s, s2, s, bad),
              lambda: _kdcore.fsp_loss(s, s2, s2, s), lambda: _kdcore.rkd_loss(s, "t")]
    for f in calls + errors:   # warm up (lazy imports, caches)
        try:
            f()
        except (TypeError, ValueError):
            pass
    before = {k: sys.getrefcount(v) for k, v in objs.items()}
    for _ in range(200):
        for f in calls:
            f()
        for f in errors:
            with pytest.raises((TypeError, ValueError)):
                f()
    assert {k: sys.getrefcount(v) for k, v in objs.items()} == before
    out = _kdcore.fsp_loss(s, s2, s, s2, True)
    assert [sys.getrefcount(out[i]) for i in range(1, 5)] == [2] * 4   # the tuple and the argument
