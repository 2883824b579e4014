"""Regularised KD (study R8): does KD act like a regulariser that an earlier teacher, label
smoothing or a hand-made teacher can stand in for? Accuracy and calibration of a fixed student.
A grid of recipes run over seeds by kdcore.recipes (benchmarks/studylib.py), then a report.

    python benchmarks/study_regularised_kd.py [--seeds 0,1,2] [--workers N] [--runs build/study_regularised_kd]
                                              [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

The claims checked: (1) a teacher stopped early (before its training converges) teaches a
student better than the converged one; (2) label smoothing on the student's labels, added to
KD, helps it (reported as mixed); (3) teacher-free KD from a hand-made "virtual" teacher
(Tf-KD_reg) improves on the student alone, as label smoothing does.

Setting (Fashion-MNIST, the mlp pair of benchmarks/distill_bench.py): teacher mlp
784-1200-1200-10 (dropout 0.2) trained on all 60,000 training images for E = 20 epochs (SGD lr
0.05, momentum 0.9, weight decay 5e-4, cosine over the 20 epochs, batch 128, seed 0), taken
after E/4 = 5, E/2 = 10 or all 20 epochs of that one run (recipe teacher.snapshot). Student:
mlp 784-256-10 on 6,000 labelled images drawn with the seed, 20 epochs, lr 0.05; a 5,000-image
validation split carved with the seed picks the reported epoch; test on all 10,000 test images.
Rows: the student alone with label smoothing eps 0, 0.1, 0.2 on its cross-entropy targets;
KD (CE 0.1 + KD 0.9, T 4) from the teacher after 5, 10 and 20 epochs; KD from the 20-epoch
teacher with eps 0.1 and 0.2 on the student's CE term; Tf-KD_reg (kdcore.tf_kd, mode
'virtual', its defaults: the authors' code, alpha 0.1, T 20, a 0.99; recipe method tf_kd_reg).

Read-outs: test accuracy and expected calibration error (15 bins, the harness's test_ece) at
the best validation epoch, mean +- std over seeds, and paired differences (95% Student-t
intervals) of both to the KD row with the converged teacher (kd-e20); the claims' own
comparisons are in the verdict lines under the table (early teachers vs kd-e20, KD + LS vs
kd-e20, Tf-KD_reg vs the student alone).

Budget: --quick (1 seed, 2 student epochs, the teacher 4 epochs on 5,000 images so that its
snapshots differ (studylib.QUICK_SNAPSHOT_EPOCHS), student 1,000 images, validation 1,000, test
2,000) extrapolates the full study's CPU time on one core from its own measurements
(studylib.extrapolate).
The quick run made for this script (1 thread, on the 2-core machine shared with other jobs, load
average 4-5) extrapolated the full study (3 seeds) on one core to 13 min: teachers (the
5- and 10-epoch snapshots and the full run) 6 min, per seed 0.1 min for the teacher-free rows,
0.4 for the KD rows.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

EPS = (0.1, 0.2)      # label smoothing of the student's targets (and 0)
STOPS = (4, 2)        # teachers after E / 4 and E / 2 epochs (and E)
BASELINE = "kd-e20"


def build_grid(seeds=(0, 1, 2), quick=False):
    """The study's recipes, validated: {row: (what, recipe)} in table order. The rows' names
    carry the full study's teacher epochs (kd-e5, kd-e10, kd-e20) at either size."""
    base = lib.mlp_base(seeds, quick)
    more = dict(epochs=lib.QUICK_SNAPSHOT_EPOCHS) if quick else {}
    full_e = lib.MLP_TEACHER["epochs"]
    e = more.get("epochs", full_e)
    kd = dict(method="kd", options=dict(lib.KD))
    rows = [("scratch", "the student alone", dict(method="scratch"))]
    for eps in EPS:
        rows.append((f"scratch-ls{eps:g}", f"the student alone, label smoothing {eps:g}",
                     dict(method="scratch", options=dict(label_smoothing=eps))))
    for k in STOPS:
        rows.append((f"kd-e{full_e // k}", f"KD from the teacher after {e // k} of its {e} epochs",
                     dict(kd, teacher=lib.mlp_teacher(quick, snapshot=e // k, **more))))
    teacher = lib.mlp_teacher(quick, **more)
    rows.append((BASELINE, f"KD from the teacher after all {e} epochs", dict(kd, teacher=teacher)))
    for eps in EPS:
        rows.append((f"{BASELINE}-ls{eps:g}", f"KD from the {e}-epoch teacher, label smoothing {eps:g} on the CE term",
                     dict(kd, teacher=teacher, options=dict(lib.KD, label_smoothing=eps))))
    rows.append(("tfkd-reg", "Tf-KD_reg: a virtual teacher (alpha 0.1, T 20, a 0.99)", dict(method="tf_kd_reg")))
    return lib.validated(rows, base, "r8", "study_regularised_kd")


def verdicts(acc, ece=None):
    """The verdict lines of the three claims from compare() rows of accuracy: acc = {row:
    row - kd-e20 difference} for the KD rows and {"tfkd-reg": Tf-KD_reg - scratch}; ece:
    the same for ECE (lower is better), or None. Returns Markdown lines."""
    lines = []
    early = [acc.get(r) for r in acc if r.startswith("kd-e") and not r.startswith(BASELINE)]
    lines.append(f"Verdict on \"a teacher stopped early teaches better than the converged one\" (accuracy): "
                 f"**{lib.claim(early)}**.")
    for eps in EPS:
        r = f"{BASELINE}-ls{eps:g}"
        lines.append(f"Verdict on \"label smoothing {eps:g} on the student helps KD\" (accuracy): "
                     f"**{lib.claim([acc.get(r)])}**.")
    lines.append(f"Verdict on \"Tf-KD_reg improves on the student alone\" (accuracy): "
                 f"**{lib.claim([acc.get('tfkd-reg')])}**.")
    if ece is not None:
        d = ece.get("tfkd-reg")
        lines.append(f"Tf-KD_reg's ECE against the student alone's: **{lib.verdict(d)}** ({lib.effect(d)}).")
    return "\n".join(lines) + "\n"


def report(grid, out):
    """The table and the verdicts, as Markdown."""
    from kdcore import recipes
    name = {row: cfg["name"] for row, (_, cfg) in grid.items()}
    ece_kd = {r["recipe"]: r for r in recipes.compare(out, baseline=name[BASELINE], metric="best_test_ece")}

    def ece(row, g, ms):
        return lib.mean_std([m.get("best_test_ece") for m in ms])

    def d_ece(row, g, ms):
        delta, ci = lib.ci_text(ece_kd.get(name[row]))
        return f"{delta} {ci}".strip()

    text = lib.table(grid, out, BASELINE, extra=[("test ECE (%), best val epoch", ece),
                                                 (f"Δ ECE vs {BASELINE} (points, 95% CI)", d_ece)])
    acc_kd = {r["recipe"]: r for r in recipes.compare(out, baseline=name[BASELINE])}
    acc_s = {r["recipe"]: r for r in recipes.compare(out, baseline=name["scratch"])}
    ece_s = {r["recipe"]: r for r in recipes.compare(out, baseline=name["scratch"], metric="best_test_ece")}
    acc = {row: acc_kd.get(name[row]) for row in grid if row.startswith("kd-e")}
    acc["tfkd-reg"] = acc_s.get(name["tfkd-reg"])
    return text + "\n" + verdicts(acc, {"tfkd-reg": ece_s.get(name["tfkd-reg"])})


def figure(grid, out, path):
    """Test accuracy against ECE per row (mean over seeds). Returns the path."""
    plt = lib.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, row, g, runs in lib.finished(grid, out):
        e = sum(100 * m["best_test_ece"] for m in runs) / len(runs)
        ax.plot([e], [g["best_mean"]], "o", color=f"C{i % 10}", label=row)
    return lib.save_figure(fig, path, xlabel="test ECE (%), best validation epoch", ylabel="test accuracy (%)",
                           title="R8: regularised KD (mlp, Fashion-MNIST)")


def intro(grid):
    """The section's first sentences: the setting and how to read the table."""
    t = grid[BASELINE][1]["teacher"]
    return lib.describe_mlp(
        grid[BASELINE][1], f"Teacher mlp 784-1200-1200-10, dropout 0.2, {lib.trained(t)}, taken after "
        + ", ".join(str(t["epochs"] // k) for k in STOPS) + f" or all {t['epochs']} epochs of that run.",
        f"Test accuracy and ECE in %, mean ± std over seeds; Δ: mean paired difference to {BASELINE} over the seeds, "
        "with its 95% Student-t interval.")


def main(argv=None):
    """The study: runs the grid, appends its section to --out."""
    lib.run_study(argv, __doc__, "study_regularised_kd.py", "r8", "Regularised KD (R8), mlp pair", build_grid, figure,
                  intro, report)

if __name__ == "__main__":
    main()
