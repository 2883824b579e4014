"""One teacher or many? (study R4): a fixed student distilled from the averaged outputs of m
teachers, m in {1, 2, 4}, against the best single teacher. A grid of recipes run over seeds by
kdcore.recipes (benchmarks/studylib.py), then a report.

    python benchmarks/study_multi_teacher.py [--seeds 0,1,2] [--workers N] [--runs build/study_multi_teacher]
                                             [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

The claim checked: several teachers give richer dark knowledge than one, so a student learning
from their average beats one learning from the best of them.

Setting (Fashion-MNIST, the mlp pair of benchmarks/distill_bench.py): four teachers mlp
784-1200-1200-10 (dropout 0.2), identical but for their seed (0, 1, 2, 3: initial weights,
shuffling, dropout), each trained on all 60,000 training images for 10 epochs (SGD lr 0.05,
momentum 0.9, weight decay 5e-4, cosine over the 10 epochs, batch 128): half the pair's 20, so
that four teachers fit the study's budget of 30 CPU minutes on one core (TEACHER_EPOCHS).
Student: mlp 784-256-10 on 6,000 labelled images drawn with the seed, 20 epochs, lr 0.05; a
5,000-image validation split carved with the seed picks the reported epoch; test on all 10,000
test images. Rows: the student alone; KD (CE 0.1 + KD 0.9, T 4) from each single teacher
(kd-t0 ... kd-t3); and multi-teacher KD from the first m teachers (m = 2: seeds 0, 1; m = 4: all
four), kdcore.distill with a list of teachers and its default multi='avg_prob': one KD term
against the mean of the teachers' T-softened probabilities (recipe teacher.seed given as a
list).

The best single teacher is the one of highest test accuracy (the teachers saw every training
image, so there is no held-out set of theirs to choose on; the choice uses the teachers' numbers
only, never the students'). Read-outs: student test accuracy at its best validation epoch
(mean +- std over seeds), the teachers' (or their mixture's) test accuracy, teacher compute
(teacher training epochs over the 60,000 images, summed over the teachers), the student's
agreement with its teacher (mixture) and the paired difference to the best single teacher's
student with its 95% Student-t interval. Verdict (``claim_verdict``): supported when the
m = 4 student beats the best single teacher's student with an interval above zero,
contradicted when it is below zero, otherwise not shown.

Budget: --quick (1 seed, 2 student epochs, each teacher 1 epoch on 5,000 images, student 1,000
images, validation 1,000, test 2,000) extrapolates the full study's CPU time on one core from
its own measurements (studylib.extrapolate); the teachers are most of it (four 10-epoch trainings
of the 2.4 M-parameter mlp).
The quick run made for this script (1 thread, on the 2-core machine shared with other jobs, load
average 4-5) extrapolated the full study (3 seeds) on one core to 19 min: teachers 7 min,
per seed 0.1 min for scratch, 0.4 per single-teacher row, 0.7 for m = 2, 1.3 for m = 4.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

N_TEACHERS = 4
TEACHER_EPOCHS = 10   # half the pair's teacher's: four teachers within the budget
MS = (2, 4)   # the multi-teacher rows; m = 1 are the single-teacher rows


def build_grid(seeds=(0, 1, 2), quick=False):
    """The study's recipes, validated: {row: (what, recipe)} in table order."""
    base = lib.mlp_base(seeds, quick)
    kd = dict(method="kd", options=dict(lib.KD))

    def teacher(**more):
        return lib.mlp_teacher(quick, **more) if quick else lib.mlp_teacher(quick, epochs=TEACHER_EPOCHS, **more)

    rows = [("scratch", "the student alone", dict(method="scratch"))]
    for s in range(N_TEACHERS):
        rows.append((f"kd-t{s}", f"KD from teacher {s} alone", dict(kd, teacher=teacher(seed=s))))
    for m in MS:
        rows.append((f"kd-m{m}", f"KD from the mean of teachers 0-{m - 1}",
                     dict(kd, teacher=teacher(seed=list(range(m))))))
    return lib.validated(rows, base, "r4", "study_multi_teacher")


def n_teachers(cfg):
    """How many teachers a recipe distils from (0 for scratch)."""
    return len(lib.teacher_sections(cfg))


def best_single(grid, groups):
    """The single-teacher row whose teacher has the highest test accuracy (None before any ran)."""
    rows = [(groups[cfg["name"]]["teacher_mean"], row) for row, (_, cfg) in grid.items()
            if n_teachers(cfg) == 1 and cfg["name"] in groups]
    return max(rows)[1] if rows else None


def claim_verdict(d):
    """The verdict on "several teachers beat the best single one", from the compare() row of
    the largest ensemble's student against the best single teacher's. Returns (verdict, why)."""
    v = lib.claim([d])
    why = {"supported": "the student of the largest ensemble beats the best single teacher's (95% interval above 0)",
           "contradicted": "the best single teacher's student beats the largest ensemble's (95% interval below 0)",
           "not shown": "the 95% interval of the difference covers 0, or there are fewer than two seeds"}
    return v, why[v]


def report(grid, out):
    """The table and the verdict, as Markdown."""
    from kdcore import recipes
    groups = {r["recipe"]: r for r in recipes.report(out)}
    best = best_single(grid, groups)
    if best is None:
        return "No finished runs.\n"

    def teacher_acc(row, g, ms):
        return lib.mean_std([m.get("report", {}).get("teacher_accuracy") for m in ms])

    def compute(row, g, ms):
        cfg = grid[row][1]
        ts = lib.teacher_sections(cfg)
        work = sum((t.get("snapshot") or t["epochs"]) * (t.get("train_size") or lib.FULL_TRAIN) for t in ts)
        return f"{work / lib.FULL_TRAIN:.3g}" if ts else ""

    def agreement(row, g, ms):
        return lib.mean_std([m.get("best_test_agreement") for m in ms])

    text = lib.table(grid, out, best, extra=[("teacher(s) test acc", teacher_acc),
                                             ("teacher compute (epochs x 60k images)", compute),
                                             ("agreement with teacher(s), best epoch", agreement)])
    diffs = {r["recipe"]: r for r in recipes.compare(out, baseline=grid[best][1]["name"])}
    text += f"\nBest single teacher (highest test accuracy of the four): {best}.\n"
    big = grid[f"kd-m{max(MS)}"][1]["name"]
    if big in diffs:
        v, why = claim_verdict(diffs[big])
        text += f"Verdict on \"several teachers beat the best single one\": **{v}** ({why}).\n"
    return text


def figure(grid, out, path):
    """Student accuracy against the number of teachers (m = 1: every single teacher and
    their mean); mean over seeds. Returns the path."""
    plt = lib.pyplot()
    from kdcore import recipes
    groups = {r["recipe"]: r for r in recipes.report(out)}
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = {}
    for row, (_, cfg) in grid.items():
        g = groups.get(cfg["name"])
        if g is None or not n_teachers(cfg):
            continue
        accs = [100 * m["best_test_acc"] for m in lib.run_metrics(g)]
        pts.setdefault(n_teachers(cfg), []).append(sum(accs) / len(accs))
    for m, ys in sorted(pts.items()):
        ax.plot([m] * len(ys), ys, "o", color="C0", alpha=0.6)
    ms = sorted(pts)
    ax.plot(ms, [max(pts[m]) for m in ms], "-", color="C0", label="student (KD), best of the rows at m")
    if grid["scratch"][1]["name"] in groups:
        ax.axhline(groups[grid["scratch"][1]["name"]]["best_mean"], color="grey", ls=":", label="student alone")
    return lib.save_figure(fig, path, xlabel="teachers averaged (m)", ylabel="student test accuracy (%)", xticks=ms,
                           title="R4: one teacher or many (mlp, Fashion-MNIST)")


def intro(grid):
    """The section's first sentences: the setting and how to read the table."""
    return lib.describe_mlp(
        grid["kd-t0"][1], f"Teachers mlp 784-1200-1200-10, dropout 0.2, seeds 0-{N_TEACHERS - 1}, each "
        f"{lib.trained(grid['kd-t0'][1]['teacher'])}; multi-teacher rows: KD against the mean of the teachers' "
        "softened probabilities.", "Test accuracy in %, mean ± std over seeds; Δ: mean paired difference to the best "
        "single teacher's student over the seeds, with its 95% Student-t interval.")


def main(argv=None):
    """The study: runs the grid, appends its section to --out."""
    lib.run_study(argv, __doc__, "study_multi_teacher.py", "r4", "One teacher or many? (R4), mlp pair", build_grid,
                  figure, intro, report)

if __name__ == "__main__":
    main()
