"""PyTorch definitions of the kdcore zoo: the reference side of the parity tests.

Written from the architecture descriptions of RepDistiller's models/resnet.py, wrn.py and
vgg.py (module names equal theirs, so state-dict keys do), with kdcore's one documented
adaptation: ResNet and WRN pool globally (AdaptiveAvgPool2d(1)) instead of AvgPool2d(8),
which is the same thing at 32x32 inputs. Each model records its intermediate tensors in
``self.feats`` (name -> tensor, kdcore tap names) on every forward, so a test can both
compare them and put a loss on them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _kaiming_out(m):
    # normal(0, sqrt(2 / (k*k*out))) == kaiming_normal_(mode="fan_out", nonlinearity="relu")
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _bn_init(m):
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)


# Kinks. kdcore and PyTorch agree to float32 rounding, but ReLU and max-pool are not
# continuous in their gradient: a pre-activation of -3e-6 in one and +1e-6 in the other (or
# a max-pool window with two values a few ulp apart) sends a gradient down different paths,
# and random inputs of a deep net hit such a kink on most batches. The twins' ReLUs and
# max-pools can therefore take their on/off pattern (argmax) from kdcore's forward pass
# (``route``); they check that every disagreement with their own input is a near-tie
# (within ROUTE_TOL of the tensor's scale), so a wrong kdcore mask or argmax still fails.
ROUTE_TOL = 1e-4


class RoutedReLU(nn.Module):
    """ReLU; with ``route`` (kdcore's output of the same ReLU, numpy) the pattern of active
    units is kdcore's. ``kd_name``: kdcore node name relative to the parent module, when it
    differs from this module's attribute name (None: the module path is the node name)."""

    def __init__(self, kd_name=None):
        super().__init__()
        self.kd_name = kd_name
        self.route = None

    def forward(self, x):
        if self.route is None:
            return F.relu(x)
        on = torch.from_numpy(np.asarray(self.route) > 0).reshape(x.shape)
        xd = x.detach()
        differ = on != (xd > 0)
        if differ.any():
            worst = xd[differ].abs().max().item()
            scale = xd.abs().max().item()
            assert worst <= ROUTE_TOL * scale, (
                f"kdcore's ReLU pattern differs from the reference input at {int(differ.sum())} units, "
                f"up to |x| = {worst:.3e} (scale {scale:.3e}): not a rounding near-tie")
        return x * on.to(x.dtype)


class RoutedMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d; with ``route`` (kdcore's *input* to the same pool, numpy) each window's
    maximum is chosen on kdcore's values (first maximum in scan order, the rule of both) and
    the output gathers this module's input there."""
    route = None

    def forward(self, x):
        if self.route is None:
            return super().forward(x)
        r = torch.from_numpy(np.ascontiguousarray(self.route, dtype=np.float32)).reshape(x.shape).to(x.dtype)
        _, idx = F.max_pool2d(r, self.kernel_size, self.stride, self.padding, self.dilation,
                              ceil_mode=self.ceil_mode, return_indices=True)
        out = x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        true_max = super().forward(x.detach())
        worst = (true_max - out.detach()).abs().max().item()
        scale = x.detach().abs().max().item()
        assert worst <= ROUTE_TOL * scale, (
            f"kdcore's max-pool argmax picks values up to {worst:.3e} below the window maximum "
            f"(scale {scale:.3e}): not a rounding near-tie")
        return out


def route(torch_model, kd_model):
    """Give every RoutedReLU / RoutedMaxPool2d of the twin kdcore's pattern from the kdcore
    model's last forward (kdcore node names are the torch module paths)."""
    g = kd_model._graph
    for path, mod in torch_model.named_modules():
        if isinstance(mod, RoutedReLU):
            name = path if mod.kd_name is None else (path.rsplit(".", 1)[0] + "." if "." in path else "") + mod.kd_name
            mod.route = kd_model.tap(name)
        elif isinstance(mod, RoutedMaxPool2d):
            if path in g.names:
                src = g.nodes[g.names.index(path)][2]       # the pool node's input node
                mod.route = kd_model.net.tap(src)
            else:
                mod.route = None                            # a pool kdcore's graph does not apply


def unroute(torch_model):
    for mod in torch_model.modules():
        if isinstance(mod, (RoutedReLU, RoutedMaxPool2d)):
            mod.route = None


# ------------------------------------------------------------------------------------------
# CIFAR ResNet


class TorchBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = RoutedReLU("relu1")          # RepDistiller's name; kdcore's node is "relu1"
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = RoutedReLU("relu")       # RepDistiller's F.relu; kdcore's node "relu"
        self.preact = None

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        self.preact = y + s
        self.out = self.relu_out(self.preact)
        return self.out


class TorchResNet(nn.Module):
    def __init__(self, depth, widths, num_classes=10, in_channels=3):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = RoutedReLU()
        self.layer1 = self._stage(widths[1], n, 1)
        self.layer2 = self._stage(widths[2], n, 2)
        self.layer3 = self._stage(widths[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_out(m)
            elif isinstance(m, nn.BatchNorm2d):
                _bn_init(m)

    def _stage(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        layers = [TorchBasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [TorchBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        f = self.feats = {}
        x = f["relu"] = self.relu(self.bn1(self.conv1(x)))
        for name in ("layer1", "layer2", "layer3"):
            x = f[name] = getattr(self, name)(x)
            for i, blk in enumerate(getattr(self, name)):
                f[f"{name}.{i}.add"] = blk.preact
                f[f"{name}.{i}.relu"] = f[f"{name}.{i}"] = blk.out   # kdcore: "relu" = post-activation
        x = f["flatten"] = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


RESNETS = {
    "resnet8": (8, [16, 16, 32, 64]), "resnet14": (14, [16, 16, 32, 64]), "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]), "resnet44": (44, [16, 16, 32, 64]), "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]), "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


# ------------------------------------------------------------------------------------------
# Wide ResNet (pre-activation)


class TorchWideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = RoutedReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = RoutedReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        # Not equal widths: the activated input a (not x) also feeds the shortcut conv.
        return (x if self.equal else self.convShortcut(a)) + y


class TorchNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[TorchWideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TorchWideResNet(nn.Module):
    def __init__(self, depth, k, num_classes=10, in_channels=3):
        super().__init__()
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        ch = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, padding=1, bias=False)
        self.block1 = TorchNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = TorchNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = TorchNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = RoutedReLU()
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_out(m)
            elif isinstance(m, nn.BatchNorm2d):
                _bn_init(m)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        f = self.feats = {}
        x = f["conv1"] = self.conv1(x)
        for name in ("block1", "block2", "block3"):
            x = f[name] = getattr(self, name)(x)
        x = f["bn1"] = self.bn1(x)
        x = f["flatten"] = F.adaptive_avg_pool2d(self.relu(x), 1).flatten(1)
        return self.fc(x)


WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


# ------------------------------------------------------------------------------------------
# VGG with BN


VGG_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class TorchVGG(nn.Module):
    def __init__(self, cfg, num_classes=10, in_channels=3):
        super().__init__()
        cin = in_channels
        for i, widths in enumerate(cfg):
            layers = []
            for v in widths:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), RoutedReLU()]
                cin = v
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))   # no ReLU at the end of a block
            setattr(self, f"relu{i}", RoutedReLU())    # RepDistiller's F.relu after each block
        for i in range(4):
            setattr(self, f"pool{i}", RoutedMaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_out(m)
            elif isinstance(m, nn.BatchNorm2d):
                _bn_init(m)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = x.shape[2]
        f = self.feats = {}
        for i in range(5):
            x = f[f"block{i}"] = getattr(self, f"block{i}")(x)
            x = f[f"relu{i}"] = getattr(self, f"relu{i}")(x)
            if i < 3 or (i == 3 and h == 64):
                x = getattr(self, f"pool{i}")(x)
        x = f["flatten"] = self.pool4(x).flatten(1)
        return self.classifier(x)


VGGS = {"vgg8": "S", "vgg11": "A", "vgg13": "B"}


# ------------------------------------------------------------------------------------------
# mlp / cnn (kdcore's own small models, nn.Sequential indices)


def torch_mlp(sizes):
    layers = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(RoutedReLU())
    return nn.Sequential(*layers)


def torch_cnn(num_classes=10, in_channels=1, width=32):
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), RoutedReLU(),
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), RoutedReLU(),
        RoutedMaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), RoutedReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), RoutedReLU(),
        RoutedMaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))


def build(name, num_classes=10, in_channels=1, **kw):
    """The PyTorch twin of ``kdcore.models.get(name, ...)``."""
    if name in RESNETS:
        return TorchResNet(*RESNETS[name], num_classes=num_classes, in_channels=in_channels)
    if name in WRNS:
        return TorchWideResNet(*WRNS[name], num_classes=num_classes, in_channels=in_channels)
    if name in VGGS:
        return TorchVGG(VGG_CFG[VGGS[name]], num_classes=num_classes, in_channels=in_channels)
    if name == "cnn":
        return torch_cnn(num_classes, in_channels, **kw)
    if name == "mlp":
        return torch_mlp(kw["sizes"])
    raise KeyError(name)


def capture(torch_model, names):
    """Forward hooks recording the outputs of the modules at these paths (names that are not
    module paths are skipped) into ``torch_model.hooked``; returns the hook handles.
    ``feature(torch_model, name)`` reads the model's own record first, then the hooks'."""
    torch_model.hooked = {}
    handles = []
    for name in names:
        try:
            mod = torch_model.get_submodule(name)
        except AttributeError:
            continue
        handles.append(mod.register_forward_hook(
            lambda m, i, o, name=name: torch_model.hooked.__setitem__(name, o)))
    return handles


def feature(torch_model, name):
    feats = getattr(torch_model, "feats", {})
    if name in feats:
        return feats[name]
    return torch_model.hooked[name]


# ------------------------------------------------------------------------------------------
# State-dict exchange


def to_numpy_state(torch_model):
    """state_dict() as numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in torch_model.state_dict().items()}


def load_into_torch(torch_model, kd_state):
    """Load a kdcore state dict (numpy arrays) into a torch model, strictly."""
    ref = torch_model.state_dict()
    sd = {}
    for k, v in kd_state.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        sd[k] = t.to(ref[k].dtype).reshape(ref[k].shape) if k in ref else t
    torch_model.load_state_dict(sd, strict=True)
    return torch_model


def check_tensor(name, a, b, rtol=1e-4, atol=None, scale=None, n_show=5):
    """Compare kdcore ``a`` with reference ``b`` (llm.c's check_tensor in spirit).

    Passes when |a - b| <= atol + rtol * |b| everywhere, with atol defaulting to
    rtol * max|b| (tolerance relative to the tensor's scale). On failure returns a message
    with the shapes, max abs diff and the first mismatching values; returns None on success.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        if a.size == b.size:
            a = a.reshape(b.shape)
        else:
            return f"{name}: shape {a.shape} != reference {b.shape}"
    if scale is None:
        scale = float(np.max(np.abs(b))) if b.size else 0.0
    if atol is None:
        atol = rtol * max(scale, 1e-12)
    diff = np.abs(a - b)
    bad = diff > atol + rtol * np.abs(b)
    if not bad.any() and np.all(np.isfinite(a)):
        return None
    idx = np.argwhere(bad | ~np.isfinite(a))[:n_show]
    lines = [f"{name}: {int(bad.sum())}/{a.size} mismatches, max abs diff {diff.max():.3e} "
             f"(atol {atol:.3e}, rtol {rtol:g}, ref scale {scale:.3e})"]
    for i in idx:
        i = tuple(int(j) for j in i)
        lines.append(f"  at {i}: kdcore {a[i]:.7g}  torch {b[i]:.7g}  diff {a[i] - b[i]:.3e}")
    return "\n".join(lines)


def assert_close(name, a, b, **kw):
    msg = check_tensor(name, a, b, **kw)
    assert msg is None, msg


__all__ = ["RoutedReLU", "RoutedMaxPool2d", "route", "unroute", "TorchResNet", "TorchWideResNet", "TorchVGG",
           "torch_mlp", "torch_cnn", "build", "to_numpy_state", "load_into_torch", "capture", "feature",
           "check_tensor", "assert_close"]
