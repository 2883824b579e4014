"""The zoo without PyTorch: builders, argument checks, get/names, taps and shapes."""
from __future__ import annotations

import numpy as np
import pytest

from kdcore import models

CONV_NAMES = [n for n in models.names() if n != "mlp"]


def test_names_and_get():
    names = models.names()
    for n in ("mlp", "cnn", "resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4",
              "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13"):
        assert n in names and n in models.__all__ and callable(getattr(models, n))
    assert "get" in models.__all__ and "names" in models.__all__
    m = models.get("resnet8x4", num_classes=7, in_channels=3, input_size=32)
    assert m.input_shape == (3, 32, 32)
    assert models.get("ResNet8").input_shape == (1, 28, 28)
    assert models.get("mlp", sizes=[784, 10]).input_shape == (784,)
    with pytest.raises(ValueError, match="name"):
        models.get("resnet9")
    with pytest.raises(TypeError, match="name"):
        models.get(8)
    with pytest.raises(TypeError):
        models.get("resnet8", width=3)


@pytest.mark.parametrize("name", CONV_NAMES)
def test_forward_shapes_28x28(name):
    m = models.get(name, num_classes=5, seed=1)
    assert m.input_shape == (1, 28, 28)
    m.eval()
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    out = m(x)
    assert out.shape == (2, 5) and np.all(np.isfinite(out))
    assert repr(m).startswith(type(m).__name__)


@pytest.mark.parametrize("builder", [models.resnet8, models.wrn_16_1, models.vgg8])
def test_argument_checks(builder):
    with pytest.raises(TypeError, match="num_classes"):
        builder(num_classes="10")
    with pytest.raises(ValueError, match="num_classes"):
        builder(num_classes=0)
    with pytest.raises(TypeError, match="in_channels"):
        builder(in_channels=True)
    with pytest.raises(ValueError, match="in_channels"):
        builder(in_channels=0)
    with pytest.raises(TypeError, match="input_size"):
        builder(input_size=28.0)
    with pytest.raises(ValueError, match="input_size"):
        builder(input_size=0)
    with pytest.raises(ValueError, match="seed"):
        builder(seed=-1)
    with pytest.raises(TypeError, match="seed"):
        builder(seed=None)


def test_class_argument_checks():
    with pytest.raises(ValueError, match="depth"):
        models.ResNet(10, [16, 16, 32, 64])
    with pytest.raises(ValueError, match="num_filters"):
        models.ResNet(8, [16, 16, 32])
    with pytest.raises(ValueError, match="depth"):
        models.WideResNet(18, 2)
    with pytest.raises(ValueError, match="cfg"):
        models.VGG("Z")
    with pytest.raises(ValueError, match="input_size"):
        models.vgg8(input_size=7)             # three 2x2 max-pools need 8x8
    with pytest.raises(ValueError, match="downsample"):
        models.BasicBlock(16, 32, stride=2)


def test_vgg_pool3_only_at_64():
    assert "pool3" not in models.vgg8(input_size=32).taps()
    m = models.vgg8(in_channels=3, input_size=64)
    assert "pool3" in m.taps()
    m.eval()
    m(np.zeros((1, 3, 64, 64), np.float32))
    assert m.tap("block4").shape == (1, 512, 4, 4)       # 64 -> 32 -> 16 -> 8 -> 4
    m = models.vgg8(in_channels=3, input_size=32)
    m.eval()
    m(np.zeros((1, 3, 32, 32), np.float32))
    assert m.tap("block4").shape == (1, 512, 4, 4)       # 32 -> 16 -> 8 -> 4
    m = models.vgg8()
    m.eval()
    m(np.zeros((1, 1, 28, 28), np.float32))
    assert m.tap("block4").shape == (1, 512, 3, 3)       # 28 -> 14 -> 7 -> 3


def test_resnet_block_taps():
    m = models.resnet8x4(in_channels=3, input_size=32)
    m.train()
    m(np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32))
    add, post = m.tap("layer2.0.add"), m.tap("layer2.0.relu")
    assert add.min() < 0
    np.testing.assert_array_equal(post, np.maximum(add, 0))
    np.testing.assert_array_equal(m.tap("layer2.0"), post)
    np.testing.assert_array_equal(m.tap("layer2"), post)
    assert m.tap("layer3").shape == (3, 256, 8, 8)
    assert m.tap("flatten").shape == (3, 256)


def test_wrn_shortcut_topology():
    """When widths change, relu1(bn1(x)) feeds both conv1 and convShortcut (RepDistiller)."""
    m = models.wrn_16_2()
    m.taps()                                  # builds the graph
    g = m._graph
    idx = {n: i for i, n in enumerate(g.names)}
    relu1 = idx["block2.layer.0.relu1"]
    assert g.nodes[idx["block2.layer.0.conv1"]][2] == relu1
    assert g.nodes[idx["block2.layer.0.convShortcut"]][2] == relu1
    # equal widths: identity shortcut from the block input (the previous block's add)
    add = g.nodes[idx["block2.layer.1.add"]]
    assert idx["block2.layer.0.add"] in add[2:4]


def test_param_counts_cifar100():
    """Parameter counts at 3x32x32, 100 classes: RepDistiller's model sizes, reported in M
    to two decimals."""
    counts = {n: models.get(n, num_classes=100, in_channels=3, input_size=32).num_parameters()
              for n in ("resnet8", "resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
                        "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13")}
    approx = {"resnet8": 0.08e6, "resnet20": 0.28e6, "resnet56": 0.86e6, "resnet110": 1.74e6,
              "resnet8x4": 1.23e6, "resnet32x4": 7.43e6, "wrn_16_2": 0.70e6, "wrn_40_1": 0.57e6,
              "wrn_40_2": 2.26e6, "vgg8": 3.97e6, "vgg13": 9.46e6}
    for n, c in counts.items():
        assert abs(c - approx[n]) <= 0.005e6, (n, c)


def test_init_deterministic_and_seeded():
    a = models.resnet8(seed=3).state_dict()
    b = models.resnet8(seed=3).state_dict()
    c = models.resnet8(seed=4).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    w = models.wrn_40_1(seed=2)
    w.reset_parameters(2)
    assert np.all(w.state_dict()["fc.bias"] == 0)
