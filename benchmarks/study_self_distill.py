"""Born-again generations or one-stage self-distillation? (study R3). Each generation's
accuracy, ensembles of generations against ensembles of independently trained models, the
one-stage alternatives at equal compute, and a sharpness proxy. A grid of recipes run over
seeds by kdcore.recipes (benchmarks/studylib.py), then a report.

    python benchmarks/study_self_distill.py [--seeds 0,1,2] [--workers N] [--runs build/study_self_distill]
                                            [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

The claims checked: (1) an ensemble of born-again generations is no better than an ensemble
of the same number of models trained independently from the labels; (2) one-stage
self-distillation (snapshot distillation, Tf-KD_self) is cheaper than born-again generations
for what it gains; (3) it reaches flatter minima.

Setting (Fashion-MNIST, the student of the mlp pair of the other studies; no teacher): mlp
784-256-10 on 6,000 labelled images drawn with the seed, E = 20 epochs per model (a stage),
lr 0.05, SGD momentum 0.9, weight decay 5e-4, cosine, batch 128; a 5,000-image validation split
carved with the seed picks the reported epoch; test on all 10,000 test images. Rows:
scratch (E epochs), scratch for 2E epochs and label smoothing 0.1 for 2E epochs (the student
alone at the compute of two stages); born-again (kdcore.born_again, 5 generations: generation
0 from the labels, generations 1-4 each distilled from the one before with CE 1 + KL 1 at T 1;
generation k is model.fresh(seed + k) trained with the seed + k); independent (the same call
with kd_weight 0: generation k is the same initial model and batch order trained on the labels
alone, an ensemble member "with a different seed"); snapshot distillation (kdcore.snapshot_distill,
2 cosine cycles of E epochs, the second distilled from the first's end, CE 0.1 + KD 0.9, T 4);
Tf-KD_self (kdcore.tf_kd mode 'self': a copy pretrained E epochs, then E epochs from it, alpha
0.95, T 6). The born-again and independent rows report their last generation (5E epochs in
all); their earlier generations are kept in the run folders (stage-<k>.safetensors).

Read-outs: test accuracy at the best validation epoch (table 1), paired differences to the
student alone; each generation's test accuracy after its last epoch and the accuracy of the
ensemble of generations 1..k (the mean of their softmax probabilities; kdcore.predict, combined
in numpy) against the ensemble of independent models 1..k, paired by seed (table 2); the
sharpness proxy kdcore.metrics.weight_noise_sharpness of each row's reported model on the
test set (the mean test-loss increase under per-tensor Gaussian weight noise of relative scale
sigma, SIGMAS, DRAWS draws, noise seed 0); CPU minutes per run. Ensembles and sharpness are
computed once per run and stored in its folder (measures.json).

Budget: --quick (1 seed, 2 epochs per stage, student 1,000 images, validation 1,000, test
2,000) extrapolates the full study's CPU time on one core (studylib.extrapolate).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

BASELINE = "scratch"
GENERATIONS = 5        # generation 0 (labels) and born-again generations 1-4
# Relative weight-noise scales: below 0.1 the test loss of the trained mlp barely moves (under
# 0.003 nats), at 0.4 it rises by a few hundredths, at 0.8 by over a tenth.
SIGMAS = (0.1, 0.2, 0.4)
DRAWS = 10
SIGMA_VERDICT = 0.4    # the noise scale of the sharpness verdicts
ONE_STAGE = ("snapshot", "tfkd-self")
LS = 0.1


def build_grid(seeds=(0, 1, 2), quick=False):
    """The study's recipes, validated: {row: (what, recipe)} in table order."""
    base = lib.mlp_base(seeds, quick)
    e = base["epochs"]
    rows = [("scratch", f"the student alone, {e} epochs", dict(method="scratch")),
            ("scratch-2x", f"the student alone, {2 * e} epochs", dict(method="scratch", epochs=2 * e)),
            (f"ls{LS:g}-2x", f"label smoothing {LS:g}, {2 * e} epochs",
             dict(method="scratch", epochs=2 * e, options=dict(label_smoothing=LS))),
            ("born-again", f"born-again generation {GENERATIONS - 1} ({GENERATIONS} x {e} epochs)",
             dict(method="born_again", options=dict(generations=GENERATIONS))),
            ("independent", f"independent model {GENERATIONS - 1} (born-again's call, KD weight 0)",
             dict(method="born_again", options=dict(generations=GENERATIONS, kd_weight=0.0))),
            ("snapshot", f"snapshot distillation, 2 cycles x {e} epochs (T 4)",
             dict(method="snapshot_distill", epochs=2 * e, options=dict(cycles=2))),
            ("tfkd-self", f"Tf-KD_self: {e} epochs from a copy pretrained {e} epochs (alpha 0.95, T 6)",
             dict(method="tf_kd_self"))]
    return lib.validated(rows, base, "r3", "study_self_distill")


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def measures(cfg, folder, seed, cache):
    """The run's ensembles and sharpness, computed once and stored in <folder>/measures.json:
    ``sharpness`` (weight_noise_sharpness of the reported model), and for a born_again run
    ``generation_acc`` (each generation's test accuracy) and ``ensemble_acc`` (k = 1..: the
    accuracy of the mean softmax of generations 1..k)."""
    import kdcore
    from kdcore import recipes
    path = os.path.join(folder, "measures.json")
    key = dict(sigmas=list(SIGMAS), draws=DRAWS)
    if os.path.exists(path):
        with open(path) as f:
            m = json.load(f)
        if m.get("key") == key:
            return m
    p = recipes.prepare(cfg, seed, cache, train_teacher=False)
    test = p["test"]

    def model(name):
        m_ = p["student"].fresh()
        kdcore.load(os.path.join(folder, name), m_)
        return m_

    final = model("student.safetensors")
    s = kdcore.metrics.weight_noise_sharpness(final, test, sigmas=SIGMAS, draws=DRAWS, seed=0)
    out = dict(key=key, sharpness=dict(nll=s["nll"], increase=s["increase"], increase_std=s["increase_std"]))
    if cfg["method"] == "born_again":
        n = cfg["options"]["generations"]
        gens = [model(f"stage-{k}.safetensors") for k in range(n - 1)] + [final]
        probs = [_softmax(kdcore.predict(g, test, batch_size=512)) for g in gens]
        out["generation_acc"] = [float(np.mean(q.argmax(1) == test.y)) for q in probs]
        out["ensemble_acc"] = [float(np.mean(np.mean(probs[1:k + 1], axis=0).argmax(1) == test.y)) for k in range(1, n)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)
    return out


def all_measures(grid, out, cache):
    """{row: [measures per seed]} of the rows whose runs are all finished."""
    from kdcore import recipes
    res = {}
    for row, (_, cfg) in grid.items():
        folders = [recipes.run_dir(out, cfg, s) for s in cfg["seeds"]]
        if all(os.path.exists(os.path.join(f, "done.json")) for f in folders):
            res[row] = [measures(cfg, f, s, cache) for f, s in zip(folders, cfg["seeds"])]
    return res


def cache_of(out):
    """The teacher cache run_study uses for the runs under ``out`` (no teacher is trained here;
    prepare wants the folder)."""
    return os.path.join(os.path.dirname(out), "_teachers")


def report(grid, out):
    """The two tables and the verdicts, as Markdown."""
    from kdcore import recipes
    ms = all_measures(grid, out, cache_of(out))
    j = SIGMAS.index(SIGMA_VERDICT)

    def sharp(row):
        return [m["sharpness"]["increase"][j] for m in ms.get(row, [])]

    def sharp_cell(row, g, runs):
        return " / ".join(lib.mean_std([m["sharpness"]["increase"][i] for m in ms.get(row, [])], 1.0, 3)
                          for i in range(len(SIGMAS)))

    def d_sharp(row, g, runs):
        if row == BASELINE or row not in ms or BASELINE not in ms:
            return ""
        return " ".join(nats(recipes.paired(sharp(row), sharp(BASELINE))))

    def cpu(row, g, runs):
        return f"{sum(m['cpu_time'] for m in runs) / len(runs) / 60:.2f}"

    def epochs(row, g, runs):
        cfg = grid[row][1]
        k = cfg["options"].get("generations", 1) if cfg["method"] == "born_again" else \
            2 if cfg["method"] == "tf_kd_self" else 1
        return str(k * cfg["epochs"])

    sig = ", ".join(f"{s:g}" for s in SIGMAS)
    text = lib.table(grid, out, BASELINE, extra=[
        ("model-epochs", epochs), ("CPU min per run", cpu),
        (f"test-loss increase under weight noise, sigma {sig} (nats)", sharp_cell),
        (f"Δ increase vs {BASELINE} at sigma {SIGMA_VERDICT:g} (95% CI)", d_sharp)])
    text += "\n" + generations_table(ms) + "\n" + verdicts(ms, grid, out)
    return text


def nats(d):
    """(a paired difference of loss increases, its 95% interval), in nats, as text."""
    ci = "n/a" if np.isnan(d["ci_low"]) else f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
    return f"{d['diff_mean']:+.4f}", ci


def generations_table(ms):
    """Table 2: per generation k, born-again's and the independent models' accuracy and their
    ensembles of 1..k, with the paired difference of the ensembles."""
    if "born-again" not in ms or "independent" not in ms:
        return "Table 2 (generations): not run.\n"
    ban, ind = ms["born-again"], ms["independent"]
    lines = ["| k | born-again generation k | independent model k | ensemble of born-again 1..k | ensemble of "
             "independent 1..k | Δ ensembles (points) | 95% CI |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in range(len(ban[0]["generation_acc"])):
        cells = [str(k), lib.mean_std([m["generation_acc"][k] for m in ban]),
                 lib.mean_std([m["generation_acc"][k] for m in ind])]
        if k == 0:
            cells += ["", "", "", ""]
        else:
            d = ensemble_diff(ms, k)
            cells += [lib.mean_std([m["ensemble_acc"][k - 1] for m in ban]),
                      lib.mean_std([m["ensemble_acc"][k - 1] for m in ind]), *lib.ci_text(d)]
        lines.append("| " + " | ".join(cells) + " |")
    return ("Generations (test accuracy in % after each generation's last epoch; generation 0 is the same model in "
            "both rows; ensemble: mean softmax of generations 1..k):\n\n" + "\n".join(lines) + "\n")


def ensemble_diff(ms, k):
    """The paired difference (born-again - independent) of the ensembles of 1..k."""
    from kdcore import recipes
    return recipes.paired([m["ensemble_acc"][k - 1] for m in ms["born-again"]],
                          [m["ensemble_acc"][k - 1] for m in ms["independent"]])


def verdicts(ms, grid, out):
    """The verdict lines. Returns Markdown."""
    from kdcore import recipes
    lines = []
    if "born-again" in ms and "independent" in ms:
        n = len(ms["born-again"][0]["ensemble_acc"])
        vs = [lib.verdict(ensemble_diff(ms, k)) for k in range(2, n + 1)]
        v = "contradicted" if "higher" in vs else "supported" if vs and all(x == "lower" for x in vs) else "not shown"
        lines.append(f"Verdict on \"an ensemble of born-again generations is no better than one of as many "
                     f"independent models\" (k = 2..{n}): **{v}** (born-again's ensembles: {', '.join(vs)}).")
    groups = {r["recipe"]: r for r in recipes.report(out)}
    name = {row: cfg["name"] for row, (_, cfg) in grid.items()}
    if "born-again" in ms:
        ban = {m["seed"]: m for m in lib.run_metrics(groups[name["born-again"]])}
        for row in ONE_STAGE:
            g = groups.get(name[row])
            if g is None:
                continue
            mine = {m["seed"]: m["last_test_acc"] for m in lib.run_metrics(g)}
            seeds = sorted(set(mine) & set(ban))
            for k, what in ((1, "born-again generation 1 (equal compute)"),
                            (GENERATIONS - 1, f"born-again generation {GENERATIONS - 1} (2.5x its compute)")):
                d = recipes.paired([mine[s] for s in seeds], [ban[s]["stage_last_test_acc"][k] for s in seeds])
                lines.append(f"{row} against {what}, last-epoch accuracy: **{lib.verdict(d)}** "
                             f"({lib.effect(d)}).")
    j = SIGMAS.index(SIGMA_VERDICT)
    for row in ONE_STAGE:
        for ref in (BASELINE, "born-again"):
            if row in ms and ref in ms:
                d = recipes.paired([m["sharpness"]["increase"][j] for m in ms[row]],
                                   [m["sharpness"]["increase"][j] for m in ms[ref]])
                v = {"lower": "supported", "higher": "contradicted"}.get(lib.verdict(d), "not shown")
                lines.append(f"Verdict on \"{row} reaches a flatter minimum than {ref}\" (loss increase at sigma "
                             f"{SIGMA_VERDICT:g}): **{v}** (Δ {nats(d)[0]} nats, 95% CI {nats(d)[1]}).")
    return "\n".join(lines) + "\n"


def figure(grid, out, path):
    """(a) accuracy of the ensembles of 1..k generations, born-again and independent, and of
    generation k alone; (b) the loss increase against sigma per row. Returns the path."""
    plt = lib.pyplot()
    ms = all_measures(grid, out, cache_of(out))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row, c in (("born-again", "C0"), ("independent", "C1")):
        if row not in ms:
            continue
        gen = 100 * np.array([m["generation_acc"] for m in ms[row]])
        ens = 100 * np.array([m["ensemble_acc"] for m in ms[row]])
        ks = np.arange(gen.shape[1])
        a.errorbar(ks, gen.mean(0), yerr=gen.std(0), fmt="o--", color=c, label=f"{row}: generation k", capsize=3)
        a.errorbar(ks[1:], ens.mean(0), yerr=ens.std(0), fmt="s-", color=c, label=f"{row}: ensemble 1..k", capsize=3)
    a.set(xlabel="generation k", ylabel="test accuracy (%)", title="R3: generations and their ensembles",
          xticks=range(GENERATIONS))
    for i, row in enumerate(grid):
        if row not in ms:
            continue
        inc = np.array([m["sharpness"]["increase"] for m in ms[row]])
        b.plot(SIGMAS, inc.mean(0), "o-", color=f"C{i % 10}", label=row)
    b.set(xlabel="relative weight-noise scale sigma", ylabel="test-loss increase (nats)", xscale="log",
          title="sharpness proxy (reported model)")
    return lib.save_figure(fig, path)


def intro(grid):
    """The section's first sentences: the setting and how to read the tables."""
    return lib.describe_mlp(
        grid[BASELINE][1], "No teacher: every model is the student's architecture.",
        "Test accuracy in %, mean ± std over seeds; Δ: mean paired difference to the student alone over the seeds, "
        "with its 95% Student-t interval; sharpness: the mean test-loss increase (nats) when each weight tensor gets "
        f"Gaussian noise of std sigma x its rms ({DRAWS} draws, noise seed 0; kdcore.metrics.weight_noise_sharpness).")


def main(argv=None):
    """The study: runs the grid, appends its section to --out."""
    lib.run_study(argv, __doc__, "study_self_distill.py", "r3", "Born-again or one-stage self-distillation (R3), "
                  "mlp student", build_grid, figure, intro, report)


if __name__ == "__main__":
    main()
