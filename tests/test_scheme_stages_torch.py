"""The multi-stage schemes (kdcore.schemes: BAN, TAKD, DGKD, snapshot distillation, ESKD, Tf-KD)
and the Python entry points' own orchestration (SLKD*'s two phases and trajectory replay,
slkd's sl_optimizer, multi_exit's and mutual's defaults), each stage checked against the same
stage written in PyTorch (float64, same weights): right teacher, right weights, right
temperature, right learning rate, and the options passed through.

Tiny MLPs (12-16-4), one full batch of 8 samples per epoch, so every stage is a few SGD steps;
a batch's order (the stages shuffle) changes nothing but float rounding. Each stage's torch
twin starts from the weights kdcore's stage started from and learns from the kdcore teacher
that the previous comparison checked, so errors do not accumulate across stages.
test_schemes.py checks the same schemes bitwise against stages run by hand with distill.
"""
import hashlib
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kdcore

sys.path.insert(0, os.path.dirname(__file__))
import torch_ref  # noqa: E402
from test_loop_options_torch import F64, ce, dataset, dkd_terms, multi_exit_data, multi_exit_loss, multi_exit_net, \
    multi_exit_torch, tolerant  # noqa: E402
from test_schemes_torch import LR, MOM, N, V, WD, check_close, kl_q, kl_T, make_data, make_model  # noqa: E402

torch.set_num_threads(1)


def fit_kw(**kw):
    """Every stage: one full-batch step per epoch, SGD as the torch side."""
    return dict(dict(batch_size=N, max_steps=1, progress=False,
                     optimizer=kdcore.optim.SGD(lr=LR, momentum=MOM, weight_decay=WD)), **kw)


def torch_twin(state):
    m = torch_ref.torch_mlp([12, 16, V]).double()
    return torch_ref.load_into_torch(m, state)


def logits_of(model, X):
    """The eval-mode logits of a kdcore mlp, computed by its torch twin."""
    with torch.no_grad():
        return torch_twin(model.state_dict()).eval()(torch.tensor(X, dtype=F64))


def torch_train(state, X, y, loss_fn, lrs=(LR,), lr=None, momentum=MOM, wd=WD):
    """A torch twin of a kdcore mlp holding `state`, trained with one optimizer (SGD, momentum
    carried over) for one full-batch step per entry of lrs on loss_fn(z, y). Returns its state
    after every step (numpy)."""
    m = torch_twin(state).train()
    opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=momentum, weight_decay=wd)
    x, yb = torch.tensor(X, dtype=F64), torch.tensor(y)
    states = []
    for step_lr in lrs:
        opt.param_groups[0]["lr"] = step_lr
        opt.zero_grad()
        loss_fn(m(x), yb).backward()
        opt.step()
        states.append(torch_ref.to_numpy_state(m))
    return states


def check_state(name, got, want, start):
    """kdcore weights `got` vs torch's `want`, both reached from `start`: the change, relative
    to its scale (as test_schemes_torch.check_models)."""
    for k, v in got.items():
        b = start[k].astype(np.float64)
        d_k, d_t = v.astype(np.float64) - b, want[k].reshape(v.shape).astype(np.float64) - b
        check_close(f"{name}.{k} change", d_k, d_t, rtol=1e-4, atol=1e-4 * np.abs(d_t).max() + 2.4e-7 * np.abs(b).max())


def kd_loss(zt, T, cw, kw, ls=0.0):
    return lambda z, y: cw * ce(z, y, ls) + kw * kl_T(zt, z, T)


# ------------------------------------------------------------------------------------------
# kdcore.schemes


@pytest.mark.parametrize("tolerant_term", [None, (0.5, 3)])
def test_born_again_stages(tolerant_term):
    """BAN: generation 0 = model.fresh(seed) trained on CE_eps (+ w * the tolerant term with
    tolerant=(w, K)), generation k = model.fresh(seed + k) learning from generation k - 1 with
    ce_weight CE_eps + kd_weight T^2 KL; label smoothing passed to every stage."""
    X, y = make_data("mlp")
    T, cw, kw, ls = 2.0, 0.3, 0.7, 0.1
    model = make_model("mlp", 3)
    r = kdcore.born_again(model, dataset(X, y), generations=3, epochs=1, T=T, ce_weight=cw, kd_weight=kw,
                          tolerant=tolerant_term, seed=4, **fit_kw(label_smoothing=ls))
    for k in range(3):
        init = model.fresh(4 + k).state_dict()
        if k == 0:
            w, K = tolerant_term or (0.0, 2)
            loss = (lambda z, yb: ce(z, yb, ls) + w * tolerant(z, K))
        else:
            loss = kd_loss(logits_of(r.models[k - 1], X), T, cw, kw, ls)
        check_state(f"generation {k}", r.models[k].state_dict(), torch_train(init, X, y, loss)[-1], init)


def test_takd_stages():
    """TAKD: teacher -> assistant -> student, each stage ce_weight CE + kd_weight T^2 KL from
    the model before it in the chain, assistant_epochs for the assistant."""
    X, y = make_data("mlp")
    T, cw, kw = 3.0, 0.3, 0.6
    teacher, a, s = make_model("mlp", 10, sharpen=5.0), make_model("mlp", 11), make_model("mlp", 12)
    a0, s0 = a.state_dict(), s.state_dict()
    kdcore.takd(teacher, a, s, dataset(X, y), epochs=1, assistant_epochs=2, T=T, ce_weight=cw, kd_weight=kw,
                seed=1, **fit_kw())
    want_a = torch_train(a0, X, y, kd_loss(logits_of(teacher, X), T, cw, kw), lrs=(LR, LR))[-1]
    check_state("assistant", a.state_dict(), want_a, a0)
    check_state("student", s.state_dict(), torch_train(s0, X, y, kd_loss(logits_of(a, X), T, cw, kw))[-1], s0)


def test_dgkd_stages():
    """DGKD (teacher_drop 0): assistant i learns from the teacher and assistants 0..i-1, the
    student from all of them: ce_weight CE + kd_weight * mean over the guides of T^2 KL."""
    X, y = make_data("mlp")
    T, cw, kw = 3.0, 0.3, 0.6
    teacher = make_model("mlp", 10, sharpen=5.0)
    assistants, s = [make_model("mlp", 11), make_model("mlp", 12)], make_model("mlp", 13)
    starts = [m.state_dict() for m in assistants + [s]]
    kdcore.dgkd(teacher, assistants, s, dataset(X, y), teacher_drop=0.0, epochs=1, T=T, ce_weight=cw, kd_weight=kw,
                seed=2, **fit_kw())
    guides = [teacher]
    for i, (m, init) in enumerate(zip(assistants + [s], starts)):
        zts = [logits_of(g, X) for g in guides]

        def loss(z, yb, zts=zts):
            return cw * ce(z, yb) + kw * sum(kl_T(zt, z, T) for zt in zts) / len(zts)

        check_state(f"stage {i}", m.state_dict(), torch_train(init, X, y, loss)[-1], init)
        guides.append(m)


def test_snapshot_distill_stages():
    """Snapshot distillation: cycle 0 trains on CE, cycle l >= 1 learns from a frozen copy of the
    model at the end of cycle l - 1 (ce_weight CE + kd_weight T^2 KL); in every cycle the lr
    follows torch's CosineAnnealingLR(T_max=epochs_per_cycle, eta_min=min_lr) and the
    momentum starts afresh."""
    X, y = make_data("mlp")
    T, cw, kw, min_lr, E = 2.0, 0.4, 0.6, 0.02, 3
    model = make_model("mlp", 2)
    init = model.state_dict()
    r = kdcore.snapshot_distill(model, dataset(X, y), cycles=3, epochs_per_cycle=E, T=T, ce_weight=cw, kd_weight=kw,
                                min_lr=min_lr, seed=3, **fit_kw())
    p = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([p], lr=LR)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=E, eta_min=min_lr)
    lrs = []
    for _ in range(E):
        lrs.append(o.param_groups[0]["lr"])
        o.step()
        sch.step()
    ends = [t.state_dict() for t in r.teachers] + [model.state_dict()]   # the model after each cycle
    start = init
    for cyc in range(3):
        loss = (lambda z, yb: ce(z, yb)) if cyc == 0 else kd_loss(logits_of(r.teachers[cyc - 1], X), T, cw, kw)
        check_state(f"cycle {cyc}", ends[cyc], torch_train(start, X, y, loss, lrs=lrs)[-1], start)
        start = ends[cyc]


def test_eskd_stages():
    """ESKD: the teacher trained on CE for teacher_epochs, its state after stop_epoch epochs is
    the teacher; the student learns with ce_weight CE + kd_weight T^2 KL until kd_stop_epoch
    and ce_weight CE from then on (the optimizer's momentum carried over)."""
    X, y = make_data("mlp")
    T, cw, kw = 3.0, 0.3, 0.6
    teacher, s = make_model("mlp", 10), make_model("mlp", 1)
    t0, s0 = teacher.state_dict(), s.state_dict()
    r = kdcore.eskd(teacher, s, dataset(X, y), teacher_epochs=3, stop_epoch=2, epochs=3, kd_stop_epoch=2, T=T,
                    ce_weight=cw, kd_weight=kw, seed=5, **fit_kw())
    t_states = torch_train(t0, X, y, lambda z, yb: ce(z, yb), lrs=(LR,) * 3)
    check_state("early teacher", r.teacher.state_dict(), t_states[1], t0)
    check_state("fully trained teacher", teacher.state_dict(), t_states[2], t0)
    zt = logits_of(r.teacher, X)
    m = torch_twin(s0).train()
    opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    x, yb = torch.tensor(X, dtype=F64), torch.tensor(y)
    for epoch in range(3):
        opt.zero_grad()
        z = m(x)
        (cw * ce(z, yb) + (kw * kl_T(zt, z, T) if epoch < 2 else 0)).backward()
        opt.step()
    check_state("student", s.state_dict(), torch_ref.to_numpy_state(m), s0)
    assert r.student_history["kd_weight"] == pytest.approx([kw, kw, 0.0])


def test_tf_kd_self_stages():
    """Tf-KD self: a copy of the student pretrained on CE for teacher_epochs is the teacher; the
    student learns with (1 - alpha) CE + alpha * multiplier / K * T^2 KL."""
    X, y = make_data("mlp")
    alpha, T, mult = 0.7, 3.0, 2.0
    s = make_model("mlp", 1)
    s0 = s.state_dict()
    r = kdcore.tf_kd(s, dataset(X, y), mode="self", epochs=1, teacher_epochs=2, alpha=alpha, T=T, multiplier=mult,
                     seed=0, **fit_kw())
    check_state("teacher", r.teacher.state_dict(), torch_train(s0, X, y, lambda z, yb: ce(z, yb), lrs=(LR, LR))[-1],
                s0)
    loss = kd_loss(logits_of(r.teacher, X), T, 1 - alpha, alpha * mult / V)
    check_state("student", s.state_dict(), torch_train(s0, X, y, loss)[-1], s0)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_tf_kd_virtual_step(form):
    """Tf-KD reg: the virtual teacher p^d (a at the label, (1-a)/(K-1) elsewhere). 'code':
    (1 - alpha) CE + alpha m/K KL(softmax(p^d / T) || softmax(z)); 'paper':
    (1 - alpha) CE + alpha m/K T^2 KL(softmax(log p^d / T) || softmax(z / T))."""
    X, y = make_data("mlp")
    alpha, T, a, mult = 0.3, 5.0, 0.9, 3.0
    s = make_model("mlp", 1)
    s0 = s.state_dict()
    kdcore.tf_kd(s, dataset(X, y), mode="virtual", form=form, epochs=1, alpha=alpha, T=T, a=a, multiplier=mult,
                 seed=0, **fit_kw())
    pd = torch.full((N, V), (1 - a) / (V - 1), dtype=F64)
    pd[torch.arange(N), torch.tensor(y)] = a
    kw = alpha * mult / V
    if form == "code":
        def loss(z, yb):
            return (1 - alpha) * ce(z, yb) + kw * kl_q(TF.softmax(pd / T, 1), z, 1.0)
    else:
        def loss(z, yb):
            return (1 - alpha) * ce(z, yb) + kw * kl_T(pd.log(), z, T)
    check_state("student", s.state_dict(), torch_train(s0, X, y, loss)[-1], s0)


# ------------------------------------------------------------------------------------------
# entry points' own orchestration


def slkd_models():
    return (make_model("mlp", 10, sharpen=10.0), make_model("mlp", 1),
            [make_model("mlp", 21, sharpen=3.0), make_model("mlp", 22, sharpen=3.0)])


@pytest.mark.parametrize("replay", ["trajectory", "final"])
def test_slkd_sequential_replay(replay):
    """SLKD*: phase 1 trains each SL-teacher alone against the teacher (alpha CE_eps + (1 -
    alpha) T^2 KL, with sl_optimizer) for `epochs` epochs; phase 2 trains the student with the
    SL-teachers frozen, at student epoch i from their weights after SL epoch i ('trajectory')
    or after the last one ('final'). The SL trajectory and every student epoch are computed in
    torch; the SL-teachers end with their final weights."""
    X, y = make_data("mlp")
    E, T, a, lam, eta, rho, ls, sl_lr = 3, 4.0, 0.2, 1.0, 2.0, 0.3, 0.1, 0.3
    teacher, s, sls = slkd_models()
    s0, sl0 = s.state_dict(), [m.state_dict() for m in sls]
    snaps = []
    kdcore.slkd(s, teacher, dataset(X, y), sl_teachers=sls, epochs=E, sequential=True, replay=replay, T=T, alpha=a,
                lam=lam, eta=eta, rho=rho, seed=0, callback=lambda e, row: snaps.append(s.state_dict()) and False,
                **fit_kw(label_smoothing=ls, sl_optimizer=kdcore.optim.SGD(lr=sl_lr, momentum=MOM, weight_decay=WD)))
    zt = logits_of(teacher, X)
    traj = [torch_train(b, X, y, kd_loss(zt, T, a, 1 - a, ls), lrs=(sl_lr,) * E) for b in sl0]
    for j in range(2):
        check_state(f"sl{j} (final)", sls[j].state_dict(), traj[j][-1], sl0[j])
    m = torch_twin(s0).train()
    opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    x, yb = torch.tensor(X, dtype=F64), torch.tensor(y)
    for epoch in range(E):
        i = epoch if replay == "trajectory" else E - 1
        with torch.no_grad():
            z = [torch_twin(traj[j][i]).eval()(x) for j in range(2)]
        zsl = rho * z[0] + (1 - rho) * z[1]
        opt.zero_grad()
        zs = m(x)
        c = ce(zs, yb, ls)
        (lam * (a * c + (1 - a) * kl_T(zt, zs, T)) + eta * (a * c + (1 - a) * kl_T(zsl, zs, T))).backward()
        opt.step()
        check_state(f"student after epoch {epoch}", snaps[epoch], torch_ref.to_numpy_state(m), s0)


def state_digest(state):
    """SHA-256 of a state dict (names and bytes, in key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k]).tobytes())
    return h.hexdigest()


def nearest_snapshot(state, snapshots):
    """(index of the snapshot nearest to `state`, distances to all): the distance is the largest
    weight difference over the floating-point tensors (num_batches_tracked left out)."""
    d = [max(float(np.abs(v.astype(np.float64) - snap[k].reshape(v.shape)).max())
             for k, v in state.items() if v.dtype.kind == "f") for snap in snapshots]
    return int(np.argmin(d)), d


@pytest.mark.parametrize("replay", ["trajectory", "final"])
def test_slkd_star_snapshot_per_epoch(replay):
    """Which SL-teacher snapshot SLKD* replays at each student epoch. Snapshot k is the
    SL-teacher after k phase-1 epochs (0: untrained, E: final), computed here in torch from the
    same initial weights; the state each student epoch ran with (read in the callback, after
    the epoch: the frozen SL-teachers do not change during it) is matched to the nearest
    snapshot. replay='trajectory': 0-based student epoch e uses snapshot e + 1, the state at
    the end of SL epoch e (the paper's student at epoch e learning from the snapshot of epoch e,
    epochs counted from 1), never the untrained one; 'final': snapshot E at every epoch.
    Digests: E distinct states (trajectory) or one (final), the last one bitwise the SL-teachers'
    state after the run."""
    X, y = make_data("mlp")
    E, T, a, lam, eta, rho = 4, 4.0, 0.2, 1.0, 2.0, 0.7
    teacher, s, sls = slkd_models()
    sl0 = [m.state_dict() for m in sls]
    used = []   # per student epoch: the SL-teachers' states

    def record(epoch, row):
        used.append([m.state_dict() for m in sls])
        return False

    kdcore.slkd(s, teacher, dataset(X, y), sl_teachers=sls, epochs=E, sequential=True, replay=replay, T=T, alpha=a,
                lam=lam, eta=eta, rho=rho, seed=0, callback=record, **fit_kw())
    assert len(used) == E
    zt = logits_of(teacher, X)
    snapshots = [[sl0[j]] + torch_train(sl0[j], X, y, kd_loss(zt, T, a, 1 - a), lrs=(LR,) * E) for j in range(2)]
    mapping = {}
    for e in range(E):
        for j in range(2):
            k, d = nearest_snapshot(used[e][j], snapshots[j])
            # an unambiguous match: float rounding away from one snapshot, a step away from the others
            assert d[k] < 1e-5 and min(d[:k] + d[k + 1:]) > 100 * d[k], f"epoch {e}, sl{j}: distances {d}"
            mapping[(e, j)] = k
    want = {(e, j): (e + 1 if replay == "trajectory" else E) for e in range(E) for j in range(2)}
    assert mapping == want
    digests = [[state_digest(u[j]) for u in used] for j in range(2)]
    for j in range(2):
        assert len(set(digests[j])) == (E if replay == "trajectory" else 1), f"sl{j}: {digests[j]}"
        assert digests[j][-1] == state_digest(sls[j].state_dict())


def test_slkd_parallel_sl_optimizer():
    """Parallel SLKD through kdcore.slkd: lam, eta, alpha, rho, T and label smoothing reach the
    loop, and sl_optimizer gives the SL-teachers its own lr, momentum and weight decay."""
    X, y = make_data("mlp")
    T, a, lam, eta, rho, ls = 3.0, 0.3, 0.5, 2.0, 0.3, 0.1
    sl_lr, sl_mom, sl_wd = 0.03, 0.5, 1e-3
    teacher, s, sls = slkd_models()
    s0, sl0 = s.state_dict(), [m.state_dict() for m in sls]
    kdcore.slkd(s, teacher, dataset(X, y), sl_teachers=sls, epochs=1, T=T, alpha=a, lam=lam, eta=eta, rho=rho, seed=0,
                **fit_kw(label_smoothing=ls, sl_optimizer=kdcore.optim.SGD(lr=sl_lr, momentum=sl_mom,
                                                                           weight_decay=sl_wd)))
    x, yb = torch.tensor(X, dtype=F64), torch.tensor(y)
    zt = logits_of(teacher, X)
    ms, msl = torch_twin(s0).train(), [torch_twin(b).train() for b in sl0]
    opts = [torch.optim.SGD(ms.parameters(), lr=LR, momentum=MOM, weight_decay=WD)] + \
        [torch.optim.SGD(t.parameters(), lr=sl_lr, momentum=sl_mom, weight_decay=sl_wd) for t in msl]
    z = [t(x) for t in msl]
    zs = ms(x)
    c = ce(zs, yb, ls)
    zsl = (rho * z[0] + (1 - rho) * z[1]).detach()
    total = lam * (a * c + (1 - a) * kl_T(zt, zs, T)) + eta * (a * c + (1 - a) * kl_T(zsl, zs, T))
    total = total + sum(a * ce(zj, yb, ls) + (1 - a) * kl_T(zt, zj, T) for zj in z)
    total.backward()
    for o in opts:
        o.step()
    check_state("student", s.state_dict(), torch_ref.to_numpy_state(ms), s0)
    for j in range(2):
        check_state(f"sl{j}", sls[j].state_dict(), torch_ref.to_numpy_state(msl[j]), sl0[j])


@pytest.mark.parametrize("teacher", [False, True])
def test_multi_exit_defaults(teacher):
    """kdcore.multi_exit's documented defaults reach the loop: T 3; without a teacher
    ce_weight 0.7 / kd_weight 0.3 (BYOT), with one 0.1 / 0.9; label smoothing passed."""
    ls = 0.1
    m = multi_exit_net()
    X, y = multi_exit_data()
    data = dataset(X, y)
    sd = {k: torch.tensor(v, dtype=F64) for k, v in m.state_dict().items()}
    zt = None
    kw = {}
    if teacher:
        zt_np = kdcore.predict(kdcore.models.mlp([64, 32, V], seed=5), data)
        zt, kw = torch.tensor(zt_np, dtype=F64), dict(teacher=zt_np)
    kdcore.multi_exit(m, data, epochs=1, **fit_kw(label_smoothing=ls), **kw)
    P = {k: v.clone().requires_grad_() for k, v in sd.items()}
    o = torch.optim.SGD(P.values(), lr=LR, momentum=MOM, weight_decay=WD)
    cw, kwt = (0.1, 0.9) if teacher else (0.7, 0.3)
    outs = multi_exit_torch(P, torch.tensor(X, dtype=F64).reshape(N, -1))
    multi_exit_loss(outs, torch.tensor(y), zt, 3.0, cw, kwt, ls)[0].backward()
    o.step()
    check_state("model", m.state_dict(), {k: p.detach().numpy() for k, p in P.items()},
                {k: v.numpy() for k, v in sd.items()})


def test_mutual_entry_point():
    """kdcore.mutual with 3 peers: T, ce_weight, kd_weight and label smoothing reach the loop
    (peer a: ce_weight CE_eps + kd_weight mean_{b != a} T^2 KL(sg(p_b^T) || p_a^T))."""
    X, y = make_data("mlp")
    T, cw, kw, ls = 2.0, 0.6, 1.5, 0.1
    peers = [make_model("mlp", 1 + a, sharpen=3.0) for a in range(3)]
    starts = [p.state_dict() for p in peers]
    kdcore.mutual(peers, dataset(X, y), epochs=1, T=T, ce_weight=cw, kd_weight=kw, **fit_kw(label_smoothing=ls))
    x, yb = torch.tensor(X, dtype=F64), torch.tensor(y)
    tps = [torch_twin(b).train() for b in starts]
    opts = [torch.optim.SGD(t.parameters(), lr=LR, momentum=MOM, weight_decay=WD) for t in tps]
    zs = [t(x) for t in tps]
    total = sum(cw * ce(za, yb, ls) + kw * sum(kl_T(zb.detach(), za, T) for b, zb in enumerate(zs) if b != a) / 2
                for a, za in enumerate(zs))
    total.backward()
    for o in opts:
        o.step()
    for a in range(3):
        check_state(f"peer{a}", peers[a].state_dict(), torch_ref.to_numpy_state(tps[a]), starts[a])


def test_fit_and_distill_pass_label_smoothing():
    """kdcore.fit and kdcore.distill hand label_smoothing to the C loop: CE_eps (fit) and
    ce_weight CE_eps + kd_weight T^2 KL (distill, defaults 0.1 / 0.9, T 4)."""
    X, y = make_data("mlp")
    ls = 0.2
    for name in ("fit", "distill"):
        s = make_model("mlp", 1)
        s0 = s.state_dict()
        if name == "fit":
            kdcore.fit(s, dataset(X, y), epochs=1, **fit_kw(label_smoothing=ls))
            loss = (lambda z, yb: ce(z, yb, ls))
        else:
            t = make_model("mlp", 10, sharpen=5.0)
            kdcore.distill(s, t, dataset(X, y), epochs=1, **fit_kw(label_smoothing=ls))
            loss = kd_loss(logits_of(t, X), 4.0, 0.1, 0.9, ls)
        check_state(name, s.state_dict(), torch_train(s0, X, y, loss)[-1], s0)


@pytest.mark.parametrize("method", ["kd", "dkd", "mse"])
def test_distill_method_defaults(method):
    """kdcore.distill's documented defaults reach the loop: 'kd' 0.1 CE + 0.9 T^2 KL at T 4;
    'dkd' CE + w(0) (TCKD + 8 NCKD) at T 4 with the warm-up w(0) = 1/20 (also logged as
    kd_weight); 'mse' CE + mean((z_s - z_t)^2)."""
    X, y = make_data("mlp")
    s, t = make_model("mlp", 1), make_model("mlp", 10, sharpen=5.0)
    s0 = s.state_dict()
    h = kdcore.distill(s, t, dataset(X, y), method=method, epochs=1, **fit_kw())
    zt = logits_of(t, X)
    if method == "kd":
        loss, w = kd_loss(zt, 4.0, 0.1, 0.9), 0.9
    elif method == "dkd":
        w = 1 / 20

        def loss(z, yb):
            tc, nc = dkd_terms(z, zt, yb, 4.0)
            return ce(z, yb) + w * (tc + 8 * nc)
    else:
        w = 1.0

        def loss(z, yb):
            return ce(z, yb) + TF.mse_loss(z, zt)
    check_state(method, s.state_dict(), torch_train(s0, X, y, loss)[-1], s0)
    assert h["kd_weight"][0] == pytest.approx(w)
