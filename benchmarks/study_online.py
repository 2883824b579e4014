"""Offline or online distillation, and can a student learn alone? (studies R2 and R7): is a
pretrained teacher needed, or do peers trained together, a copy of the student or a hand-made
teacher serve as well? Accuracy, calibration and what each row costs, its teacher included.
A grid of recipes run over seeds by kdcore.recipes (benchmarks/studylib.py), then a report.

    python benchmarks/study_online.py [--seeds 0,1,2] [--workers N] [--runs build/study_online]
                                      [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

The claims checked: (1) peers learning together (deep mutual learning, DML) match or beat
offline KD from a pretrained teacher; (2) a teacher stopped early teaches better than the
converged one; (3) KD behaves like adaptive label smoothing, so teacher-free regularisers
(label smoothing, Tf-KD_self, Tf-KD_reg) recover part of KD's gain over the student alone;
(4) a born-again student beats its teacher of the same architecture (the student alone).

Setting (Fashion-MNIST, the mlp pair of the other studies): teacher mlp 784-1200-1200-10
(dropout 0.2) trained on all 60,000 training images for E = 20 epochs (SGD lr 0.05, momentum
0.9, weight decay 5e-4, cosine over the 20 epochs, batch 128, seed 0), or taken after E/4 = 5
epochs of that run (recipe teacher.snapshot). Student: mlp 784-256-10 on 6,000 labelled images
drawn with the seed, 20 epochs, lr 0.05; a 5,000-image validation split carved with the seed
picks the reported epoch; test on all 10,000 test images. Rows:
scratch (kdcore.fit), scratch with label smoothing 0.1; KD (CE 0.1 + KD 0.9, T 4) from the
20-epoch teacher (the reference row) and from the 5-epoch one; DML (kdcore.mutual, its
defaults: CE 1 + KL 1 at T 1) with a second peer of the student's architecture, and with a
peer of the teacher's architecture (784-1200-1200-10, dropout 0.2, untrained, trained
together with the student on the student's 6,000 images); the student's numbers are reported
(peer 0); Tf-KD_self (kdcore.tf_kd mode 'self', its defaults alpha 0.95, T 6: a copy of the
student pretrained 20 epochs on the same images, then the student learns from it); Tf-KD_reg
(mode 'virtual', alpha 0.1, T 20, a 0.99); born-again (kdcore.born_again, two generations: a
student trained from the labels, then a fresh student of the same architecture distilled from
it with CE 1 + KL 1 at T 1; the second is reported). Every reported student trains 20 epochs
(equal student epochs); the rows' costs differ.
ONE (on-the-fly native ensemble) and Mean Teacher are not in kdcore; the table says so.

Read-outs: test accuracy and expected calibration error (15 bins) at the best validation
epoch, mean +- std over seeds; paired differences (95% Student-t intervals) to the KD row and
to the student alone; the CPU minutes each row costs per student, its teacher's training
included (the teacher is trained once and serves every seed; a student needs one), as a
column and as a figure (accuracy against CPU minutes: the equal-compute view). CPU time is the
process's, per-epoch test measurements included.

Budget: --quick (1 seed, 2 student epochs, the teacher 4 epochs on 5,000 images so that its
snapshot differs (studylib.QUICK_SNAPSHOT_EPOCHS), student 1,000 images, validation 1,000,
test 2,000) extrapolates the full study's CPU time on one core (studylib.extrapolate).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

BASELINE = "kd"
STOP = 4              # the early teacher: after E / 4 epochs
LS = 0.1
TEACHER_PEER = dict(model="mlp", hidden=list(lib.MLP_TEACHER["hidden"]), dropout=lib.MLP_TEACHER["dropout"])
TEACHER_FREE = ("scratch-ls0.1", "tfkd-self", "tfkd-reg")
NOT_IN_KDCORE = {"one (F3)": "ONE, on-the-fly native ensemble: not run, not in kdcore",
                 "mean-teacher (K2)": "Mean Teacher: not run, not in kdcore"}


def build_grid(seeds=(0, 1, 2), quick=False):
    """The study's recipes, validated: {row: (what, recipe)} in table order. kd-e5 carries the
    full study's teacher epochs at either size."""
    base = lib.mlp_base(seeds, quick)
    more = dict(epochs=lib.QUICK_SNAPSHOT_EPOCHS) if quick else {}
    full_e = lib.MLP_TEACHER["epochs"]
    e = more.get("epochs", full_e)
    kd = dict(method="kd", options=dict(lib.KD))
    arch = "784-" + "-".join(map(str, TEACHER_PEER["hidden"])) + "-10"
    rows = [("scratch", "the student alone", dict(method="scratch")),
            (f"scratch-ls{LS:g}", f"the student alone, label smoothing {LS:g}",
             dict(method="scratch", options=dict(label_smoothing=LS))),
            (BASELINE, f"KD from the pretrained teacher ({e} epochs)",
             dict(kd, teacher=lib.mlp_teacher(quick, **more))),
            (f"kd-e{full_e // STOP}", f"KD from the teacher after {e // STOP} of its {e} epochs",
             dict(kd, teacher=lib.mlp_teacher(quick, snapshot=e // STOP, **more))),
            ("dml", "DML with a second student-sized peer", dict(method="mutual")),
            ("dml-big", f"DML with a teacher-sized peer ({arch}, untrained, trained together)",
             dict(method="mutual", options=dict(peer_model=dict(TEACHER_PEER)))),
            ("tfkd-self", "Tf-KD_self: from a pretrained copy of itself (alpha 0.95, T 6)", dict(method="tf_kd_self")),
            ("tfkd-reg", "Tf-KD_reg: a virtual teacher (alpha 0.1, T 20, a 0.99)", dict(method="tf_kd_reg")),
            ("born-again", "born-again: from a student of its architecture trained on the labels (T 1)",
             dict(method="born_again", options=dict(generations=2)))]
    return lib.validated(rows, base, "r2", "study_online")


def cpu_minutes(ms):
    """(the runs' mean CPU minutes, their teacher's training CPU minutes or 0) of a row's
    metrics.json list."""
    run = sum(m["cpu_time"] for m in ms) / len(ms) / 60
    t = ms[0].get("teacher") or {}
    return run, (t.get("cpu_time") or 0.0) / 60


def verdicts(kd, scratch):
    """The verdict lines from compare() rows: kd = {row: row - KD}, scratch = {row: row -
    scratch}. Returns Markdown lines."""
    lines = [f"Verdict on \"peers learning together match or beat offline KD\" (DML rows against {BASELINE}): "
             f"**{lib.claim([kd.get('dml'), kd.get('dml-big')])}**.",
             f"Verdict on \"a teacher stopped early teaches better than the converged one\": "
             f"**{lib.claim([kd.get('kd-e5')])}**."]
    gain = scratch.get(BASELINE)
    for row in TEACHER_FREE:
        d = scratch.get(row)
        frac = ""
        if d and gain and d["n"] and gain["n"] and gain["diff_mean"] > 0:
            share = 100 * d["diff_mean"] / gain["diff_mean"]
            frac = f"; by the means, {share:.0f}% of KD's gain over the student alone"
        lines.append(f"Verdict on \"{row} improves on the student alone\": **{lib.claim([d])}** "
                     f"({lib.effect(d)}{frac}).")
    d = scratch.get("born-again")
    lines.append(f"Verdict on \"the born-again student beats its teacher of the same architecture\" (against the "
                 f"student alone): **{lib.claim([d])}** ({lib.effect(d)}).")
    return "\n".join(lines) + "\n"


def report(grid, out):
    """The table and the verdicts, as Markdown."""
    from kdcore import recipes
    name = {row: cfg["name"] for row, (_, cfg) in grid.items()}
    vs_kd = {r["recipe"]: r for r in recipes.compare(out, baseline=name[BASELINE])}
    vs_s = {r["recipe"]: r for r in recipes.compare(out, baseline=name["scratch"])}

    def ece(row, g, ms):
        return lib.mean_std([m.get("best_test_ece") for m in ms])

    def d_scratch(row, g, ms):
        delta, ci = lib.ci_text(vs_s.get(name[row]))
        return f"{delta} {ci}".strip()

    def cpu(row, g, ms):
        run, teacher = cpu_minutes(ms)
        return f"{run:.2f} + {teacher:.2f} = {run + teacher:.2f}" if teacher else f"{run:.2f}"

    text = lib.table(grid, out, BASELINE, extra=[("test ECE (%), best val epoch", ece),
                                                 ("Δ vs scratch (points, 95% CI)", d_scratch),
                                                 ("CPU min per student (run + teacher)", cpu)],
                     notes=NOT_IN_KDCORE)
    kd = {row: vs_kd.get(name[row]) for row in grid}
    scratch = {row: vs_s.get(name[row]) for row in grid}
    return text + "\n" + verdicts(kd, scratch)


def figure(grid, out, path):
    """Test accuracy against the CPU minutes per student, teacher included (mean over seeds,
    error bars: std over seeds). Returns the path."""
    plt = lib.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, row, g, runs in lib.finished(grid, out):
        run, teacher = cpu_minutes(runs)
        ax.errorbar([run + teacher], [g["best_mean"]], yerr=[g["best_std"]], fmt="o", color=f"C{i % 10}", label=row,
                    capsize=3)
    ax.set_xscale("log")
    return lib.save_figure(fig, path, xlabel="CPU minutes per student, its teacher's training included (log)",
                           ylabel="test accuracy (%), best validation epoch",
                           title="R2/R7: offline, online, teacher-free (mlp, Fashion-MNIST)")


def intro(grid):
    """The section's first sentences: the setting and how to read the table."""
    t = grid[BASELINE][1]["teacher"]
    return lib.describe_mlp(
        grid[BASELINE][1], f"Teacher mlp 784-1200-1200-10, dropout 0.2, {lib.trained(t)}, or taken after "
        f"{t['epochs'] // STOP} epochs of that run; the teacher-sized DML peer is that architecture, untrained, "
        "trained with the student on its images.",
        f"Every reported student trains {grid[BASELINE][1]['epochs']} epochs. Test accuracy and ECE in %, mean ± std "
        f"over seeds; Δ: mean paired difference to {BASELINE} (or to scratch) over the seeds, with its 95% Student-t "
        "interval; CPU minutes: the run's mean over seeds (per-epoch test measurements included) plus its teacher's "
        "training, once.")


def main(argv=None):
    """The study: runs the grid, appends its section to --out."""
    lib.run_study(argv, __doc__, "study_online.py", "r2", "Offline, online or teacher-free (R2, R7), mlp pair",
                  build_grid, figure, intro, report)


if __name__ == "__main__":
    main()
