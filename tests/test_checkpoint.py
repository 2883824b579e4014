"""Checkpoints: safetensors round trips and interop with the `safetensors` package both ways,
one hand-made hostile file per reader rule (also refused by safetensors itself), truncated
files, atomic writes under SIGKILL, loads that do not match the models (named, nothing
changed), and resume exactness: N epochs straight == K epochs + checkpoint + resume in new
objects / a new process, bitwise, for fit, distill (kd, learned gates), mutual and SLKD."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import kdcore
from kdcore import _kdcore

# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, c = 192, 4
    y = rng.integers(0, c, n)
    X = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    X[np.arange(n), 0, y, :] += 1.5
    tr = kdcore.datasets.from_arrays(X[:128], y[:128], num_classes=c)
    te = kdcore.datasets.from_arrays(X[128:], y[128:], num_classes=c, normalize=(tr.mean, tr.std))
    return tr, te


def net(seed=0, h=16):
    """Dropout and BN: every kind of state a resume has to carry (running stats, counters,
    dropout masks from the step seeds)."""
    return kdcore.models.mlp([64, h, 4], dropout=0.2, batchnorm=True, seed=seed)


KW = dict(batch_size=32, progress=False, seed=5)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def assert_same_history(ha, hb):
    assert set(ha) == set(hb)
    for k in ha:
        if k != "time":
            assert ha[k] == hb[k], k


def tmp_files(d):
    return [f for f in os.listdir(d) if ".tmp." in f]


# ---------------------------------------------------------------------------------------
# round trips and interop


def test_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(1)
    tensors = [
        ("f32", rng.normal(size=(3, 4, 5)).astype(np.float32)),
        ("f32/scalar", np.array(2.5, np.float32)),
        ("f32/empty", np.zeros((0, 7), np.float32)),
        ("i64", rng.integers(-2**62, 2**62, size=(6,), dtype=np.int64)),
        ("i64/scalar", np.array(-3, np.int64)),
        ("u8", rng.integers(0, 256, size=(2, 3, 4, 5), dtype=np.uint8)),
        ("special \"quotes\" \\ é 😀", np.array([np.inf, -np.inf, np.nan, -0.0], np.float32)),
    ]
    meta = {"epoch": "3", "json": json.dumps({"a": [1, 2.5], "s": "x\"y"}), "ctl": "tab\tnewline\n\x01", "é": "😀"}
    p = str(tmp_path / "rt.safetensors")
    _kdcore.ckpt_write(p, tensors, meta)
    got, gmeta = _kdcore.ckpt_read(p)
    assert list(got) == [n for n, _ in tensors]
    for name, v in tensors:
        assert got[name].dtype == v.dtype and got[name].shape == v.shape, name
        np.testing.assert_array_equal(got[name], v, err_msg=name)
        assert got[name].flags.writeable and got[name].flags.owndata   # copies, not views of a buffer
    assert gmeta == meta
    assert tmp_files(tmp_path) == []
    # the data section is 8-byte aligned (header padded with spaces)
    raw = open(p, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert hlen % 8 == 0 and raw[8 + hlen - 1:8 + hlen] in (b" ", b"}")


def test_write_refuses_bad_arguments(tmp_path):
    p = str(tmp_path / "x.safetensors")
    ok = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="'w' must have dtype float32, int64 or uint8.*float64"):
        _kdcore.ckpt_write(p, [("w", np.zeros(3))])
    with pytest.raises(TypeError, match="'w' must have dtype.*>f4"):
        _kdcore.ckpt_write(p, [("w", np.zeros(3, ">f4"))])
    with pytest.raises(TypeError, match="'w' must be C-contiguous"):
        _kdcore.ckpt_write(p, [("w", np.zeros((4, 4), np.float32)[:, ::2])])
    with pytest.raises(TypeError, match="'w' must be a numpy.ndarray"):
        _kdcore.ckpt_write(p, [("w", [1.0, 2.0])])
    with pytest.raises(TypeError, match="name must be a str"):
        _kdcore.ckpt_write(p, [(1, ok)])
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a \(name, array\) pair"):
        _kdcore.ckpt_write(p, [ok])
    with pytest.raises(ValueError, match="NUL"):
        _kdcore.ckpt_write(p, [("a\0b", ok)])
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        _kdcore.ckpt_write(p, [("a", ok), ("a", ok)])
    with pytest.raises(ValueError, match="reserved"):
        _kdcore.ckpt_write(p, [("__metadata__", ok)])
    with pytest.raises(TypeError, match="metadata must map str to str"):
        _kdcore.ckpt_write(p, [("a", ok)], {"epoch": 3})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        _kdcore.ckpt_write(p, [("a", ok)], [("epoch", "3")])
    with pytest.raises(OSError, match="No such file or directory"):
        _kdcore.ckpt_write(str(tmp_path / "missing" / "x.safetensors"), [("a", ok)])
    os.mkdir(tmp_path / "adir")   # the rename fails after the temporary file is complete
    with pytest.raises(OSError, match="adir' \\(renaming the temporary file onto it\\): Is a directory"):
        _kdcore.ckpt_write(str(tmp_path / "adir"), [("a", ok)])
    assert tmp_files(tmp_path) == []
    assert not os.path.exists(p)
    m = net()
    with pytest.raises(TypeError, match="reserved"):
        kdcore.save(p, m, metadata=1)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        kdcore.save(p, m, thing=object())
    with pytest.raises(TypeError, match="must be a bound optimizer"):
        kdcore.save(p, m, kdcore.optim.SGD())
    with pytest.raises(TypeError, match="models must be"):
        kdcore.save(p, [m])
    assert not os.path.exists(p)


def test_kdcore_files_load_with_safetensors(tmp_path, data):
    m = net(1)
    opt = kdcore.optim.Adam(lr=1e-3).bind(m)
    kdcore.fit(m, data[0], epochs=1, optimizer=kdcore.optim.Adam(lr=1e-3), **KW)
    m.forward(np.zeros((2, 64), np.float32))   # any optimizer state will do: step once by hand
    m.backward(np.ones((2, 4), np.float32))
    opt.step(1e-3)
    p = str(tmp_path / "k.safetensors")
    gates = np.array([0.25, 0.75], np.float32)
    kdcore.save(p, {"student": m}, {"student": opt}, epoch=7, note="hi", gates=gates)
    st = load_file(p)
    sd = m.state_dict()
    assert set(st) == {f"model/student/{k}" for k in sd} | {"optim/student/state0", "optim/student/state1",
                                                           "optim/student/steps", "state/gates"}
    for k, v in sd.items():
        np.testing.assert_array_equal(st[f"model/student/{k}"], v)
        assert st[f"model/student/{k}"].dtype == v.dtype and st[f"model/student/{k}"].shape == v.shape
    np.testing.assert_array_equal(st["optim/student/state0"], opt.state(0))
    np.testing.assert_array_equal(st["optim/student/state1"], opt.state(1))
    assert int(st["optim/student/steps"]) == 1
    np.testing.assert_array_equal(st["state/gates"], gates)
    with safe_open(p, "np") as f:
        meta = f.metadata()
    assert meta["format"] == "kdcore.checkpoint" and meta["kdcore_version"] == kdcore.__version__
    assert json.loads(meta["state"]) == {"epoch": 7, "note": "hi"}
    arch = json.loads(meta["architecture"])["student"]
    assert arch["class"] == "Sequential" and "Linear" in arch["repr"]
    back = kdcore.load(p)
    assert back["epoch"] == 7 and back["note"] == "hi" and back["optimizers"]["student"]["steps"] == 1
    np.testing.assert_array_equal(back["gates"], gates)


def test_safetensors_files_load_with_kdcore(tmp_path, data):
    rng = np.random.default_rng(2)
    arrays = {f"t_{np.dtype(dt).name}": rng.integers(0, 100, size=(3, 2)).astype(dt)
              for dt in (np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8,
                         np.uint8, np.uint16, np.uint32, np.uint64)}
    arrays["scalar"] = np.array(4, np.int64)
    arrays["empty"] = np.zeros((0, 3), np.float32)
    p = str(tmp_path / "s.safetensors")
    save_file(arrays, p, metadata={"who": "safetensors", "é": "ü"})
    got, meta = _kdcore.ckpt_read(p)
    assert meta == {"who": "safetensors", "é": "ü"}
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    # a model's state dict saved by safetensors loads into a kdcore model (a plain file: the
    # whole file is the single model's state dict)
    a, b = net(3), net(4)
    kdcore.fit(a, data[0], epochs=1, **KW)
    p2 = str(tmp_path / "sd.safetensors")
    save_file(dict(a.state_dict()), p2)
    kdcore.load(p2, b)
    assert_same_state(a, b)


# ---------------------------------------------------------------------------------------
# hostile files: one per reader rule


def raw_file(header, data=b"", hlen=None):
    hb = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data


E = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
Z8 = bytes(8)
HOSTILE = [   # (id, file bytes, rule in the message, also refused by the safetensors package)
    ("short", b"\x10\0\0", "shorter than 8 bytes", True),
    ("header-too-large", raw_file(E, Z8, hlen=100_000_001), "exceeds the limit", True),
    ("header-beyond-file", raw_file(E, b"", hlen=len(E) + 100), "runs beyond the end of the file", True),
    ("json-eof", raw_file(E[:-1], Z8), "not valid JSON", True),
    ("json-negative", raw_file(E.replace("[2]", "[-2]"), Z8), "not valid JSON", True),
    ("json-float", raw_file(E.replace("[2]", "[2.0]"), Z8), "only integers", True),
    ("json-depth", raw_file('{"__metadata__":{"x":' + "[" * 100 + "]" * 100 + "}}"), "nesting deeper", True),
    ("json-utf8", raw_file(E.encode().replace(b'"a"', b'"a\xff"'), Z8), "invalid UTF-8", True),
    ("not-an-object", raw_file("[1]"), "not a JSON object", True),
    ("duplicate-name", raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', Z8),
     "duplicate tensor name 'a'", True),
    ("dtype", raw_file(E.replace("F32", "X9"), Z8), "not in the allow-list", True),
    ("entry-keys", raw_file(E.replace("]}}", "],\"x\":1}}"), Z8), "exactly dtype, shape and data_offsets", False),
    ("shape-entries", raw_file(E.replace("[2]", '["2"]'), Z8), "non-negative integers", True),
    ("shape-overflow", raw_file(E.replace("[2]", "[4294967296,4294967296,4]"), Z8), "overflows size_t", True),
    ("offsets-order", raw_file(E.replace("[0,8]", "[8,0]"), Z8), "begin <= end", True),
    ("offsets-beyond", raw_file(E, bytes(4)), "beyond the data section", True),
    ("offsets-size", raw_file(E.replace("[2]", "[3]"), Z8), "shape x dtype needs 12", True),
    ("overlap", raw_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                         '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12)), "overlap", True),
    ("gap", raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                     '"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', bytes(12)),
     "bytes [4, 8) of the data section are not covered", True),
    ("trailing-bytes", raw_file(E, bytes(12)), "bytes [8, 12) of the data section are not covered", True),
    ("metadata-values", raw_file('{"__metadata__":{"a":1}}'), "__metadata__ must be an object of strings", True),
    ("metadata-object", raw_file('{"__metadata__":["a"]}'), "__metadata__ must be an object of strings", True),
]


@pytest.mark.parametrize("name, blob, rule, st_refuses", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_file_refused(tmp_path, name, blob, rule, st_refuses):
    p = str(tmp_path / f"{name}.safetensors")
    with open(p, "wb") as f:
        f.write(blob)
    with pytest.raises(OSError) as e:
        _kdcore.ckpt_read(p)
    assert rule in str(e.value) and p in str(e.value), str(e.value)
    with pytest.raises(OSError, match="kd_ckpt_open"):
        kdcore.load(p, net())
    if st_refuses:   # the reference implementation agrees the file is malformed
        with pytest.raises(Exception):
            load_file(p)


def test_truncated_files_refused(tmp_path, data):
    m = net()
    kdcore.fit(m, data[0], epochs=1, **KW)
    p = str(tmp_path / "full.safetensors")
    kdcore.save(p, m, epoch=0)
    raw = open(p, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    cuts = sorted({0, 1, 7, 8, 9, 8 + hlen // 2, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, len(raw) - 4, len(raw) - 1} |
                  set(np.random.default_rng(0).integers(0, len(raw), 30).tolist()))
    q = str(tmp_path / "cut.safetensors")
    before = m.state_dict()
    for k in cuts:
        with open(q, "wb") as f:
            f.write(raw[:k])
        with pytest.raises(OSError):
            kdcore.load(q, m)
    for k, v in before.items():
        np.testing.assert_array_equal(m.state_dict()[k], v)
    kdcore.load(p, m)


# ---------------------------------------------------------------------------------------
# atomic writes

SAVER = textwrap.dedent("""
    import sys, time, numpy as np, kdcore
    path = sys.argv[1]
    m = kdcore.models.mlp([8, 4], seed=0)
    blob = np.empty(6_000_000, np.float32)   # 24 MB: each save takes a while, so kills land inside one
    i = 0
    while True:
        blob.fill(i)
        t0 = time.perf_counter()
        kdcore.save(path, m, blob=blob, i=i)
        print(i, time.perf_counter() - t0, flush=True)
        i += 1
""")


def test_sigkill_during_save_keeps_last_checkpoint(tmp_path):
    p = str(tmp_path / "ck.safetensors")
    durations = []
    for trial, delay in enumerate([0.0, 0.011, 0.023, 0.037, 0.053, 0.079]):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, p], stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline().split()   # one complete save, then kill during a later one
            assert first, "the saver died"
            durations.append(float(first[1]))
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            lines = [first] + [ln.split() for ln in proc.stdout.read().splitlines() if ln.strip()]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        last = int(lines[-1][0])
        # loads: never torn. A kill between naming the finished temporary file and renaming
        # it leaves the name behind; the next load (or save) of the path removes it.
        st = kdcore.load(p)
        # the file holds the last reported save, or one that completed just before the kill
        assert st["i"] in (last, last + 1), (trial, st["i"], last)
        assert st["blob"].shape == (6_000_000,) and np.all(st["blob"] == st["i"])
        assert tmp_files(tmp_path) == [], f"trial {trial}: temporary files left: {tmp_files(tmp_path)}"
    assert np.median(durations) > 0.002, f"saves too fast to be interrupted: {durations}"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    p = str(tmp_path / "ck.safetensors")
    kdcore.save(p, kdcore.models.mlp([4, 3], seed=0))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # a pid that is not alive any more
    names = {f"ck.safetensors.tmp.{dead.pid}.0": False,     # the dead writer's: removed
             f"ck.safetensors.tmp.{os.getpid()}.7": True,   # this process's: kept
             "ck.safetensors.tmp.1.0": True,                # a live process's (init): kept
             f"ck.safetensors.tmp.{dead.pid}.x": True,      # not the writer's form: kept
             f"other.safetensors.tmp.{dead.pid}.0": True}   # another path's: kept
    for op in ("load", "save"):
        for n in names:
            (tmp_path / n).write_bytes(b"x")
        if op == "load":
            kdcore.load(p)
        else:
            kdcore.save(p, kdcore.models.mlp([4, 3], seed=0))
        for n, kept in names.items():
            assert (tmp_path / n).exists() == kept, (op, n)
            if kept:
                (tmp_path / n).unlink()


# ---------------------------------------------------------------------------------------
# loading into models that do not match


def test_mismatching_load_names_tensors_and_changes_nothing(tmp_path, data):
    src = net(1)
    kdcore.fit(src, data[0], epochs=1, **KW)
    sgd = kdcore.optim.SGD(lr=0.1).bind(src)
    p = str(tmp_path / "c.safetensors")
    kdcore.save(p, src, sgd, epoch=0)

    def check_untouched(model, opt, fn):
        sd = model.state_dict()
        s0 = None if opt is None else opt.state(0).copy()
        steps = None if opt is None else opt.steps()
        fn()
        for k, v in sd.items():
            np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)
        if opt is not None:
            np.testing.assert_array_equal(opt.state(0), s0)
            assert opt.steps() == steps

    wide = net(2, h=24)   # mis-shaped
    with pytest.raises(kdcore.CheckpointMismatch) as e:
        check_untouched(wide, None, lambda: kdcore.load(p, wide))
    msg = str(e.value)
    assert "the model's '1.weight' (model/model/1.weight) is float32[16, 64] in the file, expected float32[24, 64]" in msg
    assert "model/model/2.running_mean" in msg and "nothing was loaded" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)

    plain = kdcore.models.mlp([64, 16, 4], seed=3)   # no BN: missing and unexpected names
    with pytest.raises(KeyError) as e:
        check_untouched(plain, None, lambda: kdcore.load(p, plain))
    msg = str(e.value)
    assert "unexpected" in msg and "model/model/2.running_var" in msg and "model/model/2.num_batches_tracked" in msg
    assert "missing" in msg and "model/model/3.weight" in msg

    same = net(4)   # right model, wrong optimizer kind: Adam has a second moment
    adam = kdcore.optim.Adam().bind(same)
    with pytest.raises(KeyError, match=r"missing 1: the model's optimizer second moment \(optim/model/state1\)"):
        check_untouched(same, adam, lambda: kdcore.load(p, same, adam))
    with pytest.raises(ValueError, match=r"missing 1: the student \(model/student/\*; the file has models: model\)"):
        check_untouched(same, None, lambda: kdcore.load(p, {"student": same}))

    # non-finite values are refused before anything is written
    bad = dict(load_file(p))
    bad["model/model/5.bias"] = bad["model/model/5.bias"].copy()
    bad["model/model/5.bias"][1] = np.nan
    q = str(tmp_path / "nan.safetensors")
    save_file(bad, q, metadata=safe_open(p, "np").metadata())
    sgd2 = kdcore.optim.SGD(lr=0.1).bind(same)
    with pytest.raises(ValueError, match=r"the model's '5.bias' \(model/model/5.bias\) contains NaN or Inf"):
        check_untouched(same, sgd2, lambda: kdcore.load(q, same, sgd2))

    # several models in a file and one Module given: which one is ambiguous
    two = str(tmp_path / "two.safetensors")
    kdcore.save(two, {"student": net(5), "sl0": net(6)})
    with pytest.raises(KeyError, match="holds 2 models \\(sl0, student\\); pass models="):
        kdcore.load(two, same)
    # a subset of the roles is fine for load
    kdcore.load(two, {"sl0": same})

    # a matching load works and restores everything
    tgt = net(9)
    sgd3 = kdcore.optim.SGD(lr=0.1).bind(tgt)
    st = kdcore.load(p, tgt, sgd3)
    assert st["epoch"] == 0
    assert_same_state(src, tgt)
    np.testing.assert_array_equal(sgd3.state(0), sgd.state(0))


def test_non_affine_batchnorm_round_trip(tmp_path):
    """A generator whose last BN has no affine parameters (DAFL's layout): the file holds that
    BN's running statistics and count but no weight or bias, the model and the Adam state come
    back bitwise, and a generator with an affine last BN is refused naming what is missing."""
    rng = np.random.default_rng(0)
    src = kdcore.models.dafl_generator(latent_dim=8, img_size=8, channels=2, width=8, seed=1)
    adam = kdcore.optim.Adam(lr=0.01).bind(src)
    z = rng.standard_normal((6, 8)).astype(np.float32)
    out = src.train()(z)
    src.backward(rng.standard_normal(out.shape).astype(np.float32))
    adam.step(0.01)
    p = str(tmp_path / "g.safetensors")
    kdcore.save(p, src, adam, epoch=1)
    names = set(load_file(p))
    assert {"model/model/13.running_mean", "model/model/13.running_var", "model/model/13.num_batches_tracked"} <= names
    assert not {"model/model/13.weight", "model/model/13.bias"} & names
    tgt = kdcore.models.dafl_generator(latent_dim=8, img_size=8, channels=2, width=8, seed=2)
    adam2 = kdcore.optim.Adam(lr=0.01).bind(tgt)
    assert kdcore.load(p, tgt, adam2)["epoch"] == 1
    assert_same_state(src, tgt)
    for which in (0, 1):
        np.testing.assert_array_equal(adam2.state(which), adam.state(which))
    affine = kdcore.models.dafl_generator(latent_dim=8, img_size=8, channels=2, width=8, affine_last=True)
    with pytest.raises(KeyError, match=r"missing.*model/model/13\.weight"):
        kdcore.load(p, affine)


# ---------------------------------------------------------------------------------------
# resume exactness

RESUMER = textwrap.dedent("""
    import sys, numpy as np, kdcore
    ck, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kdcore.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n, c = 192, 4
    y = rng.integers(0, c, n)
    X = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    X[np.arange(n), 0, y, :] += 1.5
    tr = kdcore.datasets.from_arrays(X[:128], y[:128], num_classes=c)
    m = kdcore.models.mlp([64, 16, 4], dropout=0.2, batchnorm=True, seed=77)   # other init: all comes from ck
    h = kdcore.fit(m, tr, epochs=4, batch_size=32, progress=False, seed=5, augment=True,
                   optimizer=kdcore.optim.SGD(lr=0.05, nesterov=True), schedule="cosine",
                   checkpoint=ck, resume=True)
    kdcore.save(out, m, history=dict(h))
""")


def test_fit_resume_in_new_process_is_bitwise(tmp_path, data):
    """4 epochs straight == a 4-epoch run stopped after epoch 2 (the callback) + resume in a
    new process. The cosine schedule depends on the total epochs, so the interrupted run
    must be planned for 4 as well; augmentation, dropout, BN and Nesterov momentum all carry
    state or randomness across the boundary."""
    tr, _ = data
    fkw = dict(epochs=4, batch_size=32, progress=False, seed=5, augment=True, schedule="cosine")
    a = net(1)
    ha = kdcore.fit(a, tr, optimizer=kdcore.optim.SGD(lr=0.05, nesterov=True), **fkw)
    ck = str(tmp_path / "run.safetensors")
    b = net(1)
    hb = kdcore.fit(b, tr, optimizer=kdcore.optim.SGD(lr=0.05, nesterov=True), checkpoint=ck,
                    checkpoint_every=3, callback=lambda e, row: e == 1, **fkw)
    assert hb.epochs == 2 and kdcore.load(ck)["epoch"] == 1   # saved on the early stop
    out = str(tmp_path / "out.safetensors")
    subprocess.run([sys.executable, "-c", RESUMER, ck, out, str(kdcore.get_num_threads())], check=True, timeout=120)
    c = net(8)
    st = kdcore.load(out, c)
    assert_same_state(a, c)
    assert_same_history(ha, st["history"])


def test_fit_resume_extends_run_and_handles_missing_file(tmp_path, data):
    """Constant schedule: 2 epochs, then the same call with epochs=4 and resume, in new
    objects, with Adam. A resume with no checkpoint file yet starts from scratch."""
    tr, te = data
    fkw = dict(batch_size=32, progress=False, seed=5, val=te)
    a = net(1)
    ha = kdcore.fit(a, tr, epochs=4, optimizer=kdcore.optim.Adam(lr=3e-3), **fkw)
    ck = str(tmp_path / "run.safetensors")
    b = net(1)
    kdcore.fit(b, tr, epochs=2, optimizer=kdcore.optim.Adam(lr=3e-3), checkpoint=ck, resume=True, **fkw)
    c = net(2)
    hc = kdcore.fit(c, tr, epochs=4, optimizer=kdcore.optim.Adam(lr=3e-3), checkpoint=ck, resume=True, **fkw)
    assert_same_state(a, c)
    assert_same_history(ha, hc)
    assert c.history is hc and hc.epochs == 4
    # already complete: nothing runs, the model is the checkpoint's
    d = net(3)
    hd = kdcore.fit(d, tr, epochs=4, optimizer=kdcore.optim.Adam(lr=3e-3), checkpoint=ck, resume=True, **fkw)
    assert_same_state(a, d)
    assert hd.epochs == 4
    # changed settings are reported
    e = net(3)
    with pytest.warns(RuntimeWarning, match="different settings \\(optimizer, schedule\\)"):
        kdcore.fit(e, tr, epochs=5, optimizer=kdcore.optim.Adam(lr=1e-3), checkpoint=ck, resume=True, **fkw)


def test_checkpoint_every_and_best(tmp_path, data):
    tr, te = data
    ck = str(tmp_path / "r.safetensors")
    seen = []
    orig = kdcore.checkpoint.save

    def spy(path, *a, **k):
        seen.append((os.path.basename(path), k["epoch"]))
        return orig(path, *a, **k)

    kdcore.checkpoint.save = spy
    try:
        h = kdcore.fit(net(1), tr, epochs=5, val=te, checkpoint=ck, checkpoint_every=2, checkpoint_best=True, **KW)
    finally:
        kdcore.checkpoint.save = orig
    regular = [e for f, e in seen if f == "r.safetensors"]
    best = [e for f, e in seen if f == "r-best.safetensors"]
    assert regular == [1, 3, 4]   # every 2 epochs and the last
    acc = h["val_acc"]
    assert best == [e for e in range(5) if acc[e] > max(acc[:e], default=-1)]
    assert kdcore.load(str(tmp_path / "r-best.safetensors"))["epoch"] == h.best_epoch
    assert tmp_files(tmp_path) == []
    with pytest.raises(ValueError, match="need checkpoint"):
        kdcore.fit(net(1), tr, epochs=1, resume=True, **KW)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        kdcore.fit(net(1), tr, epochs=1, checkpoint=3, **KW)


@pytest.fixture(scope="module")
def teachers(data):
    ts = [kdcore.models.mlp([64, 32, 4], seed=20 + i) for i in range(2)]
    for t in ts:
        kdcore.fit(t, data[0], epochs=2, **KW)
    return ts


def test_distill_kd_resume_is_bitwise(tmp_path, data, teachers):
    tr, te = data
    dkw = dict(method="kd", batch_size=32, progress=False, seed=5, val=te, augment={"hflip": True})
    a = net(1)
    ha = kdcore.distill(a, teachers[0], tr, epochs=4, **dkw)
    ck = str(tmp_path / "d.safetensors")
    kdcore.distill(net(1), teachers[0], tr, epochs=4, checkpoint=ck, callback=lambda e, r: e == 1, **dkw)
    c = net(6)
    hc = kdcore.distill(c, teachers[0], tr, epochs=4, checkpoint=ck, resume=True, **dkw)
    assert_same_state(a, c)
    assert_same_history(ha, hc)


def test_distill_learned_gates_resume_is_bitwise(tmp_path, data, teachers):
    tr, _ = data
    dkw = dict(method="kd", batch_size=32, progress=False, seed=5, learn_gates=True, gate_lr=0.5)
    a = net(1)
    ha = kdcore.distill(a, teachers, tr, epochs=3, **dkw)
    ck = str(tmp_path / "g.safetensors")
    kdcore.distill(net(1), teachers, tr, epochs=1, checkpoint=ck, **dkw)
    assert kdcore.load(ck)["gates"].shape == (2,)
    c = net(6)
    hc = kdcore.distill(c, teachers, tr, epochs=3, checkpoint=ck, resume=True, **dkw)
    assert_same_state(a, c)
    assert hc["teacher_weights"] == ha["teacher_weights"]
    assert_same_history(ha, hc)


def test_mutual_and_slkd_resume_are_bitwise(tmp_path, data, teachers):
    tr, _ = data
    mkw = dict(batch_size=32, progress=False, seed=5, epochs=3)
    peers = [net(1), net(2)]
    ha = kdcore.mutual(peers, tr, **mkw)
    ck = str(tmp_path / "m.safetensors")
    kdcore.mutual([net(1), net(2)], tr, checkpoint=ck, callback=lambda e, r: e == 0, **mkw)
    peers2 = [net(11), net(12)]
    hb = kdcore.mutual(peers2, tr, checkpoint=ck, resume=True, **mkw)
    for x, y in zip(peers, peers2):
        assert_same_state(x, y)
    assert_same_history(ha, hb)

    t = teachers[0]
    skw = dict(batch_size=32, progress=False, seed=5, epochs=3, n_sl=2)
    s, sls = net(1), [t.fresh(seed=40), t.fresh(seed=41)]
    hs = kdcore.slkd(s, t, tr, sl_teachers=sls, **skw)
    ck2 = str(tmp_path / "s.safetensors")
    kdcore.slkd(net(1), t, tr, sl_teachers=[t.fresh(seed=40), t.fresh(seed=41)], checkpoint=ck2,
                callback=lambda e, r: e == 0, **skw)
    assert sorted(kdcore.load(ck2)["models"]) == ["sl0", "sl1", "student"]
    s2, sls2 = net(3), [t.fresh(seed=50), t.fresh(seed=51)]
    hs2 = kdcore.slkd(s2, t, tr, sl_teachers=sls2, checkpoint=ck2, resume=True, **skw)
    for x, y in zip([s] + sls, [s2] + sls2):
        assert_same_state(x, y)
    assert_same_history(hs, hs2)
    # a checkpoint of a 2-SL-teacher run does not resume a 1-SL-teacher run, and nothing changes
    s3 = net(3)
    before = s3.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(KeyError, match=r"unexpected 1: a model this run does not train, the sl1 \(model/sl1/\*\)"):
            kdcore.slkd(s3, t, tr, sl_teachers=[t.fresh(seed=50)], checkpoint=ck2, resume=True,
                        **dict(skw, n_sl=1))
    for k, v in before.items():
        np.testing.assert_array_equal(s3.state_dict()[k], v)


# ---- PyTorch files: weights only ----------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls a function: what weights_only=True must refuse."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_torch_state_dict_into_the_twin(tmp_path):
    import torch
    m = kdcore.models.mlp([12, 7, 3], seed=4)
    sd = m.state_dict()
    # A PyTorch model with kdcore's key names, different weights: loading must make them equal.
    tsd = {k: torch.randn(v.shape) for k, v in sd.items()}
    p = str(tmp_path / "w.pt")
    torch.save(tsd, p)
    kdcore.load_torch(p, m)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, tsd[k].numpy())
    torch.save({"model": tsd, "epoch": 240}, p)                  # RepDistiller's layout
    m2 = kdcore.models.mlp([12, 7, 3], seed=5)
    kdcore.load_torch(p, m2, key="model")
    np.testing.assert_array_equal(m2.state_dict()[next(iter(sd))], tsd[next(iter(sd))].numpy())
    with pytest.raises(KeyError, match="key 'state_dict' is not an entry"):
        kdcore.load_torch(p, m2, key="state_dict")
    with pytest.raises(KeyError, match="unexpected keys: \\['epoch', 'model'\\]"):
        kdcore.load_torch(p, m2)                                   # nested, and no key given
    torch.save([tsd], p)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        kdcore.load_torch(p, m2)


def test_load_torch_never_runs_code(tmp_path):
    import torch
    marker = tmp_path / "pwned"
    p = str(tmp_path / "evil.pt")
    torch.save({"weight": _RunsCode(str(marker))}, p)
    m = kdcore.models.mlp([12, 7, 3], seed=4)
    before = m.state_dict()
    with pytest.raises(ValueError, match="evil.pt is not a weights-only PyTorch state dict"):
        kdcore.load_torch(p, m)
    assert not marker.exists()
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_torch_bad_files_and_arguments(tmp_path):
    import torch
    m = kdcore.models.mlp([12, 7, 3], seed=4)
    p = tmp_path / "cut.pt"
    torch.save({k: torch.zeros(v.shape) for k, v in m.state_dict().items()}, str(p))
    p.write_bytes(p.read_bytes()[:100])                           # truncated
    with pytest.raises(ValueError, match="cut.pt"):
        kdcore.load_torch(str(p), m)
    with pytest.raises((OSError, ValueError)):
        kdcore.load_torch(str(tmp_path / "missing.pt"), m)
    with pytest.raises(TypeError, match="model"):
        kdcore.load_torch(str(p), "model")
    with pytest.raises(TypeError, match="path"):
        kdcore.load_torch(3, m)
    with pytest.raises(TypeError, match="key"):
        kdcore.load_torch(str(p), m, key=1)
