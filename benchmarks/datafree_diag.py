"""Why the generator-based data-free methods stay at chance: instrumented runs on the pair of
benchmarks/datafree_bench.py (Fashion-MNIST teacher cnn width 32, student cnn width 16).

    python benchmarks/datafree_diag.py run NAME [--impl kdcore|torch] [--method dafl|dfad]
        [--steps 600] [--log-every 50] [--gen-width 32] [--lr-g 0.2] [--lr-s 2e-3]
        [--batch 256] [--ie 5] [--a 0.1] [--out-map bn|range] [--seed 0] [--teacher PATH] [--dir DIR]
    python benchmarks/datafree_diag.py table [--dir DIR]
    python benchmarks/datafree_diag.py samez [--steps 4] [--lr-g 0.2] [--seed 0]

``run`` trains one configuration and writes DIR/NAME.json (default DIR build/datafree_diag):
one row per --log-every STUDENT steps, with
- the teacher's predicted-class histogram on 512 fresh generated images (eval-mode
  generator, kdcore.datafree.samples, as after training) and on one batch of --batch images
  from the generator in training mode (what the student is trained on), and the entropy of
  each histogram in bits (log2 10 = 3.32 when the classes are even, 0 when one class);
- the generated images' min/mean/max/std (training-mode batch) next to the real normalised
  images' (printed once), and the fraction of the generator's Tanh outputs with |x| > 0.99;
- the generator's losses over the interval (DAFL: onehot, activation, entropy, kd; DFAD: l1);
- the student's accuracy on the first 2,000 test images, in eval mode (``acc``) and, as a
  diagnosis only, with its BN layers on the test batches' own statistics (``acc_bnbatch``,
  batches of 500: what the student knows when its running statistics, gathered on generated
  images, are not used).
Both implementations start from the same kdcore weights (seeded as the bench seeds them);
the PyTorch student and teacher are kdcore.bridge twins, the PyTorch generator this file's own
nn.Sequential of the same layout, loaded with the kdcore generator's weights. Histograms and
accuracies are always measured with kdcore's teacher (same weights), so both
implementations are measured by the same code.

--impl kdcore: kdcore.datafree.dafl / dfad in epochs of --log-every student steps (DFAD: an
epoch of log_every / n_s iterations), logged by the epoch callback. --impl torch: this file's
own PyTorch DAFL step (the authors' loss as the docstring of kdcore.datafree.dafl states it:
one backward of onehot*1 + entropy*ie + activation*a + KD(T 1), then both Adam steps).
--out-map range (torch only): the generator's last BN is replaced by a fixed affine map of
the Tanh's [-1, 1] onto the real normalised data's [min, max], so the images have the real
data's range instead of per-batch zero mean and unit variance.

DFAD (--method dfad, kdcore only): the bench's settings (batch 256, n_s 5, student SGD lr
0.01 momentum 0.9 wd 1e-4, generator Adam 1e-3, generator with bn_eps 1e-5); --steps counts
student steps. CPU time is this process's (time.process_time), excluding the logging's.

``table`` prints a markdown table of every DIR/*.json: configuration, steps, CPU time, final
and best test accuracy (2,000 images), the teacher-class histogram entropy at the end.
``samez`` runs --steps DAFL steps three times on the same noise batches (drawn with numpy from
--seed + 5) and the same initial weights: kdcore's step engine configured as
kdcore.datafree.dafl configures it (fed the noise as a data set, one step per call), this
file's PyTorch step in float32 and the same in float64. Per step it prints the four loss
terms and the teacher's class histogram on 256 images of a fixed noise batch from the
training-mode generator. Where float32 and float64 PyTorch part, rounding alone decides the
trajectory; kdcore parting from PyTorch at the same step is then no evidence of a bug.
Run with OMP_NUM_THREADS=1; the script sets kdcore's threads and torch's to 1.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np

import kdcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = 100


def parse_args(argv=None):
    """The command line; the learning rates default per method."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["run", "table", "samez"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--impl", choices=["kdcore", "torch"], default="kdcore")
    ap.add_argument("--method", choices=["dafl", "dfad"], default="dafl")
    ap.add_argument("--steps", type=int, default=600, help="student steps")
    ap.add_argument("--log-every", type=int, default=50, help="student steps between rows")
    ap.add_argument("--gen-width", type=int, default=32)
    ap.add_argument("--lr-g", type=float, default=None, help="generator lr (DAFL 0.2, DFAD 1e-3)")
    ap.add_argument("--lr-s", type=float, default=None, help="student lr (DAFL Adam 2e-3, DFAD SGD 0.01)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ie", type=float, default=5.0, help="DAFL's information-entropy weight")
    ap.add_argument("--a", type=float, default=0.1, help="DAFL's activation weight")
    ap.add_argument("--out-map", choices=["bn", "range"], default="bn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default=os.path.join(ROOT, "build", "datafree_bench", "teacher-cnn32-5ep.safetensors"))
    ap.add_argument("--dir", default=os.path.join(ROOT, "build", "datafree_diag"))
    a = ap.parse_args(argv)
    if a.cmd == "run" and not a.name:
        ap.error("run needs a NAME")
    if a.out_map == "range" and a.impl != "torch":
        ap.error("--out-map range is implemented for --impl torch only")
    if a.method == "dfad" and a.impl != "kdcore":
        ap.error("--method dfad is implemented for --impl kdcore only")
    if a.lr_g is None:
        a.lr_g = 0.2 if a.method == "dafl" else 1e-3
    if a.lr_s is None:
        a.lr_s = 2e-3 if a.method == "dafl" else 0.01
    return a


def entropy_bits(hist):
    """Entropy in bits of a histogram of counts."""
    p = np.asarray(hist, float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


class Probe:
    """The measurements of one row, with kdcore's teacher and test subset for both
    implementations."""

    def __init__(self, teacher, test):
        self.teacher, self.test = teacher, test
        xt = test.batch(np.arange(len(test)))
        self.real = dict(min=float(xt.min()), mean=float(xt.mean()), max=float(xt.max()), std=float(xt.std()))

    def hist(self, images):
        pred = kdcore.predict(self.teacher, images).argmax(1)
        return np.bincount(pred, minlength=10).tolist()

    def row(self, step, cpu, eval_imgs, train_imgs, sat, losses, acc):
        he, ht = self.hist(eval_imgs), self.hist(train_imgs)
        return dict(step=step, cpu_s=cpu, acc=acc, hist_eval=he, hist_train=ht, H_eval=entropy_bits(he),
                    H_train=entropy_bits(ht), img=dict(min=float(train_imgs.min()), mean=float(train_imgs.mean()),
                                                       max=float(train_imgs.max()), std=float(train_imgs.std())),
                    tanh_sat=sat, losses=losses)


def kdcore_generator_images(gen, batch, seed):
    """(eval-mode samples, one training-mode batch, Tanh saturation of that batch); the
    generator's state (BN running statistics) is restored after the training-mode forward."""
    ev = kdcore.datafree.samples(gen, 512, seed=seed)
    sd = gen.state_dict()
    gen.train()
    z = np.random.default_rng(seed + 1).standard_normal((batch, LATENT)).astype(np.float32)
    tr = gen.forward(z)
    tanh = [n for n in range(len(gen)) if isinstance(gen[n], kdcore.nn.Tanh)]
    sat = float(np.mean(np.abs(gen.tap(str(tanh[0]))) > 0.99)) if tanh else None
    gen.load_state_dict(sd)
    return ev, tr, sat


def run_kdcore(a, teacher, student, gen, probe, test):
    """kdcore.datafree.dafl or dfad in epochs of --log-every student steps; the rows."""
    rows, cpu = [], 0.0
    per = a.log_every

    def record(step, losses):
        ev, tr, sat = kdcore_generator_images(gen, a.batch, 10_000 + step)
        acc = kdcore.evaluate(student, test, batch_size=500)["accuracy"]
        sd = student.state_dict()
        student.train()
        acc_bn = float(np.mean(np.concatenate([student.forward(test.batch(np.arange(i, i + 500)), grad=False).argmax(1)
                                               for i in range(0, len(test), 500)]) == test.y))
        student.load_state_dict(sd)
        r = probe.row(step, cpu, ev, tr, sat, losses, acc)
        r["acc_bnbatch"] = acc_bn
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("step", "cpu_s", "acc", "acc_bnbatch", "H_eval", "H_train", "hist_train", "tanh_sat",
                                            "img", "losses")}), flush=True)

    record(0, {})
    t = [time.process_time()]

    def cb(epoch, m):
        nonlocal cpu
        cpu += time.process_time() - t[0]
        keys = ("onehot", "activation", "entropy", "kd") if a.method == "dafl" else ("l1", "generator_loss")
        record((epoch + 1) * per, {k: float(m[k]) for k in keys if k in m})
        t[0] = time.process_time()
        return False

    epochs = a.steps // per
    if a.method == "dafl":
        kdcore.datafree.dafl(student, teacher, epochs=epochs, steps_per_epoch=per, batch_size=a.batch, generator=gen,
                             lr_g=a.lr_g, lr_s=a.lr_s, ie=a.ie, a=a.a, seed=a.seed, progress=False, callback=cb)
    else:
        if per % 5:
            raise ValueError("--log-every must be a multiple of DFAD's n_s (5)")
        kdcore.datafree.dfad(student, teacher, epochs=epochs, iters_per_epoch=per // 5, batch_size=a.batch,
                             generator=gen, seed=a.seed, progress=False, callback=cb,
                             student_optimizer=kdcore.optim.SGD(lr=a.lr_s, momentum=0.9, weight_decay=1e-4),
                             generator_optimizer=kdcore.optim.Adam(lr=a.lr_g))
    return rows


def torch_generator(width, out_map, lo, hi):
    """DAFL's generator layout, as kdcore.models.dafl_generator(width, img_size 28) builds it."""
    import torch.nn as tnn
    w = width
    tail = [tnn.Tanh(), tnn.BatchNorm2d(1, affine=False)]
    m = tnn.Sequential(tnn.Linear(LATENT, w * 49), tnn.Unflatten(1, (w, 7, 7)), tnn.BatchNorm2d(w),
                       tnn.Upsample(scale_factor=2), tnn.Conv2d(w, w, 3, padding=1), tnn.BatchNorm2d(w, eps=0.8),
                       tnn.LeakyReLU(0.2), tnn.Upsample(scale_factor=2), tnn.Conv2d(w, w // 2, 3, padding=1),
                       tnn.BatchNorm2d(w // 2, eps=0.8), tnn.LeakyReLU(0.2), tnn.Conv2d(w // 2, 1, 3, padding=1), *tail)
    if out_map == "range":
        class Affine(tnn.Module):
            def forward(self, x):
                return lo + (x + 1) * (hi - lo) / 2
        m[13] = Affine()
    return m


def run_torch(a, teacher, student, gen, probe, test):
    """This file's PyTorch DAFL from the kdcore models' weights; the rows."""
    import torch
    from kdcore import bridge
    torch.manual_seed(a.seed)
    tt, ts = bridge.to_torch(teacher).eval(), bridge.to_torch(student).train()
    for p in tt.parameters():
        p.requires_grad_(False)
    tg = torch_generator(a.gen_width, a.out_map, probe.real["min"], probe.real["max"])
    sd = {k: torch.from_numpy(np.array(v)) for k, v in gen.state_dict().items()}
    tg.load_state_dict(sd, strict=a.out_map == "bn")
    tg.train()
    feat = {}
    tt[15].register_forward_hook(lambda m, i, o: feat.__setitem__("pooled", o))
    sat_hook = {}
    tg[12].register_forward_hook(lambda m, i, o: sat_hook.__setitem__("x", o.detach()))
    opt_g = torch.optim.Adam(tg.parameters(), lr=a.lr_g)
    opt_s = torch.optim.Adam(ts.parameters(), lr=a.lr_s)
    xtest = torch.from_numpy(test.batch(np.arange(len(test))))
    ytest = test.y
    rows, cpu = [], 0.0
    acc_sum = {}

    def record(step):
        with torch.no_grad():
            g = torch.Generator().manual_seed(10_000 + step)
            tg.eval()
            ev = tg(torch.randn(512, LATENT, generator=g)).numpy()
            tg.train()
            state = {k: v.clone() for k, v in tg.state_dict().items()}
            tr = tg(torch.randn(a.batch, LATENT, generator=g)).numpy()
            sat = float((sat_hook["x"].abs() > 0.99).float().mean())
            tg.load_state_dict(state)
            ts.eval()
            acc = float((ts(xtest).argmax(1).numpy() == ytest).mean())
            ts.train()
            state = {k: v.clone() for k, v in ts.state_dict().items()}
            acc_bn = float(np.mean(np.concatenate([ts(xtest[i:i + 500]).argmax(1).numpy()
                                                   for i in range(0, len(xtest), 500)]) == ytest))
            ts.load_state_dict(state)
        losses = {k: v / max(1, acc_sum.get("n", 1)) for k, v in acc_sum.items() if k != "n"}
        acc_sum.clear()
        r = probe.row(step, cpu, np.ascontiguousarray(ev, np.float32), np.ascontiguousarray(tr, np.float32), sat,
                      losses, acc)
        r["acc_bnbatch"] = acc_bn
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("step", "cpu_s", "acc", "acc_bnbatch", "H_eval", "H_train", "hist_train", "tanh_sat",
                                            "img", "losses")}), flush=True)

    record(0)
    gz = torch.Generator().manual_seed(a.seed)
    t = time.process_time()
    for step in range(1, a.steps + 1):
        z = torch.randn(a.batch, LATENT, generator=gz)
        loss, onehot, act, ent, kd = torch_dafl_loss(tg, tt, ts, feat, z, a)
        opt_g.zero_grad()
        opt_s.zero_grad()
        loss.backward()
        opt_g.step()
        opt_s.step()
        for k, v in (("onehot", onehot), ("activation", act), ("entropy", ent), ("kd", kd)):
            acc_sum[k] = acc_sum.get(k, 0.0) + float(v.detach())
        acc_sum["n"] = acc_sum.get("n", 0) + 1
        if step % a.log_every == 0:
            cpu += time.process_time() - t
            record(step)
            t = time.process_time()
    return rows


def run(a):
    """One configuration: models seeded as the bench seeds them, then DIR/NAME.json."""
    kdcore.set_num_threads(1)
    test = kdcore.datasets.fashion_mnist("test").subset(np.arange(2000))
    teacher = load_teacher(a)
    student = kdcore.models.cnn(width=16, seed=1000 + a.seed)
    eps = dict(bn_eps=1e-5) if a.method == "dfad" else {}
    gen = kdcore.models.dafl_generator(LATENT, img_size=28, channels=1, width=a.gen_width, seed=a.seed, **eps)
    probe = Probe(teacher, test)
    t_acc = kdcore.evaluate(teacher, test, batch_size=500)["accuracy"]
    print(f"teacher acc (2,000 test images) {t_acc:.4f}; real normalised images {probe.real}", flush=True)
    if a.impl == "torch":
        import torch
        torch.set_num_threads(1)
        rows = run_torch(a, teacher, student, gen, probe, test)
    else:
        rows = run_kdcore(a, teacher, student, gen, probe, test)
    os.makedirs(a.dir, exist_ok=True)
    cfg = {k: v for k, v in vars(a).items() if k not in ("cmd", "dir", "teacher")}
    with open(os.path.join(a.dir, a.name + ".json"), "w") as f:
        json.dump(dict(config=cfg, teacher_acc=t_acc, real=probe.real, rows=rows), f)


def table(a):
    """The markdown table of every run recorded in --dir."""
    print("| run | impl | method | gen width | lr_g | ie, a | out | steps | CPU s | final acc % | best acc % (step) "
          "| H(teacher classes) end, bits | histogram at the end (training-mode batch) |")
    print("|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|")
    for path in sorted(glob.glob(os.path.join(a.dir, "*.json"))):
        d = json.load(open(path))
        c, rows = d["config"], d["rows"]
        last = rows[-1]
        best = max(rows, key=lambda r: r["acc"])
        print(f"| {c['name']} | {c['impl']} | {c['method']} | {c['gen_width']} | {c['lr_g']:g} | {c.get('ie', 5):g}, {c.get('a', 0.1):g} | {c['out_map']} "
              f"| {last['step']} | {last['cpu_s']:.0f} | {100 * last['acc']:.1f} | {100 * best['acc']:.1f} "
              f"({best['step']}) | {last['H_train']:.2f} (eval BN {last['H_eval']:.2f}) | {last['hist_train']} |")


def load_teacher(a):
    """The bench's cached teacher (kdcore.models.cnn(width=32) weights)."""
    teacher = kdcore.models.cnn(width=32, seed=0)
    if not os.path.exists(a.teacher):
        sys.exit(f"teacher checkpoint {a.teacher} not found: run benchmarks/datafree_bench.py once (it trains and "
                 "caches it), or pass --teacher")
    kdcore.load(a.teacher, teacher)
    return teacher.eval()


def torch_dafl_loss(tg, tt, ts, feat, z, a):
    """This file's DAFL objective on noise z: (total, onehot, activation, entropy, kd)."""
    import torch
    import torch.nn.functional as F
    imgs = tg(z)
    out_t = tt(imgs)
    onehot = F.cross_entropy(out_t, out_t.argmax(1))
    act = -feat["pooled"].abs().mean()
    pbar = F.softmax(out_t, 1).mean(0)
    ent = (pbar * torch.log10(pbar)).sum()
    kd = F.kl_div(F.log_softmax(ts(imgs.detach()), 1), F.softmax(out_t.detach(), 1), reduction="batchmean")
    return onehot + a.ie * ent + a.a * act + kd, onehot, act, ent, kd


def samez(a):
    """kdcore's DAFL step engine, PyTorch float32 and float64 on the same noise (see the
    module docstring)."""
    import torch
    from kdcore import _kdcore, bridge
    kdcore.set_num_threads(1)
    torch.set_num_threads(1)
    teacher = load_teacher(a)
    B, K = a.batch, a.steps
    z = np.random.default_rng(a.seed + 5).standard_normal((K * B, LATENT)).astype(np.float32)
    zfix = np.random.default_rng(99).standard_normal((256, LATENT)).astype(np.float32)

    def hist(x):
        return np.bincount(kdcore.predict(teacher, np.ascontiguousarray(x, np.float32)).argmax(1), minlength=10).tolist()

    def fresh():
        return (kdcore.models.cnn(width=16, seed=1000 + a.seed),
                kdcore.models.dafl_generator(LATENT, img_size=28, channels=1, width=a.gen_width, seed=a.seed))

    student, gen = fresh()
    g0 = gen.state_dict()
    K_, M = _kdcore.TERM_KINDS, _kdcore.MODES
    opt_s, opt_g = kdcore.optim.Adam(lr=a.lr_s).bind(student), kdcore.optim.Adam(lr=a.lr_g).bind(gen)
    nets = [dict(net=gen.net, opt=opt_g, mode=M["train"], lr_scale=a.lr_g / a.lr_s, role="generator"),
            dict(net=student.net, opt=opt_s, mode=M["train"], input=(0, -1), detach_input=True, role="student"),
            dict(net=teacher.net, mode=M["eval"], input=(0, -1), grad_input=True, role="teacher")]
    terms = [dict(kind=K_["onehot"], a=(2, -1), src=[(2, -1)], weight=1.0),
             dict(kind=K_["activation"], a=(2, teacher._tap_index(teacher.feature_taps()["pooled"])), weight=a.a),
             dict(kind=K_["entropy"], a=(2, -1), weight=a.ie),
             dict(kind=K_["kd"], a=(1, -1), src=[(2, -1)], T=1.0, weight=1.0)]
    for k in range(K):
        ds = kdcore.datasets.from_arrays(z[k * B:(k + 1) * B], np.zeros(B, np.int64), num_classes=10, normalize=None)
        st = _kdcore.step_epoch(nets, terms, ds._c, 0, dict(batch_size=B, schedule=(0, a.lr_s, [], 0, 0.0, 0),
                                                            shuffle=False, max_steps=1), logits_net=1)
        gen.train()
        sd = gen.state_dict()
        x = gen.forward(zfix)
        gen.load_state_dict(sd)
        print(f"kdcore  step {k}: terms {[round(v, 4) for v in st['term_value']]} histogram after {hist(x)}", flush=True)
    for dt in (torch.float32, torch.float64):
        student, gen = fresh()
        tt, ts = bridge.to_torch(teacher).eval().to(dt), bridge.to_torch(student).train().to(dt)
        for p in tt.parameters():
            p.requires_grad_(False)
        tg = torch_generator(a.gen_width, "bn", 0.0, 0.0)
        tg.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in g0.items()})
        tg.train().to(dt)
        feat = {}
        tt[15].register_forward_hook(lambda m, i, o: feat.__setitem__("pooled", o))
        og, os_ = torch.optim.Adam(tg.parameters(), lr=a.lr_g), torch.optim.Adam(ts.parameters(), lr=a.lr_s)
        for k in range(K):
            loss, *parts = torch_dafl_loss(tg, tt, ts, feat, torch.from_numpy(z[k * B:(k + 1) * B]).to(dt), a)
            og.zero_grad()
            os_.zero_grad()
            loss.backward()
            og.step()
            os_.step()
            state = {n: v.clone() for n, v in tg.state_dict().items()}
            with torch.no_grad():
                x = tg(torch.from_numpy(zfix).to(dt)).float().numpy()
            tg.load_state_dict(state)
            print(f"torch {str(dt)[-2:]} step {k}: terms {[round(float(v.detach()), 4) for v in parts]} "
                  f"histogram after {hist(x)}", flush=True)


def main(argv=None):
    """Entry point: run, table or samez."""
    a = parse_args(argv)
    if a.cmd == "table":
        table(a)
    elif a.cmd == "samez":
        samez(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
