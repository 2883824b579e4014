"""The example notebooks (examples/*.ipynb) run top to bottom in a fresh Jupyter kernel that
imports this repository's kdcore, and what they compute is sane; the committed files carry
no outputs.

Each notebook ends with a cell that builds a dict named ``summary``; the test appends a cell
printing it (and ``kdcore.__file__``) as JSON and checks it with the notebook's entry of
CHECKS. A notebook added to examples/ is executed by test_notebook_runs automatically, and
test_every_notebook_has_a_check fails until CHECKS has its entry.
"""
import glob
import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

import kdcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kernel imports the kdcore this process tests: python/ (make test-py), or the ASan build
# in build/asan/py (make sanitize-py), put first on the kernel's PYTHONPATH.
PKG = os.path.dirname(os.path.dirname(os.path.realpath(kdcore.__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.ipynb")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS]
# Per cell. The notebooks take about a minute on an idle 2-core machine; a machine shared with
# benchmarks made single training cells take minutes.
CELL_TIMEOUT = 1800
PROBE = ("import json as _json, kdcore as _kdcore\n"
         "print('SUMMARY=' + _json.dumps({'kdcore_file': _kdcore.__file__, 'summary': summary}))")


def _prob(v):
    return isinstance(v, float) and 0.0 <= v <= 1.0


def _accuracy(v, what):
    # Ten balanced classes: chance is 0.1; every model here trains for at least one epoch.
    assert isinstance(v, float) and 0.1 < v < 1.0, f"{what} = {v!r}"


def check_distill_and_compare(s):
    for k in ("teacher_accuracy", "kd_accuracy", "alone_accuracy"):
        _accuracy(s[k], k)
    assert s["teacher_accuracy"] > 0.8, s          # 20,000 images, 5 epochs: ~0.89
    # metrics.report and the History's last val_acc measure the same model on the same images
    assert math.isclose(s["kd_accuracy"], s["kd_history_val_acc"], abs_tol=1e-9), s
    for k in ("kd_agreement", "alone_agreement", "kd_ece", "alone_ece"):
        assert _prob(s[k]), (k, s[k])


def check_benchmark_table(s):
    assert list(s) == ["ce", "kd", "dkd", "at", "fitnet"], list(s)
    for method, row in s.items():
        assert len(row["runs"]) == 2, (method, row)
        for a in row["runs"]:
            _accuracy(a, method)
        assert math.isclose(row["mean"], sum(row["runs"]) / 2, abs_tol=1e-12), (method, row)
        assert math.isclose(row["std"], abs(row["runs"][0] - row["runs"][1]) / 2, abs_tol=1e-12), (method, row)


def check_taps_and_features(s):
    for k in ("teacher_accuracy", "at_accuracy", "ce_accuracy"):
        _accuracy(s[k], k)
    assert s["at_terms"] == ["at", "at_2"], s["at_terms"]   # the two chosen taps, not the three defaults
    cka = s["cka_at"]
    assert len(cka) == 3 and all(len(r) == 3 for r in cka), cka
    for v in [v for r in cka for v in r] + s["cka_ce"]:
        assert _prob(v), s
    assert len(s["cka_ce"]) == 3


def check_pytorch_bridge(s):
    assert 1.0 < s["logit_scale"] < 1e3, s
    # Float rounding between kdcore's C kernels, PyTorch and onnxruntime: ~1e-6 on logits of ~10.
    for k in ("to_torch", "grad_x", "grad_fc", "from_torch", "trained_back", "onnx", "onnx_student"):
        assert isinstance(s[k], float) and 0.0 <= s[k] < 1e-3, (k, s[k])


CHECKS = {"distill_and_compare": check_distill_and_compare, "benchmark_table": check_benchmark_table,
          "taps_and_features": check_taps_and_features, "pytorch_bridge": check_pytorch_bridge}


def test_examples_found():
    assert set(CHECKS) <= set(NAMES), f"missing notebooks: {sorted(set(CHECKS) - set(NAMES))}"


def test_every_notebook_has_a_check():
    assert set(NAMES) <= set(CHECKS), f"notebooks without an entry in CHECKS: {sorted(set(NAMES) - set(CHECKS))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.kernelspec.language == "python"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, \
            f"cell {c.get('id')} has outputs or an execution count: strip them before committing"
    assert "summary" in code[-1].source, "the last code cell must build `summary` (see the module docstring)"


def test_tested_kdcore_is_this_repositorys():
    assert PKG.startswith(os.path.realpath(ROOT) + os.sep), \
        f"pytest imports kdcore from {kdcore.__file__}: run with PYTHONPATH={os.path.join(ROOT, 'python')}"


def _kernel_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PKG] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["MPLBACKEND"] = "Agg"        # figures are drawn but not displayed or written
    return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs(path, tmp_path):
    name = os.path.splitext(os.path.basename(path))[0]
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    # A fresh kernel per notebook; "python3" is ipykernel's own spec, run with this interpreter.
    # Its working directory is tmp_path, so anything a notebook writes stays out of the tree.
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=_kernel_env())       # raises CellExecutionError on any failing cell
    lines = [o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and o.name == "stdout"]
    out = "".join(lines)
    assert out.startswith("SUMMARY="), out
    got = json.loads(out[len("SUMMARY="):])
    assert os.path.realpath(got["kdcore_file"]) == os.path.realpath(kdcore.__file__), \
        f"the kernel imported kdcore from {got['kdcore_file']}, the tests from {kdcore.__file__}"
    CHECKS[name](got["summary"])
