"""Feature distillation on Fashion-MNIST, RepDistiller-style: every method of
kdcore.losses.METHODS plus SLKD, over several seeds, on one conv teacher/student pair.

    python benchmarks/feature_bench.py [--seeds 0,1,2] [--epochs 8] [--student-data 6000]
                                       [--methods kd,at,...] [--out benchmarks/RESULTS.md]
                                       [--cache build/feature_bench] [--quick] [--threads N]

This is a benchmark, not a test: it measures and appends what it measured to --out.

The pair. Teacher: a zoo net (default resnet8x4, widths 32-64-128-256), trained once on all
60,000 labelled training images (SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine, batch
128, random 2-pixel crops and flips, --teacher-epochs) and cached with kdcore.save in
--cache under a name keyed by that configuration, so reruns load it. Student: a zoo net
(default resnet8, widths 16-16-32-64) that sees --student-data labelled images drawn with the
seed (6,000 by default, as distill_bench.py: the few-label setting where distillation pays),
without augmentation, same optimizer recipe for every method (the references use one lr for
all methods) and the same initial weights per seed for every method.

The methods: each name of kdcore.losses.METHODS when the script runs (ce = the student alone,
kd, dkd, mse, fitnet, at, sp, nst, rkd, pkt, fsp, ... as the library grows), with its
reference recipe (the weights RepDistiller / mdistiller use), through kdcore.distill; plus
"slkd" (kdcore.slkd, its defaults; SL-teachers with the teacher's architecture unless
--sl-teacher says otherwise) and "kd-slkd-weights" (KD with SLKD's total weights, CE 0.4 and
KD 3.6: the control SLKD's paper lacks). --methods picks a subset. Schedules: a term's
warm-up (DKD's 20 of mdistiller's 240 epochs) lasts --warmup epochs (default a quarter of
--epochs, as distill_bench.py), a stop epoch is scaled by --epochs/240, and an
initialisation phase (FSP's) keeps kdcore's default (an eighth of the epochs, extra epochs
before the main phase; the "epochs" column counts them). A method whose recipe cannot apply
to the pair (FSP needs equal channel counts at the stage taps: resnet8x4 has 64/128/256,
resnet8 16/32/64) raises ValueError before its first epoch and is reported as "n/a: <the
error>"; a run that fails later (a non-finite loss: kdcore raises) is reported as "failed".

Measured: test accuracy after every epoch (all 10,000 test images); the table gives mean ±
std over seeds of the last epoch's and of the best epoch's accuracy. The best epoch is
selected on the test set, as RepDistiller and mdistiller report it: an optimistic number.
"Δ last vs KD" is the paired difference to KD (same seed, subset and initial student) in
points. Time: wall time per run (training, the per-epoch test evaluation, caching the
teacher's logits where the method allows it) and training time per epoch.

Per-step cost: for each method, a fresh subprocess loads the data and the cached teacher and
runs 3 epochs of --cost-steps steps (batch 128); img/s is the student step throughput of the
fastest epoch after the first, peak RSS the child's own peak (VmHWM; getrusage's maxrss
would carry this script's peak into the child over fork + exec) for the whole process: the
interpreter, the data set, the teacher, the method's state. Both are given next to plain
KD's as ratios: KD as distill runs it by default (teacher logits cached: no teacher forward
in the step) and KD with the teacher run at every step (cache=False), the fair reference
for methods that read the teacher's features. A "process baseline" child loads everything
and trains nothing.

Budget and its estimate. Defaults: 3 seeds x every method, 8 student epochs on 6,000 images,
teacher resnet8x4 for 8 epochs on 60,000 images: ~65 min on an idle 2-core machine with the
11 methods METHODS had when this was written (+ SLKD and its control). The basis: the idle
2-thread throughputs bench_train.py measured on this machine (RESULTS.md: resnet8x4 training
399 img/s, inference 1,241 img/s; resnet8 training 3,350 img/s, inference ~9,300; distillation
with cached logits 3,845 img/s) and the ratios between methods a --quick run measured (its
per-step table: the feature methods ~4.5x slower per step than the student alone, about as
slow as KD running the teacher every step; SLKD ~20x). That gives the teacher 8 x 150 s =
20 min (once; later runs load it); per seed and epoch, the student alone and each logit method
~3 s (training + 1 s of test evaluation; + 5 s per run to cache the teacher's logits), each
feature method 8-10 s, SLKD ~33 s: ~100 s per seed-epoch, so 3 x 8 x 100 s = 40 min; the cost
table ~5 min. Every feature method added to METHODS adds ~4 min (3 x 8 x ~10 s), so the
default run stays under two hours up to ~12 more methods. The quick run itself was made with 1
thread on the machine loaded by other jobs (load average 2-5 on 2 CPUs), where every per-step
speed was 5-7x below those idle figures; its extrapolation of the default run at its own
speeds was 363 min (teacher 130, students 226, cost table 7), i.e. ~60 min at the idle
speeds, consistent with the estimate. The script prints that extrapolation at the end of every
run ("extrapolated"), so a quick run on another machine gives its own estimate.

Resuming. Every finished (method, seed) run is recorded in --cache/runs.jsonl under a key of
everything it depends on (teacher configuration, student, data size, epochs, lr, warm-up,
augmentation, method, seed); a later invocation with the same options reuses it instead of
training again, so an interrupted run resumes and adding a method trains only that method.
The table is built from recorded and new runs alike; --fresh ignores the record.

Options: --quick (1 seed, 2 epochs, 1,000 student images, teacher 1 epoch on 5,000 images,
2,000 test images: checks the script end to end; its teacher is cached under its own key),
--threads (kdcore.set_num_threads; default: kdcore's), --lr, --lr-scale method=f,...
(e.g. dkd=0.25 if a method diverges at the common lr), --augment (crops and flips for the
students too; then no method can cache teacher logits), --teacher/--student (zoo names),
--no-cost (skip the per-step table), --fresh (see below). Progress lines go to stdout with elapsed time.
"""
import argparse
import datetime
import hashlib
import io
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

import numpy as np

import kdcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_EPOCHS = 240          # RepDistiller / mdistiller CIFAR schedules: what a recipe's epoch counts refer to
BATCH = 128
# The default budget (the docstring's estimate is for it; --quick overrides it)
DEFAULT = dict(seeds="0,1,2", epochs=8, student_data=6000, teacher_epochs=8, teacher_data=60000, test_data=10000)
EXTRA = {"slkd": "SLKD: kdcore.slkd, defaults (lambda 1, eta 3, alpha 0.1, rho 0.5, T 4)",
         "kd-slkd-weights": "KD with SLKD's total weights (CE 0.4, KD 3.6, T 4): SLKD's control"}
T0 = time.perf_counter()


def log(msg):
    e = time.perf_counter() - T0
    print(f"[{int(e // 3600)}:{int(e % 3600 // 60):02d}:{int(e % 60):02d}] {msg}", flush=True)


def sgd(lr):
    return kdcore.optim.SGD(lr=lr, momentum=0.9, weight_decay=5e-4)


def zoo(name, seed):
    return kdcore.models.get(name, num_classes=10, in_channels=1, seed=seed)


def all_methods():
    return list(kdcore.losses.METHODS) + list(EXTRA)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=DEFAULT["seeds"])
    ap.add_argument("--epochs", type=int, default=DEFAULT["epochs"], help="student epochs")
    ap.add_argument("--student-data", type=int, default=DEFAULT["student_data"], help="labelled images the student sees")
    ap.add_argument("--methods", default="", help="comma-separated subset of: kdcore.losses.METHODS, slkd, "
                                                  "kd-slkd-weights (default: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "feature_bench"), help="teacher cache directory")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 2 epochs, 1,000 student images, teacher 1 epoch on 5,000, 2,000 test images")
    ap.add_argument("--teacher", default="resnet8x4")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher-epochs", type=int, default=DEFAULT["teacher_epochs"])
    ap.add_argument("--teacher-data", type=int, default=DEFAULT["teacher_data"])
    ap.add_argument("--test-data", type=int, default=DEFAULT["test_data"])
    ap.add_argument("--lr", type=float, default=0.1, help="SGD lr at batch 128 (RepDistiller's 0.05 at batch 64)")
    ap.add_argument("--lr-scale", default="", help="per-method lr factors, e.g. dkd=0.25,slkd=0.25")
    ap.add_argument("--warmup", type=int, default=None, help="epochs of a term's warm-up (default epochs // 4)")
    ap.add_argument("--sl-teacher", default="teacher",
                    help="SLKD's SL-teacher architecture: 'teacher' (the paper's) or a zoo name")
    ap.add_argument("--augment", action="store_true", help="random crops and flips for the students too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cost-steps", type=int, default=20, help="steps per epoch of the per-step cost runs")
    ap.add_argument("--no-cost", action="store_true", help="skip the per-step cost table")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="time the cost table's epochs by the wall clock or by the process's CPU time (with "
                    "--threads 1: the time other jobs take on a shared machine is not counted)")
    ap.add_argument("--fresh", action="store_true", help="ignore the runs recorded in --cache (rerun every method)")
    ap.add_argument("--_cost", default=None, help=argparse.SUPPRESS)   # internal: the cost child
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.student_data = "0", 2, 1000
        args.teacher_epochs, args.teacher_data, args.test_data = 1, 5000, 2000
    if args.warmup is None:
        args.warmup = max(1, args.epochs // 4)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        args.lr_factors = {k.strip(): float(v) for k, v in (kv.split("=") for kv in args.lr_scale.split(",") if kv)}
    except ValueError:
        ap.error(f"--lr-scale must look like dkd=0.25,slkd=0.25, got {args.lr_scale!r}")
    known = all_methods()
    if args.methods:
        want = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in want if m not in known]
        if unknown:
            ap.error(f"unknown methods {unknown}; available: {', '.join(known)}")
        args.method_list = [m for m in known if m in want]
    else:
        args.method_list = known
    for name in [args.teacher, args.student] + ([] if args.sl_teacher == "teacher" else [args.sl_teacher]):
        if name.lower() not in kdcore.models.names():
            ap.error(f"{name!r} is not a zoo model; zoo: {', '.join(kdcore.models.names())}")
    return args


# ---- data and the teacher ------------------------------------------------------------

def load_data(args):
    train, test = kdcore.datasets.fashion_mnist("train"), kdcore.datasets.fashion_mnist("test")
    if args.test_data < len(test):
        test = test.subset(np.arange(args.test_data))
    return train, test


def student_subset(train, n, seed):
    return train.subset(np.random.default_rng(seed).permutation(len(train))[:n])


def teacher_config(args):
    return dict(arch=args.teacher, epochs=args.teacher_epochs, data=min(args.teacher_data, 60000), seed=0, lr=args.lr,
                batch_size=BATCH, optimizer="SGD momentum 0.9 wd 5e-4", schedule="cosine", augment="crop 2 + hflip")


def teacher_path(args):
    cfg = teacher_config(args)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.cache, f"teacher-{args.teacher}-{args.teacher_epochs}ep-{cfg['data']}-{key}.safetensors")


def get_teacher(args, train, test):
    """The teacher, from the cache or trained (and cached) now; info for the report."""
    path = teacher_path(args)
    teacher = zoo(args.teacher, seed=0)
    if os.path.exists(path):
        st = kdcore.load(path, teacher)
        info = dict(st["info"], cached=True, path=path)
        log(f"teacher {args.teacher}: loaded {os.path.relpath(path)} (trained in {info['train_time']:.0f} s)")
    else:
        n = min(args.teacher_data, len(train))
        data = train if n >= len(train) else train.subset(np.random.default_rng(12345).permutation(len(train))[:n])
        log(f"teacher {args.teacher}: training {args.teacher_epochs} epochs on {n} images "
            f"({teacher.num_parameters():,} parameters); cache {os.path.relpath(path)}")

        def cb(e, row):
            log(f"  teacher epoch {e + 1}/{args.teacher_epochs}: loss {row['train_loss']:.4f} "
                f"train acc {row['train_acc']:.4f} ({row['time']:.0f} s)")
            return False
        t = time.perf_counter()
        hist = kdcore.fit(teacher, data, epochs=args.teacher_epochs, batch_size=BATCH, optimizer=sgd(args.lr),
                          schedule=kdcore.optim.Cosine(), augment=True, seed=0, progress=False, callback=cb)
        info = dict(train_time=time.perf_counter() - t, epoch_time=float(np.mean(hist["time"])), n_train=n,
                    epochs=args.teacher_epochs)
        os.makedirs(args.cache, exist_ok=True)
        kdcore.save(path, teacher, config=teacher_config(args), info=info)
        info = dict(info, cached=False, path=path)
    t = time.perf_counter()
    info["test_acc"] = kdcore.evaluate(teacher, test, batch_size=500)["accuracy"]
    info["eval_time"] = time.perf_counter() - t
    log(f"teacher {args.teacher}: test accuracy {info['test_acc']:.4f} on {len(test)} images")
    teacher.eval()
    return teacher, info


# ---- one method, one seed ------------------------------------------------------------

def recipe(name, args):
    """The method's reference terms with their schedules fitted to the budget; changed: whether
    anything differs from METHODS[name] (then distill gets losses=, else method=name)."""
    terms = kdcore.losses.method_terms(name)
    changed = False
    for t in terms:
        if t.warmup_epochs:
            t.warmup_epochs, changed = args.warmup, True
        if t.stop_epoch:
            t.stop_epoch, changed = max(1, round(t.stop_epoch * args.epochs / REF_EPOCHS)), True
    return terms, changed


def has_init_phase(name):
    return name in kdcore.losses.METHODS and any(t.phase == "init" for t in kdcore.losses.method_terms(name))


def train_method(name, student, teacher, data, args, seed, **common):
    """Runs one method; returns its History."""
    lr = args.lr * args.lr_factors.get(name, 1.0)
    common = dict(dict(batch_size=BATCH, optimizer=sgd(lr), schedule=kdcore.optim.Cosine(), seed=seed, progress=False,
                       augment=True if args.augment else None), **common)
    if name == "slkd":
        sl = None if args.sl_teacher == "teacher" else \
            [zoo(args.sl_teacher, seed=2000 + 10 * seed + j) for j in range(2)]
        return kdcore.slkd(student, teacher, data, sl_teachers=sl, **common)
    if name == "kd-slkd-weights":
        return kdcore.distill(student, teacher, data, method="kd", ce_weight=0.4, kd_weight=3.6, **common)
    terms, changed = recipe(name, args)
    return kdcore.distill(student, teacher, data, **(dict(losses=terms) if changed else dict(method=name)), **common)


def run_method(name, seed, data, test, teacher, args):
    student = zoo(args.student, seed=1000 + seed)
    accs, train_t, eval_t = [], [], []

    def cb(e, row):
        t = time.perf_counter()
        accs.append(kdcore.evaluate(student, test, batch_size=500)["accuracy"])
        eval_t.append(time.perf_counter() - t)
        train_t.append(row["time"])
        return False

    t = time.perf_counter()
    try:
        train_method(name, student, teacher, data, args, seed, epochs=args.epochs, callback=cb)
    except (ValueError, RuntimeError) as e:
        wall = time.perf_counter() - t
        if isinstance(e, ValueError) and not accs:
            return dict(status="n/a", reason=str(e), time=wall)
        return dict(status="failed", reason=f"{type(e).__name__} after {len(accs)} epochs: {e}", time=wall)
    wall = time.perf_counter() - t
    return dict(status="ok", last=accs[-1], best=max(accs), best_epoch=int(np.argmax(accs)) + 1, epochs=len(accs),
                time=wall, train_time=float(sum(train_t)), eval_time=float(sum(eval_t)),
                epoch_time=float(np.mean(train_t)))


def run_key(name, seed, args):
    """What a finished (method, seed) run depends on: the teacher's configuration and every
    option that reaches the student's training."""
    cfg = dict(teacher=teacher_config(args), student=args.student, student_data=args.student_data, epochs=args.epochs,
               test_data=args.test_data, lr=args.lr * args.lr_factors.get(name, 1.0), warmup=args.warmup,
               augment=args.augment, sl_teacher=args.sl_teacher, method=name, seed=seed)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def runs_path(args):
    return os.path.join(args.cache, "runs.jsonl")


def load_runs(args):
    """Finished runs recorded by earlier invocations, by run_key (a rerun after adding a method
    trains only the new one). Lines that do not parse (a run killed mid-write) are ignored."""
    runs, path = {}, runs_path(args)
    if args.fresh or not os.path.exists(path):
        return runs
    with open(path) as f:
        for ln in f:
            try:
                rec = json.loads(ln)
                runs[rec["key"]] = rec["result"]
            except (ValueError, KeyError, TypeError):
                continue
    return runs


def record_run(args, key, name, seed, result):
    os.makedirs(args.cache, exist_ok=True)
    with open(runs_path(args), "a") as f:
        f.write(json.dumps(dict(key=key, method=name, seed=seed, kdcore=kdcore.__version__, result=result)) + "\n")


# ---- per-step cost: one fresh process per method --------------------------------------

def peak_rss_mb():
    """This process's peak RSS: VmHWM of /proc/self/status where there is one. getrusage's
    ru_maxrss is not used there: Linux carries the forking parent's peak over fork + exec into
    it (measured: a child of an 800 MB parent reports 814 MB right after start), so every
    child would report this script's own peak."""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cost_child(args):
    """In the child: load, run 3 short epochs, print one JSON line."""
    if args.threads:
        kdcore.set_num_threads(args.threads)
    train, _ = load_data(args)
    data = student_subset(train, args.student_data, 0)
    del train
    teacher = zoo(args.teacher, seed=0)
    kdcore.load(teacher_path(args), teacher)
    teacher.eval()
    name = args._cost
    out = dict(name=name)
    if name != "-":
        student = zoo(args.student, seed=1000)
        method = "kd" if name == "kd-nocache" else name
        kw = dict(cache=False) if name == "kd-nocache" else {}
        if has_init_phase(name):
            kw["init_epochs"] = 3
        cpu = [time.process_time()]

        def cpu_clock(e, row):
            cpu.append(time.process_time())
            return False
        if args.clock == "cpu":
            kw["callback"] = cpu_clock
        try:
            hist = train_method(method, student, teacher, data, args, 0, epochs=3, max_steps=args.cost_steps, **kw)
        except (ValueError, RuntimeError) as e:
            out.update(status="n/a" if isinstance(e, ValueError) else "failed", reason=str(e))
        else:
            times = np.asarray(hist["time"], float)
            if args.clock == "cpu":
                if len(cpu) != len(times) + 1:
                    raise SystemExit(f"--clock cpu: {len(cpu) - 1} epoch callbacks for {len(times)} History rows")
                times = np.diff(np.asarray(cpu))
            stages = np.asarray(hist["stage"], int) if "stage" in hist else np.zeros(len(times), int)
            steps = min(math.ceil(len(data) / BATCH), args.cost_steps)
            images = min(len(data), steps * BATCH)
            # per phase, the fastest epoch after the phase's first; the slowest phase is reported
            # (a phase of a single epoch, as one of FT's, has no later epoch: that epoch counts)
            per_stage = [images / (t[1:] if len(t) > 1 else t).min()
                         for t in (times[stages == s] for s in sorted(set(stages.tolist())))]
            out.update(status="ok", img_s=min(per_stage), stage_img_s=per_stage, steps=steps)
    out["maxrss_mb"] = peak_rss_mb()
    print("COST " + json.dumps(out), flush=True)


def cost_table(args, names):
    rows = {}
    for name in ["-", "kd", "kd-nocache"] + [n for n in names if n != "kd"]:
        t = time.perf_counter()
        argv = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--_cost", name]
        p = subprocess.run(argv, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("COST ")]
        if p.returncode != 0 or not line:
            err = (p.stderr.strip().splitlines() or ["no output"])[-1]
            rows[name] = dict(name=name, status="failed", reason=f"exit {p.returncode}: {err}")
        else:
            rows[name] = json.loads(line[0][5:])
        r = rows[name]
        what = f"{r['img_s']:.0f} img/s" if r.get("status") == "ok" else r.get("status", "baseline")
        log(f"cost {name:<16} {what}, peak RSS {r.get('maxrss_mb', float('nan')):.0f} MB "
            f"({time.perf_counter() - t:.0f} s)")
    return rows


# ---- report ----------------------------------------------------------------------------

def machine_line():
    cpu = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), None)
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    buf = io.StringIO()
    kdcore.show_config(file=buf)
    cfg = "; ".join(ln for ln in buf.getvalue().splitlines() if ln and not ln.startswith("python "))
    git = ""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
        if rev.returncode == 0:
            git = f"git {rev.stdout.strip()}{' + uncommitted changes' if dirty.stdout.strip() else ''}; "
    except OSError:
        pass
    return (f"{cpu} ({platform.machine()}), {os.cpu_count()} CPUs, {kdcore.get_num_threads()} threads; {git}{cfg}; "
            f"Python {platform.python_version()}")


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def pm(v, digits=2):
    v = np.asarray(v, float)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def label(name):
    return {"ce": "ce (student alone)", "kd-slkd-weights": "kd, SLKD's weights"}.get(name, name)


def recipe_text(name, args):
    if name in EXTRA:
        sl = f"the teacher's architecture ({args.teacher})" if args.sl_teacher == "teacher" else args.sl_teacher
        return EXTRA[name] + (f"; two SL-teachers, {sl}, at the student's lr" if name == "slkd" else "")
    terms, changed = recipe(name, args)
    s = " + ".join(repr(t) for t in terms)
    return s + (" (schedule fitted to the budget)" if changed else "")


def report(args, names, results, tinfo, costs, wall, load):
    n_seeds = len(args.seed_list)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"\n## Feature distillation on Fashion-MNIST — {datetime.date.today()}\n",
             f"`{cmd}` ({wall / 60:.0f} min in all; load average {load[0]:.1f} at start, {load[1]:.1f} at end).\n",
             f"Machine: {machine_line()}.\n",
             f"Budget: teacher {args.teacher} trained {'earlier (cached)' if tinfo['cached'] else 'in this run'} "
             f"for {plural(tinfo['epochs'], 'epoch')} on {tinfo['n_train']} labelled images ({tinfo['train_time'] / 60:.0f} min; "
             f"crops and flips), test accuracy {100 * tinfo['test_acc']:.2f}%. Student {args.student} on "
             f"{args.student_data} labelled images drawn with the seed, {plural(args.epochs, 'epoch')}, batch {BATCH}, SGD lr "
             f"{args.lr:g} (momentum 0.9, weight decay 5e-4, cosine){', crops and flips' if args.augment else ', no augmentation'}"
             f"{'; lr factors ' + args.lr_scale if args.lr_scale else ''}; warm-ups {plural(args.warmup, 'epoch')}; seeds "
             f"{args.seeds}; {args.test_data} test images.\n",
             f"Test accuracy in %, mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}. Best epoch: selected on "
             "the test set, as RepDistiller and mdistiller report it (optimistic). Δ last vs KD: paired difference "
             "to KD's last-epoch accuracy (same seed, subset and initial student), in points. Time: wall time "
             "per run (training, test evaluation each epoch, teacher-logit caching where allowed) and training "
             "time per epoch.\n",
             "| method | last epoch | best epoch | Δ last vs KD | epochs | time / run | train s / epoch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    per = {n: [res[n] for _, res in results] for n in names}
    kd_last = np.array([r["last"] for r in per["kd"]]) if "kd" in per and all(r["status"] == "ok" for r in per["kd"]) \
        else None
    notes, worse = [], []
    for n in names:
        rs = per[n]
        ok = [r for r in rs if r["status"] == "ok"]
        if len(ok) < len(rs):
            bad = next(r for r in rs if r["status"] != "ok")
            lines.append(f"| {label(n)} | {bad['status']}: {bad['reason'].splitlines()[0][:200]} | | | | "
                         f"{np.mean([r['time'] for r in rs]):.0f} s | |")
            continue
        last = np.array([r["last"] for r in rs]) * 100
        best = np.array([r["best"] for r in rs]) * 100
        delta = ""
        if kd_last is not None and n != "kd":
            d = last - kd_last * 100
            delta = pm(d)
            if d.mean() <= 0:
                worse.append(f"{label(n)} ({d.mean():+.2f})")
        lines.append(f"| {label(n)} | {pm(last)} | {pm(best)} | {delta} | {rs[0]['epochs']} | "
                     f"{np.mean([r['time'] for r in rs]):.0f} s | {np.mean([r['epoch_time'] for r in rs]):.1f} |")
    lines.append("")
    if kd_last is not None:
        lines.append("Do not beat KD (mean last-epoch accuracy not above KD's; Δ in points): "
                     f"{', '.join(worse) if worse else 'none'}.\n")
    lines.append("Recipes (kdcore.losses.METHODS, as run): " +
                 "; ".join(f"**{n}**: {recipe_text(n, args)}" for n in names) + ".\n")
    if costs:
        kd, kdn = costs.get("kd", {}), costs.get("kd-nocache", {})
        base = costs.get("-", {})
        clock = ("per CPU-second (`--clock cpu`: each epoch timed by the process's CPU time, so the time other "
                 "jobs took is not counted)" if args.clock == "cpu" else "by the wall clock")
        lines += [f"Per-step cost: a fresh process per method, 3 epochs of {args.cost_steps} steps of {BATCH} images "
                  f"({args.student} student), timed {clock}; img/s of the fastest epoch after the first (the slowest phase for "
                  f"a method with an initialisation phase), peak RSS of the whole process (process baseline: "
                  f"data, teacher, no training: {base.get('maxrss_mb', float('nan')):.0f} MB). Ratios to KD with "
                  "cached teacher logits (distill's default without augmentation) and to KD running the teacher "
                  "at every step (as every feature method must).\n",
                  "| method | img/s | ÷ KD (cached) | ÷ KD (teacher each step) | peak RSS MB | ÷ KD (cached) "
                  "| ÷ KD (teacher each step) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for n in ["kd", "kd-nocache"] + [n for n in names if n != "kd"]:
            r = costs.get(n)
            if r is None:
                continue
            lab = "kd, teacher each step (cache=False)" if n == "kd-nocache" else label(n)
            if r.get("status") != "ok":
                lines.append(f"| {lab} | {r.get('status')}: {r.get('reason', '').splitlines()[0][:200]} | | | "
                             f"{r.get('maxrss_mb', float('nan')):.0f} | | |")
                continue

            def ratio(a, b, k):
                return f"{a[k] / b[k]:.2f}" if b.get("status") == "ok" and b.get(k) else ""
            lines.append(f"| {lab} | {r['img_s']:.0f} | {ratio(r, kd, 'img_s')} | {ratio(r, kdn, 'img_s')} | "
                         f"{r['maxrss_mb']:.0f} | {ratio(r, kd, 'maxrss_mb')} | {ratio(r, kdn, 'maxrss_mb')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def extrapolate(args, names, results, tinfo, cost_time):
    """The default run (DEFAULT: seeds, epochs, images; these methods) at the speeds this run
    measured: (teacher, students, cost table) in seconds."""
    S, E, N = len(DEFAULT["seeds"].split(",")), DEFAULT["epochs"], DEFAULT["student_data"]
    TE, TN, TT = DEFAULT["teacher_epochs"], DEFAULT["teacher_data"], DEFAULT["test_data"]
    students = 0.0
    for n in names:
        rs = [res[n] for _, res in results]
        if rs[0]["status"] != "ok":
            students += S * np.mean([r["time"] for r in rs])
            continue
        r = {k: np.mean([x[k] for x in rs]) for k in ("time", "train_time", "eval_time", "epochs")}
        fixed = max(0.0, r["time"] - r["train_time"] - r["eval_time"])
        scale_e = E / args.epochs
        students += S * ((r["train_time"] * N / args.student_data + r["eval_time"] * TT / args.test_data) * scale_e
                         + fixed * N / args.student_data)
    teacher = tinfo["epoch_time"] * TN / tinfo["n_train"] * TE + tinfo["eval_time"] * TT / args.test_data
    return teacher, students, cost_time


def main():
    args = parse_args()
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu needs --threads 1: with more threads CPU time adds up the threads' time")
    if args._cost is not None:
        return cost_child(args)
    if args.threads:
        kdcore.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    log(f"feature_bench: methods {', '.join(args.method_list)}; seeds {args.seeds}; {args.epochs} epochs on "
        f"{args.student_data} images; {kdcore.get_num_threads()} threads; load average {load0:.1f}")
    train, test = load_data(args)
    teacher, tinfo = get_teacher(args, train, test)
    results, done = [], load_runs(args)
    for si, seed in enumerate(args.seed_list):
        data = student_subset(train, args.student_data, seed)
        res, t_seed = {}, time.perf_counter()
        for k, name in enumerate(args.method_list):
            key = run_key(name, seed, args)
            if key in done:
                r = res[name] = dict(done[key], recorded=True)
                log(f"seed {seed} [{k + 1}/{len(args.method_list)}] {label(name):<20} recorded in {os.path.relpath(runs_path(args))}")
                continue
            r = res[name] = run_method(name, seed, data, test, teacher, args)
            if r["status"] != "failed":
                record_run(args, key, name, seed, r)
            if r["status"] == "ok":
                what = (f"last {r['last']:.4f} best {r['best']:.4f} (epoch {r['best_epoch']}) {r['time']:.0f} s, "
                        f"{r['epoch_time']:.1f} s/epoch")
            else:
                what = f"{r['status']}: {r['reason'].splitlines()[0][:160]}"
            log(f"seed {seed} [{k + 1}/{len(args.method_list)}] {label(name):<20} {what}")
        results.append((seed, res))
        left = len(args.seed_list) - si - 1
        if left:
            log(f"seed {seed} done in {time.perf_counter() - t_seed:.0f} s; ~{left * (time.perf_counter() - t_seed) / 60:.0f}"
                f" min of students left, then the cost table")
    costs, cost_time = {}, 0.0
    if not args.no_cost:
        log("per-step cost: one process per method")
        t = time.perf_counter()
        costs = cost_table(args, args.method_list)
        cost_time = time.perf_counter() - t
    text = report(args, args.method_list, results, tinfo, costs, time.perf_counter() - T0, (load0, os.getloadavg()[0]))
    print(text)
    te, st, ct = extrapolate(args, args.method_list, results, tinfo, cost_time)
    log(f"extrapolated to the default budget (seeds {DEFAULT['seeds']} x these {len(args.method_list)} methods x "
        f"{DEFAULT['epochs']} epochs on {DEFAULT['student_data']} images, teacher {DEFAULT['teacher_epochs']} epochs on "
        f"{DEFAULT['teacher_data']}) at this run's speeds and {kdcore.get_num_threads()} threads: teacher "
        f"{te / 60:.0f} min (once), students {st / 60:.0f} min, cost table ~{ct / 60:.0f} min; "
        f"{(te + st + ct) / 60:.0f} min in all")
    with open(args.out, "a") as f:
        f.write(text)
    log(f"appended to {args.out}")


if __name__ == "__main__":
    main()
