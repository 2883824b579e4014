"""`make demo` / `python -m kdcore.demo`: train a teacher and a student on Fashion-MNIST and
print their test accuracies (last and best epoch).

    python -m kdcore.demo [--epochs-teacher 4] [--epochs-student 8] [--threads 2] [--quiet]
"""
from __future__ import annotations

import argparse
import sys
import time

import kdcore


def _row(name, model, hist, seconds):
    last, best = hist.last, hist.best
    return (f"{name:<34} {model.num_parameters():>10,}  {last['val_acc'] * 100:6.2f}%  "
            f"{best['val_acc'] * 100:6.2f}% (ep {hist.best_epoch + 1:>2})  {seconds:6.1f}s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs-teacher", type=int, default=4)
    ap.add_argument("--epochs-student", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        kdcore.set_num_threads(args.threads)
    kdcore.show_config()
    train = kdcore.datasets.fashion_mnist("train")
    test = kdcore.datasets.fashion_mnist("test")
    print(f"train: {train}\ntest:  {test}\n")

    rows = []
    teacher = kdcore.models.cnn(num_classes=10, in_channels=1, width=16, seed=args.seed)
    t0 = time.perf_counter()
    ht = kdcore.fit(teacher, train, epochs=args.epochs_teacher, batch_size=128,
                    optimizer=kdcore.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
                    schedule=kdcore.optim.Cosine(), val=test, seed=args.seed, progress=not args.quiet)
    rows.append(_row("teacher  cnn(width=16)", teacher, ht, time.perf_counter() - t0))

    student = kdcore.models.mlp([784, 256, 10], seed=args.seed)
    t0 = time.perf_counter()
    hs = kdcore.fit(student, train, epochs=args.epochs_student, batch_size=128,
                    optimizer=kdcore.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
                    schedule=kdcore.optim.Cosine(), val=test, seed=args.seed, progress=not args.quiet)
    rows.append(_row("student  mlp 784-256-10 (alone)", student, hs, time.perf_counter() - t0))

    print(f"\nFashion-MNIST test accuracy ({kdcore.get_num_threads()} threads)")
    print(f"{'model':<34} {'params':>10}  {'last':>7}  {'best':>13}  {'time':>7}")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
