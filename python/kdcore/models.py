"""The model zoo: networks of the KD literature, with PyTorch-style parameter names so that a
state dict of the reference implementation (RepDistiller / mdistiller) loads directly."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .nn import (_ADD, _CONCAT, _INPUT_NODE, _RELU, AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d, Block, Conv2d, Dropout, Flatten, LeakyReLU,
                 Linear, MaxPool2d, Module, ReLU, Sequential, Tanh, Unflatten, Upsample, _check_bool, _check_float,
                 _check_int, _join)

__all__ = ["mlp", "cnn", "dafl_generator", "discriminator", "ctkd_temperature",
           "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "resnet8x4", "resnet32x4",
           "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
           "ResNet", "BasicBlock", "WideResNet", "WideBasicBlock", "NetworkBlock", "VGG", "get", "names",
           "with_exits", "from_torch"]


def _seeded(model, seed):
    model._seed = _check_int("seed", seed, 0)
    return model


def mlp(sizes, dropout=0.0, batchnorm=False, seed=0):
    """Multi-layer perceptron: ``mlp([784, 1200, 1200, 10])`` = Flatten, then Linear+ReLU
    (+ Dropout) between consecutive sizes, the last Linear without activation.

    Keys follow ``nn.Sequential``: "1.weight" is the first Linear (index 0 is Flatten). Taps
    (``model.taps()``) are the layer indices as strings, "0" (Flatten), "1" (Linear), "2"
    (ReLU), ...; ``model.feature_taps()`` names the hidden ReLUs the feature methods read
    ("stages"), e.g. ``model.tap(model.feature_taps()["pooled"])`` is the last hidden layer.
    ``model.summary()`` lists every name with its type."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        raise ValueError(f"sizes must list at least input and output sizes, got {sizes!r}")
    sizes = [_check_int(f"sizes[{i}]", s, 1) for i, s in enumerate(sizes)]
    dropout = _check_float("dropout", dropout, 0, 1, hi_open=True)
    batchnorm = _check_bool("batchnorm", batchnorm)
    layers = [Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(BatchNorm1d(sizes[i + 1]))
            layers.append(ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
    m = Sequential(*layers)
    m.input_shape = (sizes[0],)
    relus = [str(i) for i, layer in enumerate(layers) if isinstance(layer, ReLU)]
    if relus:
        # Hidden activations: the stages; the last one is the feature before the classifier.
        m.default_taps = dict(stages=relus, stages_pre=[str(int(r) - 1) for r in relus], pooled=relus[-1],
                              hint=relus[len(relus) // 2])
    return _seeded(m, seed)


def cnn(num_classes=10, in_channels=1, input_size=28, width=32, seed=0):
    """A small plain CNN: [conv3x3-BN-ReLU] x2 + maxpool, [conv3x3-BN-ReLU] x2 + maxpool,
    global average pool, linear. Channels width, width, 2*width, 2*width.

    Taps (``model.taps()``) are the layer indices as strings, as in ``nn.Sequential``: "0"-"2"
    conv-BN-ReLU, "3"-"5", "6" maxpool, "7"-"9", "10"-"12", "13" maxpool, "14" global pool,
    "15" flatten, "16" linear. The ResNets' "layer1".."layer3" correspond to the stage ends
    ``model.feature_taps()["stages"]`` = ["5", "12"] (no third stage); "hint" is "12" and
    "pooled" "15"."""
    num_classes = _check_int("num_classes", num_classes, 1)
    in_channels = _check_int("in_channels", in_channels, 1)
    input_size = _check_int("input_size", input_size, 4)
    w = _check_int("width", width, 1)
    m = Sequential(
        Conv2d(in_channels, w, 3, padding=1, bias=False), BatchNorm2d(w), ReLU(),
        Conv2d(w, w, 3, padding=1, bias=False), BatchNorm2d(w), ReLU(),
        MaxPool2d(2),
        Conv2d(w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), ReLU(),
        Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), ReLU(),
        MaxPool2d(2),
        AdaptiveAvgPool2d(1), Flatten(), Linear(2 * w, num_classes),
    )
    m.input_shape = (in_channels, input_size, input_size)
    # Two stages (before each max-pool), the pooled feature after flatten.
    m.default_taps = dict(stages=["5", "12"], stages_pre=["4", "11"], stages_bn=["4", "11"], pooled="15", hint="12")
    return _seeded(m, seed)


# ---------------------------------------------------------------------------------------
# The RepDistiller zoo (CIFAR ResNets, Wide ResNets, VGG with BN).
#
# Structure, parameter names and initialisation follow RepDistiller's models/resnet.py,
# models/wrn.py and models/vgg.py, so that a state dict of the PyTorch model loads with
# ``load_state_dict`` (and ours into PyTorch). Differences are documented per builder; at
# 32x32 inputs every network computes exactly what RepDistiller's does.

_KAIMING_OUT = "kaiming_normal_fan_out"


def _check_common(num_classes, in_channels, input_size, seed, min_size):
    num_classes = _check_int("num_classes", num_classes, 1)
    in_channels = _check_int("in_channels", in_channels, 1)
    input_size = _check_int("input_size", input_size, min_size)
    seed = _check_int("seed", seed, 0)
    return num_classes, in_channels, input_size, seed


def _conv3x3(cin, cout, stride=1, bias=False):
    return Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias, init=_KAIMING_OUT)


class _ChainBlock(Block):
    """A Block whose children run one after another, in the order ``_chain()`` names them
    (kdcore.bridge builds the same chain in PyTorch)."""

    def _chain(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _emit(self, g, x, prefix):
        for name in self._chain():
            x = self._emit_child(g, name, x, prefix)
        return x


class _ZooModel(_ChainBlock):
    """A zoo network: a chain of its children in PyTorch's order, plus an optional
    Python-side initialisation step (``_post_init``) for the few tensors whose RepDistiller
    initialisation the C initialisers do not cover. It runs after the C initialisation, at
    build time and on ``reset_parameters``, and is deterministic in the model's seed."""

    def _build(self):
        fresh = self._net is None
        net = super()._build()
        if fresh:
            self._post_init()
        return net

    def reset_parameters(self, seed=0):
        super().reset_parameters(seed)
        self._post_init()
        return self

    def _post_init(self):
        pass


class BasicBlock(Block):
    """RepDistiller's (CIFAR ResNet) BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the
    identity or ``downsample`` (Sequential(conv1x1 stride, BN)), then ReLU.

    Nodes under the block path P: P.conv1, P.bn1, P.relu1, P.conv2, P.bn2,
    P.downsample.0, P.downsample.1, P.add (the sum before the final ReLU: RepDistiller's
    ``preact`` feature of ``is_last`` blocks) and P.relu (the block output, also tap P)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        inplanes = _check_int("inplanes", inplanes, 1)
        planes = _check_int("planes", planes, 1)
        stride = _check_int("stride", stride, 1)
        if downsample is not None and not isinstance(downsample, Module):
            raise TypeError(f"downsample must be a kdcore.nn.Module or None, got {type(downsample).__name__}")
        if downsample is None and (stride != 1 or inplanes != planes):
            raise ValueError(f"a block with stride {stride} from {inplanes} to {planes} channels needs a downsample")
        self.inplanes, self.planes, self.stride = inplanes, planes, stride
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNorm2d(planes)
        self.relu1 = ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = downsample

    def _emit(self, g, x, prefix):
        out = self._emit_child(g, "conv1", x, prefix)
        out = self._emit_child(g, "bn1", out, prefix)
        out = self._emit_child(g, "relu1", out, prefix)
        out = self._emit_child(g, "conv2", out, prefix)
        out = self._emit_child(g, "bn2", out, prefix)
        residual = self._emit_child(g, "downsample", x, prefix) if self.downsample is not None else x
        out = g.add(_ADD, _join(prefix, "add"), [out, residual])
        return g.add(_RELU, _join(prefix, "relu"), [out])

    def _describe(self):
        return f"{self.inplanes}, {self.planes}, stride={self.stride}"


class ResNet(_ZooModel):
    """RepDistiller's CIFAR ResNet (models/resnet.py) with BasicBlocks, depth 6n+2.

    conv1 (3x3, in_channels -> w0) - bn1 - relu, layer1/2/3 of n BasicBlocks (widths w1, w2, w3;
    strides 1, 2, 2), avgpool, flatten, fc. Keys equal RepDistiller's state dict
    ("conv1.weight", "layer1.0.downsample.0.weight", "fc.bias", ...).

    Adaptation: RepDistiller pools with ``nn.AvgPool2d(8)``, which is global average pooling
    only for 32x32 inputs (8x8 maps). kdcore uses global average pooling (node "avgpool"),
    identical at 32x32 and defined for any size (28x28 Fashion-MNIST gives 7x7 maps).

    Taps (RepDistiller's ``is_feat`` features): "relu" (f0), "layer1".."layer3" (f1..f3; the
    pre-activations f*_pre are "layerK.{n-1}.add"), "flatten" (f4).
    """

    def __init__(self, depth, num_filters, num_classes=10, in_channels=3):
        super().__init__()
        depth = _check_int("depth", depth, 8)
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
        if not isinstance(num_filters, (list, tuple)) or len(num_filters) != 4:
            raise ValueError(f"num_filters must list 4 widths, got {num_filters!r}")
        num_filters = [_check_int(f"num_filters[{i}]", w, 1) for i, w in enumerate(num_filters)]
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        self.depth, self.num_filters, self.num_classes = depth, num_filters, num_classes
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = _conv3x3(in_channels, num_filters[0])
        self.bn1 = BatchNorm2d(num_filters[0])
        self.relu = ReLU()
        self.layer1 = self._make_layer(num_filters[1], n, 1)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.fc = Linear(num_filters[3] * BasicBlock.expansion, num_classes)   # PyTorch's default init

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = Sequential(
                Conv2d(self.inplanes, planes * BasicBlock.expansion, 1, stride=stride, bias=False, init=_KAIMING_OUT),
                BatchNorm2d(planes * BasicBlock.expansion))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return Sequential(*layers)

    def _chain(self):
        return ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "flatten", "fc")

    def feature_taps(self):
        n = (self.depth - 2) // 6
        return dict(stages=["layer1", "layer2", "layer3"], stages_pre=[f"layer{k}.{n - 1}.add" for k in (1, 2, 3)],
                    stages_bn=[f"layer{k}.{n - 1}.bn2" for k in (1, 2, 3)], pooled="flatten", hint="layer2")

    def _describe(self):
        return f"depth={self.depth}, num_filters={self.num_filters}, num_classes={self.num_classes}"


def _resnet(depth, widths, num_classes, in_channels, input_size, seed):
    num_classes, in_channels, input_size, seed = _check_common(num_classes, in_channels, input_size, seed, 1)
    m = ResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)
    m.input_shape = (in_channels, input_size, input_size)
    return _seeded(m, seed)


_RESNET_DOC = """RepDistiller's {name}: CIFAR ResNet of depth {depth} ({n} BasicBlock{s} per stage), widths {widths}.

    See :class:`ResNet`; global average pooling replaces AvgPool2d(8) (identical at 32x32)."""


def _make_resnet_builder(name, depth, widths):
    def builder(num_classes=10, in_channels=1, input_size=28, seed=0):
        return _resnet(depth, widths, num_classes, in_channels, input_size, seed)
    n = (depth - 2) // 6
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _RESNET_DOC.format(name=name, depth=depth, n=n, s="" if n == 1 else "s", widths=widths)
    return builder


resnet8 = _make_resnet_builder("resnet8", 8, [16, 16, 32, 64])
resnet14 = _make_resnet_builder("resnet14", 14, [16, 16, 32, 64])
resnet20 = _make_resnet_builder("resnet20", 20, [16, 16, 32, 64])
resnet32 = _make_resnet_builder("resnet32", 32, [16, 16, 32, 64])
resnet44 = _make_resnet_builder("resnet44", 44, [16, 16, 32, 64])
resnet56 = _make_resnet_builder("resnet56", 56, [16, 16, 32, 64])
resnet110 = _make_resnet_builder("resnet110", 110, [16, 16, 32, 64])
resnet8x4 = _make_resnet_builder("resnet8x4", 8, [32, 64, 128, 256])
resnet32x4 = _make_resnet_builder("resnet32x4", 32, [32, 64, 128, 256])


class WideBasicBlock(Block):
    """RepDistiller's WRN BasicBlock (pre-activation): bn1-relu1-conv1(stride)-bn2-relu2-conv2,
    added to the shortcut.

    With equal input and output widths the shortcut is the block input x. Otherwise
    (``convShortcut``, 1x1 conv with the block's stride) RepDistiller overwrites x with
    relu1(bn1(x)), so that activation feeds *both* conv1 and convShortcut. Dropout
    (``drop_rate`` > 0, node P.dropout) sits between relu2 and conv2 as in RepDistiller.
    The sum is node P.add (the block output; there is no activation after it)."""

    def __init__(self, in_planes, out_planes, stride=1, drop_rate=0.0):
        super().__init__()
        in_planes = _check_int("in_planes", in_planes, 1)
        out_planes = _check_int("out_planes", out_planes, 1)
        stride = _check_int("stride", stride, 1)
        drop_rate = _check_float("drop_rate", drop_rate, 0, 1, hi_open=True)
        self.equal_in_out = in_planes == out_planes
        if self.equal_in_out and stride != 1:
            # RepDistiller would add x to a strided map (a shape error there too).
            raise ValueError(f"stride must be 1 when in_planes == out_planes, got {stride}")
        self.in_planes, self.out_planes, self.stride, self.drop_rate = in_planes, out_planes, stride, drop_rate
        self.bn1 = BatchNorm2d(in_planes)
        self.relu1 = ReLU()
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = BatchNorm2d(out_planes)
        self.relu2 = ReLU()
        self.dropout = Dropout(drop_rate) if drop_rate > 0 else None
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.convShortcut = None if self.equal_in_out else Conv2d(
            in_planes, out_planes, 1, stride=stride, bias=False, init=_KAIMING_OUT)

    def _emit(self, g, x, prefix):
        act = self._emit_child(g, "bn1", x, prefix)
        act = self._emit_child(g, "relu1", act, prefix)
        out = self._emit_child(g, "conv1", act, prefix)
        out = self._emit_child(g, "bn2", out, prefix)
        out = self._emit_child(g, "relu2", out, prefix)
        if self.dropout is not None:
            out = self._emit_child(g, "dropout", out, prefix)
        out = self._emit_child(g, "conv2", out, prefix)
        shortcut = x if self.equal_in_out else self._emit_child(g, "convShortcut", act, prefix)
        return g.add(_ADD, _join(prefix, "add"), [shortcut, out])

    def _describe(self):
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}, drop_rate={self.drop_rate}"


class NetworkBlock(_ChainBlock):
    """A WRN stage: ``layer`` = Sequential of WideBasicBlocks (keys "blockK.layer.i.*")."""

    def __init__(self, nb_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        nb_layers = _check_int("nb_layers", nb_layers, 1)
        self.layer = Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)])

    def _chain(self):
        return ("layer",)


class WideResNet(_ZooModel):
    """RepDistiller's WideResNet (models/wrn.py), depth 6n+4, widths [16, 16k, 32k, 64k].

    conv1 (3x3, in_channels -> 16), block1/2/3 (n WideBasicBlocks each, strides 1, 2, 2),
    bn1, relu, avgpool, flatten, fc. Init as RepDistiller: convs N(0, 2/fan_out), BN 1/0,
    fc weight PyTorch's default and fc bias 0.

    Adaptation: RepDistiller pools with ``F.avg_pool2d(out, 8)`` (global only at 32x32);
    kdcore uses global average pooling (node "avgpool"), identical at 32x32.

    Taps: "conv1" (f0), "block1".."block3" (f1..f3), "flatten" (f4); RepDistiller's preact
    features are "block2.layer.0.bn1", "block3.layer.0.bn1" and "bn1".
    """

    def __init__(self, depth, widen_factor=1, num_classes=10, in_channels=3, drop_rate=0.0):
        super().__init__()
        depth = _check_int("depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        widen_factor = _check_int("widen_factor", widen_factor, 1)
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = _conv3x3(in_channels, ch[0])
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = BatchNorm2d(ch[3])
        self.relu = ReLU()
        self.avgpool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.fc = Linear(ch[3], num_classes)

    def _chain(self):
        return ("conv1", "block1", "block2", "block3", "bn1", "relu", "avgpool", "flatten", "fc")

    def _post_init(self):
        self.parameters()["fc.bias"][...] = 0.0

    def feature_taps(self):
        pre = ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
        return dict(stages=["block1", "block2", "block3"], stages_pre=pre, stages_bn=pre, pooled="flatten", hint="block2")

    def _describe(self):
        return f"depth={self.depth}, widen_factor={self.widen_factor}, num_classes={self.num_classes}"


def _wrn(depth, k, num_classes, in_channels, input_size, seed):
    num_classes, in_channels, input_size, seed = _check_common(num_classes, in_channels, input_size, seed, 1)
    m = WideResNet(depth, k, num_classes=num_classes, in_channels=in_channels)
    m.input_shape = (in_channels, input_size, input_size)
    return _seeded(m, seed)


def _make_wrn_builder(name, depth, k):
    def builder(num_classes=10, in_channels=1, input_size=28, seed=0):
        return _wrn(depth, k, num_classes, in_channels, input_size, seed)
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"RepDistiller's {name}: WideResNet depth {depth}, widen factor {k} "
                       f"({(depth - 4) // 6} blocks per stage, widths {[16, 16 * k, 32 * k, 64 * k]}).\n\n"
                       "    See :class:`WideResNet`; global average pooling replaces avg_pool2d(8) "
                       "(identical at 32x32).")
    return builder


wrn_16_1 = _make_wrn_builder("wrn_16_1", 16, 1)
wrn_16_2 = _make_wrn_builder("wrn_16_2", 16, 2)
wrn_40_1 = _make_wrn_builder("wrn_40_1", 40, 1)
wrn_40_2 = _make_wrn_builder("wrn_40_2", 40, 2)


_VGG_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(_ZooModel):
    """RepDistiller's VGG (models/vgg.py) with BatchNorm.

    block0..block4: Sequential of [conv3x3 (with bias), BN, ReLU] per width of the cfg, the
    block's last ReLU removed (so "blockK" is the pre-activation feature); each block is
    followed by a ReLU (nodes "relu0".."relu4", RepDistiller's functional F.relu).
    pool0..pool2 are MaxPool2d(2) after relu0..relu2; pool3 (MaxPool2d(2) after relu3) is
    applied only for 64x64 inputs, exactly as RepDistiller's ``if h == 64``; pool4 is global
    average pooling; then flatten and classifier (Linear(512, num_classes)).

    Init as RepDistiller: convs N(0, 2/fan_out) with zero bias, BN 1/0, classifier weight
    N(0, 0.01) and bias 0 (the classifier is re-drawn in Python from the model seed).

    Input sizes: RepDistiller's network has three 2x2 max-pools at 32x32 (32->16->8->4) and
    no size-specific pooling (pool4 is adaptive), so it needs no adaptation for 28x28
    inputs: 28->14->7->3 (floor, as PyTorch). The graph is built for ``input_size``: whether
    pool3 exists is decided when the model is built, not per forward. Inputs must be at
    least 8x8 so that every pool sees a map of at least 2x2.
    """

    def __init__(self, cfg, num_classes=10, in_channels=3, input_size=32):
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in _VGG_CFG:
                raise ValueError(f"cfg must be one of {sorted(_VGG_CFG)} or a list of 5 lists of widths, got {cfg!r}")
            cfg = _VGG_CFG[cfg]
        if not isinstance(cfg, (list, tuple)) or len(cfg) != 5 or not all(
                isinstance(b, (list, tuple)) and len(b) >= 1 for b in cfg):
            raise ValueError(f"cfg must be a list of 5 non-empty lists of widths, got {cfg!r}")
        cfg = [[_check_int(f"cfg[{i}][{j}]", v, 1) for j, v in enumerate(b)] for i, b in enumerate(cfg)]
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        input_size = _check_int("input_size", input_size, 8)
        self.use_pool3 = input_size == 64
        self.cfg, self.num_classes = cfg, num_classes
        cin = in_channels
        for i, widths in enumerate(cfg):
            layers = []
            for v in widths:
                layers += [_conv3x3(cin, v, bias=True), BatchNorm2d(v), ReLU()]
                cin = v
            setattr(self, f"block{i}", Sequential(*layers[:-1]))
            setattr(self, f"relu{i}", ReLU())
        for i in range(4):
            setattr(self, f"pool{i}", MaxPool2d(2, 2))
        self.pool4 = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.classifier = Linear(cin, num_classes)

    def _chain(self):
        names = []
        for i in range(5):
            names += [f"block{i}", f"relu{i}"]
            if i < 3 or (i == 3 and self.use_pool3):
                names.append(f"pool{i}")
        return names + ["pool4", "flatten", "classifier"]

    def _post_init(self):
        p = self.parameters()
        rng = np.random.default_rng([self._seed, 0x766767])
        w = p["classifier.weight"]
        w[...] = rng.normal(0.0, 0.01, size=w.shape).astype(np.float32)
        p["classifier.bias"][...] = 0.0

    def feature_taps(self):
        return dict(stages=["relu1", "relu2", "relu3"], stages_pre=["block1", "block2", "block3"],
                    stages_bn=["block1", "block2", "block3"], pooled="flatten", hint="relu2")

    def _describe(self):
        return f"cfg={self.cfg}, num_classes={self.num_classes}"


def _vgg(cfg, num_classes, in_channels, input_size, seed):
    num_classes, in_channels, input_size, seed = _check_common(num_classes, in_channels, input_size, seed, 8)
    m = VGG(cfg, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    m.input_shape = (in_channels, input_size, input_size)
    return _seeded(m, seed)


def _make_vgg_builder(name, cfg):
    def builder(num_classes=10, in_channels=1, input_size=28, seed=0):
        return _vgg(cfg, num_classes, in_channels, input_size, seed)
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"RepDistiller's {name} with BatchNorm (cfg {cfg!r}: {_VGG_CFG[cfg]}).\n\n"
                       "    See :class:`VGG` (28x28 inputs need no adaptation: 28->14->7->3).")
    return builder


vgg8 = _make_vgg_builder("vgg8", "S")
vgg11 = _make_vgg_builder("vgg11", "A")
vgg13 = _make_vgg_builder("vgg13", "B")


_BUILDERS = OrderedDict((f.__name__, f) for f in (
    mlp, cnn, resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4,
    wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13))


def dafl_generator(latent_dim=100, img_size=28, channels=1, width=128, seed=0, bn_eps=0.8, tanh=True,
                   affine_last=None):
    """DAFL's generator (Chen et al. 2019): z (latent_dim) -> Linear -> (width, s, s) with
    s = img_size / 4 -> BN -> x2 nearest -> conv3x3 -> BN -> LeakyReLU(0.2) -> x2 nearest ->
    conv3x3 (width/2) -> BN -> LeakyReLU(0.2) -> conv3x3 (channels) -> Tanh -> BN. As in the
    authors' code (DAFL's Generator, DFAD's GeneratorA) the last BN has no affine parameters
    (``BatchNorm2d(channels, affine=False)``): it only normalises the images. img_size must be
    a multiple of 4 (28 for Fashion-MNIST, 32 for CIFAR). z is fed as (N, latent_dim).

    bn_eps: the eps of the two inner BN layers (DAFL's code has 0.8; DFAD's GeneratorA and
    ZSKT's generator the default 1e-5). tanh=False leaves out the Tanh: ZSKT's generator
    (width 128) ends conv3x3 -> BN (affine), so the same layout with bn_eps=1e-5, tanh=False
    is that generator (its 8x8 start at img_size 32). affine_last: whether the last BN has a
    learnable weight and bias; None (default) = not affine with the Tanh, affine without it,
    the authors' layouts."""
    latent_dim = _check_int("latent_dim", latent_dim, 1)
    img_size = _check_int("img_size", img_size, 4)
    channels = _check_int("channels", channels, 1)
    width = _check_int("width", width, 2)
    bn_eps = _check_float("bn_eps", bn_eps, 0, lo_open=True)
    tanh = _check_bool("tanh", tanh)
    affine_last = not tanh if affine_last is None else _check_bool("affine_last", affine_last)
    if img_size % 4:
        raise ValueError(f"img_size ({img_size}) must be a multiple of 4")
    s0, w = img_size // 4, width
    tail = [Tanh()] if tanh else []
    tail.append(BatchNorm2d(channels, affine=affine_last))
    m = Sequential(Linear(latent_dim, w * s0 * s0), Unflatten(1, (w, s0, s0)), BatchNorm2d(w),
                   Upsample(scale_factor=2), Conv2d(w, w, 3, padding=1), BatchNorm2d(w, eps=bn_eps), LeakyReLU(0.2),
                   Upsample(scale_factor=2), Conv2d(w, w // 2, 3, padding=1), BatchNorm2d(w // 2, eps=bn_eps),
                   LeakyReLU(0.2), Conv2d(w // 2, channels, 3, padding=1), *tail)
    m.reset_parameters(seed)
    m.input_shape = (latent_dim,)
    return m


class _ConditionalDiscriminator(Block):
    """Logits (V) and a second input of V values (node ``second``: the label one-hot of the
    conditional discriminator, the teacher's logits of CTKD's temperature net), concatenated,
    then Linear(2V, hidden) -> ReLU -> Linear(hidden, 1)."""

    def __init__(self, num_classes, hidden, second="label"):
        super().__init__()
        self.num_classes = num_classes
        self.second = second
        self.fc1 = Linear(2 * num_classes, hidden)
        self.relu = ReLU()
        self.fc2 = Linear(hidden, 1)

    def _emit(self, g, x, prefix):
        y = g.add(_INPUT_NODE, _join(prefix, self.second), [], in_ch=self.num_classes)
        z = g.add(_CONCAT, _join(prefix, "cat"), [x, y])
        for name in ("fc1", "relu", "fc2"):
            z = self._emit_child(g, name, z, prefix)
        return z

    def _describe(self):
        return f"num_classes={self.num_classes}, hidden={self.fc1.out_features}"


def discriminator(num_classes, hidden=64, conditional=False, seed=0):
    """Adversarial KD's discriminator (``kdcore.adversarial``): logits (num_classes) ->
    Linear -> ReLU -> Linear -> one logit, ``mlp([num_classes, hidden, 1])``. conditional=True
    (Xu et al. 2018's conditional discriminator): it also reads the label one-hot, concatenated
    to the logits (a second input, node ``label``; keys ``fc1.*``, ``fc2.*``)."""
    num_classes = _check_int("num_classes", num_classes, 1)
    hidden = _check_int("hidden", hidden, 1)
    if not _check_bool("conditional", conditional):
        return mlp([num_classes, hidden, 1], seed=seed)
    m = _ConditionalDiscriminator(num_classes, hidden)
    m.reset_parameters(_check_int("seed", seed, 0))
    m.input_shape = (num_classes,)
    return m


def ctkd_temperature(num_classes, hidden=64, seed=0):
    """CTKD's instance-wise temperature net (``kdcore.losses.CTKD(temperature="instance")``):
    the student's logits and the teacher's (a second input, node ``teacher``) concatenated,
    Linear(2 num_classes, hidden) -> ReLU -> Linear(hidden, 1): one value m per sample, from
    which the loss takes T = t_start + t_range * sigmoid(m) (keys ``fc1.*``, ``fc2.*``)."""
    num_classes = _check_int("num_classes", num_classes, 1)
    hidden = _check_int("hidden", hidden, 1)
    m = _ConditionalDiscriminator(num_classes, hidden, second="teacher")
    m.reset_parameters(_check_int("seed", seed, 0))
    m.input_shape = (num_classes,)
    return m


def names():
    """Names accepted by :func:`get`, in zoo order."""
    return list(_BUILDERS)


def get(name, **kw):
    """Build a zoo model by name: ``kdcore.models.get("resnet8x4", num_classes=10)``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"name must be one of {names()}, got {name!r}")
    return _BUILDERS[key](**kw)


def with_exits(model, taps, num_classes=None):
    """``model`` with an early exit on each tap in ``taps`` (shallow to deep): global average
    pooling, Flatten and a Linear classifier per exit, named ``exits.<tap>``. The backbone's
    parameter names are unchanged, so a trained backbone's state dict loads with
    ``strict=False``. (BYOT adds bottleneck conv blocks before its exit classifiers; pass a
    head of your own to ``kdcore.nn.MultiExit`` for that.)"""
    from .nn import MultiExit, Module as _M
    if not isinstance(model, _M):
        raise TypeError(f"model must be a kdcore model, got {type(model).__name__}")
    if isinstance(taps, str) or not isinstance(taps, (list, tuple)) or not taps:
        raise TypeError("taps must be a non-empty list of tap names")
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("the model has no input_shape; build it with a zoo builder or set model.input_shape")
    c, h, w = (tuple(shape) + (1, 1))[:3] if len(shape) < 3 else tuple(shape)
    shapes = model.net.shapes(1, c, h, w)
    out_c = shapes[model._graph.output if model._graph.output is not None else -1][0]
    num_classes = out_c if num_classes is None else _check_int("num_classes", num_classes, 1)
    heads = {}
    for tap in taps:
        ch = shapes[model._tap_index(tap)][0]
        heads[tap] = Sequential(AdaptiveAvgPool2d(1), Flatten(), Linear(ch, num_classes))
    return MultiExit(model, heads)


def from_torch(module):
    """The kdcore twin of a PyTorch ``torch.nn.Sequential`` tree of layers kdcore has, weights
    loaded: see :func:`kdcore.bridge.from_torch` (conventions, limits, the zoo's path).
    Needs torch installed."""
    try:
        from .bridge import from_torch as convert
    except ImportError as e:
        raise ImportError("kdcore.models.from_torch needs PyTorch (pip install torch)") from e
    return convert(module)
