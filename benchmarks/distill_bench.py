"""Distillation methods on Fashion-MNIST, over several seeds: mean +- std of test accuracy.

    python benchmarks/distill_bench.py [--seeds 0,1,2] [--epochs 20] [--teacher-epochs 20]
                                       [--student-data 6000] [--out benchmarks/RESULTS.md] [--quick]

The pair is `make demo`'s: per seed, a teacher mlp 784-1200-1200-10 (dropout 0.2) trained on
all 60,000 training images, and a student mlp 784-256-10 that sees only --student-data
labelled images (6,000 by default, drawn with the seed) -- the few-sample setting where
distillation pays. Methods on that subset: the student alone; KD (T=4, CE 0.1, KD 0.9); DKD
(alpha 1, beta 8, T=4, CE 1, warm-up a quarter of the epochs); DML (two students, T=1; peer 0
reported); BAN (two born-again generations after the student alone; the last generation, and
the ensemble of the three); TAKD (teacher -> assistant mlp 784-512-10 -> student); SLKD (two
SL-teachers with the teacher's architecture, lambda 1, eta 3, alpha 0.1, rho 0.5, T=4); and
the control the SLKD paper lacks: KD with SLKD's total weights (CE 0.4, KD 3.6). Two more rows
give the student alone and with KD on all 60,000 labels (same teacher), where KD does not help.

Learning rates: SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine schedule, batch 128,
except where a loss's scale makes that step diverge (measured: chance accuracy): DKD
(beta*T^2 = 128 KLs), SLKD's student and its control (CE+KD weighted lambda+eta = 4) run at
lr/4; SLKD's SL-teachers keep lr 0.05. Reported: test accuracy at the last epoch and at the
best epoch (selected on the test set, as RepDistiller/mdistiller report it: an optimistic
number). Appends a markdown table to --out with the command that produced it.
"""
import argparse
import datetime
import platform
import time

import numpy as np

import kdcore


def sgd(lr):
    return kdcore.optim.SGD(lr=lr, momentum=0.9, weight_decay=5e-4)


def run_seed(seed, args, train, test):
    common = dict(epochs=args.epochs, batch_size=128, schedule=kdcore.optim.Cosine(), val=test, progress=False)
    small = train.subset(np.random.default_rng(seed).permutation(len(train))[:args.student_data])
    res = {}

    def record(name, hist, t):
        res[name] = (hist.last["val_acc"], hist.best["val_acc"], time.perf_counter() - t)
        print(f"  seed {seed} {name:<28} last {res[name][0]:.4f} best {res[name][1]:.4f} {res[name][2]:.0f}s", flush=True)

    t = time.perf_counter()
    teacher = kdcore.models.mlp([784, 1200, 1200, 10], dropout=0.2, seed=seed)
    record("teacher (all data)", kdcore.fit(teacher, train, optimizer=sgd(0.05), seed=seed,
                                            **dict(common, epochs=args.teacher_epochs)), t)

    def student(s=0):
        return kdcore.models.mlp([784, 256, 10], seed=1000 + seed * 10 + s)

    def kd(s, t_, data, **kw):
        kw.setdefault("optimizer", sgd(0.05))
        return kdcore.distill(s, t_, data, **dict(dict(common, seed=seed, method="kd"), **kw))

    t = time.perf_counter()
    s0 = student()
    record("student alone", kdcore.fit(s0, small, optimizer=sgd(0.05), seed=seed, **common), t)
    t = time.perf_counter()
    record("KD", kd(student(), teacher, small), t)
    t = time.perf_counter()
    record("DKD", kd(student(), teacher, small, method="dkd", warmup_epochs=max(1, args.epochs // 4),
                     optimizer=sgd(0.05 / 4)), t)
    t = time.perf_counter()
    record("DML (2 peers)", kdcore.mutual([student(1), student(2)], small, optimizer=sgd(0.05), seed=seed,
                                          **common), t)
    # BAN: generations 1 and 2 after the student alone (generation 0).
    t = time.perf_counter()
    gens = [s0]
    for g in (1, 2):
        sg = student(10 + g)
        hb = kd(sg, gens[-1], small, seed=seed + g)
        gens.append(sg)
    record("BAN (gen 2)", hb, t)
    ens = np.mean([kdcore.predict(m, test) for m in gens], axis=0)
    acc = float(np.mean(ens.argmax(1) == test.y))
    res["BAN ensemble (3 gens)"] = (acc, acc, 0.0)
    t = time.perf_counter()
    assistant = kdcore.models.mlp([784, 512, 10], seed=2000 + seed)
    kd(assistant, teacher, small)
    record("TAKD (784-512-10 TA)", kd(student(), assistant, small), t)
    t = time.perf_counter()
    record("SLKD", kdcore.slkd(student(), teacher, small, optimizer=sgd(0.05 / 4), sl_optimizer=sgd(0.05),
                               seed=seed, **common), t)
    t = time.perf_counter()
    record("KD, SLKD's weights", kd(student(), teacher, small, ce_weight=0.4, kd_weight=3.6,
                                    optimizer=sgd(0.05 / 4)), t)
    if args.student_data < len(train):
        t = time.perf_counter()
        record("student alone, all labels", kdcore.fit(student(), train, optimizer=sgd(0.05), seed=seed, **common), t)
        t = time.perf_counter()
        record("KD, all labels", kd(student(), teacher, train), t)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--student-data", type=int, default=6000)
    ap.add_argument("--out", default="benchmarks/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 10k training images (a smoke run)")
    args = ap.parse_args()
    train, test = kdcore.datasets.fashion_mnist("train"), kdcore.datasets.fashion_mnist("test")
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.student_data = "0", 2, 2, 2000
        train = train.subset(np.arange(10000))
    seeds = [int(s) for s in args.seeds.split(",")]
    t_all = time.perf_counter()
    results = [run_seed(s, args, train, test) for s in seeds]
    names = list(results[0])
    cmd = "python benchmarks/distill_bench.py" + (" --quick" if args.quick else
                                                  f" --seeds {args.seeds} --epochs {args.epochs} --teacher-epochs "
                                                  f"{args.teacher_epochs} --student-data {args.student_data}")
    lines = [f"\n## Distillation on Fashion-MNIST — {datetime.date.today()}\n",
             f"`{cmd}` ({platform.machine()}, {kdcore.get_num_threads()} threads, kdcore {kdcore.__version__}, "
             f"{len(seeds)} seeds, {time.perf_counter() - t_all:.0f} s in all). Teacher mlp 784-1200-1200-10 on all "
             f"{len(train)} training images; student mlp 784-256-10 on {args.student_data} labelled images unless "
             "the row says otherwise; test accuracy in %, mean ± std over seeds.\n",
             "| method | last epoch | best epoch | time / run |", "|---|---:|---:|---:|"]
    for n in names:
        last = np.array([r[n][0] for r in results]) * 100
        best = np.array([r[n][1] for r in results]) * 100
        tm = np.mean([r[n][2] for r in results])
        lines.append(f"| {n} | {last.mean():.2f} ± {last.std():.2f} | {best.mean():.2f} ± {best.std():.2f} | "
                     f"{tm:.0f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
