"""Layers and models, PyTorch-style.

A kdcore `Module` is a *description* (layer options, children) plus, once used, a compiled
C network. Any module can be called like a model: ``kdcore.nn.Linear(3, 4)(x)`` works, as does
``Sequential(...)(x)`` or a zoo model. The C network is built on first use from the module
tree; parameter names follow PyTorch's state-dict keys (``features.0.weight``,
``layer1.0.bn1.running_mean``), so a PyTorch state dict of the same architecture, converted
to numpy arrays, loads directly.

Every node output is a *tap*: after ``forward`` read it with ``model.tap(name)``; before
``backward`` add a gradient to it with ``model.add_tap_grad(name, g)``. Names are the node
names (``layer1.0.bn2`` is the pre-activation, ``layer1.0.relu2`` the post-activation) plus
module aliases (``layer1`` is the output of that stage).
"""
from __future__ import annotations

import html
from collections import OrderedDict

import numpy as np

from . import _kdcore

__all__ = ["Module", "Sequential", "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU",
           "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Flatten", "Residual", "Identity",
           "MultiExit", "Block", "Sigmoid", "Upsample", "LeakyReLU", "Tanh", "Unflatten", "Jitter"]

# enum kd_layer_type, by the names C gives them
_LT = _kdcore.LAYER_TYPES
_LINEAR, _CONV2D, _BATCHNORM, _RELU, _MAXPOOL, _AVGPOOL, _GAP, _DROPOUT, _FLATTEN, _ADD = (
    _LT[k] for k in ("linear", "conv2d", "batchnorm", "relu", "maxpool2d", "avgpool2d", "global_avgpool", "dropout",
                     "flatten", "add"))
_INPUT_NODE, _UPSAMPLE, _SIGMOID, _MUL, _CONCAT = (_LT[k] for k in ("input", "upsample", "sigmoid", "mul", "concat"))
_BILINEAR, _LEAKY_RELU, _TANH, _RESHAPE = (_LT[k] for k in ("upsample_bilinear", "leaky_relu", "tanh", "reshape"))
_JITTER = _LT["jitter"]
# Must match enum kd_init in kdcore.h.
_INITS = {"default": 0, "kaiming_normal_fan_out": 1, "kaiming_normal_fan_in": 2}
_INPUT = -1
_ROOT = "_root"   # C needs a non-empty node name; a bare layer used as a model gets this one


def _check_int(name, v, lo=None):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _check_bool(name, v):
    """A flag: bool, numpy bool, int or None (False); anything else (strings, arrays) is a TypeError."""
    if v is None or isinstance(v, (bool, np.bool_, int, np.integer)):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def _is_choice(v, choices):
    """v is one of choices: strings compare by value, True/False by identity (arrays, lists and
    other unhashable values are simply not a choice)."""
    if isinstance(v, (bool, np.bool_)):
        return any(c is bool(v) for c in choices)
    return isinstance(v, str) and v in [c for c in choices if isinstance(c, str)]


def _check_float(name, v, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _square(name, v):
    """PyTorch accepts int or (int, int); kdcore's kernels are square."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} must be an int or a square pair (k, k), got {v!r}")
        v = v[0]
    return _check_int(name, v)


def _expected_input(model, got, what="x"):
    """'; the model's input is (N, 1, 28, 28), x is (N, 784): ...' for a model whose input
    shape is known (zoo models; ``model.input_shape``), else ''."""
    want = tuple(getattr(model, "input_shape", None) or ())
    if not want:
        return ""
    got = tuple(got)
    fmt = lambda s: f"(N, {', '.join(map(str, s))})"  # noqa: E731
    hint = f"; the model's input is {fmt(want)}, {what} is {fmt(got)}"
    if len(want) == 3 and len(got) == 3 and got == want[1:] + want[:1]:
        hint += ": channels-last images; transpose them with X.transpose(0, 3, 1, 2)"
    elif len(want) == 3 and int(np.prod(got)) == int(np.prod(want)):
        hint += f": reshape it with X.reshape(-1, {', '.join(map(str, want))})"
    return hint


class _Graph:
    """Node list under construction: what a module tree compiles to."""

    def __init__(self):
        self.nodes = []          # tuples for _kdcore.Net
        self.names = []
        self.kinds = []
        self.aliases = OrderedDict()   # module path -> node index of its output
        self.output = None             # the network output when it is not the last node

    def add(self, kind, name, inputs, in_ch=0, out_ch=0, kernel=0, stride=1, padding=0, groups=1,
            bias=True, eps=1e-5, momentum=0.1, p=0.0, init="default", size=(0, 0), slope=0.01, affine=True):
        name = name or _ROOT
        if name in self.names:
            raise ValueError(f"two layers are both named {name!r}")
        inp = list(inputs) + [_INPUT] * (2 - len(inputs))
        self.nodes.append((kind, name, inp[0], inp[1], in_ch, out_ch, kernel, stride, padding, groups,
                           bool(bias), eps, momentum, p, _INITS[init], size[0], size[1], slope, bool(affine)))
        self.names.append(name)
        self.kinds.append(kind)
        return len(self.nodes) - 1

    def alias(self, name, node):
        # A module that returns the network input (Identity first) has no node of its own.
        if node >= 0 and name and name not in self.names and name not in self.aliases:
            self.aliases[name] = node


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else str(name)


class Module:
    """Base class: a layer or a block of layers, usable as a model.

    Subclasses implement ``_emit(graph, x, prefix) -> node`` which appends their nodes (named
    under ``prefix``) reading from node ``x`` and returns the output node.
    """

    def __init__(self):
        self._net = None
        self._graph = None
        self._seed = 0
        self.training = True
        self._step = 0
        self._x_shape = None

    # ---- copies -------------------------------------------------------------------------
    _RUNTIME = ("_net", "_graph", "_tensors", "_bn_nodes", "history", "_x_shape")

    def __getstate__(self):
        # The compiled C net is not copied: copies rebuild their own from the description.
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._net = None
        self._graph = None

    def fresh(self, seed=None):
        """A new, independently initialised model with the same architecture (seed defaults
        to this model's seed + 1)."""
        import copy
        m = copy.deepcopy(self)
        m._seed = self._seed + 1 if seed is None else _check_int("seed", seed, 0)
        m._step = 0
        m.training = True
        m.__dict__.pop("train_normalization", None)   # describes trained weights, which a fresh model lacks
        return m

    def copy(self):
        """An independent model with the same architecture, parameters and BN buffers."""
        m = self.fresh(self._seed)
        m.load_state_dict(self.state_dict())
        m.training = self.training
        if hasattr(self, "train_normalization"):
            m.train_normalization = self.train_normalization
        return m

    # ---- structure ------------------------------------------------------------------
    def _emit(self, g, x, prefix):  # pragma: no cover - abstract
        raise NotImplementedError

    def _children(self):
        return []

    def _build(self):
        if self._net is None:
            g = _Graph()
            self._emit(g, _INPUT, "")
            self._graph = g
            self._net = _kdcore.Net(g.nodes, self._seed)
            if g.output is not None:
                self._net.set_output(g.output)
            self._tensors = self._net.tensors()
            self._bn_nodes = [i for i, k in enumerate(g.kinds) if k == _BATCHNORM]
        return self._net

    def _graph_kinds(self):
        self._build()
        return list(self._graph.kinds)

    @property
    def net(self):
        """The compiled C network (built on first access)."""
        return self._build()

    def reset_parameters(self, seed=0):
        """Re-initialise every parameter and BN buffer from ``seed``."""
        self._seed = _check_int("seed", seed, 0)
        self.net.init_params(self._seed)
        for i in self._bn_nodes:
            self._net.bn_batches(i, 0)
        return self

    # ---- modes ----------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (``mode=True``, the default; False is ``eval()``): BatchNorm uses batch
        statistics and updates its running ones, Dropout is active. Returns the model."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        self.training = mode
        return self

    def eval(self):
        """Evaluation mode: BatchNorm uses its running statistics, Dropout is off (as
        ``torch.nn.Module.eval``). The training entry points leave models in eval mode; fit
        and distill switch to training mode themselves. Returns the model."""
        return self.train(False)

    # ---- compute ----------------------------------------------------------------------
    def forward(self, x, grad=True):
        """Forward pass; returns the output as a new numpy array ((N, classes) for classifiers).

        ``x``: float32 array (N, C, H, W) or (N, features). In training mode BatchNorm uses
        batch statistics (and updates its running statistics) and Dropout is active.

        ``grad=False`` is inference only (like ``torch.no_grad``): intermediate outputs are
        not kept (``tap`` and ``backward`` refuse until the next plain forward), memory is
        reused between layers, and in eval mode the batch runs in cache-sized chunks of
        images, so a large batch needs little memory. Same outputs (bitwise up to the
        classifier; linear layers to float rounding).
        """
        net = self.net
        self._step += 1
        mode = (3 if self.training else 0) | (0 if _check_bool("grad", grad) else 4)
        try:
            out = net.forward(x, mode=mode, seed=self._seed * 1000003 + self._step)
        except ValueError as e:
            if str(e).startswith("kd_net_plan") and isinstance(x, np.ndarray):
                raise ValueError(f"{e}{_expected_input(self, x.shape[1:], 'x')}") from None
            raise
        self._x_shape = x.shape
        return out

    __call__ = forward

    def backward(self, dout=None, input_grad=True):
        """Backward from ``dout`` (gradient of the output, shape of the last forward's output),
        plus any gradients added at taps. Accumulates parameter gradients (see ``zero_grad``)
        and returns the gradient with respect to the input (or None if ``input_grad=False``)."""
        d = self.net.backward(dout, input_grad=input_grad)
        if d is not None and self._x_shape is not None:
            d = d.reshape(self._x_shape)
        return d

    def zero_grad(self):
        """Set every parameter gradient to zero: ``backward`` accumulates into them (as in
        PyTorch), so call this before each manual backward pass."""
        self.net.zero_grad()

    # ---- taps -------------------------------------------------------------------------
    def taps(self):
        """Names of every readable intermediate output: node names, then module aliases.
        ``summary()`` shows each with its layer type and output shape. A ResNet's stages are
        "layer1".."layer3"; ``Sequential`` models (``models.cnn``, ``models.mlp``) name their
        layers by index, "0", "1", ...; ``feature_taps()`` gives a zoo model's stage ends."""
        self._build()
        return list(self._graph.names) + list(self._graph.aliases)

    def _tap_index(self, name):
        self._build()
        if isinstance(name, str):
            if name in self._graph.aliases:
                return self._graph.aliases[name]
            if name in self._graph.names:
                return self._graph.names.index(name)
            raise KeyError(f"no tap named {name!r}; model.taps() lists them")
        raise TypeError(f"tap name must be a str, got {type(name).__name__}")

    def _output_index(self):
        self._build()
        return self._graph.output if self._graph.output is not None else len(self._graph.nodes) - 1

    def feature_taps(self):
        """The taps feature distillation reads by default, or None when the model has no
        defaults: {"stages": [f1, f2, f3] (stage ends, post-activation), "stages_pre": the same
        before the activation, "stages_bn": the BatchNorm layers whose affine parameters
        describe the pre-activations (OFD's margins), "pooled": f4 (the pooled feature before
        the classifier), "hint": FitNet's hint layer (f2)}. The zoo models define them as RepDistiller and
        mdistiller tap them; set ``model.default_taps = {...}`` for a model of your own."""
        return getattr(self, "default_taps", None)

    def tap(self, name):
        """Copy of the named intermediate output from the last forward pass."""
        return self.net.tap(self._tap_index(name))

    def add_tap_grad(self, name, grad, scale=1.0):
        """Add ``scale * grad`` to the gradient at a tap, between forward and backward."""
        scale = _check_float("scale", scale)
        self.net.grad_add(self._tap_index(name), grad, scale)

    # ---- parameters -------------------------------------------------------------------
    def _key(self, cname):
        return cname[len(_ROOT) + 1:] if cname.startswith(_ROOT + ".") else cname

    def named_parameters(self):
        """(name, view) pairs; the views share memory with the C parameter block."""
        block = self.net.params()
        for name, shape, is_buf, off in self._tensors:
            if not is_buf:
                n = int(np.prod(shape))
                yield self._key(name), block[off:off + n].reshape(shape)

    def parameters(self):
        """OrderedDict name -> parameter view (live: writing to a view changes the model);
        BN running statistics are buffers, in ``state_dict()`` only."""
        return OrderedDict(self.named_parameters())

    def grads(self):
        """name -> gradient (views into the C gradient block; live)."""
        block = self.net.grads()
        out = OrderedDict()
        for name, shape, is_buf, off in self._tensors:
            if not is_buf:
                out[self._key(name)] = block[off:off + int(np.prod(shape))].reshape(shape)
        return out

    def num_parameters(self):
        """Number of trainable parameters (scalars; BN running statistics not included)."""
        return int(self.net.params().size)

    def _state_items(self):
        """(key, array view, kind) for every state-dict entry, PyTorch's order per module."""
        params, bufs = self.net.params(), self.net.buffers()
        per_node = OrderedDict()
        for name, shape, is_buf, off in self._tensors:
            node = name.rsplit(".", 1)[0]
            block = bufs if is_buf else params
            per_node.setdefault(node, []).append(
                (self._key(name), block[off:off + int(np.prod(shape))].reshape(shape), "buffer" if is_buf else "param"))
        items = []
        g = self._graph
        for i, name in enumerate(g.names):
            for it in per_node.get(name, []):
                items.append(it)
            if g.kinds[i] == _BATCHNORM:
                items.append((self._key(name + ".num_batches_tracked"), i, "count"))
        return items

    def state_dict(self):
        """OrderedDict of numpy copies: parameters, BN running stats and num_batches_tracked
        (int64), with PyTorch's key names."""
        sd = OrderedDict()
        for key, v, kind in self._state_items():
            sd[key] = np.array(self.net.bn_batches(v), dtype=np.int64) if kind == "count" else v.copy()
        return sd

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the model. Values may be numpy arrays or CPU torch tensors.

        With ``strict`` (default), missing and unexpected keys raise KeyError; shapes must match
        exactly (ValueError names the key). Values must be finite real numbers. BatchNorm's
        ``num_batches_tracked`` may be missing even when strict, as in PyTorch (older
        checkpoints and many published teachers lack it): those counts keep their values.
        """
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        items = self._state_items()
        keys = {k for k, _, _ in items}
        given = set(state_dict.keys())
        missing = sorted(k for k, _, kind in items if kind != "count" and k not in given)
        unexpected = sorted(str(k) for k in given - keys)
        if strict and (missing or unexpected):
            msg = []
            if missing:
                msg.append(f"missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            if unexpected:
                msg.append(f"unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
            raise KeyError("load_state_dict: " + "; ".join(msg))
        staged = []
        for key, dst, kind in items:
            if key not in state_dict:
                continue
            v = _to_numpy(state_dict[key], key)
            if kind == "count":
                c = v.reshape(()) if v.size == 1 else None
                if c is None or c.dtype.kind == "b" or not np.isfinite(c) or c < 0 or c != np.floor(c):
                    raise ValueError(f"state_dict[{key!r}] must be a count (an integer >= 0), got {v!r}")
                staged.append((dst, int(c), kind))
                continue
            if v.shape != dst.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {v.shape}, the model expects {dst.shape}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"state_dict[{key!r}] contains NaN or Inf")
            staged.append((dst, v, kind))
        # Validate everything before writing anything: a failed load leaves the model as it was.
        for dst, v, kind in staged:
            if kind == "count":
                self.net.bn_batches(dst, v)
            else:
                dst[...] = v
        return self

    # ---- PyTorch and ONNX (kdcore.bridge) ---------------------------------------------------
    def to_torch(self):
        """A ``torch.nn.Module`` computing this model's function, with copies of its parameters
        and BatchNorm buffers under the same keys: see :func:`kdcore.bridge.to_torch`. Needs
        torch installed."""
        return _bridge("to_torch").to_torch(self)

    def to_onnx(self, path, opset=17, input_shape=None):
        """Write this model as an ONNX file (opset 17 by default, dynamic batch dimension, eval
        mode; written atomically and checked): see :func:`kdcore.bridge.to_onnx`. Needs torch
        and onnx installed."""
        return _bridge("to_onnx").to_onnx(self, path, opset=opset, input_shape=input_shape)

    # ---- display ----------------------------------------------------------------------
    def summary(self, input_shape=None):
        """Rows (name, type, output shape per sample, parameter count).

        input_shape: one sample's shape, (C, H, W) or (features,); by default the last
        forward's, else the model's ``input_shape`` (zoo models); without any, the output
        shapes are None."""
        net = self.net
        shapes = None
        n, last = 1, getattr(self, "_x_shape", None)
        if input_shape is None and last is not None:
            # The last forward's batch size too: planning for the same shape is a no-op, so the
            # taps of that forward stay readable.
            n, input_shape = last[0], last[1:]
        elif input_shape is None:
            input_shape = getattr(self, "input_shape", None)
        if input_shape is not None:
            c, h, w = (tuple(input_shape) + (1, 1))[:3] if len(input_shape) < 3 else tuple(input_shape)
            shapes = net.shapes(n, c, h, w)
        counts = {}
        for name, shape, is_buf, off in self._tensors:
            if not is_buf:
                node = name.rsplit(".", 1)[0]
                counts[node] = counts.get(node, 0) + int(np.prod(shape))
        rows = []
        for i, name in enumerate(self._graph.names):
            kind = _KIND_NAMES[self._graph.kinds[i]]
            shp = shapes[i] if shapes else None
            if shp is not None and shp[1] == 1 and shp[2] == 1:
                shp = (shp[0],)
            rows.append((self._key(name) if name != _ROOT else "", kind, shp, counts.get(name, 0)))
        return rows

    def __repr__(self):
        head = f"{type(self).__name__}({self._describe()})"
        try:
            rows = self.summary()
        except Exception:  # noqa: BLE001 - repr must never raise
            return head
        lines = [head]
        w = max([len(r[0]) for r in rows] + [4])
        for name, kind, shp, n in rows:
            s = "" if shp is None else "x".join(map(str, shp))
            lines.append(f"  {name:<{w}}  {kind:<14} {s:>14}  {n:>10,}" if n else f"  {name:<{w}}  {kind:<14} {s:>14}")
        lines.append(f"  total parameters: {sum(r[3] for r in rows):,}")
        return "\n".join(lines)

    def _repr_html_(self):
        try:
            rows = self.summary()
        except Exception:  # noqa: BLE001
            return "<pre>" + html.escape(repr(self)) + "</pre>"
        body = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{k}</td><td>{'' if s is None else '&times;'.join(map(str, s))}</td>"
            f"<td style='text-align:right'>{p:,}</td></tr>" for n, k, s, p in rows)
        total = sum(r[3] for r in rows)
        return (f"<b>{html.escape(type(self).__name__)}</b> ({html.escape(self._describe())}), {total:,} parameters"
                f"<table><tr><th>name</th><th>layer</th><th>output</th><th>params</th></tr>{body}</table>")

    def _describe(self):
        return ""


_KIND_NAMES = {_LINEAR: "Linear", _CONV2D: "Conv2d", _BATCHNORM: "BatchNorm", _RELU: "ReLU",
               _MAXPOOL: "MaxPool2d", _AVGPOOL: "AvgPool2d", _GAP: "AdaptiveAvgPool2d",
               _DROPOUT: "Dropout", _FLATTEN: "Flatten", _ADD: "Add"}


def _bridge(what):
    try:
        from . import bridge
    except ImportError as e:
        raise ImportError(f"{what} needs PyTorch (pip install torch)") from e
    return bridge


def _to_numpy(v, key):
    if hasattr(v, "detach") and hasattr(v, "cpu"):      # a torch tensor: no torch import needed
        v = v.detach().cpu().numpy()
    v = np.asarray(v)
    if v.dtype.kind not in "fiub":
        raise TypeError(f"state_dict[{key!r}] must be a real numeric array, got dtype {v.dtype}")
    return v


# ---------------------------------------------------------------------------------------
# Layers


class Linear(Module):
    """Fully connected layer, y = x W^T + b, as ``torch.nn.Linear`` (keys ``weight`` of shape
    (out_features, in_features), ``bias``). init: "default" (PyTorch's) or a Kaiming normal."""

    def __init__(self, in_features, out_features, bias=True, init="default"):
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 1)
        self.out_features = _check_int("out_features", out_features, 1)
        self.bias = _check_bool("bias", bias)
        if not isinstance(init, str) or init not in _INITS:
            raise ValueError(f"init must be one of {sorted(_INITS)}, got {init!r}")
        self.init = init

    def _emit(self, g, x, prefix):
        return g.add(_LINEAR, prefix, [x], in_ch=self.in_features, out_ch=self.out_features, bias=self.bias,
                     init=self.init)

    def _describe(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias}"


class Conv2d(Module):
    """2-D convolution over (N, C, H, W), as ``torch.nn.Conv2d`` with square kernels, stride
    and padding, and groups (keys ``weight`` (out, in/groups, k, k), ``bias``)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias=True,
                 init="default"):
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.out_channels = _check_int("out_channels", out_channels, 1)
        self.kernel_size = _square("kernel_size", kernel_size)
        self.stride = _square("stride", stride)
        self.padding = _square("padding", padding)
        self.groups = _check_int("groups", groups, 1)
        if self.kernel_size < 1 or self.stride < 1 or self.padding < 0:
            raise ValueError("kernel_size and stride must be >= 1 and padding >= 0")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups ({self.groups}) must divide in_channels ({self.in_channels}) "
                             f"and out_channels ({self.out_channels})")
        self.bias = _check_bool("bias", bias)
        if not isinstance(init, str) or init not in _INITS:
            raise ValueError(f"init must be one of {sorted(_INITS)}, got {init!r}")
        self.init = init

    def _emit(self, g, x, prefix):
        return g.add(_CONV2D, prefix, [x], in_ch=self.in_channels, out_ch=self.out_channels, kernel=self.kernel_size,
                     stride=self.stride, padding=self.padding, groups=self.groups, bias=self.bias, init=self.init)

    def _describe(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias}")


class _BatchNorm(Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = _check_int("num_features", num_features, 1)
        self.eps = _check_float("eps", eps, 0, lo_open=True)
        self.momentum = _check_float("momentum", momentum, 0, 1)
        self.affine = _check_bool("affine", affine)

    def _emit(self, g, x, prefix):
        return g.add(_BATCHNORM, prefix, [x], in_ch=self.num_features, eps=self.eps, momentum=self.momentum,
                     affine=self.affine)

    def _describe(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}" + ("" if self.affine else ", affine=False")


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) features. ``affine=False`` (as PyTorch's): no learnable weight and
    bias, the layer only normalises; its state holds the running statistics and
    num_batches_tracked only."""


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W) maps, statistics per channel. ``affine=False`` (as
    PyTorch's): no learnable weight and bias, the layer only normalises; its state holds the
    running statistics and num_batches_tracked only."""


class ReLU(Module):
    """max(x, 0), elementwise."""

    def _emit(self, g, x, prefix):
        return g.add(_RELU, prefix, [x])


class _Pool(Module):
    _kind = None

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _square("kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else _square("stride", stride)
        self.padding = _square("padding", padding)
        if self.kernel_size < 1 or self.stride < 1 or self.padding < 0:
            raise ValueError("kernel_size and stride must be >= 1 and padding >= 0")
        if 2 * self.padding > self.kernel_size:
            raise ValueError(f"padding ({self.padding}) must be at most half of kernel_size ({self.kernel_size})")

    def _emit(self, g, x, prefix):
        return g.add(self._kind, prefix, [x], kernel=self.kernel_size, stride=self.stride, padding=self.padding)

    def _describe(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool):
    """Max pooling over square windows (stride defaults to kernel_size), as ``torch.nn.MaxPool2d``."""
    _kind = _MAXPOOL


class AvgPool2d(_Pool):
    """Average pooling; padded zeros count in the divisor (PyTorch's count_include_pad=True)."""
    _kind = _AVGPOOL


class AdaptiveAvgPool2d(Module):
    """Global average pooling: only output_size=1 (or (1, 1)) is supported."""

    def __init__(self, output_size=1):
        super().__init__()
        if not isinstance(output_size, (int, tuple, list)) or isinstance(output_size, bool) or \
                output_size not in (1, (1, 1), [1, 1]):
            raise ValueError(f"AdaptiveAvgPool2d supports only output_size=1, got {output_size!r}")

    def _emit(self, g, x, prefix):
        return g.add(_GAP, prefix, [x])


class Sigmoid(Module):
    """1 / (1 + exp(-x)), elementwise."""

    def _emit(self, g, x, prefix):
        return g.add(_SIGMOID, prefix, [x])


class LeakyReLU(Module):
    """x if x > 0 else negative_slope * x (PyTorch's nn.LeakyReLU)."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = _check_float("negative_slope", negative_slope)

    def _emit(self, g, x, prefix):
        return g.add(_LEAKY_RELU, prefix, [x], slope=self.negative_slope)

    def _describe(self):
        return f"negative_slope={self.negative_slope}"


class Unflatten(Module):
    """Flat features (N, C*H*W) -> maps (N, C, H, W), PyTorch's ``nn.Unflatten(1, (C, H, W))``
    (dim 1 only): a generator's linear layer to its first feature map."""

    def __init__(self, dim, unflattened_size):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim != 1:
            raise ValueError(f"Unflatten supports dim=1 only, got {dim!r}")
        if not isinstance(unflattened_size, (tuple, list)) or len(unflattened_size) != 3:
            raise TypeError(f"unflattened_size must be (C, H, W), got {unflattened_size!r}")
        self.dim = 1
        self.unflattened_size = tuple(_check_int("unflattened_size", v, 1) for v in unflattened_size)

    def _emit(self, g, x, prefix):
        c, h, w = self.unflattened_size
        return g.add(_RESHAPE, prefix, [x], out_ch=c, size=(h, w))

    def _describe(self):
        return f"dim=1, unflattened_size={self.unflattened_size}"


class Tanh(Module):
    """tanh(x), elementwise (PyTorch's nn.Tanh): generator outputs in [-1, 1]."""

    def _emit(self, g, x, prefix):
        return g.add(_TANH, prefix, [x])


class Upsample(Module):
    """Resize, PyTorch's ``nn.Upsample``: to ``size`` (an int or (h, w)), or by an integer
    ``scale_factor``; mode 'nearest' or 'bilinear' (align_corners=False, PyTorch's default)."""

    def __init__(self, size=None, scale_factor=None, mode="nearest", align_corners=None):
        super().__init__()
        if not _is_choice(mode, ("nearest", "bilinear")):
            raise ValueError(f"Upsample supports mode='nearest' and 'bilinear', got {mode!r}")
        if align_corners not in (None, False):
            raise ValueError("Upsample supports align_corners=False (PyTorch's default) only")
        self.mode = mode
        if (size is None) == (scale_factor is None):
            raise ValueError("give exactly one of size and scale_factor")
        if size is not None:
            if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
                size = (size, size)
            elif not isinstance(size, (tuple, list)) or len(size) != 2:
                raise TypeError(f"size must be an int or (h, w), got {size!r}")
            self.size = tuple(_check_int("size", v, 1) for v in size)
            self.scale_factor = None
        else:
            self.size, self.scale_factor = None, _check_int("scale_factor", scale_factor, 1)

    def _emit(self, g, x, prefix):
        kind = _UPSAMPLE if self.mode == "nearest" else _BILINEAR
        if self.size:
            return g.add(kind, prefix, [x], size=self.size)
        return g.add(kind, prefix, [x], stride=self.scale_factor)

    def _describe(self):
        what = f"size={self.size}" if self.size else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}"


class Dropout(Module):
    """Zeroes each element with probability ``p`` in training mode and scales the rest by
    1/(1-p) (inverted dropout, as PyTorch); the identity in eval mode."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = _check_float("p", p, 0, 1, hi_open=True)

    def _emit(self, g, x, prefix):
        return g.add(_DROPOUT, prefix, [x], p=self.p)

    def _describe(self):
        return f"p={self.p}"


class Jitter(Module):
    """Random augmentation of a whole batch in training mode, the identity in eval mode: a
    circular shift of the maps by (dy, dx), each drawn uniformly from [-max_shift, max_shift]
    (``torch.roll`` over H and W), then a horizontal flip with probability ``flip_p``; one
    draw per forward (DeepInversion's jitter of the images it optimises). The gradient goes
    back through the same shift and flip."""

    def __init__(self, max_shift, flip_p=0.0):
        super().__init__()
        self.max_shift = _check_int("max_shift", max_shift, 0)
        self.flip_p = _check_float("flip_p", flip_p, 0, 1)

    def _emit(self, g, x, prefix):
        return g.add(_JITTER, prefix, [x], padding=self.max_shift, p=self.flip_p)

    def _describe(self):
        return f"max_shift={self.max_shift}, flip_p={self.flip_p}"


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W), as ``torch.nn.Flatten``."""

    def _emit(self, g, x, prefix):
        return g.add(_FLATTEN, prefix, [x])


class Identity(Module):
    """Returns its input (no node of its own: its tap is the input's)."""

    def _emit(self, g, x, prefix):
        return x


class Sequential(Module):
    """Children applied in order, named "0", "1", ... as in PyTorch."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (list, tuple)):
            modules = tuple(modules[0])
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential item {i} must be a kdcore.nn.Module, got {type(m).__name__}")
        if not modules:
            raise ValueError("Sequential needs at least one module")
        self.layers = list(modules)

    def _children(self):
        return [(str(i), m) for i, m in enumerate(self.layers)]

    def _emit(self, g, x, prefix):
        for name, m in self._children():
            x = m._emit(g, x, _join(prefix, name))
            g.alias(_join(prefix, name), x)
        return x

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def _describe(self):
        return f"{len(self.layers)} modules"


class Residual(Module):
    """out = relu?(body(x) + shortcut(x)); shortcut is identity when None.

    Names: body and shortcut children are emitted under the names given (``names``), the sum
    is the node ``add`` and the activation ``relu``.
    """

    def __init__(self, body, shortcut=None, activation=True):
        super().__init__()
        if not isinstance(body, Module):
            raise TypeError("body must be a kdcore.nn.Module")
        if shortcut is not None and not isinstance(shortcut, Module):
            raise TypeError("shortcut must be a kdcore.nn.Module or None")
        self.body, self.shortcut, self.activation = body, shortcut, _check_bool("activation", activation)

    def _emit(self, g, x, prefix):
        y = self.body._emit(g, x, _join(prefix, "body"))
        s = self.shortcut._emit(g, x, _join(prefix, "shortcut")) if self.shortcut is not None else x
        out = g.add(_ADD, _join(prefix, "add"), [y, s])
        if self.activation:
            out = g.add(_RELU, _join(prefix, "relu"), [out])
        return out


class MultiExit(Module):
    """A backbone with early-exit heads on some of its taps (deep supervision, multi-exit KD).

    ``exits`` maps tap names of the backbone to head modules (each producing (N, classes)).
    The backbone keeps its names (so its state dict loads with ``strict=False``), heads are
    named ``exits.<tap>``; the network output stays the backbone's. ``model(x)`` returns the
    final output; ``model.exit_outputs()`` the heads' outputs of the last forward, shallow
    to deep.
    """

    def __init__(self, backbone, exits):
        super().__init__()
        if not isinstance(backbone, Module):
            raise TypeError(f"backbone must be a kdcore.nn.Module, got {type(backbone).__name__}")
        if not isinstance(exits, dict) or not exits:
            raise TypeError("exits must be a non-empty dict {tap name: head module}")
        for k, v in exits.items():
            if not isinstance(k, str) or not isinstance(v, Module):
                raise TypeError("exits must map tap names (str) to kdcore.nn.Module heads")
        self.backbone = backbone
        self.exits = OrderedDict(exits)
        self.input_shape = getattr(backbone, "input_shape", None)
        self._seed = backbone._seed

    def _emit(self, g, x, prefix):
        out = self.backbone._emit(g, x, prefix)
        self.exit_nodes = []
        for tap, head in self.exits.items():
            if tap in g.aliases:
                node = g.aliases[tap]
            elif tap in g.names:
                node = g.names.index(tap)
            else:
                raise KeyError(f"exit tap {tap!r} is not a tap of the backbone")
            self.exit_nodes.append(head._emit(g, node, _join(prefix, "exits." + tap)))
        g.output = out
        self.output_node = out
        return out

    def exit_names(self):
        """The exits' names, shallow to deep: the exit taps, then "output"."""
        return list(self.exits) + ["output"]

    def exit_outputs(self):
        """Outputs of every exit from the last forward, shallow to deep, the output last."""
        self._build()
        return [self.net.tap(i) for i in self.exit_nodes] + [self.net.tap(self.output_node)]


class Block(Module):
    """Base for user/zoo blocks: children with attribute names emitted in a custom order."""

    def _emit_child(self, g, name, x, prefix):
        m = getattr(self, name)
        y = m._emit(g, x, _join(prefix, name))
        g.alias(_join(prefix, name), y)
        return y
