"""Winograd F(2x2, 3x3) switch: KDCORE_WINOGRAD (read once), what show_config reports, and that
the automatic choice follows the shape rule (C, OC >= 32): such a conv gives Winograd's bits by
default and the direct path's with KDCORE_WINOGRAD=0 (equal to rounding), a narrower conv the
same bits either way. The numerics are tested in C (tests/c/test_layers.c, test_wino); the
PyTorch parity of conv layers and models runs with the default (tests/test_layers_torch.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import kdcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPATH = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))

CHILD = r"""
import sys
import numpy as np
import kdcore
from kdcore import nn as knn
rng = np.random.default_rng(0)
out = {}
for c, oc in ((32, 40), (16, 64)):
    m = knn.Conv2d(c, oc, 3, padding=1)
    x = rng.standard_normal((2, c, 9, 9)).astype(np.float32)
    y = m(x)
    out[f"y{c}"] = y
    out[f"dx{c}"] = m.backward(rng.standard_normal(y.shape).astype(np.float32))
np.savez(sys.argv[1], **out)
kdcore.show_config()
"""


def _run(tmp_path, value):
    env = dict(os.environ, PYTHONPATH=PYPATH, OMP_NUM_THREADS="1")
    env.pop("KDCORE_WINOGRAD", None)
    if value is not None:
        env["KDCORE_WINOGRAD"] = value
    f = tmp_path / f"out-{value}.npz"
    r = subprocess.run([sys.executable, "-c", CHILD, str(f)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    line = [s for s in r.stdout.splitlines() if s.startswith("winograd: ")]
    assert len(line) == 1, r.stdout
    return dict(np.load(f)), line[0]


RULE = "F(2x2,3x3) for stride-1 3x3 convs with C, OC >= 32"


@pytest.mark.parametrize("value,says", [
    (None, f"winograd: on (KDCORE_WINOGRAD unset); {RULE}"),
    ("1", f"winograd: on (KDCORE_WINOGRAD=1); {RULE}"),
    ("0", "winograd: off (KDCORE_WINOGRAD=0)"),
    ("off", "winograd: off (KDCORE_WINOGRAD=off)"),
    ("yes", f"winograd: on (KDCORE_WINOGRAD=yes not understood: 0/off or 1/on; taken as on); {RULE}"),
])
def test_show_config(tmp_path, value, says):
    _, line = _run(tmp_path, value)
    assert line == says


def test_switch_follows_rule(tmp_path):
    on, _ = _run(tmp_path, None)
    off, _ = _run(tmp_path, "0")
    for k in ("y32", "dx32"):
        assert not np.array_equal(on[k], off[k]), f"{k}: KDCORE_WINOGRAD=0 changed nothing"
        np.testing.assert_allclose(on[k], off[k], rtol=0, atol=2e-5 * np.abs(off[k]).max())
    for k in ("y16", "dx16"):
        assert np.array_equal(on[k], off[k]), f"{k}: below the rule, yet the bits changed"


def test_in_process_config():
    assert kdcore._kdcore.winograd_config().split(" ")[0] in ("on", "off")
