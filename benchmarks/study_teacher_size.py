"""Are bigger teachers better? (study R1): one fixed student distilled from teachers of growing
width, and from the widest teacher stopped early. A grid of recipes run over seeds by
kdcore.recipes (benchmarks/studylib.py), then a report.

    python benchmarks/study_teacher_size.py [--seeds 0,1,2] [--workers N] [--runs build/study_teacher_size]
                                            [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

The claim checked: a student's accuracy rises, then falls, as its teacher grows (a large
capacity gap hurts), and an early-stopped teacher is a remedy.

Setting (Fashion-MNIST, the mlp pair of benchmarks/distill_bench.py): teachers are mlps with two
hidden layers of equal width w in {64, 256, 1200} (784-w-w-10, dropout 0.2; w = 1200 is the
pair's teacher), each trained on all 60,000 training images for E = 20 epochs (SGD lr 0.05,
momentum 0.9, weight decay 5e-4, cosine over the 20 epochs, batch 128, seed 0). The remedy row
takes the 1200-wide teacher after E/4 = 5 of its 20 epochs (recipe teacher.snapshot: the same
run, stopped; its learning rate has not annealed yet). Student: mlp 784-256-10 on 6,000 labelled
images drawn with the seed, 20 epochs, lr 0.05; a 5,000-image validation split carved with the
seed picks the reported epoch; test on all 10,000 test images. Methods: KD (CE 0.1 + KD 0.9,
T 4) from each teacher, and the student alone (scratch). The seeds vary the student's images,
split and initial weights, so the rows pair by seed.

Read-outs per row: the student's test accuracy at its best validation epoch (mean +- std over
seeds), the teacher's test accuracy and parameter count, the student's top-1 agreement with its
teacher on the test set at that epoch, and the paired difference to the student of the widest
(fully trained) teacher with its 95% Student-t interval. Verdict (``claim_verdict``): the claim
is supported when an intermediate width's student beats the widest teacher's student with an
interval above zero and also beats the narrowest's on average; contradicted when the widest
teacher's student beats every narrower teacher's with intervals below zero; otherwise not shown.

Budget: one quick run (--quick: 1 seed, 2 student epochs, each teacher 4 epochs on 5,000
images (studylib.QUICK_SNAPSHOT_EPOCHS, so that the early teacher differs), student 1,000
images, validation 1,000, test 2,000) extrapolates the full study's CPU time on one core from
its own measurements (studylib.extrapolate).
The quick run made for this script (1 thread, on the 2-core machine shared with other jobs, load
average 4-5) extrapolated the full study (3 seeds) on one core to 9 min: teachers 5 min,
per seed 0.1 min for scratch and the narrow teachers' students, 0.4 for the 1200-wide ones'.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

WIDTHS = (64, 256, 1200)
EARLY = 4   # the remedy's teacher: after E / EARLY of its epochs
BASELINE = f"kd-w{max(WIDTHS)}"


def teacher_params(width, inputs=784, classes=10):
    """Parameters of the mlp inputs-width-width-classes (weights and biases)."""
    return inputs * width + width + width * width + width + width * classes + classes


def build_grid(seeds=(0, 1, 2), quick=False):
    """The study's recipes, validated: {row: (what, recipe)} in table order."""
    base = lib.mlp_base(seeds, quick)

    def teacher(width, **more):
        if quick:
            more = dict(more, epochs=lib.QUICK_SNAPSHOT_EPOCHS)
        return lib.mlp_teacher(quick, hidden=[width, width], **more)

    kd = dict(method="kd", options=dict(lib.KD))
    rows = [("scratch", "the student alone", dict(method="scratch"))]
    for w in WIDTHS:
        rows.append((f"kd-w{w}", f"KD from teacher 784-{w}-{w}-10", dict(kd, teacher=teacher(w))))
    wide = max(WIDTHS)
    full_epochs = teacher(wide)["epochs"]
    stop = max(1, full_epochs // EARLY)
    rows.append((f"kd-w{wide}-early", f"KD from teacher 784-{wide}-{wide}-10 after {stop} of its {full_epochs} epochs",
                 dict(kd, teacher=teacher(wide, snapshot=stop))))
    return lib.validated(rows, base, "r1", "study_teacher_size")


def width_of(cfg):
    """The teacher's hidden width of a recipe (None without a teacher)."""
    return None if cfg["teacher"] is None else cfg["teacher"]["hidden"][0]


def claim_verdict(best, diffs):
    """The verdict on "student accuracy rises, then falls, as the teacher grows".
    best: {width: mean best-epoch student accuracy} of the fully trained teachers; diffs:
    {width: compare() row of that width's student minus the widest teacher's} (widths below
    the widest). Returns (verdict, why)."""
    widths = sorted(best)
    narrow, wide = widths[0], widths[-1]
    for w in widths[1:-1]:
        if lib.verdict(diffs.get(w)) == "higher" and best[w] > best[narrow]:
            return "supported", (f"the width-{w} teacher's student beats the width-{wide} teacher's (95% interval "
                                 f"above 0) and the width-{narrow} teacher's on average")
    if all(lib.verdict(diffs.get(w)) == "lower" for w in widths[:-1]):
        return "contradicted", (f"the width-{wide} teacher's student beats every narrower teacher's (95% intervals "
                                "below 0): accuracy rises with the teacher's width here")
    return "not shown", "no intermediate width beats the widest with an interval above 0, nor does the widest beat " \
                        "every narrower one with intervals below 0"


def report(grid, out):
    """The table and the verdicts, as Markdown."""
    from kdcore import recipes
    base = grid[BASELINE][1]["name"]
    diffs = {r["recipe"]: r for r in recipes.compare(out, baseline=base)}
    groups = {r["recipe"]: r for r in recipes.report(out)}

    def params(row, g, ms):
        w = width_of(grid[row][1])
        return "" if w is None else f"{teacher_params(w) / 1e6:.2f} M"

    def teacher_acc(row, g, ms):
        return lib.mean_std([m.get("report", {}).get("teacher_accuracy") for m in ms])

    def agreement(row, g, ms):
        return lib.mean_std([m.get("best_test_agreement") for m in ms])

    text = lib.table(grid, out, BASELINE, extra=[("teacher params", params), ("teacher test acc", teacher_acc),
                                                 ("agreement with teacher, best epoch", agreement)])
    best, by_width = {}, {}
    for row, (what, cfg) in grid.items():
        w = width_of(cfg)
        if w is None or cfg["teacher"].get("snapshot") or cfg["name"] not in groups:
            continue
        best[w] = groups[cfg["name"]]["best_mean"]
        by_width[w] = diffs.get(cfg["name"])
    if len(best) == len(WIDTHS):
        v, why = claim_verdict(best, {w: d for w, d in by_width.items() if w != max(WIDTHS)})
        text += f"\nVerdict on \"student accuracy rises, then falls, as the teacher grows\": **{v}** ({why}).\n"
    early = grid[f"{BASELINE}-early"][1]["name"]
    if early in diffs:
        d = diffs[early]
        text += (f"Remedy, the widest teacher stopped early, its student against the fully trained teacher's: "
                 f"**{lib.verdict(d)}** ({lib.effect(d)}).\n")
    return text


def figure(grid, out, path):
    """Student accuracy (best validation epoch) and teacher accuracy against the teacher's
    parameters; mean over seeds, bars min-max. Returns the path."""
    plt = lib.pyplot()
    from kdcore import recipes
    groups = {r["recipe"]: r for r in recipes.report(out)}
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys, lo, hi, ts = [], [], [], [], []
    for row, (what, cfg) in grid.items():
        g = groups.get(cfg["name"])
        w = width_of(cfg)
        if g is None or w is None:
            continue
        accs = [100 * m["best_test_acc"] for m in lib.run_metrics(g)]
        x = teacher_params(w) / 1e6
        if cfg["teacher"].get("snapshot"):
            ax.errorbar([x], [sum(accs) / len(accs)], [[sum(accs) / len(accs) - min(accs)],
                                                      [max(accs) - sum(accs) / len(accs)]], fmt="s", color="C3",
                        label=f"student, width-{w} teacher stopped early")
            continue
        xs.append(x)
        ys.append(sum(accs) / len(accs))
        lo.append(ys[-1] - min(accs))
        hi.append(max(accs) - ys[-1])
        ts.append(g["teacher_mean"])
    ax.errorbar(xs, ys, [lo, hi], fmt="o-", color="C0", label="student (KD)")
    ax.plot(xs, ts, "^--", color="C1", label="teacher")
    if grid["scratch"][1]["name"] in groups:
        ax.axhline(groups[grid["scratch"][1]["name"]]["best_mean"], color="grey", ls=":", label="student alone")
    return lib.save_figure(fig, path, xscale="log", xlabel="teacher parameters (millions)",
                           ylabel="test accuracy (%)", title="R1: student vs teacher size (mlp, Fashion-MNIST)")


def intro(grid):
    """The section's first sentences: the setting and how to read the table."""
    t = grid[BASELINE][1]["teacher"]
    return lib.describe_mlp(
        grid[BASELINE][1], f"Teachers mlp 784-w-w-10, w in {{{', '.join(map(str, WIDTHS))}}}, dropout 0.2, "
        f"{lib.trained(t)}; the early row's teacher is the widest after "
        f"{grid[BASELINE + '-early'][1]['teacher']['snapshot']} of those epochs.",
        "Test accuracy in %, mean ± std over seeds; agreement: top-1 agreement with the row's teacher on the test "
        f"set; Δ: mean paired difference to {BASELINE} over the seeds, with its 95% Student-t interval.")


def main(argv=None):
    """The study: runs the grid, appends its section to --out."""
    lib.run_study(argv, __doc__, "study_teacher_size.py", "r1", "Are bigger teachers better? (R1), mlp family",
                  build_grid, figure, intro, report)

if __name__ == "__main__":
    main()
