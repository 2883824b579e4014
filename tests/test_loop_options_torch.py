"""The options of the C training loops (kd_distill_epoch, kd_mutual_epoch, kd_slkd_epoch,
kd_exits_epoch through kdcore._kdcore), each checked against an independent computation: one
step written in PyTorch on the same weights (float64, train-mode forwards, the scheme's loss,
torch.optim.SGD; the conventions and helpers of test_schemes_torch.py), or, for the random
options (DGKD's teacher drop, the student's input noise), an exact statistical check of
quantities recovered exactly from what the loop did.

test_schemes_torch.py covers each loop's default form; this file covers what an option
changes: label smoothing in every loop, the tolerant term, the warm-up ramp and kd_stop_epoch,
conditional learning with several teachers, per-teacher weights of DKD/MSE, learned gates,
DML with 3-4 peers, SLKD's rho / fusion / sl_grad / sl_lr_scale / frozen SL-teachers,
multi-exit with and without a teacher, the teacher drop and the student noise.
tests/mutation/mutate.py breaks each of these on purpose and checks that a test here fails.
"""
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_schemes_torch import (ARCHS, LR, MOM, N, V, WD, check_close, check_models, check_stats, kl_q,  # noqa: E402
                                kl_T, make_data, make_model, sgd, torch_sgd, train_opts, twin)

torch.set_num_threads(1)
F64 = torch.float64


# ------------------------------------------------------------------------------------------
# helpers


def dataset(X, y):
    return kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V)


def topts(steps=1, **kw):
    """Training options of test_schemes_torch (constant lr LR, no shuffle) plus kw."""
    return dict(train_opts(steps), **kw)


def ce(z, y, ls=0.0, reduction="mean"):
    return TF.cross_entropy(z, y, label_smoothing=ls, reduction=reduction)


def kl_rows(z_target, z, T):
    """T^2 KL(softmax(z_target/T) || softmax(z/T)) per row."""
    return TF.kl_div(TF.log_softmax(z / T, 1), TF.softmax(z_target / T, 1), reduction="none").sum(1) * T * T


def tolerant(z, K):
    """Seed 002 eq. 8's tolerant term: mean_i [z_(1) - mean(z_(2..K))] over the K largest logits."""
    top = torch.topk(z, K, dim=1).values
    return (top[:, 0] - top[:, 1:].mean(1)).mean()


def dkd_terms(zs, zt, y, T):
    """DKD's (TCKD, NCKD), each T^2-scaled and batch-averaged: KL of the binary (p_y, 1 - p_y)
    and KL of the distributions renormalised over the non-target classes."""
    gt = TF.one_hot(y, zs.shape[1]).bool()

    def parts(z):
        lp = TF.log_softmax(z / T, 1)
        binary = torch.cat([lp.gather(1, y[:, None]), torch.logsumexp(lp.masked_fill(gt, -np.inf), 1, keepdim=True)], 1)
        return binary, TF.log_softmax((z / T).masked_fill(gt, -np.inf), 1)

    (bs, hs), (bt, ht) = parts(zs), parts(zt)
    tckd = (bt.exp() * (bt - bs)).sum(1).mean() * T * T
    nckd = torch.where(gt, torch.zeros_like(ht), ht.exp() * (ht - hs)).sum(1).mean() * T * T
    return tckd, nckd


def torch_run(models, X, y, steps, step_fn, lrs=None):
    """`steps` SGD steps (test_schemes_torch's recipe; lrs: one lr per model) on consecutive
    batches of (X, y). step_fn(rows, x, y) -> (total loss, dict of reported terms); rows is
    the batch's slice of the dataset. Returns the terms averaged over the steps."""
    lrs = lrs or [LR] * len(models)
    opts = []
    for m, lr in zip(models, lrs):
        o = torch_sgd(m)
        o.param_groups[0]["lr"] = lr
        opts.append(o)
        m.train()
    B = N // steps
    terms = []
    for s in range(steps):
        rows = slice(s * B, (s + 1) * B)
        for o in opts:
            o.zero_grad()
        total, t = step_fn(rows, torch.tensor(X[rows], dtype=F64), torch.tensor(y[rows]))
        total.backward()
        for o in opts:
            o.step()
        terms.append(t)
    return {k: np.mean([t[k] for t in terms], axis=0) for k in terms[0]}


def run_distill(arch, dopts, n_teachers=1, logits=None, steps=1, epoch=0, weights=None, y=None, ls=0.0,
                gates=None):
    """kdcore's distill_epoch at `epoch` on a fresh student of `arch` (make_model(arch, 1)),
    label smoothing ls. The teachers' outputs are cached: `logits` (arrays) or the eval-mode
    logits of n_teachers sharpened models (test_schemes_torch checks that cached logits and
    teacher nets agree). Returns what the torch side needs: X, y, student, before (its
    weights), ts (its torch twin at `before`), zt (teacher logits, float64 tensors) and the
    loop's stats."""
    X, y0 = make_data(arch)
    y = y0 if y is None else np.asarray(y, np.int64)
    data = dataset(X, y)
    student = make_model(arch, 1)
    before = student.state_dict()
    if logits is None:
        logits = [kdcore.predict(make_model(arch, 10 + i, sharpen=10.0), data) for i in range(n_teachers)]
    tw = None if weights is None else np.asarray(weights, np.float32)
    st = _kdcore.distill_epoch(student.net, sgd(student), data._c, epoch, topts(steps, label_smoothing=ls), dopts,
                               teacher_logits=logits, teacher_weights=tw, gates=gates)
    ts = twin(arch, student)
    torch_ref.load_into_torch(ts, before)
    zt = [torch.tensor(z, dtype=F64) for z in logits]
    return SimpleNamespace(X=X, y=y, student=student, before=before, ts=ts, zt=zt, st=st)


def half_right_labels(z):
    """Labels on which argmax(z) is right on the even rows and wrong on the odd ones."""
    am = np.asarray(z).argmax(1)
    return np.where(np.arange(len(am)) % 2 == 0, am, (am + 1) % V).astype(np.int64)


def softmax_np(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def hoeffding(name, count, n, q, delta):
    """Fails when |count/n - q| >= t with 2 exp(-2 n t^2) = delta (Hoeffding): a correct
    Bernoulli(q) frequency fails with probability at most delta."""
    t = math.sqrt(math.log(2 / delta) / (2 * n))
    assert abs(count / n - q) < t, f"{name}: frequency {count}/{n} = {count / n:.4f}, expected {q:.4f} +- {t:.4f}"


# ------------------------------------------------------------------------------------------
# label smoothing in every loop


@pytest.mark.parametrize("variant", ["ce", "kd", "conditional", "avg_prob", "avg_loss"])
@pytest.mark.parametrize("arch", ARCHS)
def test_distill_label_smoothing(arch, variant):
    """The distillation loop's CE is F.cross_entropy(label_smoothing=eps) in plain training,
    KD, conditional learning (both the per-sample-weighted CE of the loss and the plain CE it
    reports) and with several teachers."""
    eps, T, cw, kw = 0.2, 4.0, 0.3, 0.7
    kind = 0 if variant == "ce" else 1
    dopts = dict(kind=kind, T=T, ce_weight=cw, kd_weight=kw, conditional=variant == "conditional",
                 multi=1 if variant == "avg_loss" else 0)
    n_t = {"ce": 0, "kd": 1, "conditional": 1}.get(variant, 3)
    raw = np.array([1.0, 3.0, 2.0]) if n_t == 3 else None
    y = None
    if variant == "conditional":
        X, y0 = make_data(arch)
        y = half_right_labels(kdcore.predict(make_model(arch, 10, sharpen=10.0), dataset(X, y0)))
    r = run_distill(arch, dopts, n_teachers=n_t, weights=raw, y=y, ls=eps,
                    logits=[] if n_t == 0 else None)
    g = None if raw is None else raw / raw.sum()

    def step(rows, x, yb):
        zs = r.ts(x)
        c = ce(zs, yb, eps)
        zt = [z[rows] for z in r.zt]
        if variant == "ce":
            return cw * c, dict(loss=cw * c.item(), ce=c.item(), kd=0.0)
        if variant == "conditional":
            R = torch.tensor(zt[0].argmax(1).numpy() == yb.numpy(), dtype=F64)
            kl = kl_rows(zt[0], zs, T)
            total = ((cw + kw * (1 - R)) * ce(zs, yb, eps, "none") + kw * R * kl).mean()
            return total, dict(loss=total.item(), ce=c.item(), kd=(R * kl).mean().item())
        if variant == "avg_prob":
            kd = kl_q(sum(gi * TF.softmax(z / T, 1) for gi, z in zip(g, zt)), zs, T)
        elif variant == "avg_loss":
            kd = sum(gi * kl_T(z, zs, T) for gi, z in zip(g, zt))
        else:
            kd = kl_T(zt[0], zs, T)
        total = cw * c + kw * kd
        return total, dict(loss=total.item(), ce=c.item(), kd=kd.item())

    ref = torch_run([r.ts], r.X, r.y, 1, step)
    check_models("student", r.student, r.ts, r.before)
    check_stats(r.st, ref, ["loss", "ce", "kd"])


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("k", [3, 4])
def test_mutual_k_peers(k, ensemble, ls):
    """DML with k peers: peer a minimises ce_weight CE_eps + kd_weight mean_{b != a}
    T^2 KL(sg(p_b^T) || p_a^T) (the KD weight split over the k - 1 others, which only shows
    from 3 peers on); ensemble: the target is the detached mean of all k peers' logits. Label
    smoothing eps in the CE. Every peer's update and reported ce/kd/loss."""
    T, cw, kw = 2.0, 0.6, 1.5
    X, y = make_data("mlp")
    peers = [make_model("mlp", 1 + a, sharpen=3.0) for a in range(k)]
    data = dataset(X, y)
    before = [p.state_dict() for p in peers]
    sts = _kdcore.mutual_epoch([p.net for p in peers], [sgd(p) for p in peers], data._c, 0,
                               topts(label_smoothing=ls), T=T, ce_weight=cw, kd_weight=kw, ensemble=ensemble)
    tps = [twin("mlp", p) for p in peers]
    for tp, b in zip(tps, before):
        torch_ref.load_into_torch(tp, b)

    def step(rows, x, yb):
        zs = [tp(x) for tp in tps]
        total, terms = 0, {}
        for a, za in enumerate(zs):
            if ensemble:
                kd = kl_T((sum(zs) / k).detach(), za, T)
            else:
                kd = sum(kl_T(zb.detach(), za, T) for b, zb in enumerate(zs) if b != a) / (k - 1)
            c = ce(za, yb, ls)
            la = cw * c + kw * kd
            total = total + la
            terms.update({f"loss{a}": la.item(), f"ce{a}": c.item(), f"kd{a}": kd.item()})
        return total, terms

    ref = torch_run(tps, X, y, 1, step)
    for a in range(k):
        check_models(f"peer{a}", peers[a], tps[a], before[a])
        for key in ("loss", "ce", "kd"):
            check_close(f"peer{a} {key}", sts[a][key], ref[f"{key}{a}"], atol=1e-6)


# SLKD variants: options of kd_slkd_cfg (rho, fuse_probs, sl_grad, sl_lr_scale, sl_frozen, n_sl,
# slts_plain_kl, T) and the training option label_smoothing.
SLKD_VARIANTS = {
    "rho": dict(rho=0.3),
    "rho_probs": dict(rho=0.3, fuse_probs=True),
    "rho_sl_grad": dict(rho=0.3, sl_grad=True),
    "label_smoothing": dict(ls=0.2),
    "one_sl_label_smoothing": dict(ls=0.2, n_sl=1),
    "sl_lr_scale": dict(sl_lr_scale=0.4),
    "frozen": dict(sl_frozen=True),
    # SLKD*'s phase 2 without T^2 on the SL-teacher term, at a T whose 1/T^2 is not a power of 2
    "frozen_no_tau2": dict(sl_frozen=True, slts_plain_kl=True, T=3.0),
}


@pytest.mark.parametrize("variant", list(SLKD_VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_slkd_options(arch, variant):
    """One SLKD step with an option set: student lam [a CE_eps + (1-a) KD(T -> S)] +
    eta [a CE_eps + (1-a) KD(sg(z_SL) -> S)], z_SL = rho z_1 + (1 - rho) z_2 (fuse_probs: the
    softened probabilities fused with rho); SL-T j: a CE_eps + (1-a) KD(T -> SL_j), stepping
    with lr * sl_lr_scale; sl_grad: the fused term's gradient reaches the SL-Ts (shares rho,
    1 - rho); sl_frozen: the SL-Ts run in eval mode and do not change; slts_plain_kl: the
    second KD is the plain KL (no T^2). A swap of rho and 1 - rho, a dropped eps or a dropped
    lr scale fails here."""
    o = SLKD_VARIANTS[variant]
    T, a, lam, eta = o.get("T", 4.0), 0.2, 1.0, 2.0
    rho, ls, n_sl = o.get("rho", 0.5), o.get("ls", 0.0), o.get("n_sl", 2)
    frozen, scale = o.get("sl_frozen", False), o.get("sl_lr_scale", 0.0)
    sopts = dict(T=T, alpha=a, eta=eta, rho=rho, fuse_probs=o.get("fuse_probs", False), sl_grad=o.get("sl_grad", False),
                 sl_frozen=frozen, sl_lr_scale=scale, slts_plain_kl=o.get("slts_plain_kl", False), **{"lambda": lam})
    X, y = make_data(arch)
    data = dataset(X, y)
    student = make_model(arch, 1)
    sls = [make_model(arch, 21 + j, sharpen=3.0) for j in range(n_sl)]
    teacher = make_model(arch, 10, sharpen=10.0)
    before, sl_before = student.state_dict(), [s.state_dict() for s in sls]
    st = _kdcore.slkd_epoch(student.net, sgd(student), [s.net for s in sls], None if frozen else [sgd(s) for s in sls],
                            data._c, 0, topts(label_smoothing=ls), sopts, teacher=teacher.net)
    ts = twin(arch, student)
    torch_ref.load_into_torch(ts, before)
    tsl = [torch_ref.load_into_torch(twin(arch, s), b) for s, b in zip(sls, sl_before)]
    tt = twin(arch, teacher).eval()

    def step(rows, x, yb):
        with torch.no_grad():
            zt = tt(x)
        if frozen:
            with torch.no_grad():
                z = [t.eval()(x) for t in tsl]
        else:
            z = [t(x) for t in tsl]
        zs = ts(x)
        c = ce(zs, yb, ls)
        l_ts = a * c + (1 - a) * kl_T(zt, zs, T)
        if o.get("fuse_probs"):
            q = rho * TF.softmax(z[0] / T, 1) + (1 - rho) * TF.softmax(z[1] / T, 1)
            kd_sl = kl_q(q.detach(), zs, T)
        else:
            zsl = rho * z[0] + (1 - rho) * z[1] if n_sl == 2 else z[0]
            kd_sl = kl_T(zsl if o.get("sl_grad") else zsl.detach(), zs, T)
        if o.get("slts_plain_kl"):
            kd_sl = kd_sl / (T * T)
        l_slts = a * c + (1 - a) * kd_sl
        l_student = lam * l_ts + eta * l_slts
        l_sl = [a * ce(zj, yb, ls) + (1 - a) * kl_T(zt, zj, T) for zj in z]
        total = l_student + (0 if frozen else sum(l_sl))
        return total, dict(loss=l_student.item(), loss_ts=l_ts.item(), loss_slts=l_slts.item(),
                           loss_sl=np.array([lj.item() for lj in l_sl] + [0.0] * (2 - n_sl)))

    trained = [ts] + ([] if frozen else tsl)
    ref = torch_run(trained, X, y, 1, step, lrs=[LR] + [LR * (scale or 1.0)] * (len(trained) - 1))
    check_models("student", student, ts, before)
    check_stats(st, ref, ["loss", "loss_ts", "loss_slts"])
    if frozen:
        for j, (s, b) in enumerate(zip(sls, sl_before)):
            for k, v in s.state_dict().items():
                assert np.array_equal(v, b[k]), f"frozen sl{j}.{k} changed"
    else:
        for j, (s, b, t) in enumerate(zip(sls, sl_before, tsl)):
            check_models(f"sl{j}", s, t, b)
        check_close("loss_sl", np.array(st["loss_sl"]), ref["loss_sl"], atol=1e-6)


def multi_exit_net():
    """An MLP backbone (64-16-12-4) with a linear exit on each hidden ReLU."""
    base = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(64, 16), kdcore.nn.ReLU(),
                                kdcore.nn.Linear(16, 12), kdcore.nn.ReLU(), kdcore.nn.Linear(12, 4))
    return kdcore.nn.MultiExit(base, {"2": kdcore.nn.Linear(16, 4), "4": kdcore.nn.Linear(12, 4)})


def multi_exit_torch(P, x):
    """The exits (shallow to deep, the output last) of multi_exit_net with parameters P."""
    h1 = torch.relu(x @ P["1.weight"].T + P["1.bias"])
    h2 = torch.relu(h1 @ P["3.weight"].T + P["3.bias"])
    return [h1 @ P["exits.2.weight"].T + P["exits.2.bias"], h2 @ P["exits.4.weight"].T + P["exits.4.bias"],
            h2 @ P["5.weight"].T + P["5.bias"]]


def multi_exit_data():
    r = np.random.default_rng(3)
    return r.standard_normal((N, 1, 8, 8)).astype(np.float32), r.integers(0, V, N).astype(np.int64)


def multi_exit_loss(outs, yb, zt, T, cw, kw, ls):
    """Self-distillation (zt None): CE_eps at the output + sum over the shallow exits of
    cw CE_eps + kw T^2 KL(sg(p_out^T) || p_k^T). With a teacher (Wang & Yoon's review, eq. 9): the mean over
    all exits, output included, of cw CE_eps + kw T^2 KL(p_t^T || p_k^T). Returns the total
    and the output exit's (ce, kd)."""
    if zt is None:
        total = ce(outs[-1], yb, ls)
        for e in outs[:-1]:
            total = total + cw * ce(e, yb, ls) + kw * kl_T(outs[-1].detach(), e, T)
        return total, ce(outs[-1], yb, ls), torch.tensor(0.0)
    terms = [cw * ce(e, yb, ls) + kw * kl_T(zt, e, T) for e in outs]
    return sum(terms) / len(outs), ce(outs[-1], yb, ls), kl_T(zt, outs[-1], T)


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("teacher", [None, "logits", "net"])
def test_multi_exit(teacher, ls):
    """One step of kd_exits_epoch on a three-exit net: without a teacher the summed deep
    supervision, with one the 1/n_exits-scaled eq. 9 (cached logits or the teacher net), with
    label smoothing eps in every exit's CE. The update of every parameter, loss, ce and kd."""
    T, cw, kw = 3.0, 0.4, 0.6
    m = multi_exit_net()
    X, y = multi_exit_data()
    data = dataset(X, y)
    sd = {k: torch.tensor(v, dtype=F64) for k, v in m.state_dict().items()}
    t_kw, zt = {}, None
    if teacher is not None:
        tm = kdcore.models.mlp([64, 32, V], seed=5)
        zt_np = kdcore.predict(tm, data)
        zt = torch.tensor(zt_np, dtype=F64)
        t_kw = dict(teacher_logits=zt_np) if teacher == "logits" else dict(teacher=tm.net)
    opt = sgd(m)
    st, _ = _kdcore.exits_epoch(m.net, opt, list(m.exit_nodes) + [m.output_node], data._c, 0,
                                topts(label_smoothing=ls), T=T, ce_weight=cw, kd_weight=kw, **t_kw)
    P = {k: v.clone().requires_grad_() for k, v in sd.items()}
    o = torch.optim.SGD(P.values(), lr=LR, momentum=MOM, weight_decay=WD)
    outs = multi_exit_torch(P, torch.tensor(X, dtype=F64).reshape(N, -1))
    total, c, kd = multi_exit_loss(outs, torch.tensor(y), zt, T, cw, kw, ls)
    total.backward()
    o.step()
    new = m.state_dict()
    for k, p in P.items():
        d_t = p.detach().numpy() - sd[k].numpy()
        check_close(f"{k} update", new[k] - sd[k].numpy(), d_t, atol=1e-4 * np.abs(d_t).max() + 1e-7)
    check_stats(st, dict(loss=total.item(), ce=c.item(), kd=kd.item()), ["loss", "ce", "kd"])


# ------------------------------------------------------------------------------------------
# distillation options: tolerant term, warm-up ramp, kd_stop_epoch, conditional with several
# teachers, per-teacher weights, learned gates


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("kind", ["ce", "kd"])
def test_distill_tolerant(kind, K):
    """tolerant=(w, K) adds w * mean_i [z_(1) - mean(z_(2..K))] over the student's K largest
    logits (Wang & Yoon's review, eq. 8), on its own (BAN's generation 0) or with KD; the loss and the
    reported tolerant term."""
    T, cw, kw, w = 4.0, 0.3, 0.7, 0.5
    dopts = dict(kind=0 if kind == "ce" else 1, T=T, ce_weight=cw, kd_weight=kw, tolerant_weight=w, tolerant_k=K)
    r = run_distill("mlp", dopts, n_teachers=0 if kind == "ce" else 1, logits=[] if kind == "ce" else None)

    def step(rows, x, yb):
        zs = r.ts(x)
        tol = tolerant(zs, K)
        total = cw * ce(zs, yb) + w * tol + (kw * kl_T(r.zt[0][rows], zs, T) if kind == "kd" else 0)
        return total, dict(loss=total.item(), tolerant=tol.item())

    ref = torch_run([r.ts], r.X, r.y, 1, step)
    check_models("student", r.student, r.ts, r.before)
    check_stats(r.st, ref, ["loss", "tolerant"])


# (epoch, warmup_epochs, kd_stop_epoch, effective KD weight factor): the ramp
# min((epoch + 1) / warmup, 1) and the stop from kd_stop_epoch (0-based) on.
WEIGHT_BY_EPOCH = [(0, 4, 0, 0.25), (2, 4, 0, 0.75), (3, 4, 0, 1.0), (6, 4, 0, 1.0),
                   (1, 0, 2, 1.0), (2, 0, 2, 0.0), (3, 0, 2, 0.0), (1, 4, 2, 0.5), (2, 4, 2, 0.0)]


@pytest.mark.parametrize("epoch,warmup,stop,factor", WEIGHT_BY_EPOCH)
@pytest.mark.parametrize("form", ["kd", "mse", "conditional"])
def test_distill_weight_by_epoch(form, epoch, warmup, stop, factor):
    """At epoch e the distillation term weighs kd_weight * min((e + 1) / warmup_epochs, 1),
    and 0 from kd_stop_epoch on; under conditional learning the weight moved to CE where the
    teacher is wrong is that effective weight. One step at epoch e vs torch, and the reported
    kd_weight."""
    T, cw, kw = 4.0, 0.3, 0.8
    w = kw * factor
    kind = 3 if form == "mse" else 1
    dopts = dict(kind=kind, T=T, ce_weight=cw, kd_weight=kw, warmup_epochs=warmup, kd_stop_epoch=stop,
                 conditional=form == "conditional")
    y = None
    if form == "conditional":
        X, y0 = make_data("mlp")
        y = half_right_labels(kdcore.predict(make_model("mlp", 10, sharpen=10.0), dataset(X, y0)))
    r = run_distill("mlp", dopts, epoch=epoch, y=y)

    def step(rows, x, yb):
        zs, zt = r.ts(x), r.zt[0][rows]
        if form == "conditional":
            R = torch.tensor(zt.argmax(1).numpy() == yb.numpy(), dtype=F64)
            total = ((cw + w * (1 - R)) * ce(zs, yb, reduction="none") + w * R * kl_rows(zt, zs, T)).mean()
        else:
            kd = TF.mse_loss(zs, zt) if form == "mse" else kl_T(zt, zs, T)
            total = cw * ce(zs, yb) + w * kd
        return total, dict(loss=total.item())

    ref = torch_run([r.ts], r.X, r.y, 1, step)
    check_models("student", r.student, r.ts, r.before)
    check_stats(r.st, ref, ["loss"])
    assert r.st["kd_weight"] == pytest.approx(w, rel=1e-6, abs=1e-9)


def conditional_teachers():
    """Two teachers' cached logits and labels for conditional learning with several teachers:
    the mixture sum_t g_t softmax(z_t) (T = 1) with g = (0.25, 0.75) is right on the even rows,
    wrong on the odd ones, and on some rows that differs from teacher 0 alone, from the
    mixture at T = 4 and from the uniform mixture (preconditions asserted)."""
    r = np.random.default_rng(2)
    Z = [r.normal(0, 2.5, (N, V)).astype(np.float32) for _ in range(2)]
    g = np.array([0.25, 0.75])

    def mix(T, w):
        return sum(wi * softmax_np(z, T) for wi, z in zip(w, Z))

    y = half_right_labels(mix(1.0, g))
    R = mix(1.0, g).argmax(1) == y
    assert R.sum() == N // 2
    for other in (Z[0], mix(4.0, g), mix(1.0, [0.5, 0.5])):
        assert np.any((np.asarray(other).argmax(1) == y) != R)
    return Z, y, g, R


@pytest.mark.parametrize("multi", ["avg_prob", "avg_loss"])
def test_distill_conditional_several_teachers(multi):
    """Conditional learning with two weighted teachers: "the teacher is right" means the argmax
    of the g-weighted mixture of the teachers' softmax outputs at T = 1 is the label; where it
    is wrong the KD weight moves to CE. One step vs torch, and teacher_accuracy is the
    mixture's."""
    T, cw, kw = 4.0, 0.3, 0.7
    Z, y, g, R_np = conditional_teachers()
    dopts = dict(kind=1, T=T, ce_weight=cw, kd_weight=kw, conditional=True, multi=0 if multi == "avg_prob" else 1)
    r = run_distill("mlp", dopts, logits=Z, y=y, weights=[1.0, 3.0])
    R = torch.tensor(R_np, dtype=F64)

    def step(rows, x, yb):
        zs = r.ts(x)
        if multi == "avg_prob":
            q = sum(gi * TF.softmax(z / T, 1) for gi, z in zip(g, r.zt))
            kl = TF.kl_div(TF.log_softmax(zs / T, 1), q, reduction="none").sum(1) * T * T
        else:
            kl = sum(gi * kl_rows(z, zs, T) for gi, z in zip(g, r.zt))
        total = ((cw + kw * (1 - R)) * ce(zs, yb, reduction="none") + kw * R * kl).mean()
        return total, dict(loss=total.item(), kd=(R * kl).mean().item())

    ref = torch_run([r.ts], r.X, y, 1, step)
    check_models("student", r.student, r.ts, r.before)
    check_stats(r.st, ref, ["loss", "kd"])
    assert r.st["teacher_accuracy"] == pytest.approx(R_np.mean())


@pytest.mark.parametrize("kind", ["dkd", "mse"])
def test_distill_avg_loss_teacher_weights(kind):
    """Several teachers with the per-teacher-loss form: kd_weight * sum_t g_t (term_t) with g
    the normalised teacher_weights, for DKD (alpha TCKD + beta NCKD; tckd/nckd reported
    g-weighted) and logit MSE."""
    T, cw, kw, al, be = 4.0, 0.5, 0.6, 1.0, 2.0
    raw = np.array([1.0, 3.0, 2.0])
    g = raw / raw.sum()
    dopts = dict(kind=2 if kind == "dkd" else 3, T=T, ce_weight=cw, kd_weight=kw, dkd_alpha=al, dkd_beta=be, multi=1)
    r = run_distill("cnn", dopts, n_teachers=3, weights=raw)

    def step(rows, x, yb):
        zs = r.ts(x)
        terms = dict(tckd=0.0, nckd=0.0)
        kd = 0
        for gi, z in zip(g, r.zt):
            if kind == "dkd":
                tc, nc = dkd_terms(zs, z[rows], yb, T)
                kd = kd + gi * (al * tc + be * nc)
                terms["tckd"] += gi * tc.item()
                terms["nckd"] += gi * nc.item()
            else:
                kd = kd + gi * TF.mse_loss(zs, z[rows])
        total = cw * ce(zs, yb) + kw * kd
        return total, dict(terms, loss=total.item(), kd=kd.item())

    ref = torch_run([r.ts], r.X, r.y, 1, step)
    check_models("student", r.student, r.ts, r.before)
    check_stats(r.st, ref, ["loss", "kd", "tckd", "nckd"])


def gate_step_torch(ts, x, yb, zt, gates, kept, T, cw, kdw, wk=None, w_ce=None):
    """The student's loss with learned gates and its gradient w.r.t. the gates of the kept
    teachers: weights softmax(gates[kept]), q = sum_t w_t softmax(z_t/T), student loss
    cw CE + kdw T^2 mean_i wk_i KL(q_i || p_s,i) (q detached; w_ce replaces cw per sample under
    conditional learning), gate loss the same KD term with the student's logits detached.
    Returns (student total, gate gradient over `kept`)."""
    g = torch.tensor(gates[kept], dtype=F64, requires_grad=True)
    w = torch.softmax(g, 0)
    q = sum(wi * TF.softmax(zt[t] / T, 1) for wi, t in zip(w, kept))
    zs = ts(x)
    wk = torch.ones(len(yb), dtype=F64) if wk is None else wk

    def kd_of(zs_, q_):
        return (wk * TF.kl_div(TF.log_softmax(zs_ / T, 1), q_, reduction="none").sum(1)).mean() * T * T

    (grad,) = torch.autograd.grad(kdw * kd_of(zs.detach(), q), g)
    c = ce(zs, yb).mul(cw) if w_ce is None else (w_ce * ce(zs, yb, reduction="none")).mean()
    return c + kdw * kd_of(zs, q.detach()), grad.numpy()


@pytest.mark.parametrize("variant", ["plain", "conditional_warmup", "teacher_drop"])
def test_learned_gates_vs_autograd(variant):
    """Learned gates (eq. 24): the student learns from q = sum_t softmax(gates)_t P_t, and the
    gates take one SGD step of gate_lr on the KD loss, whose gradient is torch autograd's
    through softmax(gates). conditional_warmup: per-sample KD weights (teacher mixture right)
    and the warm-up's effective weight enter both. teacher_drop: only the kept teachers' gates
    move, with the gradient of the softmax over the kept gates; the kept set (two of three,
    the first epoch where that happens) is read from which gates moved and confirmed by the
    student's update."""
    T, cw, kw, glr = 3.0, 0.2, 0.8, 2.0
    X, y0 = make_data("mlp")
    teachers = [make_model("mlp", 10 + i, sharpen=10.0) for i in range(3)]
    Z = [kdcore.predict(t, dataset(X, y0)) for t in teachers]
    gates0 = np.array([0.3, -0.2, 0.1], np.float32)
    w0 = softmax_np(gates0[None])[0]
    y, warm, drop = y0, 0, 0.0
    if variant == "conditional_warmup":
        warm = 2
        y = half_right_labels(sum(wi * softmax_np(z) for wi, z in zip(w0, Z)))
    if variant == "teacher_drop":
        drop = 0.5
    dopts = dict(kind=1, T=T, ce_weight=cw, kd_weight=kw, gate_lr=glr, conditional=variant == "conditional_warmup",
                 warmup_epochs=warm, teacher_drop=drop)
    kdw = kw / warm if warm else kw
    for epoch in range(40):
        gates = gates0.copy()
        r = run_distill("mlp", dopts, logits=Z, y=y, gates=gates, epoch=epoch)
        moved = [t for t in range(3) if gates[t] != gates0[t]]
        if variant != "teacher_drop" or len(moved) == 2:
            break
    kept = moved if variant == "teacher_drop" else [0, 1, 2]
    assert len(kept) >= 2, f"gates moved: {moved}"
    wk = w_ce = None
    if variant == "conditional_warmup":
        right = sum(wi * softmax_np(z) for wi, z in zip(w0, Z)).argmax(1) == y
        wk = torch.tensor(right, dtype=F64)
        w_ce = cw + kdw * (1 - wk)
    x, yb = torch.tensor(r.X, dtype=F64), torch.tensor(y)
    opt = torch_sgd(r.ts)
    total, grad = gate_step_torch(r.ts.train(), x, yb, r.zt, gates0.astype(np.float64), kept, T, cw, kdw, wk, w_ce)
    total.backward()
    opt.step()
    check_models("student", r.student, r.ts, r.before)
    check_close("gates", gates[kept], gates0[kept] - glr * grad, rtol=1e-4, atol=1e-4 * np.abs(glr * grad).max())
    assert all(gates[t] == gates0[t] for t in range(3) if t not in kept)


def test_learned_gates_start_from_teacher_weights():
    """kdcore.distill(learn_gates=True, teacher_weights=w): the gates start at log(w) and the
    epoch's logged teacher_weights are softmax of the gates after the step (torch autograd)."""
    T, glr = 3.0, 1.0
    X, y = make_data("mlp")
    data = dataset(X, y)
    teachers = [make_model("mlp", 10 + i, sharpen=10.0) for i in range(3)]
    student = make_model("mlp", 1)
    before = student.state_dict()
    w0 = np.array([0.2, 0.5, 0.3])
    h = kdcore.distill(student, teachers, data, epochs=1, batch_size=N, max_steps=1, T=T, learn_gates=True,
                       gate_lr=glr, teacher_weights=w0, progress=False,
                       optimizer=kdcore.optim.SGD(lr=LR, momentum=MOM, weight_decay=WD))
    ts = twin("mlp", student)
    torch_ref.load_into_torch(ts, before)
    zt = [torch.tensor(kdcore.predict(t, data), dtype=F64) for t in teachers]
    opt = torch_sgd(ts)
    gates0 = np.log(w0)
    total, grad = gate_step_torch(ts.train(), torch.tensor(X, dtype=F64), torch.tensor(y), zt, gates0, [0, 1, 2], T,
                                  0.1, 0.9)
    total.backward()
    opt.step()
    check_models("student", student, ts, before)
    check_close("teacher_weights", h["teacher_weights"][0], softmax_np((gates0 - glr * grad)[None])[0], rtol=1e-5)


# ------------------------------------------------------------------------------------------
# random options: exact statistical checks


def drop_steps(p, levels, n, epoch=0):
    """Runs n one-sample steps of MSE distillation (per-teacher-loss form, CE weight 0, lr 0)
    from len(levels) teachers whose cached logits are the constant sqrt(level), with
    teacher_drop=p, into a student whose logits are 0 (zero weights): a step's loss is then
    the mean of `levels` over the kept teachers. Returns the kept set of every step, decoded
    from the per-step losses reported to the progress callback (a loss matching no non-empty
    set fails)."""
    X = np.zeros((n, 2), np.float32)
    y = np.zeros(n, np.int64)
    data = dataset(X, y)
    student = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(2, V))
    student.load_state_dict({k: np.zeros_like(v) for k, v in student.state_dict().items()})
    c = np.sqrt(np.asarray(levels, np.float64)).astype(np.float32)
    logits = [np.full((n, V), ci, np.float32) for ci in c]
    sums = []
    opts = dict(batch_size=1, schedule=(0, 0.0, [], 0, 0.0, 0), shuffle=False, callback_every=1,
                callback=lambda *a: sums.append(a[3]) and False)
    _kdcore.distill_epoch(student.net, kdcore.optim.SGD(lr=0.0).bind(student), data._c, epoch, opts,
                          dict(kind=3, ce_weight=0.0, kd_weight=1.0, multi=1, teacher_drop=p), teacher_logits=logits)
    assert len(sums) == n
    losses = np.diff(np.concatenate([[0.0], sums]))
    sq = c.astype(np.float64) ** 2
    subsets = [tuple(t for t in range(len(c)) if m >> t & 1) for m in range(1, 2 ** len(c))]
    means = np.array([sq[list(s)].mean() for s in subsets])
    kept = []
    for i, l in enumerate(losses):
        j = int(np.argmin(np.abs(means - l)))
        assert abs(means[j] - l) <= 1e-5 * means[j], f"step {i}: loss {l} is the mean over no non-empty set of teachers"
        kept.append(subsets[j])
    return kept


def test_teacher_drop_rate():
    """DGKD's drop: each of 3 teachers is dropped independently with probability p = 0.25 at
    every step (at least one kept: when all three are dropped, one of them, uniformly, is kept).
    Over 4000 steps, every kept set's frequency and every teacher's drop rate are within
    Hoeffding bounds of their exact probabilities (total false-failure probability < 1e-6).
    Dropping with probability 1 - p, or one draw for all teachers, fails by far."""
    p, n = 0.25, 4000
    kept = drop_steps(p, [1.0, 10.0, 100.0], n)
    delta = 1e-7
    for t in range(3):
        q_drop = p - p ** 3 / 3
        hoeffding(f"teacher {t} dropped", sum(t not in s for s in kept), n, q_drop, delta)
    for s in sorted(set(kept) | {(0,), (0, 1), (0, 1, 2)}, key=len):
        m = len(s)
        q = (1 - p) ** m * p ** (3 - m) + (p ** 3 / 3 if m == 1 else 0.0)
        hoeffding(f"kept set {s}", kept.count(s), n, q, delta)
    # the draws change from epoch to epoch too
    assert drop_steps(p, [1.0, 10.0, 100.0], 200, epoch=1) != kept[:200]


def test_teacher_drop_keeps_one():
    """With two teachers and p = 0.9 both are dropped in 81% of the steps; then one of them,
    chosen uniformly, is kept: each teacher alone in 0.9 * 0.1 + 0.81 / 2 of the steps, both in
    1%. No step without a teacher (its loss would be 0: decoding fails)."""
    p, n = 0.9, 4000
    kept = drop_steps(p, [1.0, 100.0], n)
    for s, q in [((0,), p * (1 - p) + p * p / 2), ((1,), p * (1 - p) + p * p / 2), ((0, 1), (1 - p) ** 2)]:
        hoeffding(f"kept set {s}", kept.count(s), n, q, 1e-7)


def chi2_bounds(M, delta):
    """[lo, hi] holding a chi-square variable with M degrees of freedom with probability at
    least 1 - 2 delta (Laurent & Massart 2000: P(X - M >= 2 sqrt(M x) + 2x) <= e^-x and
    P(M - X >= 2 sqrt(M x)) <= e^-x, x = log(1/delta))."""
    x = math.log(1 / delta)
    return M - 2 * math.sqrt(M * x), M + 2 * math.sqrt(M * x) + 2 * x


def test_student_noise_exact():
    """student_noise=s: the student sees x + s * N(0, 1) noise, the teacher the clean x. A
    student Linear(D, V) with zero weights (logits 0, so p_s uniform), batch 1, plain SGD: the
    bias moves by -lr * g with g = cw (p_s - onehot(y)) + kw T (p_s^T - p_t^T), which is
    checked against g from the clean teacher's logits (a teacher seeing the noise gives other
    logits), and the weight row k by -lr * g_k (x + noise), which recovers the D = 4096 noise
    values exactly. Their sum of squares / s^2 is within chi-square bounds (false failure
    < 1e-6), their mean within a Gaussian bound; a doubled (or halved) noise fails by far.
    Another epoch's step draws other noise."""
    D, s, T, cw, kw = 4096, 0.5, 2.0, 0.5, 0.5
    r = np.random.default_rng(4)
    X = r.standard_normal((1, D)).astype(np.float32)
    y = np.array([2], np.int64)
    data = dataset(X, y)
    teacher = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(D, V))
    tsd = {"1.weight": r.normal(0, 1 / math.sqrt(D), (V, D)).astype(np.float32),
           "1.bias": r.normal(0, 1, V).astype(np.float32)}
    teacher.load_state_dict(tsd)
    x = X[0].astype(np.float64)
    zt = tsd["1.weight"].astype(np.float64) @ x + tsd["1.bias"]
    g = cw * (1 / V - np.eye(V)[y[0]]) + kw * T * (1 / V - softmax_np(zt[None], T)[0])
    noises = []
    for epoch in (0, 1):
        student = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(D, V))
        student.load_state_dict({k: np.zeros_like(v) for k, v in student.state_dict().items()})
        opt = kdcore.optim.SGD(lr=LR, momentum=0.0, weight_decay=0.0).bind(student)
        _kdcore.distill_epoch(student.net, opt, data._c, epoch, topts(batch_size=1),
                              dict(kind=1, T=T, ce_weight=cw, kd_weight=kw, student_noise=s), teachers=[teacher.net])
        sd = student.state_dict()
        dW, db = sd["1.weight"].astype(np.float64), sd["1.bias"].astype(np.float64)
        check_close("bias step (teacher on the clean input)", db, -LR * g, rtol=1e-5)
        k = int(np.argmax(np.abs(db)))
        u = dW[k] / db[k]
        check_close("weight step, rank one: -lr g (x + noise)", dW, np.outer(db, u), rtol=1e-5)
        noises.append(u - x)
    noise = noises[0]
    M = noise.size
    lo, hi = chi2_bounds(M, 1e-7)
    ss = float(np.sum(noise ** 2) / s ** 2)
    assert lo < ss < hi, f"sum of squared noise / s^2 = {ss:.1f}, chi-square({M}) bounds [{lo:.1f}, {hi:.1f}]"
    z = abs(noise.sum()) / (s * math.sqrt(M))
    assert z < math.sqrt(2 * math.log(2 / 1e-7)), f"noise mean {noise.mean():.4g} is {z:.1f} sd from 0"
    assert np.abs(noises[1] - noise).max() > s


def test_teacher_drop_keeps_a_weighted_teacher():
    """With teacher_weights [0, 1] and teacher_drop 0.5, a step where the weighted teacher is
    dropped brings it back: the zero-weight teacher alone is no guide, so every step has a
    distillation term (MSE to the weighted teacher's logits, whose value identifies it)."""
    n, V_ = 400, 4
    r = np.random.default_rng(0)
    X = r.standard_normal((n, 4)).astype(np.float32)
    data = kdcore.datasets.from_arrays(X, np.zeros(n, np.int64), num_classes=V_, normalize=None)
    student = kdcore.models.mlp([4, V_], seed=0)
    sd = student.state_dict()
    student.load_state_dict({k: np.zeros_like(v) for k, v in sd.items()})
    logits = [np.full((n, V_), 1.0, np.float32), np.full((n, V_), 3.0, np.float32)]
    sums = []
    opts = dict(batch_size=1, schedule=(0, 0.0, [], 0, 0.0, 0), shuffle=False, callback_every=1,
                callback=lambda *a: sums.append(a[3]) and False)
    _kdcore.distill_epoch(student.net, kdcore.optim.SGD(lr=0.0).bind(student), data._c, 0, opts,
                          dict(kind=3, ce_weight=0.0, kd_weight=1.0, multi=1, teacher_drop=0.5), teacher_logits=logits,
                          teacher_weights=np.array([0.0, 1.0], np.float32))
    losses = np.diff(np.concatenate([[0.0], sums]))
    assert np.allclose(losses, 9.0), f"{int(np.sum(~np.isclose(losses, 9.0)))} of {n} steps had no weighted teacher"
