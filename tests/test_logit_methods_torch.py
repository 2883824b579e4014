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
