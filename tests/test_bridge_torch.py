"""kdcore <-> PyTorch (kdcore.bridge): Module.to_torch, kdcore.models.from_torch, loading
state dicts without num_batches_tracked, and round trips in both directions (outputs in eval
and train mode, BN buffers, gradients w.r.t. inputs and parameters)."""
from __future__ import annotations

import copy
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as tnn

import kdcore
import torch_ref
from kdcore import bridge
from kdcore import nn as knn
from torch_ref import assert_close

torch.set_num_threads(1)


def randomize_bn(km, seed=0):
    """Random BN affine parameters and running statistics (1/0/0/1 would hide their misuse)."""
    rng = np.random.default_rng(seed)
    sd = km.state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith(".bias") and k.replace(".bias", ".running_mean") in sd:
            sd[k] = (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith("running_var") or k.endswith(".weight") and k.replace(".weight", ".running_var") in sd:
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif k.endswith("num_batches_tracked"):
            sd[k] = np.array(5, dtype=np.int64)
    return km.load_state_dict(sd)


def kd_out(km, x, train):
    """Output of a copy of km (a training forward would move km's BN statistics)."""
    return km.copy().train(train)(x)


def torch_out(tm, x, train):
    with torch.no_grad():
        return copy.deepcopy(tm).train(train)(torch.from_numpy(x)).numpy()


def assert_same_state(a, b, what):
    a = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in a.items()}
    b = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in b.items()}
    assert list(a) == list(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:8]}"
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), f"{what} {k}"
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what} {k}")


def x_of(shape, n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# 1. state dicts without num_batches_tracked


def test_load_state_dict_without_num_batches_tracked():
    tm = torch_ref.build("resnet8", in_channels=1)
    with torch.no_grad():
        for mod in tm.modules():
            if isinstance(mod, tnn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    old = {k: v for k, v in tm.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(tm.state_dict())
    tm.load_state_dict(old, strict=True)            # what PyTorch accepts ...
    km = kdcore.models.resnet8(in_channels=1)
    km(x_of((1, 28, 28), n=2))                      # one training step: counts are 1
    km.load_state_dict(old, strict=True)            # ... kdcore accepts
    got = km.state_dict()
    for k, v in old.items():
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    counts = [int(v) for k, v in got.items() if k.endswith("num_batches_tracked")]
    assert counts and all(c == 1 for c in counts)    # kept, as PyTorch keeps them
    # Strict loading still refuses every other missing key, and unexpected ones.
    for drop in ("bn1.running_mean", "layer1.0.bn1.weight", "fc.bias"):
        with pytest.raises(KeyError, match=drop.replace(".", r"\.")):
            km.load_state_dict({k: v for k, v in old.items() if k != drop})
    with pytest.raises(KeyError, match="unexpected.*extra"):
        km.load_state_dict({**old, "extra": torch.zeros(1)})


# ------------------------------------------------------------------------------------------
# 2./3. every layer type, both ways


def layer_cases():
    """(id, kdcore module, sample shape, torch type of the converted module)."""
    return [
        ("linear", knn.Linear(6, 4), (6,), tnn.Linear),
        ("linear-nobias", knn.Linear(6, 4, bias=False), (6,), tnn.Linear),
        ("conv", knn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 7, 7), tnn.Conv2d),
        ("conv-nobias", knn.Conv2d(3, 4, 1, bias=False), (3, 5, 5), tnn.Conv2d),
        ("bn1d", knn.BatchNorm1d(5, eps=1e-3, momentum=0.3), (5,), tnn.BatchNorm1d),
        ("bn2d", knn.BatchNorm2d(3, momentum=0.2), (3, 4, 4), tnn.BatchNorm2d),
        ("bn1d-noaffine", knn.BatchNorm1d(5, momentum=0.3, affine=False), (5,), tnn.BatchNorm1d),
        ("bn2d-noaffine", knn.BatchNorm2d(3, eps=1e-3, affine=False), (3, 4, 4), tnn.BatchNorm2d),
        ("relu", knn.ReLU(), (3, 4, 4), tnn.ReLU),
        ("sigmoid", knn.Sigmoid(), (5,), tnn.Sigmoid),
        ("maxpool", knn.MaxPool2d(3, stride=2, padding=1), (2, 7, 7), tnn.MaxPool2d),
        ("avgpool", knn.AvgPool2d(2, padding=1), (2, 5, 5), tnn.AvgPool2d),
        ("gap", knn.AdaptiveAvgPool2d(1), (3, 5, 5), tnn.AdaptiveAvgPool2d),
        ("dropout0", knn.Dropout(0.0), (6,), tnn.Dropout),
        ("flatten", knn.Flatten(), (2, 3, 3), tnn.Flatten),
        ("upsample-scale", knn.Upsample(scale_factor=2), (2, 3, 4), tnn.Upsample),
        ("upsample-size", knn.Upsample(size=(5, 7)), (2, 3, 3), tnn.Upsample),
        ("upsample-bilinear", knn.Upsample(size=(5, 7), mode="bilinear"), (2, 3, 3), tnn.Upsample),
        ("upsample-bilinear-scale", knn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4), tnn.Upsample),
        ("leaky-relu", knn.LeakyReLU(0.2), (3, 4, 4), tnn.LeakyReLU),
        ("tanh", knn.Tanh(), (5,), tnn.Tanh),
        ("identity", knn.Sequential(knn.Identity(), knn.ReLU()), (3,), tnn.Sequential),
        ("residual", knn.Residual(knn.Sequential(knn.Conv2d(2, 2, 3, padding=1), knn.BatchNorm2d(2))),
         (2, 4, 4), bridge.Residual),
        ("residual-shortcut-noact", knn.Residual(knn.Conv2d(2, 3, 3, stride=2, padding=1),
                                                 knn.Conv2d(2, 3, 1, stride=2, bias=False), activation=False),
         (2, 5, 5), bridge.Residual),
    ]


@pytest.mark.parametrize("case", layer_cases(), ids=lambda c: c[0])
def test_layer_both_ways(case):
    name, km, shape, ttype = case
    randomize_bn(km, seed=1)
    x = x_of(shape)
    for train in (True, False):
        km.train(train)
        tm = km.to_torch()
        assert type(tm) is ttype and tm.training == train
        if isinstance(km, knn._BatchNorm):
            assert tm.affine == km.affine
        assert_same_state(tm.state_dict(), km.state_dict(), f"{name} to_torch")
        back = kdcore.models.from_torch(tm)
        assert type(back) is type(km) and back.training == train
        assert_same_state(back.state_dict(), km.state_dict(), f"{name} from_torch")
        want = kd_out(km, x, train)
        got = torch_out(tm, x, train)
        assert_close(f"{name} torch (train={train})", got.reshape(want.shape), want, rtol=1e-5)
        assert_close(f"{name} back (train={train})", kd_out(back, x, train), want, rtol=1e-5)
    # A training step moves BN's running statistics alike (momentum, unbiased variance, count).
    tm = km.train().to_torch()
    km(x)
    tm(torch.from_numpy(x))
    for k, v in tm.state_dict().items():
        assert_close(f"{name} after a step: {k}", km.state_dict()[k], v.numpy(), rtol=1e-5)


def test_eval_dropout_is_identity_and_train_dropout_differs_only_in_masks():
    km = knn.Sequential(knn.Linear(8, 8), knn.Dropout(0.5))
    tm = km.eval().to_torch()
    x = x_of((8,))
    assert_close("eval dropout", torch_out(tm, x, False), kd_out(km, x, False), rtol=1e-5)
    t, k = torch_out(tm, x, True), km.train()(x)
    # Same layer and scaling (kept units are scaled by 2 on both), different random masks.
    both = (t != 0) & (k != 0)
    assert both.any()
    np.testing.assert_allclose(t[both], k[both], rtol=1e-5)


def test_from_torch_every_supported_layer():
    """torch -> kdcore -> torch for a torch net using every layer from_torch knows, with
    PyTorch's tuple forms of the options."""
    torch.manual_seed(0)
    tm = tnn.Sequential(
        tnn.Conv2d(2, 4, (3, 3), stride=(1, 1), padding=(1, 1)), tnn.BatchNorm2d(4), tnn.ReLU(inplace=True),
        bridge.Residual(tnn.Sequential(tnn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), tnn.BatchNorm2d(4)),
                        tnn.Identity()),
        tnn.MaxPool2d(2, 2), tnn.Upsample(scale_factor=2.0), tnn.AvgPool2d(3, 1, 1), tnn.Sigmoid(),
        tnn.Upsample(size=(9, 9)), tnn.AdaptiveAvgPool2d((1, 1)), tnn.Flatten(), tnn.Dropout(0.0),
        tnn.Linear(4, 6), tnn.BatchNorm1d(6, momentum=0.05), tnn.ReLU(), tnn.Linear(6, 3, bias=False))
    with torch.no_grad():
        for mod in tm.modules():
            if isinstance(mod, tnn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    x = x_of((2, 6, 6), n=4, seed=3)
    for train in (False, True):
        tm.train(train)
        km = kdcore.models.from_torch(tm)
        assert km.training == train
        assert_same_state(km.state_dict(), tm.state_dict(), "from_torch")
        assert_close(f"kdcore (train={train})", kd_out(km, x, train), torch_out(tm, x, train), rtol=1e-4)
        tm2 = km.to_torch()
        assert_same_state(tm2.state_dict(), tm.state_dict(), "to_torch")
        assert_close(f"torch again (train={train})", torch_out(tm2, x, train), torch_out(tm, x, train), rtol=1e-6)
        # One training step moves BN's running statistics alike on both sides.
        if train:
            tm_step = copy.deepcopy(tm)
            km(x)
            tm_step(torch.from_numpy(x))
            for k, v in tm_step.state_dict().items():
                assert_close(f"after a step: {k}", km.state_dict()[k], v.numpy(), rtol=1e-5)


@pytest.mark.parametrize("module,path,typename", [
    (tnn.Sequential(tnn.Linear(3, 3), tnn.Sequential(tnn.ReLU(), tnn.GELU())), "1.1", "GELU"),
    (tnn.Sequential(tnn.Conv2d(1, 2, 3, dilation=2)), "0", "Conv2d"),
    (tnn.Sequential(tnn.Conv2d(1, 2, (3, 1))), "0", "Conv2d"),
    (tnn.Sequential(tnn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "0", "Conv2d"),
    (tnn.Sequential(tnn.Conv2d(1, 2, 3, padding="same")), "0", "Conv2d"),
    (tnn.Sequential(tnn.MaxPool2d(2, ceil_mode=True)), "0", "MaxPool2d"),
    (tnn.Sequential(tnn.AvgPool2d(2, padding=1, count_include_pad=False)), "0", "AvgPool2d"),
    (tnn.Sequential(tnn.BatchNorm2d(2, track_running_stats=False)), "0", "BatchNorm2d"),
    (tnn.Sequential(tnn.AdaptiveAvgPool2d(2)), "0", "AdaptiveAvgPool2d"),
    (tnn.Sequential(tnn.Upsample(scale_factor=1.5)), "0", "Upsample"),
    (tnn.Sequential(tnn.Upsample(scale_factor=(2.0, 3.0))), "0", "Upsample"),
    (tnn.Sequential(tnn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), "0", "Upsample"),
    (tnn.Sequential(tnn.Upsample(scale_factor=2, mode="bicubic")), "0", "Upsample"),
    (tnn.Sequential(tnn.Flatten(0)), "0", "Flatten"),
    (torch_ref.build("resnet8"), "(root)", "TorchResNet"),
    (tnn.Sequential(torch_ref.RoutedReLU()), "0", "RoutedReLU"),
    (tnn.Sequential(tnn.ReLU(), torch_ref.RoutedMaxPool2d(2)), "1", "RoutedMaxPool2d"),   # a subclass
])
def test_from_torch_names_the_first_unsupported_submodule(module, path, typename):
    with pytest.raises(TypeError, match=re.escape(f"submodule '{path}' ({typename})")):
        kdcore.models.from_torch(module)


def test_from_torch_points_zoo_layouts_to_load_state_dict():
    km = kdcore.models.resnet8()
    for tm in (torch_ref.build("resnet8"), km.to_torch()):
        with pytest.raises(TypeError, match=r"kdcore\.models\.<name>\(\.\.\.\) and load_state_dict"):
            kdcore.models.from_torch(tm)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        kdcore.models.from_torch(km)


def test_to_torch_refuses_what_it_cannot_mirror():
    with pytest.raises(TypeError, match="MultiExit"):
        kdcore.models.with_exits(kdcore.models.resnet8(), ["layer1"]).to_torch()

    class Custom(knn.Block):
        def __init__(self):
            super().__init__()
            self.fc = knn.Linear(2, 2)

        def _emit(self, g, x, prefix):
            return self._emit_child(g, "fc", x, prefix)

    with pytest.raises(TypeError, match="Custom"):
        knn.Sequential(Custom()).to_torch()

    class Doubled(knn.ReLU):      # a subclass may emit other nodes: not taken for its base
        def _emit(self, g, x, prefix):
            return g.add(knn._ADD, prefix, [super()._emit(g, x, prefix + ".relu")] * 2)

    with pytest.raises(TypeError, match="Doubled"):
        knn.Sequential(knn.Linear(2, 2), Doubled()).to_torch()
    with pytest.raises(TypeError, match="kdcore.nn.Module"):
        bridge.to_torch(tnn.Linear(2, 2))


def test_missing_torch_raises_import_error_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "kdcore.bridge")
    monkeypatch.delattr(kdcore, "bridge")
    with pytest.raises(ImportError, match=r"to_torch needs PyTorch \(pip install torch\)"):
        knn.Linear(2, 2).to_torch()
    with pytest.raises(ImportError, match="from_torch needs PyTorch"):
        kdcore.models.from_torch(object())
    with pytest.raises(ImportError, match="to_onnx needs PyTorch"):
        knn.Linear(2, 2).to_onnx("unused.onnx", input_shape=(2,))


# ------------------------------------------------------------------------------------------
# The zoo: reference layouts


@pytest.mark.parametrize("name", kdcore.models.names())
def test_zoo_to_torch(name):
    """Keys and values are kdcore's, and the reference twin's (RepDistiller's layout); outputs
    agree with the kdcore model's."""
    if name == "mlp":
        km, twin, shape = kdcore.models.mlp([20, 8, 4]), torch_ref.torch_mlp([20, 8, 4]), (20,)
    else:
        km = kdcore.models.get(name, num_classes=4, in_channels=1, input_size=8 if name.startswith("vgg") else 6)
        twin, shape = torch_ref.build(name, num_classes=4, in_channels=1), km.input_shape
    randomize_bn(km, seed=2)
    tm = km.eval().to_torch()
    assert_same_state(tm.state_dict(), km.state_dict(), name)
    assert list(tm.state_dict()) == list(twin.state_dict())
    assert {k for k, _ in tm.named_parameters()} == set(km.parameters())
    x = x_of(shape, n=2)
    want = km(x, grad=False)
    assert_close(f"{name} eval", torch_out(tm, x, False), want, rtol=1e-4, scale=float(np.abs(want).max()))


# ------------------------------------------------------------------------------------------
# 4. round trips with gradients: cnn (generic tree) and resnet8 (zoo layout)


def kd_forward_backward(km, x, dout, train):
    km.train(train)
    km.zero_grad()
    out = km(x)
    dx = km.backward(dout)
    return out, dx, {k: v.copy() for k, v in km.grads().items()}


def torch_forward_backward(tm, x, dout, train, route_from=None):
    tm.train(train)
    tm.zero_grad(set_to_none=True)
    if route_from is not None:
        torch_ref.route(tm, route_from)
    try:
        xt = torch.tensor(x, requires_grad=True)
        out = tm(xt)
        (out * torch.from_numpy(dout)).sum().backward()
    finally:
        torch_ref.unroute(tm)
    return out.detach().numpy(), xt.grad.numpy(), {k: p.grad.numpy() for k, p in tm.named_parameters()}


def assert_same_results(what, a, b, rtol):
    (oa, dxa, ga), (ob, dxb, gb) = a, b
    assert_close(f"{what} output", oa, ob, rtol=rtol, scale=max(float(np.abs(ob).max()), 1e-3))
    assert_close(f"{what} dx", dxa, dxb, rtol=rtol)
    assert set(ga) == set(gb)
    for k in gb:
        # BN removes a per-channel constant: a bias feeding a training-mode BN has gradient
        # zero up to rounding on both sides, compared to its neighbours' scale.
        scale = max(float(np.abs(v).max()) for v in gb.values()) if k.endswith("bias") else None
        assert_close(f"{what} grad {k}", ga[k], gb[k], rtol=rtol, scale=scale)


def small_cnn(seed=0):
    return randomize_bn(kdcore.models.cnn(num_classes=5, in_channels=2, input_size=8, width=4, seed=seed), seed)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cnn_kdcore_torch_kdcore(train):
    km = small_cnn()
    tm = km.to_torch()
    back = kdcore.models.from_torch(tm)
    assert_same_state(back.state_dict(), km.state_dict(), "cnn round trip")
    x = x_of((2, 8, 8), n=3, seed=5)
    dout = np.random.default_rng(5).standard_normal((3, 5)).astype(np.float32)
    ref = kd_forward_backward(km, x, dout, train)
    assert_same_results("cnn torch", torch_forward_backward(tm, x, dout, train), ref, rtol=1e-3)
    assert_same_results("cnn kdcore again", kd_forward_backward(back, x, dout, train), ref, rtol=1e-5)
    if train:     # both updated their running statistics on that step
        assert_same_state(back.state_dict(), km.state_dict(), "cnn after a step")
        for k, v in tm.state_dict().items():
            assert_close(f"cnn torch after a step {k}", v.numpy(), km.state_dict()[k], rtol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cnn_torch_kdcore_torch(train):
    torch.manual_seed(1)
    tm = tnn.Sequential(
        tnn.Conv2d(2, 4, 3, padding=1, bias=False), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(4, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(8, 5))
    km = kdcore.models.from_torch(tm.train(train))
    tm2 = km.to_torch()
    assert_same_state(tm2.state_dict(), tm.state_dict(), "torch round trip")
    x = x_of((2, 8, 8), n=3, seed=6)
    dout = np.random.default_rng(6).standard_normal((3, 5)).astype(np.float32)
    ref = torch_forward_backward(tm, x, dout, train)
    assert_same_results("cnn kdcore", kd_forward_backward(km, x, dout, train), ref, rtol=1e-3)
    assert_same_results("cnn torch again", torch_forward_backward(tm2, x, dout, train), ref, rtol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet_kdcore_torch_kdcore(train):
    km = randomize_bn(kdcore.models.resnet8(num_classes=5, in_channels=2, input_size=8, seed=3), 3)
    tm = km.to_torch()
    back = kdcore.models.resnet8(num_classes=5, in_channels=2, input_size=8).load_state_dict(tm.state_dict())
    assert_same_state(back.state_dict(), km.state_dict(), "resnet8 round trip")
    x = x_of((2, 8, 8), n=2, seed=7)
    dout = np.random.default_rng(7).standard_normal((2, 5)).astype(np.float32)
    ref = kd_forward_backward(km, x, dout, train)
    assert_same_results("resnet8 torch", torch_forward_backward(tm, x, dout, train), ref, rtol=1e-3)
    assert_same_results("resnet8 kdcore again", kd_forward_backward(back, x, dout, train), ref, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet_torch_kdcore_torch(train):
    """RepDistiller's layout (torch_ref's twin) -> kdcore by the documented path -> to_torch."""
    torch.manual_seed(2)
    twin = torch_ref.build("resnet8", num_classes=5, in_channels=2)
    with torch.no_grad():
        for mod in twin.modules():
            if isinstance(mod, tnn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.num_batches_tracked.fill_(3)
    km = kdcore.models.resnet8(num_classes=5, in_channels=2, input_size=8).load_state_dict(twin.state_dict())
    tm2 = km.to_torch()
    assert_same_state(tm2.state_dict(), twin.state_dict(), "resnet8 torch round trip")
    x = x_of((2, 8, 8), n=2, seed=8)
    dout = np.random.default_rng(8).standard_normal((2, 5)).astype(np.float32)
    got = kd_forward_backward(km, x, dout, train)
    # The twin's ReLUs follow kdcore's on/off pattern at rounding near-ties (torch_ref.route).
    ref = torch_forward_backward(twin, x, dout, train, route_from=km)
    assert_same_results("resnet8 kdcore", got, ref, rtol=1e-3)
    assert_same_results("resnet8 torch again", torch_forward_backward(tm2, x, dout, train),
                        torch_forward_backward(twin, x, dout, train), rtol=1e-6)
