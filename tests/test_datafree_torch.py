"""Data-free distillation (DAFL) on the step engine vs the same step in PyTorch (float64) on
the same weights and noise: generator and student updated from one forward, the generator's
gradient through the frozen teacher; the new term kinds (one-hot, activation, entropy) and
the engine options (grad_input, detach_input, logits_net)."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import kdcore
from kdcore import _kdcore
from kdcore import functional as F  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)
V, LATENT, N = 4, 6, 8
K, M = _kdcore.TERM_KINDS, _kdcore.MODES


def torch_generator(w):
    """DAFL's Generator (eps 0.8 inside, the last BN after the Tanh without affine parameters)."""
    return tnn.Sequential(tnn.Linear(LATENT, w * 4), tnn.Unflatten(1, (w, 2, 2)), tnn.BatchNorm2d(w),
                          tnn.Upsample(scale_factor=2), tnn.Conv2d(w, w, 3, padding=1), tnn.BatchNorm2d(w, eps=0.8),
                          tnn.LeakyReLU(0.2), tnn.Upsample(scale_factor=2), tnn.Conv2d(w, w // 2, 3, padding=1),
                          tnn.BatchNorm2d(w // 2, eps=0.8), tnn.LeakyReLU(0.2), tnn.Conv2d(w // 2, 1, 3, padding=1),
                          tnn.Tanh(), tnn.BatchNorm2d(1, affine=False))


def t_entropy(z):
    pbar = TF.softmax(z, 1).mean(0)
    return (pbar * torch.log10(pbar)).sum()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dafl_step_matches_torch(T):
    gen = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1)
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    z = np.random.default_rng(0).standard_normal((N, LATENT)).astype(np.float32)
    ds = kdcore.datasets.from_arrays(z, np.zeros(N, np.int64), num_classes=V, normalize=None)
    g0, s0 = gen.state_dict(), student.state_dict()
    tg = torch_ref.load_into_torch(torch_generator(4), g0).double()
    ts = torch_ref.load_into_torch(torch_ref.torch_cnn(V, 1, 4), s0).double()
    tt = torch_ref.load_into_torch(torch_ref.torch_cnn(V, 1, 6), teacher.state_dict()).double().eval()
    feats = {}
    tt[15].register_forward_hook(lambda m, i, o: feats.__setitem__("pooled", o))
    # SGD here: the biases before BN layers have an exactly-zero gradient that Adam would
    # normalise into a full-size step of float rounding noise (Adam itself: test_optim_torch)
    lr_s, lr_g = 0.05, 0.2
    opt_s = kdcore.optim.SGD(lr=lr_s, momentum=0.9, weight_decay=5e-4).bind(student)
    opt_g = kdcore.optim.SGD(lr=lr_g, momentum=0.9, weight_decay=5e-4).bind(gen)
    nets = [dict(net=gen.net, opt=opt_g, mode=M["train"], lr_scale=lr_g / lr_s, role="generator"),
            dict(net=student.net, opt=opt_s, mode=M["train"], input=(0, -1), detach_input=True, role="student"),
            dict(net=teacher.net, mode=M["eval"], input=(0, -1), grad_input=True, role="teacher")]
    terms = [dict(kind=K["onehot"], a=(2, -1), src=[(2, -1)], weight=1.0),
             dict(kind=K["activation"], a=(2, teacher._tap_index("15")), weight=0.1),
             dict(kind=K["entropy"], a=(2, -1), weight=5.0),
             dict(kind=K["kd"], a=(1, -1), src=[(2, -1)], T=T, weight=1.0)]
    topts = dict(batch_size=N, schedule=(0, lr_s, [], 0, 0.0, 0), shuffle=False, max_steps=1)
    t_before = teacher.state_dict()
    st = _kdcore.step_epoch(nets, terms, ds._c, 0, topts, logits_net=1)

    tg.train(); ts.train()
    imgs = tg(torch.tensor(z, dtype=torch.float64))
    out_t = tt(imgs)
    onehot = TF.cross_entropy(out_t, out_t.argmax(1))
    act = -feats["pooled"].abs().mean()
    ent = t_entropy(out_t)
    out_s = ts(imgs.detach())
    kd = T * T * TF.kl_div(TF.log_softmax(out_s / T, 1), TF.softmax(out_t.detach() / T, 1), reduction="batchmean")
    og = torch.optim.SGD(tg.parameters(), lr=lr_g, momentum=0.9, weight_decay=5e-4)
    os_ = torch.optim.SGD(ts.parameters(), lr=lr_s, momentum=0.9, weight_decay=5e-4)
    (onehot + 0.1 * act + 5.0 * ent + kd).backward()
    og.step(); os_.step()
    check_models("generator", gen, tg, g0)
    check_models("student", student, ts, s0)
    for k, v in teacher.state_dict().items():   # frozen: unchanged, BN statistics included
        np.testing.assert_array_equal(v, t_before[k], err_msg=k)
    assert all(np.all(g == 0) for g in teacher.grads().values())
    for name, v, ref in zip(["onehot", "activation", "entropy", "kd"], st["term_value"], [onehot, act, ent, kd]):
        check_close(name, v, ref.item(), rtol=1e-4)


def test_activation_and_entropy_losses(rng):
    """The two losses alone against autograd (hard cases: zeros in the features, a peaked
    batch mean)."""
    from kdcore import datafree  # noqa: F401
    nets_x = (rng.standard_normal((5, 7)) * 3).astype(np.float32)
    nets_x[0, :3] = 0.0
    z = (rng.standard_normal((6, 5)) * 4).astype(np.float32)
    z[:, 0] += 30.0
    ds = kdcore.datasets.from_arrays(nets_x, np.zeros(5, np.int64), num_classes=7, normalize=None)
    m = kdcore.nn.Sequential(kdcore.nn.Linear(7, 7))
    m.reset_parameters(0)
    sd = m.state_dict()
    sd["0.weight"] = np.eye(7, dtype=np.float32)
    sd["0.bias"] = np.zeros(7, np.float32)
    m.load_state_dict(sd)
    # activation through an identity linear: the gradient w.r.t. the bias is -mean sign(x)
    opt = kdcore.optim.SGD(lr=1.0).bind(m)
    st = _kdcore.step_epoch([dict(net=m.net, opt=opt, mode=M["train"], role="m")],
                            [dict(kind=K["activation"], a=(0, -1), weight=1.0)], ds._c, 0,
                            dict(batch_size=5, schedule=(0, 1.0, [], 0, 0.0, 0), shuffle=False, max_steps=1))
    x = torch.tensor(nets_x, dtype=torch.float64, requires_grad=True)
    ref = -x.abs().mean()
    ref.backward()
    check_close("activation", st["term_value"][0], ref.item(), rtol=1e-6)
    np.testing.assert_allclose(m.state_dict()["0.bias"], -x.grad.sum(0).numpy(), rtol=1e-5, atol=1e-7)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    e = t_entropy(zt)
    e.backward()
    dsz = kdcore.datasets.from_arrays(z, np.zeros(6, np.int64), num_classes=5, normalize=None)
    m5 = kdcore.nn.Sequential(kdcore.nn.Linear(5, 5))
    sd = m5.state_dict()
    sd["0.weight"], sd["0.bias"] = np.eye(5, dtype=np.float32), np.zeros(5, np.float32)
    m5.load_state_dict(sd)
    st = _kdcore.step_epoch([dict(net=m5.net, opt=kdcore.optim.SGD(lr=1.0).bind(m5), mode=M["train"], role="m")],
                            [dict(kind=K["entropy"], a=(0, -1), weight=1.0)], dsz._c, 0,
                            dict(batch_size=6, schedule=(0, 1.0, [], 0, 0.0, 0), shuffle=False, max_steps=1))
    check_close("entropy", st["term_value"][0], e.item(), rtol=1e-5)
    np.testing.assert_allclose(m5.state_dict()["0.bias"], -zt.grad.sum(0).numpy(), rtol=1e-4, atol=1e-9)


def test_engine_refuses_bad_datafree_configurations():
    gen = kdcore.models.dafl_generator(LATENT, img_size=8, width=4)
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    z = np.zeros((N, LATENT), np.float32)
    ds = kdcore.datasets.from_arrays(z, np.zeros(N, np.int64), num_classes=V, normalize=None)
    topts = dict(batch_size=N, schedule=(0, 0.1, [], 0, 0.0, 0), shuffle=False, max_steps=1)
    g = dict(net=gen.net, opt=kdcore.optim.SGD(lr=0.1).bind(gen), mode=M["train"], role="generator")
    with pytest.raises(ValueError, match=r"net 1 \(teacher\): grad_input is for a frozen connector"):
        _kdcore.step_epoch([g, dict(net=teacher.net, mode=0, grad_input=True, role="teacher")], [], ds._c, 0, topts)
    with pytest.raises(ValueError, match="detach_input needs an input net"):
        _kdcore.step_epoch([dict(g, detach_input=True)], [], ds._c, 0, topts)
    with pytest.raises(ValueError, match=r"logits_net \(5\) must be a net of the step"):
        _kdcore.step_epoch([g], [], ds._c, 0, topts, logits_net=5)
    # without logits_net the generator's output (64 values) is taken for the logits
    with pytest.raises(ValueError, match="the dataset has 4 classes but the generator outputs 64 values"):
        _kdcore.step_epoch([g, dict(net=student.net, mode=3, input=(0, -1), detach_input=True, role="student")], [],
                           ds._c, 0, topts)


def test_dafl_api_learns_and_is_reproducible():
    """A few epochs on a 4-class toy teacher: finite terms, both nets trained, the teacher
    untouched, the same seed gives the same bits."""
    teacher = teacher_of(6)
    runs = []
    for _ in range(2):
        student = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)
        h = kdcore.datafree.dafl(student, teacher, epochs=3, steps_per_epoch=4, batch_size=16, latent_dim=LATENT,
                                 lr_g=0.05, progress=False, seed=3,
                                 generator=kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1))
        runs.append((h, student.state_dict(), student.generator.state_dict()))
    h = runs[0][0]
    assert all(np.isfinite(h[k]).all() for k in ("onehot", "activation", "entropy", "kd"))
    s0 = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2).state_dict()
    g0 = kdcore.models.dafl_generator(LATENT, img_size=8, width=4, seed=1).state_dict()
    assert any(not np.array_equal(runs[0][1][k], s0[k]) for k in s0)
    assert any(not np.array_equal(runs[0][2][k], g0[k]) for k in g0)
    t0 = teacher_of(6).state_dict()
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, t0[k], err_msg=k)
    for a, b in zip(runs[0][1:], runs[1][1:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    imgs = kdcore.datafree.samples(student.generator, 5)
    assert imgs.shape == (5, 1, 8, 8) and np.all(np.isfinite(imgs))
