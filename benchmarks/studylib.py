"""What the study scripts (benchmarks/study_*.py) share: their command line, running a grid of
kdcore.recipes over seeds with resume, the --quick run's extrapolation of the full study's
CPU time, the Markdown table (mean +- std over seeds, paired differences to a baseline with a
95% Student-t interval) and the wording of a verdict.

A grid is an ordered mapping {row: (what, resolved recipe)}; every recipe of a grid has the same
seeds. A study script builds its grid (full and quick sizes), calls ``run_grid``, writes its
section with ``section`` and, after a --quick run, ``estimate``.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time

import kdcore
from kdcore import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGD = dict(name="sgd", momentum=0.9, weight_decay=5e-4)
# The mlp pair of benchmarks/distill_bench.py: the teacher's training and the student's recipe.
MLP_TEACHER = dict(model="mlp", hidden=[1200, 1200], dropout=0.2, epochs=20, lr=0.05)
MLP_STUDENT = dict(model="mlp", hidden=[256])
MLP_LR, MLP_EPOCHS = 0.05, 20
DATA = dict(train_size=6000, val_split=5000, test_size=None)
FULL_TRAIN = 60000   # Fashion-MNIST's training images: what a teacher without train_size sees
FULL_TEST = 10000
QUICK = dict(teacher_epochs=1, teacher_train_size=5000, epochs=2, data=dict(train_size=1000, val_split=1000,
                                                                           test_size=2000))
KD = dict(T=4.0, ce_weight=0.1, kd_weight=0.9)
# A --quick teacher taken at a fraction of its epochs needs more than QUICK's one epoch for its
# snapshots to differ from the end of the run.
QUICK_SNAPSHOT_EPOCHS = 4
T0 = time.perf_counter()


def log(msg):
    """Prints a progress line stamped with the time since the script started."""
    e = time.perf_counter() - T0
    print(f"[{int(e // 3600)}:{int(e % 3600 // 60):02d}:{int(e % 60):02d}] {msg}", flush=True)


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]."""
    return [int(s) for s in text.split(",") if s.strip()]


def shown(path):
    """A path as a report names it: relative to the repository when inside it."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith("..") else rel


def parser(doc, name):
    """The study scripts' common arguments: --seeds, --runs (default build/<name>), --out,
    --figures, --workers, --threads, --quick. A script adds its own before parsing."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default=os.path.join(ROOT, "build", name), help="run folders (resumable)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "STUDIES.md"))
    ap.add_argument("--figures", default=os.path.join(ROOT, "benchmarks", "figures"))
    ap.add_argument("--workers", type=int, default=None, help="run each recipe's seeds on this many Dask workers")
    ap.add_argument("--threads", type=int, default=None, help="kdcore threads (per worker with --workers)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, small data: checks the script end to end "
                                                         "and prints the full study's estimated time")
    return ap


def setup(args):
    """Applies --threads; returns (seeds, runs folder, teacher cache) for the parsed args
    (--quick: seed 0 and runs under <runs>/quick)."""
    if args.threads and not args.workers:
        kdcore.set_num_threads(args.threads)
    seeds = [0] if args.quick else parse_seeds(args.seeds)
    runs = os.path.join(args.runs, "quick") if args.quick else args.runs
    return seeds, runs, os.path.join(runs, "_teachers")


def sizes(quick):
    """(teacher changes, data, student epochs or None) of a grid: the quick sizes or the full
    ones (None: the script's own epochs)."""
    if not quick:
        return {}, dict(DATA), None
    return (dict(epochs=QUICK["teacher_epochs"], train_size=QUICK["teacher_train_size"]), dict(DATA, **QUICK["data"]),
            QUICK["epochs"])


def validated(rows, base, prefix, where):
    """{row: (what, recipe)} from rows [(row, what, changes to base)], each validated and
    named <prefix>-<row>."""
    grid = {}
    for name, what, over in rows:
        grid[name] = (what, recipes.validate(dict(base, name=f"{prefix}-{name}", **over), f"{where} {name}"))
    return grid


def mlp_base(seeds, quick):
    """The recipe keys every row of an mlp-pair study shares (student, data, optimizer,
    schedule, epochs, seeds), at the quick or the full sizes."""
    _, data, epochs = sizes(quick)
    return dict(student=dict(MLP_STUDENT), data=dict(data, source="fashion_mnist"), optimizer=dict(SGD), lr=MLP_LR,
                schedule="cosine", epochs=epochs or MLP_EPOCHS, batch_size=128, augment=False, seeds=list(seeds))


def mlp_teacher(quick, **more):
    """The mlp pair's teacher section (seed 0) with ``more`` changes, at the quick or the
    full sizes."""
    t = dict(MLP_TEACHER, optimizer=dict(SGD), schedule="cosine", batch_size=128, seed=0)
    t.update(sizes(quick)[0])
    t.update(more)
    return t


def teacher_sections(cfg):
    """The single-teacher sections a recipe trains: one per seed of a list of seeds; none for a
    teacher loaded from teacher.checkpoint."""
    t = cfg["teacher"]
    if t is None or t.get("checkpoint") is not None:
        return []
    if isinstance(t["seed"], list):
        return [dict(t, seed=s) for s in t["seed"]]
    return [t]


def _teacher_id(t):
    return json.dumps(t, sort_keys=True)


# ---- running -------------------------------------------------------------------------

def run_grid(grid, out, cache, args):
    """Runs every (recipe, seed) of the grid into ``out`` (finished runs are skipped); returns
    {(row, seed): (cpu s, wall s, fresh)} and {("teacher", section id): ...} for each teacher
    trained here -- the teachers first, each timed apart from the students and from reading
    the data (the untrained preparation reads it)."""
    costs = {}
    first = next(iter(grid.values()))[1]
    seed0 = first["seeds"][0]
    for row, (what, cfg) in grid.items():
        for t in teacher_sections(cfg):
            tid = ("teacher", _teacher_id(t))
            if tid in costs:
                continue
            one = dict(cfg, teacher=t, method="kd", options={}, losses=None)
            recipes.prepare(one, seed0, cache, train_teacher=False)
            c0, w0 = time.process_time(), time.perf_counter()
            p = recipes.prepare(one, seed0, cache, log=log)
            costs[tid] = (time.process_time() - c0, time.perf_counter() - w0, p["teacher_info"]["source"] == "trained")
    for row, (what, cfg) in grid.items():
        if args.workers:
            for t in recipes.sweep(cfg, out=out, workers=args.workers, threads=args.threads, cache=cache, log=log):
                if t.status == "failed":
                    raise RuntimeError(f"{t.name} seed {t.seed} failed:\n{t.traceback}")
                costs[(row, t.seed)] = (math.nan, t.metrics.get("time", math.nan), t.status == "finished")
            continue
        for seed in cfg["seeds"]:
            c0, w0 = time.process_time(), time.perf_counter()
            m = recipes.run_one(cfg, seed, out, cache=cache, log=log, argv=[sys.executable] + sys.argv)
            costs[(row, seed)] = (time.process_time() - c0, time.perf_counter() - w0, not m.get("skipped"))
            chosen = f"best-on-{m.get('best_selected_on', 'val')}"
            log(f"{cfg['name']} seed {seed}: {chosen} test accuracy {m['best_test_acc']:.4f} "
                f"({costs[(row, seed)][1]:.0f} s)")
    return costs


def epoch_images(cfg):
    """The training images one epoch of a recipe goes over: its drawn images (all of
    Fashion-MNIST's without train_size) times data.repeat, at most options.max_steps batches."""
    n = (cfg["data"]["train_size"] or FULL_TRAIN) * cfg["data"].get("repeat", 1)
    cap = cfg["options"].get("max_steps")
    return n if cap is None else min(n, cap * cfg["batch_size"])


def extrapolate(grid, full, costs, out):
    """The full study's time on one core from a quick run's CPU times (seed 0 of each row):
    per run, its training epochs scaled by epochs x the images of an epoch (epoch_images), the
    rest (evaluation, SLKD*'s phase 1, the teacher's logits) by epochs x the largest of the
    image ratios; each teacher by epochs x images (matched to the full grid's teacher of the
    same row and position). ``full``: the full grid. Returns (total s, teachers s, {row: s per
    seed})."""
    per_row = {}
    for row in grid:
        q, f = grid[row][1], full[row][1]
        r_epochs = f["epochs"] / q["epochs"]
        r_train = epoch_images(f) / epoch_images(q)
        r_eval = ((f["data"]["val_split"] or 0) + (f["data"]["test_size"] or FULL_TEST)) / \
            ((q["data"]["val_split"] or 0) + (q["data"]["test_size"] or FULL_TEST))
        cpu = costs[(row, 0)][0]
        folder = recipes.run_dir(out, grid[row][1], 0)
        with open(os.path.join(folder, "history.json")) as fh:
            hist = json.load(fh)
        with open(os.path.join(folder, "metrics.json")) as fh:
            m = json.load(fh)
        frac = min(1.0, sum(hist["time"]) / m["time"]) if m["time"] > 0 else 1.0
        per_row[row] = cpu * r_epochs * (frac * r_train + (1 - frac) * max(r_train, r_eval))
    teachers, seen = 0.0, set()
    for row in grid:
        for tq, tf in zip(teacher_sections(grid[row][1]), teacher_sections(full[row][1])):
            if _teacher_id(tf) in seen:
                continue
            seen.add(_teacher_id(tf))
            done_q = tq.get("snapshot") or tq["epochs"]
            done_f = tf.get("snapshot") or tf["epochs"]
            teachers += costs[("teacher", _teacher_id(tq))][0] * (done_f / done_q) * \
                ((tf.get("train_size") or FULL_TRAIN) / (tq.get("train_size") or FULL_TRAIN))
    total = teachers + sum(per_row.values()) * len(next(iter(full.values()))[1]["seeds"])
    return total, teachers, per_row


def estimate(grid, full, costs, out, args, label):
    """After a --quick run: prints the full study's extrapolated time (or why there is none)."""
    if args.workers:
        log("no estimate: with --workers the CPU times of the runs are not measured here")
        return None
    fresh = all(costs.get((row, 0), (0, 0, False))[2] for row in grid) and \
        all(v[2] for k, v in costs.items() if k[0] == "teacher")
    if not fresh:
        log("no estimate: some runs (or a teacher) were finished by an earlier invocation; measure with a fresh --runs")
        return None
    total, teachers, per_row = extrapolate(grid, full, costs, out)
    n = len(next(iter(full.values()))[1]["seeds"])
    print(f"Estimated time of the full study \"{label}\" on one core ({n} seeds), from this quick run's CPU times: "
          f"{total / 60:.0f} min "
          f"(teachers {teachers / 60:.0f} min; per seed: " + ", ".join(f"{r} {s / 60:.1f}" for r, s in per_row.items())
          + f" min); two workers: about {(teachers + (total - teachers) / 2) / 60:.0f} min.")
    return total


# ---- the report ----------------------------------------------------------------------

def ci_text(d):
    """(mean paired difference, its 95% interval) in points, as table cells; blanks without pairs."""
    if d is None or not d["n"]:
        return "", ""
    ci = "n/a" if math.isnan(d["ci_low"]) else f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
    return f"{100 * d['diff_mean']:+.2f}", ci


def effect(d):
    """'Δ +0.12 points, 95% CI [-0.10, +0.34]' for a compare() row, as a verdict line quotes it."""
    delta, ci = ci_text(d)
    return f"Δ {delta} points, 95% CI {ci}"


def verdict(d):
    """'higher', 'lower' or 'no difference shown' for a compare() row: whether its 95% interval
    lies above 0, below 0, or covers it (or there is no interval: fewer than two pairs)."""
    if d is None or not d["n"] or math.isnan(d["ci_low"]):
        return "no difference shown"
    if d["ci_low"] > 0:
        return "higher"
    if d["ci_high"] < 0:
        return "lower"
    return "no difference shown"


def claim(diffs):
    """The verdict on a claim that some rows beat a baseline, from their compare() rows:
    'supported' when any is higher (95% interval above 0), 'contradicted' when every one is
    lower (interval below 0), else 'not shown'."""
    vs = [verdict(d) for d in diffs]
    if "higher" in vs:
        return "supported"
    if vs and all(v == "lower" for v in vs):
        return "contradicted"
    return "not shown"


def table(grid, out, baseline, extra=(), notes=None, selected=True):
    """The Markdown table of a grid's finished runs: test accuracy in % at the best validation
    epoch and at the last, mean +- std over seeds, and the paired difference to the row
    ``baseline`` with its 95% interval. extra: [(header, function(row, report group, runs'
    metrics) -> cell)]; notes: {row: why} appended as rows not run. selected=False: runs
    without a validation split (nothing to choose an epoch on): the last epoch only, and the
    difference on it."""
    base = grid[baseline][1]["name"]
    groups = {r["recipe"]: r for r in recipes.report(out)}
    metric = "best_test_acc" if selected else "last_test_acc"
    diffs = {r["recipe"]: r for r in recipes.compare(out, baseline=base, metric=metric)}
    accs = ["test acc, best val epoch", "test acc, last epoch"] if selected else ["test acc, last epoch"]
    heads = ["row", "what", "seeds"] + accs + [h for h, _ in extra] + \
        [f"Δ vs {baseline} (points{'' if selected else ', last epoch'})", "95% CI"]
    lines = ["| " + " | ".join(heads) + " |", "|---|---|---|" + "---:|" * (len(heads) - 3)]
    for row, (what, cfg) in grid.items():
        g = groups.get(cfg["name"])
        if g is None:
            lines.append(f"| {row} | {what} | | not run |" + " |" * (len(heads) - 4))
            continue
        ms = run_metrics(g)
        delta, ci = ci_text(diffs.get(cfg["name"]))
        cells = [row, what, ",".join(map(str, g["seeds"]))] + \
            ([f"{g['best_mean']:.2f} ± {g['best_std']:.2f}"] if selected else []) + \
            [f"{g['last_mean']:.2f} ± {g['last_std']:.2f}"] + [fn(row, g, ms) for _, fn in extra] + [delta, ci]
        lines.append("| " + " | ".join(cells) + " |")
    for row, why in (notes or {}).items():
        lines.append(f"| {row} | {why} |" + " |" * (len(heads) - 2))
    return "\n".join(lines) + "\n"


def seed_values(out, recipe, metric="best_test_acc"):
    """{seed: metrics.json's ``metric``} of a recipe's finished runs under ``out``."""
    for g in recipes.report(out):
        if g["recipe"] == recipe:
            return {m["seed"]: m[metric] for m in run_metrics(g) if m.get(metric) is not None}
    return {}


def paired(values, base, level=0.95):
    """recipes.paired of values - base, {seed: number} each, over the seeds both have: for
    numbers no metrics.json holds (a probe's accuracy, a difference of differences)."""
    seeds = sorted(set(values) & set(base))
    return recipes.paired([values[s] for s in seeds], [base[s] for s in seeds], level)


def mean_std(values, scale=100.0, digits=2):
    """'m ± s' of a list of numbers (std with ddof=0, as recipes.report), or '' when empty."""
    vals = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return ""
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def run_metrics(group):
    """The metrics.json of each run of a recipes.report() group, in seed order."""
    out = []
    for folder in group["runs"]:
        with open(os.path.join(folder, "metrics.json")) as f:
            out.append(json.load(f))
    return out


def finished(grid, out):
    """(index, row, recipes.report() group, its runs' metrics) for each row of the grid whose
    recipe has finished runs under ``out``, in the grid's order."""
    groups = {r["recipe"]: r for r in recipes.report(out)}
    for i, (row, (_, cfg)) in enumerate(grid.items()):
        g = groups.get(cfg["name"])
        if g is not None:
            yield i, row, g, run_metrics(g)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, **axes):
    """Sets ``axes`` (title, xlabel, ...) on the figure's first axes, lays it out (a legend on
    each labelled axes that has none), writes it (creating the folder) and closes it; returns
    the path."""
    if axes:
        fig.axes[0].set(**axes)
    for ax in fig.axes:
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def trained(t):
    """How a teacher section is trained, as a phrase: '20 epochs on 60000 images (lr 0.05, cosine)'."""
    return f"{t['epochs']} epochs on {t.get('train_size') or FULL_TRAIN} images (lr {t['lr']:g}, {t['schedule']})"


def describe_mlp(cfg, teachers, reading):
    """A section's first sentences: ``teachers`` (a sentence on them), then the student's side
    of a recipe (data, epochs, optimizer), then ``reading`` (how to read the table)."""
    d = cfg["data"]
    arch = f"{cfg['student']['model']} {cfg['student'].get('hidden') or ''}".strip()
    return (f"{teachers} Student {arch}, {cfg['epochs']} epochs on {d['train_size']} images drawn with the seed, "
            f"validation {d['val_split']} images carved from the training set with the seed (it picks the reported "
            f"epoch), test {d['test_size'] or FULL_TEST} images; lr {cfg['lr']:g}, SGD momentum 0.9, weight decay "
            f"5e-4, cosine, batch 128. {reading}")


def section(title, script, argv, args, elapsed, text, out_path):
    """Appends a Markdown section (title, the command that reproduces it, the machine, then
    ``text``) to ``out_path`` and prints it."""
    cmd = f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    body = "\n".join([f"\n## {title} — {datetime.date.today()}\n",
                      f"`{cmd.strip()}` ({platform.machine()}, kdcore {kdcore.__version__}, {args.workers or 1} "
                      f"process(es) x {args.threads or kdcore.get_num_threads()} thread(s), {elapsed / 60:.0f} min for "
                      f"the runs this invocation made). {text}"])
    print(body)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a") as f:
        f.write(body)
    return body


def run_study(argv, doc, script, folder, title, build_grid, figure, intro, report):
    """The main() of a single-grid study script: parses the common arguments, runs
    build_grid(seeds, quick=...) into <runs>/<folder>, draws figure(grid, out, path) into
    --figures as <script's stem>[_quick].png, appends a section titled ``title`` whose text is
    intro(grid) + the figure's path + report(grid, out), and after --quick prints the estimate."""
    stem = os.path.splitext(script)[0]
    args = parser(doc, stem).parse_args(argv)
    seeds, runs, cache = setup(args)
    t0 = time.perf_counter()
    grid = build_grid(seeds, quick=args.quick)
    out = os.path.join(runs, folder)
    log(f"{title}: {len(grid)} recipes x {len(seeds)} seeds -> {out}")
    costs = run_grid(grid, out, cache, args)
    elapsed = time.perf_counter() - t0
    fig = figure(grid, out, os.path.join(args.figures, f"{stem}{'_quick' if args.quick else ''}.png"))
    section(title, script, argv, args, elapsed, f"{intro(grid)} Figure: {shown(fig)}.\n\n{report(grid, out)}", args.out)
    if args.quick:
        estimate(grid, build_grid(parse_seeds(args.seeds)), costs, out, args, title)
