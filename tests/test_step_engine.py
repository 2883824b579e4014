"""The step engine (kd_step_epoch through kdcore._kdcore.step_epoch): configurations of nets,
connectors and loss terms.

- A configuration of the engine equals the scheme function that builds the same one (bitwise).
- A connector (a small net reading a student tap) trained with the student on a hint term:
  one step equals the same step in PyTorch (float64) on the same weights -- the student's and
  the connector's updates, BN statistics and the reported terms.
- A term's gradient into a trained source (DML-style, src.grad) reaches that net.
- Bad configurations raise errors naming the term or net.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_schemes_torch import (LR, MOM, WD, check_close, check_models, make_model, sgd, torch_sgd,  # noqa: E402
                                train_opts, twin)

torch.set_num_threads(1)
K = _kdcore.TERM_KINDS
MIX = _kdcore.MIX
MODE = _kdcore.MODES
N, V = 8, 4


def data_of(X, y):
    return kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=V)


def cnn_data(seed=7, size=8):
    r = np.random.default_rng(seed)
    return r.standard_normal((N, 1, size, size)).astype(np.float32), r.integers(0, V, N).astype(np.int64)


def student_net(model, opt, salt=0x57D0, **kw):
    return dict(net=model.net, opt=opt, mode=MODE["train"], salt=salt, role="student", **kw)


def teacher_net(model, salt=0x7EAC0):
    return dict(net=model.net, mode=MODE["eval"], salt=salt, role="teacher")


def test_engine_configuration_equals_distill_epoch_bitwise():
    """CE + KD against one teacher net, written as terms, gives the bits of kd_distill_epoch."""
    X, y = cnn_data()
    data = data_of(X, y)
    teacher = make_model("cnn", 10, sharpen=10.0)
    a, b = make_model("cnn", 1), make_model("cnn", 1)
    st_a = _kdcore.distill_epoch(a.net, sgd(a), data._c, 0, train_opts(2), dict(kind=1, T=4.0, ce_weight=0.1, kd_weight=0.9),
                                 teachers=[teacher.net])
    terms = [dict(kind=K["ce"], a=(0, -1), weight=0.1),
             dict(kind=K["kd"], a=(0, -1), src=[(1, -1)], weight=0.9, T=4.0)]
    st_b = _kdcore.step_epoch([student_net(b, sgd(b)), teacher_net(teacher)], terms, data._c, 0, train_opts(2),
                              monitor=dict(src=[(1, -1)]))
    for k, v in a.state_dict().items():
        assert np.array_equal(v, b.state_dict()[k]), k
    assert st_b["net_loss"][0] == st_a["loss"] and st_b["term_value"] == [st_a["ce"], st_a["kd"]]
    assert st_b["monitor_accuracy"] == st_a["teacher_accuracy"] and st_b["net_accuracy"][0] == st_a["accuracy"]


def connector():
    m = kdcore.nn.Sequential(kdcore.nn.Conv2d(4, 6, 1, bias=False), kdcore.nn.BatchNorm2d(6))
    m.reset_parameters(seed=5)
    return m


@pytest.mark.parametrize("steps", [1, 2])
def test_connector_hint_step_vs_torch(steps):
    """student (cnn, width 4) tap '5' -> connector conv1x1 + BN -> MSE to the teacher's tap
    '5' (cnn, width 6), plus CE: one or two SGD steps of student and connector equal
    PyTorch's (the connector's input gradient joins the student's backward)."""
    X, y = cnn_data()
    data = data_of(X, y)
    student = make_model("cnn", 1)
    teacher = kdcore.models.cnn(num_classes=V, in_channels=1, input_size=8, width=6, seed=3)
    conn = connector()
    s_before, c_before = student.state_dict(), conn.state_dict()
    tap_s, tap_t = student._tap_index("5"), teacher._tap_index("5")
    nets = [student_net(student, sgd(student)), teacher_net(teacher),
            dict(net=conn.net, opt=sgd(conn), mode=MODE["train"], input=(0, tap_s), role="connector", salt=9)]
    terms = [dict(kind=K["ce"], a=(0, -1), weight=1.0),
             dict(kind=K["mse"], a=(2, -1), src=[(1, tap_t)], weight=2.0)]
    st = _kdcore.step_epoch(nets, terms, data._c, 0, train_opts(steps), monitor=dict(src=[(1, -1)]))

    ts = twin("cnn", student)
    torch_ref.load_into_torch(ts, s_before)
    tt = torch_ref.torch_cnn(V, 1, 6).double()
    torch_ref.load_into_torch(tt, teacher.state_dict())
    tt.eval()
    tc = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)).double()
    torch_ref.load_into_torch(tc, c_before)
    feats = {}
    ts[5].register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    tt[5].register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    opts = [torch_sgd(ts), torch_sgd(tc)]
    ts.train(); tc.train()
    B = N // steps
    ce_s, mse_s = [], []
    for s in range(steps):
        xb = torch.tensor(X[s * B:(s + 1) * B], dtype=torch.float64)
        yb = torch.tensor(y[s * B:(s + 1) * B])
        for o in opts:
            o.zero_grad()
        with torch.no_grad():
            tt(xb)
        z = ts(xb)
        ce = TF.cross_entropy(z, yb)
        mse = TF.mse_loss(tc(feats["s"]), feats["t"])
        (ce + 2.0 * mse).backward()
        for o in opts:
            o.step()
        ce_s.append(ce.item()); mse_s.append(mse.item())
    check_models("student", student, ts, s_before)
    check_models("connector", conn, tc, c_before)
    check_close("ce", st["term_value"][0], np.mean(ce_s))
    check_close("hint", st["term_value"][1], np.mean(mse_s))
    check_close("student loss", st["net_loss"][0], np.mean(ce_s))
    check_close("connector loss", st["net_loss"][2], 2.0 * np.mean(mse_s))


def test_source_gradient_reaches_trained_source_net():
    """KD from peer 1 to peer 0 with src.grad: peer 1 gets the gradient w.r.t. its logits
    (kd_loss_kd's dteacher), as torch autograd through both."""
    X, y = cnn_data()
    data = data_of(X, y)
    a, b = make_model("cnn", 1, sharpen=3.0), make_model("cnn", 2, sharpen=3.0)
    a0, b0 = a.state_dict(), b.state_dict()
    nets = [student_net(a, sgd(a)),
            dict(net=b.net, opt=sgd(b), mode=MODE["train"], salt=3, role="peer")]
    terms = [dict(kind=K["kd"], a=(0, -1), src=[(1, -1)], grad=True, weight=1.5, T=2.0)]
    _kdcore.step_epoch(nets, terms, data._c, 0, train_opts(1))
    ta, tb = twin("cnn", a), twin("cnn", b)
    torch_ref.load_into_torch(ta, a0)
    torch_ref.load_into_torch(tb, b0)
    oa, ob = torch_sgd(ta), torch_sgd(tb)
    ta.train(); tb.train()
    x = torch.tensor(X, dtype=torch.float64)
    za, zb = ta(x), tb(x)
    loss = 1.5 * TF.kl_div(TF.log_softmax(za / 2, 1), TF.softmax(zb / 2, 1), reduction="batchmean") * 4
    loss.backward()
    oa.step(); ob.step()
    check_models("a", a, ta, a0)
    check_models("b", b, tb, b0)


def test_bad_configurations_are_named():
    X, y = cnn_data()
    data = data_of(X, y)
    s, t = make_model("cnn", 1), make_model("cnn", 2)
    nets = [student_net(s, sgd(s)), teacher_net(t)]
    with pytest.raises(ValueError, match=r"term 0 \(kd\): src.n \(0\)"):
        _kdcore.step_epoch(nets, [dict(kind=K["kd"], a=(0, -1))], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"src\[i\] refers to net 5"):
        _kdcore.step_epoch(nets, [dict(kind=K["kd"], a=(0, -1), src=[(5, -1)])], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"unknown term options"):
        _kdcore.step_epoch(nets, [dict(kind=K["ce"], a=(0, -1), temperature=3)], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"term 0 \(dkd\) gives no gradient to its source"):
        _kdcore.step_epoch(nets, [dict(kind=K["dkd"], a=(0, -1), src=[(1, -1)], grad=True)], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"term 0 \(kd\): params is 1, but a kd term has no parameters of its own"):
        _kdcore.step_epoch(nets, [dict(kind=K["kd"], a=(0, -1), src=[(1, -1)], params=1)], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"term 0 \(ctkd\): params \(-1\) must be a parameter-holder net"):
        _kdcore.step_epoch(nets, [dict(kind=K["ctkd"], a=(0, -1), src=[(1, -1)])], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"term 0 \(mse\): a reads node 99"):
        _kdcore.step_epoch(nets, [dict(kind=K["mse"], a=(0, 99), src=[(1, -1)])], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match="the same model appears twice"):
        _kdcore.step_epoch([student_net(s, sgd(s)), teacher_net(s)], [], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"input_net 1 must be an earlier net"):
        _kdcore.step_epoch([student_net(s, sgd(s)), dict(net=t.net, mode=0, input=(1, 3))], [], data._c, 0, train_opts(1))


def test_extra_inputs_are_checked():
    """A connector's extra inputs: one per input node, from earlier nets, only on connectors."""
    from kdcore.losses import ReviewFusion
    X, y = cnn_data()
    data = data_of(X, y)
    s = make_model("cnn", 1)
    fusion = ReviewFusion([8, 8], [(1, 1), (4, 4)], [8, 8], [(1, 1), (4, 4)], 4)
    pooled, stage = s._tap_index("15"), s._tap_index("12")
    conn = dict(net=fusion.net, opt=sgd(fusion), mode=MODE["train"], input=(0, pooled), role="connector")
    with pytest.raises(ValueError, match=r"net 1 \(connector\): 0 extra inputs given for 1 input nodes"):
        _kdcore.step_epoch([student_net(s, sgd(s)), conn], [], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"extra input 0 must be a node of an earlier net"):
        _kdcore.step_epoch([student_net(s, sgd(s)), dict(conn, inputs=[(1, 0)])], [], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"at most 8 extra inputs"):
        _kdcore.step_epoch([student_net(s, sgd(s)), dict(conn, inputs=[(0, stage)] * 9)], [], data._c, 0, train_opts(1))
    with pytest.raises(ValueError, match=r"only a connector can have extra inputs"):
        _kdcore.step_epoch([dict(net=fusion.net, opt=sgd(fusion), mode=MODE["train"], inputs=[(0, 0)])], [], data._c, 0,
                           train_opts(1))
    # a right configuration runs, and leaves the connector without borrowed pointers
    _kdcore.step_epoch([student_net(s, sgd(s)), dict(conn, inputs=[(0, stage)])], [], data._c, 0, train_opts(1))
    with pytest.raises(RuntimeError, match="abf1.input"):
        fusion(np.zeros((2, 8, 1, 1), np.float32))
