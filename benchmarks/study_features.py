"""Logits or features? (study R6): does feature distillation transfer more than logit KD, more so
when the teacher is much larger than the student and when labels are scarce, and do features
teach without labels? A grid of recipes run over seeds by kdcore.recipes
(benchmarks/studylib.py), a linear probe on the label-free students, then a report.

    python benchmarks/study_features.py [--seeds 0,1,2] [--workers N] [--runs build/study_features]
                                        [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

Setting (Fashion-MNIST, the mlp family of the other studies): teachers mlp 784-w-w-10, w in
{256, 1200} (dropout 0.2, 20 epochs on all 60,000 training images, SGD lr 0.05, momentum 0.9,
weight decay 5e-4, cosine, batch 128, seed 0): the capacity-gap arm (the student has one hidden
layer of 256). Student mlp 784-256-10, 20 epochs, lr 0.05, the same optimizer; a 5,000-image
validation split carved with the seed picks the reported epoch; test on all 10,000 test images.

Methods: KD (CE 0.1 + KD 0.9, T 4) against the feature methods of kdcore.losses.METHODS that
apply to an MLP's hidden layer, each with its reference weight (CE 1 + the term): FitNet (hint
100 through a regressor), SP 3000, RKD 1, PKT 30000 and CC 0.02. Every feature term reads the
student's hidden layer (tap "2", after its ReLU) and the teacher's last hidden layer (tap "5");
the reference recipe of SP pairs the models' stage lists, which differ in length here (1
against 2), so the taps are given (``losses:``). VID and CRD apply but are not run, for cost;
the other feature methods are n/a on this pair (``NOT_RUN``: why, as measured).

Label fraction: the student's labelled images are 100%, 10% or 1% of the 6,000 (data.train_size
6000, 600, 60, drawn with the seed). kdcore's training loops need a label for every training
image (the cross-entropy has no mask for unlabelled ones), so the fraction shrinks the student's
whole training set: the KD and feature terms see the same 600 or 60 images, not all 6,000 (the
semi-supervised setting, distillation terms on every image and CE on the labelled ones only, is
not run). The 5,000 validation images still pick the reported epoch at every fraction.

Label-free arm: the student trained on the 6,000 images with the distillation term alone (no CE
term: the labels are not read by the loss) from the 1200-wide teacher, for KD and ``FREE``; then a linear probe
(kdcore.fit of a Linear 256 -> 10, 20 epochs, SGD lr 0.05, momentum 0.9, cosine, batch 128, on
the standardised hidden-layer features of the same 6,000 labelled images) on the frozen
student after its last epoch. Its test accuracy is compared, paired by seed, with the probe on
the randomly initialised student (the seed's initial weights) and on the CE-trained student
(the 100% row "scratch").

Budget: --quick (1 seed, 2 student epochs, the teachers 1 epoch on 5,000 images, student 1,000
images, validation 1,000, test 2,000) extrapolates the full study's CPU time on one core
(studylib.extrapolate). The quick run made for this script (1 thread, the 2-core machine shared
with other jobs) extrapolated the full study (3 seeds) to 53 min on one core: teachers 5 min; per
seed up to 2.3 min for a FitNet row with the wide teacher, 0.1-0.7 min for most others.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

WIDTHS = (256, 1200)            # teachers' hidden widths: the capacity-gap arm
FRACTIONS = (100, 10, 1)        # % of the student's labelled images
S_TAP, T_TAP = "2", "5"         # the student's hidden layer, the teacher's last hidden layer (after ReLU)
# The feature methods run, as kdcore.losses terms (their METHODS weights; CE 1 besides).
FEATURES = {"fitnet": dict(kind="FitNet", weight=100.0, student_tap=S_TAP, teacher_tap=T_TAP),
            "sp": dict(kind="SP", weight=3000.0, taps=S_TAP, teacher_taps=T_TAP),
            "rkd": dict(kind="RKD", weight=1.0, taps=S_TAP, teacher_taps=T_TAP),
            "pkt": dict(kind="PKT", weight=30000.0, taps=S_TAP, teacher_taps=T_TAP),
            "cc": dict(kind="CC", weight=0.02, taps=S_TAP, teacher_taps=T_TAP)}
# The label-free arm's terms: FitNet's hint alone is left out for cost (its 256 -> 1200
# regressor makes it the dearest row after VID and CRD).
FREE = ("sp", "rkd", "pkt", "cc")
KD_TERM = dict(kind="KD", weight=lib.KD["kd_weight"], T=lib.KD["T"])
NOT_RUN = {
    "vid, crd": "not run, for cost: the --quick run extrapolated VID and CRD (4096 negatives) to about 2 min of CPU "
                "per seed per row with the w1200 teacher, VID's regressor and CRD's memory bank each costing "
                "more than the student's own step; with them the study exceeds its hour on one core",
    "at": "n/a: on a flat hidden layer (one position) AT's normalised attention map is 1 for every image, "
          "so the loss is 0",
    "nst": "not run: NST matches each channel's distribution over spatial positions; a flat layer has one "
           "position",
    "ofd, ab, fsp, ft, reviewkd": "n/a as they stand: their reference recipes refuse the 1-stage student against "
                                  "the 2-stage teacher (e.g. 'OFD: 1 student taps but 2 teacher taps'); they are "
                                  "built for convolutional stages and were not tried with hand-picked flat taps"}
PROBE = dict(epochs=20, lr=0.05, momentum=0.9, batch_size=128)
BIG = max(WIDTHS)


def row_name(method, width, pct):
    """A row of the labelled arms: kd-w1200-l10 (method, teacher width, label %)."""
    return f"{method}-w{width}-l{pct}" if width else f"{method}-l{pct}"


def build_grid(seeds=(0, 1, 2), quick=False):
    """The study's recipes, validated: {row: (what, recipe)} in run order: per label fraction
    the student alone, KD and the feature methods from each teacher, the label-free rows
    (free-<method>) after the full fraction's."""
    base = lib.mlp_base(seeds, quick)
    n_full = base["data"]["train_size"]
    teachers = {w: lib.mlp_teacher(quick, hidden=[w, w]) for w in WIDTHS}
    rows, free = [], []
    for m, term in dict(kd=KD_TERM, **{m: FEATURES[m] for m in FREE}).items():
        free.append((f"free-{m}", f"{m} term alone (no CE) from 784-{BIG}-{BIG}-10",
                     dict(method=m, losses=[dict(term)], teacher=teachers[BIG])))
    for pct in FRACTIONS:
        n = max(1, n_full * pct // 100)
        data = dict(base["data"], train_size=n)
        rows.append((row_name("scratch", 0, pct), f"the student alone, {n} labelled images",
                     dict(method="scratch", data=data)))
        for w in WIDTHS:
            t = teachers[w]
            rows.append((row_name("kd", w, pct), f"KD from 784-{w}-{w}-10, {n} images",
                         dict(method="kd", options=dict(lib.KD), teacher=t, data=data)))
            for m, term in FEATURES.items():
                rows.append((row_name(m, w, pct), f"{m} from 784-{w}-{w}-10, {n} images",
                             dict(method=m, losses=[dict(kind="CE", weight=1.0), dict(term)], teacher=t, data=data)))
        if pct == 100:   # run the label-free arm before the smaller fractions
            rows += free
    return lib.validated(rows, base, "r6", "study_features")


# ---- the linear probe -----------------------------------------------------------------

def hidden_features(model, data, chunk=2000):
    """The model's hidden-layer outputs (tap S_TAP) over a Dataset, eval mode, (N, d) float32:
    a C forward per chunk of images, the tap copied out."""
    model.eval()
    out = []
    for i in range(0, len(data), chunk):
        model.forward(data.batch(np.arange(i, min(i + chunk, len(data)))))
        f = model.tap(S_TAP)
        out.append(f.reshape(len(f), -1))
    return np.concatenate(out).astype(np.float32)


def probe_accuracy(model, train, test, seed):
    """Test accuracy of a linear classifier trained (kdcore.fit, PROBE) on the frozen model's
    hidden features of ``train`` (standardised with their mean and std), measured on ``test``."""
    import kdcore
    from kdcore import datasets, models, optim
    ftr, fte = hidden_features(model, train), hidden_features(model, test)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    dtr = datasets.from_arrays((ftr - mu) / sd, train.y, normalize=None, num_classes=train.num_classes)
    dte = datasets.from_arrays((fte - mu) / sd, test.y, normalize=None, num_classes=test.num_classes)
    lin = models.mlp([ftr.shape[1], train.num_classes], seed=seed)
    kdcore.fit(lin, dtr, epochs=PROBE["epochs"], batch_size=PROBE["batch_size"],
               optimizer=optim.SGD(lr=PROBE["lr"], momentum=PROBE["momentum"]), schedule="cosine", seed=seed,
               progress=False)
    return kdcore.evaluate(lin, dte, batch_size=500)["accuracy"]


def probes(grid, out):
    """{row: {seed: probe test accuracy}} for the label-free rows, the CE student ('scratch-l100')
    and 'random' (the seed's initial student); rows without a finished run are left out."""
    import kdcore
    from kdcore import recipes
    got = {}
    cfg0 = grid[row_name("scratch", 0, 100)][1]
    for seed in cfg0["seeds"]:
        p = recipes.prepare(dict(cfg0, teacher=None), seed)
        got.setdefault("random", {})[seed] = probe_accuracy(p["student"], p["train"], p["test"], seed)
        for row in [row_name("scratch", 0, 100)] + [r for r in grid if r.startswith("free-")]:
            path = os.path.join(recipes.run_dir(out, grid[row][1], seed), "student.safetensors")
            if not os.path.exists(os.path.join(os.path.dirname(path), "done.json")):
                continue
            model = p["student"].fresh(seed=seed)
            kdcore.load(path, model)
            got.setdefault(row, {})[seed] = probe_accuracy(model, p["train"], p["test"], seed)
            lib.log(f"probe {row} seed {seed}: {got[row][seed]:.4f}")
    return got


# ---- the report -----------------------------------------------------------------------

def _best(out, cfg):
    return lib.seed_values(out, cfg["name"], "best_test_acc")


def verdicts(grid, out):
    """The verdict lines of the labelled arms (Markdown): per teacher and label fraction, the
    feature methods against KD from the same teacher; the capacity gap as the difference of
    those differences between the wide and the narrow teacher."""
    lines = []
    for pct in FRACTIONS:
        for w in WIDTHS:
            kd = _best(out, grid[row_name("kd", w, pct)][1])
            ds = {m: lib.paired(_best(out, grid[row_name(m, w, pct)][1]), kd) for m in FEATURES}
            best = max(ds, key=lambda m: ds[m]["diff_mean"] if ds[m]["n"] else -1)
            delta, ci = lib.ci_text(ds[best])
            lines.append(f"Verdict on \"features beat logits\", teacher w{w}, {pct}% labels: **{lib.claim(ds.values())}** "
                         f"(best feature method {best}: Δ {delta} points vs KD, 95% CI {ci}; higher: "
                         f"{', '.join(m for m, d in ds.items() if lib.verdict(d) == 'higher') or 'none'}; lower: "
                         f"{', '.join(m for m, d in ds.items() if lib.verdict(d) == 'lower') or 'none'}).")
        gaps = {}
        for m in FEATURES:
            adv = [{s: a - b for s, a, b in _common(_best(out, grid[row_name(m, w, pct)][1]),
                                                  _best(out, grid[row_name("kd", w, pct)][1]))}
                   for w in (BIG, min(WIDTHS))]
            gaps[m] = lib.paired(*adv)
        lines.append(f"Verdict on \"the feature advantage over KD grows with the capacity gap\" ({pct}% labels; "
                     f"(feature - KD) with w{BIG} minus the same with w{min(WIDTHS)}): **{lib.claim(gaps.values())}** ("
                     + ", ".join(f"{m} {lib.ci_text(d)[0]} {lib.ci_text(d)[1]}" for m, d in gaps.items()) + ").")
    return "\n".join(lines) + "\n"


def _common(a, b):
    """(seed, a[seed], b[seed]) over the seeds both have."""
    return [(s, a[s], b[s]) for s in sorted(set(a) & set(b))]


def probe_table(grid, got):
    """The label-free arm's table (Markdown) and verdict lines from ``probes``' results."""
    lines = ["| student | probe test acc | Δ vs random init (points) | 95% CI | Δ vs CE student (points) | 95% CI |",
             "|---|---:|---:|---:|---:|---:|"]
    ce, rnd = got.get(row_name("scratch", 0, 100), {}), got.get("random", {})
    rows = ["random", row_name("scratch", 0, 100)] + [r for r in grid if r.startswith("free-")]
    claims = {}
    for row in rows:
        v = got.get(row)
        if not v:
            lines.append(f"| {row} | not run | | | | |")
            continue
        d_r = lib.paired(v, rnd) if row != "random" else None
        d_c = lib.paired(v, ce) if row not in ("random", row_name("scratch", 0, 100)) else None
        if row.startswith("free-"):
            claims[row] = (d_r, d_c)
        lines.append(f"| {row} | {lib.mean_std(list(v.values()))} | " + " | ".join(lib.ci_text(d_r)) + " | "
                     + " | ".join(lib.ci_text(d_c)) + " |")
    feat = {r: d for r, d in claims.items() if r != "free-kd"}
    text = "\n".join(lines) + "\n\n"
    text += (f"Verdict on \"features teach without labels\" (a feature-only student's probe above the random "
             f"student's): **{lib.claim([d for d, _ in feat.values()])}** (higher: "
             f"{', '.join(r for r, (d, _) in feat.items() if lib.verdict(d) == 'higher') or 'none'}).\n"
             f"Against the CE student's probe: higher: "
             f"{', '.join(r for r, (_, d) in feat.items() if lib.verdict(d) == 'higher') or 'none'}; lower: "
             f"{', '.join(r for r, (_, d) in feat.items() if lib.verdict(d) == 'lower') or 'none'}.\n")
    return text


def report(grid, out):
    """Per label fraction a table (Δ vs KD from the wide teacher, and vs KD from the same
    teacher), the verdicts, the label-free arm's probe table, and the methods not run."""
    from kdcore import recipes
    name = {row: cfg["name"] for row, (_, cfg) in grid.items()}
    parts = []
    for pct in FRACTIONS:
        sub = {r: v for r, v in grid.items() if r.endswith(f"-l{pct}")}
        same = {w: {r["recipe"]: r for r in recipes.compare(out, baseline=name[row_name("kd", w, pct)])}
                for w in WIDTHS}

        def vs_same_kd(row, g, ms, same=same):
            w = next((w for w in WIDTHS if f"-w{w}-" in row), None)
            if w is None or row.startswith("kd-"):
                return ""
            return " ".join(lib.ci_text(same[w].get(name[row]))).strip()

        parts.append(f"**{pct}% of the labelled images** ({sub[row_name('scratch', 0, pct)][1]['data']['train_size']} "
                     f"images)\n\n" + lib.table(sub, out, row_name("kd", BIG, pct),
                                                extra=[("Δ vs KD, same teacher (points, 95% CI)", vs_same_kd)],
                                                notes=NOT_RUN if pct == 100 else None))
    text = "\n".join(parts) + "\n" + verdicts(grid, out)
    text += "\n**Label-free arm** (linear probe on the frozen hidden layer; test accuracy in %)\n\n"
    text += probe_table(grid, probes(grid, out))
    return text


def figure(grid, out, path):
    """Per teacher width, the test accuracy (best validation epoch, mean over seeds) of each
    method against the label fraction. Returns the path."""
    plt = lib.pyplot()
    from kdcore import recipes
    groups = {r["recipe"]: r for r in recipes.report(out)}
    fig, axes = plt.subplots(1, len(WIDTHS), figsize=(11, 4.5), sharey=True)
    for ax, w in zip(axes, WIDTHS):
        for i, m in enumerate(["scratch", "kd"] + list(FEATURES)):
            pts = [(pct, groups[grid[row_name(m, 0 if m == "scratch" else w, pct)][1]["name"]]["best_mean"])
                   for pct in FRACTIONS if grid[row_name(m, 0 if m == "scratch" else w, pct)][1]["name"] in groups]
            if pts:
                ax.plot([p for p, _ in pts], [a for _, a in pts], "o-" if m != "kd" else "s--", color=f"C{i % 10}",
                        label=m)
        ax.set(xscale="log", xlabel="labelled images (% of the student's set)", title=f"teacher 784-{w}-{w}-10")
    axes[0].set_ylabel("test accuracy (%), best validation epoch")
    return lib.save_figure(fig, path)


def intro(grid):
    """The section's first sentences: the setting and how to read the tables."""
    t = grid[row_name("kd", BIG, 100)][1]["teacher"]
    cfg = grid[row_name("kd", BIG, 100)][1]
    return lib.describe_mlp(
        cfg, f"Teachers mlp 784-w-w-10, w in {{{', '.join(map(str, WIDTHS))}}}, dropout 0.2, {lib.trained(t)}. "
             f"Label fractions {', '.join(f'{p}%' for p in FRACTIONS)} of the student's images: the fraction shrinks "
             f"the student's whole training set (kdcore has no CE mask for unlabelled images), so the distillation "
             f"terms see only the labelled images too. Feature terms read the student's hidden layer and the "
             f"teacher's last hidden layer (after ReLU).",
        f"Test accuracy in %, mean ± std over seeds; Δ: mean paired difference to KD from the w{BIG} teacher at the "
        "same fraction, and to KD from the row's own teacher, with 95% Student-t intervals.")


def main(argv=None):
    """The study: runs the grid, appends its section to --out."""
    lib.run_study(argv, __doc__, "study_features.py", "r6", "Logits or features? (R6), mlp family", build_grid, figure,
                  intro, report)


if __name__ == "__main__":
    main()
