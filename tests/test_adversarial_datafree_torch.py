"""Adversarial data-free distillation (DFAD, ZSKT) on the step engine vs the same iterations
in PyTorch (float64) on the same weights and noise: the L1 logit loss and its gradients; a
generator step (the reversed discrepancy reaching the generator through the frozen teacher
and the student, which is not updated); one whole DFAD iteration (n_s student steps on fresh
batches, then the generator step) and one whole ZSKT iteration (the generator step, then n_s
student steps with attention transfer, all on one batch of z); the step cycle's errors; the
Python API's reproducibility and its argument errors."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore
from kdcore import datafree as D
from kdcore import functional as F

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)
V, LATENT, N = 4, 6, 8
K, M = _kdcore.TERM_KINDS, _kdcore.MODES


def torch_generator(w, tanh):
    """DFAD's GeneratorA (Tanh, then a BN without affine parameters) or, without tanh, ZSKT's
    generator (ending conv -> affine BN)."""
    tail = [tnn.Tanh(), tnn.BatchNorm2d(1, affine=False)] if tanh else [tnn.BatchNorm2d(1)]
    return tnn.Sequential(tnn.Linear(LATENT, w * 4), tnn.Unflatten(1, (w, 2, 2)), tnn.BatchNorm2d(w),
                          tnn.Upsample(scale_factor=2), tnn.Conv2d(w, w, 3, padding=1), tnn.BatchNorm2d(w),
                          tnn.LeakyReLU(0.2), tnn.Upsample(scale_factor=2), tnn.Conv2d(w, w // 2, 3, padding=1),
                          tnn.BatchNorm2d(w // 2), tnn.LeakyReLU(0.2), tnn.Conv2d(w // 2, 1, 3, padding=1), *tail)


def trio(tanh):
    """kdcore generator, student, teacher and their float64 PyTorch twins (teacher in eval)."""
    gen = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1, bn_eps=1e-5, tanh=tanh)
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    tg = torch_ref.load_into_torch(torch_generator(4, tanh), gen.state_dict()).double().train()
    ts = torch_ref.load_into_torch(torch_ref.torch_cnn(V, 1, 4), student.state_dict()).double().train()
    tt = torch_ref.load_into_torch(torch_ref.torch_cnn(V, 1, 6), teacher.state_dict()).double().eval()
    return gen, student, teacher, tg, ts, tt


def engine_config(gen, student, teacher, kind, n_g, n_s, generator_first, lr_s, lr_g, disc_weight=1.0, at_pairs=(),
                  beta=0.0, clip_norm=0.0):
    """datafree's own configuration, SGD for both nets (Adam would turn the exactly-zero
    gradients of the biases before BN layers into full-size steps of rounding noise), the
    generator fed the data set's z instead of its own noise."""
    opt_s = kdcore.optim.SGD(lr=lr_s, momentum=0.9, weight_decay=5e-4).bind(student)
    opt_g = kdcore.optim.SGD(lr=lr_g, momentum=0.9, weight_decay=5e-4).bind(gen)
    gm, sm = D._phase_masks(n_g, n_s, generator_first)
    nets, terms, _ = D._adversarial_step(gen, student, teacher, opt_g, opt_s, lr_g / lr_s, kind, disc_weight,
                                         list(at_pairs), beta, gm, sm, clip_norm)
    nets[0]["noise"] = 0.0
    return nets, terms


def run_engine(nets, terms, z, steps, cycle, cycle_batch, lr_s):
    ds = kdcore.datasets.from_arrays(z, np.zeros(len(z), np.int64), num_classes=V, normalize=None)
    topts = dict(batch_size=N, schedule=(0, lr_s, [], 0, 0.0, 0), shuffle=False, max_steps=steps)
    return _kdcore.step_epoch(nets, terms, ds._c, 0, topts, logits_net=1, cycle=cycle, cycle_batch=cycle_batch)


def sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def clip_grads(model, clip):
    """torch.nn.utils.clip_grad_norm_ when clip > 0; the gradient's norm before it."""
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))


def kl_mean(s, t):
    """ZSKT's divergence: F.kl_div(log_softmax(s), softmax(t)) with its default reduction
    'mean', an average over samples and classes (written out: torch warns about 'mean')."""
    return TF.kl_div(TF.log_softmax(s, 1), TF.softmax(t, 1), reduction="sum") / s.numel()


def at_map(f):
    return TF.normalize(f.pow(2).mean(1).view(f.size(0), -1))


# ---- the L1 logit loss --------------------------------------------------------------------

def test_l1_loss_matches_autograd(rng):
    zs = rng.normal(0, 2, (6, 5)).astype(np.float32)
    zt = rng.normal(0, 2, (6, 5)).astype(np.float32)
    zs[1, 2] = zt[1, 2]   # a tie: torch's subgradient there is 0
    loss, d = F.logit_l1_loss(zs, zt)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(zt, dtype=torch.float64, requires_grad=True)
    ref = TF.l1_loss(s, t)
    ref.backward()
    check_close("l1", loss, ref.item(), rtol=1e-6)
    check_close("dl1/ds", d, s.grad.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(t.grad.numpy(), -s.grad.numpy())   # what a source with grad receives
    assert d[1, 2] == 0


def test_l1_loss_errors():
    with pytest.raises(ValueError, match="teacher_logits"):
        F.logit_l1_loss(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="student_logits"):
        F.logit_l1_loss(np.zeros((2, 3), np.float64), np.zeros((2, 3), np.float32))


# ---- the generator's step: the reversed discrepancy ----------------------------------------

@pytest.mark.parametrize("kind", ["l1", "kd"])
def test_generator_step_receives_the_reversed_gradient(kind):
    """One generator phase alone: the generator descends -D(T(G(z)), S(G(z))) through both
    networks; the student's parameters stay, its BN statistics move as in train mode; the
    teacher is untouched."""
    gen, student, teacher, tg, ts, tt = trio(tanh=kind == "l1")
    g0, s0, t0 = gen.state_dict(), student.state_dict(), teacher.state_dict()
    z = np.random.default_rng(4).standard_normal((2 * N, LATENT)).astype(np.float32)
    w = 1.0 if kind == "l1" else 1.0 / V
    lr_s, lr_g = 0.05, 0.1
    nets, terms = engine_config(gen, student, teacher, kind, 1, 1, True, lr_s, lr_g, disc_weight=w)
    st = run_engine(nets, terms, z, 1, 2, False, lr_s)

    imgs = tg(torch.tensor(z[:N], dtype=torch.float64))
    out_s, out_t = ts(imgs), tt(imgs)
    if kind == "l1":
        disc = TF.l1_loss(out_s, out_t)
    else:
        disc = kl_mean(out_s, out_t)
    og = sgd(tg, lr_g)
    (-disc).backward()
    og.step()
    check_models("generator", gen, tg, g0)
    sd = student.state_dict()
    tsd = torch_ref.to_numpy_state(ts)
    for k, v in sd.items():
        if "running" in k or "num_batches" in k:   # train-mode forward: the statistics moved as torch's
            check_close(f"student.{k}", v, tsd[k].reshape(v.shape), rtol=1e-5)
        else:
            np.testing.assert_array_equal(v, s0[k], err_msg=k)
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, t0[k], err_msg=k)
    # term 0 (the student's) did not run; the reversed term reports its unweighted value
    assert st["term_value"][0] == 0.0
    want = disc.item() * (1.0 if kind == "l1" else V)   # kdcore's KD: batch mean, V x F.kl_div's
    check_close("discrepancy", st["term_value"][-1], want, rtol=1e-5)
    check_close("net loss", st["net_loss"][1], -w * want, rtol=1e-5)


# ---- whole iterations ----------------------------------------------------------------------

def test_dfad_iteration_matches_torch():
    """n_s = 3 student steps, each on its own batch of z (generator detached), then one
    generator step on a fourth batch."""
    n_s = 3
    gen, student, teacher, tg, ts, tt = trio(tanh=True)
    g0, s0, t0 = gen.state_dict(), student.state_dict(), teacher.state_dict()
    z = np.random.default_rng(5).standard_normal(((n_s + 1) * N, LATENT)).astype(np.float32)
    lr_s, lr_g = 0.05, 0.02
    nets, terms = engine_config(gen, student, teacher, "l1", 1, n_s, False, lr_s, lr_g)
    st = run_engine(nets, terms, z, n_s + 1, n_s + 1, False, lr_s)

    zt = torch.tensor(z, dtype=torch.float64)
    os_, og = sgd(ts, lr_s), sgd(tg, lr_g)
    s_losses = []
    for k in range(n_s):
        fake = tg(zt[k * N:(k + 1) * N]).detach()
        loss = TF.l1_loss(ts(fake), tt(fake).detach())
        os_.zero_grad()
        loss.backward()
        os_.step()
        s_losses.append(loss.item())
    og.zero_grad()
    fake = tg(zt[n_s * N:])
    g_loss = -TF.l1_loss(ts(fake), tt(fake))
    g_loss.backward()
    og.step()
    check_models("generator", gen, tg, g0)
    check_models("student", student, ts, s0)
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, t0[k], err_msg=k)
    check_close("student L1 (mean over its steps)", st["term_value"][0], np.mean(s_losses), rtol=1e-5)
    check_close("generator L1", st["term_value"][-1], -g_loss.item(), rtol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.02])
def test_zskt_iteration_matches_torch(clip):
    """One batch of z for the whole iteration: the generator step (-KL), then n_s = 3 student
    steps of KL + beta * AT on two stage pairs, with F.kl_div's reduction 'mean' (kl_weight
    1/V on kdcore's batch-mean KL); with clip > 0 each update follows clip_grad_norm_ (the
    norms here exceed 0.02, so every step is clipped)."""
    n_s, beta = 3, 250.0
    gen, student, teacher, tg, ts, tt = trio(tanh=False)
    g0, s0 = gen.state_dict(), student.state_dict()
    z = np.random.default_rng(6).standard_normal((N, LATENT)).astype(np.float32)
    lr_s, lr_g = 0.05, 0.1
    pairs = [("5", "5"), ("12", "12")]
    nets, terms = engine_config(gen, student, teacher, "kd", 1, n_s, True, lr_s, lr_g, disc_weight=1.0 / V,
                                at_pairs=pairs, beta=beta, clip_norm=clip)
    st = run_engine(nets, terms, z, n_s + 1, n_s + 1, True, lr_s)

    feats = {}
    for name, m in (("s", ts), ("t", tt)):
        for i in (5, 12):
            m[i].register_forward_hook(lambda mod, inp, out, key=(name, i): feats.__setitem__(key, out))
    zt = torch.tensor(z, dtype=torch.float64)
    os_, og = sgd(ts, lr_s), sgd(tg, lr_g)

    og.zero_grad()
    fake = tg(zt)
    g_kl = kl_mean(ts(fake), tt(fake))
    (-g_kl).backward()
    norms = [clip_grads(tg, clip)]
    og.step()
    kls, ats = [], []
    for _ in range(n_s):
        fake = tg(zt).detach()
        with torch.no_grad():
            out_t = tt(fake)
        out_s = ts(fake)
        at = [(at_map(feats[("s", i)]) - at_map(feats[("t", i)])).pow(2).mean() for i in (5, 12)]
        loss = kl_mean(out_s, out_t) + beta * sum(at)
        os_.zero_grad()
        loss.backward()
        norms.append(clip_grads(ts, clip))
        os_.step()
        kls.append(kl_mean(out_s, out_t).item())
        ats.append([a.item() for a in at])
    check_models("generator", gen, tg, g0)
    check_models("student", student, ts, s0)
    check_close("student KL", st["term_value"][0], V * np.mean(kls), rtol=1e-5)
    check_close("AT", st["term_value"][1:3], np.mean(ats, 0), rtol=1e-5)
    check_close("generator KL", st["term_value"][-1], V * g_kl.item(), rtol=1e-5)
    if clip:
        assert min(norms) > 2 * clip, norms   # the clipping acted on every step


# ---- the step cycle's errors ---------------------------------------------------------------

def test_engine_refuses_bad_cycles():
    gen, student, teacher, *_ = trio(tanh=True)
    nets, terms = engine_config(gen, student, teacher, "l1", 1, 2, False, 0.1, 0.1)
    z = np.zeros((N, LATENT), np.float32)
    with pytest.raises(ValueError, match=r"cycle \(33\) must be in \[0, 32\]"):
        run_engine(nets, terms, z, 1, 33, False, 0.1)
    with pytest.raises(ValueError, match=r"net 0 \(generator\): phases \(0x4\) name a phase past the cycle of 2"):
        run_engine(nets, terms, z, 1, 2, False, 0.1)
    with pytest.raises(ValueError, match=r"term 1 \(l1\): phases \(0x4\) name a phase past the cycle of 2"):
        run_engine([dict(nets[0], phases=1), dict(nets[1], phases=2), nets[2]], terms, z, 1, 2, False, 0.1)
    with pytest.raises(ValueError, match=r"net 2 \(teacher\): phases are for a trained net"):
        run_engine(nets[:2] + [dict(nets[2], phases=1)], terms, z, 1, 3, False, 0.1)
    with pytest.raises(ValueError, match="cycle_batch needs a cycle of 2 or more phases"):
        run_engine([dict(n, phases=0) for n in nets], [], z, 1, 1, True, 0.1)
    bad = dict(kind=K["kd"], a=(1, -1), src=[(2, -1)], reverse=True, conditional=True)
    with pytest.raises(ValueError, match="reverse is not defined with learned gates or conditional"):
        run_engine([dict(n, phases=0) for n in nets], [bad], z, 1, 0, False, 0.1)
    with pytest.raises(ValueError, match=r"net 2 \(teacher\): clip_norm is for a trained net"):
        run_engine(nets[:2] + [dict(nets[2], clip_norm=1.0)], terms, z, 1, 3, False, 0.1)
    with pytest.raises(ValueError, match=r"net 1 \(student\): clip_norm \(-1\) must be >= 0 and finite"):
        run_engine([nets[0], dict(nets[1], clip_norm=-1.0), nets[2]], terms, z, 1, 3, False, 0.1)
    with pytest.raises(ValueError, match="phases must be a 32-bit mask"):
        run_engine([dict(nets[0], phases=-1)] + nets[1:], terms, z, 1, 3, False, 0.1)


def test_cycle_batch_repeats_the_batch_and_its_noise():
    """With cycle_batch, the steps of a cycle read one batch: a frozen net's output, logged by
    a term in every phase, is the same in each; without it, each step draws its own noise."""
    gen = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1, bn_eps=1e-5)
    m = kdcore.nn.Sequential(kdcore.nn.Linear(LATENT, V))
    m.reset_parameters(0)
    z = np.zeros((2 * N, LATENT), np.float32)
    ds = kdcore.datasets.from_arrays(z, np.zeros(len(z), np.int64), num_classes=V, normalize=None)
    vals = {}
    for cb in (False, True):
        per_phase = []
        for p in range(3):
            opt = kdcore.optim.SGD(lr=0.0, momentum=0.0, weight_decay=0.0).bind(m)
            nets = [dict(net=m.net, opt=opt, mode=M["train"], noise=1.0, role="m")]
            terms = [dict(kind=K["activation"], a=(0, -1), phases=1 << p)]
            st = _kdcore.step_epoch(nets, terms, ds._c, 0,
                                    dict(batch_size=N, schedule=(0, 0.0, [], 0, 0.0, 0), shuffle=False, max_steps=3),
                                    cycle=3, cycle_batch=cb)
            per_phase.append(st["term_value"][0])
        vals[cb] = per_phase
    assert vals[True][0] == vals[True][1] == vals[True][2]
    assert len(set(vals[False])) == 3


# ---- the Python API ------------------------------------------------------------------------

def small(seed=2):
    return kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=seed)


def test_dfad_and_zskt_api_reproducible():
    """Same seed, same bits (student and generator); the histories log both players; the
    generator is kept; the teacher is untouched."""
    teacher = teacher_of(6)
    t0 = teacher.state_dict()
    for fn, kw, tanh in ((D.dfad, dict(n_s=2), True), (D.zskt, dict(n_s=3, at_taps=[("5", "5"), ("12", "12")]), False)):
        runs = []
        for seed in (3, 3, 4):
            student = small()
            g = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1, bn_eps=1e-5, tanh=tanh)
            h = fn(student, teacher, epochs=2, iters_per_epoch=2, batch_size=8, latent_dim=LATENT, generator=g,
                   progress=False, seed=seed, **kw)
            runs.append((h, student.state_dict(), student.generator.state_dict()))
        h = runs[0][0]
        assert h.epochs == 2 and all(np.isfinite(h[k]).all() for k in ("student_loss", "generator_loss"))
        assert all(v < 0 for v in h["generator_loss"])
        for a, b in zip(runs[0][1:], runs[1][1:]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert any(not np.array_equal(runs[0][1][k], runs[2][1][k]) for k in runs[0][1])
        s0 = small().state_dict()
        assert any(not np.array_equal(runs[0][1][k], s0[k]) for k in s0)
    assert "at_2" in h and "kd" in h
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, t0[k], err_msg=k)


def test_api_val_and_default_generator():
    """val_acc on a real set; without a generator, one of the teacher's input shape."""
    teacher = teacher_of(6)
    teacher.input_shape = (1, 8, 8)
    rng = np.random.default_rng(0)
    val = kdcore.datasets.from_arrays(rng.standard_normal((20, 1, 8, 8)).astype(np.float32),
                                      rng.integers(0, V, 20), num_classes=V, normalize=None)
    student = small()
    h = D.zskt(student, teacher, epochs=1, iters_per_epoch=1, batch_size=8, n_s=2, beta=0.0, val=val, progress=False)
    assert 0.0 <= h["val_acc"][0] <= 1.0
    assert student.generator(np.zeros((2, 100), np.float32), grad=False).shape == (2, 1, 8, 8)
    assert set(h) >= {"kd", "student_loss", "generator_loss"} and "at" not in h


def test_zskt_default_beta_follows_the_stage_taps():
    """beta=None: AT at 250 on the matching stage pairs; without a match, KL only and a
    warning naming the mismatch."""
    teacher = teacher_of(6)
    kw = dict(epochs=1, iters_per_epoch=1, batch_size=8, latent_dim=LATENT, n_s=2, progress=False,
              generator=kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1))
    h = D.zskt(small(), teacher, **kw)
    assert h["student_loss"][0] == pytest.approx(h["kd"][0] / V + 250 * (h["at"][0] + h["at_2"][0]))
    one_stage = small()
    one_stage.default_taps = dict(one_stage.feature_taps(), stages=["5"])
    with pytest.warns(UserWarning, match=r"no attention transfer \(beta=0, KL only\).*matching stage taps"):
        h = D.zskt(one_stage, teacher, **kw)
    assert "at" not in h and h["student_loss"][0] == pytest.approx(h["kd"][0] / V)


def test_api_errors_name_the_argument():
    teacher = teacher_of(6)
    g = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1)
    kw = dict(epochs=1, iters_per_epoch=1, batch_size=8, latent_dim=LATENT, generator=g, progress=False)
    with pytest.raises(ValueError, match="n_s"):
        D.dfad(small(), teacher, n_s=0, **kw)
    with pytest.raises(ValueError, match=r"n_g \+ n_s \(33\) must be at most 32"):
        D.zskt(small(), teacher, n_g=3, n_s=30, beta=0, **kw)
    with pytest.raises(ValueError, match="beta"):
        D.zskt(small(), teacher, beta=-1.0, **kw)
    one_stage = small()
    one_stage.default_taps = dict(one_stage.feature_taps(), stages=["5"])
    with pytest.raises(ValueError, match="matching stage taps"):
        D.zskt(one_stage, teacher, beta=250.0, **kw)
    with pytest.raises(ValueError, match="clip_norm"):
        D.zskt(small(), teacher, clip_norm=-1.0, **kw)
    with pytest.raises(ValueError, match="kl_weight"):
        D.zskt(small(), teacher, kl_weight=0.0, **kw)
    with pytest.raises(TypeError, match="student_optimizer"):
        D.dfad(small(), teacher, student_optimizer="sgd", **kw)
    with pytest.raises(TypeError, match="generator_optimizer"):
        D.zskt(small(), teacher, generator_optimizer=0.1, beta=0, **kw)
    with pytest.raises(TypeError, match="generator must be a kdcore model"):
        D.dfad(small(), teacher, **dict(kw, generator="g"))
    with pytest.raises(ValueError, match="student cannot be its own teacher"):
        D.dfad(teacher, teacher, **kw)
    with pytest.raises(ValueError, match=r"at_taps: the student's '5' is \(4, 8, 8\) and the teacher's '12'"):
        D.zskt(small(), teacher, at_taps=[("5", "12")], **kw)
    with pytest.raises(TypeError, match="at_taps must be a list of"):
        D.zskt(small(), teacher, at_taps=["5"], **kw)
    wide = kdcore.models.cnn(num_classes=V + 1, input_size=8, width=4)
    with pytest.raises(ValueError, match="the student outputs 5 values, the teacher 4"):
        D.dfad(wide, teacher, **kw)
    with pytest.raises(ValueError, match="bn_eps"):
        kdcore.models.dafl_generator(bn_eps=0.0)


@pytest.mark.parametrize("tanh", [True, False], ids=["dfad", "zskt"])
def test_default_generator_last_bn_as_the_authors(tanh):
    """The generator dfad / zskt build by default (dafl_generator(bn_eps=1e-5, tanh=...)) has
    the authors' state: no affine parameters in the BN after the Tanh (DFAD's GeneratorA), an
    affine last BN without it (ZSKT); affine_last overrides."""
    kw = dict(img_size=8, width=4, bn_eps=1e-5, tanh=tanh)
    gen = kdcore.models.dafl_generator(LATENT, **kw)
    assert list(gen.state_dict()) == list(torch_generator(4, tanh).state_dict())
    last = "13" if tanh else "12"
    assert (f"{last}.weight" in gen.state_dict()) == (not tanh)
    flipped = kdcore.models.dafl_generator(LATENT, affine_last=tanh, **kw)
    assert (f"{last}.weight" in flipped.state_dict()) == tanh
    assert flipped.num_parameters() - gen.num_parameters() == (2 if tanh else -2)
    with pytest.raises(TypeError, match="affine_last"):
        kdcore.models.dafl_generator(LATENT, affine_last="yes", **kw)
