"""Why does distillation help? Seed 000's three hypotheses (Cheng et al. 2020), measured on
Fashion-MNIST with kdcore.explain.

    python benchmarks/explain_study.py [--seeds 0,1,2] [--epochs 8] [--images 32] [--b 0.25]
                                       [--out benchmarks/RESULTS.md] [--figures benchmarks/figures]

This is a benchmark, not a test: it measures and appends what it measured to --out.

Setup. Teacher: kdcore.models.cnn (width 32) trained once on all 60,000 labelled training
images (--teacher-epochs, SGD lr 0.05 momentum 0.9 cosine, crops and flips) and cached under
--cache. Student: cnn width 8 on --student-data labelled images drawn with the seed, --epochs
epochs, the same optimizer; three runs per seed from the same initial weights and data:
"alone" (CE), "kd" (kdcore.distill method='kd': CE 0.1 + KD 0.9, T 4) and "at" (method='at':
CE + attention transfer on the stage ends), each with track_weights=True and the student's
state kept after every epoch.

Measured, per run and epoch: kdcore.explain.information_discarding on the same --images test
images (the student's last stage end, tap '12'; --steps Adam steps, --samples noise draws;
the default lam and delta2), concepts with the foreground mask (pixels > 0.05) and threshold
--b; after the last epoch lambda = E[N_fg / (N_fg + N_bg)] and N_fg (hypothesis 1); from the
epochs, D_mean and D_var (hypothesis 2) and rho (hypothesis 3). Test accuracy too.

Verdicts, each student method against "alone", paired by seed: the mean difference and its
95% t-interval over seeds; "reproduced" when the interval lies on the hypothesis's side of
0, "not reproduced" when it lies on the other side, "inconclusive" otherwise. Hypothesis 1
expects a larger lambda and N_fg, 2 a smaller D_mean and D_var, 3 a larger rho. Figures: N_fg
and N_bg over epochs (mean over seeds), and the entropy maps of a few images after the last
epoch, alone vs KD, saved as PNG under --figures.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import numpy as np

import kdcore
from kdcore import explain as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("alone", "kd", "at")
T0 = time.perf_counter()
# two-sided 95% t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def log(msg):
    e = time.perf_counter() - T0
    print(f"[{int(e // 60):3d}:{int(e % 60):02d}] {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--student-data", type=int, default=6000)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--images", type=int, default=32, help="test images measured")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--b", type=float, default=0.25, help="concept threshold in nats")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "explain_study"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--figures", default=os.path.join(ROOT, "benchmarks", "figures"))
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 1000 images, 8 measured: a run-through")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.epochs, a.student_data, a.teacher_epochs, a.images, a.steps = "0", 2, 1000, 1, 8, 30
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    return a


def sgd():
    return kdcore.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)


def get_teacher(args, train):
    path = os.path.join(args.cache, f"teacher-cnn32-{args.teacher_epochs}ep.safetensors")
    t = kdcore.models.cnn(num_classes=10, in_channels=1, width=32, seed=0)
    if os.path.exists(path):
        kdcore.load(path, t)
        log(f"teacher: loaded {os.path.relpath(path)}")
    else:
        log(f"teacher: training cnn width 32 for {args.teacher_epochs} epochs on {len(train)} images")
        kdcore.fit(t, train, epochs=args.teacher_epochs, optimizer=sgd(), schedule="cosine", augment=True,
                   progress=False)
        os.makedirs(args.cache, exist_ok=True)
        kdcore.save(path, t)
    return t.eval()


def run(method, seed, data, teacher, args):
    """Trains one student; returns its per-epoch states and History."""
    student = kdcore.models.cnn(num_classes=10, in_channels=1, width=8, seed=1000 + seed)
    states = []

    def cb(e, row):
        states.append(student.state_dict())
        return False
    common = dict(epochs=args.epochs, optimizer=sgd(), schedule="cosine", seed=seed, progress=False,
                  track_weights=True, callback=cb)
    if method == "alone":
        h = kdcore.fit(student, data, **common)
    else:
        h = kdcore.distill(student, teacher, data, method=method, **common)
    return student, states, h


def measure(student, states, x, fg, args):
    """Concepts after every epoch; the last epoch's entropy maps."""
    per_epoch, last = [], None
    for k, sd in enumerate(states):
        student.load_state_dict(sd)
        d = E.information_discarding(student, x, tap="12", steps=args.steps, samples=args.samples, seed=k)
        c = E.visual_concepts(d, fg, b=args.b)
        per_epoch.append(c)
        last = d
    return per_epoch, last


def interval(diffs):
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), float("nan"), float("nan")
    m, se = d.mean(), d.std(ddof=1) / np.sqrt(len(d))
    t = T95.get(len(d) - 1, 1.96)
    return float(m), float(m - t * se), float(m + t * se)


def verdict(lo, hi, larger):
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if (lo > 0 and larger) or (hi < 0 and not larger):
        return "reproduced"
    if (hi < 0 and larger) or (lo > 0 and not larger):
        return "not reproduced"
    return "inconclusive"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{cpu}, {os.cpu_count()} CPUs, {kdcore.get_num_threads()} threads, git {rev.stdout.strip() or '?'}"


def figures(args, res, last_maps, x, fg):
    import matplotlib
    matplotlib.use("Agg")
    os.makedirs(args.figures, exist_ok=True)
    fg_curves = [np.mean([[c["n_fg"].mean() for c in res[m][s]["concepts"]] for s in args.seed_list], 0)
                 for m in METHODS]
    bg_curves = [np.mean([[c["n_bg"].mean() for c in res[m][s]["concepts"]] for s in args.seed_list], 0)
                 for m in METHODS]
    fig = E.plot_concepts(fg_curves, bg_curves, labels=list(METHODS))
    p1 = os.path.join(args.figures, "explain_concepts.png")
    fig.savefig(p1, dpi=110)
    paths = [p1]
    for m in ("alone", "kd"):
        fig = E.plot_discarding(last_maps[m], images=x, foreground=fg, n=6)
        fig.suptitle(f"H_i after the last epoch, student {m} (seed {args.seed_list[0]})")
        p = os.path.join(args.figures, f"explain_entropy_{m}.png")
        fig.savefig(p, dpi=110)
        paths.append(p)
    return paths


def main():
    args = parse_args()
    if args.threads:
        kdcore.set_num_threads(args.threads)
    train, test = kdcore.datasets.fashion_mnist("train"), kdcore.datasets.fashion_mnist("test")
    teacher = get_teacher(args, train)
    t_acc = kdcore.evaluate(teacher, test)["accuracy"]
    log(f"teacher test accuracy {t_acc:.4f}")
    idx = np.random.default_rng(123).permutation(len(test))[:args.images]
    x, fg = test.batch(idx), E.foreground_mask(test, idx)
    res = {m: {} for m in METHODS}
    last_maps = {}
    for seed in args.seed_list:
        data = train.subset(np.random.default_rng(seed).permutation(len(train))[:args.student_data])
        for m in METHODS:
            t = time.perf_counter()
            student, states, h = run(m, seed, data, teacher, args)
            acc = kdcore.evaluate(student, test)["accuracy"]
            t_train = time.perf_counter() - t
            concepts, last = measure(student, states, x, fg, args)
            dyn = E.learning_dynamics([c["fg_concepts"] for c in concepts], h["weight_change"], h["weight_norm0"][0])
            res[m][seed] = dict(acc=acc, concepts=concepts, lam=concepts[-1]["lam"],
                                n_fg=float(concepts[-1]["n_fg"].mean()), n_bg=float(concepts[-1]["n_bg"].mean()),
                                D_mean=dyn["D_mean"], D_var=dyn["D_var"], rho=dyn["rho_mean"])
            if seed == args.seed_list[0]:
                last_maps[m] = last.H
            r = res[m][seed]
            log(f"seed {seed} {m:<5} acc {acc:.4f} lambda {r['lam']:.3f} N_fg {r['n_fg']:.1f} N_bg {r['n_bg']:.1f} "
                f"D_mean {r['D_mean']:.3f} D_var {r['D_var']:.4f} rho {r['rho']:.3f} "
                f"(train {t_train:.0f} s, measure {time.perf_counter() - t - t_train:.0f} s)")
    paths = figures(args, res, last_maps, x, fg)
    keys = [("acc", "test accuracy", True), ("lam", "lambda = E[N_fg/(N_fg+N_bg)] (H1)", True),
            ("n_fg", "N_fg (H1)", True), ("n_bg", "N_bg", None), ("D_mean", "D_mean (H2)", False),
            ("D_var", "D_var (H2)", False), ("rho", "rho (H3)", True)]
    lines = [f"\n## Why distillation helps: Dao's survey's hypotheses on Fashion-MNIST "
             f"({datetime.date.today().isoformat()})\n",
             f"`python benchmarks/explain_study.py {' '.join(sys.argv[1:])}` on {machine()}; "
             f"{(time.perf_counter() - T0) / 60:.0f} min.\n",
             f"Teacher cnn width 32 ({args.teacher_epochs} epochs on 60,000 images, test accuracy {t_acc:.4f}); "
             f"student cnn width 8 on {args.student_data} labelled images, {args.epochs} epochs; seeds {args.seeds}. "
             f"Measured on {args.images} test images at the student's last stage end (tap '12'): "
             f"{args.steps} Adam steps x {args.samples} noise draws, concept threshold b = {args.b} nats, "
             f"foreground = pixels > 0.05.\n",
             "| measure | " + " | ".join(f"{m} (mean ± std)" for m in METHODS) + " | " +
             " | ".join(f"{m} − alone [95% CI] → verdict" for m in METHODS[1:]) + " |",
             "|---|" + "---:|" * len(METHODS) + "---|" * (len(METHODS) - 1)]
    for k, name, larger in keys:
        cells = []
        for m in METHODS:
            v = np.array([res[m][s][k] for s in args.seed_list], dtype=np.float64)
            cells.append(f"{np.nanmean(v):.4g} ± {np.nanstd(v):.2g}")
        for m in METHODS[1:]:
            mean, lo, hi = interval([res[m][s][k] - res["alone"][s][k] for s in args.seed_list])
            v = "" if larger is None else " → " + verdict(lo, hi, larger)
            cells.append(f"{mean:+.4g} [{lo:+.3g}, {hi:+.3g}]{v}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nFigures: " + ", ".join(f"`{os.path.relpath(p, os.path.dirname(args.out))}`" for p in paths) + ".\n")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write(text)
    log(f"appended to {args.out}")


if __name__ == "__main__":
    main()
