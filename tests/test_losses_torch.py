"""kdcore.functional distillation losses vs PyTorch autograd of the same formulas (float64
reference on the same float32 inputs): value, gradient w.r.t. the student logits (and the
teacher logits where the library offers it), extreme logits, argument errors.

Conventions under test (kdcore.h, "Losses"): p = softmax(z / T); KL summed over classes, mean
over the batch, times T^2. DKD is checked against an exact form (target class removed with
-inf, log-space binary probabilities) and against mdistiller's "-1000 shift" form on
moderate logits.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from kdcore.functional import (dkd_loss, kd_loss, logit_mse_loss, soft_target_loss, softmax,
                               tolerant_loss)

CLASSES = [2, 10, 100, 1000]
BATCHES = [1, 7, 64]
TEMPS = [1.0, 2.0, 4.0, 8.0, 20.0]
KINDS = ["normal", "huge", "spike"]


# ------------------------------------------------------------------------------------------
# helpers


def check_close(name, got, want, rtol=1e-4, atol=None, scale=None):
    """|got - want| <= atol + rtol |want|; atol defaults to rtol * max|want| (the quantity's
    scale). On failure: count, max diff and the first mismatches."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    got, want = np.atleast_1d(got), np.atleast_1d(want)   # np.argwhere of a 0-d array finds nothing
    if scale is None:
        scale = float(np.max(np.abs(want))) if want.size else 0.0
    if atol is None:
        atol = rtol * max(scale, 1e-30)
    if not np.all(np.isfinite(got)):
        bad = np.argwhere(~np.isfinite(got))[:5]
        pytest.fail(f"{name}: non-finite values at {[tuple(int(i) for i in b) for b in bad]} "
                    f"(reference finite: {bool(np.all(np.isfinite(want)))})")
    err = np.abs(got - want)
    bad = np.argwhere(err > atol + rtol * np.abs(want))
    if bad.size:
        lines = [f"{name}: {len(bad)}/{got.size} mismatches; max abs diff {err.max():.4g} "
                 f"(rtol={rtol:g}, atol={atol:.3g}, scale {scale:.3g})"]
        for idx in bad[:6]:
            idx = tuple(int(i) for i in idx)
            lines.append(f"  at {idx}: kdcore {got[idx]!r}, torch {want[idx]!r}")
        pytest.fail("\n".join(lines))


def make_logits(rng, kind, n, v, spike_at=None):
    """float32 logits: 'normal' N(0, 3^2); 'huge' N(0, 1) * 1e4; 'spike' small noise with one
    +-1e4 entry per row (at spike_at[i] when given)."""
    if kind == "normal":
        return (rng.standard_normal((n, v)) * 3).astype(np.float32)
    if kind == "huge":
        return (rng.standard_normal((n, v)) * 1e4).astype(np.float32)
    z = rng.standard_normal((n, v)) * 0.1
    at = rng.integers(0, v, n) if spike_at is None else spike_at
    sign = np.where(rng.random(n) < 0.8, 1.0, -1.0)
    z[np.arange(n), at] = sign * 1e4
    return z.astype(np.float32)


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


def kl_rows(lt, ls):
    """sum_k exp(lt_k) (lt_k - ls_k) per row, with 0 log 0 = 0 (lt may hold -inf or underflow)
    and gradients that stay finite."""
    m = torch.isfinite(lt) & (lt.exp() > 0)
    lt0 = torch.where(m, lt, torch.zeros_like(lt))
    ls0 = torch.where(m, ls, torch.zeros_like(ls))
    return torch.where(m, lt0.exp() * (lt0 - ls0), torch.zeros_like(lt)).sum(-1)


def torch_kd(s, t, T):
    S, Tt = t64(s, True), t64(t, True)
    loss = T * T * kl_rows(TF.log_softmax(Tt / T, 1), TF.log_softmax(S / T, 1)).mean()
    loss.backward()
    return loss.item(), S.grad.numpy(), Tt.grad.numpy()


def torch_soft(s, q, T):
    S, Q = t64(s, True), t64(q)
    lq = torch.where(Q > 0, Q.log(), torch.full_like(Q, -np.inf))
    loss = T * T * kl_rows(lq, TF.log_softmax(S / T, 1)).mean()
    loss.backward()
    return loss.item(), S.grad.numpy()


def torch_dkd_exact(s, t, y, alpha, beta, T):
    """DKD with exact masks: b = (p_y, 1 - p_y) in log space, non-target distribution by a
    log-softmax with the target logit set to -inf."""
    S, Tt = t64(s, True), t64(t, True)
    Y = torch.tensor(y, dtype=torch.int64)
    gt = TF.one_hot(Y, s.shape[1]).bool()

    def binary_logs(z):
        lp = TF.log_softmax(z / T, 1)
        l_y = lp.gather(1, Y[:, None])
        l_n = torch.logsumexp(lp.masked_fill(gt, -np.inf), 1, keepdim=True)
        return torch.cat([l_y, l_n], 1)

    tckd = T * T * kl_rows(binary_logs(Tt), binary_logs(S)).mean()
    nckd = T * T * kl_rows(TF.log_softmax((Tt / T).masked_fill(gt, -np.inf), 1),
                           TF.log_softmax((S / T).masked_fill(gt, -np.inf), 1)).mean()
    loss = alpha * tckd + beta * nckd
    loss.backward()
    return loss.item(), S.grad.numpy(), tckd.item(), nckd.item()


def torch_dkd_mdistiller(s, t, y, alpha, beta, T):
    """DKD as mdistiller writes it: binary probabilities by summing softmax entries, log
    without epsilon, non-target part by pushing the target logit down by 1000 after /T."""
    S, Tt = t64(s, True), t64(t, True)
    Y = torch.tensor(y, dtype=torch.int64)
    gt = TF.one_hot(Y, s.shape[1]).double()
    ps, pt = TF.softmax(S / T, 1), TF.softmax(Tt / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    n = s.shape[0]
    tckd = TF.kl_div(torch.log(bs), bt, reduction="sum") * T * T / n
    nckd = TF.kl_div(TF.log_softmax(S / T - 1000.0 * gt, 1), TF.softmax(Tt / T - 1000.0 * gt, 1),
                     reduction="sum") * T * T / n
    loss = alpha * tckd + beta * nckd
    loss.backward()
    return loss.item(), S.grad.numpy(), tckd.item(), nckd.item()


# ------------------------------------------------------------------------------------------
# KD


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_kd_loss_matches_torch(classes, batch, T, kind, rng):
    s = make_logits(rng, kind, batch, classes)
    t = make_logits(rng, kind, batch, classes)
    loss, ds, dt = kd_loss(s, t, T=T, teacher_grad=True)
    want, want_ds, want_dt = torch_kd(s, t, T)
    assert np.isfinite(want)
    check_close("loss", loss, want, atol=1e-7 * T * T)
    check_close("dstudent", ds, want_ds, atol=1e-4 * max(np.abs(want_ds).max(), 1e-7 / batch))
    check_close("dteacher", dt, want_dt, atol=1e-4 * max(np.abs(want_dt).max(), 1e-7 / batch))
    # teacher_grad=False returns the same loss and student gradient
    loss2, ds2 = kd_loss(s, t, T=T)
    assert loss2 == loss and np.array_equal(ds2, ds)


def test_kd_loss_identical_inputs_is_zero(rng):
    s = make_logits(rng, "normal", 9, 13)
    loss, ds, dt = kd_loss(s, s.copy(), T=4.0, teacher_grad=True)
    assert abs(loss) < 1e-6
    assert np.abs(ds).max() < 1e-7 and np.abs(dt).max() < 1e-7


def test_kd_loss_saturated_disagreement(rng):
    """Teacher certain of class 0, student certain of class 1 (|z| = 1e4, T = 1): the KL is
    about 2e4 and the gradient is +-1/N, all finite."""
    n, v = 4, 10
    s = np.zeros((n, v), np.float32)
    t = np.zeros((n, v), np.float32)
    s[:, 1], t[:, 0] = 1e4, 1e4
    loss, ds, dt = kd_loss(s, t, T=1.0, teacher_grad=True)
    want, want_ds, want_dt = torch_kd(s, t, 1.0)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds, atol=1e-6)
    check_close("dteacher", dt, want_dt, atol=1e-6)
    assert abs(loss - 1e4) < 1.0


# ------------------------------------------------------------------------------------------
# soft targets


@pytest.mark.parametrize("kind", ["normal", "huge"])
@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_soft_target_loss_matches_torch(classes, batch, T, kind, rng):
    s = make_logits(rng, kind, batch, classes)
    q = softmax(make_logits(rng, "normal", batch, classes), T=1.0)
    loss, ds = soft_target_loss(s, q, T=T)
    want, want_ds = torch_soft(s, q, T)
    check_close("loss", loss, want, atol=1e-7 * T * T)
    check_close("dstudent", ds, want_ds, atol=1e-4 * max(np.abs(want_ds).max(), 1e-7 / batch))


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_soft_target_loss_multi_teacher_average(classes, T, rng):
    """q = mean of three teachers' softened outputs (Wang & Yoon's review, eq. 23)."""
    batch = 16
    s = make_logits(rng, "normal", batch, classes)
    ts = [make_logits(rng, "normal", batch, classes) for _ in range(3)]
    q64 = np.mean([torch.softmax(t64(t) / T, 1).numpy() for t in ts], 0)
    q = q64.astype(np.float32)
    loss, ds = soft_target_loss(s, q, T=T)
    want, want_ds = torch_soft(s, q, T)
    check_close("loss", loss, want, atol=1e-7 * T * T)
    check_close("dstudent", ds, want_ds, atol=1e-4 * np.abs(want_ds).max())
    # with a single teacher, the soft-target loss against softmax(t/T) is the KD loss
    q1 = softmax(ts[0], T=T)
    l1, d1 = soft_target_loss(s, q1, T=T)
    l2, d2 = kd_loss(s, ts[0], T=T)
    check_close("soft vs kd loss", l1, l2, rtol=1e-5, atol=1e-6 * T * T)
    check_close("soft vs kd grad", d1, d2, rtol=1e-4)


def test_soft_target_loss_rejects_bad_q(rng):
    s = make_logits(rng, "normal", 3, 5)
    q = softmax(make_logits(rng, "normal", 3, 5))
    with pytest.raises(ValueError, match="sums to"):
        soft_target_loss(s, q * 2, T=2.0)
    neg = q.copy()
    neg[0, 0] = -0.1
    neg[0, 1] += 0.1
    with pytest.raises(ValueError, match="negative"):
        soft_target_loss(s, neg, T=2.0)
    with pytest.raises(ValueError):
        soft_target_loss(s, q[:, :4].copy(), T=2.0)


# ------------------------------------------------------------------------------------------
# DKD


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_dkd_loss_matches_exact_torch(classes, batch, T, kind, rng):
    y = rng.integers(0, classes, batch).astype(np.int64)
    # spikes: the teacher's on the label, the student's anywhere (often the label too)
    s = make_logits(rng, kind, batch, classes)
    t = make_logits(rng, kind, batch, classes, spike_at=y if kind == "spike" else None)
    alpha, beta = 1.0, 8.0
    loss, ds, (tc, nc) = dkd_loss(s, t, y, alpha=alpha, beta=beta, T=T, return_parts=True)
    want, want_ds, want_tc, want_nc = torch_dkd_exact(s, t, y, alpha, beta, T)
    assert np.isfinite(want)
    check_close("tckd", tc, want_tc, atol=1e-7 * T * T)
    check_close("nckd", nc, want_nc, atol=1e-7 * T * T)
    check_close("loss", loss, want, atol=1e-6 * T * T)
    check_close("dstudent", ds, want_ds, atol=1e-4 * max(np.abs(want_ds).max(), 1e-7 / batch))


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("classes", CLASSES)
def test_dkd_loss_close_to_mdistiller_on_moderate_logits(classes, T, rng):
    batch = 16
    y = rng.integers(0, classes, batch).astype(np.int64)
    s = (rng.standard_normal((batch, classes)) * 2).astype(np.float32)
    t = (rng.standard_normal((batch, classes)) * 2).astype(np.float32)
    t[np.arange(batch), y] += 3   # a teacher that mostly gets it right
    alpha, beta = 1.0, 8.0
    loss, ds, (tc, nc) = dkd_loss(s, t, y, alpha=alpha, beta=beta, T=T, return_parts=True)
    want, want_ds, want_tc, want_nc = torch_dkd_mdistiller(s, t, y, alpha, beta, T)
    check_close("tckd vs mdistiller", tc, want_tc, atol=1e-7 * T * T)
    check_close("nckd vs mdistiller", nc, want_nc, atol=1e-7 * T * T)
    check_close("loss vs mdistiller", loss, want, atol=1e-6 * T * T)
    check_close("dstudent vs mdistiller", ds, want_ds)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_loss_exact_where_mdistiller_trick_fails(T, rng):
    """Logit gaps of ~1e4: the -1000 shift no longer removes the target class and log(b_s)
    underflows to -inf in mdistiller's form; kdcore stays equal to the exact form."""
    batch, classes = 8, 10
    y = rng.integers(0, classes, batch).astype(np.int64)
    t = (rng.standard_normal((batch, classes)) * 10).astype(np.float32)
    t[np.arange(batch), y] = 1e4                       # teacher: label by a 1e4 margin
    s = (rng.standard_normal((batch, classes)) * 10).astype(np.float32)
    s[np.arange(batch), y] = 1e4                       # student too
    s[0, (y[0] + 1) % classes] = 1e4 + 50              # ... except row 0: another class wins
    loss, ds, (tc, nc) = dkd_loss(s, t, y, alpha=1.0, beta=8.0, T=T, return_parts=True)
    want, want_ds, want_tc, want_nc = torch_dkd_exact(s, t, y, 1.0, 8.0, T)
    check_close("tckd", tc, want_tc, atol=1e-7 * T * T)
    check_close("nckd", nc, want_nc, atol=1e-7 * T * T)
    check_close("loss", loss, want)
    check_close("dstudent", ds, want_ds, atol=1e-4 * np.abs(want_ds).max())
    # the case really is one where the -1000 trick is inaccurate
    with np.errstate(all="ignore"):
        m_loss, _, m_tc, m_nc = torch_dkd_mdistiller(s, t, y, 1.0, 8.0, T)
    assert not np.isfinite(m_loss) or abs(m_nc - want_nc) > 1e-2 * max(abs(want_nc), 1.0), (m_nc, want_nc)


def test_dkd_loss_two_classes_nckd_is_zero(rng):
    """With 2 classes the non-target distribution is a point mass: NCKD = 0, DKD = TCKD = KD."""
    s = make_logits(rng, "normal", 6, 2)
    t = make_logits(rng, "normal", 6, 2)
    y = rng.integers(0, 2, 6)
    loss, ds, (tc, nc) = dkd_loss(s, t, y, alpha=1.0, beta=8.0, T=4.0, return_parts=True)
    assert abs(nc) < 1e-7
    kl, dkl = kd_loss(s, t, T=4.0)
    check_close("tckd vs kd", tc, kl, rtol=1e-5, atol=1e-6)
    check_close("grad vs kd", ds, dkl, rtol=1e-4)


def test_dkd_loss_alpha_beta_linear(rng):
    s = make_logits(rng, "normal", 7, 10)
    t = make_logits(rng, "normal", 7, 10)
    y = rng.integers(0, 10, 7)
    _, d10, (tc, nc) = dkd_loss(s, t, y, alpha=1.0, beta=0.0, T=4.0, return_parts=True)
    _, d01 = dkd_loss(s, t, y, alpha=0.0, beta=1.0, T=4.0)
    loss, d = dkd_loss(s, t, y, alpha=2.0, beta=3.0, T=4.0)
    check_close("loss", loss, 2 * tc + 3 * nc, rtol=1e-6, atol=1e-6)
    check_close("grad", d, 2 * d10.astype(np.float64) + 3 * d01, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# logit MSE, tolerant term, softmax


@pytest.mark.parametrize("kind", ["normal", "huge"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_logit_mse_loss_matches_torch(classes, batch, kind, rng):
    s = make_logits(rng, kind, batch, classes)
    t = make_logits(rng, kind, batch, classes)
    loss, ds = logit_mse_loss(s, t)
    S = t64(s, True)
    ref = TF.mse_loss(S, t64(t))
    ref.backward()
    check_close("loss", loss, ref.item(), rtol=1e-5)
    check_close("dstudent", ds, S.grad.numpy(), rtol=1e-5)


@pytest.mark.parametrize("K", [2, 5, 10])
@pytest.mark.parametrize("kind", ["normal", "huge"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_tolerant_loss_matches_torch(classes, batch, kind, K, rng):
    K = min(K, classes)   # K > classes is an error (tested in the error cases); use K = classes
    # distinct values per row (ties would make the top-K choice, and so the gradient, ambiguous)
    step = 1.0 if kind == "normal" else 2e4 / classes
    z = np.stack([(rng.permutation(classes) - classes / 2) * step + rng.uniform(0, 0.25 * step, classes)
                  for _ in range(batch)]).astype(np.float32)
    assert all(len(np.unique(r)) == classes for r in z), "ties in the test logits"
    loss, d = tolerant_loss(z, K=K)
    Z = t64(z, True)
    top = torch.topk(Z, K, dim=1).values
    ref = (top[:, 0] - top[:, 1:].mean(1)).mean()
    ref.backward()
    check_close("loss", loss, ref.item(), rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(z).max())))
    check_close("dlogits", d, Z.grad.numpy(), rtol=1e-6)


def test_tolerant_loss_errors(rng):
    z = make_logits(rng, "normal", 3, 5)
    with pytest.raises(ValueError, match="K"):
        tolerant_loss(z, K=6)
    with pytest.raises(ValueError, match="K"):
        tolerant_loss(z, K=1)
    with pytest.raises(TypeError, match="logits"):
        tolerant_loss(z.astype(np.float64), K=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("classes", CLASSES)
def test_softmax_matches_torch(classes, T, kind, rng):
    z = make_logits(rng, kind, 7, classes)
    p = softmax(z, T=T)
    assert p.dtype == np.float32 and p.shape == z.shape
    ref = torch.softmax(t64(z) / T, 1).numpy()
    check_close("softmax", p, ref, rtol=1e-5, atol=1e-7)
    check_close("row sums", p.astype(np.float64).sum(1), np.ones(7), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# argument errors


def _pair(rng, n=4, v=5):
    return make_logits(rng, "normal", n, v), make_logits(rng, "normal", n, v)


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_names_T(T, rng):
    s, t = _pair(rng)
    y = np.zeros(4, np.int64)
    q = softmax(t)
    for call in (lambda: kd_loss(s, t, T=T), lambda: soft_target_loss(s, q, T=T),
                 lambda: dkd_loss(s, t, y, T=T), lambda: softmax(s, T=T)):
        with pytest.raises(ValueError, match="T"):
            call()


def test_float64_logits_raise_type_error_naming_student_logits(rng):
    s, t = _pair(rng)
    y = np.zeros(4, np.int64)
    for call in (lambda: kd_loss(s.astype(np.float64), t), lambda: soft_target_loss(s.astype(np.float64), softmax(t)),
                 lambda: dkd_loss(s.astype(np.float64), t, y), lambda: logit_mse_loss(s.astype(np.float64), t)):
        with pytest.raises(TypeError, match="student_logits"):
            call()
    with pytest.raises(TypeError, match="teacher_logits"):
        kd_loss(s, t.astype(np.float64))
    with pytest.raises(TypeError, match="student_logits"):
        kd_loss(s.tolist(), t)


def test_shape_mismatch_raises_value_error(rng):
    s, t = _pair(rng)
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(s, t[:3].copy())
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(s, t[:, :4].copy())
    with pytest.raises(ValueError):
        kd_loss(s[0].copy(), t[0].copy())          # 1-D
    with pytest.raises(ValueError):
        dkd_loss(s, t[:, :4].copy(), y)
    with pytest.raises(ValueError, match="target"):
        dkd_loss(s, t, y[:3].copy())
    with pytest.raises(ValueError):
        logit_mse_loss(s, t[:2].copy())
    with pytest.raises(ValueError):
        kd_loss(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32))


@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_dkd_labels_out_of_range_name_target(bad, rng):
    s, t = _pair(rng)
    y = np.array([0, bad, 1, 2], np.int64)
    with pytest.raises(ValueError, match="target"):
        dkd_loss(s, t, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_logits_raise_value_error(bad, rng):
    s, t = _pair(rng)
    y = np.zeros(4, np.int64)
    sb = s.copy()
    sb[1, 2] = bad
    tb = t.copy()
    tb[2, 0] = bad
    for call in (lambda: kd_loss(sb, t), lambda: kd_loss(s, tb), lambda: dkd_loss(sb, t, y),
                 lambda: dkd_loss(s, tb, y), lambda: logit_mse_loss(sb, t), lambda: tolerant_loss(sb, 2),
                 lambda: soft_target_loss(sb, softmax(t)), lambda: softmax(sb)):
        with pytest.raises(ValueError):
            call()


def test_inputs_not_modified(rng):
    s, t = _pair(rng)
    y = np.arange(4, dtype=np.int64)
    s0, t0 = s.copy(), t.copy()
    kd_loss(s, t, T=3.0, teacher_grad=True)
    dkd_loss(s, t, y)
    logit_mse_loss(s, t)
    tolerant_loss(s, 3)
    assert np.array_equal(s, s0) and np.array_equal(t, t0)
