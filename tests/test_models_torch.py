"""Parity of the kdcore zoo with PyTorch (tests/torch_ref.py): state-dict keys, eval and train
forward/backward, BN running statistics, taps and gradients injected at taps. The tests that
run the kernels do so on every instruction set of them this CPU has (conftest.every_isa)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import torch  # noqa: E402  (a test dependency: make test installs torch==2.13.0)
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from torch_ref import assert_close, load_into_torch, to_numpy_state  # noqa: E402

import kdcore  # noqa: E402

MLP_SIZES = [784, 1200, 1200, 10]

# (model, in_channels, input_size): every model at 28x28x1 (Fashion-MNIST) and 32x32x3 (CIFAR)
CASES = [
    ("resnet8x4", 1, 28), ("resnet8x4", 3, 32),
    ("resnet8", 1, 28), ("resnet8", 3, 32),
    ("wrn_16_2", 1, 28), ("wrn_16_2", 3, 32),
    ("vgg8", 1, 28), ("vgg8", 3, 32),
    ("cnn", 1, 28), ("cnn", 3, 32),
    ("mlp", 1, 28),
    ("resnet20", 3, 32), ("wrn_40_1", 1, 28), ("vgg13", 3, 32),
]
NAMES = list(kdcore.models.names())      # the state-dict test covers the whole zoo


def _ids(case):
    return f"{case[0]}-{case[1]}x{case[2]}"


def build_pair(name, cin=1, size=28, seed=0, randomize_bn=True, num_classes=10):
    """kdcore model and its torch twin holding kdcore's parameters (kdcore -> torch).

    With randomize_bn, BN affine parameters and running statistics are first set to random
    values (the defaults 1/0/0/1 would hide errors in their use)."""
    if name == "mlp":
        km = kdcore.models.get("mlp", sizes=MLP_SIZES, seed=seed)
        tm = torch_ref.build("mlp", sizes=MLP_SIZES)
    else:
        km = kdcore.models.get(name, num_classes=num_classes, in_channels=cin, input_size=size, seed=seed)
        tm = torch_ref.build(name, num_classes=num_classes, in_channels=cin)
    if randomize_bn:
        rng = np.random.default_rng(seed + 1)
        sd = km.state_dict()
        for k, v in sd.items():
            if k.endswith("running_mean") or k.endswith(".bias") and k.replace(".bias", ".running_mean") in sd:
                sd[k] = (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
            elif k.endswith("running_var") or k.endswith(".weight") and k.replace(".weight", ".running_var") in sd:
                sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        km.load_state_dict(sd)
    load_into_torch(tm, km.state_dict())
    return km, tm


def inputs(cin, size, n, seed=0):
    rng = np.random.default_rng(100 + seed)
    return rng.standard_normal((n, cin, size, size)).astype(np.float32)


def torch_forward_backward(tm, x, dout, train, km=None, extra_loss=None):
    """Torch forward + backward of sum(dout * logits) (+ extra_loss(tm)). With ``km`` (a kdcore
    model right after its forward on the same x), ReLU/max-pool kinks follow kdcore's
    (torch_ref.route: near-ties only, checked)."""
    tm.train(train)
    tm.zero_grad(set_to_none=True)
    if km is not None:
        torch_ref.route(tm, km)
    try:
        xt = torch.tensor(x, requires_grad=True)
        out = tm(xt)
        loss = (out * torch.from_numpy(dout)).sum()
        if extra_loss is not None:
            loss = loss + extra_loss(tm)
        loss.backward()
    finally:
        torch_ref.unroute(tm)
    return out.detach().numpy(), xt.grad.numpy()


def bias_before_train_bn(km):
    """Parameter keys of biases of layers feeding a BatchNorm directly (VGG's conv biases).
    With batch statistics their gradient is exactly zero in exact arithmetic (BN removes
    the per-channel mean), so both sides hold only rounding noise; they are compared to
    the scale of the layer's weight gradient instead."""
    g = km._graph
    feeds_bn = {g.nodes[i][2] for i, k in enumerate(g.kinds) if k == kdcore.nn._BATCHNORM}
    return {km._key(g.names[i]) + ".bias" for i in feeds_bn if i >= 0 and g.nodes[i][10]}


def check_param_grads(what, km, tm, rtol=1e-3, train=True):
    grads = km.grads()
    tparams = dict(tm.named_parameters())
    assert set(grads) == set(tparams)
    noise_only = bias_before_train_bn(km) if train else set()
    for k, p in tparams.items():
        ref = p.grad.numpy()
        if k in noise_only:
            wscale = float(np.abs(tparams[k[:-len("bias")] + "weight"].grad.numpy()).max())
            assert_close(f"{what} grad {k} (zero up to rounding)", grads[k], ref, rtol=0, atol=1e-4 * wscale)
        else:
            assert_close(f"{what} grad {k}", grads[k], ref, rtol=rtol)


def logit_scale(ref):
    return max(float(np.abs(ref).max()), 1e-3)


# ------------------------------------------------------------------------------------------
# State dicts


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes(name):
    km, tm = build_pair(name, randomize_bn=False)
    ks = {k: v.shape for k, v in km.state_dict().items()}
    ts = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert set(ks) == set(ts), (f"only kdcore: {sorted(set(ks) - set(ts))[:8]}; "
                                f"only torch: {sorted(set(ts) - set(ks))[:8]}")
    bad = [(k, ks[k], ts[k]) for k in ks if ks[k] != ts[k]]
    assert not bad, f"shape mismatches (key, kdcore, torch): {bad[:8]}"
    # The trainable parameters too (grads() and named_parameters() use the same names).
    assert set(dict(km.named_parameters())) == set(dict(tm.named_parameters()))


@pytest.mark.usefixtures("every_isa")
@pytest.mark.parametrize("name,cin,size", [("resnet8x4", 3, 32), ("wrn_16_2", 1, 28), ("vgg8", 1, 28), ("cnn", 1, 28)])
def test_load_torch_state_dict(name, cin, size):
    """torch -> kdcore: torch's own init (with trained-looking BN stats), as tensors and as
    numpy arrays; then eval logits agree."""
    tm = torch_ref.build(name, in_channels=cin)
    with torch.no_grad():   # give the BN buffers non-trivial values, and a count
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
                mod.num_batches_tracked.fill_(7)
    x = inputs(cin, size, 3)
    tm.eval()
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    for as_numpy in (False, True):
        km = kdcore.models.get(name, in_channels=cin, input_size=size, seed=3)
        sd = to_numpy_state(tm) if as_numpy else tm.state_dict()
        km.load_state_dict(sd)
        got = km.state_dict()
        for k, v in to_numpy_state(tm).items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got[next(k for k in got if k.endswith("num_batches_tracked"))].dtype == np.int64
        km.eval()
        assert_close(f"{name} logits (torch state, numpy={as_numpy})", km(x), ref, rtol=1e-4, scale=logit_scale(ref))


def test_kdcore_init_matches_repdistiller_statistics():
    """kdcore's init follows RepDistiller: kaiming fan_out convs, BN 1/0, default/zero/N(0,.01) heads."""
    m = kdcore.models.resnet8x4(in_channels=3, input_size=32)
    p = m.state_dict()
    w = p["layer3.0.conv2.weight"]                          # 256x256x3x3: fan_out = 256*9
    assert abs(w.std() - np.sqrt(2.0 / (256 * 9))) < 0.05 * np.sqrt(2.0 / (256 * 9))
    assert np.all(p["layer1.0.bn1.weight"] == 1) and np.all(p["layer1.0.bn1.bias"] == 0)
    b = 1 / np.sqrt(256)                                    # fc: PyTorch default U(-1/sqrt(fan_in), ...)
    assert np.abs(p["fc.weight"]).max() <= b and np.abs(p["fc.bias"]).max() <= b and np.abs(p["fc.bias"]).max() > 0
    w = kdcore.models.wrn_16_2().state_dict()
    assert np.all(w["fc.bias"] == 0) and np.abs(w["fc.weight"]).max() > 0
    v = kdcore.models.vgg8(seed=5)
    s = v.state_dict()
    assert np.all(s["classifier.bias"] == 0) and np.all(s["block0.0.bias"] == 0)
    assert abs(s["classifier.weight"].std() - 0.01) < 0.001
    # deterministic in the seed, and reset_parameters re-applies the Python-side init
    assert np.array_equal(kdcore.models.vgg8(seed=5).state_dict()["classifier.weight"], s["classifier.weight"])
    v.reset_parameters(6)
    assert not np.array_equal(v.state_dict()["classifier.weight"], s["classifier.weight"])
    v.reset_parameters(5)
    assert np.array_equal(v.state_dict()["classifier.weight"], s["classifier.weight"])


# ------------------------------------------------------------------------------------------
# Eval mode: logits and input gradient, batch 1 and 5


@pytest.mark.usefixtures("every_isa")
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_eval_parity(case):
    name, cin, size = case
    km, tm = build_pair(name, cin, size)
    km.eval()
    for n in (1, 5):
        x = inputs(cin, size, n, seed=n)
        dout = np.random.default_rng(n).standard_normal((n, 10)).astype(np.float32)
        out = km(x)
        km.zero_grad()
        dx = km.backward(dout)
        ref, ref_dx = torch_forward_backward(tm, x, dout, train=False, km=km)
        assert out.shape == ref.shape
        assert_close(f"{name} eval logits (N={n})", out, ref, rtol=1e-4, scale=logit_scale(ref))
        assert dx.shape == x.shape
        assert_close(f"{name} eval dx (N={n})", dx, ref_dx, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Train mode: batch statistics, every parameter gradient, running statistics


@pytest.mark.usefixtures("every_isa")
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_train_parity(case):
    name, cin, size = case
    km, tm = build_pair(name, cin, size)
    n = 5
    x = inputs(cin, size, n, seed=7)
    dout = np.random.default_rng(7).standard_normal((n, 10)).astype(np.float32)
    km.train()
    km.zero_grad()
    out = km(x)
    dx = km.backward(dout)
    ref, ref_dx = torch_forward_backward(tm, x, dout, train=True, km=km)
    assert_close(f"{name} train logits", out, ref, rtol=1e-3, scale=logit_scale(ref))
    assert_close(f"{name} train dx", dx, ref_dx, rtol=1e-3)
    check_param_grads(name, km, tm)
    # running statistics after one training forward (PyTorch: unbiased variance, momentum 0.1)
    ksd, tsd = km.state_dict(), to_numpy_state(tm)
    for k, v in tsd.items():
        if k.endswith("num_batches_tracked"):
            assert int(ksd[k]) == int(v) == 1, f"{k}: kdcore {ksd[k]}, torch {v}"
        elif k.endswith("running_mean") or k.endswith("running_var"):
            assert_close(f"{name} {k}", ksd[k], v, rtol=1e-4)


@pytest.mark.usefixtures("every_isa")
def test_train_parity_batch2_and_grad_accumulation():
    """Smallest BN batch; backward twice accumulates like torch (no zero_grad between)."""
    km, tm = build_pair("resnet8", 1, 28, seed=4)
    x = inputs(1, 28, 2, seed=11)
    dout = np.random.default_rng(11).standard_normal((2, 10)).astype(np.float32)
    km.train()
    km.zero_grad()
    km(x)
    dx = km.backward(dout)
    ref, ref_dx = torch_forward_backward(tm, x, dout, train=True, km=km)
    assert_close("dx (N=2)", dx, ref_dx, rtol=1e-3)
    check_param_grads("resnet8 N=2", km, tm)
    g1 = {k: v.copy() for k, v in km.grads().items()}
    km(x)
    km.backward(dout)
    for k, v in km.grads().items():
        assert_close(f"accumulated grad {k}", v, 2 * g1[k], rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Taps


def test_resnet_taps_listed():
    m = kdcore.models.resnet20()
    taps = set(m.taps())
    for t in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer1.0", "layer1.0.add", "layer1.0.relu",
              "layer1.0.relu1", "layer1.2.add", "layer2.0.downsample", "layer2.0.downsample.0", "avgpool",
              "flatten", "fc"):
        assert t in taps, t
    w = set(kdcore.models.wrn_16_2().taps())
    for t in ("block1", "block1.layer", "block1.layer.0", "block1.layer.0.add", "block1.layer.0.convShortcut",
              "block2.layer.0.bn1", "bn1", "relu", "flatten"):
        assert t in w, t
    v = set(kdcore.models.vgg8().taps())
    for t in ("block0", "block0.0", "block0.1", "relu0", "pool0", "pool2", "block4", "relu4", "pool4", "classifier"):
        assert t in v, t
    assert "pool3" not in v                               # RepDistiller applies pool3 only at 64x64
    assert "pool3" in set(kdcore.models.vgg8(input_size=64).taps())


TAP_CASES = [
    ("resnet8", 1, 28, ["relu", "layer1", "layer1.0.add", "layer1.0.relu", "layer2.0.bn2", "layer2.0.downsample",
                        "layer2.0.add", "layer3", "flatten"]),
    ("resnet20", 3, 32, ["layer1.2.add", "layer2", "layer3.1.add", "layer3"]),
    ("wrn_16_2", 3, 32, ["conv1", "block1", "block1.layer.0.relu1", "block2.layer.0.convShortcut", "block2",
                         "block3", "bn1", "relu", "flatten"]),
    ("vgg8", 1, 28, ["block0", "block0.0", "relu0", "pool0", "block1", "pool2", "block3", "relu4", "flatten"]),
]


@pytest.mark.usefixtures("every_isa")
@pytest.mark.parametrize("name,cin,size,taps", TAP_CASES, ids=[c[0] for c in TAP_CASES])
def test_tap_values(name, cin, size, taps):
    km, tm = build_pair(name, cin, size)
    x = inputs(cin, size, 3)
    tm.train()
    km.train()
    torch_ref.capture(tm, taps)
    with torch.no_grad():
        tm(torch.from_numpy(x))
    km(x)
    for t in taps:
        ref = torch_ref.feature(tm, t).detach().numpy()
        got = km.tap(t)
        assert got.size == ref.size, f"{t}: kdcore {got.shape}, torch {tuple(ref.shape)}"
        assert_close(f"{name} tap {t}", got.reshape(ref.shape), ref, rtol=1e-3)


@pytest.mark.usefixtures("every_isa")
def test_tap_values_forward_hooks():
    """Stage outputs against nn.Module forward hooks (independent of the twin's feats dict)."""
    km, tm = build_pair("resnet8x4", 3, 32)
    seen = {}
    hooks = [getattr(tm, s).register_forward_hook(lambda mod, i, o, s=s: seen.__setitem__(s, o.detach().numpy()))
             for s in ("layer1", "layer2", "layer3")]
    hooks.append(tm.layer2[0].bn2.register_forward_hook(
        lambda mod, i, o: seen.__setitem__("layer2.0.bn2", o.detach().numpy())))
    x = inputs(3, 32, 2)
    km.eval()
    tm.eval()
    with torch.no_grad():
        tm(torch.from_numpy(x))
    km(x)
    for h in hooks:
        h.remove()
    for t, ref in seen.items():
        assert_close(f"hooked {t}", km.tap(t).reshape(ref.shape), ref, rtol=1e-4)


GRAD_TAP_CASES = [
    ("resnet8", 1, 28, ["layer1.0.add", "layer2"]),
    ("resnet8x4", 3, 32, ["layer3.0.add", "relu"]),
    ("wrn_16_2", 1, 28, ["block2", "block3.layer.0.bn1"]),
    ("vgg8", 3, 32, ["block1", "relu3"]),
]


@pytest.mark.usefixtures("every_isa")
@pytest.mark.parametrize("name,cin,size,taps", GRAD_TAP_CASES, ids=[c[0] for c in GRAD_TAP_CASES])
def test_tap_gradient_injection(name, cin, size, taps):
    """L = sum(dout * logits) + sum_t 0.5 * ||tap_t - target_t||^2 (feature-KD shape of loss):
    kdcore (add_tap_grad + backward) vs torch autograd, train mode."""
    km, tm = build_pair(name, cin, size, seed=2)
    n = 3
    x = inputs(cin, size, n, seed=5)
    rng = np.random.default_rng(9)
    dout = rng.standard_normal((n, 10)).astype(np.float32)
    km.train()
    km.zero_grad()
    km(x)
    targets = {}
    for t in taps:
        tap = km.tap(t)
        targets[t] = (tap + rng.standard_normal(tap.shape).astype(np.float32)).astype(np.float32)
        km.add_tap_grad(t, tap - targets[t])
    dx = km.backward(dout)

    def feat_loss(model):
        total = 0.0
        for t in taps:
            f = torch_ref.feature(model, t)
            total = total + 0.5 * ((f.reshape(f.shape[0], -1) - torch.from_numpy(targets[t].reshape(n, -1))) ** 2).sum()
        return total

    torch_ref.capture(tm, taps)
    ref, ref_dx = torch_forward_backward(tm, x, dout, train=True, km=km, extra_loss=feat_loss)
    assert_close(f"{name} dx with tap losses", dx, ref_dx, rtol=1e-3)
    check_param_grads(f"{name} with tap losses", km, tm)


@pytest.mark.usefixtures("every_isa")
def test_tap_gradient_only_no_dout():
    """backward(None) after only a tap gradient: the loss lives entirely at the tap."""
    km, tm = build_pair("resnet8", 1, 28, seed=6)
    x = inputs(1, 28, 2, seed=6)
    km.train()
    km.zero_grad()
    km(x)
    tap = km.tap("layer2")
    km.add_tap_grad("layer2", tap)                 # L = 0.5 ||layer2||^2
    dx = km.backward(None)
    tm.train()
    tm.zero_grad()
    xt = torch.tensor(x, requires_grad=True)
    torch_ref.route(tm, km)
    tm(xt)
    torch_ref.unroute(tm)
    (0.5 * (tm.feats["layer2"] ** 2).sum()).backward()
    assert_close("dx (tap-only loss)", dx, xt.grad.numpy(), rtol=1e-3)
    grads = km.grads()
    assert_close("conv1 grad (tap-only loss)", grads["conv1.weight"], tm.conv1.weight.grad.numpy(), rtol=1e-3)
    assert np.all(grads["fc.weight"] == 0) and np.all(grads["layer3.0.conv1.weight"] == 0)
