"""kdcore.optim (C updates over the parameter block) vs torch.optim on the same parameters and
gradients, and learning-rate schedules vs torch.optim.lr_scheduler."""
import math

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import kdcore
from kdcore import nn as knn
from kdcore import optim as kopt
from kdcore.functional import cross_entropy
from checks import check_close  # noqa: E402


def _pair(kind):
    if kind == "mlp":
        k = kdcore.models.mlp([6, 5, 3])
        t = tnn.Sequential(tnn.Flatten(), tnn.Linear(6, 5), tnn.ReLU(), tnn.Linear(5, 3))
        xshape = (6,)
    else:
        # no conv biases before BN: their gradients are pure float cancellation noise (~0),
        # which Adam would normalise into O(lr) steps of random sign
        k = knn.Sequential(knn.Conv2d(3, 4, 3, padding=1, bias=False), knn.BatchNorm2d(4), knn.ReLU(),
                           knn.MaxPool2d(2),
                           knn.Conv2d(4, 6, 3, padding=1, bias=False), knn.BatchNorm2d(6), knn.ReLU(),
                           knn.AdaptiveAvgPool2d(1), knn.Flatten(), knn.Linear(6, 3))
        t = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1, bias=False), tnn.BatchNorm2d(4), tnn.ReLU(),
                           tnn.MaxPool2d(2),
                           tnn.Conv2d(4, 6, 3, padding=1, bias=False), tnn.BatchNorm2d(6), tnn.ReLU(),
                           tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(6, 3))
        xshape = (3, 6, 6)
    sd = k.state_dict()
    assert list(sd) == list(t.state_dict())
    # non-trivial BN affine parameters
    rng = np.random.default_rng(1)
    for name, v in sd.items():
        if v.ndim == 1 and v.dtype == np.float32 and name.endswith("weight"):
            sd[name] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif v.ndim == 1 and v.dtype == np.float32 and name.endswith("bias"):
            sd[name] = (rng.standard_normal(v.shape) * 0.3).astype(np.float32)
    k.load_state_dict(sd)
    t.load_state_dict({n: torch.tensor(v) for n, v in k.state_dict().items()})
    return k, t, xshape


_TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
_KD = {"SGD": kopt.SGD, "Adam": kopt.Adam, "AdamW": kopt.AdamW}

_CONFIGS = [
    ("SGD", dict(lr=0.1, momentum=0.0, weight_decay=0.0)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.0)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.0)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("SGD", dict(lr=0.1, momentum=0.0, weight_decay=0.05)),
    ("SGD", dict(lr=0.1, momentum=0.5, weight_decay=0.05)),
    ("Adam", dict(lr=0.01, weight_decay=0.0)),
    ("Adam", dict(lr=0.01, weight_decay=0.05)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.0)),
    ("AdamW", dict(lr=0.01, betas=(0.5, 0.9), eps=1e-4, weight_decay=1e-2)),
]


def _cfg_id(c):
    name, kw = c
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _run(kind, opt_name, kw, decay_bn_and_bias=True, lr_factors=(1, 1, 1, 1, 1), rtol=1e-5, atol=2e-6):
    rng = np.random.default_rng(7)
    k, t, xshape = _pair(kind)
    k.train()
    t.train()
    kd_opt = _KD[opt_name](decay_bn_and_bias=decay_bn_and_bias, **kw).bind(k)
    tkw = dict(kw)
    wd = tkw.pop("weight_decay", 0.0)
    if decay_bn_and_bias:
        groups = [{"params": list(t.parameters()), "weight_decay": wd}]
    else:
        groups = [{"params": [p for p in t.parameters() if p.ndim > 1], "weight_decay": wd},
                  {"params": [p for p in t.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    t_opt = _TORCH[opt_name](groups, **tkw)   # foreach/fused default off on CPU: single-tensor loop
    base = kw["lr"]
    for step, f in enumerate(lr_factors):
        x = rng.standard_normal((8,) + xshape).astype(np.float32)
        y = rng.integers(0, 3, 8).astype(np.int64)
        lr = base * f
        # kdcore
        k.zero_grad()
        out = k(x)
        loss, dlogits = cross_entropy(out, y)
        k.backward(dlogits, input_grad=False)
        kd_opt.step(lr)
        # torch
        t_opt.zero_grad()
        for g in t_opt.param_groups:
            g["lr"] = lr
        t_out = t(torch.tensor(x))
        t_loss = TF.cross_entropy(t_out, torch.tensor(y))
        t_loss.backward()
        t_opt.step()
        assert abs(loss - t_loss.item()) <= 1e-5 * abs(t_loss.item()) + 1e-6, (step, loss, t_loss.item())
        kp = k.parameters()
        for name, p in t.named_parameters():
            check_close(f"step {step + 1}: {name}", kp[name], p.detach().numpy(), rtol=rtol, atol=atol)
    ks = k.state_dict()
    for name, v in t.state_dict().items():
        if "running" in name:
            check_close(f"{name} after {len(lr_factors)} steps", ks[name], v.numpy(), rtol, atol)
        elif "num_batches" in name:
            assert int(ks[name]) == int(v)


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("kind", ["mlp", "convbn"])
def test_optimizer_matches_torch(kind, cfg):
    _run(kind, *cfg)


@pytest.mark.parametrize("cfg", [c for c in _CONFIGS if c[1].get("weight_decay", 0) > 0], ids=_cfg_id)
def test_optimizer_no_decay_on_bn_and_bias(cfg):
    _run("convbn", *cfg, decay_bn_and_bias=False)


@pytest.mark.parametrize("cfg", [_CONFIGS[3], _CONFIGS[5], _CONFIGS[9], _CONFIGS[11]], ids=_cfg_id)
def test_optimizer_changing_lr(cfg):
    """lr passed per step (as a schedule does) is used as torch uses param_group['lr']."""
    _run("convbn", *cfg, lr_factors=(1.0, 0.5, 0.25, 1.0, 0.1))


def test_optimizer_zero_lr_keeps_params():
    for name, kw in _CONFIGS:
        k, _, xshape = _pair("mlp")
        opt = _KD[name](**kw).bind(k)
        before = {n: v.copy() for n, v in k.parameters().items()}
        out = k(np.ones((2,) + xshape, np.float32))
        k.backward(cross_entropy(out, np.array([0, 1]))[1])
        opt.step(0.0)
        for n, v in k.parameters().items():
            assert np.array_equal(v, before[n]), (name, kw, n)


def test_sgd_first_step_exact():
    """One plain SGD step is p - lr * (g + wd * p), elementwise in float32."""
    k, _, xshape = _pair("mlp")
    opt = kopt.SGD(lr=0.1, momentum=0.9, weight_decay=0.01).bind(k)
    out = k(np.linspace(-1, 1, 4 * 6, dtype=np.float32).reshape((4,) + xshape))
    k.backward(cross_entropy(out, np.array([0, 1, 2, 0]))[1])
    before = {n: v.copy() for n, v in k.parameters().items()}
    grads = {n: v.copy() for n, v in k.grads().items()}
    opt.step(0.1)
    for n, v in k.parameters().items():
        d = grads[n] + np.float32(0.01) * before[n]
        check_close(n, v, before[n] + np.float32(-0.1) * d, rtol=1e-7, atol=1e-8)


def test_optimizer_argument_errors():
    with pytest.raises(ValueError):
        kopt.SGD(lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError):
        kopt.SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError):
        kopt.SGD(lr=-1.0)
    with pytest.raises(ValueError):
        kopt.Adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError):
        kopt.SGD().bind(object())


# ---------------------------------------------------------------------------------------
# schedules


def _torch_lrs(make_sched, base, epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = make_sched(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


@pytest.mark.parametrize("milestones,gamma", [([2, 4], 0.1), ([3, 3, 7], 0.5), ([0, 5], 0.2), ([], 0.1), ([12], 0.1)])
def test_multistep_schedule(milestones, gamma):
    base, epochs = 0.1, 10
    s = kopt.MultiStep(milestones, gamma=gamma)
    got = np.array([s.lr(base, e, epochs) for e in range(epochs)])
    want = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones, gamma=gamma), base, epochs)
    check_close("MultiStep lr", got, want, rtol=1e-6)
    # constant within an epoch
    assert all(s.lr(base, 3, epochs, step=i, steps_per_epoch=7) == got[3] for i in range(7))


@pytest.mark.parametrize("T_max,min_lr,epochs", [(10, 0.0, 10), (10, 1e-3, 10), (None, 0.0, 10), (25, 0.0, 10),
                                                  (3, 0.0, 10), (4, 0.01, 10)])
def test_cosine_schedule(T_max, min_lr, epochs):
    base = 0.1
    s = kopt.Cosine(T_max=T_max, min_lr=min_lr)
    got = np.array([s.lr(base, e, epochs) for e in range(epochs)])
    want = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T_max or epochs, eta_min=min_lr),
                      base, epochs)
    check_close("Cosine lr", got, want, rtol=1e-5, atol=1e-8)


def test_constant_schedule():
    s = kopt.Constant()
    assert all(abs(s.lr(0.05, e, 10, step=i, steps_per_epoch=3) - 0.05) < 1e-9 for e in range(10) for i in range(3))


@pytest.mark.parametrize("sched", [
    kopt.Constant(warmup_epochs=2),
    kopt.Constant(warmup_epochs=1),
    kopt.MultiStep([1, 3], gamma=0.1, warmup_epochs=2),
    kopt.Cosine(T_max=6, warmup_epochs=2),
], ids=["const-w2", "const-w1", "multistep-w2", "cosine-w2"])
@pytest.mark.parametrize("steps_per_epoch", [1, 5])
def test_warmup(sched, steps_per_epoch):
    base, epochs = 0.2, 6
    w = sched.warmup_epochs * steps_per_epoch
    bare = {kopt.Constant: lambda: kopt.Constant(),
            kopt.MultiStep: lambda: kopt.MultiStep(sched.milestones, sched.gamma),
            kopt.Cosine: lambda: kopt.Cosine(T_max=sched.T_max)}[type(sched)]()
    for e in range(epochs):
        for s in range(steps_per_epoch):
            g = e * steps_per_epoch + s
            want = bare.lr(base, e, epochs, s, steps_per_epoch) * min(1.0, (g + 1) / w)
            if isinstance(sched, kopt.Constant):
                assert math.isclose(want, base * min(1.0, (g + 1) / w), rel_tol=1e-6)
            got = sched.lr(base, e, epochs, s, steps_per_epoch)
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12), (e, s, got, want)
