"""Fashion-MNIST test accuracy of the zoo's reference models, trained from scratch with kdcore.

    python benchmarks/accuracy.py [--models mlp,cnn,resnet8] [--epochs 15] [--seed 0] [--out FILE]

Prints a table (last and best epoch, seconds) and appends it as markdown to --out
(default benchmarks/ACCURACY.md). Recipes: SGD momentum 0.9, weight decay 5e-4, cosine
schedule, batch 128, lr 0.05 (resnet8: 0.1); the MLP uses dropout 0.2, the convolutional
nets random crops (padding 2) and horizontal flips.
"""
import argparse
import datetime
import platform
import time

import kdcore

RECIPES = {
    # name: (builder, lr, augment)
    "mlp": (lambda s: kdcore.models.mlp([784, 1200, 1200, 10], dropout=0.2, seed=s), 0.05, None),
    "cnn": (lambda s: kdcore.models.cnn(num_classes=10, in_channels=1, seed=s), 0.05,
            {"crop_padding": 2, "hflip": True}),
    # lr 0.1 at batch 128: RepDistiller's 0.05 at batch 64, scaled linearly with the batch.
    "resnet8": (lambda s: kdcore.models.resnet8(num_classes=10, in_channels=1, seed=s), 0.1,
                {"crop_padding": 2, "hflip": True}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,cnn,resnet8")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/ACCURACY.md")
    args = ap.parse_args()
    train, test = kdcore.datasets.fashion_mnist("train"), kdcore.datasets.fashion_mnist("test")
    rows = []
    for name in args.models.split(","):
        build, lr, aug = RECIPES[name]
        model = build(args.seed)
        t0 = time.perf_counter()
        h = kdcore.fit(model, train, epochs=args.epochs, batch_size=128,
                       optimizer=kdcore.optim.SGD(lr=lr, momentum=0.9, weight_decay=5e-4),
                       schedule=kdcore.optim.Cosine(), augment=aug, val=test, seed=args.seed, progress=False)
        dt = time.perf_counter() - t0
        rows.append((name, model.num_parameters(), h.last["val_acc"], h.best["val_acc"], h.best_epoch + 1, dt))
        print(f"{name:10s} params {rows[-1][1]:>9,}  last {h.last['val_acc']:.4f}  best {h.best['val_acc']:.4f} "
              f"(epoch {h.best_epoch + 1})  {dt:.0f}s", flush=True)
    cmd = f"python benchmarks/accuracy.py --models {args.models} --epochs {args.epochs} --seed {args.seed}"
    lines = [f"\n### {datetime.date.today()} — `{cmd}`\n",
             f"{platform.processor() or platform.machine()}, {kdcore.get_num_threads()} threads, kdcore {kdcore.__version__}\n",
             "| model | params | test acc (last) | test acc (best, epoch) | train time |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {p:,} | {la * 100:.2f}% | {ba * 100:.2f}% ({be}) | {dt:.0f} s |" for n, p, la, ba, be, dt in rows]
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
