"""ReviewKD on kdcore vs PyTorch autograd (float64 on the same float32 weights): the layers it
adds (nearest resize, sigmoid), nets with extra inputs, the fusion connector alone (output,
every input gradient, every parameter gradient), and one full distillation step (student and
connector updates, the four HCL values). The PyTorch fusion is written here from the formulas
of ReviewKD's paper and mdistiller's layout -- one attention conv with two output channels --
so kdcore's split of that conv into two one-channel convs is checked too."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import kdcore
from kdcore import losses as L
from kdcore import nn as knn

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_layers_torch import compare, fd_check, run_both, sync  # noqa: E402
from checks import check_close as check_close_abs  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

F64 = torch.float64
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# the layers

@pytest.mark.parametrize("shape,size", [((2, 3, 1, 1), (7, 7)), ((1, 2, 7, 7), (14, 14)), ((2, 2, 4, 4), (7, 7)),
                                        ((3, 3, 7, 5), (4, 3)), ((2, 1, 5, 6), (5, 6)), ((1, 4, 3, 3), (10, 2))],
                         ids=str)
def test_upsample_size(shape, size, rng):
    k, t = knn.Upsample(size=size), tnn.Upsample(size=size, mode="nearest")
    compare(*run_both(k, t, rng.standard_normal(shape).astype(np.float32), rng=rng), what=("out", "dx"))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample_scale_factor(scale, rng):
    k, t = knn.Upsample(scale_factor=scale), tnn.Upsample(scale_factor=scale, mode="nearest")
    compare(*run_both(k, t, rng.standard_normal((2, 3, 5, 4)).astype(np.float32), rng=rng), what=("out", "dx"))


def test_upsample_arguments():
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        knn.Upsample()
    with pytest.raises(ValueError, match="mode='nearest' and 'bilinear'"):
        knn.Upsample(size=4, mode="bicubic")
    with pytest.raises(ValueError, match="size"):
        knn.Upsample(size=0)


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5, 4), (1, 1, 1, 1)], ids=str)
def test_sigmoid(shape, rng):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    k, t = run_both(knn.Sigmoid(), tnn.Sigmoid(), x, rng=rng)
    compare(k, t, what=("out",))
    # backward from the float32 output (as PyTorch's): out (1 - out) carries its rounding
    check_close_abs("input grad", k["dx"], t["dx"], rtol=1e-5, atol=1.2e-7 * np.abs(k["dout"]).max())
    fd_check(knn.Sigmoid(), x, rng, params=False)


# ---------------------------------------------------------------------------------------
# the fusion connector

class TorchABF(tnn.Module):
    """One level of ReviewKD's fusion, from the paper's Fig. 3 and mdistiller's layout."""

    def __init__(self, cin, mid, cout, fuse):
        super().__init__()
        self.conv1 = tnn.Sequential(tnn.Conv2d(cin, mid, 1, bias=False), tnn.BatchNorm2d(mid))
        self.conv2 = tnn.Sequential(tnn.Conv2d(mid, cout, 3, padding=1, bias=False), tnn.BatchNorm2d(cout))
        self.att_conv = tnn.Conv2d(2 * mid, 2, 1) if fuse else None

    def forward(self, x, y, size, out_size):
        x = self.conv1(x)
        if self.att_conv is not None:
            y = TF.interpolate(y, size, mode="nearest")
            z = torch.sigmoid(self.att_conv(torch.cat([x, y], 1)))
            x = x * z[:, :1] + y * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = TF.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


class TorchFusion(tnn.Module):
    def __init__(self, cins, sizes, couts, out_sizes, mid):
        super().__init__()
        self.sizes, self.out_sizes = sizes, out_sizes
        self.abf = tnn.ModuleList(TorchABF(c, mid, o, k > 0) for k, (c, o) in enumerate(zip(cins, couts)))

    def forward(self, maps):
        outs, res = [], None
        for k, (m, abf) in enumerate(zip(maps, self.abf)):
            o, res = abf(m, res, self.sizes[k], self.out_sizes[k])
            outs.append(o)
        return outs


def torch_fusion_of(fusion):
    """A float64 torch fusion holding kdcore's weights (att_conv.a/b stacked into one conv)."""
    t = TorchFusion(fusion.in_channels, fusion.sizes, fusion.out_channels, fusion.out_sizes, fusion.mid_channels)
    sd = fusion.state_dict()
    out = {}
    for k, v in sd.items():
        out[k.replace("abf", "abf.", 1)] = v
    for k in range(1, len(fusion.in_channels)):
        for what in ("weight", "bias"):
            a, b = out.pop(f"abf.{k}.att_conv.a.{what}"), out.pop(f"abf.{k}.att_conv.b.{what}")
            out[f"abf.{k}.att_conv.{what}"] = np.concatenate([a, b])
    torch_ref.load_into_torch(t, out)
    return t.double()


def torch_grads_as_kdcore(t, fusion):
    g = {}
    for name, p in t.named_parameters():
        k = name.replace("abf.", "abf", 1)
        if ".att_conv." in k:
            for c, part in zip("ab", (p.grad[:1], p.grad[1:])):
                g[k.replace(".att_conv.", f".att_conv.{c}.")] = part.numpy()
        else:
            g[k] = p.grad.numpy()
    return g


# (channels, size) of the student maps deepest first, the teacher's (channels, size)
FUSIONS = {
    "cifar-like": ([(8, (1, 1)), (8, (3, 3)), (6, (5, 5)), (4, (10, 10))], [(12, (1, 1)), (12, (3, 3)), (9, (5, 5)),
                                                                           (6, (10, 10))]),
    "resized": ([(6, (1, 1)), (5, (4, 4)), (3, (7, 7))], [(7, (1, 1)), (5, (4, 4)), (4, (8, 8))]),
    "one level": ([(5, (3, 3))], [(4, (3, 3))]),
}


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("case", sorted(FUSIONS))
def test_fusion_matches_torch(case, n, rng):
    s, t = FUSIONS[case]
    fusion = L.ReviewFusion([c for c, _ in s], [hw for _, hw in s], [c for c, _ in t], [hw for _, hw in t],
                            mid_channels=min(512, s[0][0]))
    fusion.reset_parameters(3)
    maps = [rng.standard_normal((n, c) + hw).astype(np.float32) for c, hw in s]
    net = fusion.net
    for node, m in zip(fusion.input_taps(), maps[1:]):
        net.set_input(fusion._tap_index(node), m)
    fusion.train()
    fusion.zero_grad()
    out = fusion(maps[0])
    levels = [fusion.tap(x) for x in fusion.level_taps()]
    R = [rng.standard_normal(o.shape).astype(np.float32) for o in levels]
    for x, r in zip(fusion.level_taps()[:-1], R[:-1]):
        fusion.add_tap_grad(x, r)
    d0 = fusion.backward(R[-1])
    dins = [d0.reshape(maps[0].shape)] + [net.input_grad(fusion._tap_index(x)) for x in fusion.input_taps()]
    kgrads = {k: v.copy() for k, v in fusion.grads().items()}

    tf = torch_fusion_of(fusion).train()
    tmaps = [torch.tensor(m, dtype=F64, requires_grad=True) for m in maps]
    touts = tf(tmaps)
    sum((o * torch.tensor(r, dtype=F64).reshape(o.shape)).sum() for o, r in zip(touts, R)).backward()
    check_close("output", out.reshape(touts[-1].shape), touts[-1].detach().numpy(), rtol=1e-5)
    for k, (a, b) in enumerate(zip(levels, touts)):
        check_close(f"level {k}", a.reshape(b.shape), b.detach().numpy(), rtol=1e-5)
    # With two images a BN over 1x1 maps normalises each channel to about +-1 whatever the
    # input, so the deepest map's gradient is ~0 up to eps and rounding: its tolerance also
    # has a floor relative to the other maps' gradients.
    top = max(float(np.abs(b.grad.numpy()).max()) for b in tmaps)
    for k, (a, b) in enumerate(zip(dins, tmaps)):
        g = b.grad.numpy()
        check_close(f"gradient w.r.t. map {k}", a, g, rtol=1e-4, atol=1e-4 * max(np.abs(g).max(), 1e-2 * top))
    tgrads = torch_grads_as_kdcore(tf, fusion)
    assert set(tgrads) == set(kgrads)
    top = max(float(np.abs(v).max()) for v in tgrads.values())   # same floor: abf0.conv1 feeds that BN
    for k, v in tgrads.items():
        check_close(f"grad of {k}", kgrads[k].reshape(v.shape), v, rtol=1e-4, atol=1e-4 * max(np.abs(v).max(), 1e-2 * top))


def test_fusion_initialisation_is_kaiming_uniform_a1():
    fusion = L.ReviewFusion([64, 32], [(1, 1), (7, 7)], [64, 32], [(1, 1), (7, 7)], 64).reset_parameters(0)
    p = fusion.parameters()
    for name, fan_in in (("abf0.conv1.0.weight", 64), ("abf1.conv2.0.weight", 64 * 9)):
        bound = np.sqrt(3.0 / fan_in)   # kaiming_uniform_(a=1): sqrt(6 / ((1 + 1) fan_in))
        w = p[name]
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, name
    att = p["abf1.att_conv.a.weight"]   # PyTorch's default conv init: U(+-1/sqrt(fan_in))
    assert np.abs(att).max() <= 1 / np.sqrt(128)


def test_extra_inputs_errors(rng):
    fusion = L.ReviewFusion([4, 3], [(1, 1), (3, 3)], [4, 3], [(1, 1), (3, 3)], 4)
    net = fusion.net
    with pytest.raises(RuntimeError, match="abf1.input.*no data"):
        fusion(rng.standard_normal((2, 4, 1, 1)).astype(np.float32))
    node = fusion._tap_index("abf1.input")
    with pytest.raises(ValueError, match="expects 3 channels, got 5"):
        net.set_input(node, rng.standard_normal((2, 5, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="not an input node"):
        net.set_input(fusion._tap_index("abf1.cat"), rng.standard_normal((2, 3, 3, 3)).astype(np.float32))
    net.set_input(node, rng.standard_normal((3, 3, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="different batch size"):
        fusion(rng.standard_normal((2, 4, 1, 1)).astype(np.float32))
    with pytest.raises(TypeError, match="float32"):
        net.set_input(node, np.zeros((2, 3, 3, 3)))


def test_extra_input_shape_change_replans_and_inference_agrees(rng):
    """A new shape of an extra input re-plans the net (here a wrong one: the fusion's sizes
    are fixed, so the concatenation refuses it, and the right one works again); an inference
    forward (chunked, no gradients) gives the training forward's bits."""
    fusion = L.ReviewFusion([4, 3], [(1, 1), (3, 3)], [4, 3], [(1, 1), (5, 5)], 4).reset_parameters(1)
    node = fusion._tap_index("abf1.input")
    x0 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    for hw in ((3, 3), (4, 6), (3, 3)):
        fusion.net.set_input(node, rng.standard_normal((6, 3) + hw).astype(np.float32))
        fusion.eval()
        if hw != (3, 3):
            with pytest.raises(ValueError, match=r"concat 'abf1.cat': inputs have shapes \(4, 4, 6\) and \(4, 3, 3\)"):
                fusion(x0)
            continue
        a = fusion(x0)
        assert fusion.tap("abf1.upsample").shape == (6, 4, 3, 3)
        assert a.shape == (6, 3, 5, 5)   # resized to the teacher's 5x5
        np.testing.assert_array_equal(a, fusion.forward(x0, grad=False))


def test_extra_input_gradient_is_zero_where_none_reaches(rng):
    """A level whose output gets no gradient still passes the gradient of the levels above it
    down through its residual; an input whose level is cut off gets zeros."""
    fusion = L.ReviewFusion([4, 3], [(1, 1), (3, 3)], [4, 3], [(1, 1), (3, 3)], 4).reset_parameters(1)
    node = fusion._tap_index("abf1.input")
    fusion.net.set_input(node, rng.standard_normal((2, 3, 3, 3)).astype(np.float32))
    fusion.train()
    fusion(rng.standard_normal((2, 4, 1, 1)).astype(np.float32))
    fusion.add_tap_grad("abf0.conv2.1", np.ones((2, 4, 1, 1), np.float32))
    fusion.backward(np.zeros((2, 3, 3, 3), np.float32))
    np.testing.assert_array_equal(fusion.net.input_grad(node), 0)


# ---------------------------------------------------------------------------------------
# one distillation step

V = 4
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def hcl(fs, ft):
    """ReviewKD's hierarchical context loss for one pair (paper eq. 6, mdistiller's levels)."""
    loss, cnt, tot = TF.mse_loss(fs, ft), 1.0, 1.0
    for lv in (4, 2, 1):
        if lv >= fs.shape[2]:
            continue
        cnt /= 2
        loss = loss + cnt * TF.mse_loss(TF.adaptive_avg_pool2d(fs, lv), TF.adaptive_avg_pool2d(ft, lv))
        tot += cnt
    return loss / tot


@pytest.mark.parametrize("weight", [1.0, 5.0])
def test_reviewkd_step_matches_torch(weight):
    r = np.random.default_rng(21)
    X = r.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, 16)
    ds = kdcore.datasets.from_arrays(X, y, num_classes=V, normalize=None)
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    s0 = student.state_dict()
    ts = torch_ref.torch_cnn(V, 1, 4).double()
    torch_ref.load_into_torch(ts, s0)
    tt = torch_ref.torch_cnn(V, 1, 6).double()
    torch_ref.load_into_torch(tt, teacher.state_dict())
    tt.eval()
    feats = {"s": {}, "t": {}}
    for k in range(16):
        ts[k].register_forward_hook(lambda m, i, o, k=k: feats["s"].__setitem__(k, o))
        tt[k].register_forward_hook(lambda m, i, o, k=k: feats["t"].__setitem__(k, o))

    h = kdcore.distill(student, teacher, ds, losses=[L.CE(1.0), L.ReviewKD(weight, warmup_epochs=0)], epochs=1,
                       batch_size=len(ds), progress=False, optimizer=kdcore.optim.SGD(**SGD))
    fusion, = student.connectors
    # the same fusion, fresh: its initial weights
    k0 = L.ReviewFusion(fusion.in_channels, fusion.sizes, fusion.out_channels, fusion.out_sizes,
                        fusion.mid_channels).reset_parameters(0)
    tf = torch_fusion_of(k0).train()
    x = torch.tensor(X, dtype=F64)
    with torch.no_grad():
        tt(x)
    ts.train()
    z = ts(x)
    # student: stage maps '5', '12' and the pooled feature '15' (post-activation), deepest
    # first; teacher: '4', '11' (pre-activation) and '15'
    pooled_s = feats["s"][15].reshape(16, -1, 1, 1)
    outs = tf([pooled_s, feats["s"][12], feats["s"][5]])
    targets = [feats["t"][15].reshape(16, -1, 1, 1), feats["t"][11], feats["t"][4]]
    hcls = [hcl(o, t) for o, t in zip(outs, targets)]
    opt = torch.optim.SGD(list(ts.parameters()) + list(tf.parameters()), **SGD)
    (TF.cross_entropy(z, torch.tensor(y)) + weight * sum(hcls)).backward()
    opt.step()
    check_models("student", student, ts, s0)
    # the connector: kdcore's state mapped onto the torch layout, updates compared
    after = torch_fusion_of(fusion)
    for (name, a), (_, b), (_, b0) in zip(after.state_dict().items(), tf.state_dict().items(),
                                          torch_fusion_of(k0).state_dict().items()):
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b), name
            continue
        d_t = (b - b0).numpy()
        check_close(f"fusion {name} update", (a - b0).numpy(), d_t, rtol=1e-4,
                    atol=1e-4 * np.abs(d_t).max() + 2.4e-7 * float(b0.abs().max()) + 1e-7)
    for label, v in zip(["reviewkd", "reviewkd_2", "reviewkd_3"], hcls):
        check_close(label, h[label][0], v.item(), rtol=1e-4)


def test_reviewkd_method_defaults_and_history():
    terms = L.method_terms("reviewkd")
    assert [type(t).__name__ for t in terms] == ["CE", "ReviewKD"]
    assert terms[1].weight == 1.0 and terms[1].warmup_epochs == 20
    r = np.random.default_rng(0)
    X = r.standard_normal((32, 1, 8, 8)).astype(np.float32)
    ds = kdcore.datasets.from_arrays(X, r.integers(0, V, 32), num_classes=V, normalize=None)
    student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
    with pytest.warns(UserWarning, match="warmup_epochs"):
        h = kdcore.distill(student, teacher_of(6), ds, method="reviewkd", epochs=2, batch_size=16, progress=False)
    # the warm-up: min((epoch + 1) / 20, 1) of the weight
    check_close("warm-up", np.array(h["reviewkd_weight"]), np.array([0.05, 0.1]), rtol=1e-6)
    assert all(np.isfinite(h[k]).all() for k in ("reviewkd", "reviewkd_2", "reviewkd_3"))
    assert type(student.connectors[0]).__name__ == "ReviewFusion"
