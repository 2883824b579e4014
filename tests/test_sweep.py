"""Sweeps on Dask (kdcore.recipes.sweep, python -m kdcore sweep): a tiny recipe over a grid and
two seeds on a 2-worker local cluster gives bitwise the numbers of the same runs made one by one
in-process; a failing trial or a dying worker is reported while the others finish; a rerun
skips finished trials and retries the rest; a scheduler given by address gets the thread count
from the task; grid and argument errors name the key; without dask the error names the package."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kdcore
from kdcore import recipes
from kdcore.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses import the kdcore this process imported (under `make sanitize-py`, the ASan build).
KDCORE_PATH = os.path.dirname(os.path.dirname(os.path.abspath(kdcore.__file__)))
# tests/test_cli.py's shortened form: tiny CNNs, a few hundred images, one epoch
RECIPE = ("teacher: {model: cnn, width: 4, epochs: 1, train_size: 300, batch_size: 32}\n"
          "student: {model: cnn, width: 4}\n"
          "data: {train_size: 300, val_split: 100, test_size: 200}\n"
          "method: kd\nepochs: 1\nbatch_size: 32\nlr: 0.05\nseeds: [0]\n")
GOOD = ["r-options.T=2-data.train_size=300", "r-options.T=4-data.train_size=300"]
BAD = ["r-options.T=2-data.train_size=100000", "r-options.T=4-data.train_size=100000"]


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=KDCORE_PATH, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kdcore", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def weights(folder):
    model = kdcore.models.cnn(width=4)
    kdcore.load(os.path.join(folder, "student.safetensors"), model)
    return model.state_dict()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One CLI sweep: 2 temperatures x 2 training-set sizes (100,000 images: more than the data
    has, refused inside the task) x 2 seeds."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "r.yaml").write_text(RECIPE)
    args = ["sweep", "r.yaml", "--grid", "options.T=2,4", "--grid", "data.train_size=300,100000", "--seeds", "0,1",
            "--workers", "2", "--out", "runs"]
    return tmp, args, cli(*args, cwd=tmp)


def test_failed_trials_are_reported_and_the_others_finish(swept):
    tmp, _, p = swept
    assert p.returncode == 1, p.stderr
    assert "4 trials finished, 0 skipped (finished earlier), 4 failed" in p.stdout
    for name in BAD:
        for seed in (0, 1):
            line = f"FAILED {name} seed {seed}: RecipeError: data.train_size: 100000 > the 59900 training images"
            assert line in p.stdout
            assert f"{name} seed {seed} failed:\nTraceback" in p.stderr
            assert not os.path.exists(tmp / "runs" / name / f"seed-{seed}" / "done.json")
    for name in GOOD:
        for seed in (0, 1):
            assert os.path.exists(tmp / "runs" / name / f"seed-{seed}" / "done.json")
    # the report table of the trials that finished, with the numbers of their folders
    table = p.stdout[p.stdout.index("recipe "):p.stdout.index("FAILED ")]
    for name in GOOD:
        last = [read(tmp / "runs" / name / f"seed-{s}", "metrics.json")["last_test_acc"] * 100 for s in (0, 1)]
        assert f"{name}  kd      0,1    {np.mean(last):.2f} ± {np.std(last):.2f}" in table
    assert not any(name in table for name in BAD)


def test_trials_equal_runs_made_one_by_one_in_process(swept, tmp_path):
    tmp, _, _ = swept
    before = kdcore.get_num_threads()
    kdcore.set_num_threads(1)   # the sweep's threads: 2 workers on 2 cores
    try:
        for name in GOOD:
            cfg = recipes.load(tmp / "runs" / name / "seed-0" / "config.yaml", seeds=[0, 1])
            assert cfg["name"] == name and cfg["data"]["train_size"] == 300
            assert cfg["options"]["T"] == float(name.split("T=")[1].split("-")[0])
            for seed in (0, 1):
                m = recipes.run_one(cfg, seed, tmp_path / "runs", cache=tmp_path / "cache")
                assert m["skipped"] is False
                assert m["teacher"]["path"].startswith(str(tmp_path / "cache"))   # not the sweep's teacher
                swept_folder = tmp / "runs" / name / f"seed-{seed}"
                here = recipes.run_dir(tmp_path / "runs", cfg, seed)
                ms, mh = read(swept_folder, "metrics.json"), read(here, "metrics.json")
                for k in ("test_acc", "last_test_acc", "best_test_acc", "best_epoch", "report"):
                    assert ms[k] == mh[k], (name, seed, k)
                hs, hh = read(swept_folder, "history.json"), read(here, "history.json")
                for k in ("train_loss", "val_acc", "test_acc"):
                    assert hs[k] == hh[k], (name, seed, k)
                ws, wh = weights(swept_folder), weights(here)
                assert all(np.array_equal(ws[k], wh[k]) for k in wh)
                assert "threads: 1" in (swept_folder / "env.txt").read_text()
    finally:
        kdcore.set_num_threads(before)
    # the two temperatures train differently: the comparison above is not of two copies of one run
    assert read(tmp / "runs" / GOOD[0] / "seed-0", "history.json")["train_loss"] != \
        read(tmp / "runs" / GOOD[1] / "seed-0", "history.json")["train_loss"]


def test_rerun_skips_finished_trials_and_retries_the_rest(swept):
    tmp, args, _ = swept
    files = [os.path.join(tmp, "runs", n, f"seed-{s}", f) for n in GOOD for s in (0, 1)
             for f in ("metrics.json", "student.safetensors", "done.json")]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    bad_config = tmp / "runs" / BAD[0] / "seed-0" / "config.yaml"
    bad_before = os.stat(bad_config).st_mtime_ns
    # the finished grid points alone: nothing to run, no cluster
    p = cli(*[a if a != "data.train_size=300,100000" else "data.train_size=300" for a in args], cwd=tmp)
    assert p.returncode == 0, p.stderr
    assert "0 trials finished, 4 skipped (finished earlier), 0 failed" in p.stdout and "local cluster" not in p.stdout
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
    # an interrupted trial (no done.json) and the failed ones run again; the others are skipped
    os.remove(tmp / "runs" / GOOD[1] / "seed-1" / "done.json")
    p = cli(*args, cwd=tmp)
    assert p.returncode == 1
    assert "1 trials finished, 3 skipped (finished earlier), 4 failed" in p.stdout
    again = tmp / "runs" / GOOD[1] / "seed-1" / "metrics.json"
    assert os.stat(again).st_mtime_ns > before[str(again)]
    assert {f: os.stat(f).st_mtime_ns for f in files if not f.startswith(str(again.parent))} == \
        {f: t for f, t in before.items() if not f.startswith(str(again.parent))}
    assert os.stat(bad_config).st_mtime_ns > bad_before   # the failed trial was attempted again
    # a changed recipe is refused, not mixed into the old folders
    p = cli(*args, "--set", "epochs=2", cwd=tmp)
    assert p.returncode == 2 and "holds a finished run of another configuration" in p.stderr


KILLER = '''
import os
from distributed import WorkerPlugin


class Killer(WorkerPlugin):
    """Ends the worker process as the trial (T=4, seed 1) starts, counting the kills."""

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "options.T=4" in str(key) and "-seed-1-" in str(key):
            with open(COUNT, "a") as f:
                f.write("killed\\n")
            os._exit(1)


async def dask_setup(worker):
    await worker.plugin_add(Killer(), name="killer")
'''


def test_a_dying_worker_fails_its_trial_only(tmp_path):
    import dask
    import distributed  # noqa: F401  (its defaults in dask.config first: set() below restores what it found)
    killer = tmp_path / "killer.py"
    count = tmp_path / "kills.txt"
    killer.write_text(f"COUNT = {str(count)!r}\n" + KILLER)
    (tmp_path / "r.yaml").write_text(RECIPE)
    lines = []
    with dask.config.set({"distributed.worker.preload": [str(killer)]}):
        ts = recipes.sweep(tmp_path / "r.yaml", grid={"options.T": [2, 4]}, seeds=[0, 1], out=tmp_path / "runs",
                           workers=2, log=lines.append)
    assert [(t.name, t.seed, t.status) for t in ts] == [
        ("r-options.T=2", 0, "finished"), ("r-options.T=2", 1, "finished"),
        ("r-options.T=4", 0, "finished"), ("r-options.T=4", 1, "failed")]
    assert ts[3].error.startswith("KilledWorker") and "r-options.T=4 seed 1: FAILED: KilledWorker" in "\n".join(lines)
    assert count.read_text() == "killed\n"   # not retried on the other worker (which would die too)
    cores = recipes._cores()
    assert all(t.metrics["threads"] == max(1, cores // 2) for t in ts[:3])
    assert ts[0].folder == str(tmp_path / "runs" / "r-options.T=2" / "seed-0")
    assert read(ts[0].folder, "metrics.json")["test_acc"] == ts[0].metrics["test_acc"]


def test_a_scheduler_by_address_gets_the_thread_count_from_the_task(tmp_path):
    from distributed import LocalCluster
    (tmp_path / "r.yaml").write_text(RECIPE)
    # workers started with 2 OpenMP threads: only the task's own setting gives the 1 asked for
    # (1, not 2: two spinning OpenMP threads on a loaded 2-core machine are slow)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      env={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}) as cluster:
        ts = recipes.sweep(tmp_path / "r.yaml", seeds=[3], out=tmp_path / "runs", threads=1,
                           scheduler=cluster.scheduler_address)
        assert [(t.name, t.seed, t.status, t.metrics["threads"]) for t in ts] == [("r", 3, "finished", 1)]
        env = open(os.path.join(ts[0].folder, "env.txt")).read()
        assert "threads: 1" in env and "OMP_NUM_THREADS 2" in env
        ts = recipes.sweep(tmp_path / "r.yaml", seeds=[3], out=tmp_path / "runs", scheduler=cluster.scheduler_address)
        assert ts[0].status == "skipped" and ts[0].metrics["test_acc"] == read(ts[0].folder, "metrics.json")["test_acc"]
    with pytest.raises(recipes.RecipeError, match="^workers: only for the local cluster"):
        recipes.sweep(tmp_path / "r.yaml", out=tmp_path / "runs", workers=2, scheduler="tcp://127.0.0.1:1")


# ---- errors, before anything runs -----------------------------------------------------------

@pytest.mark.parametrize("grid, message", [
    (["method"], "error: --grid 'method': expected key.path=value1,value2,..."),
    (["=kd,dkd"], "error: --grid '=kd,dkd': expected key.path=value1,value2,..."),
    (["options..T=2"], "error: --grid 'options..T=2': expected key.path=value1,value2,..."),
    (["options.T=2,,4"], "error: --grid options.T: an empty value in '2,,4'"),
    (["options.T="], "error: --grid options.T: an empty value in ''"),
    (["options.T=2", "options.T=4"], "error: --grid options.T: given twice"),
    (["options.T=[2]"], "error: --grid options.T: '[2]' is not a scalar"),
    (["temperature=2,4"], "error: r.yaml [temperature=2]: temperature: unknown key; recipe keys: name,"),
    (["options.temperature=2"], "error: r.yaml [options.temperature=2]: options.temperature: not an option of "
                                "method 'kd'"),
    (["student.width=4,wide"], "error: r.yaml [student.width='wide']: student.width: expected an int >= 1, got 'wide'"),
    (["seeds=1,2"], "error: grid: seeds: set by the sweep"),
    (["options.T=2,2"], "error: grid: options.T: the value 2 appears twice"),
    (["student.model.x=1"], "error: r.yaml: grid student.model.x: student.model is not a mapping"),
    (["options=1", "options.T=2"], "error: grid: options.T lies inside options, also a grid key"),
])
def test_bad_grids_are_refused_naming_the_key(tmp_path, monkeypatch, capsys, grid, message):
    (tmp_path / "r.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "r.yaml"] + [x for g in grid for x in ("--grid", g)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_thread_and_worker_counts_are_checked(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    cores = recipes._cores()
    with pytest.raises(recipes.RecipeError, match=rf"^workers x threads: 2 workers x {cores} kdcore threads = "
                                                  rf"{2 * cores} > the {cores} cores here"):
        recipes.sweep(tmp_path / "r.yaml", out=tmp_path / "runs", workers=2, threads=cores)
    with pytest.raises(recipes.RecipeError, match="^workers: expected an int >= 1, got 0"):
        recipes.sweep(tmp_path / "r.yaml", out=tmp_path / "runs", workers=0)
    with pytest.raises(recipes.RecipeError, match="^grid: options.T: expected a non-empty list of values, got 2"):
        recipes.sweep(tmp_path / "r.yaml", grid={"options.T": 2}, out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    # the default: as many workers as cores, one thread each, or cores // workers threads
    assert recipes._plan_threads(None, None, True) == (cores, 1)
    assert recipes._plan_threads(1, None, True) == (1, cores)
    assert recipes._plan_threads(None, None, False) == (None, 1)


def test_trial_names_are_stable_and_filesystem_safe(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    ts = recipes.trials(tmp_path / "r.yaml", grid={"optimizer": ["sgd", {"name": "adam", "eps": 1e-7}],
                                                   "lr": [0.1, 5e-4]}, seeds=[1])
    names = [t.name for t in ts]
    assert names[0] == "r-optimizer=sgd-lr=0.1" and names[1] == "r-optimizer=sgd-lr=0.0005"
    assert names[2].startswith("r-optimizer=name_adam_eps_1e-07_") and names[2].endswith("-lr=0.1")
    assert recipes._slug("a b") != recipes._slug("a_b") and recipes._slug("") != recipes._slug(" ")
    assert len(set(names)) == 4
    assert all(all(c.isalnum() or c in "_.+=-" for c in n) for n in names)
    assert names == [t.name for t in recipes.trials(tmp_path / "r.yaml", grid={
        "optimizer": ["sgd", {"name": "adam", "eps": 1e-7}], "lr": [0.1, 5e-4]}, seeds=[1])]
    assert ts[2].cfg["optimizer"] == {"name": "adam", "eps": 1e-7} and ts[3].cfg["lr"] == 5e-4
    # without a grid, a sweep's folders are run's
    assert [t.folder for t in recipes.trials(tmp_path / "r.yaml", seeds=[0, 1], out="o")] == \
        [os.path.join("o", "r", "seed-0"), os.path.join("o", "r", "seed-1")]


def test_without_dask_the_error_names_the_package(tmp_path, monkeypatch, capsys):
    (tmp_path / "r.yaml").write_text(RECIPE)
    monkeypatch.setitem(sys.modules, "dask", None)          # as if dask were not installed
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install "dask\[distributed\]"'):
        recipes.sweep(tmp_path / "r.yaml", out=tmp_path / "runs", workers=1)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "r.yaml", "--grid", "options.T=2,4", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert 'error: kdcore sweeps run on Dask, which is not installed: pip install "dask[distributed]"' in err
    assert not (tmp_path / "runs").exists()
