"""RandAugment (MLKD's strong view) on float images: every operation of kd_ra_apply against an
independent numpy implementation of the PIL operation it adapts (docs/methods/mlkd.md), and the
batch pipeline's use of it (draws, normalisation, determinism)."""
import numpy as np
import pytest

import kdcore
from kdcore import _kdcore

OPS = _kdcore.RA_OPS
RNG = np.random.default_rng(7)


def _image(c, h=24, w=28, rng=RNG):
    # (PIL's equalisation is the identity below 256 pixels: large enough to equalise)
    # 8-bit levels scaled by 1/255: the values a uint8 data set gives the augmentation
    return (rng.integers(0, 256, (c, h, w)).astype(np.float32) / np.float32(255))


def _luma(x):
    return np.float32(0.299) * x[0] + np.float32(0.587) * x[1] + np.float32(0.114) * x[2]


def _level(x):
    return np.clip(np.floor(x * np.float32(255) + np.float32(0.5)), 0, 255).astype(np.int64)


def _affine(x, t):
    """PIL's nearest affine transform: output (x, y) reads floor of the mapped pixel centre."""
    c, h, w = x.shape
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    xs = t[0] * xx + t[1] * yy + t[2]
    ys = t[3] * xx + t[4] * yy + t[5]
    xi, yi = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.zeros_like(x)
    out[:, inside] = x[:, yi[inside], xi[inside]]
    return out


def ref_op(x, name, m, cx=0.0, cy=0.0):
    x = x.astype(np.float32).copy()
    c, h, w = x.shape
    m32 = np.float32(m)
    if name == "identity":
        return x
    if name == "autocontrast":
        for k in range(c):
            lo, hi = x[k].min(), x[k].max()
            if hi > lo:
                x[k] = (x[k] - lo) / (hi - lo)
        return x
    if name == "brightness":
        return np.clip(m32 * x, 0, 1)
    if name == "color":
        if c != 3:
            return x
        g = _luma(x)
        return np.clip(g + m32 * (x - g), 0, 1)
    if name == "contrast":
        mu = np.float32(_luma(x).astype(np.float64).mean() if c == 3 else x.astype(np.float64).mean())
        return np.clip(mu + m32 * (x - mu), 0, 1)
    if name == "equalize":
        for k in range(c):
            q = _level(x[k])
            hist = np.bincount(q.ravel(), minlength=256)
            used = np.nonzero(hist)[0]
            if len(used) <= 1:
                continue
            step = (hist.sum() - hist[used[-1]]) // 255
            if step == 0:
                continue
            lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step, 255)
            x[k] = lut[q].astype(np.float32) / np.float32(255)
        return x
    if name == "posterize":
        bits = min(max(int(m), 1), 8)
        mask = ~((1 << (8 - bits)) - 1) & 0xFF
        return ((_level(x) & mask).astype(np.float32) / np.float32(255))
    if name == "solarize":
        return np.where(x * np.float32(255) >= m32, np.float32(1) - x, x)
    if name == "sharpness":
        k = np.ones((3, 3), np.float64)
        k[1, 1] = 5
        out = x.copy()
        for ch in range(c):
            sm = np.zeros((h - 2, w - 2), np.float64)
            for dy in range(3):
                for dx in range(3):
                    sm += k[dy, dx] * x[ch, dy:dy + h - 2, dx:dx + w - 2]
            sm = (sm / 13).astype(np.float32)
            out[ch, 1:-1, 1:-1] = np.clip(sm + m32 * (x[ch, 1:-1, 1:-1] - sm), 0, 1)
        return out
    if name == "rotate":
        r = -np.deg2rad(float(m32))
        a, b = np.cos(r), np.sin(r)
        ox, oy = w / 2.0, h / 2.0
        return _affine(x, (a, b, -a * ox - b * oy + ox, -b, a, b * ox - a * oy + oy))
    if name == "shear_x":
        return _affine(x, (1, float(m32), 0, 0, 1, 0))
    if name == "shear_y":
        return _affine(x, (1, 0, 0, float(m32), 1, 0))
    if name == "translate_x":
        return _affine(x, (1, 0, float(m32) * w, 0, 1, 0))
    if name == "translate_y":
        return _affine(x, (1, 0, 0, 0, 1, float(m32) * h))
    if name == "cutout":
        if m <= 0:
            return x
        s = float(m32) * w
        x0, y0 = int(max(0.0, cx - s / 2)), int(max(0.0, cy - s / 2))
        x1, y1 = min(int(min(w, x0 + s)), w - 1), min(int(min(h, y0 + s)), h - 1)
        fill = np.array([125, 123, 114], np.float32) / np.float32(255)
        for k in range(c):
            x[k, y0:y1 + 1, x0:x1 + 1] = fill[k % 3]
        return x
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("c", [1, 3])
def test_op_matches_numpy(name, c):
    lo, hi = _kdcore.ra_range(OPS[name])
    rng = np.random.default_rng(OPS[name] * 10 + c)
    for trial in range(6):
        x = _image(c, rng=rng)
        m = lo + (hi - lo) * rng.random()
        cx, cy = 28 - 27 * rng.random(), 24 - 23 * rng.random()
        got = _kdcore.ra_apply(x, OPS[name], m, cx, cy)
        want = ref_op(x, name, m, cx, cy)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f"{name} at {m}")


def test_ops_change_images():
    """Every operation but identity (and colour on grey images) changes a typical image at a
    magnitude inside its range, so the comparison above is not between two no-ops."""
    x3, x1 = _image(3), _image(1)
    mags = dict(autocontrast=0, brightness=0.5, color=0.5, contrast=0.5, equalize=0, identity=0, posterize=4,
                rotate=20, sharpness=0.3, shear_x=0.2, shear_y=-0.2, solarize=128, translate_x=0.2,
                translate_y=-0.2, cutout=0.4)
    x3[0, 0, 0], x3[0, -1, -1] = 0.2, 0.8   # autocontrast needs a channel not already spanning [0, 1]
    x3[0] = 0.2 + 0.6 * x3[0]
    for name, m in mags.items():
        for x in (x3, x1):
            y = _kdcore.ra_apply(x, OPS[name], m, 5.0, 4.0)
            same = np.array_equal(y, x)
            if name == "identity" or (name == "color" and x.shape[0] == 1) or (name == "autocontrast" and x is x1):
                continue
            assert not same, name


def test_degenerate_inputs():
    flat = np.full((3, 5, 5), 0.4, np.float32)
    np.testing.assert_array_equal(_kdcore.ra_apply(flat, OPS["autocontrast"], 0), flat)
    np.testing.assert_array_equal(_kdcore.ra_apply(flat, OPS["equalize"], 0), flat)
    x = _image(3)
    np.testing.assert_array_equal(_kdcore.ra_apply(x, OPS["cutout"], 0.0, 3, 3), x)
    np.testing.assert_array_equal(_kdcore.ra_apply(x, OPS["rotate"], 0.0), x)


def test_ranges_are_the_loaders():
    r = {n: _kdcore.ra_range(i) for n, i in OPS.items()}
    assert r["rotate"] == (-30, 30) and r["solarize"] == (0, 256) and r["posterize"] == (4, 8)
    assert r["cutout"] == (0, 0.5)
    assert r["brightness"] == pytest.approx((0.05, 0.95)) and r["shear_x"] == pytest.approx((-0.3, 0.3))
    assert len(OPS) == 15


def test_bad_arguments():
    x = _image(3)
    with pytest.raises(ValueError, match="op"):
        _kdcore.ra_apply(x, 15, 0.5)
    with pytest.raises(ValueError, match="image"):
        _kdcore.ra_apply(x[0], 1, 0.5)
    with pytest.raises(TypeError, match="image"):
        _kdcore.ra_apply(x.astype(np.float64), 1, 0.5)
    with pytest.raises(ValueError, match="magnitude"):
        _kdcore.ra_apply(x, 1, float("nan"))
    with pytest.raises(ValueError, match="op"):
        _kdcore.ra_range(-1)


def _sample_draws(seed, i, n, w, h):
    """The draws kd_data_batch makes for sample i: (op, magnitude) x n, then Cutout's (m, cx, cy).
    Mirrors kd_hash / kd_uniform / draw_int_ in numpy (uint64 arithmetic)."""
    M = (1 << 64) - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & M
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
        return x ^ (x >> 31)

    def khash(s, k):
        return mix(mix(s) ^ ((k * 0xD1B54A32D192ED03) & M))

    def unif(v):
        return np.float32(v >> 40) * np.float32(1.0 / 16777216.0)

    rs = khash(seed, 8 * i + 4)
    ops = []
    for j in range(n):
        op = ((khash(rs, 2 * j) >> 32) * 14) >> 32
        lo, hi = _kdcore.ra_range(op)
        m = np.float32(lo) + (np.float32(hi) - np.float32(lo)) * unif(khash(rs, 2 * j + 1))
        ops.append((int(op), float(m)))
    k = 2 * n
    m = np.float32(0.5) * unif(khash(rs, k))
    cx = np.float32(w) + (np.float32(1) - np.float32(w)) * unif(khash(rs, k + 1))
    cy = np.float32(h) + (np.float32(1) - np.float32(h)) * unif(khash(rs, k + 2))
    return ops, (float(m), float(cx), float(cy))


def test_batch_applies_drawn_ops_before_normalisation():
    """kd_data_batch with randaugment: the sample's drawn operations on the scaled pixels (crop off
    here), then Cutout, then normalisation; the same draws rebuilt in numpy give the same batch."""
    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, (6, 3, 8, 10)).astype(np.uint8)
    ds = kdcore.datasets.from_arrays(X, np.zeros(6, np.int64), num_classes=2,
                                     normalize=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    idx = np.array([4, 1, 5, 0], np.int64)
    seed = 12345
    got = ds.batch(idx, augment={"randaugment": 2}, seed=seed)
    mean = np.array([0.5, 0.4, 0.3], np.float32)[:, None, None]
    std = np.array([0.2, 0.25, 0.3], np.float32)[:, None, None]
    for i, j in enumerate(idx):
        img = X[j].astype(np.float32) * np.float32(1 / 255)
        ops, (m, cx, cy) = _sample_draws(seed, i, 2, 10, 8)
        for op, mag in ops:
            img = _kdcore.ra_apply(img, op, mag)
        img = _kdcore.ra_apply(img, OPS["cutout"], m, cx, cy)
        np.testing.assert_allclose(got[i], (img - mean) / std, rtol=0, atol=1e-5)
    # without randaugment the batch is the plain normalised one
    plain = ds.batch(idx, seed=seed)
    assert not np.allclose(plain, got)


def test_batch_is_seeded_and_thread_independent():
    rng = np.random.default_rng(4)
    X = rng.random((16, 3, 12, 12)).astype(np.float32)
    ds = kdcore.datasets.from_arrays(X, np.zeros(16, np.int64), num_classes=2)
    idx = np.arange(16)
    aug = {"crop_padding": 2, "hflip": True, "randaugment": 2}
    n0 = kdcore.get_num_threads()
    try:
        kdcore.set_num_threads(1)
        a = ds.batch(idx, augment=aug, seed=9)
        kdcore.set_num_threads(3)
        b = ds.batch(idx, augment=aug, seed=9)
    finally:
        kdcore.set_num_threads(n0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ds.batch(idx, augment=aug, seed=10))
    # the crop and flip draws are those of the plain augmentation: RandAugment has its own stream
    ops = [_sample_draws(9, i, 2, 12, 12) for i in range(16)]
    assert len({o[0][0][0] for o in ops}) > 3   # the drawn operations vary over samples



def test_augment_option_checks():
    ds = kdcore.datasets.from_arrays(np.zeros((4, 1, 6, 6), np.float32), np.zeros(4, np.int64), num_classes=2)
    for bad in (-1, 65, 1.5, True, "2"):
        with pytest.raises(ValueError, match="randaugment"):
            ds.batch([0], augment={"randaugment": bad})


def test_loss_view_option():
    L = kdcore.losses
    assert L.KD(view=1).view == 1 and "view=1" in repr(L.KD(view=1)) and "view" not in repr(L.KD())
    for bad in (2, -1, True, "1"):
        with pytest.raises(ValueError, match="view"):
            L.KD(view=bad)
    with pytest.raises(ValueError, match="view"):
        L.MLKD(view=1)


def test_two_view_distill_is_thread_independent():
    """method='mlkd' (both views, RandAugment) in deterministic mode: the same bits at 1 and 2
    threads (the augmentation's draws and the views' order depend on the seed only)."""
    rng = np.random.default_rng(5)
    X = rng.integers(0, 256, (48, 3, 8, 8)).astype(np.uint8)
    y = rng.integers(0, 3, 48)
    ds = kdcore.datasets.from_arrays(X, y, num_classes=3)
    threads, det = kdcore.get_num_threads(), kdcore.get_deterministic()
    out = []
    try:
        kdcore.set_deterministic(True)
        for n in (1, 2):
            kdcore.set_num_threads(n)
            teacher = kdcore.models.cnn(num_classes=3, input_size=8, width=6, seed=1, in_channels=3)
            student = kdcore.models.cnn(num_classes=3, input_size=8, width=4, seed=2, in_channels=3)
            h = kdcore.distill(student, teacher, ds, method="mlkd", epochs=1, batch_size=16, progress=False, seed=4,
                               augment=dict(crop_padding=1, hflip=True))
            out.append((student.state_dict(), h.last["mlkd_kd_T4"]))
    finally:
        kdcore.set_num_threads(threads)
        kdcore.set_deterministic(det)
    (a, ka), (b, kb) = out
    assert ka == kb and all(np.array_equal(a[k], b[k]) for k in a)


def test_extreme_magnitudes():
    """Any finite magnitude or centre is defined (clamped before integer conversion)."""
    x = _image(3)
    np.testing.assert_array_equal(_kdcore.ra_apply(x, OPS["cutout"], 0.4, 1e30, 1e30), x)
    np.testing.assert_array_equal(_kdcore.ra_apply(x, OPS["posterize"], 1e30), ref_op(x, "posterize", 8))
    np.testing.assert_array_equal(_kdcore.ra_apply(x, OPS["posterize"], -1e30), ref_op(x, "posterize", 1))
    assert not _kdcore.ra_apply(x, OPS["translate_x"], 1e30).any()
    assert not _kdcore.ra_apply(x, OPS["shear_y"], -1e30)[:, :, 1:].any()
