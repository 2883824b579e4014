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
    assert kdcore._kdcore.TERM_DEFAULTS["mlkd"]["temperatures"] == TEMPS
    assert repr(L.MLKD()) == "MLKD(weight=0.9, temperatures=(4.0, 3.0, 5.0, 2.0, 6.0), percentile=50.0)"


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
