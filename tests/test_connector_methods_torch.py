"""One full distillation step of each connector method on the step engine vs the same step
in PyTorch (float64) on the same weights: the student, its connectors (and parameter
holders, CRD's banks) trained together. Losses on the torch side are the reference formulas
written here as differentiable functions (see tests/test_connector_losses_torch.py for each
loss alone against the same formulas, hard cases included).

Student cnn (width 4) and teacher cnn (width 6), 8x8 inputs: pre-ReLU stage maps '4', '11'
(BN outputs), stage maps '5', '12', pooled feature '15'.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import kdcore
from kdcore import losses as L

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_feature_methods_torch import teacher_of  # noqa: E402
from test_schemes_torch import check_close, check_models  # noqa: E402

torch.set_num_threads(1)
V = 4
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(21)
    X = r.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = r.integers(0, V, 16)
    return X, y, kdcore.datasets.from_arrays(X, y, num_classes=V, normalize=None)


class Pair:
    """Student/teacher and their torch twins, with every node's output recorded."""

    def __init__(self, student, teacher, ws=4, wt=6):
        self.s0 = student.state_dict()
        self.ts = torch_ref.torch_cnn(V, 1, ws).double()
        torch_ref.load_into_torch(self.ts, self.s0)
        self.tt = torch_ref.torch_cnn(V, 1, wt).double()
        torch_ref.load_into_torch(self.tt, teacher.state_dict())
        self.tt.eval()
        self.f = {"s": {}, "t": {}}
        for k in range(16):
            self.ts[k].register_forward_hook(lambda m, i, o, k=k: self.f["s"].__setitem__(k, o))
            self.tt[k].register_forward_hook(lambda m, i, o, k=k: self.f["t"].__setitem__(k, o))

    def forward(self, X):
        x = torch.tensor(X, dtype=torch.float64)
        with torch.no_grad():
            self.tt(x)
        self.ts.train()
        return self.ts(x)


def twin_of(module, torch_module):
    torch_ref.load_into_torch(torch_module, module.state_dict())
    return torch_module.double()


def check_connector(name, km, tm, before):
    """A connector's parameter updates (after - before) vs torch's, relative to scale."""
    for k, v in km.state_dict().items():
        want = torch_ref.to_numpy_state(tm)[k].reshape(v.shape)
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(want), f"{name}.{k}"
            continue
        b = before[k].astype(np.float64)
        d_t = want - b
        # running means of zero-mean batch statistics (a conv of BN-normalised maps) are 0 up
        # to float32 rounding of the batch: compare them on the scale of the data, not their own
        floor = 1e-7 if k.endswith("running_mean") else 0.0
        check_close(f"{name}.{k} update", v - b, d_t, rtol=1e-4,
                    atol=1e-4 * np.abs(d_t).max() + 2.4e-7 * np.abs(b).max() + floor)


def run(student, teacher, ds, losses, **kw):
    return kdcore.distill(student, teacher, ds, losses=losses, epochs=1, batch_size=len(ds), progress=False,
                          optimizer=kdcore.optim.SGD(**SGD), **kw)


def t_ofd(s, t, m):
    e = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0)) + (s - t) ** 2 * (t > 0))
    return e.sum() / s.shape[0]


def test_ofd_step(data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, [L.CE(1.0), L.OFD(1e-3)])
    c1, c2 = student.connectors
    k1, k2 = L.connector("conv1x1", (4, 8, 8), (6, 8, 8)), L.connector("conv1x1", (8, 4, 4), (12, 4, 4))
    k1.reset_parameters(0)
    k2.reset_parameters(1)
    t1 = twin_of(k1, nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)))
    t2 = twin_of(k2, nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)))
    sd = teacher.state_dict()
    margins = [torch.tensor(kdcore.functional.ofd_margin(sd[f"{b}.weight"], sd[f"{b}.bias"]), dtype=torch.float64)
               .view(1, -1, 1, 1) for b in ("4", "11")]
    z = p.forward(X)
    opt = torch.optim.SGD(list(p.ts.parameters()) + list(t1.parameters()) + list(t2.parameters()), **SGD)
    t1.train(); t2.train()
    ce = TF.cross_entropy(z, torch.tensor(y))
    o1 = t_ofd(t1(p.f["s"][4]), torch.max(p.f["t"][4], margins[0]), margins[0])
    o2 = t_ofd(t2(p.f["s"][11]), torch.max(p.f["t"][11], margins[1]), margins[1])
    (ce + 1e-3 * (0.5 * o1 + o2)).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_connector("ofd stage 1", c1, t1, k1.state_dict())
    check_connector("ofd stage 2", c2, t2, k2.state_dict())
    check_close("ofd", h["ofd"][0], o1.item(), rtol=1e-4)
    check_close("ofd_2", h["ofd_2"][0], o2.item(), rtol=1e-4)


def test_vid_step_trains_the_variances(data):
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    h = run(student, teacher, ds, [L.CE(1.0), L.VID(1.0)])
    reg1, ls1, reg2, ls2 = student.connectors
    eps = 1e-5
    regs, lss = [], []
    for k, (sc, tc) in enumerate(((4, 6), (8, 12))):
        m = kdcore.nn.Sequential(kdcore.nn.Conv2d(sc, tc, 1, bias=False), kdcore.nn.ReLU(),
                                 kdcore.nn.Conv2d(tc, tc, 1, bias=False), kdcore.nn.ReLU(),
                                 kdcore.nn.Conv2d(tc, tc, 1, bias=False))
        m.reset_parameters(k)
        regs.append((m, twin_of(m, nn.Sequential(nn.Conv2d(sc, tc, 1, bias=False), nn.ReLU(),
                                                 nn.Conv2d(tc, tc, 1, bias=False), nn.ReLU(),
                                                 nn.Conv2d(tc, tc, 1, bias=False)))))
        lss.append(torch.tensor(kdcore.functional.vid_log_scale(tc, 5.0, eps), dtype=torch.float64, requires_grad=True))
    z = p.forward(X)
    params = list(p.ts.parameters()) + [q for _, t in regs for q in t.parameters()] + lss
    opt = torch.optim.SGD(params, **SGD)
    ce = TF.cross_entropy(z, torch.tensor(y))
    vids = []
    for (_, treg), ls, s_node, t_node in zip(regs, lss, (5, 12), (5, 12)):
        var = (TF.softplus(ls) + eps).view(1, -1, 1, 1)
        mu = treg(p.f["s"][s_node])
        vids.append((0.5 * ((mu - p.f["t"][t_node]) ** 2 / var + torch.log(var))).mean())
    (ce + sum(vids)).backward()
    l0 = [x.detach().clone() for x in lss]
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_connector("vid regressor 1", reg1, regs[0][1], regs[0][0].state_dict())
    check_connector("vid regressor 2", reg2, regs[1][1], regs[1][0].state_dict())
    for k, (holder, ls, before) in enumerate(((ls1, lss[0], l0[0]), (ls2, lss[1], l0[1]))):
        got = holder.state_dict()["0.weight"].ravel().astype(np.float64) - before.numpy()
        want = (ls.detach() - before).numpy()
        # log_scale is about 5 and stored in float32: its updates carry that rounding
        check_close(f"log_scale {k} update", got, want, rtol=1e-4,
                    atol=1e-4 * np.abs(want).max() + 2.4e-7 * np.abs(before.numpy()).max())
    check_close("vid", h["vid"][0], vids[0].item(), rtol=1e-4)



def test_vid_two_steps_on_the_engine(data):
    """VID as a step configuration over two unshuffled batches: the student, a regressor (1x1
    conv) on its '5' map and the variances' parameter holder trained together. After the
    second step every update equals two torch SGD steps (momentum, weight decay): the holder's
    gradient at each step is that step's alone, as torch's zero_grad gives."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    eps, B = 1e-5, len(ds) // 2
    reg = kdcore.nn.Sequential(kdcore.nn.Conv2d(4, 6, 1, bias=False))
    reg.reset_parameters(0)
    holder = kdcore.nn.Sequential(kdcore.nn.Linear(1, 6, bias=False))
    holder.parameters()["0.weight"][...] = kdcore.functional.vid_log_scale(6, 5.0, eps)[:, None]
    reg0, ls0 = reg.state_dict(), holder.state_dict()["0.weight"].ravel().astype(np.float64)
    treg = twin_of(reg, nn.Sequential(nn.Conv2d(4, 6, 1, bias=False)))
    ls = torch.tensor(ls0, dtype=torch.float64, requires_grad=True)
    opt = kdcore.optim.SGD(**SGD)
    M, KI = kdcore._kdcore.MODES, kdcore._kdcore.TERM_KINDS
    nets = [dict(net=student.net, opt=opt.bind(student), mode=M["train"], salt=1, role="student"),
            dict(net=teacher.net, mode=M["eval"], salt=2, role="teacher"),
            dict(net=reg.net, opt=opt.bind(reg), mode=M["train"], input=(0, student._tap_index("5")), role="connector"),
            dict(net=holder.net, opt=opt.bind(holder), params_only=True, role="vid variances")]
    terms = [dict(kind=KI["ce"], a=(0, -1), weight=1.0),
             dict(kind=KI["vid"], a=(2, -1), src=[(1, teacher._tap_index("5"))], params=3, eps=eps, weight=1.0)]
    topts = dict(batch_size=B, schedule=(0, SGD["lr"], [], 0, 0.0, 0), shuffle=False, max_steps=2)
    st = kdcore._kdcore.step_epoch(nets, terms, ds._c, 0, topts)
    topt = torch.optim.SGD(list(p.ts.parameters()) + list(treg.parameters()) + [ls], **SGD)
    vids = []
    for b in range(2):
        rows = slice(b * B, (b + 1) * B)
        topt.zero_grad()
        z = p.forward(X[rows])
        ce = TF.cross_entropy(z, torch.tensor(y[rows]))
        var = (TF.softplus(ls) + eps).view(1, -1, 1, 1)
        vid = (0.5 * ((treg(p.f["s"][5]) - p.f["t"][5]) ** 2 / var + torch.log(var))).mean()
        (ce + vid).backward()
        topt.step()
        vids.append(vid.item())
    check_models("student", student, p.ts, p.s0)
    check_connector("vid regressor", reg, treg, reg0)
    got = holder.state_dict()["0.weight"].ravel().astype(np.float64) - ls0
    want = ls.detach().numpy() - ls0
    check_close("log_scale update", got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + 2.4e-7 * np.abs(ls0).max())
    check_close("vid", st["term_value"][1], np.mean(vids), rtol=1e-4)

KI = kdcore._kdcore.TERM_KINDS


def embed_step(student, teacher, ks, kt, terms, ds):
    """One unshuffled full-batch step on the engine: the student, the frozen teacher, and the
    embedding heads ks (on the student's pooled feature) and kt (on the teacher's), trained."""
    opt = kdcore.optim.SGD(**SGD)
    M = kdcore._kdcore.MODES
    nets = [dict(net=student.net, opt=opt.bind(student), mode=M["train"], salt=1, role="student"),
            dict(net=teacher.net, mode=M["eval"], salt=2, role="teacher"),
            dict(net=ks.net, opt=opt.bind(ks), mode=M["train"], input=(0, 15), role="connector"),
            dict(net=kt.net, opt=opt.bind(kt), mode=M["train"], input=(1, 15), role="connector")]
    topts = dict(batch_size=len(ds), schedule=(0, SGD["lr"], [], 0, 0.0, 0), shuffle=False, max_steps=1)
    return kdcore._kdcore.step_epoch(nets, terms, ds._c, 0, topts)


def test_cc_step_trains_both_embeddings(data):
    """CC pairs consecutive samples, so the batch order matters: the step runs unshuffled."""
    X, y, ds = data
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    ks, kt = kdcore.nn.Sequential(kdcore.nn.Linear(8, 16)), kdcore.nn.Sequential(kdcore.nn.Linear(12, 16))
    ks.reset_parameters(0)
    kt.reset_parameters(1)
    ks0, kt0 = ks.state_dict(), kt.state_dict()
    terms = [dict(kind=KI["ce"], a=(0, -1), weight=1.0), dict(kind=KI["cc"], a=(2, -1), src=[(3, -1)], grad=True,
                                                               weight=0.02)]
    st = embed_step(student, teacher, ks, kt, terms, ds)
    ts_ = torch_ref.load_into_torch(nn.Sequential(nn.Linear(8, 16)), ks0).double()
    tt_ = torch_ref.load_into_torch(nn.Sequential(nn.Linear(12, 16)), kt0).double()
    z = p.forward(X)
    opt = torch.optim.SGD(list(p.ts.parameters()) + list(ts_.parameters()) + list(tt_.parameters()), **SGD)
    ce = TF.cross_entropy(z, torch.tensor(y))
    d = (ts_(p.f["s"][15]) - tt_(p.f["t"][15])).abs()
    cc = (d[:-1] * d[1:]).sum(1).mean()
    (ce + 0.02 * cc).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_connector("student embed", ks, ts_, ks0)
    check_connector("teacher embed", kt, tt_, kt0)
    check_close("cc", st["term_value"][1], cc.item(), rtol=1e-4)


def test_crd_step_and_bank_update(data):
    """The CRD term on the engine with a bank whose rows for this step are read first
    (CRDBank.sample draws what the step will): student + both embedding heads vs torch, Z set
    from this batch, and the banks' momentum update after the step."""
    X, y, ds = data
    K, dim, T, mom = 8, 16, 0.07, 0.5
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    ks, kt = kdcore.nn.Sequential(kdcore.nn.Linear(8, dim)), kdcore.nn.Sequential(kdcore.nn.Linear(12, dim))
    ks.reset_parameters(0)
    kt.reset_parameters(1)
    ks0, kt0 = ks.state_dict(), kt.state_dict()
    bank = kdcore.functional.CRDBank(len(ds), dim=dim, n_neg=K, T=T, momentum=mom, seed=4)
    idx = np.arange(len(ds))
    rows = bank.sample(idx)
    b0 = (bank.student_bank.copy(), bank.teacher_bank.copy())
    terms = [dict(kind=KI["ce"], a=(0, -1), weight=1.0),
             dict(kind=KI["crd"], a=(2, -1), src=[(3, -1)], grad=True, weight=0.8, bank=bank._c)]
    st = embed_step(student, teacher, ks, kt, terms, ds)
    ts_ = torch_ref.load_into_torch(nn.Sequential(nn.Linear(8, dim)), ks0).double()
    tt_ = torch_ref.load_into_torch(nn.Sequential(nn.Linear(12, dim)), kt0).double()
    z = p.forward(X)
    topt = torch.optim.SGD(list(p.ts.parameters()) + list(ts_.parameters()) + list(tt_.parameters()), **SGD)
    ce = TF.cross_entropy(z, torch.tensor(y))

    def unit(v):
        return v / v.pow(2).sum(1, keepdim=True).sqrt()

    es, et = unit(ts_(p.f["s"][15])), unit(tt_(p.f["t"][15]))
    R = torch.tensor(rows)
    ws, wt = torch.tensor(b0[0], dtype=torch.float64)[R], torch.tensor(b0[1], dtype=torch.float64)[R]
    out_v2 = torch.exp(torch.bmm(ws, et.unsqueeze(2)).squeeze(2) / T)
    out_v1 = torch.exp(torch.bmm(wt, es.unsqueeze(2)).squeeze(2) / T)
    zs = (out_v1.mean().item() * len(ds), out_v2.mean().item() * len(ds))
    pn = 1.0 / len(ds)

    def nce(x):
        return -(torch.log(x[:, 0] / (x[:, 0] + K * pn + 1e-7)).sum()
                 + torch.log((K * pn) / (x[:, 1:] + K * pn + 1e-7)).sum()) / x.shape[0]

    crd = nce(out_v1 / zs[0]) + nce(out_v2 / zs[1])
    (ce + 0.8 * crd).backward()
    topt.step()
    check_models("student", student, p.ts, p.s0)
    check_connector("student embed", ks, ts_, ks0)
    check_connector("teacher embed", kt, tt_, kt0)
    check_close("crd", st["term_value"][1], crd.item(), rtol=1e-4)
    check_close("Z", np.array(bank.z), np.array(zs), rtol=1e-5)
    for which, (b, v) in enumerate(((b0[0], es), (b0[1], et))):
        want = torch.tensor(b, dtype=torch.float64)
        rows_ = want[torch.tensor(idx)] * mom + v.detach() * (1 - mom)
        want[torch.tensor(idx)] = rows_ / rows_.pow(2).sum(1, keepdim=True).sqrt()
        got = bank.student_bank if which == 0 else bank.teacher_bank
        check_close(f"bank {which}", got, want.numpy(), rtol=1e-4, atol=1e-6)


def test_crd_checkpoint_resume_is_bitwise(data, tmp_path):
    """method-style CRD (+ its banks, Z and draw counter in the checkpoint): 2 epochs straight
    equal 1 epoch, checkpoint, resume."""
    _, _, ds = data
    teacher = teacher_of(6)
    mk = lambda: kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2)  # noqa: E731
    kw = dict(epochs=2, batch_size=8, progress=False, optimizer=kdcore.optim.SGD(**SGD))
    a = mk()
    kdcore.distill(a, teacher, ds, losses=[L.CE(1.0), L.CRD(0.8, dim=8, n_neg=4)], **kw)
    ck = str(tmp_path / "crd.safetensors")
    b = mk()
    kdcore.distill(b, teacher, ds, losses=[L.CE(1.0), L.CRD(0.8, dim=8, n_neg=4)], checkpoint=ck,
                   callback=lambda e, row: e == 0, **kw)
    c = mk()
    kdcore.distill(c, teacher, ds, losses=[L.CE(1.0), L.CRD(0.8, dim=8, n_neg=4)], checkpoint=ck, resume=True, **kw)
    for k, v in a.state_dict().items():
        assert np.array_equal(v, c.state_dict()[k]), k
    assert not all(np.array_equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_ab_init_phase_step(data):
    """AB's initialisation phase: one step of the student (up to its last pre-ReLU tap) and the
    two connectors (conv 3x3 + BN) on the hinge loss alone, layers past the taps untouched."""
    X, y, ds = data
    from kdcore.distill import _init_phase
    from kdcore.training import _Common
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    common = _Common(ds, 1, len(ds), kdcore.optim.SGD(**SGD), None, None, None, None, 0, False, 0.0, False, None,
                     None, 20)
    _init_phase(student, teacher, common, [L.AB(3e-3)], "ab-init", "auto")
    c1, c2 = student.connectors
    k1, k2 = L.connector("convreg", (4, 8, 8), (6, 8, 8), relu=False), L.connector("convreg", (8, 4, 4), (12, 4, 4),
                                                                                  relu=False)
    k1.reset_parameters(0)
    k2.reset_parameters(1)
    t1 = twin_of(k1, nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)))
    t2 = twin_of(k2, nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)))
    p.forward(X)
    opt = torch.optim.SGD(list(p.ts.parameters()) + list(t1.parameters()) + list(t2.parameters()), **SGD)
    t1.train(); t2.train()

    def ab(s, t, m=1.0):
        return ((s + m) ** 2 * ((s > -m) & (t <= 0)) + (s - m) ** 2 * ((s <= m) & (t > 0))).sum() / s.shape[0]

    loss = 3e-3 * (0.5 * ab(t1(p.f["s"][4]), p.f["t"][4]) + ab(t2(p.f["s"][11]), p.f["t"][11]))
    loss.backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_connector("ab stage 1", c1, t1, k1.state_dict())
    check_connector("ab stage 2", c2, t2, k2.state_dict())


def test_ft_main_step_with_a_frozen_paraphraser(data):
    """FT after its paraphraser phase: a translator on the student's f3 (here '12') is trained
    with the student on CE + 200 * mean |factor_s - factor_t| of the L2-normalised channel
    means of squared factors; the paraphraser's encoder (node 5) gives the teacher's factor
    and stays frozen."""
    X, y, ds = data
    from kdcore.distill import _distill_terms
    from kdcore.training import _Common
    student, teacher = kdcore.models.cnn(num_classes=V, input_size=8, width=4, seed=2), teacher_of(6)
    p = Pair(student, teacher)
    ft = L.FT(200.0)
    common = _Common(ds, 1, len(ds), kdcore.optim.SGD(**SGD), None, None, None, None, 0, False, 0.0, False, None,
                     None, 20)
    # the main phase alone builds the paraphraser (seeded) like the init phase would
    h = _distill_terms(student, teacher, common, [L.CE(1.0), ft], "ft", "auto", "main")
    para0 = ft._para.state_dict()
    (tr,) = student.connectors
    ktr = kdcore.nn.Sequential(kdcore.nn.Conv2d(8, 8, 3, padding=1), kdcore.nn.ReLU(), kdcore.nn.Conv2d(8, 6, 3, padding=1),
                               kdcore.nn.ReLU(), kdcore.nn.Conv2d(6, 6, 3, padding=1), kdcore.nn.ReLU())
    ktr.reset_parameters(1)
    ttr = twin_of(ktr, nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()))
    tpara = torch_ref.load_into_torch(nn.Sequential(
        nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1)), para0).double()
    z = p.forward(X)
    opt = torch.optim.SGD(list(p.ts.parameters()) + list(ttr.parameters()), **SGD)
    ce = TF.cross_entropy(z, torch.tensor(y))
    with torch.no_grad():
        ft_t = tpara[:6](p.f["t"][12])

    def factor(f):
        return TF.normalize(f.pow(2).mean(1).reshape(f.shape[0], -1))

    loss_ft = (factor(ttr(p.f["s"][12])) - factor(ft_t)).abs().mean()
    (ce + 200.0 * loss_ft).backward()
    opt.step()
    check_models("student", student, p.ts, p.s0)
    check_connector("translator", tr, ttr, ktr.state_dict())
    assert all(np.array_equal(v, para0[k]) for k, v in ft._para.state_dict().items()), "the paraphraser moved"
    check_close("ft", h["ft"][0], loss_ft.item(), rtol=1e-4)
