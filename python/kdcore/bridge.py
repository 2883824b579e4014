"""PyTorch and ONNX: kdcore models to ``torch.nn.Module`` and back, and ONNX export.

Entry points (thin wrappers elsewhere call these): ``Module.to_torch()`` (:func:`to_torch`),
``kdcore.models.from_torch(module)`` (:func:`from_torch`) and ``Module.to_onnx(path)``
(:func:`to_onnx`). This module imports torch, an optional dependency of kdcore; importing it
without torch installed raises ImportError.

Correspondence. Each kdcore layer becomes the PyTorch layer of the same name and options
(``Linear`` -> ``torch.nn.Linear``, ``AvgPool2d`` -> ``torch.nn.AvgPool2d`` with
``count_include_pad=True``, ``Upsample`` -> ``torch.nn.Upsample`` (nearest, or bilinear with
``align_corners=False``), ...),
``Sequential`` becomes ``torch.nn.Sequential`` and ``Residual`` this module's
:class:`Residual`, so parameter names, and so state-dict keys, are kdcore's. The zoo models
become RepDistiller's layout: :class:`BasicBlock` and :class:`WideBasicBlock` with the
reference module names, stages and whole networks ``torch.nn.Sequential`` with named
children (``conv1``, ``layer1``, ..., ``fc``), applied in kdcore's order. Outputs agree to
float rounding, except that kdcore returns a 1x1 map as (N, C) where PyTorch keeps
(N, C, 1, 1).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from . import models
from . import nn as knn

__all__ = ["to_torch", "from_torch", "to_onnx", "Residual", "BasicBlock", "WideBasicBlock"]


class Residual(tnn.Module):
    """PyTorch twin of ``kdcore.nn.Residual``: ``relu?(body(x) + shortcut(x))``, the shortcut
    the identity when None."""

    def __init__(self, body, shortcut=None, activation=True):
        super().__init__()
        self.body, self.shortcut, self.activation = body, shortcut, activation

    def forward(self, x):
        out = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out) if self.activation else out


class BasicBlock(tnn.Module):
    """RepDistiller's CIFAR ResNet block (``kdcore.models.BasicBlock``):
    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``."""

    def __init__(self, conv1, bn1, conv2, bn2, downsample=None):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.downsample = conv1, bn1, conv2, bn2, downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class WideBasicBlock(tnn.Module):
    """RepDistiller's pre-activation WRN block (``kdcore.models.WideBasicBlock``); with a
    ``convShortcut`` the activated input feeds both convolutions, as there."""

    def __init__(self, bn1, conv1, bn2, conv2, convShortcut=None, dropout=None):  # noqa: N803 - the reference name
        super().__init__()
        self.bn1, self.conv1, self.bn2, self.conv2 = bn1, conv1, bn2, conv2
        self.convShortcut, self.dropout = convShortcut, dropout

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


# Layers without options, kdcore -> torch (from_torch reads the inverse).
_SIMPLE = {knn.ReLU: tnn.ReLU, knn.Sigmoid: tnn.Sigmoid, knn.Tanh: tnn.Tanh, knn.Flatten: tnn.Flatten,
           knn.Identity: tnn.Identity, knn.AdaptiveAvgPool2d: lambda: tnn.AdaptiveAvgPool2d(1)}


def _convert(m):
    """The PyTorch module of kdcore module ``m`` (fresh parameters; see to_torch). Layer types
    match exactly, a subclass may emit other nodes; the zoo's chains say what they run."""
    def child(name):
        c = getattr(m, name)
        return None if c is None else _convert(c)

    if type(m) is knn.Linear:
        return tnn.Linear(m.in_features, m.out_features, bias=m.bias)
    if type(m) is knn.Conv2d:
        return tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                          groups=m.groups, bias=m.bias)
    if type(m) is knn.BatchNorm1d:
        return tnn.BatchNorm1d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine)
    if type(m) is knn.BatchNorm2d:
        return tnn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine)
    if type(m) is knn.MaxPool2d:
        return tnn.MaxPool2d(m.kernel_size, m.stride, m.padding)
    if type(m) is knn.AvgPool2d:
        return tnn.AvgPool2d(m.kernel_size, m.stride, m.padding, count_include_pad=True)
    if type(m) is knn.Upsample:
        return tnn.Upsample(size=m.size, scale_factor=m.scale_factor, mode=m.mode,
                            align_corners=False if m.mode == "bilinear" else None)
    if type(m) is knn.LeakyReLU:
        return tnn.LeakyReLU(m.negative_slope)
    if type(m) is knn.Dropout:
        return tnn.Dropout(m.p)
    if type(m) in _SIMPLE:
        return _SIMPLE[type(m)]()
    if type(m) is knn.Sequential:
        return tnn.Sequential(*[_convert(c) for c in m.layers])
    if type(m) is knn.Residual:
        return Residual(_convert(m.body), None if m.shortcut is None else _convert(m.shortcut), m.activation)
    if type(m) is models.BasicBlock:
        return BasicBlock(*[child(n) for n in ("conv1", "bn1", "conv2", "bn2", "downsample")])
    if type(m) is models.WideBasicBlock:
        return WideBasicBlock(*[child(n) for n in ("bn1", "conv1", "bn2", "conv2", "convShortcut", "dropout")])
    if isinstance(m, models._ChainBlock):
        return tnn.Sequential(OrderedDict((n, child(n)) for n in m._chain()))
    raise TypeError(f"to_torch: no PyTorch counterpart for {type(m).__name__} (kdcore.nn layers, Sequential, "
                    "Residual and the kdcore.models zoo convert; a MultiExit converts as model.backbone and "
                    "its heads model.exits[tap] separately)")


def _torch_state(state_dict):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}


def to_torch(model):
    """A ``torch.nn.Module`` computing what the kdcore ``model`` computes, holding copies of
    its parameters and BatchNorm buffers (float32; ``num_batches_tracked`` int64) under the
    same state-dict keys, in the model's mode (``train``/``eval``).

    Every ``kdcore.nn`` layer, ``Sequential`` and ``Residual`` tree and ``kdcore.models`` zoo
    model converts (layouts: this module's docstring). Not converted (TypeError):
    ``MultiExit`` (convert ``model.backbone`` and the heads) and user ``Block`` subclasses,
    whose forward is their own ``_emit``. Dropout draws different masks in PyTorch: compare
    training-mode outputs with p=0 or in eval mode. VGG's ``pool3`` is applied or not as in
    the kdcore graph, which fixes it for the model's ``input_size``.
    """
    if not isinstance(model, knn.Module):
        raise TypeError(f"model must be a kdcore.nn.Module, got {type(model).__name__}")
    tm = _convert(model)
    tm.load_state_dict(_torch_state(model.state_dict()), strict=True)
    return tm.train(model.training)


_SIMPLE_FROM = {tnn.ReLU: knn.ReLU, tnn.Sigmoid: knn.Sigmoid, tnn.Tanh: knn.Tanh, tnn.Identity: knn.Identity}


def _refuse(path, mod, why):
    raise TypeError(f"from_torch: submodule {path or '(root)'!r} ({type(mod).__name__}) is not supported: {why}")


def _square(*options):
    """Every option is a scalar or an (a, a) pair: kdcore's kernels, strides and paddings are square."""
    return all(not isinstance(v, tuple) or len(set(v)) == 1 for v in options)


def _from(mod, path):
    """The kdcore module of torch module ``mod`` at ``path`` (fresh parameters). Types match
    exactly: a subclass may have its own forward."""
    if type(mod) is tnn.Linear:
        return knn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    if type(mod) is tnn.Conv2d:
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros" or mod.dilation != (1, 1) or not _square(
                mod.kernel_size, mod.stride, mod.padding):
            _refuse(path, mod, "kdcore's Conv2d has square kernel, stride and padding, zero padding and dilation 1")
        return knn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                          mod.groups, bias=mod.bias is not None)
    if type(mod) in (tnn.BatchNorm1d, tnn.BatchNorm2d):
        if not mod.track_running_stats or mod.momentum is None:
            _refuse(path, mod, "kdcore's BatchNorm tracks running statistics and has a momentum")
        cls = knn.BatchNorm1d if type(mod) is tnn.BatchNorm1d else knn.BatchNorm2d
        return cls(mod.num_features, eps=mod.eps, momentum=mod.momentum, affine=mod.affine)
    if type(mod) in (tnn.MaxPool2d, tnn.AvgPool2d):
        max_pool = type(mod) is tnn.MaxPool2d
        if mod.ceil_mode or (max_pool and (mod.dilation not in (1, (1, 1)) or mod.return_indices)) or (
                not max_pool and (not mod.count_include_pad or mod.divisor_override is not None)) or not _square(
                mod.kernel_size, mod.stride, mod.padding):
            _refuse(path, mod, "kdcore pools square windows, floor mode, dilation 1, padding counted in averages")
        return (knn.MaxPool2d if max_pool else knn.AvgPool2d)(mod.kernel_size, mod.stride, mod.padding)
    if type(mod) is tnn.AdaptiveAvgPool2d:
        if mod.output_size not in (1, (1, 1)):
            _refuse(path, mod, "kdcore's AdaptiveAvgPool2d has output_size 1 only")
        return knn.AdaptiveAvgPool2d(1)
    if type(mod) is tnn.Upsample:
        scale = mod.scale_factor[0] if isinstance(mod.scale_factor, tuple) else mod.scale_factor
        if mod.mode not in ("nearest", "bilinear") or (mod.mode == "bilinear" and mod.align_corners) or (
                scale is not None and (not _square(mod.scale_factor) or float(scale) % 1)):
            _refuse(path, mod, "kdcore's Upsample is nearest or bilinear (align_corners=False), to a size or by an "
                    "integer scale factor")
        return knn.Upsample(size=mod.size, mode=mod.mode) if scale is None else \
            knn.Upsample(scale_factor=int(scale), mode=mod.mode)
    if type(mod) is tnn.LeakyReLU:
        return knn.LeakyReLU(mod.negative_slope)
    if type(mod) is tnn.Dropout:
        return knn.Dropout(mod.p)
    if type(mod) is tnn.Flatten:
        if mod.start_dim != 1 or mod.end_dim != -1:
            _refuse(path, mod, "kdcore's Flatten flattens every dimension after the batch")
        return knn.Flatten()
    if type(mod) in _SIMPLE_FROM:
        return _SIMPLE_FROM[type(mod)]()
    if type(mod) is tnn.Sequential:
        names = [n for n, _ in mod.named_children()]
        if names != [str(i) for i in range(len(names))]:
            _refuse(path, mod, f"its children are named {names[:4]}...; kdcore's Sequential names them 0, 1, ... "
                    "(a zoo layout: build kdcore.models.<name>(...) and load_state_dict(module.state_dict()))")
        return knn.Sequential(*[_from(c, f"{path}.{n}" if path else n) for n, c in mod.named_children()])
    if type(mod) is Residual:
        def sub(n):
            return _from(getattr(mod, n), f"{path}.{n}" if path else n)
        return knn.Residual(sub("body"), None if mod.shortcut is None else sub("shortcut"), mod.activation)
    _refuse(path, mod, "from_torch converts torch.nn.Sequential trees of Linear, Conv2d, BatchNorm1d/2d, ReLU, "
            "LeakyReLU, Sigmoid, Tanh, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Dropout, Flatten, Identity, "
            "Upsample (nearest, bilinear) "
            "and kdcore.bridge.Residual; for a zoo layout build kdcore.models.<name>(...) and "
            "load_state_dict(module.state_dict())")


def from_torch(module):
    """The kdcore twin of a PyTorch model, with its parameters and BatchNorm buffers, in its
    mode (train/eval).

    ``module``: a ``torch.nn.Sequential`` tree (children named 0, 1, ...) of the layers
    kdcore has, with kdcore's options (square kernels, zero padding, ceil_mode off, ...):
    Linear, Conv2d, BatchNorm1d/2d, ReLU, Sigmoid, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1),
    Dropout, Flatten, Identity, LeakyReLU, Tanh, Upsample (nearest; bilinear with align_corners=False), and
    :class:`Residual`, by exact type (a
    subclass may have its own forward). Anything else raises TypeError naming the first
    unsupported submodule (its path and type) and why.

    Zoo layouts (RepDistiller's ResNet / WRN / VGG, and what ``to_torch`` makes of the zoo)
    are not parsed: build the kdcore model and load the weights, e.g.
    ``kdcore.models.resnet8(num_classes=10, in_channels=3).load_state_dict(module.state_dict())``.
    The result has no ``input_shape``; set it for ``to_onnx`` or ``with_exits``.
    """
    if not isinstance(module, tnn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    km = _from(module, "")
    km.load_state_dict(module.state_dict(), strict=True)
    return km.train(module.training)


def _example_input_shape(model, input_shape):
    shape = getattr(model, "input_shape", None) if input_shape is None else input_shape
    if shape is None:
        raise ValueError("to_onnx needs the shape of one input sample: pass input_shape=(C, H, W) or (features,), "
                         "or set model.input_shape")
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= 3:
        raise ValueError(f"input_shape must be (C, H, W) or (features,), got {shape!r}")
    return tuple(knn._check_int("input_shape", s, 1) for s in shape)


def to_onnx(model, path, opset=17, input_shape=None):
    """Write the kdcore ``model`` as an ONNX file at ``path`` (opset ``opset``, default 17) and
    return ``path``.

    The graph is ``to_torch(model)`` in eval mode (BatchNorm uses its running statistics,
    Dropout is off; the kdcore model's own mode is unchanged), exported by PyTorch's
    TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, deprecated since
    PyTorch 2.9): it writes opset 17 natively, where the torch.export-based one needs
    onnxscript, builds opset 18 and converts it down, and took ~10x longer (resnet110: 12 s
    against 1 s). Input "input" has the shape (batch, *input_shape),
    output "output" (batch, ...): the batch dimension is dynamic, the others fixed.
    ``input_shape`` (one sample, e.g. (1, 28, 28)) defaults to ``model.input_shape``, which
    zoo models have. The file is written next to ``path`` under a temporary name, checked
    with ``onnx.checker.check_model`` (full check), fsynced and renamed into place, so
    ``path`` never holds a partial or invalid file. Needs torch and onnx installed.
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError("to_onnx needs the onnx package (pip install onnx)") from e
    opset = knn._check_int("opset", opset, 7)
    shape = _example_input_shape(model, input_shape)
    path = os.fspath(path)
    tm = to_torch(model).eval()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".kdcore-", suffix=".onnx.tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The exporter's deprecation (see the docstring) is ours to track, not the caller's
            # to see on every export.
            for msg in ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed"):
                warnings.filterwarnings("ignore", message=msg, category=DeprecationWarning)
            torch.onnx.export(tm, (torch.zeros((2,) + shape),), tmp, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        onnx.checker.check_model(tmp, full_check=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp's 0600 would make the file private
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)                       # the rename itself survives a crash
    finally:
        os.close(dfd)
    return path
