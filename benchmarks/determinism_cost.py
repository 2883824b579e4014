# Cost of deterministic mode: one fit epoch (1024 synthetic 28x28 images, batch 128, SGD),
# the mode off and on alternating for 7 rounds, minimum of each. Prints a Markdown table
# (DEVELOPERS.md, "Determinism"). Usage: python benchmarks/determinism_cost.py
import kdcore, numpy as np, time
rng = np.random.default_rng(0)
x = rng.standard_normal((1024, 1, 28, 28)).astype(np.float32); y = rng.integers(0, 10, 1024)
ds = kdcore.datasets.from_arrays(x, y, num_classes=10)
models = [("mlp([784, 256, 10])", lambda: kdcore.models.mlp([784, 256, 10], seed=0)),
          ("mlp([784, 1200, 1200, 10])", lambda: kdcore.models.mlp([784, 1200, 1200, 10], seed=0)),
          ("cnn()", lambda: kdcore.models.cnn(seed=0)),
          ("resnet8()", lambda: kdcore.models.resnet8(num_classes=10, in_channels=1, input_size=28, seed=0))]
print("| model | threads | default | deterministic | cost |\n|---|---:|---:|---:|---:|")
for name, mk in models:
    for th in (1, 2):
        kdcore.set_num_threads(th)
        best = {False: 1e9, True: 1e9}
        m = mk(); opt = kdcore.optim.SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)
        for r in range(7):
            for det in (False, True):
                kdcore.set_deterministic(det)
                t = time.perf_counter()
                kdcore.fit(m, ds, epochs=1, batch_size=128, optimizer=opt, progress=False)
                best[det] = min(best[det], time.perf_counter() - t)
        kdcore.set_deterministic(False)
        print(f"| `{name}` | {th} | {best[False]*1e3:.0f} ms | {best[True]*1e3:.0f} ms | {100*(best[True]/best[False]-1):+.0f}% |", flush=True)
