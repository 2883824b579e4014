"""kdcore.explain: the information-discarding fit (closed form on a linear map, its objective
and gradient vs PyTorch autograd on the same noise, determinism), the concept counts and
learning dynamics vs direct computations, the weight logging of fit/distill, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore
from kdcore import explain as E
from kdcore import nn as knn

torch.set_num_threads(1)
HALF_LOG_2PIE = 0.5 * np.log(2 * np.pi * np.e)


def linear_model(n_in=16, n_out=5, seed=1):
    m = knn.Sequential(knn.Flatten(), knn.Linear(n_in, n_out))
    m.reset_parameters(seed)
    return m.eval()


def test_linear_map_closed_form():
    """f(x) = Wx + b: E||W(sigma * eps)||^2 = sum_i sigma_i^2 ||W_:,i||^2, so J is minimised at
    sigma_i^2 = lam * delta2 / (2 n ||W_:,i||^2). The Monte-Carlo fit lands there."""
    m = linear_model()
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    W = m.parameters()["1.weight"].astype(np.float64)
    c = (W ** 2).sum(0)
    lam, d2, n = 1.0, 2.0, 16
    s_star = 0.5 * np.log(lam * d2 / (2 * n * c))
    d = E.information_discarding(m, x, steps=1000, samples=64, lr=0.02, lam=lam, delta2=d2, seed=3)
    err = d.log_sigma.reshape(3, 16) - s_star
    assert np.abs(err).mean() < 0.05 and np.abs(err).max() < 0.15, err
    np.testing.assert_allclose(d.H, d.log_sigma + HALF_LOG_2PIE, rtol=1e-6)
    j_star = (np.exp(2 * s_star) * c).sum() / d2 - lam * s_star.mean()
    assert abs(d.objective[-100:].mean() - j_star) < 0.05 * abs(j_star)
    assert d.objective[-100:].mean() < d.objective[:10].mean()


def small_cnn(seed=0):
    m = knn.Sequential(knn.Conv2d(1, 3, 3, padding=1), knn.BatchNorm2d(3), knn.ReLU(), knn.MaxPool2d(2),
                       knn.Conv2d(3, 4, 3), knn.ReLU())
    m.reset_parameters(seed)
    sd = m.state_dict()   # BN statistics away from their init, so eval mode matters
    sd["1.running_mean"] = np.array([0.1, -0.2, 0.3], np.float32)
    sd["1.running_var"] = np.array([0.5, 2.0, 1.5], np.float32)
    m.load_state_dict(sd)
    return m.eval()


def torch_small_cnn(m):
    t = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                            torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    t.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in m.state_dict().items()})
    return t.double().eval()


@pytest.mark.parametrize("tap", ["2", "5"])
def test_objective_and_gradient_match_torch(tap):
    m = small_cnn()
    r = np.random.default_rng(1)
    N, K = 3, 5
    x = r.standard_normal((N, 1, 8, 8)).astype(np.float32)
    s = (r.standard_normal(x.shape) * 0.3 - 1.0).astype(np.float32)
    eps = r.standard_normal((N, K) + x.shape[1:]).astype(np.float32)
    lam, d2 = 0.7, 3.0
    val, grad = _kdcore.sigma_objective(m.net, m._tap_index(tap), x, s, eps=eps, samples=K, lam=lam, delta2=d2)
    t = torch_small_cnn(m)
    upto = int(tap) + 1
    f = torch.nn.Sequential(*list(t)[:upto])
    xt = torch.tensor(x, dtype=torch.float64)
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    et = torch.tensor(eps, dtype=torch.float64)
    fstar = f(xt).detach()
    noisy = (xt[:, None] + torch.exp(st)[:, None] * et).reshape((N * K,) + x.shape[1:])
    dist = ((f(noisy).reshape(N, K, -1) - fstar.reshape(N, 1, -1)) ** 2).sum(2).mean(1) / d2
    J = dist - lam * st.reshape(N, -1).mean(1)
    J.sum().backward()
    np.testing.assert_allclose(val, J.detach().numpy(), rtol=1e-4)
    g = st.grad.numpy()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
    # ReLU kinks: the torch twin runs in float64 at float32 weights, a noisy input close to a
    # kink could flip; the tolerances above hold for these draws


def test_fit_is_deterministic_and_images_are_independent():
    m = small_cnn()
    x = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
    a = E.information_discarding(m, x, steps=20, samples=4, seed=7, delta2=1.0)
    b = E.information_discarding(m, x, steps=20, samples=4, seed=7, delta2=1.0)
    np.testing.assert_array_equal(a.log_sigma, b.log_sigma)
    np.testing.assert_array_equal(a.objective, b.objective)
    c = E.information_discarding(m, x, steps=20, samples=4, seed=8, delta2=1.0)
    assert not np.array_equal(a.log_sigma, c.log_sigma)
    # an image's noise is drawn by its index: the first image alone gets the same fit
    one = E.information_discarding(m, x[:1], steps=20, samples=4, seed=7, delta2=1.0)
    np.testing.assert_allclose(one.log_sigma, a.log_sigma[:1], rtol=1e-5, atol=1e-6)


def test_model_mode_and_gradients_after_the_fit():
    m = small_cnn()
    m.train()
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    before = m.state_dict()
    E.information_discarding(m, x, steps=3, samples=2)
    assert m.training
    for k, v in m.state_dict().items():   # eval mode: BN running statistics untouched
        np.testing.assert_array_equal(v, before[k])
    assert all(np.all(g == 0) for g in m.grads().values())


def test_feature_spread():
    m = small_cnn()
    x = np.random.default_rng(4).standard_normal((6, 1, 8, 8)).astype(np.float32)
    m.forward(x)
    f = m.tap("5").reshape(6, -1).astype(np.float64)
    want = ((f - f.mean(0)) ** 2).sum(1).mean()
    np.testing.assert_allclose(E.feature_spread(m, x, "5"), want, rtol=1e-6)
    np.testing.assert_allclose(E.feature_spread(m, x[:1], "5"), (f[0] ** 2).sum(), rtol=1e-6)


def test_bad_input_names_the_argument():
    m = small_cnn()
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(KeyError, match="tap 'nope' does not exist; model.taps"):
        E.information_discarding(m, x, tap="nope")
    with pytest.raises(TypeError, match="images must be a float32"):
        E.information_discarding(m, x.astype(np.float64))
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\)"):
        E.information_discarding(m, x[0])
    with pytest.raises(ValueError, match="kd_net_plan: conv2d '0' expects 1 input channels, got 2"):
        E.information_discarding(m, np.zeros((2, 2, 8, 8), np.float32), delta2=1.0)
    with pytest.raises(ValueError, match="do not vary"):
        E.information_discarding(m, x)   # identical images: delta2 = 0
    with pytest.raises(ValueError, match="samples"):
        E.information_discarding(m, x, samples=0)
    with pytest.raises(ValueError, match="NaN"):
        E.information_discarding(m, np.full((2, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(TypeError, match="model must be a kdcore model"):
        E.information_discarding(object(), x)
    H = np.zeros((2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"foreground has shape \(2, 1, 4, 3\), the entropies \(2, 1, 4, 4\)"):
        E.visual_concepts(H, np.zeros((2, 1, 4, 3), bool))
    with pytest.raises(TypeError, match="foreground must be a boolean mask"):
        E.visual_concepts(H, np.zeros((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="image 0 has no background pixel"):
        E.visual_concepts(H, np.ones((2, 1, 4, 4), bool))
    with pytest.raises(ValueError, match="weight_change must have one value per epoch"):
        E.learning_dynamics(np.zeros((3, 2, 4), bool), [1.0, 2.0], 1.0)


def test_visual_concepts_by_hand():
    H = np.array([[[[0.0, 1.0], [2.0, 3.0]]], [[[5.0, 5.0], [5.0, 0.0]]]])
    fg = np.array([[[[True, True], [False, False]]], [[[True, False], [False, False]]]])
    c = E.visual_concepts(H, fg, b=0.5)
    # image 0: background {2, 3}, mean 2.5; concepts: H < 2.0 -> 0 and 1 (both foreground)
    # image 1: background {5, 5, 0}, mean 10/3; concepts: H < 2.8333 -> the background 0
    np.testing.assert_array_equal(c["n_fg"], [2, 0])
    np.testing.assert_array_equal(c["n_bg"], [0, 1])
    np.testing.assert_allclose(c["h_bg"], [2.5, 10 / 3])
    np.testing.assert_allclose(c["ratio"], [1.0, 0.0])
    assert c["lam"] == 0.5
    np.testing.assert_array_equal(c["fg_concepts"], [[[[True, True], [False, False]]], [[[False, False], [False, False]]]])


def test_learning_dynamics_by_hand():
    # 3 epochs, 2 images of 4 pixels
    S = np.zeros((3, 2, 4), bool)
    S[0, 0, [0]] = True              # image 0: 1, 3, 2 concepts -> peak at epoch 2
    S[1, 0, [0, 1, 2]] = True
    S[2, 0, [1, 3]] = True
    S[:, 1, :] = False               # image 1: none -> peak at epoch 1 (first), rho NaN
    dw = [2.0, 1.0, 0.5]
    d = E.learning_dynamics(S, dw, 4.0)
    np.testing.assert_array_equal(d["m"], [2, 1])
    np.testing.assert_allclose(d["D"], [3.0 / 4, 2.0 / 4])
    assert d["D_mean"] == pytest.approx(0.625) and d["D_var"] == pytest.approx(0.015625)
    # image 0: union {0, 1, 2, 3}, final {1, 3}
    np.testing.assert_allclose(d["rho"][0], 0.5)
    assert np.isnan(d["rho"][1]) and d["rho_mean"] == 0.5


def test_foreground_mask():
    X = np.zeros((3, 1, 2, 2), np.uint8)
    X[0, 0, 0, 0] = 13    # 13/255 = 0.051 > 0.05
    X[1, 0, 1, 1] = 12    # 0.047
    ds = kdcore.datasets.from_arrays(X, np.zeros(3, np.int64), num_classes=2)
    fg = E.foreground_mask(ds, np.array([0, 1]))
    assert fg.dtype == bool and fg.shape == (2, 1, 2, 2)
    assert fg[0, 0, 0, 0] and fg.sum() == 1
    with pytest.raises(IndexError, match="indices must be in"):
        E.foreground_mask(ds, np.array([5]))


@pytest.mark.parametrize("entry", ["fit", "distill", "mutual", "slkd"])
def test_track_weights_logs_the_epoch_distances(entry):
    r = np.random.default_rng(5)
    ds = kdcore.datasets.from_arrays(r.standard_normal((64, 6)).astype(np.float32), r.integers(0, 3, 64),
                                     num_classes=3, normalize=None)
    m = kdcore.models.mlp([6, 8, 3], seed=1)
    w0 = m.net.params().astype(np.float64).copy()
    snaps = []
    cb = lambda e, row: snaps.append(m.net.params().astype(np.float64).copy()) and False  # noqa: E731
    if entry == "fit":
        h = kdcore.fit(m, ds, epochs=3, batch_size=16, progress=False, track_weights=True, callback=cb)
    elif entry == "distill":
        t = kdcore.models.mlp([6, 16, 3], seed=2)
        h = kdcore.distill(m, t, ds, epochs=3, batch_size=16, progress=False, track_weights=True, callback=cb)
    elif entry == "mutual":   # the first peer's weights
        h = kdcore.mutual([m, kdcore.models.mlp([6, 8, 3], seed=5)], ds, epochs=3, batch_size=16, progress=False,
                          track_weights=True, callback=cb)
    else:
        t = kdcore.models.mlp([6, 16, 3], seed=2)
        h = kdcore.slkd(m, t, ds, epochs=3, batch_size=16, progress=False, track_weights=True, callback=cb)
    ws = [w0] + snaps
    np.testing.assert_allclose(h["weight_change"], [np.linalg.norm(ws[k + 1] - ws[k]) for k in range(3)], rtol=1e-9)
    np.testing.assert_allclose(h["weight_norm"], [np.linalg.norm(w) for w in ws[1:]], rtol=1e-9)
    np.testing.assert_allclose(h["weight_norm0"], [np.linalg.norm(w0)] * 3, rtol=1e-9)
    h2 = kdcore.fit(kdcore.models.mlp([6, 8, 3], seed=1), ds, epochs=1, progress=False)
    assert "weight_change" not in h2


def test_plots_return_figures():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    H = np.random.default_rng(0).standard_normal((3, 1, 5, 5))
    assert isinstance(E.plot_discarding(H, images=H, foreground=H > 0), Figure)
    assert isinstance(E.plot_concepts([[1, 2, 3], [2, 3, 4]], [[5, 4, 3], [4, 3, 2]], labels=["a", "b"]), Figure)
    with pytest.raises(ValueError, match="same shape"):
        E.plot_concepts([1, 2], [1, 2, 3])


def test_concepts_over_epochs_from_checkpoints(tmp_path):
    """Per-epoch checkpoints (state dicts or kdcore.save files) -> concepts -> dynamics; the
    model is left as it was; the same numbers as fitting each epoch by hand."""
    r = np.random.default_rng(6)
    X = r.standard_normal((48, 1, 8, 8)).astype(np.float32)
    ds = kdcore.datasets.from_arrays(X, r.integers(0, 3, 48), num_classes=3, normalize=None)
    m = kdcore.models.cnn(num_classes=3, input_size=8, width=2, seed=1)
    states = []
    h = kdcore.fit(m, ds, epochs=2, batch_size=16, progress=False, track_weights=True,
                   callback=lambda e, row: states.append(m.state_dict()) and False)
    paths = []
    for k, sd in enumerate(states):
        m2 = kdcore.models.cnn(num_classes=3, input_size=8, width=2)
        m2.load_state_dict(sd)
        paths.append(str(tmp_path / f"e{k}.safetensors"))
        kdcore.save(paths[-1], m2)
    x, fg = X[:3], X[:3] > 0.5
    final = m.state_dict()
    a = E.concepts_over_epochs(m, states, x, fg, tap="12", b=0.1, steps=5, samples=2)
    b = E.concepts_over_epochs(m, paths, x, fg, tap="12", b=0.1, steps=5, samples=2)
    for k, sd in enumerate(states):
        m.load_state_dict(sd)
        want = E.visual_concepts(E.information_discarding(m, x, tap="12", steps=5, samples=2, seed=k), fg, b=0.1)
        np.testing.assert_array_equal(a[k]["fg_concepts"], want["fg_concepts"])
        np.testing.assert_array_equal(b[k]["fg_concepts"], want["fg_concepts"])
    m.load_state_dict(final)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, final[k])
    d = E.learning_dynamics([c["fg_concepts"] for c in a], h["weight_change"], h["weight_norm0"][0])
    assert d["D"].shape == (3,) and np.isfinite(d["D_mean"])
    with pytest.raises(TypeError, match="checkpoints"):
        E.concepts_over_epochs(m, [], x, fg)


def test_a_diverging_fit_raises_instead_of_returning_nan():
    m = small_cnn()
    x = np.random.default_rng(7).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with pytest.raises(RuntimeError, match="not finite"):
        E.information_discarding(m, x, steps=50, samples=2, lr=50.0, lam=1e6, delta2=1.0)
