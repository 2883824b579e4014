"""One full distillation step of each feature/relation method through kdcore.distill (the
method's reference recipe on the step engine) vs the same step in PyTorch on the same
weights: the student's update (SGD, momentum, weight decay), BN statistics and the logged
terms. The torch side uses the reference formulas of tests/test_feature_losses_torch.py,
on forward-hooked stage maps of the torch twins.

Student cnn (width 4) and teacher cnn (width 6; FSP needs equal channels: width 4), 8x8
inputs: stage maps '5' (8x8) and '12' (4x4), pooled feature '15'.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_feature_losses_torch import ref_at, ref_fsp, ref_nst, ref_pkt, ref_rkd, ref_rkd_parts, ref_sp  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)
V = 4
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
STAGES, POOLED = [5, 12], 15

# method -> (term label(s) in the History, weight, [(student node, teacher node)], torch loss of one pair)
RECIPES = {
    "at": (1000.0, [(5, 5), (12, 12)], ref_at),
    "sp": (3000.0, [(12, 12)], ref_sp),
    "nst": (50.0, [(5, 5), (12, 12)], ref_nst),
    "rkd": (1.0, [(POOLED, POOLED)], ref_rkd),
    "pkt": (30000.0, [(POOLED, POOLED)], ref_pkt),
}


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(5)
    X = r.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, 16)
    return X, y, kdcore.datasets.from_arrays(X, y, num_classes=V, normalize=None)


def teacher_of(width, seed=3):
    t = kdcore.models.cnn(num_classes=V, input_size=8, width=width, seed=seed)
    sd = t.state_dict()
    r = np.random.default_rng(seed)
    for k, v in sd.items():   # BN statistics away from their init, so eval mode matters
        if k.endswith("running_mean"):
            sd[k] = r.normal(0, 0.3, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            sd[k] = r.uniform(0.5, 2.0, v.shape).astype(np.float32)
    t.load_state_dict(sd)
    return t


def torch_pair(student, teacher, width_s, width_t):
    ts = torch_ref.torch_cnn(V, 1, width_s).double()
    torch_ref.load_into_torch(ts, student.state_dict())
    tt = torch_ref.torch_cnn(V, 1, width_t).double()
    torch_ref.load_into_torch(tt, teacher.state_dict())
    tt.eval()
    feats = {"s": {}, "t": {}}
    for node in STAGES + [POOLED]:
        ts[node].register_forward_hook(lambda m, i, o, k=node: feats["s"].__setitem__(k, o))
        tt[node].register_forward_hook(lambda m, i, o, k=node: feats["t"].__setitem__(k, o))
    return ts, tt, feats


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_method_step_vs_torch(method, data):
    X, y, ds = data
    weight, pairs, ref = RECIPES[method]
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    teacher = teacher_of(6)
    s0 = student.state_dict()
    ts, tt, feats = torch_pair(student, teacher, 4, 6)
    h = kdcore.distill(student, teacher, ds, method=method, epochs=1, batch_size=len(ds), progress=False,
                       optimizer=kdcore.optim.SGD(**SGD))
    opt = torch.optim.SGD(ts.parameters(), **SGD)
    ts.train()
    x, yt = torch.tensor(X, dtype=torch.float64), torch.tensor(y)
    with torch.no_grad():
        tt(x)
    ce = TF.cross_entropy(ts(x), yt)
    terms = [ref(feats["s"][a], feats["t"][b]) for a, b in pairs]
    (ce + weight * sum(terms)).backward()
    opt.step()
    check_models("student", student, ts, s0)
    check_close("ce", h["ce"][0], ce.item())
    labels = [method] + [f"{method}_{k}" for k in range(2, len(pairs) + 1)]
    for label, term in zip(labels, terms):
        check_close(label, h[label][0], term.item(), rtol=1e-4, atol=1e-9)
    check_close("train_loss", h["train_loss"][0], ce.item() + weight * sum(t.item() for t in terms), rtol=1e-4)
    if method == "rkd":
        d, a = ref_rkd_parts(feats["s"][POOLED], feats["t"][POOLED])
        check_close("rkd_dist", h["rkd_dist"][0], d.item(), rtol=1e-4)
        check_close("rkd_angle", h["rkd_angle"][0], a.item(), rtol=1e-4)


def test_fsp_init_phase_then_ce_vs_torch(data):
    """method='fsp': an initialisation phase on the FSP term alone (f1->f2 Gram matrices,
    weight 50), then CE only; the init phase's step vs torch, and the phases' History."""
    X, y, ds = data
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    teacher = teacher_of(4)
    s0 = student.state_dict()
    ts, tt, feats = torch_pair(student, teacher, 4, 4)
    h = kdcore.distill(student.copy(), teacher, ds, method="fsp", epochs=1, init_epochs=1, batch_size=len(ds),
                       progress=False, optimizer=kdcore.optim.SGD(**SGD))
    assert h["stage"] == [0, 1] and np.isnan(h["ce"][0]) and np.isnan(h["fsp"][1])
    # the init phase alone (distill's own phase function, its restore included), checked
    # against torch: the layers past the last FSP tap get no gradient, so torch's SGD leaves
    # them untouched
    from kdcore.distill import _init_phase
    from kdcore.training import _Common
    after_init = student.copy()
    common = _Common(ds, 1, len(ds), kdcore.optim.SGD(**SGD), None, None, None, None, 0, False, 0.0, False, None,
                     None, 20)
    _init_phase(after_init, teacher, common, [kdcore.losses.FSP(50.0)], "fsp-init", "auto")
    opt = torch.optim.SGD(ts.parameters(), **SGD)
    ts.train()
    x = torch.tensor(X, dtype=torch.float64)
    with torch.no_grad():
        tt(x)
    ts(x)
    loss = 50.0 * ref_fsp(feats["s"][5], feats["s"][12], feats["t"][5], feats["t"][12])
    loss.backward()
    opt.step()
    check_models("student after the init phase", after_init, ts, s0)
    check_close("fsp", h["fsp"][0], loss.item() / 50.0, rtol=1e-4)


def test_feature_term_gradient_reaches_a_trained_source():
    """AT between two trained peers with src.grad (online feature distillation): both nets'
    updates equal torch autograd through both maps."""
    r = np.random.default_rng(9)
    X = r.standard_normal((8, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, 8)
    ds = kdcore.datasets.from_arrays(X, y, num_classes=V, normalize=None)
    a = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=1)
    b = kdcore.models.cnn(num_classes=V, input_size=8, width=6, seed=2)
    a0, b0 = a.state_dict(), b.state_dict()
    # no weight decay: the layers past tap 5 get no gradient (torch skips their update)
    sgd = dict(SGD, weight_decay=0.0)
    opt = kdcore.optim.SGD(**sgd)
    M = kdcore._kdcore.MODES
    nets = [dict(net=a.net, opt=opt.bind(a), mode=M["train"], salt=1, role="peer"),
            dict(net=b.net, opt=opt.bind(b), mode=M["train"], salt=2, role="peer")]
    terms = [dict(kind=kdcore._kdcore.TERM_KINDS["at"], a=(0, 5), src=[(1, 5)], grad=True, weight=100.0)]
    topts = dict(batch_size=8, schedule=(0, sgd["lr"], [], 0, 0.0, 0), shuffle=False, max_steps=1)
    kdcore._kdcore.step_epoch(nets, terms, ds._c, 0, topts)
    ta, tb, feats = torch_pair(a, b, 4, 6)
    torch_ref.load_into_torch(ta, a0)
    torch_ref.load_into_torch(tb, b0)
    ta.train(); tb.train()
    oa, ob = torch.optim.SGD(ta.parameters(), **sgd), torch.optim.SGD(tb.parameters(), **sgd)
    x = torch.tensor(X, dtype=torch.float64)
    ta(x); tb(x)
    (100.0 * ref_at(feats["s"][5], feats["t"][5])).backward()
    oa.step(); ob.step()
    check_models("a", a, ta, a0)
    check_models("b", b, tb, b0)
