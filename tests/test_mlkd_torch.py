"""MLKD (Jin, Wang & Lin, CVPR 2023) vs PyTorch autograd (float64) on the same logits and
weights: the loss's value, parts and gradient (batch 1, 2 and 64; equal, huge and constant
logits; masks that keep every sample), one full distillation step, and the refusals.

The reference is written here from the paper's three levels in the form of the authors'
code (their KD_ours.py, weak view): per temperature, T^2 KL (instance), the squared
difference of the C x C class-correlation matrices over C (class) and of the B x B
sample-correlation matrices over B (batch); the teacher-confidence masks at T = 1 from
np.percentile, each scaling its term by the fraction it keeps."""
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
import torch_ref  # noqa: E402

torch.set_num_threads(1)

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


def logits(rng, n, v, scale=2.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


def mask_fractions(zt, q):
    """The fractions of samples and of classes the authors' masks keep (no gradient)."""
    p = TF.softmax(zt.detach(), 1).numpy()
    conf, cls = p.max(1), p.sum(0)
    return (conf <= np.percentile(conf, q)).mean(), (cls <= np.percentile(cls, q)).mean()


def t_mlkd(zs, zt, temps=TEMPS, q=50.0):
    """Returns (loss, instance, class + batch)."""
    fs, fc = mask_fractions(zt, q)
    n, c = zs.shape
    inst = cls = bat = 0
    for T in temps:
        lp, pt = TF.log_softmax(zs / T, 1), TF.softmax(zt / T, 1)
        ps = lp.exp()
        inst = inst + fs * T * T * TF.kl_div(lp, pt, reduction="none").sum(1).mean()
        cls = cls + fc * ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / c
        bat = bat + fs * ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / n
    return inst + cls + bat, inst, cls + bat


def check_mlkd(zs, zt, temps=TEMPS, q=50.0, rtol=1e-5):
    loss, d, (inst, rel) = F.mlkd_loss(zs, zt, temperatures=temps, percentile=q, return_parts=True)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    ref, ri, rr = t_mlkd(s, torch.tensor(zt, dtype=torch.float64), temps, q)
    ref.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    check_close("loss", loss, ref.item(), rtol=rtol, atol=1e-7)
    check_close("instance", inst, float(ri.detach()), rtol=rtol, atol=1e-7)
    check_close("class+batch", rel, float(rr.detach()), rtol=rtol, atol=1e-7)
    g = s.grad.numpy()
    check_close("dstudent", d, g, rtol=10 * rtol, atol=10 * rtol * max(np.abs(g).max(), 1e-12))
    return loss, d


@pytest.mark.parametrize("n", [1, 2, 64])
@pytest.mark.parametrize("temps,q", [(TEMPS, 50.0), ((1.0,), 50.0), ((4.0, 0.5, 20.0), 25.0), ((2.0, 8.0), 100.0)])
def test_mlkd_loss(n, temps, q, rng):
    zs, zt = logits(rng, n, 10), logits(rng, n, 10, 4.0)
    check_mlkd(zs, zt, temps, q)


def test_mlkd_loss_cifar_shape(rng):
    """64 samples of 100 classes (the authors' CIFAR-100 batch): correlation matrices of both sizes."""
    check_mlkd(logits(rng, 64, 100), logits(rng, 64, 100, 5.0))


def test_mlkd_masks_scale_the_terms(rng):
    """The masks keep f_s of the samples and f_c of the classes; the terms scale by them. With
    percentile 100 they keep everything; at 50 (16 distinct confidences) exactly half, so the
    instance part halves; at 0 only the least confident sample (a mask is never empty: the
    minimum is <= every percentile)."""
    zs, zt = logits(rng, 16, 10), logits(rng, 16, 10, 4.0)
    _, _, (i100, r100) = F.mlkd_loss(zs, zt, percentile=100.0, return_parts=True)
    _, _, (i50, _) = F.mlkd_loss(zs, zt, percentile=50.0, return_parts=True)
    _, _, (i0, _) = F.mlkd_loss(zs, zt, percentile=0.0, return_parts=True)
    kd = sum(F.kd_loss(zs, zt, T=T)[0] for T in TEMPS)
    check_close("instance at 100", i100, kd, rtol=1e-5)
    check_close("instance at 50", i50, kd / 2, rtol=1e-5)
    check_close("instance at 0", i0, kd / 16, rtol=1e-5)
    assert r100 > 0


@pytest.mark.parametrize("case", ["equal", "teacher rows equal", "all rows equal", "student rows equal", "large", "huge",
                                  "two classes", "one class"])
def test_mlkd_loss_hard_cases(case, rng):
    zs, zt = logits(rng, 8, 10), logits(rng, 8, 10, 4.0)
    if case == "equal":
        zt = zs.copy()
    elif case == "teacher rows equal":        # every confidence ties: the masks keep all samples
        zt = np.zeros_like(zt)
    elif case == "all rows equal":
        zs, zt = np.full_like(zs, 3.0), np.full_like(zt, -1.0)
    elif case == "student rows equal":
        zs = np.full_like(zs, 7.0)
    elif case == "large":
        zs, zt = logits(rng, 8, 10, 60.0), logits(rng, 8, 10, 60.0)
    elif case == "huge":
        zs, zt = logits(rng, 8, 10, 1e4), logits(rng, 8, 10, 1e4)
    elif case == "two classes":
        zs, zt = logits(rng, 8, 2), logits(rng, 8, 2)
    else:
        zs, zt = logits(rng, 8, 1), logits(rng, 8, 1)
    loss, d = check_mlkd(zs, zt, rtol=1e-4)
    if case in ("equal", "all rows equal", "one class"):
        assert loss == pytest.approx(0, abs=1e-6) and np.abs(d).max() < 1e-6
    if case == "teacher rows equal":          # f_s = f_c = 1: the full KD sum
        kd = sum(F.kd_loss(zs, zt, T=T)[0] for T in TEMPS)
        check_close("instance", F.mlkd_loss(zs, zt, return_parts=True)[2][0], kd, rtol=1e-5)


def test_mlkd_loss_arguments(rng):
    z = logits(rng, 4, 5)
    for bad in ((), (1.0,) * 9, (4.0, 0.0), (4.0, float("nan")), (-1.0,), [1e39]):
        with pytest.raises(ValueError, match="temperatures"):
            F.mlkd_loss(z, z, temperatures=bad)
    for bad in ("4", 4.0, None, (4.0, "3"), {4.0: 1}, np.ones((1, 2), np.float32)):
        with pytest.raises(TypeError, match="temperatures"):
            F.mlkd_loss(z, z, temperatures=bad)
    for bad in (-1.0, 100.5, float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            F.mlkd_loss(z, z, percentile=bad)
    with pytest.raises(TypeError, match="percentile"):
        F.mlkd_loss(z, z, percentile="50")
    with pytest.raises(ValueError, match="teacher_logits"):
        F.mlkd_loss(z, z[:, :4])
    with pytest.raises(TypeError, match="student_logits"):
        F.mlkd_loss(z.astype(np.float64), z)
    with pytest.raises(ValueError, match="student_logits"):
        F.mlkd_loss(np.full_like(z, np.nan), z)
    with pytest.raises(TypeError, match="return_parts"):
        F.mlkd_loss(z, z, return_parts="yes")
    with pytest.raises(ValueError, match="temperatures"):
        L.MLKD(temperatures=(4.0, 0.0))
    with pytest.raises(ValueError, match="percentile"):
        L.MLKD(percentile=101.0)
    with pytest.raises(TypeError, match="standardize"):
        L.MLKD(standardize=True)


def test_mlkd_step(data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    temps = (4.0, 2.0, 6.0)
    h = run(student, teacher, ds, [L.CE(0.1), L.MLKD(0.9, temperatures=temps, percentile=40.0)])
    z = p.forward(X)
    zt = p.tt(torch.tensor(X, dtype=torch.float64)).detach()
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    d, inst, rel = t_mlkd(z, zt, temps, 40.0)
    (0.1 * TF.cross_entropy(z, torch.tensor(y)) + 0.9 * d).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("mlkd", h["mlkd"][0], d.item(), rtol=1e-4)
    check_close("mlkd_instance", h["mlkd_instance"][0], float(inst.detach()), rtol=1e-4)
    check_close("mlkd_class_batch", h["mlkd_class_batch"][0], float(rel.detach()), rtol=1e-4, atol=1e-8)


def test_mlkd_method_recipe():
    terms = L.method_terms("mlkd")
    assert [type(t).__name__ for t in terms] == ["CE", "MLKD"]
    assert (terms[0].weight, terms[1].weight, terms[1].temperatures, terms[1].percentile) == (0.1, 0.9, TEMPS, 50.0)
    assert (terms[1].strong_view, terms[1].strong_ce, terms[1].kd_on_weak) == (True, 0.1, (2.0, 6.0))
    assert kdcore._kdcore.TERM_DEFAULTS["mlkd"]["temperatures"] == TEMPS
    assert repr(L.MLKD()) == "MLKD(weight=0.9, temperatures=(4.0, 3.0, 5.0, 2.0, 6.0), percentile=50.0)"
    assert repr(L.MLKD(strong_view=True)).endswith("percentile=50.0, strong_view=True)")
    assert repr(terms[1]) == repr(L.MLKD(strong_view=True))


# ---------------------------------------------------------------------------------------
# Two views of each batch: the engine's forwards per view against two PyTorch forwards.

def step_inputs(ds, view_aug, batch_size=None, seed=0, shuffle=True, augment=None):
    """The sample order and the two views the engine builds for batch 0 of epoch 0."""
    topts = dict(batch_size=batch_size or len(ds), schedule=(0, 0.1, [], 0, 0.0, 0), seed=seed, shuffle=shuffle,
                 **(augment or {}))
    return kdcore._kdcore.step_batch(ds._c, 0, topts, 0, view_aug)


def torch_kd(zs, zt, T):
    return TF.kl_div(TF.log_softmax(zs / T, 1), TF.softmax(zt / T, 1), reduction="batchmean") * T * T


def test_step_batch_views(data):
    """The helper's views: view 0 is the batch the engine feeds (here unaugmented: the samples in
    the shuffled order), view 1 the same samples under view_aug; both depend on the seed only."""
    X, y, ds = data
    idx, x0, x1 = step_inputs(ds, dict(randaugment=2, crop_padding=1, hflip=True))
    assert sorted(idx) == list(range(len(X)))
    np.testing.assert_array_equal(x0, X[idx])
    assert x1.shape == x0.shape and not np.allclose(x1, x0)
    _, _, again = step_inputs(ds, dict(randaugment=2, crop_padding=1, hflip=True))
    np.testing.assert_array_equal(again, x1)
    _, _, other = step_inputs(ds, dict(randaugment=2, crop_padding=1, hflip=True), seed=1)
    assert not np.array_equal(other, x1)
    # view 1 has draws of its own: the same crop and flip options give another crop and flip
    _, a0, a1 = step_inputs(ds, dict(crop_padding=2, hflip=True), augment=dict(crop_padding=2, hflip=True))
    assert not np.array_equal(a0, a1)
    assert step_inputs(ds, None)[2] is None
    with pytest.raises(ValueError, match="view_aug"):
        step_inputs(ds, dict(randaugment=-1))
    with pytest.raises(ValueError, match="unknown view_aug"):
        step_inputs(ds, dict(rotate=3))


def test_two_view_kd_step(data):
    """A plain KD configuration on two views: the student and the teacher run on both, CE on view
    0, KD and CE on view 1 (the teacher's view-1 logits). Equal to two PyTorch forwards per model
    (BN batch statistics per view, running statistics updated twice) and one backward of the
    summed loss."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    aug0, view_aug = dict(crop_padding=1, hflip=True), dict(crop_padding=1, hflip=True, randaugment=2)
    idx, x0, x1 = step_inputs(ds, view_aug, shuffle=False, augment=aug0)
    kinds = kdcore._kdcore.TERM_KINDS
    nets = [dict(net=student.net, opt=kdcore.optim.SGD(**SGD).bind(student), mode=kdcore._kdcore.MODES["train"],
                 role="student", views=3, salt=1),
            dict(net=teacher.net, mode=kdcore._kdcore.MODES["eval"], role="teacher", views=3)]
    terms = [dict(kind=kinds["ce"], weight=0.3, a=(0, -1)),
             dict(kind=kinds["kd"], weight=0.7, a=(0, -1, 1), src=[(1, -1, 1)], T=2.0),
             dict(kind=kinds["ce"], weight=0.2, a=(0, -1, 1))]
    topts = dict(batch_size=len(ds), schedule=(0, SGD["lr"], [], 0, 0.0, 0), shuffle=False, **aug0)
    st = kdcore._kdcore.step_epoch(nets, terms, ds._c, 0, topts, monitor=dict(src=[(1, -1, 1)]), view_aug=view_aug)
    tx0, tx1 = torch.tensor(x0, dtype=torch.float64), torch.tensor(x1, dtype=torch.float64)
    p.ts.train()
    z0, z1 = p.ts(tx0), p.ts(tx1)
    with torch.no_grad():
        zt0, zt1 = p.tt(tx0), p.tt(tx1)
    yt = torch.tensor(y[idx])
    ce0, kd1, ce1 = TF.cross_entropy(z0, yt), torch_kd(z1, zt1, 2.0), TF.cross_entropy(z1, yt)
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    (0.3 * ce0 + 0.7 * kd1 + 0.2 * ce1).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("ce view 0", st["term_value"][0], ce0.item(), rtol=1e-5)
    check_close("kd view 1", st["term_value"][1], kd1.item(), rtol=1e-5)
    check_close("ce view 1", st["term_value"][2], ce1.item(), rtol=1e-5)
    # accuracies: the student's on its first view (0), the monitor's and each term's on theirs
    acc = lambda z: float((z.argmax(1).numpy() == y[idx]).mean())  # noqa: E731
    assert st["net_accuracy"][0] == acc(z0)
    assert st["monitor_accuracy"] == acc(zt1)
    assert st["term_accuracy"][2] == acc(z1)


def test_two_views_bn_per_view(data):
    """The views are not concatenated: one forward of both views together (BN statistics over
    both) gives another update, which the per-view reference above would not match."""
    X, y, ds = data
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    s0 = student.state_dict()
    view_aug = dict(randaugment=2)
    idx, x0, x1 = step_inputs(ds, view_aug, shuffle=False)
    nets = [dict(net=student.net, opt=kdcore.optim.SGD(**SGD).bind(student), mode=kdcore._kdcore.MODES["train"],
                 role="student", views=3)]
    ce = kdcore._kdcore.TERM_KINDS["ce"]
    terms = [dict(kind=ce, weight=1.0, a=(0, -1)), dict(kind=ce, weight=1.0, a=(0, -1, 1))]
    topts = dict(batch_size=len(ds), schedule=(0, SGD["lr"], [], 0, 0.0, 0), shuffle=False)
    kdcore._kdcore.step_epoch(nets, terms, ds._c, 0, topts, view_aug=view_aug)
    ts = torch_ref.torch_cnn(V, 1, 4).double()
    torch_ref.load_into_torch(ts, s0)
    ts.train()
    z0, z1 = ts(torch.tensor(x0, dtype=torch.float64)), ts(torch.tensor(x1, dtype=torch.float64))
    opt = torch.optim.SGD(ts.parameters(), **SGD)
    yt = torch.tensor(y[idx])
    (TF.cross_entropy(z0, yt) + TF.cross_entropy(z1, yt)).backward()
    opt.step()
    check_models("student", student, ts, s0)
    tc = torch_ref.torch_cnn(V, 1, 4).double()
    torch_ref.load_into_torch(tc, s0)
    tc.train()
    z = tc(torch.tensor(np.concatenate([x0, x1]), dtype=torch.float64))
    opt = torch.optim.SGD(tc.parameters(), **SGD)
    (2 * TF.cross_entropy(z, torch.cat([yt, yt]))).backward()
    opt.step()
    with pytest.raises(pytest.fail.Exception, match="mismatches"):
        check_models("concatenated", student, tc, s0)


@pytest.mark.parametrize("case,match", [
    (dict(views=4), "views"),
    (dict(a=(0, -1, 1)), r"reads view 1 of net 0, which runs on views 0x1"),
    (dict(views=3, a=(0, -1, 1), src=[(1, -1)]), "a term reads one view"),
    (dict(a=(0, -1, 2)), "view 2"),
])
def test_engine_refuses_bad_views(case, match, data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    nets = [dict(net=student.net, opt=kdcore.optim.SGD(lr=0.1).bind(student), mode=3, role="student",
                 views=case.get("views", 1)),
            dict(net=teacher.net, mode=0, role="teacher", views=1)]
    term = dict(kind=kdcore._kdcore.TERM_KINDS["kd"], a=case.get("a", (0, -1)), src=case.get("src", [(1, -1)]))
    from test_schemes_torch import train_opts
    with pytest.raises(ValueError, match=match):
        kdcore._kdcore.step_epoch(nets, [term], ds._c, 0, train_opts(1), view_aug=dict(randaugment=2))


def test_mlkd_step_two_views(data):
    """method='mlkd' (the strong view on): one full step against PyTorch on the views the engine
    built -- the weak-view MLKD loss and CE, CE on the strong view, KD at T 4, 3, 5 on the strong
    logits and at T 2, 6 on the weak ones (the authors' KD_ours.py), student and teacher each run
    on both views."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, L.method_terms("mlkd"))
    idx, x0, x1 = step_inputs(ds, dict(randaugment=2))
    tx0, tx1 = torch.tensor(x0, dtype=torch.float64), torch.tensor(x1, dtype=torch.float64)
    p.ts.train()
    zw, zs = p.ts(tx0), p.ts(tx1)
    with torch.no_grad():
        tw, ts_ = p.tt(tx0), p.tt(tx1)
    yt = torch.tensor(y[idx])
    d, inst, rel = t_mlkd(zw, tw)
    kd = {T: torch_kd(zs, ts_, T) if T in (4.0, 3.0, 5.0) else torch_kd(zw, tw, T) for T in TEMPS}
    loss = 0.1 * TF.cross_entropy(zw, yt) + 0.9 * d + 0.1 * TF.cross_entropy(zs, yt) + 0.9 * sum(kd.values())
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    loss.backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("mlkd", h["mlkd"][0], d.item(), rtol=1e-4)
    check_close("mlkd_strong_ce", h["mlkd_strong_ce"][0], TF.cross_entropy(zs, yt).item(), rtol=1e-5)
    for T in TEMPS:
        check_close(f"kd T{T}", h[f"mlkd_kd_T{T:g}"][0], kd[T].item(), rtol=1e-5)
    check_close("train_loss", h["train_loss"][0], loss.item(), rtol=1e-4)


def test_mlkd_weak_only_is_the_one_view_step(data):
    """strong_view=False (the class's default; test_mlkd_step checks it against PyTorch) is the
    weak-view form: no second view, and another update than the recipe's."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    h = run(student, teacher, ds, [L.CE(0.1), L.MLKD(0.9, strong_view=False)])
    assert "mlkd_strong_ce" not in h.last and "mlkd_kd_T4" not in h.last
    s2 = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    run(s2, teacher_of(6), ds, L.method_terms("mlkd"))
    sd1, sd2 = student.state_dict(), s2.state_dict()
    assert any(not np.array_equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("opts,match", [
    (dict(temperatures=[4.0, 0.0]), r"term 0 \(mlkd\): temperatures\[1\] \(0\) must be > 0"),
    (dict(temperatures=[float("inf")]), r"term 0 \(mlkd\): temperatures\[0\] \(inf\) must be > 0"),
    (dict(temperatures=[]), "temperatures"),
    (dict(temperatures=[1.0] * 9), "temperatures"),
    (dict(temperatures=["x"]), "temperatures"),
    (dict(temperatures=4.0), "temperatures"),
    (dict(percentile=-1.0), r"term 0 \(mlkd\): percentile \(-1\) must be in \[0, 100\]"),
    (dict(percentile=float("nan")), r"term 0 \(mlkd\): percentile"),
    (dict(gamma=0.2), "gamma"),
])
def test_engine_refuses_bad_mlkd_options(opts, match, data):
    """The engine's own checks (a term built without the Python class) name the option."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    nets = [dict(net=student.net, opt=kdcore.optim.SGD(lr=0.1).bind(student), mode=3, role="student"),
            dict(net=teacher.net, mode=0, role="teacher")]
    from test_schemes_torch import train_opts
    term = dict(kind=kdcore._kdcore.TERM_KINDS["mlkd"], a=(0, -1), src=[(1, -1)], **opts)
    with pytest.raises((ValueError, TypeError), match=match):
        kdcore._kdcore.step_epoch(nets, [term], ds._c, 0, train_opts(1))


def test_loss_view_option_reads_the_strong_view(data):
    """losses=[..., KD(view=1), CE(view=1)]: distill runs the student and the teacher on the
    strong view too (the batch's augmentation plus RandAugment) -- the same step in PyTorch."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, [L.CE(0.3), L.KD(0.5, T=3.0, view=1), L.CE(0.2, view=1)])
    idx, x0, x1 = step_inputs(ds, dict(randaugment=2))
    tx0, tx1 = torch.tensor(x0, dtype=torch.float64), torch.tensor(x1, dtype=torch.float64)
    p.ts.train()
    z0, z1 = p.ts(tx0), p.ts(tx1)
    with torch.no_grad():
        zt1 = p.tt(tx1)
    yt = torch.tensor(y[idx])
    loss = 0.3 * TF.cross_entropy(z0, yt) + 0.5 * torch_kd(z1, zt1, 3.0) + 0.2 * TF.cross_entropy(z1, yt)
    opt = torch.optim.SGD(p.ts.parameters(), **SGD)
    loss.backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_close("kd", h["kd"][0], torch_kd(z1, zt1, 3.0).item(), rtol=1e-5)
