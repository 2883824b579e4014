"""The study scripts on benchmarks/studylib.py: study_teacher_size.py (R1), study_multi_teacher.py
(R4), study_datafree.py (R5), study_features.py (R6), study_regularised_kd.py (R8),
study_online.py (R2, R7) and study_self_distill.py (R3). Each runs --quick end to end (every
row of its grid finishes and lands in the Markdown section, with a figure and a time estimate);
each grid holds the recipes its docstring describes; and the report's logic -- paired
differences, the choice of the baseline, the verdicts -- is checked on fabricated run results,
where the verdicts must flip with the numbers."""
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lib = _load("studylib")
r1 = _load("study_teacher_size")
r4 = _load("study_multi_teacher")
r5 = _load("study_datafree")
r6 = _load("study_features")
r8 = _load("study_regularised_kd")
r2 = _load("study_online")
r3 = _load("study_self_distill")
STUDIES = {"r1": (r1, "study_teacher_size_quick.png"), "r4": (r4, "study_multi_teacher_quick.png"),
           "r5": (r5, "study_datafree_quick.png"), "r6": (r6, "study_features_quick.png"),
           "r8": (r8, "study_regularised_kd_quick.png"), "r2": (r2, "study_online_quick.png"),
           "r3": (r3, "study_self_distill_quick.png")}
NOISE = (0.0, 0.004, -0.003)   # per seed, so that the paired differences have a spread


def fake_runs(out, grid, best, teacher_acc=None, ece=None, cpu=None):
    """Finished-run folders for a grid: best[row] is the mean best-epoch accuracy, shifted per
    seed by NOISE[seed] (the same shift in every row, so the rows' paired differences are
    exact); teacher_acc[row] and ece[row] likewise without noise; cpu[row] = (the run's CPU
    seconds, its teacher's or None)."""
    accs = {}
    for i, (row, (_, cfg)) in enumerate(grid.items()):
        if row not in best:
            continue
        for seed in cfg["seeds"]:
            folder = os.path.join(out, cfg["name"], f"seed-{seed}")
            os.makedirs(folder)
            # a different shift per row too, small, so that a difference's interval is not zero-width
            acc = best[row] + NOISE[seed] + 0.001 * seed * (i % 3)
            accs.setdefault(row, []).append(acc)
            m = dict(recipe=cfg["name"], method=cfg["method"], seed=seed, best_test_acc=acc, last_test_acc=acc,
                     best_test_ece=(ece or {}).get(row, 0.05) + NOISE[seed] / 4, best_test_agreement=0.9,
                     report=dict(teacher_accuracy=(teacher_acc or {}).get(row, math.nan)))
            run_s, teacher_s = (cpu or {}).get(row, (60.0, None))
            m.update(cpu_time=run_s, teacher=None if teacher_s is None else dict(source="cache", cpu_time=teacher_s))
            for name, obj in (("metrics.json", m), ("done.json", dict(config_sha256="x"))):
                with open(os.path.join(folder, name), "w") as f:
                    json.dump(obj, f)
    return accs


def fake_report(mod, out, grid, best, **kw):
    """The report of ``mod`` (a study script) on fake_runs(out, grid, best, **kw)."""
    fake_runs(out, grid, best, **kw)
    return mod.report(grid, str(out))


def mean_diff(accs, row, base):
    """The mean paired difference in points, as the table prints it."""
    return f"{100 * sum(a - b for a, b in zip(accs[row], accs[base])) / len(accs[row]):+.2f}"


@pytest.mark.parametrize("key", sorted(STUDIES))
def test_quick_run_end_to_end(key, tmp_path, capsys):
    mod, fig = STUDIES[key]
    out_md = tmp_path / "S.md"
    mod.main(["--quick", "--threads", "1", "--runs", str(tmp_path / "runs"), "--out", str(out_md),
              "--figures", str(tmp_path / "fig")])
    text = out_md.read_text()
    grid = mod.build_grid([0], quick=True)
    for row in grid:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row} |"))
        assert "not run" not in line and " ± " in line, line
    assert "Verdict on" in text and "--quick" in text
    assert (tmp_path / "fig" / fig).stat().st_size > 0
    assert "Estimated time of the full study" in capsys.readouterr().out


def test_teacher_size_grid():
    grid = r1.build_grid()
    assert list(grid) == ["scratch", "kd-w64", "kd-w256", "kd-w1200", "kd-w1200-early"]
    cfg = {row: c for row, (_, c) in grid.items()}
    for w in (64, 256, 1200):
        t = cfg[f"kd-w{w}"]["teacher"]
        assert (t["hidden"], t["epochs"], t["dropout"], t.get("snapshot")) == ([w, w], 20, 0.2, None)
        assert cfg[f"kd-w{w}"]["options"] == dict(T=4.0, ce_weight=0.1, kd_weight=0.9)
    assert cfg["kd-w1200-early"]["teacher"] == dict(cfg["kd-w1200"]["teacher"], snapshot=5)
    assert cfg["scratch"]["teacher"] is None
    for c in cfg.values():
        assert c["student"] == dict(model="mlp", hidden=[256]) and c["epochs"] == 20 and c["lr"] == 0.05
        assert c["data"]["train_size"] == 6000 and c["data"]["val_split"] == 5000 and c["seeds"] == [0, 1, 2]
    assert r1.teacher_params(1200) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10


@pytest.mark.parametrize("accs, verdict", [
    (dict(w64=0.80, w256=0.85, w1200=0.82), "supported"),
    (dict(w64=0.80, w256=0.82, w1200=0.85), "contradicted"),
    (dict(w64=0.84, w256=0.82, w1200=0.83), "not shown"),      # falls, then rises
    (dict(w64=0.86, w256=0.85, w1200=0.80), "not shown"),      # falls: the middle does not beat the narrowest
])
def test_teacher_size_verdict_follows_the_numbers(tmp_path, accs, verdict):
    grid = r1.build_grid()
    best = {f"kd-{k}": v for k, v in accs.items()}
    best.update({"scratch": 0.78, "kd-w1200-early": accs["w1200"] + 0.01})
    runs = fake_runs(tmp_path, grid, best, teacher_acc={f"kd-{k}": 0.9 for k in accs})
    text = r1.report(grid, str(tmp_path))
    assert f"grows\": **{verdict}**" in text
    assert "teacher stopped early" in text and "**higher**" in text.split("Remedy")[1]
    line = next(ln for ln in text.splitlines() if ln.startswith("| kd-w256 |"))
    assert f"| {mean_diff(runs, 'kd-w256', 'kd-w1200')} | [" in line


def test_multi_teacher_grid():
    grid = r4.build_grid()
    cfg = {row: c for row, (_, c) in grid.items()}
    assert list(grid) == ["scratch", "kd-t0", "kd-t1", "kd-t2", "kd-t3", "kd-m2", "kd-m4"]
    for s in range(4):
        t = cfg[f"kd-t{s}"]["teacher"]
        assert (t["seed"], t["hidden"], t["epochs"], t["dropout"]) == (s, [1200, 1200], 10, 0.2)
    assert cfg["kd-m2"]["teacher"]["seed"] == [0, 1] and cfg["kd-m4"]["teacher"]["seed"] == [0, 1, 2, 3]
    assert {k: v for k, v in cfg["kd-m4"]["teacher"].items() if k != "seed"} == \
        {k: v for k, v in cfg["kd-t0"]["teacher"].items() if k != "seed"}
    assert cfg["kd-m4"]["options"] == cfg["kd-t0"]["options"] == dict(T=4.0, ce_weight=0.1, kd_weight=0.9)


@pytest.mark.parametrize("m4, verdict", [(0.86, "supported"), (0.80, "contradicted"), (0.83, "not shown")])
def test_multi_teacher_baseline_and_verdict(tmp_path, m4, verdict):
    grid = r4.build_grid()
    # teacher 2 is the most accurate teacher, teacher 1's student the best single student: the
    # baseline is chosen on the teachers' accuracy
    best = {"scratch": 0.78, "kd-t0": 0.82, "kd-t1": 0.84, "kd-t2": 0.83, "kd-t3": 0.82, "kd-m2": 0.83, "kd-m4": m4}
    teachers = {"kd-t0": 0.89, "kd-t1": 0.88, "kd-t2": 0.90, "kd-t3": 0.885, "kd-m2": 0.9, "kd-m4": 0.91}
    runs = fake_runs(tmp_path, grid, best, teacher_acc=teachers)
    text = r4.report(grid, str(tmp_path))
    assert "Δ vs kd-t2 (points)" in text and "teacher): kd-t2" not in text and "of the four): kd-t2." in text
    assert f"single one\": **{verdict}**" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| kd-m4 |"))
    assert "| 40 |" in line   # four teachers x 10 epochs over the 60,000 images
    assert f"| {mean_diff(runs, 'kd-m4', 'kd-t2')} | [" in line


def test_regularised_kd_grid():
    grid = r8.build_grid()
    cfg = {row: c for row, (_, c) in grid.items()}
    assert list(grid) == ["scratch", "scratch-ls0.1", "scratch-ls0.2", "kd-e5", "kd-e10", "kd-e20", "kd-e20-ls0.1",
                          "kd-e20-ls0.2", "tfkd-reg"]
    assert cfg["kd-e5"]["teacher"] == dict(cfg["kd-e20"]["teacher"], snapshot=5)
    assert cfg["kd-e10"]["teacher"] == dict(cfg["kd-e20"]["teacher"], snapshot=10)
    assert cfg["kd-e20"]["teacher"]["epochs"] == 20 and "snapshot" not in cfg["kd-e20"]["teacher"]
    assert cfg["scratch-ls0.2"]["options"] == dict(label_smoothing=0.2)
    assert cfg["kd-e20-ls0.1"]["options"] == dict(T=4.0, ce_weight=0.1, kd_weight=0.9, label_smoothing=0.1)
    assert cfg["tfkd-reg"]["method"] == "tf_kd_reg" and cfg["tfkd-reg"]["teacher"] is None
    quick = {row: c for row, (_, c) in r8.build_grid([0], quick=True).items()}
    assert [quick[r]["teacher"].get("snapshot") for r in ("kd-e5", "kd-e10", "kd-e20")] == [1, 2, None]


def test_regularised_kd_verdicts_follow_the_numbers(tmp_path):
    grid = r8.build_grid()
    best = {"scratch": 0.80, "scratch-ls0.1": 0.81, "scratch-ls0.2": 0.81, "kd-e5": 0.85, "kd-e10": 0.83,
            "kd-e20": 0.83, "kd-e20-ls0.1": 0.80, "kd-e20-ls0.2": 0.83, "tfkd-reg": 0.82}
    fake_runs(tmp_path, grid, best, ece={"scratch": 0.10, "tfkd-reg": 0.03, "kd-e20": 0.05})
    text = r8.report(grid, str(tmp_path))
    assert "converged one\" (accuracy): **supported**" in text
    assert "label smoothing 0.1 on the student helps KD\" (accuracy): **contradicted**" in text
    assert "label smoothing 0.2 on the student helps KD\" (accuracy): **not shown**" in text
    assert "student alone\" (accuracy): **supported**" in text
    assert "alone's: **lower**" in text   # Tf-KD_reg's ECE below the student alone's
    line = next(ln for ln in text.splitlines() if ln.startswith("| tfkd-reg |"))
    assert "3.01 ± " in line and "-2.00 [" in line   # ECE in % (0.03 + the mean noise / 4), its difference to kd-e20
    # the claims flip with the numbers
    text = fake_report(r8, tmp_path / "flip", grid, dict(best, **{"kd-e5": 0.80, "kd-e10": 0.81, "tfkd-reg": 0.78}))
    assert "converged one\" (accuracy): **contradicted**" in text
    assert "student alone\" (accuracy): **contradicted**" in text


def test_features_grid():
    grid = r6.build_grid()
    cfg = {row: c for row, (_, c) in grid.items()}
    methods = ["kd"] + list(r6.FEATURES)
    labelled = [f"{m}-w{w}-l{p}" for p in (100, 10, 1) for w in (256, 1200) for m in methods]
    free = [f"free-{m}" for m in ["kd"] + list(r6.FREE)]
    assert sorted(grid) == sorted(labelled + [f"scratch-l{p}" for p in (100, 10, 1)] + free)
    for p, n in ((100, 6000), (10, 600), (1, 60)):
        assert cfg[f"scratch-l{p}"]["data"]["train_size"] == n and cfg[f"scratch-l{p}"]["teacher"] is None
        for w in (256, 1200):
            for m in methods:
                c = cfg[f"{m}-w{w}-l{p}"]
                assert c["data"]["train_size"] == n and c["data"]["val_split"] == 5000
                assert (c["teacher"]["hidden"], c["teacher"]["epochs"]) == ([w, w], 20)
            assert cfg[f"kd-w{w}-l{p}"]["options"] == dict(T=4.0, ce_weight=0.1, kd_weight=0.9)
            sp = cfg[f"sp-w{w}-l{p}"]["losses"]
            assert sp == [dict(kind="CE", weight=1.0), dict(kind="SP", weight=3000.0, taps="2", teacher_taps="5")]
    for row in free:   # no CE term: the loss reads no label
        c = cfg[row]
        assert len(c["losses"]) == 1 and c["losses"][0]["kind"] != "CE"
        assert c["data"]["train_size"] == 6000 and c["teacher"]["hidden"] == [1200, 1200]
    assert cfg["free-pkt"]["losses"] == [dict(kind="PKT", weight=30000.0, taps="2", teacher_taps="5")]
    assert list(grid).index("free-kd") < list(grid).index("scratch-l10")   # the label-free arm runs second
    quick = {row: c for row, (_, c) in r6.build_grid([0], quick=True).items()}
    assert [quick[f"scratch-l{p}"]["data"]["train_size"] for p in (100, 10, 1)] == [1000, 100, 10]


def test_features_verdicts_follow_the_numbers(tmp_path):
    grid = r6.build_grid()
    base = {f"{m}-w{w}-l{p}": 0.80 for p in (100, 10, 1) for w in (256, 1200) for m in ["kd"] + list(r6.FEATURES)}
    # PKT beats KD by 3 points with the wide teacher, by 1 with the narrow one, at every fraction
    for p in (100, 10, 1):
        base[f"pkt-w1200-l{p}"], base[f"pkt-w256-l{p}"] = 0.83, 0.81
    fake_runs(tmp_path, grid, base)
    text = r6.verdicts(grid, str(tmp_path))
    # (fake_runs shifts each row by up to 0.2 points per seed)
    assert "teacher w1200, 100% labels: **supported** (best feature method pkt: Δ +3.10 points vs KD" in text
    assert "teacher w256, 1% labels: **supported** (best feature method pkt: Δ +0.80" in text
    assert text.count("with w1200 minus the same with w256): **supported**") == 3 and "pkt +2.00 [+2.00" in text
    # every feature method below KD: contradicted; no gap effect: not shown
    low = {k: (0.78 if not k.startswith("kd-") else 0.80) for k in base}
    other = tmp_path / "low"
    fake_runs(other, grid, low)
    text = r6.verdicts(grid, str(other))
    assert "teacher w1200, 10% labels: **contradicted**" in text and "**supported**" not in text
    assert "capacity gap\" (100% labels" in text and "**not shown**" in text


def test_features_probe_table_and_paired():
    grid = r6.build_grid()
    rnd = {0: 0.70, 1: 0.71, 2: 0.69}
    got = {"random": rnd, "scratch-l100": {s: v + 0.15 for s, v in rnd.items()},
           "free-kd": {s: v + 0.10 for s, v in rnd.items()},
           "free-pkt": {0: 0.80, 1: 0.805, 2: 0.79}, "free-sp": {0: 0.69, 1: 0.705, 2: 0.689}}
    text = r6.probe_table(grid, got)
    assert "features teach without labels\" (a feature-only student's probe above the random student's): " \
           "**supported** (higher: free-pkt)" in text
    assert "Against the CE student's probe: higher: none; lower: free-sp, free-pkt." in text
    assert "| free-rkd | not run |" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| free-pkt |"))
    assert "| +9.83 | [" in line   # (0.10 + 0.095 + 0.10) / 3 points over random
    # paired() gives recipes.compare's interval on the same numbers
    d = lib.paired({0: 0.80, 1: 0.83, 2: 0.81}, {0: 0.79, 1: 0.80, 2: 0.80})
    diffs = [0.01, 0.03, 0.01]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 2)
    assert d["n"] == 3 and math.isclose(d["diff_mean"], m)
    assert math.isclose(d["ci_high"] - m, 4.302652729911275 * sd / math.sqrt(3), rel_tol=1e-6)
    assert lib.paired({0: 0.8}, {1: 0.7})["n"] == 0 and math.isnan(lib.paired({0: 0.8}, {0: 0.7})["ci_low"])


def test_features_hidden_features_are_the_hidden_layer():
    import numpy as np
    from kdcore import datasets, models
    data = datasets.from_arrays(np.random.default_rng(0).random((37, 784), dtype=np.float32),
                                np.arange(37) % 10, normalize=None)
    m = models.mlp([784, 256, 10], seed=3)
    p = m.parameters()
    want = np.maximum(data.X @ p["1.weight"].T + p["1.bias"], 0)
    got = r6.hidden_features(m, data, chunk=16)   # chunks that do not divide the set
    assert got.shape == (37, 256) and np.allclose(got, want, atol=1e-4)


def test_verdict_and_claim_wording():
    d = dict(n=3, diff_mean=0.01, ci_low=0.002, ci_high=0.018)
    assert lib.verdict(d) == "higher" and lib.claim([d]) == "supported"
    low = dict(d, diff_mean=-0.01, ci_low=-0.018, ci_high=-0.002)
    assert lib.verdict(low) == "lower" and lib.claim([low]) == "contradicted"
    cover = dict(d, ci_low=-0.001)
    assert lib.verdict(cover) == "no difference shown" and lib.claim([cover, low]) == "not shown"
    assert lib.claim([low, d]) == "supported"
    one = dict(n=1, diff_mean=0.01, ci_low=math.nan, ci_high=math.nan)
    assert lib.verdict(one) == "no difference shown" and lib.ci_text(one) == ("+1.00", "n/a")
    assert lib.claim([]) == "not shown" and lib.verdict(None) == "no difference shown"
    assert lib.mean_std([0.5, 0.7]) == "60.00 ± 10.00" and lib.mean_std([None]) == ""


def test_online_grid():
    grid = r2.build_grid()
    cfg = {row: c for row, (_, c) in grid.items()}
    assert list(grid) == ["scratch", "scratch-ls0.1", "kd", "kd-e5", "dml", "dml-big", "tfkd-self", "tfkd-reg",
                          "born-again"]
    assert cfg["kd-e5"]["teacher"] == dict(cfg["kd"]["teacher"], snapshot=5)
    assert cfg["kd"]["teacher"]["hidden"] == [1200, 1200] and cfg["kd"]["options"] == lib.KD
    assert cfg["dml"]["method"] == "mutual" and cfg["dml"]["options"] == {}
    assert cfg["dml-big"]["options"]["peer_model"] == dict(model="mlp", hidden=[1200, 1200], dropout=0.2)
    assert cfg["born-again"]["options"] == dict(generations=2)
    for row in ("scratch", "dml", "dml-big", "tfkd-self", "tfkd-reg", "born-again"):
        assert cfg[row]["teacher"] is None, row
    assert {c["student"]["hidden"][0] for c in cfg.values()} == {256} and {c["epochs"] for c in cfg.values()} == {20}


def test_online_report_follows_the_numbers(tmp_path):
    grid = r2.build_grid()
    best = {"scratch": 0.80, "scratch-ls0.1": 0.81, "kd": 0.84, "kd-e5": 0.82, "dml": 0.86, "dml-big": 0.83,
            "tfkd-self": 0.82, "tfkd-reg": 0.78, "born-again": 0.80}
    text = fake_report(r2, tmp_path, grid, best, cpu={"kd": (30.0, 120.0), "kd-e5": (30.0, 30.0)})
    assert "offline KD\" (DML rows against kd): **supported**" in text
    assert "converged one\": **contradicted**" in text
    assert "\"scratch-ls0.1 improves on the student alone\": **supported**" in text
    assert "\"tfkd-reg improves on the student alone\": **contradicted**" in text
    # tfkd-self: +2.0 points of KD's +4.2 (fake_runs shifts kd's seeds by 0.001 * seed * 2)
    assert "by the means, 48% of KD's gain over the student alone" in text
    assert "same architecture\" (against the student alone): **not shown**" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| kd |"))
    assert "| 0.50 + 2.00 = 2.50 |" in line   # the run's CPU minutes plus its teacher's
    assert "| 1.00 |" in next(ln for ln in text.splitlines() if ln.startswith("| dml |"))
    assert "| one (F3) | ONE" in text and "not in kdcore" in text
    text = fake_report(r2, tmp_path / "flip", grid, dict(best, **{"dml": 0.80, "dml-big": 0.79, "kd-e5": 0.86}))
    assert "offline KD\" (DML rows against kd): **contradicted**" in text
    assert "converged one\": **supported**" in text


def test_self_distill_grid():
    grid = r3.build_grid()
    cfg = {row: c for row, (_, c) in grid.items()}
    assert list(grid) == ["scratch", "scratch-2x", "ls0.1-2x", "born-again", "independent", "snapshot", "tfkd-self"]
    assert cfg["born-again"]["options"] == dict(generations=5)
    assert cfg["independent"]["options"] == dict(generations=5, kd_weight=0.0)
    assert cfg["snapshot"]["options"] == dict(cycles=2) and cfg["snapshot"]["epochs"] == 40
    assert cfg["scratch-2x"]["epochs"] == cfg["ls0.1-2x"]["epochs"] == 40 and cfg["tfkd-self"]["epochs"] == 20
    assert all(c["teacher"] is None for c in cfg.values())


def test_self_distill_report_follows_the_numbers(tmp_path):
    grid = r3.build_grid()
    best = {row: 0.85 for row in grid}
    out = tmp_path / "r3"
    fake_runs(out, grid, best)
    # generation k's accuracy 0.85 + 0.01 k; the ensembles: born-again's above the independent ones' by 0.02
    # at k >= 2 (and a seed-dependent spread); sharpness: snapshot flatter than scratch
    for row, (_, cfg) in grid.items():
        for seed in cfg["seeds"]:
            folder = out / cfg["name"] / f"seed-{seed}"
            inc = {"snapshot": 0.05, "born-again": 0.2}.get(row, 0.1) + 0.001 * seed
            m = dict(key=dict(sigmas=list(r3.SIGMAS), draws=r3.DRAWS),
                     sharpness=dict(nll=0.4, increase=[inc / 2, inc, 2 * inc], increase_std=[0, 0, 0]))
            if row in ("born-again", "independent"):
                up = 0.02 if row == "born-again" else 0.0
                m.update(generation_acc=[0.85 + 0.01 * k for k in range(5)],
                         ensemble_acc=[0.86 + (up if k >= 2 else 0) + 0.002 * seed * (k % 2) for k in range(1, 5)])
                with open(folder / "metrics.json") as f:
                    met = json.load(f)
                met["stage_last_test_acc"] = [0.85 + 0.01 * k + 0.001 * seed for k in range(5)]
                with open(folder / "metrics.json", "w") as f:
                    json.dump(met, f)
            with open(folder / "measures.json", "w") as f:
                json.dump(m, f)
    text = r3.report(grid, str(out))
    assert "independent models\" (k = 2..4): **contradicted**" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| 3 |"))
    assert line.startswith("| 3 | 88.00 ± 0.00 | 88.00 ± 0.00 |") and "| +2.00 | [" in line
    at = f"(loss increase at sigma {r3.SIGMA_VERDICT:g})"
    assert f"\"snapshot reaches a flatter minimum than scratch\" {at}: **supported**" in text
    assert f"\"tfkd-self reaches a flatter minimum than born-again\" {at}: **supported**" in text
    assert f"\"tfkd-self reaches a flatter minimum than scratch\" {at}: **not shown**" in text
    # one-stage last-epoch accuracy (0.85 + noise) below born-again generation 1 (0.86) and 4 (0.89)
    assert "snapshot against born-again generation 1 (equal compute), last-epoch accuracy: **lower**" in text
    assert "| born-again | " in text and "| 100 | 1.00 |" in text   # 5 x 20 model-epochs, 60 CPU s


def test_datafree_grid(tmp_path):
    from kdcore import recipes
    grid = r5.build_grid(runs=str(tmp_path))
    cfg = {row: c for row, (_, c) in grid.items()}
    assert list(grid) == ["real-all", "real-256", "real-1024", "deepinversion-256", "deepinversion-1024", "noise-1024",
                          "halfclass-1024"]
    teacher = cfg["real-all"]["teacher"]
    assert (teacher["model"], teacher["width"], teacher["epochs"], teacher.get("train_size")) == ("cnn", 32, 5, None)
    path = recipes.teacher_path(cfg["real-all"], tmp_path / "_teachers")
    sources = set()
    for row, c in cfg.items():
        # every row: the same student, loss and number of steps; no validation split
        assert c["student"] == dict(model="cnn", width=16) and c["method"] == "kd"
        assert {k: v for k, v in c["options"].items() if k not in ("max_steps", "cache")} == \
            dict(T=4.0, ce_weight=0.0, kd_weight=1.0)
        assert c["epochs"] * lib.epoch_images(c) // c["batch_size"] == 320 and c["data"]["val_split"] is None
        assert c["seeds"] == [0, 1, 2] and c["data"]["test_size"] is None
        if row.startswith("real"):
            assert c["teacher"] == teacher and c["data"]["source"] == "fashion_mnist"
        else:
            # the transfer sets' rows load the real rows' teacher from the cache
            assert {k: c["teacher"][k] for k in ("model", "width", "checkpoint")} == dict(model="cnn", width=32,
                                                                                        checkpoint=path)
            assert c["data"]["source"].startswith(str(tmp_path / "pools")) and lib.teacher_sections(c) == []
            sources.add(c["data"]["source"])
    assert len(sources) == 3
    assert (cfg["real-256"]["data"]["train_size"], cfg["real-256"]["data"]["repeat"]) == (256, 20)
    assert cfg["real-all"]["data"]["train_size"] is None and cfg["real-all"]["options"]["max_steps"] == 40
    assert cfg["deepinversion-256"]["data"]["source"] == cfg["deepinversion-1024"]["data"]["source"]
    # a quick grid: other sets, the same row names
    quick = r5.build_grid([0], quick=True, runs=str(tmp_path))
    assert list(quick) == list(grid) and quick["deepinversion-256"][1]["data"]["source"] not in sources


@pytest.mark.parametrize("di, verdict", [(0.70, "supported"), (0.05, "contradicted"), (0.30, "not shown")])
def test_datafree_verdicts_follow_the_numbers(tmp_path, di, verdict):
    grid = r5.build_grid(runs=str(tmp_path / "runs"))
    best = {"real-all": 0.88, "real-256": 0.80, "real-1024": 0.85, "deepinversion-256": di - 0.05,
            "deepinversion-1024": di, "noise-1024": 0.30, "halfclass-1024": 0.60}
    runs = fake_runs(str(tmp_path / "out"), grid, best)
    text = r5.report(grid, str(tmp_path / "out"))
    assert f"teach more than noise\" at 1024 images: **{verdict}** (Δ {mean_diff(runs, 'deepinversion-1024', 'noise-1024')}" \
        in text
    assert "as many real ones at 1024: **lower**" in text and "more synthetic images help\" (1024 against 256): " \
        "**supported**" in text
    assert f"against DeepInversion's **{'lower' if di > 0.6 else 'higher'}**" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| halfclass-1024 |"))
    assert f"| {mean_diff(runs, 'halfclass-1024', 'real-1024')} [" in line
    assert f"| {mean_diff(runs, 'halfclass-1024', 'real-all')} | [" in line
