"""The rough edges a new user hit: silent data traps (channels-last images, validation tuples
normalised with their own statistics), settings that silently do nothing (warm-ups longer
than the run), and errors that named C internals instead of the user's argument and role."""
import warnings

import numpy as np
import pytest

import kdcore


def toy(n=96, seed=0, classes=3, shape=(1, 8, 8), shift=0.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(0, 1, (n,) + shape).astype(np.float32)
    X[np.arange(n), 0, y % shape[1], :] += 2.0        # a learnable signal: a bright row per class
    return X + np.float32(shift), y.astype(np.int64)


def small_cnn(seed=0, classes=3):
    return kdcore.models.cnn(num_classes=classes, in_channels=1, input_size=8, width=4, seed=seed)


KW = dict(batch_size=32, progress=False, optimizer=kdcore.optim.SGD(lr=0.05))


# ---- 1. silent data traps -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (4, 32, 32, 3)])
def test_from_arrays_refuses_channels_last_images(shape):
    X = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*X\.transpose\(0, 3, 1, 2\)"):
        kdcore.datasets.from_arrays(X, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="channels-last"):   # the tuple form goes through from_arrays
        kdcore.fit(small_cnn(), (X, np.zeros(4, np.int64)), epochs=1, **KW)


def test_from_arrays_layout_options():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4, 6, 5, 3)).astype(np.float32)
    d = kdcore.datasets.from_arrays(X, layout="NHWC")
    assert d.shape == (3, 6, 5)
    np.testing.assert_array_equal(d.X, X.transpose(0, 3, 1, 2))
    assert kdcore.datasets.from_arrays(X, normalize=None, layout="NCHW").shape == (6, 5, 3)   # deliberate
    assert kdcore.datasets.from_arrays(np.zeros((4, 3, 28, 28), np.float32)).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="layout"):
        kdcore.datasets.from_arrays(X, layout="nhwc")


def test_val_tuple_uses_the_training_normalisation():
    Xtr, ytr = toy(seed=0)
    Xte, yte = toy(48, seed=1, shift=0.7)          # a shifted test set: its own mean/std would hide it
    train = kdcore.datasets.from_arrays(Xtr, ytr)
    m = small_cnn()
    hist = kdcore.fit(m, train, epochs=2, val=(Xte, yte), **KW)
    want = kdcore.evaluate(m, kdcore.datasets.Dataset(Xte, yte, train.mean, train.std, train.num_classes))
    assert hist["val_loss"][-1] == want["loss"] and hist["val_acc"][-1] == want["accuracy"]
    assert m.train_normalization == (train.mean, train.std)
    # evaluate with a tuple reads it as training did: the same numbers, and a brightened copy
    # scores differently (its shift is no longer normalised away)
    assert kdcore.evaluate(m, (Xte, yte)) == want
    assert kdcore.evaluate(m, (Xte + np.float32(1.0), yte))["loss"] != want["loss"]


def test_val_tuple_takes_the_training_class_count():
    Xtr, ytr = toy(seed=0)
    Xte, yte = toy(48, seed=1)
    keep = yte < 2                                   # the last class absent from validation
    hist = kdcore.fit(small_cnn(), (Xtr, ytr), epochs=1, val=(Xte[keep], yte[keep]), **KW)
    assert np.isfinite(hist["val_loss"][0])


def test_evaluate_tuple_without_known_normalisation_warns():
    X, y = toy()
    m = small_cnn()
    with pytest.warns(UserWarning, match="training normalisation is unknown"):
        kdcore.evaluate(m, (X, y))
    m.train_normalization = (None, None)             # said explicitly: no warning, no normalisation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kdcore.evaluate(m, (X, y))
    assert got == kdcore.evaluate(m, kdcore.datasets.from_arrays(X, y, normalize=None))


def test_train_normalization_follows_copies_not_fresh_models():
    m = small_cnn()
    kdcore.fit(m, toy(), epochs=1, **KW)
    assert m.copy().train_normalization == m.train_normalization
    assert not hasattr(m.fresh(), "train_normalization")


# ---- 2. settings that silently do nothing ---------------------------------------------------

def test_dkd_warmup_longer_than_the_run_warns_with_the_effective_weights():
    X, y = toy()
    t = small_cnn(seed=5)
    with pytest.warns(UserWarning, match=r"warmup_epochs=20.*epochs=3.*0\.05, 0\.1, 0\.15") as rec:
        hist = kdcore.distill(small_cnn(), t, (X, y), method="dkd", epochs=3, **KW)
    assert np.allclose(hist["kd_weight"], [0.05, 0.1, 0.15])   # what the warning says is what ran
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdcore.distill(small_cnn(), t, (X, y), method="dkd", epochs=3, warmup_epochs=3, **KW)


def test_loss_term_warmup_longer_than_the_run_warns():
    X, y = toy()
    t = small_cnn(seed=5)
    with pytest.warns(UserWarning, match=r"KD term: warmup_epochs=4 .*epochs=2"):
        kdcore.distill(small_cnn(), t, (X, y), epochs=2, losses=[
            kdcore.losses.CE(1.0), kdcore.losses.KD(1.0, warmup_epochs=4)], **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdcore.distill(small_cnn(), t, (X, y), epochs=2, losses=[
            kdcore.losses.CE(1.0), kdcore.losses.KD(1.0, warmup_epochs=2)], **KW)


def test_reviewkd_default_warmup_warns_in_a_short_run():
    assert kdcore.losses.ReviewKD().warmup_epochs == 20
    tr = kdcore.datasets.from_arrays(*toy(64, shape=(1, 16, 16)))
    s = kdcore.models.resnet8(num_classes=3, in_channels=1, input_size=16)
    t = kdcore.models.resnet8(num_classes=3, in_channels=1, input_size=16, seed=3)
    with pytest.warns(UserWarning, match="ReviewKD term: warmup_epochs=20"):
        kdcore.distill(s, t, tr, method="reviewkd", epochs=1, max_steps=1, **KW)


# ---- 3. messages in the user's terms --------------------------------------------------------

def test_missing_checkpoint_is_file_not_found_naming_the_path(tmp_path):
    p = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as e:
        kdcore.load(p, small_cnn())
    assert "kd_ckpt_open" not in str(e.value)


def test_checkpoint_mismatch_names_role_and_key(tmp_path):
    p = str(tmp_path / "c.safetensors")
    kdcore.save(p, {"student": kdcore.models.mlp([64, 16, 3])})
    with pytest.raises(kdcore.CheckpointMismatch, match=r"the student's '1\.weight' \(model/student/1\.weight\) "
                                                        r"is float32\[16, 64\] in the file"):
        kdcore.load(p, {"student": kdcore.models.mlp([64, 8, 3])})


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_output_count_mismatch_names_the_role(who):
    tr = kdcore.datasets.from_arrays(*toy(classes=3))
    big = small_cnn(classes=30)
    s, t = (small_cnn(), big) if who == "teacher" else (big, small_cnn(seed=2))
    with pytest.raises(ValueError, match=f"the {who} outputs 30 values but the training data \\(train\\) has 3 classes") as e:
        kdcore.distill(s, t, tr, epochs=1, **KW)
    assert "kd_" not in str(e.value)


def test_one_based_labels_are_named():
    X, y = toy(classes=3)
    assert y.min() == 0 and y.max() == 2
    with pytest.raises(ValueError, match=r"labels run from 1 to 3.*labels 0\.\.2.*y - 1"):
        kdcore.fit(small_cnn(), (X, y + 1), epochs=1, **KW)
    with pytest.raises(ValueError, match="labels run from 1 to 3"):
        kdcore.evaluate(small_cnn(), kdcore.datasets.from_arrays(X, y + 1))


def test_flat_input_to_a_cnn_names_the_expected_shape():
    X, y = toy()
    m = small_cnn()
    flat = X.reshape(len(X), -1)
    msg = r"\(N, 1, H, W\).*the model's input is \(N, 1, 8, 8\), {} is \(N, 64\).*X\.reshape\(-1, 1, 8, 8\)"
    with pytest.raises(ValueError, match=msg.format("x")):
        m(flat)
    with pytest.raises(ValueError, match=r"the model cannot read the training data \(train\): .*" + msg.format(r"the training data \(train\)")):
        kdcore.fit(m, (flat, y), epochs=1, **KW)
    with pytest.raises(ValueError, match="the model cannot read data: "):
        kdcore.evaluate(m, kdcore.datasets.from_arrays(flat, y))


@pytest.mark.parametrize("scheme, where", [("mutual", "kdcore.mutual"), ("takd", "kdcore.takd"),
                                           ("born_again", "kdcore.born_again")])
def test_scheme_names_as_distill_methods_say_where_they_live(scheme, where):
    with pytest.raises(ValueError, match=f"method must be one of .*training scheme of its own: call {where}"):
        kdcore.distill(small_cnn(), small_cnn(seed=1), toy(), method=scheme, epochs=1, **KW)


# ---- 4. summary shapes and tap names ---------------------------------------------------------

def test_summary_shows_shapes_after_a_forward_and_keeps_its_taps():
    m = kdcore.nn.Sequential(kdcore.nn.Conv2d(1, 4, 3, padding=1), kdcore.nn.ReLU(), kdcore.nn.AdaptiveAvgPool2d(),
                             kdcore.nn.Flatten(), kdcore.nn.Linear(4, 3))
    assert [r[2] for r in m.summary()] == [None] * 5      # nothing to go by yet
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    m(x)
    feat = m.tap("1")
    assert [r[2] for r in m.summary()] == [(4, 8, 8), (4, 8, 8), (4,), (4,), (3,)]
    assert "4x8x8" in repr(m)
    np.testing.assert_array_equal(m.tap("1"), feat)       # the forward's taps survive the summary
    assert [r[2] for r in m.summary((1, 6, 6))][0] == (4, 6, 6)


def _readme_block(start, end):
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text[text.index(start):text.index(end)]


@pytest.mark.parametrize("build", [
    lambda: kdcore.models.resnet8(num_classes=3, in_channels=1, input_size=8),
    lambda: kdcore.models.cnn(num_classes=3, in_channels=1, input_size=8, width=4),
    lambda: kdcore.models.mlp([64, 16, 8, 3])], ids=["resnet8", "cnn", "mlp"])
def test_readme_pytorch_style_example_runs_for_zoo_models(build):
    code = _readme_block("# PyTorch-style use of any model or layer", "sd = model.state_dict()")
    test = kdcore.datasets.from_arrays(*toy(16))
    ns = dict(np=np, kdcore=kdcore, model=build(), test=test)
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["feat"].shape[0] == 8


# ---- 5. History: plots, loading, progress ----------------------------------------------------

@pytest.fixture(scope="module")
def short_run():
    m = small_cnn()
    X, y = toy()
    hist = kdcore.fit(m, (X, y), epochs=3, val=toy(48, seed=1), **KW)
    return m, hist


def test_history_plot_has_loss_and_accuracy_panels_numbered_from_1(short_run):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, hist = short_run
    loss_ax, acc_ax = hist.plot()
    labels = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]  # noqa: E731
    assert labels(loss_ax) == ["train objective (weighted terms)", "val cross-entropy"]
    assert all("acc" in t for t in labels(acc_ax)) and len(labels(acc_ax)) == 2
    for ax in (loss_ax, acc_ax):
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1, 2, 3]] * 2
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert hist["epoch"] == [0, 1, 2]                     # the column itself stays 0-based
    plt.close("all")


def test_load_returns_a_history(tmp_path):
    p = str(tmp_path / "run.safetensors")
    m = small_cnn()
    hist = kdcore.fit(m, toy(), epochs=2, checkpoint=p, **KW)
    got = kdcore.load(p, small_cnn())["history"]
    assert isinstance(got, kdcore.History) and got == hist and got.best_epoch == hist.best_epoch


def _fit_with_progress(capsys, epochs=3):
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdcore.fit(small_cnn(), toy(), epochs=epochs, batch_size=32, progress=True)
    return capsys.readouterr().err


def test_progress_in_a_notebook_without_ipywidgets_is_one_line_per_epoch(capsys, monkeypatch):
    from kdcore import training
    monkeypatch.setattr(training, "_in_notebook", lambda: True)
    monkeypatch.setattr(training, "_has_widgets", lambda: False)
    err = _fit_with_progress(capsys)
    lines = err.splitlines()
    assert [line.split(" train_loss")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], err


def test_progress_line_numbers_epochs_from_1(capsys):
    err = _fit_with_progress(capsys, epochs=2)
    summary = [line.split("\r")[-1] for line in err.splitlines() if "train_loss" in line]
    assert [line.split(" train_loss")[0] for line in summary] == ["epoch 1/2", "epoch 2/2"], err


# ---- 7. early stopping and the learning-rate range test --------------------------------------

def _signal(n, seed):
    return toy(n, seed=seed)


def test_early_stopping_stops_and_restores_the_best_epoch_bitwise():
    m = small_cnn()
    stop = kdcore.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best=True)
    hist = kdcore.fit(m, _signal(192, 0), epochs=15, val=_signal(64, 1), callback=stop,
                      keep_snapshots=range(15), **dict(KW, optimizer=kdcore.optim.SGD(lr=0.5)))
    best = int(np.argmin(hist["val_loss"]))
    assert stop.best_epoch == best and stop.stopped_epoch == hist.epochs - 1 == best + 2
    assert best < hist.epochs - 1                        # the last epoch is not the best one
    got = m.state_dict()
    for k, v in hist.snapshots[best].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert any(not np.array_equal(got[k], v) for k, v in hist.snapshots[hist.epochs - 1].items())


def test_early_stopping_without_restore_keeps_the_last_weights_and_in_distill():
    X, y = _signal(192, 0)
    t = small_cnn(seed=7)
    kdcore.fit(t, (X, y), epochs=2, **KW)
    s = small_cnn()
    stop = kdcore.callbacks.EarlyStopping(monitor="val_acc", patience=0, restore_best=False)
    hist = kdcore.distill(s, t, (X, y), epochs=10, val=_signal(64, 1), callback=stop, **KW)
    assert hist.epochs == stop.stopped_epoch + 1 < 10
    with pytest.raises(ValueError, match="monitor='val_acc' is not logged.*need val="):
        kdcore.fit(small_cnn(), (X, y), epochs=1, callback=kdcore.callbacks.EarlyStopping(), **KW)


def test_lr_find_sweeps_exponentially_and_leaves_the_model_as_it_was():
    m = small_cnn()
    kdcore.fit(m, _signal(96, 0), epochs=1, **KW)
    m.eval()
    before, steps_before = m.state_dict(), m._step
    lrs, losses, suggested = kdcore.lr_find(m, _signal(256, 2), min_lr=1e-5, max_lr=10.0, steps=120, batch_size=16)
    assert len(lrs) == len(losses) >= 10
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (10.0 / 1e-5) ** (1 / 119), rtol=1e-9)
    assert np.all(np.isfinite(losses)) and losses.min() < losses[0]      # the sweep did train
    assert suggested == lrs[int(np.argmin(losses))] / 10
    after = m.state_dict()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert not m.training and m._step == steps_before
