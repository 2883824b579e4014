"""Data-free distillation on Fashion-MNIST, over several seeds: the student's test accuracy
when it never sees a training image, next to the same student trained alone and distilled
with real data, with what each costs.

    python benchmarks/datafree_bench.py [--seeds 0,1,2] [--budget B] [--methods ...]
                                        [--out benchmarks/RESULTS.md] [--cache build/datafree_bench]
                                        [--quick] [--threads N]

This is a benchmark, not a test: it measures and appends what it measured to --out.

The pair. Teacher: kdcore.models.cnn(width=32) (four conv3x3-BN-ReLU layers, 32-32-64-64
channels; BN is what DeepInversion reads), trained once on all 60,000 labelled training images
(SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine, batch 128, --teacher-epochs) and cached
in --cache. Student: kdcore.models.cnn(width=16), the same initial weights per seed for every
method. Every row's accuracy is on all 10,000 test images after the last epoch.

The rows (methods):
- alone: the student trained alone on all 60,000 labelled images (the same recipe as the
  teacher, --real-epochs epochs);
- kd-real: KD (T 4, CE 0.1, KD 0.9) on all 60,000 images, --real-epochs epochs;
- dafl: kdcore.datafree.dafl with the authors' MNIST losses and learning rates (one-hot 1,
  entropy 5, activation 0.1; Adam 0.2 generator, 2e-3 student); generator dafl_generator of
  width --gen-width (the authors' 128 costs ~16x the compute of width 32 in its last
  convolution; said in the table); batch 256;
- dfad: kdcore.datafree.dfad, the authors' MNIST defaults (batch 512 reduced to 256 here, n_s 5,
  SGD 0.01 student, Adam 1e-3 generator) and the same generator width;
- zskt: kdcore.datafree.zskt, the authors' defaults (n_g 1, n_s 10, batch 128, Adam, cosine,
  attention on the two stage taps, beta 250), same generator width;
- deepinversion: kdcore.datafree.deepinversion synthesises --di-images images (labels i % 10;
  --di-iterations Adam steps per batch of 256, lr 0.05 (the authors' CIFAR value),
  BN weight 10, TV 2.5e-5 (l2 form), jitter 2), then KD (T 4, KD weight 1, no CE: the labels are
  the targets the images were optimised for, not ground truth) on those images with batch
  128 until the student has taken as many steps as DAFL's.

Budget. The generator-based methods all get the same number of STUDENT steps: --budget
(default 600: half of DAFL's default 10 epochs of 120 steps, to keep the run under an hour
per seed-set on one core); DFAD's iteration has n_s = 5 student
steps and ZSKT's n_s = 10, so they run budget/5 and budget/10 iterations (their generators take
fewer steps: that is each method's own ratio). Time is CPU time of this process at 1 thread
(time.process_time; --threads 1 is the default), so a loaded machine does not change it;
"synthesis" is DeepInversion's image optimisation (the other methods synthesise as they
train: their whole run is the cost).

Resuming: every finished (method, seed) run is recorded in --cache/runs.jsonl under a key of
everything it depends on; a later invocation with the same options reuses it. --quick: 1
seed, tiny budgets, 2,000 test images (checks the script end to end).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

import kdcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["alone", "kd-real", "dafl", "dfad", "zskt", "deepinversion"]
LABELS = {"alone": "student alone, all real labelled images",
          "kd-real": "KD with all real images",
          "dafl": "DAFL (generator)", "dfad": "DFAD (adversarial generator, L1)",
          "zskt": "ZSKT (adversarial generator, KL + AT)",
          "deepinversion": "DeepInversion images, then KD on them"}
T0 = time.perf_counter()


def log(msg):
    s = int(time.perf_counter() - T0)
    print(f"[{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}] {msg}", flush=True)


def sgd(lr):
    return kdcore.optim.SGD(lr=lr, momentum=0.9, weight_decay=5e-4)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--budget", type=int, default=600, help="student steps of each data-free method")
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--real-epochs", type=int, default=3, help="epochs of the real-data rows")
    ap.add_argument("--gen-width", type=int, default=32, help="the generators' width (DAFL's authors: 128)")
    ap.add_argument("--di-images", type=int, default=512)
    ap.add_argument("--di-iterations", type=int, default=200)
    ap.add_argument("--test-data", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "datafree_bench"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="ignore the runs recorded in --cache")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.teacher_epochs, args.real_epochs = "0", 20, 1, 1
        args.di_images, args.di_iterations, args.test_data = 256, 10, 2000
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    return args


def config(args):
    """Everything a run depends on besides its method and seed."""
    return dict(budget=args.budget, teacher_epochs=args.teacher_epochs, real_epochs=args.real_epochs,
                gen_width=args.gen_width, di_images=args.di_images, di_iterations=args.di_iterations,
                test_data=args.test_data, quick=args.quick, threads=args.threads)


def key(args, method, seed):
    return hashlib.sha256(json.dumps(dict(config(args), method=method, seed=seed), sort_keys=True)
                          .encode()).hexdigest()[:16]


def load_runs(args):
    runs, path = {}, os.path.join(args.cache, "runs.jsonl")
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


def record(args, k, method, seed, result):
    os.makedirs(args.cache, exist_ok=True)
    with open(os.path.join(args.cache, "runs.jsonl"), "a") as f:
        f.write(json.dumps(dict(key=k, method=method, seed=seed, kdcore=kdcore.__version__, result=result)) + "\n")


def get_teacher(args, train, test):
    path = os.path.join(args.cache, f"teacher-cnn32-{args.teacher_epochs}ep{'-quick' if args.quick else ''}.safetensors")
    if os.path.exists(path):
        teacher = kdcore.models.cnn(width=32, seed=0)
        kdcore.load(path, teacher)
        log(f"teacher: loaded {os.path.relpath(path, ROOT)}")
    else:
        teacher = kdcore.models.cnn(width=32, seed=0)
        t = time.process_time()
        kdcore.fit(teacher, train, epochs=args.teacher_epochs, batch_size=128, optimizer=sgd(0.05),
                   schedule=kdcore.optim.Cosine(), seed=0, progress=False)
        os.makedirs(args.cache, exist_ok=True)
        kdcore.save(path, teacher)
        log(f"teacher: trained in {time.process_time() - t:.0f} s CPU, saved")
    acc = kdcore.evaluate(teacher, test, batch_size=500)["accuracy"]
    log(f"teacher: test accuracy {acc:.4f}")
    return teacher, acc


def run(method, seed, args, train, test, teacher):
    """One (method, seed): the student's test accuracy and the CPU seconds it took."""
    student = kdcore.models.cnn(width=16, seed=1000 + seed)
    real = dict(epochs=args.real_epochs, batch_size=128, optimizer=sgd(0.05), schedule=kdcore.optim.Cosine(),
                seed=seed, progress=False)
    gen = kdcore.models.dafl_generator(100, img_size=28, channels=1, width=args.gen_width, seed=seed)
    out = {}
    t = time.process_time()
    if method == "alone":
        kdcore.fit(student, train, **real)
    elif method == "kd-real":
        kdcore.distill(student, teacher, train, method="kd", **real)
    elif method == "dafl":
        per = 120
        h = kdcore.datafree.dafl(student, teacher, epochs=max(1, args.budget // per), steps_per_epoch=min(per, args.budget),
                                 batch_size=256, generator=gen, seed=seed, progress=False)
        out["final_kd"] = h.last["kd"]
    elif method == "dfad":
        gen = kdcore.models.dafl_generator(100, img_size=28, channels=1, width=args.gen_width, seed=seed, bn_eps=1e-5)
        iters = max(1, args.budget // 5)
        h = kdcore.datafree.dfad(student, teacher, epochs=max(1, iters // 50), iters_per_epoch=min(50, iters),
                                 batch_size=256, generator=gen, seed=seed, progress=False)
        out["final_l1"] = h.last["l1"]
    elif method == "zskt":
        gen = kdcore.models.dafl_generator(100, img_size=28, channels=1, width=args.gen_width, seed=seed, bn_eps=1e-5,
                                           tanh=False)
        iters = max(1, args.budget // 10)
        h = kdcore.datafree.zskt(student, teacher, epochs=max(1, iters // 20), iters_per_epoch=min(20, iters),
                                 generator=gen, seed=seed, progress=False)
        out["final_kd"] = h.last["kd"]
    elif method == "deepinversion":
        images, labels, h = kdcore.datafree.deepinversion(teacher, args.di_images, iterations=args.di_iterations,
                                                          batch_size=256, seed=seed, chunk=args.di_iterations)
        out["synthesis_s"] = time.process_time() - t
        out["teacher_acc_on_images"] = float(np.mean(kdcore.predict(teacher, images).argmax(1) == labels))
        data = kdcore.datasets.from_arrays(images, labels, normalize=None, num_classes=10)
        steps_per_epoch = -(-len(data) // 128)
        kdcore.distill(student, teacher, data, method="kd", ce_weight=0.0, kd_weight=1.0,
                       epochs=max(1, args.budget // steps_per_epoch), batch_size=128, optimizer=sgd(0.05),
                       schedule=kdcore.optim.Cosine(), seed=seed, progress=False)
    out["cpu_s"] = time.process_time() - t
    out["acc"] = kdcore.evaluate(student, test, batch_size=500)["accuracy"]
    return out


def pm(a, d=2):
    a = np.asarray(a, float)
    return f"{a.mean():.{d}f} ± {a.std():.{d}f}" if len(a) > 1 else f"{a.mean():.{d}f}"


def report(args, results, t_acc, wall, train):
    cmd = "python benchmarks/datafree_bench.py " + " ".join(sys.argv[1:])
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    lines = [f"\n## Data-free distillation on Fashion-MNIST — {datetime.date.today()}\n",
             f"`{cmd.strip()}` ({model}, {args.threads} thread(s), kdcore {kdcore.__version__}, "
             f"{len(args.seed_list)} seed(s), {wall / 60:.0f} min wall in all). Teacher cnn width 32 "
             f"({args.teacher_epochs} epochs on the {len(train):,} training images, test accuracy {100 * t_acc:.2f}%); "
             f"student cnn width 16. Every data-free row's student takes {args.budget} steps and never sees a "
             f"training image; generators of width {args.gen_width}. Test accuracy in % on "
             f"{args.test_data:,} test images after the last step, mean ± std over seeds; CPU time per run "
             f"({args.threads} thread(s), process time). The real-data rows train {args.real_epochs} epochs on "
             f"the {len(train):,} training images.\n",
             "| method | test accuracy | Δ vs student alone | CPU time / run | of which synthesis |",
             "|---|---:|---:|---:|---:|"]
    base = {s: r["acc"] for (m, s), r in results.items() if m == "alone"}
    for m in args.methods:
        rs = [(s, results[(m, s)]) for s in args.seed_list if (m, s) in results]
        if not rs:
            continue
        acc = [100 * r["acc"] for _, r in rs]
        d = [100 * (r["acc"] - base[s]) for s, r in rs if s in base] if m != "alone" else []
        syn = [r["synthesis_s"] for _, r in rs if "synthesis_s" in r]
        lines.append(f"| {LABELS[m]} | {pm(acc)} | {pm(d) if d else ''} | {np.mean([r['cpu_s'] for _, r in rs]):.0f} s "
                     f"| {f'{np.mean(syn):.0f} s' if syn else ''} |")
    di = [r.get("teacher_acc_on_images") for (m, _), r in results.items() if m == "deepinversion"]
    if di:
        lines.append(f"\nThe teacher classifies {pm([100 * v for v in di], 1)}% of the DeepInversion images as "
                     "the class they were optimised for.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write(text)


def main(argv=None):
    args = parse_args(argv)
    kdcore.set_num_threads(args.threads)
    train = kdcore.datasets.fashion_mnist("train")
    test = kdcore.datasets.fashion_mnist("test")
    if args.quick:
        train = train.subset(np.arange(5000))
    if args.test_data < len(test):
        test = test.subset(np.arange(args.test_data))
    teacher, t_acc = get_teacher(args, train, test)
    done = load_runs(args)
    results = {}
    for seed in args.seed_list:
        for m in args.methods:
            k = key(args, m, seed)
            if k in done:
                results[(m, seed)] = done[k]
                log(f"seed {seed} {m:<14} recorded")
                continue
            r = run(m, seed, args, train, test, teacher)
            record(args, k, m, seed, r)
            results[(m, seed)] = r
            log(f"seed {seed} {m:<14} acc {r['acc']:.4f}  {r['cpu_s']:.0f} s CPU")
    report(args, results, t_acc, time.perf_counter() - T0, train)


if __name__ == "__main__":
    main()
