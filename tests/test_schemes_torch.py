"""One (or two) steps of the C distillation loops (kd_distill_epoch, kd_mutual_epoch,
kd_slkd_epoch through kdcore._kdcore) vs the same steps written in PyTorch on the same
weights: forward in train mode (teachers in eval mode), the scheme's loss, backward,
torch.optim.SGD(lr 0.1, momentum 0.9, weight decay 5e-4). Compared: every parameter's update,
BN running statistics, and the loss terms the loops report.

The torch side runs in float64 from the same float32 weights and inputs; parameter updates are
compared relative to their own scale (rtol 1e-4).
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402

LR, MOM, WD = 0.1, 0.9, 5e-4
N, V = 8, 4


# ------------------------------------------------------------------------------------------
# helpers


def check_close(name, got, want, rtol=1e-4, atol=None, scale=None):
    """|got - want| <= atol + rtol |want|, atol = rtol * scale (default max|want|). On failure:
    the number of mismatches, max diff and the first few values."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    got, want = np.atleast_1d(got), np.atleast_1d(want)   # np.argwhere of a 0-d array finds nothing
    if scale is None:
        scale = float(np.max(np.abs(want))) if want.size else 0.0
    if atol is None:
        atol = rtol * max(scale, 1e-30)
    err = np.abs(got - want)
    bad = np.argwhere(~(err <= atol + rtol * np.abs(want)))
    if bad.size:
        lines = [f"{name}: {len(bad)}/{got.size} mismatches; max abs diff {np.nanmax(err):.4g} "
                 f"(rtol={rtol:g}, atol={atol:.3g}, scale {scale:.3g})"]
        for idx in bad[:6]:
            idx = tuple(int(i) for i in idx)
            lines.append(f"  at {idx}: kdcore {got[idx]!r}, torch {want[idx]!r}")
        pytest.fail("\n".join(lines))


def make_model(arch, seed, sharpen=1.0):
    """A small kdcore model and random (but valid) BN running statistics; sharpen scales the
    last layer so that the softmax is not nearly uniform."""
    if arch == "mlp":
        m = kdcore.models.mlp([12, 16, V], seed=seed)
    else:
        m = kdcore.models.cnn(num_classes=V, in_channels=1, input_size=8, width=4, seed=seed)
    sd = m.state_dict()
    r = np.random.default_rng(1000 + seed)
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = r.normal(0, 0.5, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            sd[k] = r.uniform(0.5, 2.0, v.shape).astype(np.float32)
        elif k.endswith("num_batches_tracked"):
            sd[k] = np.array(3, np.int64)
    last = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2][-1]
    sd[last] = sd[last] * np.float32(sharpen)
    m.load_state_dict(sd)
    return m


def twin(arch, km):
    tm = torch_ref.torch_mlp([12, 16, V]) if arch == "mlp" else torch_ref.torch_cnn(V, 1, 4)
    tm = tm.double()
    torch_ref.load_into_torch(tm, km.state_dict())
    return tm


def make_data(arch, seed=7):
    r = np.random.default_rng(seed)
    X = r.standard_normal((N, 12) if arch == "mlp" else (N, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, N).astype(np.int64)
    return X, y


def train_opts(steps=1):
    return dict(batch_size=N // steps, schedule=(0, LR, [], 0, 0.0, 0), shuffle=False, max_steps=steps)


def sgd(model):
    return kdcore.optim.SGD(lr=LR, momentum=MOM, weight_decay=WD).bind(model)


def torch_sgd(tm):
    return torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOM, weight_decay=WD)


def kl_T(z_target, z, T):
    """T^2 * batch-mean KL(softmax(z_target/T) || softmax(z/T))."""
    return TF.kl_div(TF.log_softmax(z / T, 1), TF.softmax(z_target / T, 1), reduction="batchmean") * T * T


def kl_q(q, z, T):
    return TF.kl_div(TF.log_softmax(z / T, 1), q, reduction="batchmean") * T * T


def torch_steps(trainable, X, y, steps, step_fn):
    """Runs `steps` SGD steps on consecutive batches. step_fn(x, y) returns (total loss,
    dict of reported terms as floats). Returns the per-step terms averaged over the steps."""
    opts = [torch_sgd(m) for m in trainable]
    for m in trainable:
        m.train()
    B = N // steps
    terms = []
    for s in range(steps):
        xb = torch.tensor(X[s * B:(s + 1) * B], dtype=torch.float64)
        yb = torch.tensor(y[s * B:(s + 1) * B])
        for o in opts:
            o.zero_grad()
        total, t = step_fn(xb, yb)
        total.backward()
        for o in opts:
            o.step()
        terms.append(t)
    return {k: float(np.mean([t[k] for t in terms], axis=0)) if np.ndim(terms[0][k]) == 0
            else np.mean([t[k] for t in terms], axis=0) for k in terms[0]}


def check_models(name, km, tm, before):
    """Parameter updates (after - before) and buffers of kdcore model km vs torch twin tm."""
    ksd = km.state_dict()
    tsd = torch_ref.to_numpy_state(tm)
    for k, v in ksd.items():
        want = tsd[k].reshape(v.shape)
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(want), f"{name}.{k}: kdcore {int(v)}, torch {int(want)}"
            continue
        b = before[k].astype(np.float64)
        d_k = v.astype(np.float64) - b
        d_t = want.astype(np.float64) - b
        # the update, relative to its scale, plus float32 rounding of the stored values
        atol = 1e-4 * np.abs(d_t).max() + 2.4e-7 * np.abs(b).max()
        check_close(f"{name}.{k} update", d_k, d_t, rtol=1e-4, atol=atol)


def check_stats(st, ref, keys, rtol=1e-4):
    for k in keys:
        check_close(f"stat {k}", st[k], ref[k], rtol=rtol, atol=1e-6)


ARCHS = ["mlp", "cnn"]


# ------------------------------------------------------------------------------------------
# offline distillation


def run_distill(arch, dopts, n_teachers=1, cached=False, steps=1, weights=None, y=None, sharpen=10.0):
    """Runs kdcore's distill_epoch on a fresh student and returns everything the torch side
    needs."""
    X, y0 = make_data(arch)
    y = y0 if y is None else y
    student = make_model(arch, 1)
    teachers = [make_model(arch, 10 + i, sharpen=sharpen) for i in range(n_teachers)]
    data = kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V)
    before = student.state_dict()
    t_before = [t.state_dict() for t in teachers]
    tw = None if weights is None else np.asarray(weights, np.float32)
    if cached:
        logits = [kdcore.training.predict(t, data) for t in teachers]
        st = _kdcore.distill_epoch(student.net, sgd(student), data._c, 0, train_opts(steps), dopts,
                                   teacher_logits=logits, teacher_weights=tw)
    else:
        st = _kdcore.distill_epoch(student.net, sgd(student), data._c, 0, train_opts(steps), dopts,
                                   teachers=[t.net for t in teachers], teacher_weights=tw)
    # teachers ran in eval mode: nothing of theirs changed
    for t, tb in zip(teachers, t_before):
        for k, v in t.state_dict().items():
            assert np.array_equal(v, tb[k]), f"teacher {k} changed"
    ts = twin(arch, student)
    torch_ref.load_into_torch(ts, before)
    tts = [twin(arch, t).eval() for t in teachers]
    return X, y, student, before, ts, tts, st


def teacher_logits_torch(tts, x):
    with torch.no_grad():
        return [t(x) for t in tts]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_distill_kd(arch, cached, steps):
    T, cw, kw = 4.0, 0.1, 0.9
    dopts = dict(kind=1, T=T, ce_weight=cw, kd_weight=kw)
    X, y, student, before, ts, tts, st = run_distill(arch, dopts, cached=cached, steps=steps)

    def step(x, yb):
        zt = teacher_logits_torch(tts, x)[0]
        zs = ts(x)
        ce, kd = TF.cross_entropy(zs, yb), kl_T(zt, zs, T)
        total = cw * ce + kw * kd
        return total, dict(loss=total.item(), ce=ce.item(), kd=kd.item())

    ref = torch_steps([ts], X, y, steps, step)
    check_models("student", student, ts, before)
    check_stats(st, ref, ["loss", "ce", "kd"])
    assert st["steps"] == steps and st["samples"] == N and abs(st["kd_weight"] - kw) < 1e-7


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_teacher_nets_equal_cached_logits(arch):
    dopts = dict(kind=1, T=4.0, ce_weight=0.1, kd_weight=0.9)
    _, _, s1, _, _, _, st1 = run_distill(arch, dopts, cached=False, steps=2)
    _, _, s2, _, _, _, st2 = run_distill(arch, dopts, cached=True, steps=2)
    for k, v in s1.state_dict().items():
        check_close(f"nets vs cached {k}", v, s2.state_dict()[k], rtol=1e-6, atol=1e-7)
    for k in ("loss", "ce", "kd", "accuracy", "teacher_accuracy"):
        check_close(f"nets vs cached {k}", st1[k], st2[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_dkd_with_warmup(arch):
    T, alpha, beta, warm = 4.0, 1.0, 8.0, 20
    dopts = dict(kind=2, T=T, ce_weight=1.0, kd_weight=1.0, dkd_alpha=alpha, dkd_beta=beta, warmup_epochs=warm)
    X, y, student, before, ts, tts, st = run_distill(arch, dopts)
    w = 1.0 / warm   # epoch 0 -> min((0 + 1) / 20, 1)
    assert abs(st["kd_weight"] - w) < 1e-7

    def step(x, yb):
        zt = teacher_logits_torch(tts, x)[0]
        zs = ts(x)
        gt = TF.one_hot(yb, V).bool()

        def b_logs(z):   # log (p_y, 1 - p_y), exact
            lp = TF.log_softmax(z / T, 1)
            return torch.cat([lp.gather(1, yb[:, None]),
                              torch.logsumexp(lp.masked_fill(gt, -np.inf), 1, keepdim=True)], 1)

        tckd = TF.kl_div(b_logs(zs), b_logs(zt), reduction="batchmean", log_target=True) * T * T
        ht = TF.softmax((zt / T).masked_fill(gt, -np.inf), 1)
        hs = TF.log_softmax((zs / T).masked_fill(gt, -np.inf), 1)
        nckd = (torch.where(gt, torch.zeros_like(ht), TF.kl_div(hs.masked_fill(gt, 0), ht, reduction="none"))
                .sum() / x.shape[0] * T * T)
        ce = TF.cross_entropy(zs, yb)
        kd = alpha * tckd + beta * nckd
        total = ce + w * kd
        return total, dict(loss=total.item(), ce=ce.item(), kd=kd.item(), tckd=tckd.item(), nckd=nckd.item())

    ref = torch_steps([ts], X, y, 1, step)
    check_models("student", student, ts, before)
    check_stats(st, ref, ["loss", "ce", "kd", "tckd", "nckd"])


@pytest.mark.parametrize("multi", ["avg_prob", "avg_loss"])
@pytest.mark.parametrize("arch", ARCHS)
def test_distill_multi_teacher(arch, multi):
    T, cw, kw = 4.0, 0.1, 0.9
    raw = np.array([1.0, 3.0, 2.0])          # the loop normalises the weights
    g = raw / raw.sum()
    dopts = dict(kind=1, T=T, ce_weight=cw, kd_weight=kw, multi=0 if multi == "avg_prob" else 1)
    X, y, student, before, ts, tts, st = run_distill(arch, dopts, n_teachers=3, weights=raw)

    def step(x, yb):
        zts = teacher_logits_torch(tts, x)
        zs = ts(x)
        if multi == "avg_prob":
            q = sum(gi * TF.softmax(z / T, 1) for gi, z in zip(g, zts))
            kd = kl_q(q, zs, T)
        else:
            kd = sum(gi * kl_T(z, zs, T) for gi, z in zip(g, zts))
        ce = TF.cross_entropy(zs, yb)
        total = cw * ce + kw * kd
        return total, dict(loss=total.item(), ce=ce.item(), kd=kd.item())

    ref = torch_steps([ts], X, y, 1, step)
    check_models("student", student, ts, before)
    check_stats(st, ref, ["loss", "ce", "kd"])


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_conditional(arch):
    """Teacher right -> ce CE + kd KD; wrong -> (ce + kd) CE and no KD."""
    T, cw, kw = 4.0, 0.1, 0.9
    X, y = make_data(arch)
    teacher = make_model(arch, 10, sharpen=10.0)
    zt_np = kdcore.training.predict(teacher, kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V))
    am = zt_np.argmax(1)
    y = np.where(np.arange(N) % 2 == 0, am, (am + 1) % V).astype(np.int64)   # right on even rows
    right = am == y
    assert right.sum() == N // 2
    dopts = dict(kind=1, T=T, ce_weight=cw, kd_weight=kw, conditional=True)
    _, _, student, before, ts, tts, st = run_distill(arch, dopts, y=y, cached=True)
    R = torch.tensor(right, dtype=torch.float64)

    def step(x, yb):
        zt = torch.tensor(zt_np, dtype=torch.float64)
        zs = ts(x)
        ce_i = TF.cross_entropy(zs, yb, reduction="none")
        kl_i = TF.kl_div(TF.log_softmax(zs / T, 1), TF.softmax(zt / T, 1), reduction="none").sum(1) * T * T
        total = ((cw + kw * (1 - R)) * ce_i + kw * R * kl_i).mean()
        return total, dict(loss=total.item(), kd=(R * kl_i).mean().item())

    ref = torch_steps([ts], X, y, 1, step)
    check_models("student", student, ts, before)
    # kd: the KD term with the teacher-wrong samples zeroed (still divided by N). The "ce"
    # stat under conditional learning is the per-sample-weighted CE, not checked here.
    check_stats(st, ref, ["loss", "kd"])
    assert st["teacher_accuracy"] == 0.5


def test_distill_conditional_reports_unweighted_ce():
    """kdcore.h: the stats' ce/kd are "unweighted terms" (without conditional, ce is the plain
    mean CE). With conditional=True the loop reports the per-sample-weighted CE
    (mean_i w_i CE_i with w_i = ce_weight or ce_weight + kd_weight) instead."""
    arch, T, cw, kw = "mlp", 4.0, 0.1, 0.9
    X, y = make_data(arch)
    teacher = make_model(arch, 10, sharpen=10.0)
    zt_np = kdcore.training.predict(teacher, kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V))
    am = zt_np.argmax(1)
    y = np.where(np.arange(N) % 2 == 0, am, (am + 1) % V).astype(np.int64)
    dopts = dict(kind=1, T=T, ce_weight=cw, kd_weight=kw, conditional=True)
    _, _, _, _, ts, _, st = run_distill(arch, dopts, y=y, cached=True)
    with torch.no_grad():
        ce = TF.cross_entropy(ts(torch.tensor(X, dtype=torch.float64)), torch.tensor(y)).item()
    check_close("stat ce (conditional)", st["ce"], ce, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_mse(arch):
    cw, kw = 1.0, 0.5
    dopts = dict(kind=3, ce_weight=cw, kd_weight=kw)
    X, y, student, before, ts, tts, st = run_distill(arch, dopts)

    def step(x, yb):
        zt = teacher_logits_torch(tts, x)[0]
        zs = ts(x)
        ce, kd = TF.cross_entropy(zs, yb), TF.mse_loss(zs, zt)
        total = cw * ce + kw * kd
        return total, dict(loss=total.item(), ce=ce.item(), kd=kd.item())

    ref = torch_steps([ts], X, y, 1, step)
    check_models("student", student, ts, before)
    check_stats(st, ref, ["loss", "ce", "kd"])


# ------------------------------------------------------------------------------------------
# deep mutual learning / online ensemble


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_mutual(arch, T, ensemble, steps):
    cw, kw = 1.0, 1.0
    X, y = make_data(arch)
    peers = [make_model(arch, 1, sharpen=3.0), make_model(arch, 2, sharpen=3.0)]
    data = kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V)
    before = [p.state_dict() for p in peers]
    sts = _kdcore.mutual_epoch([p.net for p in peers], [sgd(p) for p in peers], data._c, 0, train_opts(steps),
                               T=T, ce_weight=cw, kd_weight=kw, ensemble=ensemble)
    tps = [twin(arch, p) for p in peers]
    for tp, b in zip(tps, before):
        torch_ref.load_into_torch(tp, b)

    def step(x, yb):
        zs = [tp(x) for tp in tps]          # every peer's forward before any update
        total, terms = 0, {}
        for a, za in enumerate(zs):
            target = (zs[0] + zs[1]).detach() / 2 if ensemble else zs[1 - a].detach()
            ce, kd = TF.cross_entropy(za, yb), kl_T(target, za, T)
            la = cw * ce + kw * kd
            total = total + la
            terms.update({f"loss{a}": la.item(), f"ce{a}": ce.item(), f"kd{a}": kd.item()})
        return total, terms

    ref = torch_steps(tps, X, y, steps, step)
    for a in range(2):
        check_models(f"peer{a}", peers[a], tps[a], before[a])
        for k in ("loss", "ce", "kd"):
            check_close(f"peer{a} {k}", sts[a][k], ref[f"{k}{a}"], atol=1e-6)


# ------------------------------------------------------------------------------------------
# SLKD


def run_slkd(arch, sopts, steps=1, cached=False, n_sl=2):
    X, y = make_data(arch)
    student = make_model(arch, 1)
    sls = [make_model(arch, 21, sharpen=3.0), make_model(arch, 22, sharpen=3.0)][:n_sl]
    teacher = make_model(arch, 10, sharpen=10.0)
    data = kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V)
    before = student.state_dict()
    sl_before = [s.state_dict() for s in sls]
    t_before = teacher.state_dict()
    kw = (dict(teacher_logits=kdcore.training.predict(teacher, data)) if cached else dict(teacher=teacher.net))
    st = _kdcore.slkd_epoch(student.net, sgd(student), [s.net for s in sls], [sgd(s) for s in sls], data._c, 0,
                            train_opts(steps), sopts, **kw)
    for k, v in teacher.state_dict().items():
        assert np.array_equal(v, t_before[k]), f"teacher {k} changed"
    ts = twin(arch, student)
    torch_ref.load_into_torch(ts, before)
    tsl = [twin(arch, s) for s in sls]
    for t, b in zip(tsl, sl_before):
        torch_ref.load_into_torch(t, b)
    tt = twin(arch, teacher).eval()
    return X, y, (student, before, ts), list(zip(sls, sl_before, tsl)), tt, st


@pytest.mark.parametrize("variant", ["detached", "sl_grad", "fuse_probs", "cached", "one_sl", "one_sl_grad",
                                     "rho0.7", "rho0.7_sl_grad", "rho0.7_fuse_probs", "no_tau2", "no_tau2_sl_grad",
                                     "no_tau2_fuse_probs"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_slkd(arch, steps, variant):
    """Student: lam [a CE + (1-a) KD(T -> S)] + eta [a CE + (1-a) KD(sg(rho z1 + (1-rho) z2) -> S)];
    SL-T j: a CE + (1-a) KD(T -> SL_j); all forwards before the updates. sl_grad: the fused
    term's gradient also reaches the SL-Ts (through rho and 1 - rho). One SL-T: z_SL = z1.
    rho is 0.5 except in the rho0.7 variants, where z_1 and z_2 weigh differently, so that a
    swap of rho and 1 - rho in the C configuration changes the student's and the SL-Ts' steps.
    no_tau2 (slts_plain_kl): the student's SL-T term is the plain KL, written here without any
    T^2 (torch's kl_div), while L_TS and the SL-Ts' own terms keep T^2; with sl_grad the SL-Ts
    also receive that unscaled gradient."""
    T, a, lam, eta = 4.0, 0.1, 1.0, 3.0
    rho = 0.7 if variant.startswith("rho0.7") else 0.5
    n_sl = 1 if variant.startswith("one_sl") else 2
    sl_grad = variant in ("sl_grad", "one_sl_grad", "rho0.7_sl_grad", "no_tau2_sl_grad")
    fuse_probs = variant in ("fuse_probs", "rho0.7_fuse_probs", "no_tau2_fuse_probs")
    plain = variant.startswith("no_tau2")
    sopts = dict(T=T, alpha=a, eta=eta, rho=rho, fuse_probs=fuse_probs,
                 sl_grad=sl_grad, **{"lambda": lam}, **(dict(slts_plain_kl=True) if plain else {}))
    X, y, (student, before, ts), sls, tt, st = run_slkd(arch, sopts, steps, cached=variant == "cached", n_sl=n_sl)
    tsl = [t for _, _, t in sls]

    def step(x, yb):
        with torch.no_grad():
            zt = tt(x)
        z = [t(x) for t in tsl]                 # SL-T forwards before any update
        zs = ts(x)
        ce = TF.cross_entropy(zs, yb)
        l_ts = a * ce + (1 - a) * kl_T(zt, zs, T)
        if fuse_probs:
            q = (rho * TF.softmax(z[0] / T, 1) + (1 - rho) * TF.softmax(z[1] / T, 1)).detach()
        else:
            zsl = rho * z[0] + (1 - rho) * z[1] if n_sl == 2 else z[0]
            q = TF.softmax((zsl if sl_grad else zsl.detach()) / T, 1)
        kd_sl = TF.kl_div(TF.log_softmax(zs / T, 1), q, reduction="batchmean") * (1.0 if plain else T * T)
        l_slts = a * ce + (1 - a) * kd_sl
        l_student = lam * l_ts + eta * l_slts
        l_sl = [a * TF.cross_entropy(zj, yb) + (1 - a) * kl_T(zt, zj, T) for zj in z]
        total = l_student + sum(l_sl)
        return total, dict(loss=l_student.item(), loss_ts=l_ts.item(), loss_slts=l_slts.item(),
                           loss_sl=np.array([l.item() for l in l_sl] + [0.0] * (2 - n_sl)))

    ref = torch_steps([ts] + tsl, X, y, steps, step)
    check_models("student", student, ts, before)
    for j, (s, b, t) in enumerate(sls):
        check_models(f"sl{j}", s, t, b)
    check_stats(st, ref, ["loss", "loss_ts", "loss_slts"])
    check_close("loss_sl", np.array(st["loss_sl"]), ref["loss_sl"], atol=1e-6)


def test_slkd_cached_equals_teacher_net():
    sopts = dict(T=4.0, alpha=0.1, eta=3.0, rho=0.5, **{"lambda": 1.0})
    _, _, (s1, _, _), sl1, _, st1 = run_slkd("cnn", sopts, steps=2, cached=False)
    _, _, (s2, _, _), sl2, _, st2 = run_slkd("cnn", sopts, steps=2, cached=True)
    for (m1, m2) in [(s1, s2), (sl1[0][0], sl2[0][0]), (sl1[1][0], sl2[1][0])]:
        for k, v in m1.state_dict().items():
            check_close(f"nets vs cached {k}", v, m2.state_dict()[k], rtol=1e-6, atol=1e-7)
    check_close("loss", st1["loss"], st2["loss"], rtol=1e-6)
