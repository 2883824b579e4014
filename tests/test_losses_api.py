"""kdcore.distill over loss terms (kdcore.losses): composition, the methods' recipes,
connectors, the two-stage FitNet, checkpoints, and errors.

The torch reference writes the same step by hand on the same weights (float64): the student
and its connector (RepDistiller's ConvReg) trained together on CE + hint.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import kdcore
from kdcore import losses as L

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)
V = 4
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def pair():
    r = np.random.default_rng(11)
    X = r.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, 64)
    X[np.arange(64), 0, y, :] += 1.0
    data = kdcore.datasets.from_arrays(X, y, num_classes=V, normalize=None)
    teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=6, seed=1)
    kdcore.fit(teacher, data, epochs=2, batch_size=16, progress=False)
    return X, y, data, teacher


def run(student, teacher, data, **kw):
    kw = dict(dict(epochs=1, batch_size=len(data), progress=False, optimizer=kdcore.optim.SGD(**SGD)), **kw)
    return kdcore.distill(student, teacher, data, **kw)


def test_losses_kd_equals_method_kd_bitwise(pair):
    """CE + KD written as terms gives the bits of method='kd' (the scheme's own configuration)."""
    _, _, data, teacher = pair
    a = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    b = a.copy()
    ha = run(a, teacher, data, method="kd", epochs=2, batch_size=16)
    hb = run(b, teacher, data, losses=[L.CE(0.1), L.KD(0.9, T=4.0)], epochs=2, batch_size=16)
    for k, v in a.state_dict().items():
        assert np.array_equal(v, b.state_dict()[k]), k
    assert ha["train_loss"] == hb["train_loss"] and ha["kd"] == hb["kd"] and ha["ce"] == hb["ce"]


def test_fitnet_step_vs_torch(pair):
    """method='fitnet': CE + 100 * MSE(ConvReg(f2_s), f2_t); one full-batch SGD step of the
    student and of the regressor (3x3 conv + BN + ReLU, equal map sizes) equals torch's."""
    X, y, data, teacher = pair
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    s0 = student.state_dict()
    h = run(student, teacher, data, method="fitnet")
    (conn,) = student.connectors
    ts = torch_ref.torch_cnn(V, 1, 4).double()
    torch_ref.load_into_torch(ts, s0)
    tt = torch_ref.torch_cnn(V, 1, 6).double()
    torch_ref.load_into_torch(tt, teacher.state_dict())
    tt.eval()
    tc = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()).double()
    c0 = kdcore.losses.connector("convreg", (8, 4, 4), (12, 4, 4))
    c0.reset_parameters(0)
    torch_ref.load_into_torch(tc, c0.state_dict())
    feats = {}
    ts[12].register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    tt[12].register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    opt = torch.optim.SGD(list(ts.parameters()) + list(tc.parameters()), **SGD)
    ts.train(); tc.train()
    x, yt = torch.tensor(X, dtype=torch.float64), torch.tensor(y)
    with torch.no_grad():
        tt(x)
    ce = TF.cross_entropy(ts(x), yt)
    hint = TF.mse_loss(tc(feats["s"]), feats["t"])
    (ce + 100 * hint).backward()
    opt.step()
    check_models("student", student, ts, s0)
    # The regressor's conv bias feeds a BN, which cancels it: its exact gradient is 0 and its
    # update is weight decay alone, so float32 rounding of the (zero) gradient is compared
    # with the scale of the layer's weight gradient instead of its own.
    csd, c0sd, tsd = conn.state_dict(), c0.state_dict(), torch_ref.to_numpy_state(tc)
    w_scale = np.abs(tsd["0.weight"] - c0sd["0.weight"]).max()
    check_close("connector.0.bias update", csd["0.bias"] - c0sd["0.bias"], tsd["0.bias"] - c0sd["0.bias"],
                atol=1e-4 * w_scale)
    conn_rest, tc_rest = {k: v for k, v in csd.items() if k != "0.bias"}, dict(tsd)
    for k, v in conn_rest.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(tc_rest[k])
            continue
        b = c0sd[k].astype(np.float64)
        d_t = tc_rest[k].reshape(v.shape) - b
        check_close(f"connector.{k} update", v - b, d_t, atol=1e-4 * np.abs(d_t).max() + 2.4e-7 * np.abs(b).max())
    check_close("ce", h["ce"][0], ce.item())
    check_close("hint", h["hint"][0], hint.item())
    check_close("train_loss", h["train_loss"][0], ce.item() + 100 * hint.item())


def test_two_stage_fitnet_restores_layers_past_the_hint(pair):
    """Stage 1 trains the student up to the hint layer on the hint alone; the layers past it
    (which only weight decay moved) are put back before stage 2 (KD). Checked against the same
    stages run by hand: equal bits with the restore, different bits without it."""
    _, _, data, teacher = pair
    from kdcore.distill import _nodes_past
    kw = dict(batch_size=16, progress=False, optimizer=kdcore.optim.SGD(**SGD))
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    s0 = student.state_dict()
    past = _nodes_past(student, student._tap_index("12"))
    assert past == {"13", "14", "15", "16"}
    h = kdcore.distill(student, teacher, data, method="fitnet", hint_epochs=2, epochs=1, **kw)
    assert h["stage"] == [0, 0, 1] and np.isnan(h["hint"][2]) and np.isnan(h["kd"][0])

    def by_hand(restore):
        m = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
        kdcore.distill(m, teacher, data, losses=[L.FitNet(100.0)], epochs=2, **kw)
        sd = m.state_dict()
        assert not np.array_equal(sd["16.weight"], s0["16.weight"])   # weight decay moved it
        if restore:
            sd.update({k: s0[k] for k in sd if k.rsplit(".", 1)[0] in past})
            m.load_state_dict(sd)
        kdcore.distill(m, teacher, data, method="kd", epochs=1, **kw)
        return m.state_dict()

    got, want, unrestored = student.state_dict(), by_hand(True), by_hand(False)
    assert all(np.array_equal(got[k], want[k]) for k in got)
    assert not np.array_equal(got["16.weight"], unrestored["16.weight"])


def test_history_labels_and_schedules(pair):
    _, _, data, teacher = pair
    s = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    h = run(s, teacher, data, losses=[L.CE(1.0), L.KD(0.5, T=2.0), L.KD(0.5, T=8.0, stop_epoch=1),
                                      L.DKD(1.0, warmup_epochs=4)], epochs=2, batch_size=32)
    for key in ("ce", "kd", "kd_2", "kd_2_weight", "dkd", "tckd", "nckd", "dkd_weight", "teacher_train_acc"):
        assert key in h, key
    assert h["kd_2_weight"] == [0.5, 0.0] and h["kd_2"][1] == 0.0
    assert h["dkd_weight"] == pytest.approx([0.25, 0.5])


def test_checkpoint_resume_with_connector_is_bitwise(pair, tmp_path):
    """2 epochs straight == 1 epoch, checkpoint, resume for the second: student and connector."""
    _, _, data, teacher = pair
    a = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    b = a.copy()
    run(a, teacher, data, method="fitnet", epochs=2, batch_size=16)
    ck = str(tmp_path / "fitnet.safetensors")
    run(b, teacher, data, method="fitnet", epochs=2, batch_size=16, checkpoint=ck, max_steps=None,
        callback=lambda epoch, row: epoch == 0)
    c = a.copy()
    c.load_state_dict(b.state_dict())
    d = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    run(d, teacher, data, method="fitnet", epochs=2, batch_size=16, checkpoint=ck, resume=True)
    for k, v in a.state_dict().items():
        assert np.array_equal(v, d.state_dict()[k]), k
    for k, v in a.connectors[0].state_dict().items():
        assert np.array_equal(v, d.connectors[0].state_dict()[k]), k


def test_errors_name_the_problem(pair):
    _, _, data, teacher = pair
    s = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    with pytest.raises(ValueError, match="method must be one of .*kdcore.mutual"):
        run(s, teacher, data, method="mutual")
    with pytest.raises(ValueError, match="conditional apply to method='kd'"):
        run(s, teacher, data, losses=[L.CE()], conditional=True)
    with pytest.raises(TypeError, match=r"losses\[1\] must be a kdcore.losses term"):
        run(s, teacher, data, losses=[L.CE(), "kd"])
    with pytest.raises(KeyError, match="no tap named 'nope'"):
        run(s, teacher, data, losses=[L.Hint(student_tap="nope")])
    with pytest.raises(ValueError, match="has no default 'hint' tap"):
        user = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(64, V))
        run(user, teacher, data, losses=[L.Hint()])
    with pytest.raises(ValueError, match=r"Hint: the student side gives \(8, 4, 4\)"):
        run(s, teacher, data, losses=[L.Hint(connector=None)])
    with pytest.raises(ValueError, match="two-stage form of method='fitnet'"):
        run(s, teacher, data, method="kd", losses=[L.CE()], hint_epochs=1)


def test_user_built_models_name_their_taps(pair):
    """A model of the user's own (no default taps) distils from the zoo teacher by naming
    taps: AT between its conv block and the teacher's stage map, RKD on the pooled features.
    Without names the error says how to give them."""
    _, _, data, teacher = pair
    nn_ = kdcore.nn
    user = nn_.Sequential(nn_.Conv2d(1, 5, 3, padding=1), nn_.ReLU(), nn_.MaxPool2d(2), nn_.Conv2d(5, 7, 3, padding=1),
                          nn_.ReLU(), nn_.AdaptiveAvgPool2d(1), nn_.Flatten(), nn_.Linear(7, V))
    h = run(user, teacher, data, losses=[L.CE(1.0), L.AT(100.0, taps=["1", "4"], teacher_taps=["5", "12"]),
                                         L.RKD(1.0, taps="6", teacher_taps="15")], epochs=2, batch_size=16)
    assert set(h) >= {"at", "at_2", "rkd", "rkd_dist", "rkd_angle"} and np.all(np.isfinite(h["at_2"]))
    with pytest.raises(ValueError, match="name its taps"):
        run(user, teacher, data, losses=[L.AT()])
    with pytest.raises(ValueError, match="2 student taps .* but 1 teacher"):
        run(user, teacher, data, losses=[L.AT(taps=["1", "4"], teacher_taps=["5"])])
