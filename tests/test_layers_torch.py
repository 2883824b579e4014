"""kdcore.nn layers (float32, C kernels) vs torch autograd (float64 reference on the same
float32 weights and inputs), plus finite-difference checks of each layer's backward through
the Python API."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as tnn

import kdcore
from kdcore import nn as knn
from checks import check_close  # noqa: E402

F64 = torch.float64

# Every test on every instruction set of the kernels this CPU has (conftest.every_isa).
pytestmark = pytest.mark.usefixtures("every_isa")


# ---------------------------------------------------------------------------------------
# helpers


def check_scaled(name, got, want, rtol=1e-5, arel=None):
    """check_close with atol scaled by the magnitude of the expected values."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    check_close(name, got, want, rtol=rtol, atol=(rtol if arel is None else arel) * scale + 1e-30)


def torch_state(sd):
    return {k: torch.tensor(np.asarray(v)) if np.asarray(v).dtype == np.int64 else torch.tensor(np.asarray(v), dtype=F64)
            for k, v in sd.items()}


def set_state(kmod, tmod, sd):
    kmod.load_state_dict(sd)
    tmod.double()
    tmod.load_state_dict(torch_state(kmod.state_dict()))


def sync(kmod, tmod):
    """Copy kdcore's (initialised) state into a float64 torch module."""
    kmod.net  # build
    tmod.double()
    tmod.load_state_dict(torch_state(kmod.state_dict()))


def run_both(kmod, tmod, x, dout=None, rng=None, train=True):
    """Forward + backward(dout) on both; returns kdcore and torch (out, dx, grads)."""
    kmod.train(train)
    tmod.train(train)
    out = kmod(x)
    if dout is None:
        dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = kmod.backward(dout)
    kg = {k: v.copy() for k, v in kmod.grads().items()}
    xt = torch.tensor(x, dtype=F64, requires_grad=True)
    ot = tmod(xt)
    (ot * torch.tensor(dout, dtype=F64).reshape(ot.shape)).sum().backward()
    t_out = ot.detach().numpy()
    if out.ndim == 2 and t_out.ndim == 4 and t_out.shape[2:] == (1, 1):   # flat nodes come back (N, C)
        t_out = t_out.reshape(out.shape)
    tg = {k: p.grad.numpy() for k, p in tmod.named_parameters()}
    return dict(out=out, dx=dx, grads=kg, dout=dout), dict(out=t_out, dx=xt.grad.numpy(), grads=tg)


def compare(k, t, rtol=1e-5, what=("out", "dx", "grads")):
    if "out" in what:
        assert k["out"].dtype == np.float32
        check_scaled("output", k["out"], t["out"], rtol)
    if "dx" in what:
        assert k["dx"].dtype == np.float32
        check_scaled("input grad", k["dx"], t["dx"], rtol)
    if "grads" in what:
        assert set(k["grads"]) == set(t["grads"]), (sorted(k["grads"]), sorted(t["grads"]))
        for name in t["grads"]:
            check_scaled(f"grad of {name}", k["grads"][name], t["grads"][name], rtol)


def fd_check(kmod, x, rng, train=True, eps=1e-2, n_in=4, n_w=3, rtol=1e-2, arel=3e-3, params=True):
    """Central differences (in float64, of float32 forwards) of L = sum(out * R) w.r.t. a few
    input and parameter entries vs kdcore's backward."""
    kmod.train(train)
    kmod.zero_grad()
    out = kmod(x)
    R = rng.standard_normal(out.shape)
    dx = kmod.backward(R.astype(np.float32)).astype(np.float64)
    grads = {k: v.astype(np.float64) for k, v in kmod.grads().items()}

    def loss(xx):
        return float(np.sum(kmod(xx).astype(np.float64) * R))

    def central(get, setv, i):
        v0 = get(i)
        hi, lo = np.float32(v0 + eps), np.float32(v0 - eps)
        setv(i, hi)
        fp = loss(x)
        setv(i, lo)
        fm = loss(x)
        setv(i, v0)
        return (fp - fm) / (float(hi) - float(lo))

    x = x.copy()
    failures = []
    idx = rng.choice(x.size, size=min(n_in, x.size), replace=False)
    for i in idx:
        num = central(lambda j: x.flat[j], lambda j, v: x.flat.__setitem__(j, v), i)
        ana = dx.flat[i]
        if abs(num - ana) > rtol * abs(ana) + arel * np.abs(dx).max():
            failures.append(f"d/dx[{np.unravel_index(i, x.shape)}]: numeric {num:.6g}, backward {ana:.6g}")
    if params:
        for name, p in kmod.parameters().items():
            g = grads[name]
            for i in rng.choice(p.size, size=min(n_w, p.size), replace=False):
                num = central(lambda j: p.flat[j], lambda j, v: p.flat.__setitem__(j, v), i)
                ana = g.flat[i]
                if abs(num - ana) > rtol * abs(ana) + arel * np.abs(g).max():
                    failures.append(f"d/d{name}[{np.unravel_index(i, p.shape)}]: numeric {num:.6g}, backward {ana:.6g}")
    assert not failures, "finite differences disagree with backward:\n  " + "\n  ".join(failures)


def randn(rng, *shape, scale=1.0, offset=0.0):
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def distinct(rng, shape, gap=0.01):
    """Distinct values spaced `gap` apart (no ties in max pooling, none near 0)."""
    n = int(np.prod(shape))
    v = (rng.permutation(n) - n / 2 + 0.5) * gap
    return v.reshape(shape).astype(np.float32)


def random_bn_state(rng, c):
    return {"weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
            "bias": randn(rng, c, scale=0.5),
            "running_mean": randn(rng, c, scale=0.3),
            "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
            "num_batches_tracked": np.array(3, dtype=np.int64)}


# ---------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("n,fin,fout,bias", [(1, 7, 13, True), (1, 7, 13, False), (4, 7, 13, True),
                                             (5, 32, 10, False), (3, 1, 1, True), (64, 50, 17, True),
                                             (256, 300, 200, True), (1, 512, 10, False)])
def test_linear(n, fin, fout, bias, rng):
    k, t = knn.Linear(fin, fout, bias=bias), tnn.Linear(fin, fout, bias=bias)
    sync(k, t)
    assert set(k.parameters()) == ({"weight", "bias"} if bias else {"weight"})
    x = randn(rng, n, fin)
    kr, tr = run_both(k, t, x, rng=rng)
    assert kr["out"].shape == (n, fout) and kr["dx"].shape == (n, fin)
    compare(kr, tr)
    fd_check(k, x, rng)


def test_linear_grads_accumulate(rng):
    k, t = knn.Linear(5, 3), tnn.Linear(5, 3)
    sync(k, t)
    x, d = randn(rng, 4, 5), randn(rng, 4, 3)
    k(x)
    k.backward(d)
    g1 = {n: v.copy() for n, v in k.grads().items()}
    k(x)
    k.backward(d)
    for n, v in k.grads().items():
        check_close(f"2x grad of {n}", v, 2 * g1[n], rtol=1e-6, atol=1e-7)
    k.zero_grad()
    for n, v in k.grads().items():
        assert np.all(v == 0), n


# ---------------------------------------------------------------------------------------
# Conv2d

_CONV_GRID = [  # (N, C, OC, H, W, k, stride, padding, groups, bias)
    (n, c, oc, 7, 9, k, s, p, g, b)
    for (k, s, p), (c, oc, g), (n, b) in itertools.product(
        [(1, 1, 0), (1, 2, 0), (3, 1, 0), (3, 1, 1), (3, 2, 1), (3, 1, 2), (5, 1, 2), (5, 2, 2), (5, 1, 0), (3, 2, 0)],
        [(3, 8, 1), (4, 6, 2), (6, 6, 6), (4, 8, 4)],
        [(1, True), (3, False)])
]
_CONV_BIG = [
    (1, 3, 8, 28, 28, 3, 1, 1, 1, True),
    (3, 3, 8, 28, 28, 3, 2, 1, 1, False),
    (3, 4, 8, 28, 28, 5, 1, 2, 1, True),
    (2, 4, 8, 28, 28, 5, 2, 2, 2, True),
    (3, 8, 8, 28, 28, 3, 1, 1, 8, True),
    (2, 6, 12, 28, 28, 1, 1, 0, 3, False),
    (2, 16, 32, 14, 14, 3, 1, 1, 1, True),   # wider: a GEMM-sized case
    (2, 3, 4, 5, 5, 5, 1, 0, 1, True),       # output 1x1
    (1, 2, 3, 1, 1, 3, 1, 1, 1, True),       # 1x1 input, padded
    (2, 3, 4, 7, 9, 2, 1, 0, 1, True),       # even kernels
    (2, 3, 4, 7, 9, 2, 2, 1, 1, True),
    (2, 4, 4, 11, 10, 4, 3, 1, 2, True),
    (2, 3, 5, 7, 9, 1, 1, 1, 1, True),       # 1x1 kernel with padding
    (2, 3, 5, 8, 8, 3, 3, 0, 1, False),      # stride 3
    (4, 64, 64, 16, 16, 3, 1, 1, 1, False),  # large GEMMs / threaded paths
    (4, 32, 64, 16, 16, 3, 2, 1, 1, True),
    (4, 64, 64, 8, 8, 3, 1, 1, 64, False),
]


def _conv_id(c):
    n, ci, oc, h, w, k, s, p, g, b = c
    return f"n{n}-c{ci}-oc{oc}-{h}x{w}-k{k}-s{s}-p{p}-g{g}-{'b' if b else 'nob'}"


@pytest.mark.parametrize("case", _CONV_GRID + _CONV_BIG, ids=_conv_id)
def test_conv2d(case, rng):
    n, c, oc, h, w, k, s, p, g, b = case
    km = knn.Conv2d(c, oc, k, stride=s, padding=p, groups=g, bias=b)
    tm = tnn.Conv2d(c, oc, k, stride=s, padding=p, groups=g, bias=b)
    sync(km, tm)
    assert km.parameters()["weight"].shape == (oc, c // g, k, k)
    x = randn(rng, n, c, h, w)
    kr, tr = run_both(km, tm, x, rng=rng)
    compare(kr, tr, rtol=2e-5)
    if h * w < 100 or case in _CONV_BIG[:3]:
        fd_check(km, x, rng, n_in=3, n_w=2)


def test_conv2d_matches_torch_float32(rng):
    """Same comparison with torch in float32 (the brief's setting)."""
    km, tm = knn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), tnn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    tm.load_state_dict({k: torch.tensor(v) for k, v in km.state_dict().items()})
    x = randn(rng, 3, 4, 11, 13)
    out = km(x)
    ot = tm(torch.tensor(x))
    check_scaled("output", out, ot.detach().numpy(), 1e-5)


# ---------------------------------------------------------------------------------------
# BatchNorm


_BN_SHAPES = [(8, 5), (2, 3), (64, 7), (4, 3, 5, 7), (1, 4, 3, 3), (2, 8, 28, 28), (16, 32, 16, 16), (128, 64)]


def _bn_pair(shape, eps=1e-5, momentum=0.1):
    c = shape[1]
    if len(shape) == 2:
        return knn.BatchNorm1d(c, eps=eps, momentum=momentum), tnn.BatchNorm1d(c, eps=eps, momentum=momentum)
    return knn.BatchNorm2d(c, eps=eps, momentum=momentum), tnn.BatchNorm2d(c, eps=eps, momentum=momentum)


def _check_bn_buffers(k, t, what, rtol=1e-5):
    ks = k.state_dict()
    ts = t.state_dict()
    check_scaled(f"running_mean {what}", ks["running_mean"], ts["running_mean"].numpy(), rtol)
    check_scaled(f"running_var {what}", ks["running_var"], ts["running_var"].numpy(), rtol)
    assert ks["num_batches_tracked"].dtype == np.int64
    assert int(ks["num_batches_tracked"]) == int(ts["num_batches_tracked"]), \
        f"num_batches_tracked {what}: {int(ks['num_batches_tracked'])} vs {int(ts['num_batches_tracked'])}"


def test_batchnorm_defaults_match_torch():
    for k, t in [(knn.BatchNorm1d(4), tnn.BatchNorm1d(4)), (knn.BatchNorm2d(3), tnn.BatchNorm2d(3))]:
        ks, ts = k.state_dict(), t.state_dict()
        assert list(ks) == list(ts)
        for name in ks:
            check_close(name, ks[name], ts[name].numpy(), 0, 0)


@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.3, 1e-3), (0.0, 1e-5), (1.0, 1e-5)])
@pytest.mark.parametrize("shape", _BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_train(shape, momentum, eps, rng):
    k, t = _bn_pair(shape, eps, momentum)
    set_state(k, t, random_bn_state(rng, shape[1]))
    k.train()
    t.train()
    x1 = randn(rng, *shape, scale=2.0, offset=0.5)
    out1 = k(x1)
    check_scaled("output (1st forward)", out1, t(torch.tensor(x1, dtype=F64)).detach().numpy(), 1e-5)
    _check_bn_buffers(k, t, "after one forward")
    x2 = randn(rng, *shape, scale=0.7, offset=-1.0)
    kr, tr = run_both(k, t, x2, rng=rng)
    compare(kr, tr, rtol=2e-5, what=("out", "grads"))
    # dinp is a difference of O(|dout| * w / std) terms (with N=2 it is ~0): scale atol by them
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    term = np.abs(kr["dout"]).max() * (t.weight.detach().numpy() / x2.std(axis=axes)).max()
    check_close("input grad", kr["dx"], tr["dx"], rtol=2e-5, atol=2e-5 * term)
    _check_bn_buffers(k, t, "after two forwards")
    if np.prod(shape) < 1000 and shape != (2, 3):   # N=2 BatchNorm1d: dinp is ~0 (pure cancellation)
        fd_check(k, x2, rng, eps=1e-2)


@pytest.mark.parametrize("shape", _BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_eval(shape, rng):
    k, t = _bn_pair(shape, eps=1e-4)
    set_state(k, t, random_bn_state(rng, shape[1]))
    before = k.state_dict()
    x = randn(rng, *shape, scale=2.0, offset=0.5)
    kr, tr = run_both(k, t, x, rng=rng, train=False)
    compare(kr, tr, rtol=1e-5)
    after = k.state_dict()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        check_close(f"{name} unchanged in eval", after[name], before[name], 0, 0)
    fd_check(k, x, rng, train=False)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 5), (64, 7), (4, 3, 5, 7), (16, 32, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_no_affine(shape, train, rng):
    """affine=False (DAFL's and DFAD's last generator layer): no weight or bias in the state
    or the gradients, forward, input gradient and running statistics as torch's."""
    c = shape[1]
    kcls, tcls = (knn.BatchNorm1d, tnn.BatchNorm1d) if len(shape) == 2 else (knn.BatchNorm2d, tnn.BatchNorm2d)
    k, t = kcls(c, momentum=0.2, affine=False), tcls(c, momentum=0.2, affine=False)
    state = {key: v for key, v in random_bn_state(rng, c).items() if key not in ("weight", "bias")}
    set_state(k, t, state)
    assert list(k.state_dict()) == list(t.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    assert k.parameters() == {} and k.num_parameters() == 0
    x = randn(rng, *shape, scale=2.0, offset=0.5)
    kr, tr = run_both(k, t, x, rng=rng, train=train)
    assert kr["grads"] == {} and tr["grads"] == {}
    compare(kr, tr, rtol=2e-5, what=("out",))
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    std = x.std(axis=axes) if train else np.sqrt(state["running_var"])
    check_close("input grad", kr["dx"], tr["dx"], rtol=2e-5, atol=2e-5 * np.abs(kr["dout"]).max() / std.min())
    _check_bn_buffers(k, t, "after one forward")
    if np.prod(shape) < 1000:
        fd_check(k, x, rng, train=train, eps=1e-2)


def test_batchnorm_no_affine_state_dict_torch_round_trip(rng):
    """kdcore's affine=False state loads strictly into torch's BatchNorm2d(affine=False) and
    back; an affine state (weight, bias) is refused by key."""
    k = knn.BatchNorm2d(4, affine=False)
    k.train()(randn(rng, 3, 4, 5, 5, scale=2.0, offset=1.0))
    t = tnn.BatchNorm2d(4, affine=False)
    t.load_state_dict({key: torch.tensor(v) for key, v in k.state_dict().items()}, strict=True)
    for key, v in k.state_dict().items():
        np.testing.assert_array_equal(t.state_dict()[key].numpy(), v)
    t.train()(torch.tensor(randn(rng, 3, 4, 5, 5, scale=0.5, offset=-2.0)))
    k.load_state_dict({key: v.numpy() for key, v in t.state_dict().items()})
    for key, v in t.state_dict().items():
        np.testing.assert_array_equal(k.state_dict()[key], v.numpy())
    with pytest.raises(KeyError, match=r"unexpected keys: \['bias', 'weight'\]"):
        k.load_state_dict({key: v.numpy() for key, v in tnn.BatchNorm2d(4).state_dict().items()})


def test_batchnorm1d_single_sample_train_raises(rng):
    """torch refuses one value per channel in training (the unbiased variance divides by
    N-1 = 0); kdcore raises ValueError naming the layer, and leaves the statistics alone."""
    k = knn.BatchNorm1d(3)
    x = randn(rng, 1, 3)
    before = k.state_dict()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        k.train()(x)
    after = k.state_dict()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert np.all(np.isfinite(k.eval()(x)))


def test_batchnorm_large_mean_offset(rng):
    """Inputs 1e3 + N(0, 1): the variance must not lose accuracy to cancellation."""
    shape = (16, 4, 8, 8)
    k, t = _bn_pair(shape)
    sync(k, t)
    x = randn(rng, *shape, offset=1000.0)
    kr, tr = run_both(k, t, x, rng=rng)
    compare(kr, tr, rtol=1e-3)
    _check_bn_buffers(k, t, "after one forward", rtol=1e-4)


# ---------------------------------------------------------------------------------------
# ReLU, pools, flatten


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 7, 9), (1, 1, 1, 1), (4, 5, 28, 28)], ids=str)
def test_relu(shape, rng):
    k, t = knn.ReLU(), tnn.ReLU()
    x = randn(rng, *shape)
    x[np.abs(x) < 0.05] += 0.1   # away from the kink for the finite differences
    kr, tr = run_both(k, t, x, rng=rng)
    compare(kr, tr, rtol=0)
    fd_check(k, x, rng, eps=1e-2, params=False)


def test_relu_gradient_at_zero_is_zero(rng):
    """torch: d relu(0) = 0."""
    x = np.array([[0.0, -0.0, 1.0, -1.0]], dtype=np.float32)
    k = knn.ReLU()
    out = k(x)
    d = k.backward(np.ones_like(out))
    check_close("relu(x)", out, [[0, 0, 1, 0]], 0, 0)
    check_close("relu grad", d, [[0, 0, 1, 0]], 0, 0)


_POOL_SHAPES = [(2, 3, 7, 9), (1, 2, 8, 8), (3, 4, 28, 28)]
_POOL_CFG = list(itertools.product([2, 3], [1, 2], [0, 1])) + [(1, 2, 0), (3, 3, 1), (4, 2, 2), (5, 3, 2)]


@pytest.mark.parametrize("shape", _POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k_,s,p", _POOL_CFG, ids=lambda v: str(v))
def test_maxpool2d(shape, k_, s, p, rng):
    k, t = knn.MaxPool2d(k_, stride=s, padding=p), tnn.MaxPool2d(k_, stride=s, padding=p)
    x = distinct(rng, shape, gap=0.01)
    kr, tr = run_both(k, t, x, rng=rng)
    compare(kr, tr, rtol=0, what=("out",))
    compare(kr, tr, rtol=1e-6, what=("dx",))   # overlapping windows sum float32 gradients
    if shape[2] < 10:
        fd_check(k, x, rng, eps=2e-3, params=False)


def test_maxpool2d_default_stride_and_negative_inputs(rng):
    """stride defaults to kernel_size; all-negative inputs next to padding (padding is -inf)."""
    k, t = knn.MaxPool2d(3, padding=1), tnn.MaxPool2d(3, padding=1)
    x = distinct(rng, (2, 3, 9, 9)) - 100.0
    kr, tr = run_both(k, t, x, rng=rng)
    compare(kr, tr, rtol=0, what=("out",))
    compare(kr, tr, rtol=1e-6, what=("dx",))


@pytest.mark.parametrize("shape", _POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k_,s,p", _POOL_CFG, ids=lambda v: str(v))
def test_avgpool2d(shape, k_, s, p, rng):
    k = knn.AvgPool2d(k_, stride=s, padding=p)
    t = tnn.AvgPool2d(k_, stride=s, padding=p, count_include_pad=True)
    x = randn(rng, *shape)
    kr, tr = run_both(k, t, x, rng=rng)
    compare(kr, tr, rtol=1e-5)
    if shape[2] < 10:
        fd_check(k, x, rng, params=False)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 5, 1, 1), (3, 4, 28, 28), (2, 64, 4, 4)], ids=str)
def test_adaptive_avgpool(shape, rng):
    k, t = knn.AdaptiveAvgPool2d(1), tnn.AdaptiveAvgPool2d(1)
    x = randn(rng, *shape)
    kr, tr = run_both(k, t, x, rng=rng)
    assert kr["out"].shape == shape[:2]
    compare(kr, tr, rtol=1e-5)
    fd_check(k, x, rng, params=False)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 7, 9), (3, 6)], ids=str)
def test_flatten(shape, rng):
    k, t = knn.Flatten(), tnn.Flatten()
    x = randn(rng, *shape)
    kr, tr = run_both(k, t, x, rng=rng)
    assert kr["out"].shape == (shape[0], int(np.prod(shape[1:])))
    assert kr["dx"].shape == shape
    compare(kr, tr, rtol=0)


# ---------------------------------------------------------------------------------------
# Dropout


def test_dropout_eval_is_identity(rng):
    k = knn.Dropout(0.5).eval()
    x = randn(rng, 4, 3, 5, 5)
    out = k(x)
    check_close("eval output", out, x, 0, 0)
    d = randn(rng, *out.shape)
    check_close("eval input grad", k.backward(d), d, 0, 0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_train(p, rng):
    k = knn.Dropout(p).train()
    x = rng.uniform(0.5, 1.5, (50, 4, 32, 32)).astype(np.float32)   # no zeros in x
    out = k(x)
    assert out.shape == x.shape and out.dtype == np.float32
    kept = out != 0
    frac = 1 - kept.mean()
    sigma = np.sqrt(p * (1 - p) / x.size)
    assert abs(frac - p) < 6 * sigma + 1e-4, f"fraction of zeros {frac:.5f}, expected {p}"
    check_close("kept values", out[kept], x[kept] / np.float32(1 - p), 1e-6, 0)
    d = randn(rng, *out.shape)
    dx = k.backward(d)
    check_close("input grad (same mask, same scale)", dx, np.where(kept, d / np.float32(1 - p), 0), 1e-6, 1e-7)
    # per-channel/sample masks are not correlated: each sample has its own zeros
    assert not np.all(kept[0] == kept[1])


def test_dropout_p0_train_is_identity(rng):
    k = knn.Dropout(0.0).train()
    x = randn(rng, 3, 7)
    check_close("output", k(x), x, 0, 0)


def test_dropout_seeding(rng):
    x = rng.uniform(0.5, 1.5, (8, 1000)).astype(np.float32)
    a = knn.Dropout(0.5).reset_parameters(7)
    b = knn.Dropout(0.5).reset_parameters(7)
    c = knn.Dropout(0.5).reset_parameters(8)
    ma, mb, mc = a(x) != 0, b(x) != 0, c(x) != 0
    assert np.array_equal(ma, mb), "same seed must give the same mask"
    assert not np.array_equal(ma, mc), "different seeds should give different masks"
    assert not np.array_equal(ma, a(x) != 0), "successive forwards should draw new masks"


# ---------------------------------------------------------------------------------------
# Residual and Sequential


class TorchResidual(tnn.Module):
    def __init__(self, body, shortcut=None, activation=True):
        super().__init__()
        self.body = body
        if shortcut is not None:
            self.shortcut = shortcut
        self.has_shortcut, self.activation = shortcut is not None, activation

    def forward(self, x):
        y = self.body(x) + (self.shortcut(x) if self.has_shortcut else x)
        return torch.relu(y) if self.activation else y


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_residual(projection, activation, train, rng):
    c_out, s = (8, 2) if projection else (4, 1)
    kbody = knn.Sequential(knn.Conv2d(4, c_out, 3, stride=s, padding=1, bias=False), knn.BatchNorm2d(c_out), knn.ReLU(),
                           knn.Conv2d(c_out, c_out, 3, padding=1, bias=False), knn.BatchNorm2d(c_out))
    tbody = tnn.Sequential(tnn.Conv2d(4, c_out, 3, stride=s, padding=1, bias=False), tnn.BatchNorm2d(c_out), tnn.ReLU(),
                           tnn.Conv2d(c_out, c_out, 3, padding=1, bias=False), tnn.BatchNorm2d(c_out))
    ksc = knn.Sequential(knn.Conv2d(4, c_out, 1, stride=s, bias=False), knn.BatchNorm2d(c_out)) if projection else None
    tsc = tnn.Sequential(tnn.Conv2d(4, c_out, 1, stride=s, bias=False), tnn.BatchNorm2d(c_out)) if projection else None
    k = knn.Residual(kbody, ksc, activation=activation)
    t = TorchResidual(tbody, tsc, activation)
    sd = k.state_dict()
    assert list(sd) == list(t.state_dict()), (list(sd), list(t.state_dict()))
    for name, v in sd.items():
        if name.endswith("weight") and v.ndim == 1:
            sd[name] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif name.endswith("bias") or name.endswith("running_mean"):
            sd[name] = randn(rng, *v.shape, scale=0.3)
        elif name.endswith("running_var"):
            sd[name] = rng.uniform(0.5, 2, v.shape).astype(np.float32)
    set_state(k, t, sd)
    x = randn(rng, 3, 4, 9, 9)
    kr, tr = run_both(k, t, x, rng=rng, train=train)
    compare(kr, tr, rtol=3e-5)
    ks, ts = k.state_dict(), t.state_dict()
    for name in ks:
        if "running" in name:
            check_scaled(name, ks[name], ts[name].numpy(), 1e-5)


def _run_torch_seq(layers, x, dout, taps):
    """Apply a torch Sequential layer by layer keeping intermediate outputs; loss is
    sum(out*dout) + sum(tap_i * g_i)."""
    xt = torch.tensor(x, dtype=F64, requires_grad=True)
    h, inter = xt, {}
    for i, layer in enumerate(layers):
        h = layer(h)
        inter[str(i)] = h
    loss = (h * torch.tensor(dout, dtype=F64).reshape(h.shape)).sum()
    for name, g in taps.items():
        loss = loss + (inter[name] * torch.tensor(g, dtype=F64).reshape(inter[name].shape)).sum()
    loss.backward()
    return h.detach().numpy(), inter, xt.grad.numpy()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sequential_taps(kind, rng):
    if kind == "mlp":
        k = knn.Sequential(knn.Linear(6, 8), knn.ReLU(), knn.Linear(8, 4))
        t = tnn.Sequential(tnn.Linear(6, 8), tnn.ReLU(), tnn.Linear(8, 4))
        x = randn(rng, 5, 6)
        tap_names = ["1"]
    else:
        k = knn.Sequential(knn.Conv2d(3, 4, 3, padding=1, bias=False), knn.BatchNorm2d(4), knn.ReLU(), knn.MaxPool2d(2),
                           knn.Conv2d(4, 6, 3, stride=2, padding=1), knn.ReLU(), knn.AdaptiveAvgPool2d(1),
                           knn.Flatten(), knn.Linear(6, 5))
        t = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1, bias=False), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.MaxPool2d(2),
                           tnn.Conv2d(4, 6, 3, stride=2, padding=1), tnn.ReLU(), tnn.AdaptiveAvgPool2d(1),
                           tnn.Flatten(), tnn.Linear(6, 5))
        x = randn(rng, 3, 3, 10, 10)
        tap_names = ["1", "2", "4"]
    sync(k, t)
    k.train()
    t.train()
    assert all(n in k.taps() for n in tap_names)
    out = k(x)
    dout = randn(rng, *out.shape)
    taps = {}
    for name in tap_names:
        v = k.tap(name)
        taps[name] = randn(rng, *v.shape)
        k.add_tap_grad(name, taps[name])
    dx = k.backward(dout)
    t_out, inter, t_dx = _run_torch_seq(t, x, dout, taps)
    check_scaled("output", out, t_out, 2e-5)
    for name in tap_names:
        want = inter[name].detach().numpy()
        got = k.tap(name)
        check_scaled(f"tap {name}", got.reshape(want.shape) if got.size == want.size else got, want, 2e-5)
    check_scaled("input grad", dx, t_dx, 3e-5)
    for name, p in t.named_parameters():
        check_scaled(f"grad of {name}", k.grads()[name], p.grad.numpy(), 3e-5)


def test_tap_grad_scale(rng):
    k = knn.Sequential(knn.Linear(4, 5), knn.ReLU(), knn.Linear(5, 2))
    x = randn(rng, 3, 4)
    out = k(x)
    g = randn(rng, 3, 5)
    k.add_tap_grad("1", g, scale=0.5)
    k.add_tap_grad("1", g, scale=0.5)
    d1 = k.backward(np.zeros_like(out))
    k(x)
    k.add_tap_grad("1", g)
    d2 = k.backward(np.zeros_like(out))
    check_close("tap grad 0.5+0.5 vs 1", d1, d2, 1e-6, 1e-7)


# ---------------------------------------------------------------------------------------
# Extreme input magnitudes


def _extreme_modules(rng):
    yield "linear", (lambda: (knn.Linear(9, 5), tnn.Linear(9, 5))), (4, 9)
    yield "conv", (lambda: (knn.Conv2d(3, 4, 3, padding=1), tnn.Conv2d(3, 4, 3, padding=1))), (2, 3, 7, 7)
    yield "bn2d", (lambda: (knn.BatchNorm2d(3), tnn.BatchNorm2d(3))), (4, 3, 5, 5)
    yield "bn1d", (lambda: (knn.BatchNorm1d(6), tnn.BatchNorm1d(6))), (16, 6)
    yield "maxpool", (lambda: (knn.MaxPool2d(3, 2, 1), tnn.MaxPool2d(3, 2, 1))), (2, 3, 8, 8)
    yield "avgpool", (lambda: (knn.AvgPool2d(3, 2, 1), tnn.AvgPool2d(3, 2, 1))), (2, 3, 8, 8)
    yield "gap", (lambda: (knn.AdaptiveAvgPool2d(1), tnn.AdaptiveAvgPool2d(1))), (2, 3, 8, 8)


@pytest.mark.parametrize("scale", [1e3, 1e-6, 3e4])
@pytest.mark.parametrize("name", [m[0] for m in _extreme_modules(None)])
@pytest.mark.parametrize("train", [True, False])
def test_extreme_inputs(name, scale, train, rng):
    make, shape = {m[0]: m[1:] for m in _extreme_modules(rng)}[name]
    k, t = make()
    sync(k, t)
    x = randn(rng, *shape, scale=scale)
    dout = randn(rng, *k.train(train)(x).shape, scale=scale)
    k.zero_grad()
    kr, tr = run_both(k, t, x, dout=dout, train=train)
    for key in ("out", "dx"):
        assert np.all(np.isfinite(kr[key])), f"{key} not finite"
    for g in kr["grads"].values():
        assert np.all(np.isfinite(g))
    compare(kr, tr, rtol=5e-5)


def test_shape_changes_between_calls(rng):
    """The same model on different batch sizes and spatial sizes (re-planned activations)."""
    k = knn.Sequential(knn.Conv2d(3, 4, 3, padding=1, bias=False), knn.BatchNorm2d(4), knn.ReLU(),
                       knn.AdaptiveAvgPool2d(1), knn.Flatten(), knn.Linear(4, 3))
    t = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1, bias=False), tnn.BatchNorm2d(4), tnn.ReLU(),
                       tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(4, 3))
    sync(k, t)
    for shape in [(3, 3, 7, 9), (1, 3, 28, 28), (5, 3, 4, 4), (3, 3, 7, 9)]:
        k.zero_grad()
        t.zero_grad()
        kr, tr = run_both(k, t, randn(rng, *shape), rng=rng)
        compare(kr, tr, rtol=3e-5)


def test_dropout_in_sequential_uses_forward_mask(rng):
    """Linear -> Dropout -> Linear in train mode: backward must use the mask of the forward."""
    k = knn.Sequential(knn.Linear(6, 40), knn.Dropout(0.5), knn.Linear(40, 3)).train()
    t = tnn.Sequential(tnn.Linear(6, 40), tnn.Identity(), tnn.Linear(40, 3))
    sync(k, t)
    x = randn(rng, 5, 6)
    out = k(x)
    h, hd = k.tap("0"), k.tap("1")
    mask = (hd != 0).astype(np.float64)
    check_close("dropout tap", hd, h * mask * 2.0, 1e-6, 1e-7)
    dout = randn(rng, *out.shape)
    dx = k.backward(dout)
    xt = torch.tensor(x, dtype=F64, requires_grad=True)
    ot = t[2](t[0](xt) * torch.tensor(mask * 2.0))
    (ot * torch.tensor(dout, dtype=F64)).sum().backward()
    check_scaled("output", out, ot.detach().numpy(), 1e-5)
    check_scaled("input grad", dx, xt.grad.numpy(), 1e-5)
    for name, p in t.named_parameters():
        check_scaled(f"grad of {name}", k.grads()[name], p.grad.numpy(), 1e-5)


def test_tap_grad_on_output_and_backward_none(rng):
    """A tap gradient on the output node adds to dout; backward(None) uses tap gradients only."""
    k = knn.Sequential(knn.Linear(4, 5), knn.ReLU(), knn.Linear(5, 2))
    x = randn(rng, 3, 4)
    out = k(x)
    dout, g = randn(rng, *out.shape), randn(rng, *out.shape)
    k.add_tap_grad("2", g)
    d1 = k.backward(dout)
    gr1 = {n: v.copy() for n, v in k.grads().items()}
    k.zero_grad()
    k(x)
    d2 = k.backward(dout + g)
    for n, v in k.grads().items():
        check_close(f"grad of {n}", gr1[n], v, 1e-6, 1e-7)
    check_close("input grad", d1, d2, 1e-6, 1e-7)
    g1 = randn(rng, 3, 5)
    k(x)
    k.add_tap_grad("1", g1)
    k.add_tap_grad("2", g)
    d3 = k.backward(None)          # taps only
    k(x)
    k.add_tap_grad("1", g1)
    d4 = k.backward(None)          # tap "1" only
    k(x)
    d5 = k.backward(g)             # dout only
    check_close("backward(None) with taps = sum of parts", d3, d4 + d5, 1e-5, 1e-6)
    assert np.abs(d4).max() > 0, "tap gradient on '1' had no effect"
