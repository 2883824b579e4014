"""Is data-free distillation good enough? (study R5): KD from a Fashion-MNIST teacher on a
transfer set the student draws its images from -- DeepInversion's synthetic images, Gaussian
noise, real images of half of the classes, or real images -- at several set sizes, every run
taking the same number of student steps. Runs on kdcore.recipes through benchmarks/studylib.py.

    python benchmarks/study_datafree.py [--seeds 0,1,2] [--runs build/study_datafree] [--threads 1]
                                        [--out benchmarks/STUDIES.md] [--figures benchmarks/figures] [--quick]

The claims checked: the survey's "data-free KD gives plausible students but is hard to train and
expensive", broken into (1) DeepInversion's images teach more than noise with the data's mean and
std (the lower bound: what the teacher's answers alone carry); (2) against real images at the
same count; (3) more synthetic images help (the set-size sweep) and what each costs in CPU time;
(4) mismatched real data (the survey distils an FMNIST teacher on MNIST; MNIST is not on this
machine, so the stand-in is Fashion-MNIST's own training images of classes 0-4 only -- T-shirt,
trouser, pullover, dress, coat -- the student never sees a sandal, shirt, sneaker, bag or boot).

Setting. Teacher: kdcore.models.cnn(width=32), trained by the recipe harness on all 60,000
training images (5 epochs, SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine, batch 128, seed
0: benchmarks/datafree_bench.py's teacher) and cached; the transfer-set rows load it as their
teacher.checkpoint (recipes.teacher_path). Student: cnn(width=16), initial weights drawn with
the seed. Every row: KD at T 4 with KD weight 1 and no CE term (the labels of a synthetic set are
the targets it was optimised for, noise has none: only the teacher's answers teach, on every
row alike), SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine, batch 128, 8 epochs of 40
steps (320 steps): a set of n images is shown 5120 / n times an epoch (recipe data.repeat), the
all-real row stops each epoch after 40 steps (options.max_steps). No validation split (a
data-free student has no labelled data to choose an epoch on): the number is the last epoch's
test accuracy on all 10,000 test images.

Transfer sets (.npz files under <runs>/pools, each holding Fashion-MNIST's test set too, with
Fashion-MNIST's mean/std as their normalisation; a run draws its n images from its set with the
seed):
- deepinversion: 1024 images synthesised once from the teacher by kdcore.datafree.deepinversion
  (seed 0; labels i % 10; 200 Adam steps per batch of 256, lr 0.05, BN weight 10, TV 2.5e-5,
  jitter 2: datafree_bench.py's settings). One synthesis for all seeds (three would not fit the
  budget): the seeds vary which n images, the student's initial weights and the batch order;
  at n = 1024 every seed has the whole set.
- noise: 1024 images of i.i.d. Gaussian pixels with Fashion-MNIST's mean and std (0.286,
  0.353: N(0, 1) after normalisation), seed 0.
- halfclass: the 30,000 training images of classes 0-4.
- real (fashion_mnist itself): n training images drawn with the seed.

CPU time per run: the run's process time (1 thread); a DeepInversion row adds n / 1024 of the
synthesis's process time (the batches of 256 are synthesised independently, so the share is
exact up to the last batch). The teacher's training is shared by every row and left out.

Sizes: real and DeepInversion sets of 256 and 1,024 images, noise and half-class sets of 1,024
(the recipe's 1k/10k/60k synthetic images are out of reach: DeepInversion's 200 steps per batch
of 256 cost about 1.3 CPU minutes per 256 images here).

Budget: --quick (1 seed, 2 epochs of 2 steps, the teacher 1 epoch on 5,000 images, pools of 256,
DeepInversion 10 steps per batch, sets of 64/256 images, test 2,000) extrapolates the full
study's CPU time on one core (studylib.extrapolate, plus the synthesis scaled by images x steps).
Its quick runs are mostly fixed costs (reading the data, the teacher's test logits), which the
extrapolation scales with the training steps, so it overestimates this study: a quick run of an
earlier, larger grid (4096-image sets, 640 steps, 13 rows) extrapolated to about 5 hours. Measured
on the shared 2-core machine (load average 4-7, this job at nice 15 getting about a third of a
core): the teacher took 15 min of wall time, one 320-step run of the all-real row 114 s.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib as lib  # noqa: E402  (the study scripts' shared part, next to this file)

import kdcore  # noqa: E402
from kdcore import recipes  # noqa: E402

SIZES, QUICK_SIZES = (256, 1024), (64, 256)
ARM_SIZES = (1024,)      # the noise and half-class sets: at the largest size only
EPOCHS, QUICK_EPOCHS = 8, 2
EPOCH_IMAGES, QUICK_EPOCH_IMAGES = 5120, 256    # 40 steps of 128 an epoch (2 with --quick)
BATCH = 128
TEACHER = dict(model="cnn", width=32, epochs=5, lr=0.05, optimizer=dict(lib.SGD), schedule="cosine", batch_size=BATCH,
               seed=0)
QUICK_TEACHER = dict(epochs=1, train_size=5000)
STUDENT = dict(model="cnn", width=16)
KD_ONLY = dict(T=4.0, ce_weight=0.0, kd_weight=1.0)
DI = dict(iterations=200, batch_size=256, seed=0)
QUICK_DI_ITERATIONS = 10
NOISE_SEED = 0
HALF = (0, 1, 2, 3, 4)    # the classes of the mismatched set
KINDS = {"real": "real Fashion-MNIST images", "deepinversion": "DeepInversion images",
         "noise": "Gaussian noise images", "halfclass": "real images of classes 0-4 only"}
POOLS = ("deepinversion", "noise", "halfclass")
BASELINE = "real-all"
TITLE = "Is data-free distillation good enough? (R5), cnn pair"


def sizes(quick):
    return QUICK_SIZES if quick else SIZES


def pool_path(runs, kind, teacher, quick):
    """The transfer set's file: named by what it depends on (the teacher's section, the
    synthesis or the noise), so a change makes a new file and new run configurations."""
    what = dict(kind=kind, teacher=teacher, n=sizes(quick)[-1])
    if kind == "deepinversion":
        what.update(DI, iterations=QUICK_DI_ITERATIONS if quick else DI["iterations"])
    elif kind == "noise":
        what.update(seed=NOISE_SEED)
    elif kind == "halfclass":
        what.update(classes=list(HALF))
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(runs, "pools", f"{kind}-{digest}.npz")


def build_grid(seeds=(0, 1, 2), quick=False, runs=None):
    """The study's recipes, validated: {row: (what, recipe)} in table order. Rows are named by
    the full study's set sizes at either size (real-256 holds 64 images in a --quick grid).
    runs: the folder of the runs (the pools and the teacher cache live there)."""
    runs = runs or os.path.join(lib.ROOT, "build", "study_datafree", *(["quick"] if quick else []))
    teacher = dict(TEACHER, **(QUICK_TEACHER if quick else {}))
    per_epoch = QUICK_EPOCH_IMAGES if quick else EPOCH_IMAGES
    data = dict(test_size=2000 if quick else None, val_split=None)
    base = dict(student=dict(STUDENT), optimizer=dict(lib.SGD), lr=0.05, schedule="cosine", batch_size=BATCH,
                epochs=QUICK_EPOCHS if quick else EPOCHS, augment=False, seeds=list(seeds), method="kd",
                options=dict(KD_ONLY), teacher=teacher)
    # the teacher answers each step: distill's logit cache would run it over all 60,000 images first
    rows = [(BASELINE, f"KD on real images, all 60,000 ({per_epoch // BATCH} steps an epoch)",
             dict(data=dict(data, source="fashion_mnist"),
                  options=dict(KD_ONLY, max_steps=per_epoch // BATCH, cache=False)))]
    real = lib.validated(rows, base, "r5", "study_datafree")
    checkpoint = dict(model="cnn", width=TEACHER["width"],
                      checkpoint=recipes.teacher_path(real[BASELINE][1], os.path.join(runs, "_teachers")))
    rows = []
    for kind in ("real",) + POOLS:
        for full_n, n in zip(SIZES, sizes(quick)):
            if kind in ("noise", "halfclass") and full_n not in ARM_SIZES:
                continue
            over = dict(data=dict(data, source="fashion_mnist", train_size=n, repeat=per_epoch // n))
            if kind != "real":
                over["data"]["source"] = pool_path(runs, kind, teacher, quick)
                over["teacher"] = checkpoint
            rows.append((f"{kind}-{full_n}", f"{n} {KINDS[kind]}", over))
    return dict(real, **lib.validated(rows, base, "r5", "study_datafree"))


def kind_of(row):
    return row.rsplit("-", 1)[0]


def images(cfg):
    return cfg["data"]["train_size"] or lib.FULL_TRAIN


# ---- the transfer sets ---------------------------------------------------------------

def _save_npz(path, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def build_pools(grid, teacher, quick):
    """Writes each transfer set of the grid that is not there yet, with <set>.json beside it:
    the synthesis's CPU seconds and the teacher's predicted classes on the set's first 4096
    images (all of a synthetic set). Returns {kind: that record}."""
    test = kdcore.datasets.fashion_mnist("test")
    mean, std = kdcore.datasets.FASHION_MNIST_MEAN, kdcore.datasets.FASHION_MNIST_STD
    n = sizes(quick)[-1]
    out = {}
    for kind in POOLS:
        path = next(cfg["data"]["source"] for row, (_, cfg) in grid.items() if kind_of(row) == kind)
        meta_path = path[:-4] + ".json"
        if os.path.exists(path) and os.path.exists(meta_path):
            with open(meta_path) as f:
                out[kind] = json.load(f)
            continue
        c0, resumed = time.process_time(), False
        if kind == "deepinversion":
            ckpt = path[:-4] + ".ckpt.safetensors"
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            resumed = os.path.exists(ckpt)
            lib.log(f"deepinversion: synthesising {n} images" + (" (resuming)" if resumed else ""))
            x, y, _ = kdcore.datafree.deepinversion(teacher, n, iterations=QUICK_DI_ITERATIONS if quick else
                                                    DI["iterations"], batch_size=DI["batch_size"], seed=DI["seed"],
                                                    checkpoint=ckpt, resume=True)
        elif kind == "noise":
            x = np.random.default_rng(NOISE_SEED).standard_normal((n,) + test.shape).astype(np.float32)
            y = None
        else:
            train = kdcore.datasets.fashion_mnist("train")
            keep = np.isin(train.y, HALF)
            x, y = None, train.y[keep]
            raw = train.X[keep]
        cpu = time.process_time() - c0
        probe = x[:4096] if x is not None else None
        if probe is None:   # real images: the teacher sees them normalised as in its training
            probe = ((raw[:4096].astype(np.float32) / 255 - mean[0]) / std[0])
        pred = kdcore.predict(teacher, probe.astype(np.float32), batch_size=512).argmax(1)
        if y is None:
            y = pred.astype(np.int64)
        # synthetic images live in the teacher's normalised space; the file holds them on the pixel scale
        x_train = raw if x is None else (x * std[0] + mean[0]).astype(np.float32)
        _save_npz(path, X_train=x_train, y_train=np.asarray(y, np.int64), X_test=test.X, y_test=test.y,
                  mean=np.array(mean), std=np.array(std))
        rec = dict(kind=kind, images=int(len(x_train)), synthesis_cpu_s=cpu if kind == "deepinversion" else 0.0,
                   resumed=resumed, teacher_classes=np.bincount(pred, minlength=10).tolist(),
                   teacher_agrees_with_labels=float(np.mean(pred == np.asarray(y)[:len(pred)])))
        with open(meta_path, "w") as f:
            json.dump(rec, f, indent=1)
        lib.log(f"{kind}: {len(x_train)} images -> {lib.shown(path)} ({cpu:.0f} s CPU)")
        out[kind] = rec
    return out


# ---- CPU time record -----------------------------------------------------------------

def record_cpu(costs, grid, out):
    """Adds the CPU seconds of the runs made now to <out>/cpu.json ({recipe/seed: s});
    returns the whole record."""
    path = os.path.join(out, "cpu.json")
    rec = {}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    for (row, seed), (cpu, _, fresh) in ((k, v) for k, v in costs.items() if k[0] != "teacher"):
        if fresh and row in grid:
            rec[f"{grid[row][1]['name']}/{seed}"] = cpu
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
    return rec


def read_json(path, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def cpu_minutes(grid, out, pools):
    """{row: mean CPU minutes per run over its recorded seeds (the synthesis's share of a
    DeepInversion row included)}; rows without a record are left out."""
    rec = read_json(os.path.join(out, "cpu.json"), {})
    res = {}
    for row, (_, cfg) in grid.items():
        vals = [rec[f"{cfg['name']}/{s}"] for s in cfg["seeds"] if f"{cfg['name']}/{s}" in rec]
        if not vals:
            continue
        p = pools.get(kind_of(row), {})
        share = p.get("synthesis_cpu_s", 0.0) * images(cfg) / p["images"] if p else 0.0
        res[row] = (sum(vals) / len(vals) + share) / 60
    return res


def pool_records(grid):
    """{kind: the .json record of its transfer set} for the sets on disk."""
    out = {}
    for row, (_, cfg) in grid.items():
        src = cfg["data"]["source"]
        if kind_of(row) in POOLS and kind_of(row) not in out:
            rec = read_json(src[:-4] + ".json", None)
            if rec is not None:
                out[kind_of(row)] = rec
    return out


# ---- the report ----------------------------------------------------------------------

def report(grid, out):
    """The table, the transfer sets' diagnostics and the verdicts, as Markdown."""
    name = {row: cfg["name"] for row, (_, cfg) in grid.items()}
    pools = pool_records(grid)
    cpu = cpu_minutes(grid, out, pools)
    vs_real = {n: {r["recipe"]: r for r in recipes.compare(out, baseline=name[f"real-{n}"], metric="last_test_acc")}
               for n in SIZES if f"real-{n}" in name}

    def same_count(row, g, ms):
        if kind_of(row) == "real" or row == BASELINE:
            return ""
        delta, ci = lib.ci_text(vs_real[int(row.rsplit("-", 1)[1])].get(name[row]))
        return f"{delta} {ci}".strip()

    text = lib.table(grid, out, BASELINE, selected=False, extra=[
        ("images", lambda row, g, ms: str(images(grid[row][1]))),
        ("CPU min / run", lambda row, g, ms: f"{cpu[row]:.2f}" if row in cpu else ""),
        ("agreement with teacher (test)", lambda row, g, ms: lib.mean_std([m.get("last_test_agreement") for m in ms])),
        ("Δ vs real, same count (points, 95% CI)", same_count)])
    lines = []
    for kind, p in pools.items():
        top = int(np.argmax(p["teacher_classes"]))
        share = 100 * p["teacher_classes"][top] / max(1, sum(p["teacher_classes"]))
        lines.append(f"- {kind}: {p['images']} images; the teacher's predictions on (the first 4096 of) them: most "
                     f"frequent class {top} ({share:.0f}%), {sum(c > 0 for c in p['teacher_classes'])} classes seen"
                     + (f"; synthesis {p['synthesis_cpu_s'] / 60:.1f} CPU min" + (" (this invocation's part: resumed)"
                                                                                    if p.get("resumed") else "")
                        + f", the teacher classifies {100 * p['teacher_agrees_with_labels']:.0f}% as their target"
                        if kind == "deepinversion" else ""))
    return text + ("\nTransfer sets:\n" + "\n".join(lines) + "\n" if lines else "") + "\n" + verdicts(out, name)


def verdicts(out, name):
    """The verdict lines, from the runs' paired differences on the last epoch's accuracy."""
    def diff(row, base):
        if row not in name or base not in name:
            return None
        return next((r for r in recipes.compare(out, baseline=name[base], metric="last_test_acc")
                     if r["recipe"] == name[row]), None)

    def effect(d):
        delta, ci = lib.ci_text(d)
        return f"Δ {delta or 'n/a'} points, 95% CI {ci or 'n/a'}"

    lines = []
    for n in ARM_SIZES:
        d = diff(f"deepinversion-{n}", f"noise-{n}")
        lines.append(f"Verdict on \"DeepInversion's images teach more than noise\" at {n} images: "
                     f"**{lib.claim([d])}** ({effect(d)}).")
    for n in SIZES:
        d = diff(f"deepinversion-{n}", f"real-{n}")
        lines.append(f"DeepInversion's images against as many real ones at {n}: **{lib.verdict(d)}** ({effect(d)}).")
    d = diff(f"deepinversion-{SIZES[-1]}", f"deepinversion-{SIZES[0]}")
    lines.append(f"Verdict on \"more synthetic images help\" ({SIZES[-1]} against {SIZES[0]}): **{lib.claim([d])}** "
                 f"({effect(d)}).")
    for n in ARM_SIZES:
        d, e = diff(f"halfclass-{n}", f"real-{n}"), diff(f"halfclass-{n}", f"deepinversion-{n}")
        lines.append(f"Half the classes' real images at {n}: against all classes' **{lib.verdict(d)}** ({effect(d)}); "
                     f"against DeepInversion's **{lib.verdict(e)}** ({effect(e)}).")
    return "\n".join(lines) + "\n"


def figure(grid, out, path):
    """Accuracy (last epoch, mean +- std over seeds) against the transfer set's size and against
    CPU minutes per run, one line per kind of set; the all-real row as a dashed line."""
    plt = lib.pyplot()
    groups = {r["recipe"]: r for r in recipes.report(out)}
    cpu = cpu_minutes(grid, out, pool_records(grid))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, kind in enumerate(("real",) + POOLS):
        pts = [(images(cfg), cpu.get(row), groups[cfg["name"]]) for row, (_, cfg) in grid.items()
               if kind_of(row) == kind and cfg["name"] in groups]
        if not pts:
            continue
        x, c, g = zip(*pts)
        y, e = [q["last_mean"] for q in g], [q["last_std"] for q in g]
        a1.errorbar(x, y, yerr=e, marker="o", color=f"C{i}", label=KINDS[kind], capsize=3)
        if all(v is not None for v in c):
            a2.errorbar(c, y, yerr=e, marker="o", color=f"C{i}", label=KINDS[kind], capsize=3)
    g = groups.get(grid[BASELINE][1]["name"])
    if g is not None:
        for ax in (a1, a2):
            ax.axhline(g["last_mean"], color="k", ls="--", lw=1, label="KD on all 60,000 real images")
    a1.set_xscale("log", base=2)
    a2.set_xscale("log")
    a2.set(xlabel="CPU minutes per run (DeepInversion: its share of the synthesis included)",
           ylabel="test accuracy (%), last epoch")
    return lib.save_figure(fig, path, xlabel="images in the transfer set", ylabel="test accuracy (%), last epoch",
                           title="R5: KD on transfer sets (cnn32 -> cnn16, Fashion-MNIST)")


def intro(grid):
    cfg = grid[BASELINE][1]
    t = cfg["teacher"]
    steps = cfg["epochs"] * (lib.epoch_images(cfg) // cfg["batch_size"])
    return (f"Teacher cnn width 32, {lib.trained(t)}; student cnn width 16, KD at T 4 with KD weight 1 and no CE term, "
            f"{steps} steps ({cfg['epochs']} epochs of {lib.epoch_images(cfg) // cfg['batch_size']}, batch "
            f"{cfg['batch_size']}; a set of n images shown {lib.epoch_images(cfg)} / n times an epoch), SGD lr "
            f"{cfg['lr']:g}, momentum 0.9, weight decay 5e-4, cosine; no validation split: test accuracy in % on "
            f"{cfg['data']['test_size'] or lib.FULL_TEST} test images after the last epoch, mean ± std over seeds. "
            "The DeepInversion set is synthesised once (seed 0); seeds vary the images drawn from each set, the "
            "student's initial weights and the batch order. Δ: mean paired difference over the seeds with its 95% "
            "Student-t interval. CPU min / run: the run's process time (1 thread) plus, for DeepInversion, its "
            "images' share of the synthesis; the teacher's training, shared by all rows, is not counted. Not run: "
            "DAFL, DFAD and ZSKT (near chance at 600 steps, benchmarks/RESULTS.md), synthetic sets of 10k-60k images "
            "(DeepInversion's 1024 images are a large part of the budget), a synthesis per seed, MNIST.")


def main(argv=None):
    """The study: the real-data rows (which train the teacher), the transfer sets, then the
    rest of the grid; appends its section to --out."""
    script = "study_datafree.py"
    args = lib.parser(__doc__, "study_datafree").parse_args(argv)
    seeds, runs, cache = lib.setup(args)
    t0 = time.perf_counter()
    grid = build_grid(seeds, quick=args.quick, runs=runs)
    out = os.path.join(runs, "r5")
    lib.log(f"{TITLE}: {len(grid)} recipes x {len(seeds)} seeds -> {out}")
    own = {row: v for row, v in grid.items() if v[1]["teacher"].get("checkpoint") is None}
    costs = lib.run_grid(own, out, cache, args)
    teacher = recipes.prepare(grid[BASELINE][1], seeds[0], cache)["teacher"]
    c0 = time.process_time()
    pools = build_pools(grid, teacher, args.quick)
    pools_cpu = time.process_time() - c0
    costs.update(lib.run_grid({row: v for row, v in grid.items() if row not in own}, out, cache, args))
    record_cpu(costs, grid, out)
    elapsed = time.perf_counter() - t0
    fig = figure(grid, out, os.path.join(args.figures, f"study_datafree{'_quick' if args.quick else ''}.png"))
    lib.section(TITLE, script, argv, args, elapsed, f"{intro(grid)} Figure: {lib.shown(fig)}.\n\n{report(grid, out)}",
                args.out)
    if args.quick:
        full = build_grid(lib.parse_seeds(args.seeds), runs=args.runs)
        total = lib.estimate(grid, full, costs, out, args, TITLE)
        di = pools["deepinversion"]
        if total is not None and not di["resumed"]:
            syn = di["synthesis_cpu_s"] * (SIZES[-1] / di["images"]) * (DI["iterations"] / QUICK_DI_ITERATIONS)
            print(f"Plus the transfer sets: DeepInversion's {SIZES[-1]} images at {DI['iterations']} steps about "
                  f"{syn / 60:.0f} min (this quick run: {pools_cpu:.0f} s for all its sets); the full study with them: "
                  f"about {(total + syn) / 60:.0f} min on one core.")


if __name__ == "__main__":
    main()
