"""kdcore.datafree.image_grid and plot_samples: the tiling computed by hand, the per-image scaling,
bad input named, and a figure with one title per image."""
import numpy as np
import pytest

import kdcore
from kdcore.datafree import image_grid, plot_samples


def test_grid_places_each_image_by_hand():
    x = np.arange(5 * 1 * 2 * 3, dtype=np.float32).reshape(5, 1, 2, 3)
    g = image_grid(x, ncols=2, pad=1, normalize=False)
    assert g.shape == (3 * 3 - 1, 2 * 4 - 1)
    for i in range(5):
        r, q = divmod(i, 2)
        np.testing.assert_array_equal(g[r * 3:r * 3 + 2, q * 4:q * 4 + 3], x[i, 0])
    # gaps and the empty last cell are zero
    assert np.all(g[2, :] == 0) and np.all(g[:, 3] == 0) and np.all(g[6:8, 4:7] == 0)


def test_grid_normalises_each_image_to_its_own_range():
    x = np.stack([np.full((1, 2, 2), 7.0), np.array([[[-1.0, 1.0], [3.0, 0.0]]])]).astype(np.float32)
    g = image_grid(x, ncols=2, pad=0)
    np.testing.assert_array_equal(g[:, :2], 0.0)                        # a constant image is 0
    np.testing.assert_allclose(g[:, 2:], [[0.0, 0.5], [1.0, 0.25]])


def test_rgb_and_three_dimensional_input():
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)
    g = image_grid(x, ncols=3, pad=0, normalize=False)
    assert g.shape == (4, 12, 3)
    np.testing.assert_array_equal(g[:, 4:8, 1], x[1, 1])
    assert image_grid(x[:, 0], ncols=1, pad=0).shape == (12, 4)


@pytest.mark.parametrize("bad, msg", [(np.zeros((2, 2, 4, 4), np.float32), "C = 1 or 3"),
                                      (np.zeros((4, 4), np.float32), "N, C, H, W"),
                                      (np.zeros((1, 1, 2, 2), np.int64), "floating point"),
                                      (np.full((1, 1, 2, 2), np.nan, np.float32), "NaN")])
def test_bad_images_are_named(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        image_grid(bad)


def test_bad_ncols_and_labels():
    x = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="ncols"):
        image_grid(x, ncols=0)
    with pytest.raises(ValueError, match="labels must be 3 integers"):
        plot_samples(x, labels=[1, 2])


def test_plot_samples_titles_each_image_with_its_label():
    g = kdcore.models.dafl_generator(16, img_size=8, channels=1, seed=0)
    x = kdcore.datafree.samples(g, 5, seed=1)
    fig = plot_samples(x, labels=np.array([3, 1, 4, 1, 5]), ncols=4, class_names=[f"c{i}" for i in range(6)])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["c3", "c1", "c4", "c1", "c5"]
    img = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(img), image_grid(x, ncols=4, pad=1))
