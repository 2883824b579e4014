"""kdcore.metrics against independent computations: scikit-learn (confusion matrix, per-class
accuracy), per-sample loops (ECE), PyTorch (NLL, accuracy, KL), numpy (agreement), the HSIC
form of linear CKA with centring matrices; plots, argument errors, model modes."""
import sys

import matplotlib
import numpy as np
import pytest
import sklearn.metrics
import torch
import torch.nn.functional as TF

import kdcore
from kdcore import metrics as M

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

C = 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, C, n)
    X = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    X[np.arange(n), 0, y, :] += 1.0
    return kdcore.datasets.from_arrays(X, y, num_classes=C)


KW = dict(batch_size=32, progress=False, optimizer=kdcore.optim.SGD(lr=0.05))


@pytest.fixture(scope="module")
def teacher(data):
    t = kdcore.models.mlp([64, 32, C], seed=2)
    kdcore.fit(t, data, epochs=3, **KW)
    return t


@pytest.fixture(scope="module")
def student(data):
    s = kdcore.models.mlp([64, 16, C], seed=1)
    kdcore.fit(s, data, epochs=1, max_steps=2, **KW)
    return s


@pytest.fixture(scope="module")
def cnn(data):
    return kdcore.models.cnn(num_classes=C, in_channels=1, input_size=8, width=4, seed=3)


def logits(model, data):
    return kdcore.predict(model, data).astype(np.float64)


def without_class(data, k):
    """A subset with no sample of class k (num_classes unchanged): an empty row."""
    return data.subset(np.flatnonzero(data.y != k))


# ---- confusion matrix, per-class accuracy -------------------------------------------------

@pytest.mark.parametrize("normalize", [None, "true", "pred", "all"])
def test_confusion_matrix_matches_sklearn(data, student, teacher, cnn, normalize):
    for model in (student, teacher, cnn):
        for d in (data, without_class(data, 2)):
            pred = logits(model, d).argmax(1)
            want = sklearn.metrics.confusion_matrix(d.y, pred, labels=range(C), normalize=normalize)
            got = M.confusion_matrix(model, d, normalize=normalize)
            assert got.shape == (C, C)
            if normalize is None:
                assert got.dtype.kind == "i"
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # rows are the true class: row sums are the class counts
    np.testing.assert_array_equal(M.confusion_matrix(teacher, data).sum(1), np.bincount(data.y, minlength=C))


def test_per_class_accuracy_matches_sklearn(data, student, teacher):
    for model in (student, teacher):
        for d in (data, without_class(data, 1)):
            pred = logits(model, d).argmax(1)
            want = sklearn.metrics.recall_score(d.y, pred, labels=range(C), average=None, zero_division=np.nan)
            got = M.per_class_accuracy(model, d)
            np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(M.per_class_accuracy(teacher, without_class(data, 1))[1])


# ---- calibration ----------------------------------------------------------------------

def ece_loop(z, y, bins):
    """Per-sample reference: each sample into the bin (lo, hi] holding its confidence."""
    p = torch.softmax(torch.tensor(z, dtype=torch.float64), 1).numpy()
    members = [[] for _ in range(bins)]
    for i in range(len(y)):
        conf = float(p[i].max())
        correct = float(int(np.argmax(p[i])) == int(y[i]))
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            if lo < conf <= hi:
                members[b].append((conf, correct))
                break
        else:
            raise AssertionError(f"confidence {conf} is in no bin")
    count = np.array([len(m) for m in members])
    conf_b = np.array([np.mean([c for c, _ in m]) if m else np.nan for m in members])
    acc_b = np.array([np.mean([a for _, a in m]) if m else np.nan for m in members])
    ece = sum(len(m) / len(y) * abs(acc_b[b] - conf_b[b]) for b, m in enumerate(members) if m)
    return ece, count, conf_b, acc_b


def check_calibration(cal, z, y, bins):
    ece, count, conf_b, acc_b = ece_loop(z, y, bins)
    np.testing.assert_array_equal(cal["bin_count"], count)
    np.testing.assert_allclose(cal["bin_confidence"], conf_b, rtol=1e-12)   # NaN where empty, both
    np.testing.assert_allclose(cal["bin_accuracy"], acc_b, rtol=1e-12)
    assert cal["ece"] == pytest.approx(ece, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(cal["bin_edges"], np.arange(bins + 1) / bins, rtol=0)


@pytest.mark.parametrize("bins", [1, 3, 10, 15])
def test_calibration_matches_loop_and_torch(data, student, teacher, cnn, bins):
    for model in (student, teacher, cnn):
        z = logits(model, data)
        cal = M.calibration(model, data, bins=bins)
        check_calibration(cal, z, data.y, bins)
        if bins == 15:
            assert (cal["bin_count"] == 0).any()       # empty bins: confidence >= 1/4 leaves the first empty
            assert cal["ece"] > 0
            if model is not cnn:   # the untrained cnn is uniformly unsure: one bin
                assert (cal["bin_count"] > 0).sum() >= 3, "the confidences should spread over bins"
        zt, yt = torch.tensor(z), torch.tensor(data.y)
        assert cal["nll"] == pytest.approx(float(TF.cross_entropy(zt, yt)), rel=1e-12)
        assert cal["accuracy"] == float((zt.argmax(1) == yt).double().mean())
        ev = kdcore.evaluate(model, data)
        assert cal["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12)
        assert cal["nll"] == pytest.approx(ev["loss"], rel=1e-5)


def edge_model():
    """Linear(5, 4) on one-hot inputs: sample j's logits are column j of W, chosen so that the
    top probability is exactly 1/4, 1/2, 1, 1/3 (ties; exp(-100) vanishes next to 1) and one
    generic value (about 0.602)."""
    W = np.zeros((4, 5), np.float32)
    W[2:, 1] = -100
    W[1:, 2] = -100
    W[3, 3] = -100
    W[:, 4] = [1.5, 0.2, -0.3, 0.0]
    m = kdcore.nn.Linear(5, 4)
    m.load_state_dict({"weight": W, "bias": np.zeros(4, np.float32)})
    X = np.tile(np.eye(5, dtype=np.float32), (3, 1))
    y = np.array([0, 1, 0, 2, 3, 1, 1, 0, 3, 0, 2, 2, 0, 1, 0])
    return m, kdcore.datasets.from_arrays(X, y, normalize=None, num_classes=4)


@pytest.mark.parametrize("bins,count", [(2, [9, 6]), (3, [6, 6, 3]), (4, [3, 6, 3, 3]),
                                        (12, [0, 0, 3, 3, 0, 3, 0, 3, 0, 0, 0, 3])])
def test_calibration_confidence_on_bin_edges(bins, count):
    m, d = edge_model()
    z = logits(m, d)
    conf = torch.softmax(torch.tensor(z), 1).max(1).values.numpy()
    on_edge = np.isin(conf, np.arange(bins + 1) / bins)
    assert on_edge.sum() >= 6, "the test data must put confidences exactly on edges"
    cal = M.calibration(m, d, bins=bins)
    np.testing.assert_array_equal(cal["bin_count"], count)    # edges go to the lower bin
    check_calibration(cal, z, d.y, bins)
    assert np.isnan(cal["bin_confidence"][np.array(count) == 0]).all()


# ---- agreement, KL ---------------------------------------------------------------------

def test_agreement_matches_numpy(data, student, teacher):
    want = float(np.mean(logits(student, data).argmax(1) == logits(teacher, data).argmax(1)))
    got = M.agreement(student, teacher, data)
    assert got == want
    assert 0 < got < 1
    assert M.agreement(student, student, data) == 1.0
    unlabelled = kdcore.datasets.from_arrays(data.X, None, normalize=(data.mean, data.std))
    assert M.agreement(student, teacher, unlabelled, batch_size=7) == want


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_divergence_matches_torch(data, student, teacher, T):
    zs, zt = torch.tensor(logits(student, data)), torch.tensor(logits(teacher, data))
    log_ps, log_pt = TF.log_softmax(zs / T, 1), TF.log_softmax(zt / T, 1)
    # kl_div(input=log q, target=p) is KL(p || q): the student's distribution is the target
    want = float(TF.kl_div(log_pt, log_ps, reduction="batchmean", log_target=True))
    reverse = float(TF.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True))
    got = M.kl_divergence(student, teacher, data, T=T)
    assert got == pytest.approx(want, rel=1e-10)
    assert abs(got - reverse) > 1e-3 * want, "the data cannot tell the two directions apart"
    assert M.kl_divergence(student, student, data, T=T) == pytest.approx(0, abs=1e-12)


def test_distill_history_uses_the_same_kl(data, student, teacher):
    assert sys.modules["kdcore.distill"]._kl_to_probs is M._kl_to_probs
    zs, zt = logits(student, data), logits(teacher, data)
    q = torch.softmax(torch.tensor(zt), 1).numpy()
    assert M._kl_to_probs(zs, q) == pytest.approx(M.kl_divergence(student, teacher, data), rel=1e-12)


# ---- linear CKA -------------------------------------------------------------------------

def features(model, data, tap, batch_size):
    """The tap's eval-mode outputs, flattened per sample, stacked. Batches as linear_cka's, so
    the float32 features are bitwise the ones it sees (BLAS rounds a batch of 50 and one of
    120 differently) and the comparison can be tight."""
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(len(data), start + batch_size))
        model(data.batch(idx))
        out.append(model.tap(tap).reshape(len(idx), -1))
    model.train(was)
    return np.concatenate(out).astype(np.float64)


def cka_hsic(X, Y):
    """Kornblith et al.'s HSIC form with explicit centring matrices."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    return np.trace(K @ H @ L @ H) / np.sqrt(np.trace(K @ H @ K @ H) * np.trace(L @ H @ L @ H))


@pytest.fixture
def gram_calls(monkeypatch):
    """How many tap matrices went through the n x n Gram form."""
    calls = []
    orig = M._centred_gram

    def spy(f, *a, **k):
        calls.append(f.shape)
        return orig(f, *a, **k)

    monkeypatch.setattr(M, "_centred_gram", spy)
    return calls


def test_linear_cka_feature_form_matches_hsic(data, student, teacher, gram_calls):
    # student tap "2": 16 features, teacher "2": 32, 120 samples: the d x d path
    got = M.linear_cka(student, teacher, data, "2", "2", batch_size=50)
    assert gram_calls == []
    want = cka_hsic(features(student, data, "2", 50), features(teacher, data, "2", 50))
    assert got == pytest.approx(want, rel=1e-9)
    assert 0.05 < got < 0.999
    # logits against logits, batch of one
    got = M.linear_cka(student, teacher, data.subset(np.arange(30)), "3", "3", batch_size=1)
    want = cka_hsic(features(student, data.subset(np.arange(30)), "3", 1),
                    features(teacher, data.subset(np.arange(30)), "3", 1))
    assert got == pytest.approx(want, rel=1e-9)


def test_linear_cka_gram_form_matches_hsic(data, student, cnn, gram_calls):
    # the cnn's first conv output has 4*8*8 = 256 features > 120 samples: the n x n path,
    # for both sides (the student's 16 features as well)
    got = M.linear_cka(student, cnn, data, "2", "2", batch_size=32)
    assert sorted(gram_calls) == [(120, 16), (120, 256)]
    want = cka_hsic(features(student, data, "2", 32), features(cnn, data, "2", 32))
    assert got == pytest.approx(want, rel=1e-9)
    small = data.subset(np.arange(10))   # 16 > 10 samples: the student alone is wide
    got = M.linear_cka(student, cnn, small, "2", "11", batch_size=4)
    assert len(gram_calls) == 4
    assert got == pytest.approx(cka_hsic(features(student, small, "2", 4), features(cnn, small, "11", 4)), rel=1e-9)


def transformed(model, W):
    """model's layers up to its hidden ReLU "2", then Linear(16, 16) with weight W: tap "3"
    is (hidden features) @ W^T."""
    m = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(64, 16), kdcore.nn.ReLU(),
                             kdcore.nn.Linear(16, 16))
    sd = model.state_dict()
    m.load_state_dict({"1.weight": sd["1.weight"], "1.bias": sd["1.bias"], "3.weight": W.astype(np.float32),
                       "3.bias": np.zeros(16, np.float32)})
    return m


@pytest.mark.parametrize("n", [120, 12])   # 12 < 16 features: the Gram form
def test_linear_cka_invariances(data, student, teacher, n, gram_calls):
    d = data.subset(np.arange(n))
    Q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(16, 16)))
    base = M.linear_cka(student, teacher, d, "2", "2")
    assert (len(gram_calls) > 0) == (n < 16)
    for W in (Q, 3.7 * np.eye(16), 0.01 * Q):
        assert M.linear_cka(transformed(student, W), teacher, d, "3", "2") == pytest.approx(base, rel=1e-5)
        assert M.linear_cka(teacher, transformed(student, W), d, "2", "3") == pytest.approx(base, rel=1e-5)
    # a non-orthogonal map changes it: the invariance check can fail
    A = np.diag(np.linspace(0.1, 3, 16))
    assert M.linear_cka(transformed(student, A), teacher, d, "3", "2") != pytest.approx(base, rel=1e-3)
    # CKA(X, X) = 1: one model (one forward per batch) or two with the same weights
    assert M.linear_cka(student, student, d, "2", "2") == pytest.approx(1, abs=1e-12)
    assert M.linear_cka(teacher, teacher.copy(), d, "1", "1") == pytest.approx(1, abs=1e-12)
    assert M.linear_cka(transformed(student, Q), student, d, "3", "2") == pytest.approx(1, abs=1e-5)


# ---- report -----------------------------------------------------------------------------

def test_report_collects_the_metrics(data, student, teacher):
    assert "metrics" in kdcore.__all__
    r = M.report(student, teacher, data, T=2.0, bins=10)
    cs, ct = M.calibration(student, data, bins=10), M.calibration(teacher, data, bins=10)
    assert r == {"student_accuracy": cs["accuracy"], "teacher_accuracy": ct["accuracy"],
                 "agreement": M.agreement(student, teacher, data),
                 "kl_student_teacher": M.kl_divergence(student, teacher, data, T=2.0),
                 "student_ece": cs["ece"], "teacher_ece": ct["ece"], "student_nll": cs["nll"],
                 "teacher_nll": ct["nll"]}
    r = M.report(student, teacher, (data.X, data.y), student_tap="2", teacher_tap="2")
    assert r["linear_cka"] == pytest.approx(M.linear_cka(student, teacher, (data.X, data.y), "2", "2"), rel=1e-12)
    assert r["kl_student_teacher"] == pytest.approx(M.kl_divergence(student, teacher, (data.X, data.y)), rel=1e-12)


def test_tuple_data_is_read_as_evaluate_reads_it(data, student, teacher):
    X, y = data.X, data.y   # the fixture's Dataset normalises with X's own statistics, as a tuple does
    for k in ("ece", "nll", "accuracy"):
        assert M.calibration(student, (X, y))[k] == M.calibration(student, data)[k]
    assert M.calibration(student, (X, y))["accuracy"] == kdcore.evaluate(student, (X, y))["accuracy"]
    np.testing.assert_array_equal(M.confusion_matrix(teacher, (X, y)), M.confusion_matrix(teacher, data))


# ---- plots -------------------------------------------------------------------------------

def test_plot_reliability_returns_a_figure(data, student):
    cal = M.calibration(student, data)
    fig = M.plot_reliability(cal)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == int((cal["bin_count"] > 0).sum())     # one bar per non-empty bin
    heights = sorted(p.get_height() for p in ax.patches)
    np.testing.assert_allclose(heights, np.sort(cal["bin_accuracy"][cal["bin_count"] > 0]))
    assert f"{cal['ece']:.4f}" in ax.get_title()
    fig.savefig(__import__("io").BytesIO(), format="png")
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert M.plot_reliability(cal, ax=ax2) is fig2


def test_plot_confusion_returns_a_figure(data, teacher):
    cm = M.confusion_matrix(teacher, data)
    names = ["a", "b", "c", "d"]
    fig = M.plot_confusion(cm, class_names=names)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), cm)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert isinstance(M.plot_confusion(M.confusion_matrix(teacher, data, normalize="true")), Figure)


def test_plots_without_matplotlib_say_how_to_install(data, student, monkeypatch):
    cal = M.calibration(student, data)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # import fails as if not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        M.plot_reliability(cal)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        M.plot_confusion(np.eye(3))


# ---- argument errors ---------------------------------------------------------------------

def test_bad_arguments_name_the_argument(data, student, teacher):
    three = kdcore.models.mlp([64, 8, 3])
    unlabelled = kdcore.datasets.from_arrays(data.X, None)
    cases = [
        (lambda: M.linear_cka(student, teacher, data, "nope", "2"), KeyError, r"student_tap.*'nope'.*model\.taps\(\)"),
        (lambda: M.linear_cka(student, teacher, data, "2", "layer9"), KeyError,
         r"teacher_tap.*'layer9'.*model\.taps\(\)"),
        (lambda: M.linear_cka(student, teacher, data, 2, "2"), TypeError, "student_tap"),
        (lambda: M.calibration(student, data, bins=0), ValueError, "bins"),
        (lambda: M.calibration(student, data, bins=2.5), TypeError, "bins"),
        (lambda: M.calibration(student, data, bins=2**40), ValueError, "bins must be <="),
        (lambda: M.report(student, teacher, data, bins=-1), ValueError, "bins"),
        (lambda: M.confusion_matrix(student, data, normalize="rows"), ValueError, "normalize"),
        (lambda: M.confusion_matrix(student, data, normalize=True), ValueError, "normalize"),
        (lambda: M.calibration(student, unlabelled), ValueError, "data has no labels"),
        (lambda: M.confusion_matrix(student, (data.X, None)), ValueError, "data has no labels"),
        (lambda: M.per_class_accuracy(student, unlabelled), ValueError, "data has no labels"),
        (lambda: M.report(student, teacher, unlabelled), ValueError, "data has no labels"),
        (lambda: M.agreement(student, three, data), ValueError, "student and teacher.*outputs"),
        (lambda: M.kl_divergence(three, teacher, data), ValueError, "student and teacher.*outputs"),
        (lambda: M.report(student, three, data), ValueError, "student and teacher.*outputs"),
        (lambda: M.calibration(three, data), ValueError, "num_classes"),
        (lambda: M.calibration("resnet8", data), TypeError, "model must be a kdcore.nn.Module"),
        (lambda: M.confusion_matrix(None, data), TypeError, "model must be"),
        (lambda: M.agreement(student, object(), data), TypeError, "teacher must be a kdcore.nn.Module"),
        (lambda: M.kl_divergence(np.zeros((3, 4)), teacher, data), TypeError, "student must be"),
        (lambda: M.linear_cka(student, "t", data, "2", "2"), TypeError, "teacher must be"),
        (lambda: M.calibration(student, data.X), TypeError, "data must be"),
        (lambda: M.agreement(student, teacher, (data.X,)), TypeError, "data must be"),
        (lambda: M.kl_divergence(student, teacher, data, T=0), ValueError, "T must be"),
        (lambda: M.agreement(student, teacher, data, batch_size=0), ValueError, "batch_size"),
        (lambda: M.report(student, teacher, data, student_tap="2"), ValueError, "student_tap"),
        (lambda: M.plot_reliability({"ece": 0.1}), TypeError, "cal must be"),
        (lambda: M.plot_confusion(np.ones((2, 3))), ValueError, "cm must be"),
        (lambda: M.plot_confusion(np.eye(3), class_names=["a", "b"]), ValueError, "class_names"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


def test_non_finite_outputs_are_refused(data, student):
    bad = student.copy()
    bad.parameters()["3.bias"][0] = np.nan
    with pytest.raises(ValueError, match="student's outputs on data are not finite"):
        M.agreement(bad, student, data)


# ---- model modes ------------------------------------------------------------------------

METRICS = {
    "agreement": lambda s, t, d: M.agreement(s, t, d),
    "kl_divergence": lambda s, t, d: M.kl_divergence(s, t, d, T=2.0),
    "calibration": lambda s, t, d: M.calibration(s, d),
    "per_class_accuracy": lambda s, t, d: M.per_class_accuracy(s, d),
    "confusion_matrix": lambda s, t, d: M.confusion_matrix(s, d),
    "linear_cka": lambda s, t, d: M.linear_cka(s, t, d, "2", "2"),
    "report": lambda s, t, d: M.report(s, t, d, student_tap="2", teacher_tap="2"),
}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_training_flag_is_restored(data, name):
    metric = METRICS[name]
    for s_mode, t_mode in ((True, False), (False, True), (True, True)):
        s = kdcore.models.mlp([64, 16, C], dropout=0.5, seed=7).train(s_mode)
        t = kdcore.models.mlp([64, 16, C], dropout=0.5, seed=8).train(t_mode)
        metric(s, t, data)
        assert (s.training, t.training) == (s_mode, t_mode)


def test_training_flag_is_restored_when_a_metric_raises(data):
    """A model whose outputs are NaN makes the metrics raise while the models are in eval mode."""
    s = kdcore.models.mlp([64, 16, C], seed=7).train(True)
    t = kdcore.models.mlp([64, 16, C], seed=8).train(True)
    s.parameters()["1.bias"][:] = np.nan
    for call in (lambda: M.agreement(t, s, data), lambda: M.calibration(s, data),
                 lambda: M.report(t, s, data)):
        with pytest.raises(ValueError, match="not finite"):
            call()
        assert s.training is True and t.training is True


def test_cka_runs_eval_mode_and_leaves_the_dropout_stream(data):
    """With dropout active in training mode, CKA of a model against a copy whose dropout
    stream is elsewhere is 1 only if the forwards ran in eval mode; and a measured model's later
    training-mode forwards draw the same dropout masks as an unmeasured copy's, so measuring
    did not advance its random stream."""
    s = kdcore.models.mlp([64, 16, C], dropout=0.5, seed=7)
    x = data.batch(np.arange(16))
    twin, untouched = s.copy(), s.copy()
    twin(x)                  # one training-mode forward: twin's dropout stream is now ahead of s's
    assert s.training and twin.training
    assert not np.array_equal(s.copy()(x), twin(x))           # the two streams draw other masks
    assert M.linear_cka(s, twin, data, "3", "3") == pytest.approx(1, abs=1e-12)
    assert s.training and twin.training
    np.testing.assert_array_equal(s(x), untouched(x))
    assert not np.array_equal(s(x), s.copy().eval()(x))   # dropout really is on in these forwards


def test_weight_noise_sharpness_by_hand():
    """No noise: no increase, the model untouched. A one-layer model: the perturbed loss is
    recomputed in numpy from the documented draws (rng order, per-tensor rms scale)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    ds = kdcore.datasets.from_arrays(X, y, num_classes=3, normalize=None)
    m = kdcore.models.mlp([5, 3], seed=2)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    zero = kdcore.metrics.weight_noise_sharpness(m, ds, sigmas=[0.0], draws=2)
    assert zero["increase"] == [0.0] and zero["increase_std"] == [0.0]
    r = kdcore.metrics.weight_noise_sharpness(m, ds, sigmas=(0.1, 0.3), draws=3, seed=7)
    assert all(np.array_equal(v, m.state_dict()[k]) for k, v in before.items())
    W, b = before["1.weight"].astype(np.float64), before["1.bias"].astype(np.float64)

    def nll(W_, b_):
        z = X.astype(np.float64) @ W_.T + b_
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(40), y] - np.log(np.exp(z).sum(1))).mean())

    base = nll(W, b)
    assert r["nll"] == pytest.approx(base, rel=1e-6)
    g = np.random.default_rng(7)
    rms = lambda a: np.sqrt(np.mean(a ** 2))   # noqa: E731
    want = np.empty((3, 2))
    for d in range(3):
        eW, eb = g.standard_normal(W.shape), g.standard_normal(b.shape)
        for j, s in enumerate((0.1, 0.3)):
            want[d, j] = nll((W + s * rms(W) * eW).astype(np.float32), (b + s * rms(b) * eb).astype(np.float32))
    assert np.allclose(r["nlls"], want, rtol=1e-5)
    assert r["increase"] == pytest.approx(list((want - base).mean(0)), rel=1e-4)
    assert r["increase_std"] == pytest.approx(list((want - base).std(0)), rel=1e-3, abs=1e-9)
    with pytest.raises(ValueError, match="sigmas"):
        kdcore.metrics.weight_noise_sharpness(m, ds, sigmas=[-0.1])
    with pytest.raises(ValueError, match="draws"):
        kdcore.metrics.weight_noise_sharpness(m, ds, draws=0)


def test_weight_noise_sharpness_refuses_overflowing_sigmas_and_restores_the_weights():
    m = kdcore.models.mlp([8, 6, 3], seed=1)
    X = np.random.default_rng(0).random((10, 8), dtype=np.float32)
    y = np.arange(10) % 3
    before = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"^sigmas: under noise of sigma 1e\+30 the model's outputs are not finite"):
        kdcore.metrics.weight_noise_sharpness(m, (X, y), sigmas=[0.1, 1e30], draws=1)
    assert all(np.array_equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"^draws must be <= 10000, got 2147483648$"):
        kdcore.metrics.weight_noise_sharpness(m, (X, y), draws=2**31)
