"""Module.to_onnx: every zoo model and user-built Sequential / Residual nets, run in
onnxruntime against kdcore's inference forward (``model(x, grad=False)``) at two batch sizes
(the batch dimension is dynamic); opset, file checks and the atomic write."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kdcore
from kdcore import nn as knn
from torch_ref import assert_close

OPSET = 17


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def randomize_bn(km, seed=0):
    rng = np.random.default_rng(seed)
    sd = km.state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    return km.load_state_dict(sd)


def check_export(km, path, shape=None):
    """Export, then compare onnxruntime with kdcore's eval inference at batch 2 and 3."""
    km.train()
    assert km.to_onnx(path, input_shape=shape) == str(path)
    assert km.training                                   # exported in eval mode, model untouched
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = session(str(path))
    shape = shape or km.input_shape
    km.eval()
    for n in (2, 3):
        x = np.random.default_rng(n).standard_normal((n,) + tuple(shape)).astype(np.float32)
        want = km(x, grad=False)
        got = sess.run(None, {"input": x})[0]
        assert got.shape[0] == n
        assert_close(f"onnxruntime (N={n})", got.reshape(want.shape), want, rtol=1e-4,
                     scale=float(np.abs(want).max()))


@pytest.mark.parametrize("name", kdcore.models.names())
def test_zoo_to_onnx(name, tmp_path):
    kw = dict(sizes=[784, 64, 10]) if name == "mlp" else dict(in_channels=1, input_size=28)
    km = randomize_bn(kdcore.models.get(name, **kw), 1)
    check_export(km, tmp_path / f"{name}.onnx")


def test_user_sequential_and_residual_to_onnx(tmp_path):
    km = knn.Sequential(
        knn.Conv2d(2, 4, 3, padding=1), knn.BatchNorm2d(4), knn.ReLU(),
        knn.Residual(knn.Sequential(knn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), knn.BatchNorm2d(4))),
        knn.Residual(knn.Conv2d(4, 6, 3, stride=2, padding=1), knn.Conv2d(4, 6, 1, stride=2), activation=False),
        knn.MaxPool2d(3, stride=2, padding=1), knn.Upsample(scale_factor=2), knn.AvgPool2d(2, padding=1),
        knn.Sigmoid(), knn.Upsample(size=(7, 5)), knn.Dropout(0.3), knn.AdaptiveAvgPool2d(1), knn.Flatten(),
        knn.Linear(6, 8), knn.BatchNorm1d(8), knn.ReLU(), knn.Identity(), knn.Linear(8, 3))
    check_export(randomize_bn(km, 2), tmp_path / "net.onnx", shape=(2, 9, 9))
    # a map output (N, C, H, W)
    check_export(knn.Sequential(knn.Conv2d(1, 3, 3), knn.Upsample(scale_factor=2)), tmp_path / "map.onnx",
                 shape=(1, 5, 5))
    # a generator-like head: bilinear upsampling, LeakyReLU, Tanh
    gen = knn.Sequential(knn.Conv2d(2, 4, 3, padding=1), knn.BatchNorm2d(4), knn.LeakyReLU(0.2),
                         knn.Upsample(scale_factor=2, mode="bilinear"), knn.Conv2d(4, 1, 3, padding=1),
                         knn.Upsample(size=(9, 7), mode="bilinear"), knn.Tanh())
    check_export(randomize_bn(gen, 3), tmp_path / "gen.onnx", shape=(2, 4, 4))


def test_to_onnx_is_atomic(tmp_path, monkeypatch):
    km = kdcore.models.cnn(width=2, input_size=8)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def broken(*a, **k):
        raise onnx.checker.ValidationError("invalid")
    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(onnx.checker.ValidationError):
        km.to_onnx(path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]   # no temporary left
    monkeypatch.undo()
    km.to_onnx(path)
    onnx.checker.check_model(str(path), full_check=True)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_to_onnx_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="input_shape"):
        knn.Linear(3, 2).to_onnx(tmp_path / "a.onnx")            # a bare layer has no input_shape
    with pytest.raises(ValueError, match="input_shape"):
        knn.Linear(3, 2).to_onnx(tmp_path / "a.onnx", input_shape=(1, 2, 3, 4))
    with pytest.raises(TypeError, match="opset"):
        knn.Linear(3, 2).to_onnx(tmp_path / "a.onnx", opset="17", input_shape=(3,))
    knn.Linear(3, 2).to_onnx(tmp_path / "a.onnx", opset=13, input_shape=(3,))
    assert onnx.load(str(tmp_path / "a.onnx")).opset_import[0].version == 13
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"to_onnx needs the onnx package \(pip install onnx\)"):
        knn.Linear(3, 2).to_onnx(tmp_path / "b.onnx", input_shape=(3,))
    assert sorted(os.listdir(tmp_path)) == ["a.onnx"]
