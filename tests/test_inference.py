"""Inference forwards (grad=False, predict, evaluate): same outputs as a plain eval forward
with chunking, taps of plain forwards unaffected, bounded memory at batch 1000."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kdcore
from kdcore import models


def _bn_stats(m, rng):
    # Non-trivial running statistics, so that eval-mode BN is not close to the identity.
    sd = m.state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = rng.standard_normal(v.shape).astype(np.float32) * 0.1
        elif k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    m.load_state_dict(sd)


@pytest.mark.parametrize("name", ["cnn", "resnet8", "wrn_16_1"])
def test_no_grad_matches_plain_eval(name, rng):
    m = models.get(name, seed=3)
    _bn_stats(m, rng)
    m.eval()
    x = rng.standard_normal((300, 1, 28, 28)).astype(np.float32)   # > 128 images: several chunks
    ref = m(x)
    out = m(x, grad=False)
    # Only the classifier (OpenBLAS sgemm, row count dependent summation) may round differently.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kdcore.predict(m, x, batch_size=300), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kdcore.predict(m, x, batch_size=64), ref, rtol=1e-5, atol=1e-6)
    # (bitwise equality of everything before the classifier: tests/c/test_net.c)


def test_chunk_setting_and_arenas(rng):
    m = models.resnet8(seed=4)
    _bn_stats(m, rng)
    m.eval()
    x = rng.standard_normal((1000, 1, 28, 28)).astype(np.float32)
    out = m(x, grad=False)
    assert 32 <= m.net.last_chunk() <= 128                 # automatic chunks, balanced over 1000
    mem = m.net.memory()
    assert mem["activations"] == 0 and mem["gradients"] == 0 and mem["cache"] == 0, mem
    assert 0 < mem["inference"] < 100 * 2 ** 20, mem
    for n in (1000, 37):
        m.net.set_chunk(n)
        np.testing.assert_allclose(m(x, grad=False), out, rtol=1e-5, atol=1e-6)
        assert m.net.last_chunk() == (1000 if n == 1000 else 1000 // 28 + 1)   # 28 chunks of <= 37: 36
    with pytest.raises(ValueError, match="images must be in 0"):
        m.net.set_chunk(-1)
    m.net.set_chunk(0)
    m(x[:8])                                              # a plain forward: activations, no gradients yet
    mem = m.net.memory()
    assert mem["activations"] > 0 and mem["gradients"] == 0
    m.backward(np.ones((8, 10), np.float32))
    assert m.net.memory()["gradients"] > 0


def test_taps_after_eval_and_no_grad_forwards(rng):
    m = models.resnet8(seed=1)
    _bn_stats(m, rng)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    m.eval()
    out = m(x)
    t1 = m.tap("layer2.0.relu")
    assert t1.shape == (4, 32, 14, 14)
    m(x, grad=False)
    with pytest.raises(RuntimeError, match="without gradients"):
        m.tap("layer2.0.relu")
    with pytest.raises(RuntimeError, match="without gradients"):
        m.backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match="without gradients"):
        m.add_tap_grad("layer2.0.relu", np.zeros_like(t1))
    kdcore.predict(m, x)
    with pytest.raises(RuntimeError, match="without gradients"):
        m.tap("layer2.0.relu")
    # A plain eval forward keeps every tap again, and backward works after it.
    np.testing.assert_array_equal(m(x), out)
    np.testing.assert_array_equal(m.tap("layer2.0.relu"), t1)
    m.zero_grad()
    assert m.backward(np.ones_like(out)).shape == x.shape
    # Training forwards keep taps too (feature distillation reads them).
    m.train()
    m(x)
    assert m.tap("layer2.0.relu").shape == (4, 32, 14, 14)


def test_no_grad_in_train_mode_is_one_chunk(rng):
    # BN batch statistics need the whole batch: grad=False in train mode runs it unchunked
    # and updates the running statistics exactly like a plain training forward.
    a, b = models.cnn(seed=2), models.cnn(seed=2)
    x = rng.standard_normal((200, 1, 28, 28)).astype(np.float32)
    a.train()
    b.train()
    np.testing.assert_array_equal(a(x, grad=False), b(x))
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import kdcore
    kdcore.set_num_threads(1)
    m = kdcore.models.resnet8x4(seed=0)
    m.eval()
    x = np.random.default_rng(0).standard_normal((1000, 1, 28, 28)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if sys.argv[1] == "predict":
        y = kdcore.predict(m, x, batch_size=1000)
    else:
        y = m(x, grad=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(after - before)
""")


@pytest.mark.parametrize("how", ["predict", "forward"])
def test_inference_memory_batch_1000(how):
    # resnet8x4 at batch 1000: every activation kept would be ~3.4 GB (what a plain forward
    # holds). Inference keeps one chunk of <= 128 images plus the logits.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, how], capture_output=True, text=True, env=env, check=True)
    grown_mb = float(r.stdout.strip().splitlines()[-1])
    assert grown_mb < 300, f"peak RSS grew by {grown_mb:.0f} MB during inference at batch 1000"


def test_nets_without_convolutions_run_large_chunks():
    """An MLP's working set is its weights, so inference keeps the batch in one chunk up to
    64 MB of activations (more rows make sgemm faster) and chunks beyond that."""
    m = kdcore.models.mlp([784, 2048, 10], seed=0).eval()
    x = np.random.default_rng(0).normal(0, 1, (5000, 784)).astype(np.float32)
    out = m(x[:1000], grad=False)
    assert m.net.last_chunk() == 1000
    big = m(x, grad=False)
    assert 128 <= m.net.last_chunk() < 5000                # ~(784 + 2048 + 10) floats/image: 2 chunks
    np.testing.assert_allclose(big[:1000], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(big, m(x), rtol=1e-5, atol=1e-6)   # == the plain, unchunked forward
