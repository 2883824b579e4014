"""Comparison helper shared by the PyTorch-parity tests (llm.c's check_tensor: on failure,
the number of mismatches, the max differences and the first few values)."""
import numpy as np
import pytest


def check_close(name, got, want, rtol=1e-5, atol=0.0):
    """Elementwise |got - want| <= atol + rtol*|want|; on failure report the count, the max
    differences and the first few mismatches."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    if not np.all(np.isfinite(got)):
        bad = np.argwhere(~np.isfinite(got))[:5]
        pytest.fail(f"{name}: non-finite values at {[tuple(b) for b in bad]}")
    err = np.abs(got - want)
    bad = np.argwhere(err > atol + rtol * np.abs(want))
    if bad.size:
        rel = err / np.maximum(np.abs(want), 1e-300)
        lines = [f"{name}: {len(bad)}/{got.size} mismatches; max abs diff {err.max():.4g}, "
                 f"max rel diff {rel.max():.4g} (rtol={rtol:g}, atol={atol:.3g})"]
        for idx in bad[:6]:
            idx = tuple(int(i) for i in idx)
            lines.append(f"  at {idx}: got {got[idx]!r}, want {want[idx]!r}")
        pytest.fail("\n".join(lines))


def check_close_scaled(name, got, want, rtol=1e-5, atol=None, atol_floor=0.0):
    """check_close with atol defaulting to rtol * max|want| (the quantity's scale; at least
    atol_floor, for quantities that are 0 up to rounding), for the loss tests; the reference
    must be finite."""
    got = np.atleast_1d(np.asarray(got, dtype=np.float64))
    want = np.atleast_1d(np.asarray(want, dtype=np.float64))
    assert np.all(np.isfinite(want)), f"{name}: the reference is not finite"
    if atol is None:
        atol = max(rtol * max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30), atol_floor)
    check_close(name, got, want, rtol=rtol, atol=atol)
