"""The layers generators need (data-free distillation): bilinear resize, LeakyReLU, Tanh --
kdcore vs torch autograd (float64 on the same inputs) and finite differences."""
import numpy as np
import pytest
import torch.nn as tnn

from kdcore import nn as knn
from checks import check_close
from test_layers_torch import compare, fd_check, run_both


@pytest.mark.parametrize("shape,size", [((2, 3, 4, 4), (8, 8)), ((1, 2, 7, 7), (14, 14)), ((2, 2, 4, 4), (7, 7)),
                                        ((3, 3, 7, 5), (4, 3)), ((2, 1, 5, 6), (5, 6)), ((1, 4, 1, 1), (3, 2)),
                                        ((1, 2, 3, 3), (10, 2))], ids=str)
def test_bilinear_size(shape, size, rng):
    k, t = knn.Upsample(size=size, mode="bilinear"), tnn.Upsample(size=size, mode="bilinear", align_corners=False)
    x = rng.standard_normal(shape).astype(np.float32)
    compare(*run_both(k, t, x, rng=rng), what=("out", "dx"))
    fd_check(k, x, rng, params=False)


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_bilinear_scale_factor(scale, rng):
    k = knn.Upsample(scale_factor=scale, mode="bilinear")
    t = tnn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
    compare(*run_both(k, t, rng.standard_normal((2, 3, 5, 4)).astype(np.float32), rng=rng), what=("out", "dx"))


def test_upsample_mode_arguments():
    with pytest.raises(ValueError, match="'nearest' and 'bilinear'"):
        knn.Upsample(size=4, mode="bicubic")
    with pytest.raises(ValueError, match="align_corners=False"):
        knn.Upsample(size=4, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0, -0.5])
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5, 4)], ids=str)
def test_leaky_relu(slope, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    x[np.abs(x) < 0.05] = 0.3   # away from the kink for the finite differences
    compare(*run_both(knn.LeakyReLU(slope), tnn.LeakyReLU(slope), x, rng=rng), what=("out", "dx"))
    fd_check(knn.LeakyReLU(slope), x, rng, params=False)


def test_leaky_relu_gradient_at_zero_is_the_slope(rng):
    x = np.zeros((2, 3), np.float32)
    k = knn.LeakyReLU(0.2)
    k(x)
    np.testing.assert_array_equal(k.backward(np.ones((2, 3), np.float32)), np.full((2, 3), 0.2, np.float32))


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5, 4), (1, 1, 1, 1)], ids=str)
def test_tanh(shape, rng):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    k, t = run_both(knn.Tanh(), tnn.Tanh(), x, rng=rng)
    compare(k, t, what=("out",))
    # The backward reads the float32 output (as PyTorch's): near saturation 1 - out^2 carries
    # the output's rounding, |d out| <= 6e-8, so up to ~1.2e-7 absolute in the gradient.
    check_close("input grad", k["dx"], t["dx"], rtol=1e-5, atol=2.4e-7 * np.abs(k["dout"]).max())
    fd_check(knn.Tanh(), x, rng, params=False)


def test_generator_block_in_a_lean_training_forward(rng):
    """Tanh's backward reads its output, LeakyReLU's its input: in a training forward (where
    ReLUs and adds may overwrite buffers) both stay correct inside a DAFL-style block."""
    g = knn.Sequential(knn.Conv2d(2, 4, 3, padding=1, bias=False), knn.BatchNorm2d(4), knn.LeakyReLU(0.2),
                       knn.Upsample(scale_factor=2, mode="bilinear"), knn.Conv2d(4, 1, 3, padding=1), knn.Tanh())
    t = tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1, bias=False), tnn.BatchNorm2d(4), tnn.LeakyReLU(0.2),
                       tnn.Upsample(scale_factor=2, mode="bilinear"), tnn.Conv2d(4, 1, 3, padding=1), tnn.Tanh())
    from test_layers_torch import sync
    sync(g, t)
    compare(*run_both(g, t, rng.standard_normal((3, 2, 4, 4)).astype(np.float32), rng=rng), rtol=1e-4)
