#!/usr/bin/env python3
"""kdcore vs PyTorch (CPU) speed: training steps and inference of the zoo models on Fashion-MNIST.

    python benchmarks/bench_train.py                 # full run (~15 min), writes benchmarks/RESULTS.md
    python benchmarks/bench_train.py --quick         # a few cases, 2 threads only (~2-3 min)
    python benchmarks/bench_train.py --cases cnn,resnet8 --threads 2 --out /tmp/r.md

How it measures
- kdcore and PyTorch never share a process. For every (case, thread count) the script starts
  one kdcore worker and one PyTorch worker (this file in --worker mode) and then asks them,
  alternately, for R timed runs of about T seconds each (kd, torch, kd, torch, ...): both see
  the same background load. A run reports seconds per step; the table gives the median
  over the R runs, as images/s.
- Same architecture (PyTorch twins of kdcore.models with the same state-dict keys; checked
  once per model by loading kdcore's weights into the twin with strict=True and comparing
  eval outputs, in two separate processes), same batch size, same data (the normalised
  float32 Fashion-MNIST arrays kdcore uses, via Dataset.batch), same optimizer (SGD,
  momentum 0.9, weight decay 5e-4, softmax cross-entropy).
- Training step = gather a shuffled batch + forward + loss + backward + SGD update.
  kdcore: kdcore.fit(..., max_steps=k) (the C training loop; k is sized so that a call
  lasts about a tenth of a run, which makes fit's per-call set-up, ~0.7 ms, negligible as it
  is over a real epoch). PyTorch: the usual eager loop over batches indexed from one tensor
  of the normalised training set.
  Inference = one forward of a fixed batch in eval mode (kdcore: model(x, grad=False), its
  no-gradient forward, which runs large batches in cache-sized chunks; PyTorch: model(x)
  under torch.inference_mode()).
- Distillation (Hinton KD, T=4, CE 0.1 + KD 0.9, SGD momentum 0.9, weight decay 5e-4) on the
  first SUBSET training images (steps, not a full epoch: the resnet8x4 teacher is slow):
  "distill" = kdcore.distill with cached teacher logits (no augmentation; the one-time
  caching pass is reported separately, it is not in the img/s) vs PyTorch's usual loop with
  the teacher forward under no_grad every step; "distill-aug" = both with random crop
  (padding 2) + horizontal flip, so kdcore runs the teacher every step too. "slkd" = one
  SLKD step (teacher forward, 2 SL-teachers and the student trained; kdcore.slkd with
  cache=False) vs the same step written in PyTorch; "dml" = one deep-mutual-learning step
  of 2 peers (kdcore.mutual; T=1, CE 1 + KL 1). Models in the case name: teacher>student,
  teacher>student for SLKD (SL-teachers have the teacher's architecture), peer+peer.
- Threads: kdcore.set_num_threads(t) / torch.set_num_threads(t), OMP_NUM_THREADS=t.
- GFLOP/s counts conv and linear layers only: 2*MACs per image forward, x3 for a training
  step (composite steps: x3 per trained net, x1 per teacher forward). "% peak" = kdcore's
  GFLOP/s over the measured FMA loop peak of the instruction set kdcore's kernels ran (AVX-512
  or AVX2) at the same thread count. "2t/1t" = images/s with 2 threads over images/s with 1
  (training cases; both thread counts must be run). Peak RSS is ru_maxrss of each worker
  process (model, data and framework included).
- Machine peaks come from benchmarks/bench_kernels.c (compiled here): FMA loops (AVX2, and
  AVX-512 where the CPU has it), a large OpenBLAS sgemm, and per-kernel timings of kdcore's
  layers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODELS = ["mlp1200", "mlp256", "cnn", "resnet8", "resnet8x4", "wrn_16_2"]
CONV_MODELS = ["cnn", "resnet8", "resnet8x4", "wrn_16_2"]
# Composite training cases: kind -> model specs ("teacher>student", "peer+peer").
DISTILL_PAIRS = ["mlp1200>mlp256", "resnet8x4>resnet8"]
SLKD_CASE = "resnet8>cnn"           # teacher and 2 SL-teachers resnet8, student cnn
DML_CASE = "resnet8+resnet8"
SUBSET = 6400                       # training images used by the composite cases (50 steps of 128)
TRAIN_KINDS = ("train", "distill", "distill-aug", "slkd", "dml")


def composite_cases():
    cases = []
    for pair in DISTILL_PAIRS:
        cases += [("distill", pair, 128), ("distill-aug", pair, 128)]
    return cases + [("slkd", SLKD_CASE, 128), ("dml", DML_CASE, 128)]


def case_models(model):
    """The zoo models a case name uses ("resnet8x4>resnet8" -> [resnet8x4, resnet8])."""
    return model.replace(">", "+").split("+")


def all_cases():
    cases = []
    for b in (32, 128, 512):
        for m in ("mlp1200", "mlp256"):
            cases.append(("train", m, b))
    for m in CONV_MODELS:
        cases.append(("train", m, 128))
    for m in MODELS:
        for b in (128, 1000):
            cases.append(("infer", m, b))
    return cases + composite_cases()


def quick_cases():
    return [("train", "mlp256", 128), ("train", "mlp1200", 128), ("train", "cnn", 128), ("train", "resnet8", 128),
            ("train", "resnet8x4", 128), ("train", "wrn_16_2", 128), ("infer", "cnn", 128),
            ("infer", "resnet8", 1000), ("infer", "resnet8x4", 128), ("infer", "wrn_16_2", 128),
            ("distill", "mlp1200>mlp256", 128), ("distill-aug", "resnet8x4>resnet8", 128)]


# ------------------------------------------------------------------------------------------
# models


def build_kd(name, seed=0):
    import kdcore
    if name == "mlp1200":
        return kdcore.models.mlp([784, 1200, 1200, 10], seed=seed)
    if name == "mlp256":
        return kdcore.models.mlp([784, 256, 10], seed=seed)
    if name == "cnn":
        return kdcore.models.cnn(width=32, seed=seed)
    return getattr(kdcore.models, name)(num_classes=10, in_channels=1, input_size=28, seed=seed)


def build_torch(name):
    """PyTorch twins of kdcore.models (same modules, order and state-dict keys)."""
    import torch.nn as nn
    import torch.nn.functional as F

    if name in ("mlp1200", "mlp256"):
        sizes = [784, 1200, 1200, 10] if name == "mlp1200" else [784, 256, 10]
        layers = [nn.Flatten()]
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    if name == "cnn":
        w = 32
        return nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))

    class BasicBlock(nn.Module):          # RepDistiller's CIFAR ResNet block
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self, depth, widths):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            cin = widths[0]
            for i, (w, s) in enumerate(zip(widths[1:], (1, 2, 2))):
                blocks = []
                for j in range(n):
                    blocks.append(BasicBlock(cin, w, s if j == 0 else 1))
                    cin = w
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(widths[3], 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    class WideBlock(nn.Module):           # RepDistiller's WRN block (pre-activation)
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.equal = cin == cout
            self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

        def forward(self, x):
            a = F.relu(self.bn1(x))
            y = self.conv2(F.relu(self.bn2(self.conv1(a))))
            return (x if self.equal else self.convShortcut(a)) + y

    class NetworkBlock(nn.Module):
        def __init__(self, n, cin, cout, stride):
            super().__init__()
            self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                         for i in range(n)])

        def forward(self, x):
            return self.layer(x)

    class WideResNet(nn.Module):
        def __init__(self, depth, k):
            super().__init__()
            n = (depth - 4) // 6
            ch = [16, 16 * k, 32 * k, 64 * k]
            self.conv1 = nn.Conv2d(1, ch[0], 3, 1, 1, bias=False)
            self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
            self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
            self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
            self.bn1 = nn.BatchNorm2d(ch[3])
            self.fc = nn.Linear(ch[3], 10)

        def forward(self, x):
            x = self.block3(self.block2(self.block1(self.conv1(x))))
            x = F.relu(self.bn1(x))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    if name == "resnet8":
        return ResNet(8, [16, 16, 32, 64])
    if name == "resnet8x4":
        return ResNet(8, [32, 64, 128, 256])
    if name == "wrn_16_2":
        return WideResNet(16, 2)
    raise ValueError(name)


def torch_flops_per_image(model, shape):
    """2*MACs of conv and linear layers for one image (forward)."""
    import torch
    import torch.nn as nn
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += 2 * out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros((1,) + shape))
    for h in hs:
        h.remove()
    return total[0]


def input_shape(name):
    return (784,) if name.startswith("mlp") else (1, 28, 28)


def torch_augment(x, gen):
    """Random crop with zero padding 2 + horizontal flip, per image (kdcore's augment=True),
    vectorised: one gather per batch."""
    import torch
    import torch.nn.functional as F
    n, c, h, w = x.shape
    p = 2
    xp = F.pad(x, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = ox[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = oy[:, None] + torch.arange(h)[None, :]
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(c)[None, :, None, None]
    return xp[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def kd_loss_torch(zs, zt, T=4.0):
    import torch.nn.functional as F
    return F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="batchmean") * T * T


# ------------------------------------------------------------------------------------------
# worker


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(args):
    fw, kind, name, batch, threads = args.worker, args.kind, args.model, args.batch, args.threads
    import numpy as np
    if args.kdcore_path:
        sys.path.insert(0, args.kdcore_path)
    import kdcore                                   # data only, in the torch worker
    train = kdcore.datasets.fashion_mnist("train")
    shape = input_shape(name)
    rng = np.random.default_rng(0)
    info = {"framework": fw, "python": platform.python_version(), "numpy": np.__version__}
    if fw == "kdcore":
        info["isa"] = getattr(kdcore._kdcore, "isa_config", lambda: "? (a kdcore without KDCORE_ISA)")()
    else:
        import torch
        info["isa"] = torch.backends.cpu.get_cpu_capability()
    if kind in ("distill", "distill-aug", "slkd", "dml"):
        call, steps_per_epoch, extra = composite_worker(fw, kind, name, batch, threads, train, info)
        info.update(extra)
    elif fw == "kdcore":
        kdcore.set_num_threads(threads)
        model = build_kd(name)
        opt = kdcore.optim.SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)
        info["version"] = kdcore.__version__
        info["linear"] = kdcore._kdcore.blas_config().split("linear layers: ")[-1]
        steps_per_epoch = len(train) // batch
        if kind == "train":
            def call(k):
                kdcore.fit(model, train, epochs=1, batch_size=batch, optimizer=opt, max_steps=k, progress=False)
        else:
            x = train.batch(rng.integers(0, len(train), batch)).reshape((batch,) + shape)
            model.eval()

            def call(k):
                for _ in range(k):
                    model(x, grad=False)
    else:
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_torch(name)
        info["version"] = torch.__version__
        info["flops_per_image"] = torch_flops_per_image(model, shape)
        steps_per_epoch = len(train) // batch
        if kind == "train":
            X = torch.from_numpy(train.batch(np.arange(len(train))).reshape((len(train),) + shape))
            Y = torch.from_numpy(np.asarray(train.y, dtype=np.int64))
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            model.train()
            state = {"perm": torch.randperm(len(train)), "i": 0}

            def call(k):
                for _ in range(k):
                    if (state["i"] + 1) * batch > len(train):
                        state["perm"], state["i"] = torch.randperm(len(train)), 0
                    idx = state["perm"][state["i"] * batch:(state["i"] + 1) * batch]
                    state["i"] += 1
                    loss = F.cross_entropy(model(X[idx]), Y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        else:
            x = torch.from_numpy(train.batch(rng.integers(0, len(train), batch)).reshape((batch,) + shape))
            model.eval()

            def call(k):
                with torch.inference_mode():
                    for _ in range(k):
                        model(x)
    # warm-up, and a calls-per-timing size of about a tenth of a run
    call(1)
    t = time.perf_counter()
    call(1)
    est = max(time.perf_counter() - t, 1e-5)
    k = int(max(1, min(steps_per_epoch if kind != "infer" else 10 ** 6, 0.1 * args.run_seconds / est)))
    call(k)
    info.update(k=k, ready=True)
    send(info)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            dur = float(cmd[1])
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            steps, t0 = 0, clock()
            while True:
                call(k)
                steps += k
                el = clock() - t0
                if el >= dur:
                    break
            send({"sec_per_step": el / steps, "steps": steps})
        elif cmd[0] == "quit":
            send({"rss_mb": rss_mb()})
            return


def composite_worker(fw, kind, name, batch, threads, train, info):
    """Set-up of a distill / distill-aug / slkd / dml case: returns call(k) running k steps,
    the steps per pass over the subset, and extra info (FLOPs per image of the models)."""
    import numpy as np
    import kdcore
    models = case_models(name)
    sub = train.subset(np.arange(SUBSET))
    steps_per_epoch = SUBSET // batch
    extra = {}
    if fw == "kdcore":
        kdcore.set_num_threads(threads)
        extra["version"] = kdcore.__version__
        nets = [build_kd(m, seed=i) for i, m in enumerate(models)]
        opt = kdcore.optim.SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)
        common = dict(epochs=1, batch_size=batch, optimizer=opt, progress=False)
        if kind in ("distill", "distill-aug"):
            teacher, student = nets
            teacher.eval()
            if kind == "distill":
                t0 = time.perf_counter()
                logits = kdcore.predict(teacher, sub, batch_size=512)
                extra["cache_s"] = time.perf_counter() - t0

                def call(k):
                    kdcore.distill(student, logits, sub, max_steps=k, **common)
            else:
                def call(k):
                    kdcore.distill(student, teacher, sub, augment=True, cache=False, max_steps=k, **common)
        elif kind == "slkd":
            teacher, student = nets
            teacher.eval()
            sls = [build_kd(models[0], seed=10), build_kd(models[0], seed=11)]

            def call(k):
                kdcore.slkd(student, teacher, sub, sl_teachers=sls, cache=False, max_steps=k, **common)
        else:
            def call(k):
                kdcore.mutual(nets, sub, max_steps=k, **common)
        return call, steps_per_epoch, extra

    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nets = [build_torch(m) for m in models]
    extra["version"] = torch.__version__
    extra["flops_list"] = [torch_flops_per_image(m, input_shape(n)) for m, n in zip(nets, models)]
    X = torch.from_numpy(sub.batch(np.arange(SUBSET)).reshape((SUBSET,) + (1, 28, 28)))
    Y = torch.from_numpy(np.asarray(sub.y, dtype=np.int64))
    gen = torch.Generator().manual_seed(0)
    state = {"perm": torch.randperm(SUBSET), "i": 0}

    def next_batch(aug):
        if (state["i"] + 1) * batch > SUBSET:
            state["perm"], state["i"] = torch.randperm(SUBSET), 0
        idx = state["perm"][state["i"] * batch:(state["i"] + 1) * batch]
        state["i"] += 1
        x = X[idx]
        if aug:
            x = torch_augment(x, gen)
        return x, Y[idx]

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    if kind in ("distill", "distill-aug"):
        teacher, student = nets
        teacher.eval()
        student.train()
        opt = sgd(student)
        aug = kind == "distill-aug"

        def call(k):
            for _ in range(k):
                x, y = next_batch(aug)
                with torch.no_grad():
                    zt = teacher(x)
                zs = student(x)
                loss = 0.1 * F.cross_entropy(zs, y) + 0.9 * kd_loss_torch(zs, zt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    elif kind == "slkd":
        teacher, student = nets
        sls = [build_torch(models[0]), build_torch(models[0])]
        teacher.eval()
        for m in sls + [student]:
            m.train()
        opts = [sgd(student)] + [sgd(m) for m in sls]
        a, lam, eta, rho = 0.1, 1.0, 3.0, 0.5

        def call(k):
            for _ in range(k):
                x, y = next_batch(False)
                with torch.no_grad():
                    zt = teacher(x)
                zj = [m(x) for m in sls]
                zsl = (rho * zj[0] + (1 - rho) * zj[1]).detach()
                zs = student(x)
                ce = F.cross_entropy(zs, y)
                loss = (lam + eta) * a * ce + lam * (1 - a) * kd_loss_torch(zs, zt) + eta * (1 - a) * kd_loss_torch(zs, zsl)
                opts[0].zero_grad(set_to_none=True)
                loss.backward()
                opts[0].step()
                for j, m in enumerate(sls):
                    lj = a * F.cross_entropy(zj[j], y) + (1 - a) * kd_loss_torch(zj[j], zt)
                    opts[1 + j].zero_grad(set_to_none=True)
                    lj.backward()
                    opts[1 + j].step()
    else:
        for m in nets:
            m.train()
        opts = [sgd(m) for m in nets]

        def call(k):
            for _ in range(k):
                x, y = next_batch(False)
                z = [m(x) for m in nets]
                losses = [F.cross_entropy(z[i], y) + kd_loss_torch(z[i], z[1 - i].detach(), T=1.0) for i in range(2)]
                for o in opts:
                    o.zero_grad(set_to_none=True)
                sum(losses).backward()
                for o in opts:
                    o.step()
    return call, steps_per_epoch, extra


def case_flops(kind, flops_list):
    """Conv + linear FLOPs per image of one step of a case (see the module docstring)."""
    if kind == "train":
        return 3 * flops_list[0]
    if kind == "infer":
        return flops_list[0]
    if kind == "distill":                 # cached teacher logits: the student only
        return 3 * flops_list[1]
    if kind == "distill-aug":
        return flops_list[0] + 3 * flops_list[1]
    if kind == "slkd":                    # teacher forward + 2 SL-teachers + student trained
        return flops_list[0] + 2 * 3 * flops_list[0] + 3 * flops_list[1]
    return 3 * sum(flops_list)            # dml


def verify_worker(args):
    """Architecture check, in two processes: kdcore saves weights and eval outputs; the PyTorch
    twin loads the weights with strict=True and must give the same outputs."""
    import numpy as np
    if args.worker == "kd-save":
        import kdcore
        model = build_kd(args.model)
        train = kdcore.datasets.fashion_mnist("train")
        x = train.batch(np.arange(16)).reshape((16,) + input_shape(args.model))
        model.eval()
        np.savez(args.file, x=x, y=model(x), **{"w:" + k: v for k, v in model.state_dict().items()})
        return
    import torch
    torch.set_num_threads(1)
    z = np.load(args.file)
    model = build_torch(args.model)
    sd = {k[2:]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("w:")}
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        y = model(torch.from_numpy(z["x"])).numpy()
    err = float(np.max(np.abs(y - z["y"])) / (np.max(np.abs(z["y"])) + 1e-12))
    send({"model": args.model, "max_rel_err": err, "ok": err < 1e-3})


# ------------------------------------------------------------------------------------------
# driver


class Worker:
    def __init__(self, fw, kind, model, batch, threads, args):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if fw == "kdcore" and args.coretype:
            # OpenBLAS reads it when it loads: only kdcore's linear layers can use OpenBLAS
            env.pop("OPENBLAS_CORETYPE", None)
            if args.coretype != "auto":
                env["OPENBLAS_CORETYPE"] = args.coretype
        if fw == "torch" and args.torch_isa != "auto":
            # ATen's vector kernels, oneDNN's convolutions and MKL's sgemm read these when torch loads
            env["ATEN_CPU_CAPABILITY"] = args.torch_isa
            env["ONEDNN_MAX_CPU_ISA"] = {"avx2": "AVX2", "avx512": "AVX512_CORE"}[args.torch_isa]
            env["MKL_ENABLE_INSTRUCTIONS"] = {"avx2": "AVX2", "avx512": "AVX512"}[args.torch_isa]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--kind", kind, "--model", model,
               "--batch", str(batch), "--threads", str(threads), "--run-seconds", str(args.run_seconds),
               "--clock", args.clock]
        if fw == "kdcore" and args.kdcore_path:
            cmd += ["--kdcore-path", args.kdcore_path]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def recv(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died (exit {self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.recv()

    def close(self):
        r = self.ask("quit")
        self.p.wait()
        return r


def run_case(kind, model, batch, threads, args):
    # Start and warm up one worker at a time (each sizes its timed calls from a warm-up
    # step, which must not compete with the other's start-up), then alternate.
    kd = Worker("kdcore", kind, model, batch, threads, args)
    kinfo = kd.recv()
    th = Worker("torch", kind, model, batch, threads, args)
    tinfo = th.recv()
    times = {"kdcore": [], "torch": []}
    for r in range(args.reps):
        order = [("kdcore", kd), ("torch", th)] if r % 2 == 0 else [("torch", th), ("kdcore", kd)]
        for fw, w in order:
            # Let the other worker's threads go idle first: OpenMP runtimes keep spinning for
            # a while after a parallel region, which would slow the next run (measured: up
            # to 2x on short runs of small models).
            time.sleep(args.settle)
            times[fw].append(w.ask(f"run {args.run_seconds}")["sec_per_step"])
    flops = case_flops(kind, tinfo.get("flops_list") or [tinfo["flops_per_image"]])
    res = {"kind": kind, "model": model, "batch": batch, "threads": threads, "flops_per_step_image": flops,
           "flops_per_image": tinfo.get("flops_per_image", flops), "versions": {"kdcore": kinfo["version"], "torch": tinfo["version"]}}
    if "cache_s" in kinfo:
        res["kdcore_cache_s"] = kinfo["cache_s"]
    if "linear" in kinfo:
        res["kdcore_linear"] = kinfo["linear"]
    if "isa" in kinfo:
        res["kdcore_isa"] = kinfo["isa"]
    if "isa" in tinfo:
        res["torch_isa"] = tinfo["isa"]
    for fw, w in (("kdcore", kd), ("torch", th)):
        sec = statistics.median(times[fw])
        res[fw] = {"sec_per_step": sec, "runs": times[fw], "img_s": batch / sec, "rss_mb": w.close()["rss_mb"]}
        res[fw]["gflops"] = flops * batch / sec / 1e9
    res["ratio"] = res["kdcore"]["img_s"] / res["torch"]["img_s"]
    return res


def verify_models(models):
    out = []
    for m in models:
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "w.npz")
            base = [sys.executable, os.path.abspath(__file__), "--model", m, "--file", f, "--verify"]
            subprocess.run(base + ["--worker", "kd-save"], check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
            r = subprocess.run(base + ["--worker", "torch-check"], check=True, cwd=ROOT, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def machine_peaks(quick):
    """Compile and run benchmarks/bench_kernels.c: returns {key: value} and the raw text."""
    cc = os.environ.get("CC", "cc")
    pc = "/usr/lib/x86_64-linux-gnu/openblas-openmp/pkgconfig"
    env = dict(os.environ, PKG_CONFIG_PATH=pc)
    cflags = subprocess.check_output(["pkg-config", "--cflags", "openblas"], env=env, text=True).split()
    libdir = subprocess.check_output(["pkg-config", "--variable=libdir", "openblas"], env=env, text=True).strip()
    exe = os.path.join(ROOT, "build", "bench_kernels")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    srcs = [os.path.join(ROOT, "kdcore", "src", f) for f in sorted(os.listdir(os.path.join(ROOT, "kdcore", "src")))
            if f.endswith(".c")]
    cmd = ([cc, "-std=c11", "-D_GNU_SOURCE", "-O3", "-march=x86-64-v3", "-fopenmp", "-ffp-contract=fast",
            "-I" + os.path.join(ROOT, "kdcore", "include"), "-I" + os.path.join(ROOT, "kdcore", "src")] + cflags
           + [os.path.join(HERE, "bench_kernels.c")] + srcs
           + ["-o", exe, "-L" + libdir, "-Wl,-rpath," + libdir, "-lopenblas", "-lz", "-lm"])
    subprocess.run(cmd, check=True)
    vals, text = {}, []
    for t, what in ((2, "all"), (1, "kernels")):
        r = subprocess.run([exe, what] + (["--quick"] if quick else []), capture_output=True, text=True, check=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(t)))
        text.append(f"# OMP_NUM_THREADS={t} bench_kernels {what}\n" + r.stdout)
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                vals[parts[0]] = parts[1]
    return vals, "\n".join(text)


def lscpu():
    try:
        out = subprocess.check_output(["lscpu"], text=True)
    except OSError:
        return {}
    d = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            d[k.strip()] = v.strip()
    return d


def blas_core(args):
    if args.coretype == "auto":
        return "auto-detected (OPENBLAS_CORETYPE unset)"
    if args.coretype:
        return f"OPENBLAS_CORETYPE={args.coretype}"
    env = os.environ.get("OPENBLAS_CORETYPE")
    return f"OPENBLAS_CORETYPE={env} (from the environment)" if env else "auto-detected"


def peak_of(results, peaks, threads):
    """(GFLOP/s, label) of the FMA loop of the instruction set kdcore's kernels ran in these
    results (AVX-512 or AVX2), at the thread count; (0.0, label) without a measurement."""
    isa = next((r["kdcore_isa"] for r in results if "kdcore_isa" in r), "")
    wide = isa.split(" ")[0] == "avx512"
    label = "AVX-512" if wide else "AVX2"
    key = f"fma{512 if wide else 256}_t{threads}_gflops"
    return (float(peaks.get(key, 0) or 0) if peaks else 0.0), label


def fmt_table(results, threads, before=None, peaks=None):
    rows = [r for r in results if r["threads"] == threads]
    by_key = {(r["kind"], r["model"], r["batch"], r["threads"]): r for r in results}
    peak, _ = peak_of(results, peaks, threads)
    scaling = threads == 2 and any(r["threads"] == 1 for r in results)
    extra = " before |" if before else ""
    lines = [f"### {threads} thread{'s' if threads > 1 else ''}", "",
             "| case | batch | kdcore img/s | PyTorch img/s | kdcore/PyTorch |" + extra + " kdcore GFLOP/s | "
             "PyTorch GFLOP/s |" + (" kdcore % peak |" if peak else "")
             + (" kdcore 2t/1t | PyTorch 2t/1t |" if scaling else "") + " kdcore RSS MB | PyTorch RSS MB | RSS ratio |",
             "|---|---:|---:|---:|---:|" + ("---:|" if before else "") + "---:|---:|" + ("---:|" if peak else "")
             + ("---:|---:|" if scaling else "") + "---:|---:|---:|"]
    for r in rows:
        k, t = r["kdcore"], r["torch"]
        b = ""
        if before:
            key = (r["kind"], r["model"], r["batch"], r["threads"])
            b = f" {before[key]:.2f} |" if key in before else " |"
        pk = f" {100 * k['gflops'] / peak:.0f}% |" if peak else ""
        sc = ""
        if scaling:
            one = by_key.get((r["kind"], r["model"], r["batch"], 1))
            if one and r["kind"] in TRAIN_KINDS:
                sc = (f" {k['img_s'] / one['kdcore']['img_s']:.2f} | {t['img_s'] / one['torch']['img_s']:.2f} |")
            else:
                sc = " | |"
        lines.append(f"| {r['kind']} {r['model']} | {r['batch']} | {k['img_s']:.0f} | {t['img_s']:.0f} | "
                     f"**{r['ratio']:.2f}** |{b} {k['gflops']:.1f} | {t['gflops']:.1f} |{pk}{sc} {k['rss_mb']:.0f} | "
                     f"{t['rss_mb']:.0f} | {k['rss_mb'] / t['rss_mb']:.2f} |")
    return "\n".join(lines)


def write_report(path, results, peaks, peaks_text, verify, args, elapsed, loads):
    cpu = lscpu()
    v = results[0]["versions"] if results else {}
    try:
        commit = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.check_output(["git", "-C", ROOT, "status", "--porcelain", "kdcore"], text=True).strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    cmd = "python benchmarks/bench_train.py " + shlex.join(sys.argv[1:])
    L = ["# kdcore vs PyTorch: training and inference speed", "",
         f"Command: `{cmd.strip()}` (run from the repository root; {elapsed / 60:.1f} min).", "",
         "## Machine and versions", "",
         f"- CPU: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPUs "
         f"({cpu.get('Core(s) per socket', '?')} cores x {cpu.get('Thread(s) per core', '?')} threads), "
         f"L2 {cpu.get('L2 cache', '?')}, L3 {cpu.get('L3 cache', '?')}; AVX-512: "
         f"{'yes' if 'avx512f' in cpu.get('Flags', '') else 'no'}",
         f"- kdcore {v.get('kdcore', '?')} (git {commit}), PyTorch {v.get('torch', '?')}, Python "
         f"{platform.python_version()}, OpenBLAS 0.3.21 (OpenMP build) core in kdcore workers: "
         f"{blas_core(args)}; kdcore's kernels: "
         f"{next((r['kdcore_isa'] for r in results if 'kdcore_isa' in r), '?')}; kdcore's linear layers ran on "
         f"{next((r['kdcore_linear'] for r in results if 'kdcore_linear' in r), '?')} (the convolutions always "
         "use kdcore's own kernels); PyTorch's CPU capability: "
         f"{next((r['torch_isa'] for r in results if 'torch_isa' in r), '?')}"
         + (f" (--torch-isa {args.torch_isa}: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS set in its workers)"
            if args.torch_isa != "auto" else ""),
         "- The machine may be shared: kdcore and PyTorch are measured alternately (same conditions); compare "
         "ratios rather than absolute numbers. Load average (1 min) at start / end of this run: "
         f"{loads[0]:.1f} / {loads[1]:.1f} on {os.cpu_count()} CPUs" + (" -- **other jobs were running: the "
         "multi-thread rows (and the peaks) are distorted for both frameworks**" if max(loads) > 1.5 * (os.cpu_count() or 1) / 2 else "")
         + ".", "",
         ]
    if args.clock == "cpu":
        L[-1:-1] = ["- **Clock: CPU time** (`--clock cpu`): each run is timed by its worker's process CPU time, so "
                    "images/s are per CPU-second of the one thread; the time other jobs took is not counted.", ""]
    if peaks:
        L += ["## Machine peaks (benchmarks/bench_kernels.c)", "", "| measurement | GFLOP/s |", "|---|---:|"]
    for key, label in (("fma512_t1_gflops", "AVX-512 FMA loop, 1 thread"), ("fma512_t2_gflops", "AVX-512 FMA loop, 2 threads"),
                       ("fma256_t1_gflops", "AVX2 FMA loop, 1 thread"), ("fma256_t2_gflops", "AVX2 FMA loop, 2 threads"),
                       ("sgemm_2048_gflops", "OpenBLAS sgemm 2048^3, 2 threads"),
                       ("sgemm_conv64x100352x576_gflops", "OpenBLAS sgemm 64 x 100352 x 576 (a conv as one GEMM), 2 threads")):
        if key in peaks:
            L.append(f"| {label} | {peaks[key]} |")
    if peaks:
        L.append("")
    before = None
    if args.compare_json:
        with open(args.compare_json) as f:
            before = {(r["kind"], r["model"], r["batch"], r["threads"]): r["ratio"] for r in json.load(f)["results"]}
    L += ["## Results", "",
          "images/s: median of the runs; kdcore/PyTorch = ratio of images/s (> 1: kdcore faster). "
          "GFLOP/s: conv + linear, 2*MACs forward, x3 per trained net and x1 per teacher forward in a step "
          "(distill with cached logits: the student only). % peak: kdcore GFLOP/s over the "
          f"{peak_of(results, peaks, 1)[1]} FMA loop (the instruction set kdcore's kernels ran) at "
          "the same thread count. 2t/1t: thread scaling of training cases (img/s with 2 threads over 1). "
          "RSS ratio: kdcore peak RSS over PyTorch's (whole worker process: interpreter, data set, framework)."
          + (f" before: kdcore/PyTorch of the run in `{args.compare_json}`"
             + (f" ({args.compare_label})" if args.compare_label else "") + "." if before else ""), ""]
    for t in args.thread_list:
        L += [fmt_table(results, t, before, peaks), ""]
    cached = [r for r in results if "kdcore_cache_s" in r]
    if cached:
        L += ["Distillation with cached teacher logits: the one-time caching pass (kdcore.predict of the teacher "
              f"over the {SUBSET} subset images, not in the img/s above) took "
              + ", ".join(f"{r['kdcore_cache_s']:.2f} s ({r['model']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''})"
                          for r in cached) + ".", ""]
    L += ["## Architecture check", "",
          "kdcore weights loaded into the PyTorch twin (strict=True); eval outputs on 16 images:", ""]
    for r in verify:
        L.append(f"- {r['model']}: max relative difference {r['max_rel_err']:.1e} ({'ok' if r['ok'] else 'MISMATCH'})")
    if peaks_text:
        L += ["", "## Raw kernel timings", "", "```", peaks_text.strip(), "```"]
    L.append("")
    # Other scripts append their sections to this file (distillation, feature and data-free
    # tables, earlier speed comparisons): keep everything from the first "## " section that
    # this report does not write itself.
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        own = {"## Machine and versions", "## Machine peaks (benchmarks/bench_kernels.c)", "## Results",
               "## Architecture check", "## Raw kernel timings"}
        starts = [i for i in range(len(old)) if old.startswith("## ", i) and (i == 0 or old[i - 1] == "\n")]
        for i in starts:
            if old[i:].split("\n", 1)[0].rstrip() not in own:
                kept = "\n" + old[i:].rstrip() + "\n"
                break
    with open(path, "w") as f:
        f.write("\n".join(L) + kept)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases, 2 threads, shorter runs")
    ap.add_argument("--threads", default=None, help="comma list (default 2,1; quick: 2)")
    ap.add_argument("--cases", default=None, help="comma list of model names or kinds (train, infer, distill, "
                    "distill-aug, slkd, dml) to keep")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per framework and case (default 3; quick 2)")
    ap.add_argument("--run-seconds", type=float, default=None, help="length of one timed run (default 0.8; quick 0.4)")
    ap.add_argument("--settle", type=float, default=0.2, help="seconds of idle time before each timed run")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--kdcore-path", default=None, help="import kdcore from this directory (e.g. a baseline build)")
    ap.add_argument("--no-peaks", action="store_true", help="skip bench_kernels")
    ap.add_argument("--compare-json", default=None, help="add a 'before' ratio column from an earlier --json run")
    ap.add_argument("--compare-label", default=None, help="what the --compare-json run was (for the report)")
    ap.add_argument("--isa", default=None, choices=["auto", "avx512", "avx2", "portable"],
                    help="KDCORE_ISA for kdcore (workers and bench_kernels): the instruction set of its kernels; "
                    "with --coretype Haswell and avx2, what an AVX2-only CPU runs")
    ap.add_argument("--coretype", default=None,
                    help="OPENBLAS_CORETYPE for the kdcore workers (e.g. SkylakeX; 'auto' = unset, OpenBLAS detects)")
    ap.add_argument("--torch-isa", default=None, choices=["auto", "avx512", "avx2"],
                    help="cap PyTorch's kernels (ATen, oneDNN, MKL) at this instruction set in its workers; default: "
                    "avx2 with --isa avx2 (both frameworks as on an AVX2-only CPU), else auto")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="time a run by the wall clock (default) or by the worker's CPU time (1 thread only: a "
                    "single-threaded process's CPU time does not count the time other jobs take, so a shared machine "
                    "still gives usable ratios)")
    # worker mode
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="train", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_seconds is None:
        args.run_seconds = 0.4 if args.quick else 0.8
    if args.worker:
        if args.verify:
            verify_worker(args)
        else:
            args.threads = int(args.threads)
            worker(args)
        return
    args.reps = args.reps or (2 if args.quick else 3)
    if args.torch_isa is None:
        args.torch_isa = "avx2" if args.isa == "avx2" else "auto"
    if args.isa:
        os.environ["KDCORE_ISA"] = args.isa    # every child: kdcore workers and bench_kernels
    # What kdcore's kernels will be (and a refused KDCORE_ISA stops here, not in a worker).
    env = dict(os.environ)
    if args.kdcore_path:
        env["PYTHONPATH"] = os.pathsep.join([args.kdcore_path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = "import kdcore; print(getattr(kdcore._kdcore, 'isa_config', lambda: '? (a kdcore without KDCORE_ISA)')())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        sys.exit(f"kdcore does not import with this KDCORE_ISA: {r.stderr.strip().splitlines()[-1]}")
    print(f"kdcore kernels: {r.stdout.strip()}", flush=True)
    args.thread_list = [int(t) for t in (args.threads or ("2" if args.quick else "2,1")).split(",")]
    if args.clock == "cpu" and args.thread_list != [1]:
        sys.exit("--clock cpu needs --threads 1: with more threads CPU time adds up the threads' time "
                 "(and not the time they wait for each other)")
    cases = quick_cases() if args.quick else all_cases()
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c[1] in keep or c[0] in keep]   # a model name or a kind (distill, slkd, ...)
    t0 = time.time()
    load0 = os.getloadavg()[0]
    peaks, peaks_text = ({}, "") if args.no_peaks else machine_peaks(args.quick)
    if peaks:
        print(peaks_text)
    verify = verify_models(sorted({m for c in cases for m in case_models(c[1])}))
    for r in verify:
        print(f"architecture check {r['model']}: max rel err {r['max_rel_err']:.1e} {'ok' if r['ok'] else 'MISMATCH'}")
    results = []
    for threads in args.thread_list:
        for kind, model, batch in cases:
            r = run_case(kind, model, batch, threads, args)
            results.append(r)
            print(f"{threads}t {kind:5s} {model:9s} b{batch:<4d} kdcore {r['kdcore']['img_s']:9.0f} img/s "
                  f"({r['kdcore']['gflops']:6.1f} GF/s, {r['kdcore']['rss_mb']:5.0f} MB)  torch "
                  f"{r['torch']['img_s']:9.0f} img/s ({r['torch']['gflops']:6.1f} GF/s, {r['torch']['rss_mb']:5.0f} MB)  "
                  f"ratio {r['ratio']:.2f}", flush=True)
    write_report(args.out, results, peaks, peaks_text, verify, args, time.time() - t0, (load0, os.getloadavg()[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "peaks": peaks, "load": [load0, os.getloadavg()[0]]}, f, indent=1)
    print(f"wrote {args.out} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
