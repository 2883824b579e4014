"""Checkpoint and resume of the data-free entry points (kdcore.datafree): a run stopped and
resumed in new objects equals the uninterrupted run bit for bit -- DAFL, DFAD and ZSKT at
epoch boundaries (student, generator, both optimizers, history), DeepInversion at every chunk
boundary (images, labels, history), also after a SIGKILL of the process running it; a resume
against other settings, models or labels is refused or reported, naming what differs; a
malformed checkpoint raises."""
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

import kdcore

D = kdcore.datafree
V, LATENT = 4, 6
HERE = os.path.dirname(os.path.abspath(__file__))


def teacher(seed=3):
    """A 4-class CNN on 8x8 images with BN statistics away from their init (DeepInversion's
    feature term holds the images to them)."""
    t = kdcore.models.cnn(num_classes=V, input_size=8, width=6, seed=seed)
    sd = t.state_dict()
    r = np.random.default_rng(seed)
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = r.normal(0, 0.3, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            sd[k] = r.uniform(0.5, 2.0, v.shape).astype(np.float32)
    t.load_state_dict(sd)
    return t


def student(seed=2):
    return kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=seed)


def val_set():
    rng = np.random.default_rng(1)
    return kdcore.datasets.from_arrays(rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
                                       rng.integers(0, V, 16), num_classes=V, normalize=None)


def assert_same_state(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{what} {k}")


def assert_same_history(ha, hb):
    assert set(ha) == set(hb)
    for k in ha:
        if k != "time":
            assert ha[k] == hb[k], k


# ---- DAFL, DFAD, ZSKT: the fit loop's checkpoints, two players ------------------------------

GAMES = {
    "dafl": (D.dafl, dict(epochs=3, steps_per_epoch=2, batch_size=8, lr_g=0.05), {}),
    # Adam for both players: the second moments must come back too
    "dfad": (D.dfad, dict(epochs=3, iters_per_epoch=2, batch_size=8, n_s=2,
                          student_optimizer=kdcore.optim.Adam(lr=1e-3)), dict(bn_eps=1e-5, tanh=True)),
    "zskt": (D.zskt, dict(epochs=3, iters_per_epoch=2, batch_size=8, n_s=2, at_taps=[("5", "5"), ("12", "12")],
                          schedule="cosine"), dict(bn_eps=1e-5, tanh=False)),
}


def play(name, t, seeds=(2, 1), **kw):
    """One run of the game on fresh models (student and generator from the given seeds);
    returns (history, student, generator)."""
    fn, base, gkw = GAMES[name]
    s = student(seeds[0])
    g = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=seeds[1], **gkw)
    h = fn(s, t, **dict(base, generator=g, latent_dim=LATENT, progress=False, seed=3, **kw))
    return h, s, s.generator


@pytest.fixture(scope="module")
def t():
    return teacher()


@pytest.mark.parametrize("name", sorted(GAMES))
@pytest.mark.parametrize("stop", ["return", "interrupt"])
def test_generator_games_resume_is_bitwise(tmp_path, t, name, stop):
    """3 epochs straight == a run stopped after epoch 0 (the callback returns True, or raises
    KeyboardInterrupt as Ctrl-C would) + a resume in new models of other initial weights."""
    ha, sa, ga = play(name, t, val=val_set())
    ck = str(tmp_path / f"{name}.safetensors")

    def cb(epoch, row):
        if epoch == 0:
            if stop == "interrupt":
                raise KeyboardInterrupt
            return True
        return False

    if stop == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            play(name, t, val=val_set(), checkpoint=ck, callback=cb)
    else:
        assert play(name, t, val=val_set(), checkpoint=ck, callback=cb)[0].epochs == 1
    saved = kdcore.load(ck)
    assert saved["epoch"] == 0
    assert sorted(saved["models"]) == sorted(saved["optimizers"]) == ["generator", "student"]
    assert saved["optimizers"]["generator"]["steps"] > 0 and saved["optimizers"]["student"]["steps"] > 0
    hb, sb, gb = play(name, t, seeds=(12, 11), val=val_set(), checkpoint=ck, resume=True)
    assert_same_state(sa, sb, "student")
    assert_same_state(ga, gb, "generator")
    assert_same_history(ha, hb)
    assert hb.epochs == 3 and kdcore.load(ck)["epoch"] == 2


def test_generator_games_extend_and_best(tmp_path, t):
    """DAFL (constant learning rates): 1 epoch, then the same call with epochs=3 and resume
    equals 3 epochs straight; checkpoint_best writes the best val_acc epoch."""
    ha, sa, ga = play("dafl", t, val=val_set())
    ck = str(tmp_path / "d.safetensors")
    play("dafl", t, val=val_set(), checkpoint=ck, epochs=1, checkpoint_best=True)
    hb, sb, gb = play("dafl", t, seeds=(5, 6), val=val_set(), checkpoint=ck, resume=True, checkpoint_best=True)
    assert_same_state(sa, sb, "student")
    assert_same_state(ga, gb, "generator")
    assert_same_history(ha, hb)
    assert kdcore.load(str(tmp_path / "d-best.safetensors"))["epoch"] == hb.best_epoch


def test_generator_games_refuse_or_report_other_settings(tmp_path, t):
    ck = str(tmp_path / "z.safetensors")
    play("zskt", t, checkpoint=ck, callback=lambda e, row: True)
    # another setting: reported by name, as fit reports it
    with pytest.warns(RuntimeWarning, match=r"different settings \(n_s\)"):
        play("zskt", t, checkpoint=ck, resume=True, n_s=3)
    with pytest.warns(RuntimeWarning, match=r"different settings \(generator_optimizer\)"):
        play("zskt", t, checkpoint=ck, resume=True, n_s=3, generator_optimizer=kdcore.optim.Adam(lr=1e-4))
    # a generator of another latent size: refused, naming the tensor; nothing is loaded
    s = student(7)
    before = s.state_dict()
    g = kdcore.models.dafl_generator(LATENT + 2, img_size=8, width=4, seed=1, bn_eps=1e-5, tanh=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # refused before any settings comparison
        with pytest.raises(kdcore.CheckpointMismatch, match=r"the generator's '0.weight' \(model/generator/0.weight\)"):
            D.zskt(s, t, **dict(GAMES["zskt"][1], generator=g, latent_dim=LATENT + 2, progress=False, seed=3,
                                checkpoint=ck, resume=True))
    for k, v in before.items():
        np.testing.assert_array_equal(s.state_dict()[k], v, err_msg=k)
    # a DeepInversion checkpoint holds no student: refused
    di = str(tmp_path / "di.safetensors")
    D.deepinversion(t, 4, checkpoint=di, **dict(DI, student=None))
    with pytest.raises(KeyError, match=r"the student \(model/student/\*; the file has models: batch_images\)"):
        play("dfad", t, checkpoint=di, resume=True)
    # options that need each other
    with pytest.raises(ValueError, match="checkpoint_best needs val"):
        play("dfad", t, checkpoint=ck, checkpoint_best=True)
    with pytest.raises(ValueError, match="resume and checkpoint_best need checkpoint"):
        play("dafl", t, resume=True)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        play("zskt", t, checkpoint=3)


@pytest.mark.parametrize("name", sorted(GAMES))
def test_generator_games_refuse_a_malformed_checkpoint(tmp_path, t, name):
    ck = str(tmp_path / "c.safetensors")
    play(name, t, checkpoint=ck, epochs=1)
    raw = open(ck, "rb").read()
    with open(ck, "wb") as f:
        f.write(raw[:len(raw) // 2])
    with pytest.raises(OSError, match="c.safetensors"):
        play(name, t, checkpoint=ck, resume=True)


# ---- DeepInversion: chunk boundaries ---------------------------------------------------------

# 10 images in batches of 4, 4, 2; 7 iterations in chunks of 3, 3, 1: 9 chunks. ADI (a
# student), flips and jitter: every random draw and both nets' terms cross the boundaries.
DI = dict(iterations=7, batch_size=4, chunk=3, seed=1, flip=True, lr=0.1)
N_DI = 10


@pytest.fixture(scope="module")
def di_models():
    return teacher(), student()


@pytest.fixture(scope="module")
def di_straight(di_models):
    tt, ss = di_models
    return D.deepinversion(tt, N_DI, student=ss, **DI)


def stop_at(i, how="return"):
    def cb(row, metrics):
        assert metrics["iteration"] in (3, 6, 7)
        if row == i:
            if how == "interrupt":
                raise KeyboardInterrupt
            return True
        return False
    return cb


def assert_same_result(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].dtype == b[0].dtype == np.float32
    assert_same_history(a[2], b[2])


def test_deepinversion_resume_at_every_chunk_is_bitwise(tmp_path, di_models, di_straight):
    tt, ss = di_models
    assert len(di_straight[2]["batch"]) == 9
    ck = str(tmp_path / "di.safetensors")
    for i in range(9):
        if os.path.exists(ck):
            os.remove(ck)
        part = D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, callback=stop_at(i), **DI)
        finished = [0, 0, 4, 4, 4, 8, 8, 8, 10][i]   # images of the batches done when row i stops the run
        assert part[0].shape[0] == finished
        np.testing.assert_array_equal(part[0], di_straight[0][:finished])
        st = kdcore.load(ck)
        assert (st["batch"], st["iteration"]) == (i // 3, [3, 6, 7][i % 3])
        assert list(st["models"]) == ["batch_images"] and st["images"].shape == (N_DI, 1, 8, 8)
        assert sorted(st["optimizers"]["batch_images"]) == ["state0", "state1", "steps"]
        res = D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, resume=True, **DI)
        assert_same_result(di_straight, res)
    # a resume of the finished run returns its result
    assert_same_result(di_straight, D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, resume=True, **DI))
    # without resume the file is overwritten by a new run
    assert_same_result(di_straight, D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, **DI))


def test_deepinversion_checkpoint_every_and_interrupt(tmp_path, di_models, di_straight):
    """checkpoint_every=2: saves after chunks 2 and 3 of each batch (the last); a
    KeyboardInterrupt from the callback leaves the last save, which resumes exactly."""
    tt, ss = di_models
    ck = str(tmp_path / "di.safetensors")
    seen = []
    orig = kdcore.checkpoint.save

    def spy(path, *a, **k):
        seen.append((k["batch"], k["iteration"]))
        return orig(path, *a, **k)

    kdcore.checkpoint.save = spy
    try:
        with pytest.raises(KeyboardInterrupt):
            D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, checkpoint_every=2, callback=stop_at(6, "interrupt"),
                            **DI)
    finally:
        kdcore.checkpoint.save = orig
    assert seen == [(0, 6), (0, 7), (1, 6), (1, 7)]
    st = kdcore.load(ck)
    assert (st["batch"], st["iteration"]) == (1, 7)
    np.testing.assert_array_equal(st["images"][:8], di_straight[0][:8])
    assert not st["images"][8:].any()   # the unfinished batch's slots stay zero
    assert_same_result(di_straight, D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, resume=True,
                                                    checkpoint_every=2, **DI))


def test_deepinversion_sgd_state_resumes(tmp_path, di_models):
    """Another optimizer (SGD with momentum, no second moment), no student, no jitter."""
    tt, _ = di_models
    kw = dict(DI, optimizer=kdcore.optim.SGD(lr=0.05, momentum=0.9), jitter=0, flip=False)
    a = D.deepinversion(tt, 6, **kw)
    ck = str(tmp_path / "sgd.safetensors")
    D.deepinversion(tt, 6, checkpoint=ck, callback=stop_at(1), **kw)
    assert sorted(kdcore.load(ck)["optimizers"]["batch_images"]) == ["state0", "steps"]
    assert_same_result(a, D.deepinversion(tt, 6, checkpoint=ck, resume=True, **kw))


@pytest.mark.parametrize("change, named", [
    (dict(iterations=8), r"iterations \(7 in the checkpoint, 8 now\)"),
    (dict(chunk=2), r"chunk \(3 in the checkpoint, 2 now\)"),
    (dict(seed=2), r"seed \(1 in the checkpoint, 2 now\)"),
    (dict(batch_size=5), r"batch_size \(4 in the checkpoint, 5 now\)"),
    (dict(lr=0.2), r"optimizer \('Adam\(lr=0.1, .*\)' in the checkpoint, 'Adam\(lr=0.2, "),
    (dict(bn=1.0), r"bn \(10.0 in the checkpoint, 1.0 now\)"),
    (dict(flip=False), r"flip \(True in the checkpoint, False now\)"),
    (dict(adi=0.5), r"adi \(0.2 in the checkpoint, 0.5 now\)"),
    (dict(n_images=12), r"n_images \(10 in the checkpoint, 12 now\)"),
    (dict(teacher=teacher(seed=4)), r"the teacher's weights \('[0-9a-f]{12}\.\.\.' in the checkpoint"),
    (dict(student=student(seed=5)), r"the student's weights \('[0-9a-f]{12}\.\.\.' in the checkpoint"),
    (dict(labels=(np.arange(N_DI) + 1) % V), r"the labels differ from the checkpoint's"),
])
def test_deepinversion_resume_with_other_settings_raises(tmp_path, di_models, change, named):
    tt, ss = di_models
    ck = str(tmp_path / "di.safetensors")
    D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, callback=stop_at(1), **DI)
    before = open(ck, "rb").read()
    kw = dict(DI, teacher=tt, student=ss, n_images=N_DI)
    kw.update(change)
    with pytest.raises(ValueError, match=named) as e:
        D.deepinversion(checkpoint=ck, resume=True, **kw)
    assert str(e.value).startswith(f"cannot resume from {ck}")
    assert open(ck, "rb").read() == before


def test_deepinversion_refuses_malformed_or_foreign_checkpoints(tmp_path, di_models):
    tt, ss = di_models
    ck = str(tmp_path / "di.safetensors")
    D.deepinversion(tt, N_DI, student=ss, checkpoint=ck, callback=stop_at(4), **DI)
    raw = open(ck, "rb").read()
    for cut in (0, 7, len(raw) // 3, len(raw) - 1):
        bad = str(tmp_path / f"cut{cut}.safetensors")
        with open(bad, "wb") as f:
            f.write(raw[:cut])
        with pytest.raises(OSError, match=f"cut{cut}.safetensors"):
            D.deepinversion(tt, N_DI, student=ss, checkpoint=bad, resume=True, **DI)
    # a checkpoint whose position does not fit its settings
    st = kdcore.load(ck)
    holder = st["models"]["batch_images"]
    for field, value in (("iteration", 9), ("batch", 3), ("iteration", 0)):
        bad = str(tmp_path / f"pos-{field}{value}.safetensors")
        meta = {k: st[k] for k in ("scheme", "batch", "iteration", "config", "history")}
        meta[field] = value
        m = kdcore.nn.Sequential(kdcore.nn.Linear(4, 64, bias=False))
        m.load_state_dict({"0.weight": holder["0.weight"]})
        kdcore.save(bad, {"batch_images": m}, images=st["images"], labels=st["labels"], **meta)
        with pytest.raises(ValueError, match="corrupt DeepInversion checkpoint"):
            D.deepinversion(tt, N_DI, student=ss, checkpoint=bad, resume=True, **DI)
    # a checkpoint of another entry point
    other = str(tmp_path / "fit.safetensors")
    kdcore.save(other, student(), epoch=0, history={})
    with pytest.raises(ValueError, match="is not a DeepInversion checkpoint"):
        D.deepinversion(tt, N_DI, student=ss, checkpoint=other, resume=True, **DI)
    # the argument checks
    with pytest.raises(ValueError, match="resume needs checkpoint"):
        D.deepinversion(tt, N_DI, resume=True, **DI)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        D.deepinversion(tt, N_DI, checkpoint=1, **DI)
    with pytest.raises(ValueError, match="checkpoint_every"):
        D.deepinversion(tt, N_DI, checkpoint=ck, checkpoint_every=0, **DI)
    with pytest.raises(TypeError, match="callback must be callable"):
        D.deepinversion(tt, N_DI, callback=3, **DI)


# ---- DeepInversion killed by SIGKILL -------------------------------------------------------

KILLED = """
import sys
sys.path.insert(0, sys.argv[1])
import kdcore
from test_datafree_resume import KILL_KW, teacher, student
kdcore.set_num_threads(int(sys.argv[3]))
kdcore.datafree.deepinversion(teacher(), 12, student=student(), checkpoint=sys.argv[2],
                              callback=lambda i, row: print(i, flush=True) and False, **KILL_KW)
print("done", flush=True)
"""
# 240 chunks of one iteration: many saves, so that kills land between and inside them, and
# enough of them that the run is far from its end when the kill comes
KILL_KW = dict(iterations=80, batch_size=4, chunk=1, seed=7, flip=True, lr=0.1)


def test_deepinversion_resumes_after_sigkill(tmp_path):
    straight = D.deepinversion(teacher(), 12, student=student(), **KILL_KW)
    for trial, after in enumerate([2, 13, 31]):
        ck = str(tmp_path / f"k{trial}.safetensors")
        proc = subprocess.Popen([sys.executable, "-c", KILLED, HERE, ck, str(kdcore.get_num_threads())],
                                stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(after + 1):
                line = proc.stdout.readline()
                assert line and line != "done\n", "the run ended before the kill"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        st = kdcore.load(ck)   # never torn: the last completed save
        assert len(st["history"]["batch"]) >= after + 1
        # each save fsyncs: the resumed run saves only at the ends of batches
        res = D.deepinversion(teacher(), 12, student=student(), checkpoint=ck, resume=True, checkpoint_every=100,
                              **KILL_KW)
        assert_same_result(straight, res)
        assert [f for f in os.listdir(tmp_path) if ".tmp." in f] == []
