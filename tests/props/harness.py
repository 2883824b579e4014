"""Shared strategies and the call checker of the property tests (props_cases.py).

The property: a call either succeeds (and its output is finite and shaped as documented) or
raises TypeError / ValueError / KeyError (kdcore.CheckpointMismatch is both) whose message
names the argument that was made bad. Each test starts from a valid call and replaces ONE
argument with a drawn value, so "the offending argument" is known.

Before every call the call is written to $KDCORE_PROPS_LASTCALL (if set): when the process
dies (segfault, abort), the wrapper (tests/test_properties.py) shows it.
"""
import os
import re

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

OK_ERRORS = (TypeError, ValueError, KeyError)

# Derandomized: the suite runs the same examples every time (a failure reproduces). Set
# KDCORE_PROPS_RANDOM=1 to explore new ones (the failing example is printed either way).
settings.register_profile(
    "props", max_examples=40, deadline=None, database=None, print_blob=True,
    derandomize=os.environ.get("KDCORE_PROPS_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.load_profile("props")

_LOG = os.environ.get("KDCORE_PROPS_LASTCALL")


def _short(v):
    if isinstance(v, np.ndarray):
        return (f"ndarray(dtype={v.dtype}, shape={v.shape}, strides={v.strides}, "
                f"writeable={v.flags.writeable}, c_contiguous={v.flags.c_contiguous})")
    r = repr(v)
    return r if len(r) < 200 else r[:200] + "..."


def log_call(what, args=(), kwargs=None):
    if not _LOG:
        return
    desc = f"{what}(" + ", ".join([_short(a) for a in args] +
                                  [f"{k}={_short(v)}" for k, v in (kwargs or {}).items()]) + ")"
    with open(_LOG, "w") as f:
        f.write(desc + "\n")


def names_arg(msg, names):
    """True if the message names one of `names` as a word (x, not 'max'; student_logits names student)."""
    return any(re.search(r"(?<![A-Za-z0-9_])" + re.escape(n) + r"(?![A-Za-z0-9])", msg) for n in names)


def attempt(fn, args=(), kwargs=None, names=(), what=None, ok=OK_ERRORS, trains=False):
    """Call fn; return (True, result) or (False, exception) for an accepted error whose
    message names one of `names` (any message when names is empty). trains: the call runs
    training steps, which may legitimately diverge on valid options (say noise_std=1e14): the
    RuntimeError "... is not finite at epoch e, step s" of the non-finite checks is accepted."""
    kwargs = kwargs or {}
    log_call(what or getattr(fn, "__qualname__", repr(fn)), args, kwargs)
    try:
        return True, fn(*args, **kwargs)
    except RuntimeError as e:
        if trains and "not finite" in str(e):
            return False, e
        raise
    except ok as e:
        msg = str(e)
        assert msg and msg != "None", f"{type(e).__name__} without a message from {what or fn}"
        if names:
            assert names_arg(msg, names), (
                f"{type(e).__name__} from {what or fn} does not name the argument {list(names)}: {msg}")
        return False, e


def assert_finite_array(a, shape=None, what="output"):
    assert isinstance(a, np.ndarray), f"{what} is a {type(a).__name__}"
    assert a.dtype == np.float32, f"{what} has dtype {a.dtype}"
    if shape is not None:
        assert a.shape == tuple(shape), f"{what} has shape {a.shape}, expected {tuple(shape)}"
    assert np.all(np.isfinite(a)), f"{what} is not finite"


# ---- value strategies ---------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.int8, np.bool_,
          np.complex64, np.dtype(">f4"), object]


@st.composite
def any_array(draw, max_dims=4, max_side=4):
    """Arrays of every dtype and shape (0-d and empty included), with NaN/Inf, then maybe a
    non-contiguous, reversed, zero-stride or read-only view."""
    dt = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    base = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e6, 1e6) | st.sampled_from([np.nan, np.inf, -np.inf]),
                           fill=st.sampled_from([0.0, 1.0, np.nan])))
    with np.errstate(all="ignore"):
        a = base.astype(object) if dt is object else base.astype(dt)
    return draw(views_of(a))


@st.composite
def views_of(draw, a):
    """The same values as `a` with another memory layout, or `a` itself."""
    kind = draw(st.sampled_from(["same", "same", "strided", "reversed", "broadcast", "readonly", "fortran"]))
    if kind == "strided" and a.ndim >= 1:
        big = np.repeat(a, 2, axis=-1)
        return big[..., ::2]
    if kind == "reversed" and a.ndim >= 1 and a.shape[0] > 0:
        return np.ascontiguousarray(a[::-1])[::-1]
    if kind == "broadcast" and a.ndim >= 1 and a.shape[0] > 0:
        return np.broadcast_to(a[:1], a.shape)      # zero stride along axis 0 (and read-only)
    if kind == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if kind == "fortran" and a.ndim >= 2:
        return np.asfortranarray(a)
    return a


@st.composite
def variants_of(draw, a, allow_nonfinite=True):
    """Near-misses of a valid array: other dtypes, layouts, shapes, NaN/Inf, empty."""
    kind = draw(st.sampled_from(["view", "view", "dtype", "shape", "nonfinite", "empty", "extra_dim", "scalar",
                                 "list", "any"]))
    if kind == "view":
        return draw(views_of(a))
    if kind == "dtype":
        dt = draw(st.sampled_from(DTYPES))
        with np.errstate(all="ignore"):
            return draw(views_of(a.astype(dt)))
    if kind == "shape" and a.size > 1:
        flat = a.reshape(-1)
        n = draw(st.integers(1, a.size - 1))
        return flat[:n].copy() if draw(st.booleans()) else a.reshape(-1)
    if kind == "nonfinite" and a.size and a.dtype.kind == "f" and allow_nonfinite:
        b = a.copy()
        b.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return draw(views_of(b))
    if kind == "empty":
        return a[:0]
    if kind == "extra_dim":
        return a[None]
    if kind == "scalar":
        return a.reshape(-1)[0] if a.size else a.reshape(())
    if kind == "list":
        return a.tolist()
    return draw(any_array())


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 10),
    st.text(max_size=4), st.sampled_from(["kd", "auto", "sgd", "cosine", "", "x"]),
    st.just(np.float32(0.5)), st.just(np.int64(3)), st.just([1, 2]), st.just((1.0,)), st.just({}), st.just(object()),
    st.just(np.ones(2, np.float32)), st.just(1 + 2j))

# Counts of epochs/generations/cycles: the same wrong types and values, but no huge positive
# ints (a valid epochs=2**40 would train for ever).
COUNTS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
    st.just(np.int64(2)), st.just(np.float32(1.0)), st.just([1]), st.just(object()), st.just(np.ones(2, np.int64)))

# Layer sizes: wrong types, small and out-of-C-int values, but no valid-and-huge ones (a
# padding of 3000 is legal and makes a 6006x6006 map: slow, not wrong).
SIZES = st.one_of(COUNTS, st.integers(-3, 12), st.sampled_from([2**31, -2**31 - 1, 2**40]),
                  st.tuples(st.integers(0, 3), st.integers(0, 3)), st.lists(st.integers(-1, 9), max_size=4))

# Flags: anything with a truth value (arrays of several elements have none, by numpy's rules).
FLAGS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(-1, 1), st.text(max_size=2))


def labels_variants(y, classes):
    """Labels: out of range, negative, float, wrong length, other integer dtypes."""
    n = y.shape[0]
    return st.one_of(
        variants_of(y),
        hnp.arrays(np.int64, n, elements=st.integers(-5, classes + 5)),
        hnp.arrays(np.int64, n, elements=st.sampled_from([-2**63, 2**63 - 1, classes, -1])),
        hnp.arrays(st.sampled_from([np.int32, np.uint8, np.int16, np.uint64]), n, elements=st.integers(0, 255)),
        st.just(y.astype(np.float64)), st.just(y.astype(np.float32) + 0.5))
