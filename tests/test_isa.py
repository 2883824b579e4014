"""Instruction set of kdcore's kernels: KDCORE_ISA (read at import), kdcore.set_isa/get_isa,
what show_config reports, and the relation between instruction sets that kdcore.h documents:

- convolutions, BatchNorm and max pooling (forward, backward, running statistics): bitwise
  equal on every instruction set;
- linear layers (and so whole models, whose other gradients flow through them): bitwise equal
  when the same engine runs them, else equal to float rounding -- kdcore's own product runs
  them iff the kernels are AVX-512 and OpenBLAS's core is not an AVX-512 one;
- deterministic mode (the own product always): everything bitwise equal, a short training run
  included.

Each instruction set runs in its own process with KDCORE_ISA set (as a user would); the
parent compares. OPENBLAS_CORETYPE=Haswell makes the AVX-512 run use the own product and
the others OpenBLAS, the case where linear layers differ."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kdcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPATH = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))
ISAS = kdcore.supported_isas()
AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")   # OpenBLAS's AVX-512 cores (0.3.x)

# Linear layers on different engines: |a - b| <= RTOL * max|a| per array. A K-term float
# product (K <= 784 here) has rounding errors of order sqrt(K) * 6e-8 relative to its
# magnitude; resnet8's gradients pass through the head and a few layers more.
RTOL = 1e-5


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=PYPATH, OMP_NUM_THREADS="1")
    for k, v in kw.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env),
                          cwd=ROOT, timeout=300)


# ---------------------------------------------------------------------------------------
# API


def test_set_get_and_show_config():
    before = kdcore.get_isa()
    try:
        assert ISAS[-1] == "portable" and before in ISAS
        for isa in ISAS:
            kdcore.set_isa(isa)
            assert kdcore.get_isa() == isa
            assert kdcore._kdcore.isa_config().startswith(f"{isa} (kd_set_isa; CPU supports {' '.join(ISAS)})")
            assert f"kernels: {isa} (kd_set_isa;" in kdcore._kdcore.blas_config()
        kdcore.set_isa("AVX2" if "avx2" in ISAS else "Portable")       # names are case-insensitive
        kdcore.set_isa("auto")
        assert kdcore.get_isa() == ISAS[0]
        import io
        buf = io.StringIO()
        kdcore.show_config(file=buf)
        assert f"\nkernels: {ISAS[0]} (kd_set_isa;" in buf.getvalue()
    finally:
        kdcore.set_isa(before)


@pytest.mark.parametrize("bad,exc,msg", [(2, TypeError, "isa must be a str"), (None, TypeError, "isa must be a str"),
                                         (b"avx2", TypeError, "isa must be a str"),
                                         ("avx3", ValueError, "isa must be one of 'auto', 'avx512', 'avx2', 'portable'"),
                                         ("", ValueError, "isa must be one of")])
def test_set_isa_errors(bad, exc, msg):
    before = kdcore.get_isa()
    with pytest.raises(exc, match=msg):
        kdcore.set_isa(bad)
    with pytest.raises(exc, match=msg):
        kdcore._kdcore.set_isa(bad)
    assert kdcore.get_isa() == before


def test_set_isa_unsupported():
    # An instruction set this CPU lacks (if any: C's test_isa_api simulates one either way).
    for isa in {"avx512", "avx2"} - set(ISAS):
        with pytest.raises(ValueError, match=f"does not support {isa}"):
            kdcore.set_isa(isa)


@pytest.mark.parametrize("value", ["", "auto"] + list(ISAS))
def test_env_choice(value):
    r = _python("import kdcore; print(kdcore.get_isa()); kdcore.show_config()", KDCORE_ISA=value)
    assert r.returncode == 0, r.stderr
    want = ISAS[0] if value in ("", "auto") else value
    lines = r.stdout.splitlines()
    assert lines[0] == want
    how = "automatic: KDCORE_ISA unset" if value == "" else f"KDCORE_ISA={value}"
    assert f"kernels: {want} ({how}; CPU supports {' '.join(ISAS)})" in lines


@pytest.mark.parametrize("value,msg", [("avx3", "KDCORE_ISA=avx3 is not one of auto, avx512, avx2, portable"),
                                       ("avx-512", "KDCORE_ISA=avx-512 is not one of")]
                         + [(isa, f"KDCORE_ISA={isa}: this CPU does not support {isa}")
                            for isa in sorted({"avx512", "avx2"} - set(ISAS))])
def test_env_refused_at_import(value, msg):
    r = _python("import kdcore", KDCORE_ISA=value)
    assert r.returncode != 0
    assert f"RuntimeError: kd_isa_init: {msg}" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------
# cross-ISA relation

CHILD = r"""
import json, sys
import numpy as np
import kdcore
from kdcore import nn as knn

out, rng = {}, np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def run(group, name, m, x, train=True):
    m.train(train)
    y = m(x)
    m.zero_grad()
    dx = m.backward(randn(*y.shape))
    out[f"{group}|{name}|out"] = y
    out[f"{group}|{name}|dx"] = dx
    for k, g in m.grads().items():
        out[f"{group}|{name}|grad {k}"] = np.array(g)
    for k, v in m.state_dict().items():
        if "running" in k:
            out[f"{group}|{name}|{k}"] = np.array(v)


def kernels():
    for name, (c, oc, k, s, p, g), shape in [
            ("conv shift", (8, 16, 3, 1, 1, 1), (3, 8, 12, 11)),
            ("conv col 7x7x128", (128, 128, 3, 1, 1, 1), (2, 128, 7, 7)),
            ("conv stride 2", (16, 32, 3, 2, 1, 1), (3, 16, 14, 14)),
            ("conv groups", (12, 20, 3, 2, 1, 2), (3, 12, 9, 9)),
            ("conv 1x1", (6, 10, 1, 1, 0, 1), (2, 6, 8, 9)),
            ("conv first layer", (1, 16, 3, 1, 1, 1), (2, 1, 28, 28))]:
        run("kernels", name, knn.Conv2d(c, oc, k, stride=s, padding=p, groups=g), randn(*shape))
    x = 2 * randn(5, 7, 14, 14) + 0.3
    run("kernels", "bn train", knn.BatchNorm2d(7), x)
    run("kernels", "bn eval", knn.BatchNorm2d(7), x, train=False)
    x = np.round(randn(3, 5, 28, 28) * 4) / 4                      # ties
    run("kernels", "maxpool 2x2", knn.MaxPool2d(2), x)
    net = knn.Sequential(knn.Conv2d(1, 8, 3, padding=1), knn.BatchNorm2d(8), knn.ReLU(), knn.MaxPool2d(2),
                         knn.Conv2d(8, 16, 3, padding=1), knn.BatchNorm2d(16), knn.ReLU(), knn.AdaptiveAvgPool2d(1))
    run("kernels", "conv net", net, randn(4, 1, 28, 28))


def linear(group):
    run(group, "linear", knn.Linear(300, 70), randn(37, 300))
    run(group, "mlp", kdcore.models.mlp([784, 256, 10]), randn(16, 784))
    run(group, "resnet8", kdcore.models.resnet8(num_classes=10, in_channels=1), randn(4, 1, 28, 28))


kernels()
linear("linear")
kdcore.set_deterministic(True)
linear("deterministic")
data = (rng.integers(0, 256, (64, 1, 28, 28)).astype(np.uint8), rng.integers(0, 10, 64).astype(np.int64))
model = kdcore.models.resnet8(num_classes=10, in_channels=1)
kdcore.fit(model, data, epochs=1, batch_size=16, max_steps=3, seed=0, progress=False)
for k, v in model.state_dict().items():
    out[f"deterministic|fit resnet8 3 steps|{k}"] = np.array(v)
np.savez(sys.argv[1], **out)
kdcore.set_deterministic(False)
cfg = kdcore._kdcore.blas_config()
print(json.dumps({"isa": kdcore.get_isa(), "core": cfg.split("core=")[1].split(";")[0],
                  "linear": cfg.split("linear layers: ")[1]}))
"""


def _run_isa(isa, coretype, tmp_path):
    path = str(tmp_path / f"{isa}-{coretype}.npz")
    r = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=_env(KDCORE_ISA=isa, OPENBLAS_CORETYPE=None if coretype == "auto" else coretype))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["isa"] == isa
    with np.load(path) as z:
        return info, {k: z[k] for k in z.files}


def _bitwise(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("coretype", ["auto", "Haswell"])
def test_cross_isa_relation(coretype, tmp_path):
    runs = {isa: _run_isa(isa, coretype, tmp_path) for isa in ISAS}
    for isa, (info, _) in runs.items():
        own = isa == "avx512" and info["core"].lower() not in AVX512_CORES
        engine = f"kdcore's own product ({isa} micro-kernel)" if own else "OpenBLAS sgemm"
        assert info["linear"] == engine, (isa, info)
    ref_isa = ISAS[0]
    ref_info, ref = runs[ref_isa]
    report = []
    for isa in ISAS[1:]:
        info, got = runs[isa]
        assert got.keys() == ref.keys()
        same_engine = info["linear"].split(" (")[0] == ref_info["linear"].split(" (")[0]
        for key in sorted(ref):
            group = key.split("|")[0]
            a, b = ref[key], got[key]
            if group in ("kernels", "deterministic") or same_engine:
                assert _bitwise(a, b), f"{key}: {ref_isa} vs {isa} not bitwise equal (engines {ref_info['linear']} / " \
                                       f"{info['linear']})"
            else:
                assert a.dtype == np.float32, key
                scale = float(np.abs(a).max())
                diff = float(np.abs(a.astype(np.float64) - b).max())
                assert a.shape == b.shape and diff <= RTOL * scale, \
                    f"{key}: {ref_isa} vs {isa}: max diff {diff:.3g} > {RTOL} x {scale:.3g}"
                report.append(diff / scale if scale else 0.0)
    if coretype == "Haswell" and "avx512" in ISAS and len(ISAS) > 1:
        # the case this parametrisation exists for: different engines, so rounding differences
        assert report and max(report) > 0, "expected the linear layers to differ between engines"
