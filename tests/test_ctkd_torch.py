"""CTKD (Li et al., AAAI 2023; global temperature) vs PyTorch autograd (float64): the loss's
value and both gradients (student logits, temperature), the temperature mapping and the
curriculum, full distillation steps at two epochs of the curriculum (student and temperature,
the temperature's gradient reversed and scaled by lambda), checkpoint/resume of the
temperature, and refused options.

The reference is written here from the paper's definition in the form of the authors' code:
T = t_start + t_range * sigmoid(p), KD at T (T^2 batch-mean KL), p behind a gradient-reversal
layer (identity forward, -lambda * gradient backward), lambda a cosine ramp over epochs."""
import math
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
import torch_ref  # noqa: E402
from test_connector_methods_torch import SGD, V, Pair, data  # noqa: E402,F401
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)


def t_kd(zs, zt, T):
    """The teacher's side as log-probabilities, so that classes whose probability underflows
    (tiny T) give finite gradients."""
    return T * T * TF.kl_div(TF.log_softmax(zs / T, 1), TF.log_softmax(zt / T, 1), reduction="batchmean",
                             log_target=True)


class Reverse(torch.autograd.Function):
    """Identity forward; the gradient times -lam backward."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


def logits(rng, n, v, scale=2.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


def reference(zs, zt, T):
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    ref = t_kd(s, torch.tensor(zt, dtype=torch.float64), tt)
    ref.backward()
    return ref.item(), s.grad.numpy(), tt.grad.item()


def check_loss(zs, zt, T, rtol=1e-5):
    loss, ds, dT = F.ctkd_loss(zs, zt, T)
    ref, g, gT = reference(zs, zt, T)
    assert np.isfinite(loss) and np.isfinite(dT) and np.all(np.isfinite(ds))
    check_close("loss", loss, ref, rtol=rtol, atol=1e-6 * max(abs(ref), 1e-3))
    check_close("dstudent", ds, g, rtol=10 * rtol, atol=1e-5 * max(np.abs(g).max(), 1e-9))
    check_close("dT", dT, gT, rtol=10 * rtol, atol=1e-6 * max(abs(gT), 1e-6))


@pytest.mark.parametrize("n", [1, 2, 64])
@pytest.mark.parametrize("T", [1.0, 4.0, 15.6])
def test_ctkd_loss(n, T, rng):
    check_loss(logits(rng, n, 10), logits(rng, n, 10, 4.0), T)


@pytest.mark.parametrize("case", ["tiny T", "large T", "large logits", "equal"])
def test_ctkd_loss_hard_cases(case, rng):
    zs, zt, T = logits(rng, 8, 10), logits(rng, 8, 10, 4.0), 4.0
    if case == "tiny T":
        T = 0.02
    elif case == "large T":
        T = 500.0
    elif case == "large logits":
        zs, zt = logits(rng, 8, 10, 60.0), logits(rng, 8, 10, 60.0)
    else:
        zt = zs.copy()
    check_loss(zs, zt, T, rtol=1e-4)


def test_ctkd_temperature_and_curriculum():
    for p in [-3.0, 0.0, 1.0, 2.5]:
        x = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        T = 1.0 + 20.0 * torch.sigmoid(x)
        T.backward()
        got, d = F.ctkd_temperature(p)
        check_close("T", got, T.item(), rtol=1e-7)
        check_close("dT/dp", d, x.grad.item(), rtol=1e-7)
    assert F.ctkd_temperature(1.0, t_start=2.0, t_range=0.0) == (2.0, 0.0)
    # the authors' cosine ramp from 0 to 1 over 10 epochs, at the 1-based epoch, then held
    want = [(1 - math.cos(math.pi * min(e + 1, 10) / 10)) / 2 for e in range(14)]
    check_close("lambda", np.array([F.ctkd_lambda(e) for e in range(14)]), np.array(want), rtol=1e-12, atol=1e-15)
    check_close("lambda range", F.ctkd_lambda(1, lambda_min=0.5, lambda_max=3.0, decay_epochs=2), 3.0, rtol=1e-12)
    check_close("lambda mid", F.ctkd_lambda(0, lambda_min=0.5, lambda_max=3.0, decay_epochs=2), 1.75, rtol=1e-12)


OPTS = dict(t_start=1.0, t_range=10.0, init=-1.0, lambda_min=0.5, lambda_max=3.0, decay_epochs=2)


def test_ctkd_steps_at_two_curriculum_epochs(data):
    """Two epochs of one full-batch step each: lambda 1.75 then 3. The student and the
    temperature's parameter follow PyTorch's SGD on CE + CTKD with the reversal layer."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    pair = Pair(student, teacher)
    h = kdcore.distill(student, teacher, ds, losses=[L.CE(0.1), L.CTKD(0.9, **OPTS)], epochs=2, batch_size=len(ds),
                       progress=False, optimizer=kdcore.optim.SGD(**SGD), schedule="constant")
    p = torch.tensor([OPTS["init"]], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(list(pair.ts.parameters()) + [p], **SGD)
    zt = pair.tt(torch.tensor(X, dtype=torch.float64)).detach()
    Ts, lams, vals = [], [], []
    for epoch in range(2):
        lam = F.ctkd_lambda(epoch, OPTS["lambda_min"], OPTS["lambda_max"], OPTS["decay_epochs"])
        opt.zero_grad()
        z = pair.forward(X)
        T = OPTS["t_start"] + OPTS["t_range"] * torch.sigmoid(Reverse.apply(p, lam))
        d = t_kd(z, zt, T)
        (0.1 * TF.cross_entropy(z, torch.tensor(y)) + 0.9 * d).backward()
        opt.step()
        vals.append(d.item())
        lams.append(lam)
        Ts.append(OPTS["t_start"] + OPTS["t_range"] * torch.sigmoid(p).item())
    check_close("lambda", np.array(lams), np.array([1.75, 3.0]), rtol=1e-12)
    check_models("student", student, pair.ts, pair.s0)
    holder = student.connectors[0].parameters()["0.weight"]
    dp_k, dp_t = float(holder.reshape(-1)[0]) - OPTS["init"], p.item() - OPTS["init"]
    assert abs(dp_t) > 1e-4   # the temperature moved enough to tell the directions apart
    check_close("temperature parameter update", dp_k, dp_t, rtol=1e-4, atol=1e-6)
    check_close("ctkd", np.array(h["ctkd"]), np.array(vals), rtol=1e-4)
    check_close("ctkd_T", np.array(h["ctkd_T"]), np.array(Ts), rtol=1e-5)
    assert list(h["ctkd_lambda"]) == lams


def test_ctkd_checkpoint_resume(data, tmp_path):
    """2 epochs straight equal 1 epoch, checkpoint, resume: the temperature is in the file and
    comes back (a restart from p = init would give another second epoch)."""
    _, _, ds = data
    teacher = teacher_of(6)
    mk = lambda: kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)  # noqa: E731
    terms = lambda: [L.CE(0.1), L.CTKD(0.9, **OPTS)]  # noqa: E731
    kw = dict(epochs=2, batch_size=8, progress=False, optimizer=kdcore.optim.SGD(**SGD))
    a = mk()
    ha = kdcore.distill(a, teacher, ds, losses=terms(), **kw)
    ck = str(tmp_path / "ctkd.safetensors")
    b = mk()
    hb = kdcore.distill(b, teacher, ds, losses=terms(), checkpoint=ck, callback=lambda e, row: e == 0, **kw)
    saved = kdcore.load(ck)["models"]
    pb = float(b.connectors[0].parameters()["0.weight"].reshape(-1)[0])
    held = [v for role, sd in saved.items() if role != "student" for v in sd.values()]
    assert len(held) == 1 and held[0].size == 1 and float(held[0].reshape(-1)[0]) == pb != OPTS["init"]
    c = mk()
    hc = kdcore.distill(c, teacher, ds, losses=terms(), checkpoint=ck, resume=True, **kw)
    for k, v in a.state_dict().items():
        assert np.array_equal(v, c.state_dict()[k]), k
    assert list(hc["ctkd_T"]) == list(ha["ctkd_T"])
    assert hb["ctkd_T"][0] == ha["ctkd_T"][0] != ha["ctkd_T"][1]


def test_ctkd_method_recipe(data):
    terms = L.method_terms("ctkd")
    assert [type(t).__name__ for t in terms] == ["CE", "CTKD"]
    c = terms[1]
    assert (terms[0].weight, c.weight, c.t_start, c.t_range, c.init, c.lambda_min, c.lambda_max, c.decay_epochs) == \
        (0.1, 0.9, 1.0, 20.0, 1.0, 0.0, 1.0, 10)
    _, _, ds = data
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    h = kdcore.distill(student, teacher_of(6), ds, method="ctkd", epochs=1, batch_size=8, progress=False)
    check_close("initial T", F.ctkd_temperature(1.0)[0], 1 + 20 / (1 + math.exp(-1)), rtol=1e-7)
    assert np.isfinite(h["ctkd"][0]) and h["ctkd_T"][0] != F.ctkd_temperature(1.0)[0]
    check_close("ctkd_lambda", h["ctkd_lambda"][0], F.ctkd_lambda(0), rtol=1e-12)


@pytest.mark.parametrize("opt,value", [("t_start", 0.0), ("t_range", -1.0), ("decay_epochs", 0),
                                       ("lambda_min", float("nan")), ("lambda_max", float("inf")),
                                       ("init", float("nan"))])
def test_ctkd_refuses_bad_options(opt, value):
    with pytest.raises(ValueError, match=opt):
        L.CTKD(**{opt: value})


def test_ctkd_refusals(rng, data):
    z = logits(rng, 4, 5)
    with pytest.raises(ValueError, match="T"):
        F.ctkd_loss(z, z, 0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        F.ctkd_loss(z, z[:, :4], 4.0)
    with pytest.raises(ValueError, match="decay_epochs"):
        F.ctkd_lambda(0, decay_epochs=0)
    with pytest.raises(ValueError, match="epoch"):
        F.ctkd_lambda(-1)
    # the engine's own checks, reached past the Python class: each names the option
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    for opt, value, msg in [("t_start", -1.0, "t_start"), ("t_range", float("nan"), "t_range"),
                            ("decay_epochs", 0, "decay_epochs"), ("params", 0, "params")]:
        term = L.CTKD(0.9)
        base = term._base

        def bad(**kw):
            kw[opt] = value
            return base(**kw)
        term._base = bad
        with pytest.raises(ValueError, match=msg):
            kdcore.distill(student, teacher, ds, losses=[term], epochs=1, batch_size=8, progress=False)


# ---- the instance-wise temperature ---------------------------------------------------------

class TorchTempNet(torch.nn.Module):
    """models.ctkd_temperature(V, H): the student's and the teacher's logits concatenated,
    Linear -> ReLU -> Linear -> one value m per sample."""

    def __init__(self, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(2 * V, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def forward(self, zs, zt):
        return self.fc2(torch.relu(self.fc1(torch.cat([zs, zt], 1))))


def t_kd_rows(zs, zt, T):
    """mean_i T_i^2 KL(softmax(t_i/T_i) || softmax(s_i/T_i)), T of shape (N, 1)."""
    kl = TF.kl_div(TF.log_softmax(zs / T, 1), TF.log_softmax(zt / T, 1), reduction="none", log_target=True).sum(1)
    return (T[:, 0] ** 2 * kl).mean()


def test_ctkd_instance_steps_match_torch(data):
    """temperature="instance": two epochs (lambda 1.75 then 3). The student and the
    temperature net follow PyTorch's SGD on CE + CTKD with a temperature per sample,
    T_i = t_start + t_range * sigmoid(m_i), m = net([z_s, z_t]) read detached, the net behind
    the reversal layer; one full-batch step per epoch."""
    X, y, ds = data
    batch = len(X)
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    pair = Pair(student, teacher)
    opts = {k: v for k, v in OPTS.items() if k != "init"}
    term = L.CTKD(0.9, temperature="instance", hidden=8, seed=4, **opts)
    h = kdcore.distill(student, teacher, ds, losses=[L.CE(0.1), term], epochs=2, batch_size=batch,
                       progress=False, optimizer=kdcore.optim.SGD(**SGD), schedule="constant")
    net = kdcore.models.ctkd_temperature(V, 8, seed=4)
    n0 = net.state_dict()
    tnet = torch_ref.load_into_torch(TorchTempNet(8), n0).double()
    opt = torch.optim.SGD(list(pair.ts.parameters()) + list(tnet.parameters()), **SGD)
    zt_all = pair.tt(torch.tensor(X, dtype=torch.float64)).detach()
    vals, Ts, lams = [], [], []
    for epoch in range(2):
        lam = F.ctkd_lambda(epoch, OPTS["lambda_min"], OPTS["lambda_max"], OPTS["decay_epochs"])
        lams.append(lam)
        v = []
        for b in range(0, len(X), batch):
            opt.zero_grad()
            z, zt = pair.forward(X[b:b + batch]), zt_all[b:b + batch]
            m = tnet(z.detach(), zt)
            T = OPTS["t_start"] + OPTS["t_range"] * torch.sigmoid(Reverse.apply(m, lam))
            d = t_kd_rows(z, zt, T)
            (0.1 * TF.cross_entropy(z, torch.tensor(y[b:b + batch])) + 0.9 * d).backward()
            opt.step()
            v.append(d.item())
            Ts.append(T.detach().numpy().ravel())
        vals.append(np.mean(v))
    assert np.ptp(np.concatenate(Ts)) > 0.05   # the temperatures differ between samples
    check_models("student", student, pair.ts, pair.s0)
    check_models("temperature net", student.connectors[0], tnet, n0)
    check_close("ctkd", np.array(h["ctkd"]), np.array(vals), rtol=1e-4)
    check_close("lambda", np.array(lams), np.array([1.75, 3.0]), rtol=1e-12)
    assert list(h["ctkd_lambda"]) == lams and "ctkd_T" not in h.last


def test_ctkd_instance_refusals(data):
    with pytest.raises(ValueError, match="temperature"):
        L.CTKD(temperature="sample")
    with pytest.raises(ValueError, match="temperature"):
        L.CTKD(temperature=None)
    with pytest.raises(ValueError, match="hidden"):
        L.CTKD(temperature="instance", hidden=0)
    # the engine's checks past the Python class: the temperature must be one value per sample,
    # and `temp` belongs to CTKD terms only
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    term = L.CTKD(0.9, temperature="instance")
    base = term._base
    term._base = lambda **kw: base(**dict(kw, temp=(0, -1)))   # the student's logits: V values
    with pytest.raises(ValueError, match="ctkd.temp has 4 values"):
        kdcore.distill(student, teacher, ds, losses=[term], epochs=1, batch_size=8, progress=False)
    term._base = lambda **kw: base(**dict(kw, t_start=-1.0))   # the options are checked in this form too
    with pytest.raises(ValueError, match="t_start"):
        kdcore.distill(student, teacher, ds, losses=[term], epochs=1, batch_size=8, progress=False)
    kd = L.KD(1.0)
    kbase = kd._base
    kd._base = lambda **kw: kbase(**dict(kw, temp=(0, -1)))
    with pytest.raises(ValueError, match="temp is a CTKD option"):
        kdcore.distill(student, teacher, ds, losses=[kd], epochs=1, batch_size=8, progress=False)


@pytest.mark.parametrize("n", [1, 5])
def test_ctkd_loss_rows_matches_autograd(n, rng):
    """The loss with one temperature per row (kd_loss_ctkd_rows, through F.ctkd_loss with an
    array T): value, the logits' gradient and each row's dT_i against autograd, small and
    large temperatures mixed."""
    zs, zt = logits(rng, n, 7), logits(rng, n, 7, 4.0)
    T = np.array([0.5, 3.0, 15.6, 1.0, 40.0][:n], np.float32)
    loss, ds, dT = F.ctkd_loss(zs, zt, T)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    ref = t_kd_rows(s, torch.tensor(zt, dtype=torch.float64), tt[:, None])
    ref.backward()
    check_close("loss", loss, ref.item(), rtol=1e-5)
    check_close("dstudent", ds, s.grad.numpy(), rtol=1e-4, atol=1e-6 * np.abs(s.grad.numpy()).max())
    check_close("dT_i", dT, tt.grad.numpy(), rtol=1e-4, atol=1e-6 * np.abs(tt.grad.numpy()).max())
    one = F.ctkd_loss(zs, zt, float(T[0]))
    if n == 1:
        check_close("one row = the global form", dT[0], one[2], rtol=1e-6)
    with pytest.raises(ValueError, match=r"T\[0\]"):
        F.ctkd_loss(zs, zt, np.zeros(n, np.float32))
    with pytest.raises(ValueError, match="one temperature per row"):
        F.ctkd_loss(zs, zt, np.ones(n + 1, np.float32))
    with pytest.raises(TypeError, match="T"):
        F.ctkd_loss(zs, zt, np.ones(n, np.float64))
