"""Regression tests for the validation gaps the property tests (tests/props) found in the binding
and the Python API: each used to crash, raise SystemError, or raise an error that did not name
the argument."""
import numpy as np
import pytest

import kdcore
from kdcore import _kdcore as K
from kdcore import nn


def _mlp():
    return kdcore.models.mlp([8, 6, 3], seed=0)


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8)).astype(np.float32), (np.arange(n) % 3).astype(np.int64)


def _topts(**kw):
    return dict(dict(batch_size=8, schedule=(0, 0.01, [], 1, 0.0, 0), callback=None), **kw)


def test_grad_add_with_a_0d_array_raises_instead_of_segfaulting():
    m = nn.Linear(1, 1)
    m(np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="grad"):
        m.net.grad_add(-1, np.array(1, np.float32))       # read dims[0] of a 0-d array: segfault
    with pytest.raises(ValueError, match="scale"):
        m.net.grad_add(-1, np.ones((1, 1), np.float32), float("nan"))


@pytest.mark.parametrize("call, name", [
    (lambda: K.kd_loss(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), T="4"), "T"),
    (lambda: K.cross_entropy(np.ones((2, 3), np.float32), np.zeros(2, np.int64), None), "label_smoothing"),
    (lambda: K.tolerant_loss(np.ones((2, 3), np.float32), "a"), "K"),
    (lambda: K.train_epoch(1, 2, 3, 4, 5), "net"),
    (lambda: K.evaluate(_mlp().net, 3), "data"),
    (lambda: K.Optimizer(_mlp().net, 0, None), "lr"),
    (lambda: K.Dataset(np.ones((2, 3), np.float32), num_classes=2**40), "num_classes"),
    (lambda: _mlp().net.shapes(1, "a", 1, 1), "C"),
    (lambda: K.schedule_lr((0, 0.1, [], 1, 0.0, 0), 0.1, 0, 0, "1"), "steps_per_epoch"),
])
def test_argument_parsing_errors_name_the_argument(call, name):
    # CPython's own messages ("must be real number, not str", "argument 1 must be ...") do not.
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        call()


def test_node_tuples_name_the_field_and_refuse_unknown_init_and_empty_nets():
    node = [0, "a", -1, -1, 4, 3, 0, 1, 0, 1, True, 1e-5, 0.1, 0.0, 0]
    bad = list(node)
    bad[11] = "x"
    with pytest.raises(TypeError, match=r"node 0: eps"):
        K.Net([tuple(bad)])
    bad = list(node)
    bad[14] = 99                                              # used to be accepted as an init kind
    with pytest.raises(ValueError, match="init"):
        K.Net([tuple(bad)])
    with pytest.raises(ValueError, match="nodes"):
        K.Net([])                                             # used to be a RuntimeError


def test_schedule_tuples_are_checked():
    with pytest.raises(TypeError, match="schedule"):
        K.schedule_lr([0, 0.1, [], 1, 0.0, 0], 0.1, 0, 0, 1)  # a list: used to be a SystemError
    for i, v in [(1, -0.1), (1, float("nan")), (3, -1), (4, float("inf")), (5, -2)]:
        s = [2, 0.1, [], 3, 0.0, 1]
        s[i] = v
        with pytest.raises(ValueError, match="schedule"):
            K.schedule_lr(tuple(s), 0.1, 0, 0, 1)
    with pytest.raises(ValueError, match="milestones"):
        K.schedule_lr((1, 0.1, [2, -3], 0, 0.0, 0), 0.1, 0, 0, 1)
    with pytest.raises(ValueError, match="gamma"):
        K.schedule_lr((1, 0.1, [2], 0, 0.0, 0), 0.0, 0, 0, 1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        K.schedule_lr((0, 0.1, [], 0, 0.0, 0), 0.1, 0, 0, 0)
    with pytest.raises(ValueError, match="epochs"):
        kdcore.optim.Cosine().lr(0.1, 0, 0)


@pytest.mark.parametrize("key, value, exc", [
    ("bogus", 1, ValueError), ("batch_size", 0, ValueError), ("label_smoothing", 2.0, ValueError),
    ("noise_std", -1.0, ValueError), ("crop_padding", 2**31 - 1, ValueError), ("max_steps", -1, ValueError),
    ("callback", 3, TypeError), ("drop_last", np.ones(2), TypeError), ("gamma", 0.0, ValueError),
    ("callback_every", -1, ValueError),
])
def test_training_options_name_the_key(key, value, exc):
    m = _mlp()
    X, y = _data()
    ds = K.Dataset(X, y, num_classes=3)
    with pytest.raises(exc, match=rf"\b{key}\b"):
        K.train_epoch(m.net, K.Optimizer(m.net, 0, 0.1), ds, 0, _topts(**{key: value}))
    with pytest.raises(ValueError, match="epoch"):
        K.train_epoch(m.net, K.Optimizer(m.net, 0, 0.1), ds, -1, _topts())


def test_model_lists_are_owned_while_c_runs():
    """teachers/nets/sl given as iterators: the binding used to keep borrowed pointers into a
    temporary list (freed models while the GIL was released); now lists and tuples only."""
    s, t = _mlp(), kdcore.models.mlp([8, 6, 3], seed=5)
    X, y = _data()
    ds = K.Dataset(X, y, num_classes=3)
    opt = K.Optimizer(s.net, 0, 0.1)
    with pytest.raises(TypeError, match="teachers"):
        K.distill_epoch(s.net, opt, ds, 0, _topts(), dict(kind=1), teachers=(n for n in [t.net]))
    with pytest.raises(TypeError, match="opts"):
        K.mutual_epoch([s.net, t.net], None, ds, 0, _topts())
    with pytest.raises(TypeError, match="sl_opts"):
        K.slkd_epoch(s.net, opt, [t.net], 5, ds, 0, _topts(), {})
    r = K.distill_epoch(s.net, opt, ds, 0, _topts(), dict(kind=1), teachers=(t.net,))
    assert np.isfinite(r["loss"])


def test_dataset_keeps_its_own_labels_and_has_len():
    X, y = _data()
    ds = K.Dataset(X, y, num_classes=3)
    y[:] = 99                      # checked once at construction: later changes must not reach C
    m = _mlp()
    r = K.train_epoch(m.net, K.Optimizer(m.net, 0, 0.1), ds, 0, _topts())
    assert np.isfinite(r["loss"]) and len(ds) == 16
    with pytest.raises(ValueError, match="mean and std"):
        K.Dataset(X, None, std=(1.0,))
    with pytest.raises(ValueError, match="num_classes"):
        K.Dataset(X, None, num_classes=-1)


def test_uninitialised_binding_objects_raise():
    net = K.Net.__new__(K.Net)
    for call in (lambda: net.set_output(0), lambda: net.grad_add(0, np.ones(1, np.float32)), lambda: net.tap(0),
                 lambda: net.bn_batches(0)):
        with pytest.raises(RuntimeError, match="not built"):    # used to be SystemError (NULL, no exception)
            call()
    ds = K.Dataset.__new__(K.Dataset)
    m = _mlp()
    with pytest.raises(TypeError, match="data"):
        K.exits_epoch(m.net, K.Optimizer(m.net, 0, 0.1), [-1], ds, 0, _topts())


def test_exit_indices_are_range_checked():
    me = kdcore.models.with_exits(kdcore.models.cnn(num_classes=3, input_size=8, width=2), ["3"])
    X = np.zeros((4, 1, 8, 8), np.float32)
    ds = K.Dataset(X, np.arange(4) % 3, num_classes=3)
    for exits in ([10**6], [2**40], ["a"]):
        with pytest.raises(ValueError, match="exits"):
            K.exits_epoch(me.net, K.Optimizer(me.net, 0, 0.1), exits, ds, 0, _topts())


def test_python_api_flags_choices_and_containers_name_the_argument():
    X, y = _data()
    cases = [
        (lambda: nn.Linear(3, 2, bias=np.ones(2)), TypeError, "bias"),
        (lambda: nn.Linear(3, 2, init=[1]), ValueError, "init"),
        (lambda: nn.AdaptiveAvgPool2d(np.float32(0.5)), ValueError, "output_size"),
        (lambda: kdcore.models.mlp([8, 3], batchnorm=np.ones(2)), TypeError, "batchnorm"),
        (lambda: kdcore.distill(_mlp(), _mlp(), (X, y), method=["kd"], progress=False), ValueError, "method"),
        (lambda: kdcore.distill(_mlp(), _mlp(), (X, y), cache=np.ones(2), progress=False), ValueError, "cache"),
        (lambda: kdcore.distill(_mlp(), _mlp(), (X, y), teacher_weights="", progress=False), TypeError, "teacher_weights"),
        (lambda: kdcore.slkd(_mlp(), _mlp(), (X, y), n_sl=1, sl_optimizer="", progress=False), ValueError, "sl_optimizer"),
        (lambda: kdcore.slkd(_mlp(), _mlp(), (X, y), n_sl=1, sl_tau2="no", progress=False), TypeError, "sl_tau2"),
        (lambda: kdcore.slkd(_mlp(), _mlp(), (X, y), n_sl=1, sl_tau2=None, progress=False), TypeError, "sl_tau2"),
        (lambda: kdcore.fit(_mlp(), (X, y), keep_snapshots=None, progress=False), TypeError, "keep_snapshots"),
        (lambda: kdcore.fit(_mlp(), (X, y), drop_last="yes", progress=False), TypeError, "drop_last"),
        (lambda: kdcore.kl_divergence(X[:, :3], X[:, :3], T=None), TypeError, "T"),
        (lambda: kdcore.functional.virtual_teacher(y, 2), ValueError, "num_classes"),
        (lambda: kdcore.datasets.Dataset(X, y, mean="", std=1.0), TypeError, "mean"),
        (lambda: kdcore.datasets.from_arrays(X, y).subset(np.array([[0, 1]])), TypeError, "idx"),
        (lambda: kdcore.datasets.from_arrays(X, y).subset(np.array([], np.int64)), ValueError, "idx"),
        (lambda: kdcore.datasets.fashion_mnist(["train"]), ValueError, "split"),
        (lambda: kdcore.save(None, _mlp()), TypeError, "path"),
        (lambda: kdcore.load(None), TypeError, "path"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=rf"\b{name}\b"):
            call()


def test_load_state_dict_refuses_bad_counts_before_writing():
    m = kdcore.models.cnn(num_classes=3, input_size=8, width=2)
    sd = m.state_dict()
    key = next(k for k in sd if k.endswith("num_batches_tracked"))
    before = {k: v.copy() for k, v in sd.items()}
    for bad in (-1, 1.5, float("nan"), True):
        sd2 = {k: (v + 1 if v.dtype == np.float32 else v) for k, v in sd.items()}
        sd2[key] = np.array(bad)
        with pytest.raises(ValueError, match=key):
            m.load_state_dict(sd2)
        for k, v in m.state_dict().items():       # nothing was written
            np.testing.assert_array_equal(v, before[k])


def test_float_values_in_binding_messages_are_formatted():
    # PyErr_Format has no %g: these messages used to read "got %g".
    with pytest.raises(ValueError, match=r"got -1\b"):
        K.kd_loss(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), T=-1.0)


def test_byte_swapped_float32_and_int64_inputs_are_read_by_value():
    # dtype '>f4' has the float32 type number: get_array used to pass its bytes to C as they lie
    # (1.0 read as 4.6e-41), a silently wrong result. Now copied to native order.
    s = np.array([[1.0, 2.0, 3.0]], np.float32)
    t = np.array([[0.5, 2.0, 1.0]], np.float32)
    y = np.array([2], np.int64)
    assert K.mse_loss(s.astype(">f4"), t)[0] == K.mse_loss(s, t)[0]
    assert K.cross_entropy(s.astype(">f4"), y.astype(">i8"))[0] == K.cross_entropy(s, y)[0]
    m = _mlp()
    x, _ = _data(4)
    np.testing.assert_array_equal(m(x.astype(">f4")), m(x))
