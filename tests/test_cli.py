"""YAML recipes and the command line (kdcore.recipes, python -m kdcore): every shipped recipe
run end to end in a shortened form (tiny CNNs, a few hundred images, one epoch), the run
folders, skipping finished runs, the report's numbers, validation errors naming the key's
path, .npz data and teacher checkpoints (kdcore and PyTorch files)."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kdcore
from kdcore import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses import the kdcore this process imported (under `make sanitize-py`, the ASan build).
KDCORE_PATH = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
# The shortened form: every recipe's teacher and student become tiny CNNs of equal widths
# (FSP needs equal channel counts), the data a few hundred images.
TINY = ["teacher.model=cnn", "teacher.width=4", "teacher.epochs=1", "teacher.train_size=300", "student.model=cnn",
        "student.width=4", "data.train_size=200", "data.val_split=100", "data.test_size=200", "epochs=1"]
RUN_FILES = {"config.yaml", "history.csv", "history.json", "student.safetensors", "metrics.json", "env.txt",
             "done.json"}


def cli(*args, cwd=None, check=True):
    env = dict(os.environ, PYTHONPATH=KDCORE_PATH, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "kdcore", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def metrics_of(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "runs"
    p = cli("run", *RECIPES, "--out", str(out), "--seeds", "0", "--quiet", "--set", *TINY)
    return out, p


@pytest.fixture(scope="module")
def kd_runs(tmp_path_factory):
    """kd and scratch over two seeds, long enough to learn something (1,000 images, 3 epochs)."""
    out = tmp_path_factory.mktemp("kd") / "runs"
    sets = TINY + ["data.train_size=1000", "epochs=3", "batch_size=32", "teacher.train_size=2000", "teacher.epochs=2",
                   "teacher.batch_size=32", "teacher.width=8"]
    args = ["run", os.path.join(ROOT, "recipes", "kd.yaml"), os.path.join(ROOT, "recipes", "scratch.yaml"),
            "--out", str(out), "--seeds", "0,1", "--quiet", "--set", *sets]
    cli(*args)
    return out, args


def test_a_recipe_per_method_ships():
    stems = {os.path.splitext(os.path.basename(p))[0] for p in RECIPES}
    assert set(kdcore.losses.METHODS) | {"scratch"} <= stems
    assert set(stems) <= set(recipes.METHODS)


def test_every_recipe_runs_shortened(all_runs):
    out, p = all_runs
    assert f"{len(RECIPES)} runs finished, 0 skipped (finished earlier), 0 failed" in p.stdout
    for path in RECIPES:
        name = os.path.splitext(os.path.basename(path))[0]
        folder = out / name / "seed-0"
        assert RUN_FILES <= set(os.listdir(folder)), name
        m = metrics_of(folder)
        assert m["recipe"] == name and m["seed"] == 0 and m["train_size"] == 200 and m["test_size"] == 200
        with open(folder / "history.json") as f:
            hist = json.load(f)
        assert len(hist["test_acc"]) == m["epochs"] >= 1
        assert m["last_test_acc"] == hist["test_acc"][-1] == m["test_acc"]
        assert 0 <= m["report"]["agreement"] <= 1
        with open(folder / "history.csv") as f:
            lines = f.read().splitlines()
        assert lines[0].startswith("epoch,") and "test_acc" in lines[0].split(",") and len(lines) == 1 + m["epochs"]
    # one teacher configuration after the overrides: trained once, cached once
    assert len(glob.glob(str(out / "_teachers" / "*.safetensors"))) == 1
    # the init-phase methods run their extra phase (an eighth of the epochs, at least one)
    assert metrics_of(out / "fsp" / "seed-0")["epochs"] == 2
    assert metrics_of(out / "reviewkd" / "seed-0")["method"] == "ce+reviewkd"


def test_run_folder_contents(all_runs):
    out, _ = all_runs
    folder = out / "kd" / "seed-0"
    m = metrics_of(folder)
    cfg = recipes.load(folder / "config.yaml")          # the resolved recipe reloads as it stands
    assert cfg["epochs"] == 1 and cfg["seeds"] == [0] and cfg["student"] == {"model": "cnn", "width": 4}
    assert cfg["options"] == {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    student = kdcore.models.cnn(width=4)
    st = kdcore.load(folder / "student.safetensors", student)
    assert st["metrics"]["test_acc"] == m["test_acc"]
    test = kdcore.datasets.fashion_mnist("test").subset(np.arange(200))
    assert kdcore.evaluate(student, test)["accuracy"] == pytest.approx(m["test_acc"], abs=1e-12)
    env = (folder / "env.txt").read_text()
    assert "kdcore " + kdcore.__version__ in env and "BLAS:" in env and "pyyaml" in env
    assert json.loads((folder / "done.json").read_text())["config_sha256"]


def test_check_builds_every_recipe_and_writes_nothing(tmp_path):
    p = cli("run", *RECIPES, "--check", "--out", str(tmp_path / "runs"))
    assert p.stdout.count(": ok (") == len(RECIPES)
    assert not (tmp_path / "runs").exists()


def test_rerun_skips_finished_runs(kd_runs):
    out, args = kd_runs
    files = sorted(glob.glob(str(out / "*" / "seed-*" / "*")))
    before = {f: os.stat(f).st_mtime_ns for f in files}
    p = cli(*args)
    assert "0 runs finished, 4 skipped (finished earlier), 0 failed" in p.stdout
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
    # no marker (an interrupted run): that run is trained again, the others are skipped
    os.remove(out / "kd" / "seed-1" / "done.json")
    p = cli(*args)
    assert "1 runs finished, 3 skipped (finished earlier), 0 failed" in p.stdout
    assert os.stat(out / "kd" / "seed-1" / "metrics.json").st_mtime_ns > before[str(out / "kd" / "seed-1" /
                                                                                    "metrics.json")]
    assert os.stat(out / "kd" / "seed-0" / "metrics.json").st_mtime_ns == before[str(out / "kd" / "seed-0" /
                                                                                    "metrics.json")]
    assert os.path.exists(out / "kd" / "seed-1" / "done.json")


def test_changed_recipe_is_not_mistaken_for_a_finished_run(kd_runs):
    out, args = kd_runs
    p = cli(*args, "epochs=4", check=False)
    assert p.returncode == 2
    assert "holds a finished run of another configuration" in p.stderr and "Traceback" not in p.stderr


def test_report_numbers_equal_run_folders(kd_runs, tmp_path):
    out, _ = kd_runs
    md, js = tmp_path / "report.md", tmp_path / "report.json"
    p = cli("report", str(out), "--md", str(md), "--json", str(js))
    rows = json.loads(js.read_text())
    assert [(r["recipe"], r["method"]) for r in rows] == [("kd", "kd"), ("scratch", "scratch")]
    text = md.read_text()
    for r in rows:
        ms = [metrics_of(out / r["recipe"] / f"seed-{s}") for s in (0, 1)]
        last = np.array([m["last_test_acc"] for m in ms]) * 100
        best = np.array([m["best_test_acc"] for m in ms]) * 100
        assert r["seeds"] == [0, 1] and r["n"] == 2
        assert (r["last_mean"], r["last_std"]) == (last.mean(), last.std())
        assert (r["best_mean"], r["best_std"]) == (best.mean(), best.std())
        cells = f"| {r['recipe']} | {r['method']} | 0,1 | {last.mean():.2f} ± {last.std():.2f} | " \
                f"{best.mean():.2f} ± {best.std():.2f} |"
        assert cells in text
        assert f"{last.mean():.2f} ± {last.std():.2f}" in p.stdout
        # the two seeds draw different subsets and initial weights
        assert ms[0]["last_test_acc"] != ms[1]["last_test_acc"] or ms[0]["report"] != ms[1]["report"]
    kd_row = rows[0]
    assert kd_row["last_mean"] > 30          # 1,000 images, 3 epochs of a tiny CNN: well above chance (10%)
    assert kd_row["teacher_mean"] > 40


def test_report_of_an_empty_folder_is_an_error(tmp_path):
    p = cli("report", str(tmp_path), check=False)
    assert p.returncode == 2 and "no finished runs" in p.stderr


# ---- validation ---------------------------------------------------------------------------

BASE = "teacher: {model: cnn, width: 4}\nstudent: {model: cnn, width: 4}\nmethod: kd\n"


@pytest.mark.parametrize("text, message", [
    ("teacher: {model: cnn}\nstudent: {model: cnn, width: wide}\nmethod: kd\n",
     "bad.yaml: student.width: expected an int >= 1, got 'wide'"),
    (BASE.replace("width: 4}\nmethod", "widht: 4}\nmethod"),
     "bad.yaml: student.widht: unknown key; known keys: model,"),
    (BASE + "epoch: 3\n", "bad.yaml: epoch: unknown key; recipe keys: name, teacher,"),
    (BASE.replace("kd\n", "kdd\n"), "bad.yaml: method: expected one of ce, kd,"),
    (BASE + "options: {T: hot}\n", "bad.yaml: options.T: expected a number > 0, got 'hot'"),
    (BASE + "options: {epochs: 3}\n", "bad.yaml: options.epochs: set by the recipe's epochs, not options"),
    (BASE + "options: {warp: 3}\n", "bad.yaml: options.warp: not an option of method 'kd'"),
    (BASE.replace("kd\n", "at\n") + "options: {T: 2}\n",
     "bad.yaml: options.T: applies to methods kd, dkd and mse only"),
    (BASE + "options: {conditional: 'yes'}\n", "bad.yaml: options.conditional: expected true or false, got 'yes'"),
    (BASE + "data: {val_split: 1.5}\n", "bad.yaml: data.val_split: expected an int >= 1 or a number > 0 and < 1"),
    (BASE + "seeds: [0, x]\n", "bad.yaml: seeds[1]: expected an int >= 0, got 'x'"),
    (BASE + "seeds: [1, 1]\n", "bad.yaml: seeds: a seed appears twice"),
    (BASE + "losses: [{kind: AT, p: two}]\n", "bad.yaml: losses[0]: p must be a float"),
    (BASE + "losses: [{kind: AT, q: 2}]\n", "bad.yaml: losses[0].q: not an option of AT"),
    (BASE + "losses: [{kind: ATT}]\n", "bad.yaml: losses[0].kind: expected one of"),
    ("teacher: {model: cnn}\nstudent: {model: resnet8, width: 4}\nmethod: kd\n",
     "bad.yaml: student.width: only for model cnn, not resnet8"),
    ("teacher: {model: resnet9}\nstudent: {model: cnn}\nmethod: kd\n", "bad.yaml: teacher.model: expected one of mlp,"),
    ("student: {model: cnn}\nmethod: kd\n", "bad.yaml: teacher: required by method 'kd'"),
    ("teacher: {model: cnn, checkpoint: t.safetensors, epochs: 3}\nstudent: {model: cnn}\nmethod: kd\n",
     "bad.yaml: teacher.epochs: a teacher loaded from teacher.checkpoint is not trained"),
    (BASE + "optimizer: {name: adam, momentum: 0.9}\n", "bad.yaml: optimizer.momentum: not an option of adam"),
    (BASE + "schedule: {name: multistep}\n", "bad.yaml: schedule.milestones: required by multistep"),
    (BASE + "schedule: linear\n", "bad.yaml: schedule: expected one of constant, cosine or a schedule mapping"),
    (BASE + "augment: {crop: 2}\n", "bad.yaml: augment.crop: unknown key"),
    ("- 1\n- 2\n", "bad.yaml: expected a mapping of recipe keys, got a list"),
    ("method: kd\n", "bad.yaml: student: required"),
])
def test_validation_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(recipes.RecipeError) as e:
        recipes.load(path)
    assert str(e.value).startswith(message), str(e.value)


def test_yaml_1_1_exponents_read_as_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "optimizer: {name: sgd, weight_decay: 5e-4}\nlr: 1e-2\n")
    cfg = recipes.load(path)
    assert cfg["optimizer"]["weight_decay"] == 5e-4 and cfg["lr"] == 1e-2


def test_cli_validation_error_and_set_path(tmp_path):
    (tmp_path / "r.yaml").write_text(BASE)
    p = cli("run", "r.yaml", "--set", "student.width=wide", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: r.yaml: student.width: expected an int >= 1, got 'wide'" in p.stderr
    p = cli("run", "r.yaml", "--set", "student=3", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "r.yaml: student: expected a mapping, got 3" in p.stderr
    p = cli("run", "r.yaml", "--set", "epochs", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--set 'epochs': expected key.path=value" in p.stderr
    assert not (tmp_path / "runs").exists()


def test_without_pyyaml_kdcore_imports_and_the_cli_names_the_package(tmp_path):
    code = ("import sys; sys.modules['yaml'] = None\n"     # as if PyYAML were not installed
            "import kdcore; print('imported', kdcore.__version__)\n"
            "from kdcore.__main__ import main; sys.exit(main(['run', 'r.yaml']))\n")
    (tmp_path / "r.yaml").write_text(BASE)
    env = dict(os.environ, PYTHONPATH=KDCORE_PATH, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "imported" in p.stdout
    assert "PyYAML" in p.stderr and "pip install pyyaml" in p.stderr and "Traceback" not in p.stderr


# ---- data from .npz, teachers from checkpoints ----------------------------------------------

def _blobs(n, rng):
    """3 classes of 6x6 images, each class bright in its own band of rows: easy to learn."""
    y = rng.integers(0, 3, n)
    X = rng.integers(0, 60, (n, 1, 6, 6)).astype(np.uint8)
    for k in range(3):
        X[y == k, 0, 2 * k:2 * k + 2] += 150
    return X, y.astype(np.int64)


def test_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    (Xtr, ytr), (Xte, yte) = _blobs(400, rng), _blobs(90, rng)
    os.makedirs(tmp_path / "data")
    np.savez(tmp_path / "data" / "blobs.npz", X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte)
    recipe = tmp_path / "recipes" / "blobs.yaml"
    os.makedirs(recipe.parent)
    # data.source relative to the recipe's folder
    recipe.write_text("teacher: {model: mlp, hidden: [32], epochs: 3, lr: 0.05}\n"
                      "student: {model: mlp, hidden: [16]}\n"
                      "data: {source: ../data/blobs.npz, val_split: 0.25}\n"
                      "method: kd\nepochs: 3\nlr: 0.05\nbatch_size: 32\nseeds: [3]\n")
    cli("run", str(recipe), "--out", "runs", "--quiet", cwd=tmp_path)
    m = metrics_of(tmp_path / "runs" / "blobs" / "seed-3")
    assert (m["train_size"], m["val_size"], m["test_size"]) == (300, 100, 90)
    assert m["best_selected_on"] == "val"
    assert m["test_acc"] > 0.9 and m["report"]["teacher_accuracy"] > 0.9
    cfg = recipes.load(tmp_path / "runs" / "blobs" / "seed-3" / "config.yaml")
    assert cfg["data"]["source"] == str(tmp_path / "data" / "blobs.npz")
    # a file without the test arrays is refused, naming what is missing
    np.savez(tmp_path / "data" / "blobs.npz", X_train=Xtr, y_train=ytr)
    p = cli("run", str(recipe), "--out", "runs2", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "data.source: " in p.stderr and "lacks X_test, y_test" in p.stderr
    # a convolutional model needs square images; flat features are refused naming the key
    np.savez(tmp_path / "data" / "flat.npz", X_train=Xtr.reshape(400, -1).astype(np.float32), y_train=ytr,
             X_test=Xte.reshape(90, -1).astype(np.float32), y_test=yte)
    p = cli("run", str(recipe), "--out", "runs3", "--set", "data.source=data/flat.npz", "student.model=cnn",
            "student.hidden=null", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "student.model: cnn needs square images" in p.stderr


def test_npz_normalisation_and_repeat(tmp_path):
    rng = np.random.default_rng(1)
    (Xtr, ytr), (Xte, yte) = _blobs(200, rng), _blobs(60, rng)
    src = str(tmp_path / "fixed.npz")
    np.savez(src, X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte, mean=np.array([0.5]), std=np.array([0.25]))
    base = dict(name="rep", student=dict(model="mlp", hidden=[8]), method="scratch", epochs=1, batch_size=16,
                data=dict(source=src, train_size=50))
    plain = recipes.validate(base)
    # repeat 1 resolves as a recipe without the key, so that existing run folders stay valid
    assert recipes.validate(dict(base, data=dict(base["data"], repeat=1))) == plain
    assert "repeat" not in plain["data"]
    cfg = recipes.validate(dict(base, data=dict(base["data"], repeat=3)))
    assert cfg["data"]["repeat"] == 3
    p1, p3 = recipes.prepare(plain, 4), recipes.prepare(cfg, 4)
    # the file's normalisation, for the training and the test set alike (not X_train's own statistics)
    assert p1["train"].mean == p1["test"].mean == (0.5,) and p1["test"].std == (0.25,)
    # the same 50 images drawn with the seed, each three times
    assert len(p3["train"]) == 150 and np.array_equal(p3["train"].X, np.repeat(p1["train"].X, 3, axis=0))
    m = recipes.run_one(cfg, 4, tmp_path / "runs")
    assert m["train_size"] == 50
    with pytest.raises(recipes.RecipeError, match="repeat: expected an int >= 1"):
        recipes.validate(dict(base, data=dict(base["data"], repeat=0)))
    np.savez(src, X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte, mean=np.array([0.5]))
    with pytest.raises(recipes.RecipeError, match="data.source: .* has mean without std"):
        recipes.prepare(plain, 0)
    np.savez(src, X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte, mean=np.array([0.5, 0.5]), std=np.array([1, 1]))
    with pytest.raises(recipes.RecipeError, match="data.source: "):
        recipes.prepare(plain, 0)


def _trained_teacher():
    train = kdcore.datasets.fashion_mnist("train").subset(np.arange(2000))
    teacher = kdcore.models.cnn(width=4, seed=5)
    kdcore.fit(teacher, train, epochs=2, batch_size=32, progress=False)
    return teacher


def test_teacher_from_checkpoints(tmp_path):
    teacher = _trained_teacher()
    test = kdcore.datasets.fashion_mnist("test").subset(np.arange(200))
    acc = kdcore.evaluate(teacher, test)["accuracy"]
    assert acc > 0.25   # well above chance (0.1): a trained teacher, so equal accuracies below mean equal weights
    kdcore.save(tmp_path / "teacher.safetensors", teacher)
    import torch
    torch.save(teacher.to_torch().state_dict(), tmp_path / "teacher.pt")
    torch.save({"model": teacher.to_torch().state_dict()}, tmp_path / "nested.pt")
    base = ("student: {model: cnn, width: 4}\nmethod: kd\nepochs: 1\n"
            "data: {train_size: 200, test_size: 200}\nseeds: [0]\n")
    for name, teacher_spec in [("kdc", "{model: cnn, width: 4, checkpoint: teacher.safetensors}"),
                               ("pt", "{model: cnn, width: 4, checkpoint: teacher.pt}"),
                               ("nested", "{model: cnn, width: 4, checkpoint: nested.pt, torch_key: model}")]:
        (tmp_path / f"{name}.yaml").write_text(f"teacher: {teacher_spec}\n" + base)
    cli("run", "kdc.yaml", "pt.yaml", "nested.yaml", "--out", "runs", "--quiet", cwd=tmp_path)
    for name in ("kdc", "pt", "nested"):
        m = metrics_of(tmp_path / "runs" / name / "seed-0")
        assert m["teacher"]["source"] == "checkpoint"
        assert m["report"]["teacher_accuracy"] == pytest.approx(acc, abs=1e-12), name
    assert not os.path.exists(tmp_path / "runs" / "_teachers")   # nothing trained, nothing cached
    # a checkpoint of another architecture is refused, naming the key
    (tmp_path / "wide.yaml").write_text("teacher: {model: cnn, width: 8, checkpoint: teacher.safetensors}\n" + base)
    p = cli("run", "wide.yaml", "--out", "runs", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "teacher.checkpoint: " in p.stderr


def test_teacher_cache_is_keyed_by_its_configuration(tmp_path):
    (tmp_path / "r.yaml").write_text("teacher: {model: cnn, width: 4, epochs: 1, train_size: 200}\n"
                                     "student: {model: cnn, width: 4}\nmethod: kd\nepochs: 1\n"
                                     "data: {train_size: 100, test_size: 100}\nseeds: [0, 1]\n")
    p = cli("run", "r.yaml", "--out", "runs", cwd=tmp_path)
    assert p.stdout.count("teacher cnn: training") == 1 and p.stdout.count("teacher cnn: cached") == 1
    cli("run", "r.yaml", "--out", "runs2", "--cache", "runs/_teachers", "--set", "teacher.epochs=2", cwd=tmp_path)
    assert len(glob.glob(str(tmp_path / "runs" / "_teachers" / "*.safetensors"))) == 2
