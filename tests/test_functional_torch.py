"""kdcore.functional.cross_entropy vs torch.nn.functional.cross_entropy (float64 reference on
the same float32 logits): loss, gradient w.r.t. the logits, extreme logits, argument errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore.functional import cross_entropy
from checks import check_close  # noqa: E402


def torch_ce(logits, target, ls):
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = TF.cross_entropy(z, torch.tensor(target), label_smoothing=ls)
    loss.backward()
    return loss.item(), z.grad.numpy()


def check_ce(logits, target, ls, rtol=1e-5):
    loss, d = cross_entropy(logits, target, label_smoothing=ls)
    want_loss, want_d = torch_ce(logits, target, ls)
    assert isinstance(loss, float)
    assert np.isfinite(loss), f"loss is {loss}"
    assert d.dtype == np.float32 and d.shape == logits.shape
    # loss: relative, with an absolute floor of float32 rounding of the logit scale
    check_close("loss", loss, want_loss, rtol=rtol, atol=1e-6 * max(1.0, np.abs(logits).max()) * 1e-1)
    n = logits.shape[0]
    check_close("dlogits", d, want_d, rtol=rtol, atol=1e-6 / n)
    return loss, d


@pytest.mark.parametrize("classes", [1, 2, 10, 1000])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("ls", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_cross_entropy_matches_torch(classes, batch, ls, scale, rng):
    logits = (rng.standard_normal((batch, classes)) * scale).astype(np.float32)
    target = rng.integers(0, classes, batch).astype(np.int64)
    _, d = check_ce(logits, target, ls)
    # rows of the gradient of a softmax CE sum to 0
    check_close("row sums of dlogits", d.astype(np.float64).sum(1), np.zeros(batch), 0, 1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("mag", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_cross_entropy_extreme_logits(ls, mag, classes, rng):
    batch = 16
    logits = (rng.uniform(-1, 1, (batch, classes)) * mag).astype(np.float32)
    logits[0, :] = -mag                  # a row of equal, very negative logits
    logits[1, :] = mag                   # ... and very positive
    logits[2, 0], logits[2, 1:] = mag, -mag   # saturated softmax
    target = rng.integers(0, classes, batch).astype(np.int64)
    target[2] = 1                        # saturated and wrong: loss ~ 2*mag
    target[3] = int(np.argmax(logits[3]))   # confident and right: loss ~ 0 (ls = 0)
    check_ce(logits, target, ls, rtol=1e-5)


def test_cross_entropy_values_known():
    z = np.zeros((3, 4), np.float32)
    loss, d = cross_entropy(z, np.array([0, 1, 3]))
    assert abs(loss - np.log(4)) < 1e-6
    check_close("dlogits", d, (np.full((3, 4), 0.25) - np.eye(4)[[0, 1, 3]]) / 3, 1e-6, 1e-7)


def test_cross_entropy_int32_target(rng):
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    t = rng.integers(0, 7, 5)
    l1, d1 = cross_entropy(logits, t.astype(np.int32))
    l2, d2 = cross_entropy(logits, t.astype(np.int64))
    assert l1 == l2 and np.array_equal(d1, d2)


def test_cross_entropy_does_not_modify_logits(rng):
    logits = rng.standard_normal((4, 6)).astype(np.float32)
    keep = logits.copy()
    cross_entropy(logits, np.array([0, 1, 2, 3]), 0.1)
    assert np.array_equal(logits, keep)


def test_cross_entropy_noncontiguous_logits(rng):
    big = rng.standard_normal((6, 20)).astype(np.float32)
    logits = big[::2, ::3]
    target = np.array([0, 3, 6])
    check_ce(logits, target, 0.1)


@pytest.mark.parametrize("bad", [-1, 10, 11, 2**40])
def test_cross_entropy_target_out_of_range(bad):
    logits = np.zeros((3, 10), np.float32)
    target = np.array([1, bad, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="target"):
        cross_entropy(logits, target)


def test_cross_entropy_float64_logits():
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 1]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cross_entropy_nonfinite_logits(bad):
    logits = np.zeros((2, 3), np.float32)
    logits[1, 2] = bad
    with pytest.raises(ValueError):
        cross_entropy(logits, np.array([0, 1]))


def test_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="target"):
        cross_entropy(np.zeros((3, 4), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(np.zeros((3,), np.float32), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="target"):
        cross_entropy(np.zeros((2, 3), np.float32), np.array([0.0, 1.0]))


@pytest.mark.parametrize("ls", [-0.1, 1.5, float("nan")])
def test_cross_entropy_bad_label_smoothing(ls):
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), label_smoothing=ls)
