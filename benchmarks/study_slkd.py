"""The SLKD study (R9): does SLKD's gain over KD come from its self-learning teachers, and
which of its parts matter? A grid of recipes run over seeds by kdcore.recipes, then a report.

    python benchmarks/study_slkd.py [--pair mlp|conv|both] [--seeds 0,1,2] [--rows kd,slkd,...]
                                    [--workers N] [--runs build/study_slkd]
                                    [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

This is a study, not a test: it trains, measures and appends a table to --out.

The pairs (Fashion-MNIST; per seed the student sees 6,000 labelled images drawn with the seed,
and a validation split of 5,000 images carved from the training set with the seed picks the
reported epoch; test numbers are on all 10,000 test images):
- mlp (benchmarks/distill_bench.py's): teacher mlp 784-1200-1200-10 (dropout 0.2) trained on
  all 60,000 training images for 20 epochs (SGD lr 0.05, momentum 0.9, weight decay 5e-4,
  cosine, batch 128); student mlp 784-256-10, 20 epochs, lr 0.05;
- conv (benchmarks/datafree_bench.py's): teacher kdcore.models.cnn width 32 (conv 32-32-64-64)
  trained on all 60,000 images for 5 epochs (lr 0.05, no augmentation); student cnn width 16,
  4 epochs, lr 0.05, no augmentation. Chosen for the budget: feature_bench.py's pair
  (resnet8x4 -> resnet8, 8 epochs) extrapolated to about 4 hours of one core, as its two
  resnet8x4 SL-teachers train alongside every SLKD student; this pair's full study
  extrapolates to about 70 min (see Budget).
One teacher per pair (seed 0), trained once and cached by kdcore.recipes; the seeds vary the
student's images, validation split and initial weights (so rows pair by seed).

The grid (``build_grid``; every SLKD row gives all of SLKD's options, and each ablation changes
one of them from the "slkd" row):
- scratch: the student alone (reference); kd: KD, CE 0.1 + KD 0.9, T 4;
- kd-slkd-weights: KD at SLKD's total weights, CE 0.4 + KD 3.6 (the control the paper lacks:
  SLKD's student gets (lambda + eta) = 4 times KD's loss), at SLKD's student lr;
- slkd: kdcore.slkd's defaults: lambda 1, eta 3, alpha 0.1, rho 0.5, two SL-teachers with the
  teacher's architecture, fused logits, parallel;
- slkd-lam0 (lambda 0: the SL-teachers alone, the paper's Table 4), slkd-eta0 (eta 0: KD with
  SL-teachers trained for nothing), slkd-1sl (one SL-teacher), slkd-rho0.7, slkd-star
  (sequential SLKD*, trajectory replay), slkd-probs (fused probabilities), slkd-no-tau2
  (sl_tau2=False: the student's SL-teacher KL without the tau^2 factor that kdcore, as
  mdistiller's KD, puts on every KL and the paper's eq. 3 does not write; the SL-teachers'
  own KD terms keep it, so they train exactly as in the slkd row and the two rows differ in
  the weight of that one term, 16 times smaller at T 4).
--rows runs and reports only the named rows (kd, the baseline, among them), e.g. a paired
rerun of kd, slkd and slkd-no-tau2.
Learning rates: SLKD's student and the control run at --slkd-lr-scale (0.25 = 1 / (lambda +
eta)) times the pair's lr, the SL-teachers at the pair's lr (options.sl_optimizer), as
distill_bench.py (at the full lr the student's 4x loss diverged there); every SLKD ablation
keeps those lrs, so slkd-eta0 is KD at a quarter of KD's lr.

Report: per pair, a Markdown table (test accuracy in % at the epoch of best validation
accuracy, mean +- std over seeds; last epoch; the paired difference to kd by seed with its
95% Student-t interval, kdcore.recipes.compare) and a figure (benchmarks/figures/
slkd_study_<pair>.png) as the paper's Figs. 2-3: (a) per epoch, KL(student || teacher) and
KL(student || fused SL-teacher) on the validation images, both T=1, from kdcore.slkd's own
History columns (kl_student_teacher, kl_student_slt), for the SLKD rows fusing logits (with
fuse="probs", kdcore.slkd measures the second KL against the fused T-softened probabilities,
not comparable); (b) KL(student || teacher) on the test set (the harness's test_kl) for KD, the
control and the SLKD rows. Mean over seeds, band min-max.

Runs resume: each (recipe, seed) is kdcore.recipes.run_one into --runs/<pair>/<recipe>/seed-<s>;
an interrupted study reruns only unfinished runs. --workers N runs each recipe's seeds with
kdcore.recipes.sweep on N local Dask workers (1 kdcore thread each, or --threads); without it
the runs go one after another in this process (kdcore's thread count).

Budget. Seconds per run are printed; a --quick run (1 seed, 2 epochs, the teacher 1 epoch on
5,000 images, student 1,000 images, validation 1,000, test 2,000; runs under --runs/quick)
ends with an extrapolation of the full study from its own CPU times (time.process_time of
this process, so run it with --threads 1 and without --workers: the number is then the time
on one core): per run, the training epochs scale with epochs x training images, the rest
(evaluation, SLKD*'s phase 1, the teacher's logits) with epochs x the largest image ratio.
A quick run (1 thread, the 2-core machine shared with other jobs) extrapolated the full
study on one core to 37 min for the mlp pair (teacher 4 min; per seed 0.3-0.4 min for scratch
and the KD rows, 0.9-1.7 for the SLKD rows; before slkd-no-tau2 was a row, which costs as
much as slkd) and, for the conv pair at 8 student epochs, to 130 min (teacher 6 min; per seed
1.3-1.8 min for scratch and the KD rows, 3.4 for slkd-1sl, 4.2-5.3 for the other SLKD rows),
hence its 4 epochs: about 68 min. --conv-epochs sets other budgets. With --quick the conv
teacher (1 epoch on 5,000 images) is too weak for its students to learn much in 16 steps: the
quick run checks the plumbing and the cost, not the results.
"""
import json
import os
import sys
import time

import numpy as np

import kdcore
from kdcore import recipes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)
from studylib import DATA, QUICK, SGD, log, parse_seeds  # noqa: E402

PAIRS = {
    "mlp": dict(teacher=dict(lib.MLP_TEACHER), student=dict(lib.MLP_STUDENT), lr=lib.MLP_LR, epochs=lib.MLP_EPOCHS),
    "conv": dict(teacher=dict(model="cnn", width=32, epochs=5, lr=0.05),
                 student=dict(model="cnn", width=16), lr=0.05, epochs=4),
}
SLKD_DEFAULTS = dict(T=4.0, alpha=0.1, lam=1.0, eta=3.0, rho=0.5, n_sl=2, fuse="logits", sequential=False)
# (row, what it is, the change to SLKD's defaults)
ABLATIONS = [("slkd", "SLKD, kdcore's defaults", {}),
             ("slkd-lam0", "lambda 0: SL-teachers only", dict(lam=0.0)),
             ("slkd-eta0", "eta 0: KD at SLKD's lr, SL-teachers unused", dict(eta=0.0)),
             ("slkd-1sl", "one SL-teacher", dict(n_sl=1)),
             ("slkd-rho0.7", "rho 0.7", dict(rho=0.7)),
             ("slkd-star", "SLKD* (sequential, trajectory replay)", dict(sequential=True)),
             ("slkd-probs", "fuse probabilities", dict(fuse="probs")),
             ("slkd-no-tau2", "student's SL-teacher term without tau^2 (eq. 3 as written)", dict(sl_tau2=False))]


def build_grid(pair, seeds=(0, 1, 2), quick=False, slkd_lr_scale=0.25, epochs=None, rows=None):
    """The study's recipes for one pair, validated: {row: (what, resolved recipe)}, in table
    order. quick: the smoke-run sizes (QUICK); epochs: the students' epochs (default the
    pair's); rows: only these rows (they must include "kd", the table's baseline)."""
    p = PAIRS[pair]
    lr = p["lr"]
    teacher = dict(p["teacher"], optimizer=dict(SGD), schedule="cosine", batch_size=128, seed=0)
    data = dict(DATA)
    n_epochs = epochs or p["epochs"]
    if quick:
        teacher.update(epochs=QUICK["teacher_epochs"], train_size=QUICK["teacher_train_size"])
        data.update(QUICK["data"])
        n_epochs = QUICK["epochs"]
    base = dict(teacher=teacher, student=dict(p["student"]), data=dict(data, source="fashion_mnist"),
                optimizer=dict(SGD), lr=lr, schedule="cosine", epochs=n_epochs, batch_size=128, augment=False,
                seeds=list(seeds))
    table_rows = [("scratch", "the student alone", dict(method="scratch")),
            ("kd", "KD: CE 0.1 + KD 0.9, T 4", dict(method="kd", options=dict(T=4.0, ce_weight=0.1, kd_weight=0.9))),
            ("kd-slkd-weights", "KD at SLKD's total weights: CE 0.4 + KD 3.6, SLKD's lr",
             dict(method="kd", lr=lr * slkd_lr_scale, options=dict(T=4.0, ce_weight=0.4, kd_weight=3.6)))]
    for name, what, change in ABLATIONS:
        opts = dict(SLKD_DEFAULTS, **change, sl_optimizer=dict(SGD, lr=lr))
        table_rows.append((name, what, dict(method="slkd", lr=lr * slkd_lr_scale, options=opts)))
    if rows is not None:
        unknown = set(rows) - {r[0] for r in table_rows}
        if unknown or "kd" not in rows:
            raise ValueError(f"rows: unknown {sorted(unknown)}" if unknown else "rows: must include kd (the baseline)")
        table_rows = [r for r in table_rows if r[0] in rows]
    grid = {}
    for name, what, over in table_rows:
        raw = dict(base, name=f"r9-{pair}-{name}", **over)
        grid[name] = (what, recipes.validate(raw, f"study_slkd {pair} {name}"))
    return grid


# ---- the report ----------------------------------------------------------------------

def read_history(out, cfg, seed):
    """The History (history.json) of one finished run."""
    path = os.path.join(recipes.run_dir(out, cfg, seed), "history.json")
    with open(path) as f:
        return json.load(f)


def table(grid, out, pair):
    """The Markdown table of one pair's finished runs (paired differences to kd)."""
    return lib.table(grid, out, "kd")


def figure(grid, out, pair, path):
    """Figs. 2-3 of the paper as measured here (see the module docstring); returns the path."""
    plt = lib.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {row: cycle[i % len(cycle)] for i, row in enumerate(r for r in grid if r != "scratch")}

    def curves(cfg, key):
        hs = []
        for seed in cfg["seeds"]:
            try:
                h = read_history(out, cfg, seed)
            except OSError:
                continue
            if key in h:
                hs.append(np.array(h[key], float))
        return np.array(hs) if hs else None

    def plot(ax, ys, label, colour, style):
        x = np.arange(1, ys.shape[1] + 1)   # epochs counted from 1, as the paper's figures
        ax.plot(x, ys.mean(0), style, color=colour, label=label)
        if len(ys) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), color=colour, alpha=0.15)

    for row in (r for r in grid if r.startswith("slkd") and r != "slkd-probs"):
        cfg = grid[row][1]
        for key, style, what in (("kl_student_teacher", "-", "KL(S‖T)"), ("kl_student_slt", "--", "KL(S‖SL-T)")):
            ys = curves(cfg, key)
            if ys is not None:
                plot(a, ys, f"{row}: {what}", colours[row], style)
    a.set(title="(a) validation set: student vs teacher and fused SL-teacher", xlabel="epoch",
          ylabel="KL divergence (T=1)", yscale="log")
    a.legend(fontsize=6, ncol=2)
    for row in (r for r in grid if r != "scratch"):
        ys = curves(grid[row][1], "test_kl")
        if ys is not None:
            plot(b, ys, row, colours[row], "-" if row.startswith("slkd") else ":")
    b.set(title="(b) test set: KL(student ‖ teacher)", xlabel="epoch", ylabel="KL divergence (T=1)", yscale="log")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.xaxis.get_major_locator().set_params(integer=True)
        # a collapsed run (a student and SL-teachers predicting one class) gives KLs of 1e-100
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-4))
    fig.suptitle(f"SLKD study (R9), {pair} pair: mean over seeds, band min-max")
    return lib.save_figure(fig, path)


def describe(grid, pair):
    cfg = grid["kd"][1]
    t, d = cfg["teacher"], cfg["data"]
    arch = lambda m: m["model"] + (f" {m['hidden']}" if m.get("hidden") else "") + \
        (f" width {m['width']}" if m.get("width") else "")  # noqa: E731
    slkd = next((c for _, c in grid.values() if c["method"] == "slkd"), None)
    lrs = "" if slkd is None else (f", {slkd['lr']:g} (SLKD rows and the control; SL-teachers "
                                   f"{slkd['options']['sl_optimizer']['lr']:g})")
    return (f"Teacher {arch(t)} ({t['epochs']} epochs on {t.get('train_size') or 60000} images, lr {t['lr']:g}); "
            f"student {arch(cfg['student'])}, {cfg['epochs']} epochs on {d['train_size']} images, validation "
            f"{d['val_split']} carved from the training set, test {d['test_size'] or 10000} images; lr "
            f"{cfg['lr']:g} (KD, scratch){lrs}; SGD momentum 0.9, weight decay 5e-4, cosine, batch 128.")


def main(argv=None):
    """The study: runs the grid of each pair, appends its section to --out."""
    ap = lib.parser(__doc__, "study_slkd")
    ap.add_argument("--pair", default="mlp", choices=["mlp", "conv", "both"])
    ap.add_argument("--conv-epochs", type=int, default=None, help="the conv students' epochs (default the pair's)")
    ap.add_argument("--rows", default=None, help="comma-separated rows of the grid to run and report (with kd; "
                                                 "default all)")
    ap.add_argument("--slkd-lr-scale", type=float, default=0.25,
                    help="SLKD's student lr (and the control's) as a fraction of the pair's lr")
    args = ap.parse_args(argv)
    seeds, runs, cache = lib.setup(args)
    pairs = ["mlp", "conv"] if args.pair == "both" else [args.pair]
    rows = None if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    for pair in pairs:
        t0 = time.perf_counter()
        epochs = args.conv_epochs if pair == "conv" else None
        grid = build_grid(pair, seeds, quick=args.quick, slkd_lr_scale=args.slkd_lr_scale, epochs=epochs, rows=rows)
        out = os.path.join(runs, pair)
        log(f"{pair} pair: {len(grid)} recipes x {len(seeds)} seeds -> {out}")
        costs = lib.run_grid(grid, out, cache, args)
        elapsed = time.perf_counter() - t0
        fig = figure(grid, out, pair, os.path.join(args.figures, f"slkd_study_{pair}{'_quick' if args.quick else ''}"
                                                   f".png"))
        lib.section(f"SLKD study (R9), {pair} pair", "study_slkd.py", argv, args, elapsed,
                    f"{describe(grid, pair)} Test accuracy in %, mean ± std over seeds; Δ: mean paired difference to "
                    "kd over the seeds (same images, split and initial student), with its 95% Student-t interval. "
                    f"Figure: {lib.shown(fig)}.\n\n" + table(grid, out, pair), args.out)
        if args.quick:
            full = build_grid(pair, seeds=parse_seeds(args.seeds), slkd_lr_scale=args.slkd_lr_scale, epochs=epochs,
                              rows=rows)
            lib.estimate(grid, full, costs, out, args, f"SLKD study (R9), {pair} pair")


if __name__ == "__main__":
    main()
