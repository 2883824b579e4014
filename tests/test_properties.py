"""Hypothesis property tests (tests/props/props_cases.py), each run in its own Python process so
that a segfault or abort in the C core fails that one test, with the call that crashed it, instead
of killing the whole pytest run.

The properties: every public function and binding entry point, given one bad argument (dtype,
shape, layout, NaN/Inf, label range, option value), either succeeds with a finite, well-shaped
result or raises TypeError / ValueError / KeyError naming that argument. See props_cases.py.
"""
import ast
import os
import signal
import subprocess
import sys

import pytest

import kdcore

PROPS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "props")
CASES = os.path.join(PROPS_DIR, "props_cases.py")


def _case_names():
    tree = ast.parse(open(CASES).read())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def test_case_list_is_not_empty():
    assert len(_case_names()) >= 15


@pytest.mark.parametrize("case", _case_names())
def test_property(case, tmp_path):
    last = tmp_path / "last_call.txt"
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))   # the kdcore under test
    env = dict(os.environ, KDCORE_PROPS_LASTCALL=str(last),
               PYTHONPATH=os.pathsep.join([pkg_root, PROPS_DIR] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONFAULTHANDLER="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")    # a quick start: only Hypothesis' plugin
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "_hypothesis_pytestplugin",
           "--confcutdir", PROPS_DIR, "-o", "addopts=", f"{CASES}::{case}"]
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        how = (f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0
               else f"exit status {r.returncode}")
        crashed = r.returncode < 0 or r.returncode > 5 or "Fatal Python error" in r.stderr
        lines = [f"{case}: {how}"]
        if crashed and last.exists():
            lines.append("the process died in: " + last.read_text().strip())
        out = (r.stdout + r.stderr).strip().splitlines()
        lines += out[-120:]
        pytest.fail("\n".join(lines), pytrace=False)
