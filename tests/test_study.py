"""The study harness of kdcore.recipes: the per-epoch test measurements of every run (accuracy,
NLL, ECE, and with a teacher agreement and KL), the numbers metrics.json reports at the chosen
and the last epoch, the paired-seed comparison with a baseline (compare, format_compare, the
report command's --baseline) and the Student-t quantile behind its interval."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import kdcore
from kdcore import recipes

KDCORE_PATH = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))
MEASURES = ("test_acc", "test_nll", "test_ece", "test_agreement", "test_kl")


def recipe(**over):
    raw = dict(name="kd", teacher=dict(model="cnn", width=4, epochs=1, train_size=300),
               student=dict(model="cnn", width=4), data=dict(train_size=200, val_split=100, test_size=200),
               method="kd", epochs=2, batch_size=32, seeds=[0])
    raw.update(over)
    return recipes.validate(raw)


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A kd run with a validation split and a scratch run without a teacher, 2 epochs each."""
    out = tmp_path_factory.mktemp("study") / "runs"
    cache = out / "_teachers"
    kd = recipe()
    scratch = recipe(name="scratch", method="scratch", teacher=None)
    recipes.run_one(kd, 0, out, cache=cache)
    recipes.run_one(scratch, 0, out, cache=cache)
    return out, kd, scratch


def test_per_epoch_columns_equal_kdcore_metrics_on_the_saved_student(real_runs):
    out, kd, _ = real_runs
    folder = recipes.run_dir(out, kd, 0)
    hist, m = read(folder, "history.json"), read(folder, "metrics.json")
    for k in MEASURES + ("val_acc",):
        assert len(hist[k]) == m["epochs"] == 2, k
    with open(os.path.join(folder, "history.csv")) as f:
        lines = f.read().splitlines()
    header = lines[0].split(",")
    for k in MEASURES:   # the CSV holds the same numbers as the JSON
        assert [float(line.split(",")[header.index(k)]) for line in lines[1:]] == hist[k], k
    test = kdcore.datasets.fashion_mnist("test").subset(np.arange(200))
    student, teacher = kdcore.models.cnn(width=4), kdcore.models.cnn(width=4)
    kdcore.load(os.path.join(folder, "student.safetensors"), student)
    kdcore.load(m["teacher"]["path"], teacher)
    cal = kdcore.metrics.calibration(student, test, bins=15)
    assert hist["test_acc"][-1] == cal["accuracy"] == kdcore.evaluate(student, test)["accuracy"]
    assert hist["test_nll"][-1] == pytest.approx(cal["nll"], rel=1e-12)
    assert hist["test_ece"][-1] == pytest.approx(cal["ece"], rel=1e-12)
    assert hist["test_agreement"][-1] == kdcore.metrics.agreement(student, teacher, test)
    assert hist["test_kl"][-1] == pytest.approx(kdcore.metrics.kl_divergence(student, teacher, test, T=1.0),
                                                rel=1e-12)
    # the epochs differ: the columns are measured per epoch, not copied from the last one
    assert hist["test_nll"][0] != hist["test_nll"][1]
    # metrics.report on the final student says the same as the last epoch's columns
    rep = m["report"]
    assert (rep["student_ece"], rep["student_nll"], rep["agreement"]) == pytest.approx(
        (m["last_test_ece"], m["last_test_nll"], m["last_test_agreement"]), rel=1e-12)


def test_without_a_teacher_no_teacher_columns(real_runs):
    out, _, scratch = real_runs
    folder = recipes.run_dir(out, scratch, 0)
    hist, m = read(folder, "history.json"), read(folder, "metrics.json")
    assert all(len(hist[k]) == 2 for k in ("test_acc", "test_nll", "test_ece", "val_acc"))
    assert "test_agreement" not in hist and "test_kl" not in hist
    assert "last_test_kl" not in m and "best_test_agreement" not in m and "report" not in m


def test_compare_reads_real_run_folders(real_runs):
    out, kd, scratch = real_runs
    mk, ms = (read(recipes.run_dir(out, c, 0), "metrics.json") for c in (kd, scratch))
    (row,) = recipes.compare(out, baseline="scratch", metric="best_test_nll")
    assert (row["recipe"], row["n"], row["seeds"]) == ("kd", 1, [0])
    assert row["diff_mean"] == mk["best_test_nll"] - ms["best_test_nll"] and math.isnan(row["ci_low"])


# The chosen epoch, made unambiguous: the validation accuracies and the per-epoch test numbers
# are replaced by values whose best epochs all differ (validation: epoch 1; test accuracy:
# epoch 0 with a split, epoch 2 without; the last epoch: 3).
FAKE_VAL = [0.2, 0.9, 0.5, 0.4]
FAKE = {"test_acc": [0.9, 0.1, 0.95, 0.3], "test_nll": [1.0, 2.0, 3.0, 4.0], "test_ece": [0.1, 0.2, 0.3, 0.4],
        "test_agreement": [0.5, 0.6, 0.7, 0.8], "test_kl": [5.0, 6.0, 7.0, 8.0]}


@pytest.fixture
def fake_measures(monkeypatch):
    real_measures, real_evaluate = recipes._epoch_measures, kdcore.training.evaluate
    calls = {"measures": 0, "val": 0}

    def measures(student, test, zt):
        m = real_measures(student, test, zt)
        e = calls["measures"]
        calls["measures"] += 1
        return {k: FAKE[k][e] for k in m}

    def evaluate(model, data, batch_size=256):   # the training loop's validation
        r = real_evaluate(model, data, batch_size)
        r["accuracy"] = FAKE_VAL[calls["val"]]
        calls["val"] += 1
        return r

    monkeypatch.setattr(recipes, "_epoch_measures", measures)
    monkeypatch.setattr(kdcore.training, "evaluate", evaluate)
    return calls


def test_chosen_epoch_is_the_best_on_validation(tmp_path, fake_measures):
    cfg = recipe(epochs=4)
    recipes.run_one(cfg, 0, tmp_path / "runs")
    m = read(recipes.run_dir(tmp_path / "runs", cfg, 0), "metrics.json")
    hist = read(recipes.run_dir(tmp_path / "runs", cfg, 0), "history.json")
    assert hist["val_acc"] == FAKE_VAL and all(hist[k] == FAKE[k] for k in MEASURES)
    assert (m["best_epoch"], m["best_selected_on"], m["best_val_acc"]) == (1, "val", 0.9)
    for k in MEASURES:
        assert m["best_" + k] == FAKE[k][1] and m["last_" + k] == FAKE[k][3], k


def test_chosen_epoch_without_validation_is_the_best_on_test(tmp_path, fake_measures):
    cfg = recipe(epochs=4, data=dict(train_size=200, test_size=200))
    recipes.run_one(cfg, 0, tmp_path / "runs")
    m = read(recipes.run_dir(tmp_path / "runs", cfg, 0), "metrics.json")
    assert (m["best_epoch"], m["best_selected_on"]) == (2, "test") and "best_val_acc" not in m
    for k in MEASURES:
        assert m["best_" + k] == FAKE[k][2] and m["last_" + k] == FAKE[k][3], k


# ---- paired comparisons on hand-written run folders ---------------------------------------

def write_run(out, recipe_name, method, seed, **numbers):
    folder = os.path.join(out, recipe_name, f"seed-{seed}")
    os.makedirs(folder)
    m = dict(recipe=recipe_name, method=method, seed=seed, last_test_acc=numbers.get("best_test_acc", 0.5),
             **numbers)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(m, f)
    with open(os.path.join(folder, "done.json"), "w") as f:
        json.dump({"config_sha256": "x"}, f)


# test accuracies per seed; kd pairs with the baseline on seeds 0-2 (seed 3 is the
# baseline's alone), dkd on seed 1 only (seed 4 is its own), solo on none
BASE = {0: 0.80, 1: 0.82, 2: 0.78, 3: 0.90}
KD = {0: 0.83, 1: 0.83, 2: 0.82}
DKD = {1: 0.85, 4: 0.70}


@pytest.fixture
def synthetic(tmp_path):
    out = str(tmp_path / "runs")
    for s, v in BASE.items():
        write_run(out, "scratch", "scratch", s, best_test_acc=v, best_test_nll=1.0 + v)
    for s, v in KD.items():
        write_run(out, "kd", "kd", s, best_test_acc=v, best_test_nll=1.0 + v, best_test_kl=0.1 * s)
    for s, v in DKD.items():
        write_run(out, "dkd", "dkd", s, best_test_acc=v)
    write_run(out, "solo", "at", 7, best_test_acc=0.5)
    write_run(out, "unfinished", "kd", 0, best_test_acc=0.99)
    os.remove(os.path.join(out, "unfinished", "seed-0", "done.json"))
    return out


def test_compare_gives_the_paired_t_interval(synthetic):
    rows = {r["recipe"]: r for r in recipes.compare(synthetic, baseline="scratch")}
    assert list(rows) == ["dkd", "kd", "solo"]   # report's order, the baseline and unfinished runs left out
    kd = rows["kd"]
    d = [KD[s] - BASE[s] for s in (0, 1, 2)]
    mean = (d[0] + d[1] + d[2]) / 3
    std = math.sqrt(((d[0] - mean) ** 2 + (d[1] - mean) ** 2 + (d[2] - mean) ** 2) / 2)
    half = 4.302652729749464 * std / math.sqrt(3)   # t_{0.975, 2}
    assert (kd["n"], kd["seeds"], kd["unpaired"]) == (3, [0, 1, 2], [3])
    assert (kd["baseline"], kd["baseline_method"], kd["metric"], kd["level"]) == ("scratch", "scratch",
                                                                                 "best_test_acc", 0.95)
    assert kd["diff_mean"] == pytest.approx(mean, rel=1e-12)
    assert kd["diff_std"] == pytest.approx(std, rel=1e-12)
    assert (kd["ci_low"], kd["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert kd["mean"] == pytest.approx((0.83 + 0.83 + 0.82) / 3, rel=1e-12)
    assert kd["baseline_mean"] == pytest.approx((0.80 + 0.82 + 0.78) / 3, rel=1e-12)
    # one pair: a difference, no spread, no interval (NaN, not an error)
    dkd = rows["dkd"]
    assert (dkd["n"], dkd["seeds"], dkd["unpaired"]) == (1, [1], [0, 2, 3, 4])
    assert dkd["diff_mean"] == pytest.approx(0.85 - 0.82, rel=1e-12)
    assert all(math.isnan(dkd[k]) for k in ("diff_std", "ci_low", "ci_high"))
    # no pair at all
    assert rows["solo"]["n"] == 0 and math.isnan(rows["solo"]["diff_mean"]) and rows["solo"]["unpaired"] == [0, 1,
                                                                                                            2, 3, 7]
    # another level and metric; a run without the metric is no pair
    r = {r["recipe"]: r for r in recipes.compare(synthetic, "scratch", metric="best_test_nll", level=0.9)}
    t90 = 2.9199855803537242  # t_{0.95, 2}
    assert r["kd"]["diff_mean"] == pytest.approx(mean, rel=1e-9)
    assert r["kd"]["ci_high"] - r["kd"]["diff_mean"] == pytest.approx(t90 * std / math.sqrt(3), rel=1e-6)
    assert r["dkd"]["n"] == 0


def test_paired_is_compare_on_lists():
    # compare's numbers for the kd group, from the values alone
    d = recipes.paired([KD[s] for s in (0, 1, 2)], [BASE[s] for s in (0, 1, 2)])
    mean = sum(KD[s] - BASE[s] for s in (0, 1, 2)) / 3
    assert d["n"] == 3 and d["diff_mean"] == pytest.approx(mean, rel=1e-12)
    assert d["ci_high"] - d["diff_mean"] == pytest.approx(4.302652729749464 * d["diff_std"] / math.sqrt(3), rel=1e-9)
    assert math.isnan(recipes.paired([0.5], [0.4])["ci_low"]) and recipes.paired([], [])["n"] == 0
    with pytest.raises(ValueError, match="equally long"):
        recipes.paired([0.1, 0.2], [0.1])


def test_compare_baseline_by_method_label_and_refusals(synthetic):
    rows = recipes.compare(synthetic, baseline="at")   # the method label of recipe solo
    assert {r["baseline"] for r in rows} == {"solo"} and all(r["n"] == 0 for r in rows)
    with pytest.raises(recipes.RecipeError, match="baseline: 'nope' is neither a recipe nor a method"):
        recipes.compare(synthetic, baseline="nope")
    write_run(synthetic, "dist-T2", "dist", 0, best_test_acc=0.8)
    write_run(synthetic, "dist-T4", "dist", 0, best_test_acc=0.8)
    with pytest.raises(recipes.RecipeError, match=r"baseline: method 'dist' is run by several recipes "
                                                  r"\(dist-T2, dist-T4\); name one"):
        recipes.compare(synthetic, baseline="dist")
    assert recipes.compare(synthetic, baseline="dist-T2")[0]["baseline"] == "dist-T2"
    # a recipe name is matched before the method labels
    write_run(synthetic, "at", "kd", 0, best_test_acc=0.8)
    assert {r["baseline"] for r in recipes.compare(synthetic, baseline="at")} == {"at"}
    with pytest.raises(recipes.RecipeError, match="metric: 'best_tset_acc' is not a number"):
        recipes.compare(synthetic, baseline="scratch", metric="best_tset_acc")
    with pytest.raises(recipes.RecipeError, match="level: expected a number > 0 and < 1"):
        recipes.compare(synthetic, baseline="scratch", level=95)


def test_format_compare(synthetic):
    rows = recipes.compare(synthetic, baseline="scratch")
    kd = rows[1]
    md = recipes.format_compare(rows, markdown=True)
    assert md.splitlines()[0] == "| recipe | method | pairs | best_test_acc | scratch | difference | std | 95% CI |"
    assert md.splitlines()[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert (f"| kd | kd | 3 | {kd['mean']:.4f} | {kd['baseline_mean']:.4f} | {kd['diff_mean']:+.4f} | "
            f"{kd['diff_std']:.4f} | [{kd['ci_low']:+.4f}, {kd['ci_high']:+.4f}] |") in md
    assert "| dkd | dkd | 1 | 0.8500 | 0.8200 | +0.0300 | n/a | n/a |" in md
    text = recipes.format_compare(rows)
    assert text.splitlines()[0].split() == ["recipe", "method", "pairs", "best_test_acc", "scratch", "difference",
                                            "std", "95%", "CI"]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=KDCORE_PATH, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kdcore", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_report_cli_baseline(synthetic, tmp_path):
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    p = cli("report", synthetic, "--baseline", "scratch", "--metric", "best_test_acc", "--md", str(md),
            "--json", str(js))
    assert p.returncode == 0, p.stderr
    rows = recipes.compare(synthetic, "scratch")
    doc = json.loads(js.read_text())
    assert [r["recipe"] for r in doc["report"]] == ["dkd", "kd", "scratch", "solo"]
    assert doc["compare"][1] == rows[1]
    assert recipes.format_compare(rows) in p.stdout
    assert "each group minus scratch, paired by seed" in p.stdout
    assert recipes.format_compare(rows, markdown=True) in md.read_text()
    p = cli("report", synthetic, "--baseline", "scratch", "--level", "0.9")
    assert p.returncode == 0 and "90% CI" in p.stdout
    p = cli("report", synthetic, "--baseline", "nope")
    assert p.returncode == 2 and "baseline: 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = cli("report", synthetic, "--metric", "best_test_nll")
    assert p.returncode == 2 and "--metric and --level: only with --baseline" in p.stderr


# ---- the t quantile ---------------------------------------------------------------------

@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_table_values(df, t):
    assert round(recipes._t_quantile(0.975, df), 3) == t


def test_t_quantile_closed_forms_and_limits():
    for p in (0.6, 0.9, 0.975, 0.999, 0.99999):
        assert recipes._t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert recipes._t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
        assert recipes._t_quantile(1 - p, 5) == -recipes._t_quantile(p, 5)
    assert recipes._t_quantile(0.975, 10 ** 7) == pytest.approx(1.959963984540054, rel=1e-6)   # the normal's
    assert recipes._t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError, match="p must be in"):
        recipes._t_quantile(1.0, 3)
