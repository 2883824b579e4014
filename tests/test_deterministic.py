"""Deterministic mode (kdcore.set_deterministic): training results bitwise identical across
runs and across thread counts (1 vs 2), for plain training (a CNN: conv weight gradients and
BN; an MLP wide enough for OpenBLAS to thread its products), KD and SLKD; and resume
exactness in that mode: 2N epochs straight == N epochs, checkpoint, N more epochs in new
objects -- with the two halves at different thread counts -- for fit, KD, and SLKD (parallel
and sequential)."""
import numpy as np
import pytest

import kdcore


@pytest.fixture(autouse=True)
def restore_mode():
    threads, det = kdcore.get_num_threads(), kdcore.get_deterministic()
    yield
    kdcore.set_num_threads(threads)
    kdcore.set_deterministic(det)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    n, c = 96, 4
    y = rng.integers(0, c, n)
    X = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    X[np.arange(n), 0, y, :] += 1.5
    return kdcore.datasets.from_arrays(X, y, num_classes=c)


def cnn(seed=0):
    return kdcore.models.cnn(num_classes=4, input_size=8, width=8, seed=seed)


def wide(seed=0, h=256):
    return kdcore.models.mlp([64, h, 4], batchnorm=True, dropout=0.1, seed=seed)


KW = dict(batch_size=32, progress=False, seed=3, optimizer=kdcore.optim.SGD(lr=0.05, momentum=0.9))


@pytest.fixture(scope="module")
def teacher(data):
    t = kdcore.models.mlp([64, 64, 4], seed=11)
    kdcore.fit(t, data, epochs=2, **KW)
    return t


def state(models):
    return [{k: v.copy() for k, v in m.state_dict().items()} for m in models]


def same(sa, sb):
    return all(sa_[k].tobytes() == sb_[k].tobytes() for sa_, sb_ in zip(sa, sb) for k in sa_)


def run_fit(data, threads):
    kdcore.set_num_threads(threads)
    m = cnn()
    h = kdcore.fit(m, data, epochs=2, **KW)
    return state([m]), h["train_loss"]


def run_kd(data, teacher, threads):
    kdcore.set_num_threads(threads)
    s = wide()
    h = kdcore.distill(s, teacher, data, epochs=2, cache=False, **KW)
    return state([s]), h["train_loss"]


def run_slkd(data, teacher, threads):
    kdcore.set_num_threads(threads)
    s, sls = wide(), [wide(40, 64), wide(41, 64)]
    h = kdcore.slkd(s, teacher, data, sl_teachers=sls, epochs=2, **KW)
    return state([s] + sls), h["train_loss"]


def test_api():
    kdcore.set_deterministic(True)
    assert kdcore.get_deterministic() is True
    kdcore.set_deterministic(False)
    assert kdcore.get_deterministic() is False
    with pytest.raises(TypeError, match="on must be a bool"):
        kdcore.set_deterministic(1)


def test_thread_count_matters_without_deterministic_mode(data):
    """The control: without the mode, 1 and 2 threads give different bits for this CNN
    (conv weight gradients reduce per-thread partials), so the tests below can fail."""
    kdcore.set_deterministic(False)
    s1, _ = run_fit(data, 1)
    s2, _ = run_fit(data, 2)
    assert not same(s1, s2)


@pytest.mark.parametrize("scheme", ["fit", "kd", "slkd"])
def test_bitwise_across_runs_and_thread_counts(data, teacher, scheme):
    kdcore.set_deterministic(True)
    run = {"fit": lambda t: run_fit(data, t), "kd": lambda t: run_kd(data, teacher, t),
           "slkd": lambda t: run_slkd(data, teacher, t)}[scheme]
    a1, la1 = run(1)
    a2, la2 = run(2)
    b1, lb1 = run(1)
    assert same(a1, b1) and la1 == lb1, "two runs at 1 thread differ"
    assert same(a1, a2) and la1 == la2, "1 vs 2 threads differ"
    assert all(np.isfinite(v).all() for sd in a1 for v in sd.values())


# ---- resume exactness in deterministic mode: the halves run at different thread counts


def resume_check(tmp_path, run, models_a, models_b, models_c):
    """run(models, epochs, checkpoint, resume, threads) -> History."""
    kdcore.set_deterministic(True)
    ha = run(models_a, 4, None, False, 1)                       # 2N epochs straight
    ck = str(tmp_path / "run.safetensors")
    run(models_b, 4, ck, False, 2, stop_after=1)                # N epochs at 2 threads, saved
    assert kdcore.load(ck)["epoch"] == 1
    hc = run(models_c, 4, ck, True, 1)                          # load, N more at 1 thread
    assert same(state(models_a), state(models_c))
    assert hc.epochs == 4
    for k in ha:
        if k != "time":
            assert ha[k] == hc[k], k


def test_fit_resume_deterministic(tmp_path, data):
    def run(models, epochs, ck, resume, threads, stop_after=None):
        kdcore.set_num_threads(threads)
        return kdcore.fit(models[0], data, epochs=epochs, checkpoint=ck, resume=resume, augment=True,
                          callback=None if stop_after is None else (lambda e, r: e == stop_after), **KW)

    resume_check(tmp_path, run, [cnn()], [cnn()], [cnn(5)])


def test_kd_resume_deterministic(tmp_path, data, teacher):
    def run(models, epochs, ck, resume, threads, stop_after=None):
        kdcore.set_num_threads(threads)
        return kdcore.distill(models[0], teacher, data, epochs=epochs, checkpoint=ck, resume=resume, cache=False,
                              callback=None if stop_after is None else (lambda e, r: e == stop_after), **KW)

    resume_check(tmp_path, run, [wide()], [wide()], [wide(5)])


def test_slkd_resume_deterministic(tmp_path, data, teacher):
    def run(models, epochs, ck, resume, threads, stop_after=None):
        kdcore.set_num_threads(threads)
        return kdcore.slkd(models[0], teacher, data, sl_teachers=models[1:], epochs=epochs, checkpoint=ck,
                           resume=resume, callback=None if stop_after is None else (lambda e, r: e == stop_after),
                           **KW)

    resume_check(tmp_path, run, [wide(), wide(40, 64), wide(41, 64)], [wide(), wide(40, 64), wide(41, 64)],
                 [wide(5), wide(50, 64), wide(51, 64)])


def test_sequential_slkd_resume_deterministic(tmp_path, data, teacher):
    """SLKD*: the checkpoint holds the phase-2 student; a resume re-runs phase 1 (the same
    SL-teacher trajectory: they must start as in the interrupted run) and continues phase 2."""
    def run(models, epochs, ck, resume, threads, stop_after=None):
        kdcore.set_num_threads(threads)
        return kdcore.slkd(models[0], teacher, data, sl_teachers=models[1:], sequential=True, epochs=epochs,
                           checkpoint=ck, resume=resume,
                           callback=None if stop_after is None else (lambda e, r: e == stop_after), **KW)

    resume_check(tmp_path, run, [wide(), wide(40, 64), wide(41, 64)], [wide(), wide(40, 64), wide(41, 64)],
                 [wide(5), wide(40, 64), wide(41, 64)])
    assert sorted(kdcore.load(str(tmp_path / "run.safetensors"))["models"]) == ["student"]
    # other SL-teachers give another trajectory: reported as changed settings
    with pytest.warns(RuntimeWarning, match="sl_trajectory_sha256"):
        run([wide(6), wide(60, 64), wide(61, 64)], 4, str(tmp_path / "run.safetensors"), True, 1)


def test_inference_chunks_do_not_depend_on_threads():
    """predict/evaluate run in chunks of images; OpenBLAS's sums depend on the rows of a
    product, so in deterministic mode the automatic chunk size must not follow the thread
    count (it otherwise does: the budget is the L2 of the threads in use)."""
    kdcore.set_deterministic(True)
    m = kdcore.models.cnn(num_classes=10, input_size=28, width=4, seed=5).eval()
    x = np.random.default_rng(0).normal(0, 1, (1000, 1, 28, 28)).astype(np.float32)
    out, chunks = [], []
    for threads in (1, 2):
        kdcore.set_num_threads(threads)
        out.append(m(x, grad=False).copy())
        chunks.append(m.net.last_chunk())
    assert chunks[0] == chunks[1] < 1000
    assert out[0].tobytes() == out[1].tobytes()
