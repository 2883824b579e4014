"""The non-finite policy (nonfinite='raise' | 'skip') of fit / distill / mutual / slkd /
multi_exit and the schemes.

The breakage is honest: one training sample holds huge but finite values (3e38; the Dataset
refuses NaN/Inf, not large numbers), and the models' first Linear has positive weights, so
that sample's activations overflow to Inf in the forward pass and its loss is NaN. (The C
tests in tests/c/test_nonfinite.c also cover a finite loss with an Inf gradient.)

raise: a RuntimeError naming the term, the network, the epoch and the step.
skip: running max_steps = s + 1 (step s holds the poisoned sample) leaves the models, the
optimizer states (moments, step counts), the BN statistics and the learned gates bitwise
where max_steps = s leaves them -- compared tensor by tensor in the checkpoints the runs
write -- and the History counts the dropped step; training goes on after it.
"""
import re

import numpy as np
import pytest

import kdcore
from kdcore import _kdcore

POISON = 37


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    n, c = 128, 4
    y = rng.integers(0, c, n)
    X = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    X[np.arange(n), 0, y, :] += 1.5
    clean = kdcore.datasets.from_arrays(X, y, num_classes=c, normalize=None)
    Xp = X.copy()
    Xp[POISON] = 3e38
    poisoned = kdcore.datasets.from_arrays(Xp, y, num_classes=c, normalize=None)
    return clean, poisoned


def mlp(seed=0, bn=True):
    """First Linear with positive weights: 64 features of 3e38 sum past FLT_MAX."""
    m = kdcore.models.mlp([64, 16, 4], batchnorm=bn, seed=seed)
    sd = m.state_dict()
    sd["1.weight"] = np.abs(sd["1.weight"]) + np.float32(0.01)
    m.load_state_dict(sd)
    return m


KW = dict(batch_size=16, progress=False, seed=4, optimizer=kdcore.optim.SGD(lr=0.05, momentum=0.9))
STEP_RE = r"at epoch 0, step (\d+)"


def bad_step(run):
    """The step holding the poisoned sample, from the raise policy's message."""
    with pytest.raises(RuntimeError, match=STEP_RE) as e:
        run("raise")
    return int(re.search(STEP_RE, str(e.value)).group(1)), str(e.value)


def ckpt_tensors(path):
    tensors, _ = _kdcore.ckpt_read(str(path))
    return tensors


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def check_skip_is_noop(tmp_path, run, roles):
    """run(policy, max_steps, checkpoint) -> History. Returns the dropped step."""
    s, msg = bad_step(lambda p: run(p, None, None))
    assert s > 0, msg
    before = tmp_path / "before.safetensors"
    over = tmp_path / "over.safetensors"
    hb = run("skip", s, before)
    ho = run("skip", s + 1, over)
    assert hb["skipped_steps"] == [0] and ho["skipped_steps"] == [1]
    a, b = ckpt_tensors(before), ckpt_tensors(over)
    assert {k.split("/")[1] for k in a if k.startswith("model/")} == set(roles)
    assert any(k.startswith("optim/") and k.endswith("/steps") for k in a)
    assert_same_tensors(a, b)
    return s, msg


def test_fit_raise_and_skip(tmp_path, data):
    _, bad = data

    def run(policy, max_steps, ck):
        return kdcore.fit(mlp(), bad, epochs=1, max_steps=max_steps, checkpoint=ck, nonfinite=policy, **KW)

    s, msg = check_skip_is_noop(tmp_path, run, ["model"])
    assert msg.startswith("kd_distill_epoch: cross-entropy of the model is not finite at epoch 0, step ")
    # the BN statistics really moved in the steps that ran (so their restore is tested)
    sd = kdcore.load(str(tmp_path / "over.safetensors"))
    assert sd["history"]["skipped_steps"] == [1]
    # training goes on: three epochs, one dropped step each, finite weights that keep changing
    m = mlp()
    h = kdcore.fit(m, bad, epochs=3, nonfinite="skip", **KW)
    assert h["skipped_steps"] == [1, 1, 1]
    assert all(np.isfinite(v).all() for v in m.state_dict().values())
    assert all(np.isfinite(h["train_loss"]))
    m0 = mlp()
    kdcore.fit(m0, bad, epochs=1, max_steps=s, nonfinite="skip", **KW)
    assert not np.array_equal(m.state_dict()["4.weight"], m0.state_dict()["4.weight"])
    # a clean dataset: nothing skipped, same bits under either policy
    clean = data[0]
    ma, mb = mlp(), mlp()
    ha = kdcore.fit(ma, clean, epochs=1, **KW)
    hb = kdcore.fit(mb, clean, epochs=1, nonfinite="skip", **KW)
    assert ha["skipped_steps"] == hb["skipped_steps"] == [0]
    for k, v in ma.state_dict().items():
        np.testing.assert_array_equal(v, mb.state_dict()[k], err_msg=k)


def test_distill_skip_leaves_learned_gates(tmp_path, data):
    clean, bad = data
    teachers = [mlp(seed=20, bn=False), mlp(seed=21, bn=False)]
    for t in teachers:
        kdcore.fit(t, clean, epochs=1, **KW)

    def run(policy, max_steps, ck):
        # cache=False: cached logits of the poisoned sample would be refused as non-finite
        return kdcore.distill(mlp(), teachers, bad, epochs=1, learn_gates=True, gate_lr=0.5, cache=False,
                              max_steps=max_steps, checkpoint=ck, nonfinite=policy, **KW)

    s, msg = check_skip_is_noop(tmp_path, run, ["student"])
    assert "of the student is not finite at epoch 0, step" in msg
    assert "state/gates" in ckpt_tensors(tmp_path / "over.safetensors")
    h = run("skip", None, None)
    assert h["skipped_steps"] == [1] and np.isfinite(h["teacher_weights"][0]).all()


def test_mutual_skip_drops_the_step_for_every_peer(tmp_path, data):
    _, bad = data

    def run(policy, max_steps, ck):
        return kdcore.mutual([mlp(1), mlp(2)], bad, epochs=1, max_steps=max_steps, checkpoint=ck, nonfinite=policy,
                             **KW)

    _, msg = check_skip_is_noop(tmp_path, run, ["peer0", "peer1"])
    assert "loss of the peer is not finite" in msg


def test_slkd_skip_leaves_student_and_sl_teachers(tmp_path, data):
    clean, bad = data
    t = mlp(seed=30)
    kdcore.fit(t, clean, epochs=1, **KW)

    def run(policy, max_steps, ck):
        return kdcore.slkd(mlp(), t, bad, sl_teachers=[mlp(40), mlp(41)], epochs=1, cache=False,
                           max_steps=max_steps, checkpoint=ck, nonfinite=policy, **KW)

    _, msg = check_skip_is_noop(tmp_path, run, ["student", "sl0", "sl1"])
    assert "not finite at epoch 0" in msg
    # sequential SLKD (SLKD*) passes the policy to its SL-teacher phase as well
    h = kdcore.slkd(mlp(), t, bad, sl_teachers=[mlp(40)], n_sl=1, sequential=True, epochs=1, cache=False,
                    nonfinite="skip", **KW)
    assert h["skipped_steps"] == [1]


def test_multi_exit_skip(tmp_path, data):
    """A CNN: the poisoned image's conv outputs are normalised back by BN's batch statistics
    (computed in double), but its running variance overflows -- caught by the check of the
    BN statistics."""
    _, bad = data

    def model():
        return kdcore.models.with_exits(kdcore.models.cnn(num_classes=4, input_size=8, width=4, seed=3), ["6"])

    def run(policy, max_steps, ck):
        return kdcore.multi_exit(model(), bad, epochs=1, max_steps=max_steps, checkpoint=ck, nonfinite=policy, **KW)

    _, msg = check_skip_is_noop(tmp_path, run, ["model"])
    assert "not finite at epoch 0" in msg



def test_engine_skip_restores_crd_state():
    """A step dropped after its CRD term ran leaves the bank as it was: the draw counter put
    back, and Z unset again when the dropped step was the first (Z is set by the first batch).
    A step configuration (step_epoch) with terms [CRD, CE]: CRD's embedding heads (trained
    connectors) read a frozen net whose weights on the poisoned pixels are 0, so on the
    poisoned sample the CRD term is finite and draws its negatives, while the student's logits
    overflow and its CE is not finite. Under 'raise' the bank shows that the draw (and Z) did
    happen; under 'skip', running through the dropped step leaves nets and bank bitwise where
    stopping before it does (the first step dropped: where a fresh bank is)."""
    M, KI = _kdcore.MODES, _kdcore.TERM_KINDS
    n, c, B = 32, 4, 8
    rng = np.random.default_rng(8)
    X0 = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, c, n)

    def setup(bad_step):
        X = X0.copy()
        X[bad_step * B + 3, 0, 0, :] = 3e38   # the first row of pixels of one sample of that step
        ds = kdcore.datasets.from_arrays(X, y, num_classes=c, normalize=None)
        student = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(64, c))
        student.reset_parameters(1)
        sd = student.state_dict()
        sd["1.weight"][:, :8] = 1.0          # 8 x 3e38 overflows
        student.load_state_dict(sd)
        feats = kdcore.nn.Sequential(kdcore.nn.Flatten(), kdcore.nn.Linear(64, 6))
        feats.reset_parameters(2)
        sd = feats.state_dict()
        sd["1.weight"][:, :8] = 0.0          # blind to the poisoned pixels
        feats.load_state_dict(sd)
        ks, kt = kdcore.nn.Sequential(kdcore.nn.Linear(6, 8)), kdcore.nn.Sequential(kdcore.nn.Linear(6, 8))
        ks.reset_parameters(3)
        kt.reset_parameters(4)
        bank = kdcore.functional.CRDBank(n, dim=8, n_neg=4, T=0.1, momentum=0.5, seed=4)
        return ds, (student, ks, kt), feats, bank

    def run(bad_step, policy, max_steps):
        ds, (student, ks, kt), feats, bank = setup(bad_step)
        opt = kdcore.optim.SGD(lr=0.1, momentum=0.9)
        nets = [dict(net=student.net, opt=opt.bind(student), mode=M["train"], salt=1, role="student"),
                dict(net=feats.net, mode=M["eval"], salt=2, role="features"),
                dict(net=ks.net, opt=opt.bind(ks), mode=M["train"], input=(1, -1), role="connector"),
                dict(net=kt.net, opt=opt.bind(kt), mode=M["train"], input=(1, -1), role="connector")]
        terms = [dict(kind=KI["crd"], a=(2, -1), src=[(3, -1)], grad=True, weight=0.8, bank=bank._c),
                 dict(kind=KI["ce"], a=(0, -1), weight=1.0)]
        topts = dict(batch_size=B, schedule=(0, 0.1, [], 0, 0.0, 0), shuffle=False, max_steps=max_steps,
                     nonfinite=policy)
        err = None
        try:
            st = _kdcore.step_epoch(nets, terms, ds._c, 0, topts)
        except RuntimeError as e:
            st, err = None, str(e)
        return st, err, [m.state_dict() for m in (student, ks, kt)], bank.state_dict()

    def same(a, b):
        for x, y_ in zip(a, b):
            assert sorted(x) == sorted(y_)
            for k in x:
                assert np.asarray(x[k]).tobytes() == np.asarray(y_[k]).tobytes(), k

    # the poison in step 2: the CRD term draws there (raise: the counter is at 3), and a
    # dropped step 2 leaves everything as two steps do
    _, err, _, bank = run(2, "raise", 4)
    assert "cross-entropy of the student is not finite at epoch 0, step 2" in err and int(bank["steps"]) == 3
    st_a, _, nets_a, bank_a = run(2, "skip", 2)
    st_b, _, nets_b, bank_b = run(2, "skip", 3)
    assert st_a["skipped_steps"] == 0 and st_b["skipped_steps"] == 1
    assert int(bank_b["steps"]) == 2 and np.all(np.asarray(bank_b["z"]) > 0)
    same(nets_a, nets_b)
    same([bank_a], [bank_b])
    # the poison in the first step: raise leaves Z set from that batch; skip leaves the bank fresh
    _, err, _, bank = run(0, "raise", 4)
    assert "step 0" in err and int(bank["steps"]) == 1 and np.all(np.asarray(bank["z"]) > 0)
    st_c, _, nets_c, bank_c = run(0, "skip", 1)
    ds, models, _, fresh = setup(0)
    assert st_c["skipped_steps"] == 1
    same(nets_c, [m.state_dict() for m in models])
    same([bank_c], [fresh.state_dict()])

def test_nonfinite_option_is_validated(data):
    clean, _ = data
    t = mlp(seed=5)
    for call in (lambda v: kdcore.fit(mlp(), clean, epochs=1, nonfinite=v, **KW),
                 lambda v: kdcore.distill(mlp(), t, clean, epochs=1, nonfinite=v, **KW),
                 lambda v: kdcore.mutual([mlp(1), mlp(2)], clean, epochs=1, nonfinite=v, **KW),
                 lambda v: kdcore.slkd(mlp(), t, clean, n_sl=1, epochs=1, nonfinite=v, **KW),
                 lambda v: kdcore.born_again(mlp(), clean, generations=1, epochs=1, nonfinite=v, **KW)):
        for bad_value in ("ignore", None, 1, "RAISE"):
            with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'skip'"):
                call(bad_value)
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'skip', got 'warn'"):
        _kdcore.train_epoch(t.net, kdcore.optim.SGD().bind(t), clean._c, 0,
                            dict(batch_size=8, schedule=(0, 0.1, [], 0, 0.0, 0), nonfinite="warn"))
