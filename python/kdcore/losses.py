"""Loss terms of a distillation step, composable:

    kdcore.distill(student, teacher, data, losses=[kdcore.losses.CE(0.1), kdcore.losses.KD(0.9, T=4),
                                                   kdcore.losses.AT(1000)])

Each term is a kind of the C step engine (``kd_term_kind`` in kdcore.h) with its weight, its
schedule (``warmup_epochs``: linear ramp of the weight; ``stop_epoch``: off from that epoch
on) and its inputs: the student's logits or taps, and the teacher's. Feature terms take their
taps by name (``model.taps()`` lists them) or, for the zoo models, from the model's
``feature_taps()``: the stage ends f1..f3 (post-activation; ``_pre`` variants before it)
and the pooled feature f4, as RepDistiller and mdistiller tap them. A term that needs a
connector (FitNet's regressor, ...) builds it, seeded, and the connector trains with the
student (same optimizer recipe) and is dropped after training.

``METHODS`` maps each ``distill(method=...)`` name to its reference recipe (the weights the
reference libraries use); ``kdcore.losses.method_terms(name)`` returns fresh copies.
"""
from __future__ import annotations

from . import _kdcore
from .nn import BatchNorm2d, Conv2d, Module, ReLU, Sequential, _check_bool, _check_float, _check_int, _is_choice

__all__ = ["Loss", "CE", "KD", "DKD", "LogitMSE", "Hint", "FitNet", "AT", "SP", "NST", "RKD", "PKT", "FSP",
           "METHODS", "method_terms", "connector"]

_KINDS = _kdcore.TERM_KINDS
_DEFAULTS = _kdcore.TERM_DEFAULTS


def _tap_list(name, v):
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, str) for t in v):
        return list(v)
    raise TypeError(f"{name} must be a tap name or a list of tap names, got {v!r}")


class Loss:
    """A loss term: ``weight`` times the kind's loss, with an optional schedule.

    Subclasses set ``kind`` (the C term kind) and ``label`` (the History key) and implement
    ``_add(plan)``, which appends the term's C configuration to the step plan."""
    kind = None
    label = None

    def __init__(self, weight=1.0, warmup_epochs=0, stop_epoch=None, phase="all"):
        self.weight = _check_float("weight", weight, 0)
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        self.stop_epoch = 0 if stop_epoch is None else _check_int("stop_epoch", stop_epoch, 1)
        if not _is_choice(phase, ("all", "init", "main")):
            raise ValueError(f"phase must be 'all', 'init' or 'main', got {phase!r}")
        # 'init': only in the initialisation phase (distill's init_epochs), 'main': only after it
        self.phase = phase

    def _base(self, **kw):
        return dict(kind=_KINDS[self.kind], weight=self.weight, warmup_epochs=self.warmup_epochs,
                    stop_epoch=self.stop_epoch, **kw)

    def _add(self, plan):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self):
        d = dict(weight=self.weight)
        if self.warmup_epochs:
            d["warmup_epochs"] = self.warmup_epochs
        if self.stop_epoch:
            d["stop_epoch"] = self.stop_epoch
        if self.phase != "all":
            d["phase"] = self.phase
        return d


class CE(Loss):
    """Cross-entropy with the labels (the training options' label smoothing applies)."""
    kind, label = "ce", "ce"

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0)))


class KD(Loss):
    """Hinton KD: T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T)) (RepDistiller, mdistiller).

    conditional=True: per sample, the term where the teacher predicts the label, else
    cross-entropy with the label at this weight (Meng et al. 2019)."""
    kind, label = "kd", "kd"

    def __init__(self, weight=0.9, T=_DEFAULTS["kd"]["T"], conditional=False, **kw):
        super().__init__(weight, **kw)
        self.T = _check_float("T", T, 0, lo_open=True)
        self.conditional = _check_bool("conditional", conditional)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], T=self.T, conditional=self.conditional))

    def _options(self):
        return dict(super()._options(), T=self.T, **({"conditional": True} if self.conditional else {}))


class DKD(Loss):
    """Decoupled KD (mdistiller): alpha TCKD + beta NCKD, each T^2-scaled; the History logs
    both parts (``tckd``, ``nckd``). mdistiller's defaults: weight 1 after a 20-epoch linear
    warm-up, alpha 1, beta 8, T 4."""
    kind, label = "dkd", "dkd"

    def __init__(self, weight=1.0, alpha=_DEFAULTS["dkd"]["alpha"], beta=_DEFAULTS["dkd"]["beta"],
                 T=_DEFAULTS["dkd"]["T"], warmup_epochs=20, **kw):
        super().__init__(weight, warmup_epochs=warmup_epochs, **kw)
        self.alpha = _check_float("alpha", alpha, 0)
        self.beta = _check_float("beta", beta, 0)
        self.T = _check_float("T", T, 0, lo_open=True)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], T=self.T, alpha=self.alpha, beta=self.beta),
                      parts=("tckd", "nckd"))

    def _options(self):
        return dict(super()._options(), alpha=self.alpha, beta=self.beta, T=self.T)


class LogitMSE(Loss):
    """Logit regression (Ba & Caruana): mean over N*V of (z_s - z_t)^2 (F.mse_loss)."""
    kind, label = "mse", "logit_mse"

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)]))


class Hint(Loss):
    """Feature regression: mean of (r(f_s) - f_t)^2 over a student tap passed through a
    connector r and a teacher tap of the connector's output shape (F.mse_loss).

    student_tap / teacher_tap: tap names (default: the models' hint layer, f2).
    connector: a kdcore Module mapping the student map to the teacher map's shape, or
    'convreg' (RepDistiller's ConvReg: conv + BN + ReLU chosen by the spatial ratio),
    'conv1x1' (1x1 conv + BN) or None (the maps already match)."""
    kind, label = "mse", "hint"

    def __init__(self, weight=100.0, student_tap=None, teacher_tap=None, connector="convreg", seed=0, **kw):
        super().__init__(weight, **kw)
        self.student_tap = None if student_tap is None else _tap_list("student_tap", student_tap)[0]
        self.teacher_tap = None if teacher_tap is None else _tap_list("teacher_tap", teacher_tap)[0]
        if not (connector is None or isinstance(connector, Module) or _is_choice(connector, ("convreg", "conv1x1"))):
            raise ValueError(f"connector must be 'convreg', 'conv1x1', a kdcore Module or None, got {connector!r}")
        self.connector = connector
        self.seed = _check_int("seed", seed, 0)

    def _add(self, plan):
        s_tap = self.student_tap or plan.default_tap(0, "hint")
        t_tap = self.teacher_tap or plan.default_tap(1, "hint")
        s_ref, t_ref = plan.ref(0, s_tap), plan.ref(1, t_tap)
        s_shape, t_shape = plan.shape(s_ref), plan.shape(t_ref)
        a = s_ref
        if self.connector is not None:
            conn = self.connector if isinstance(self.connector, Module) else \
                connector(self.connector, s_shape, t_shape)
            if not isinstance(self.connector, Module):
                conn.reset_parameters(self.seed)
            a = plan.add_connector(conn, s_ref, f"hint {s_tap}")
        got = plan.shape(a)
        if tuple(got) != tuple(t_shape):
            raise ValueError(f"Hint: the student side gives {tuple(got)} per sample at {s_tap!r}"
                             f"{' after the connector' if self.connector is not None else ''}, "
                             f"the teacher tap {t_tap!r} {tuple(t_shape)}")
        plan.add_term(self, self._base(a=a, src=[t_ref]))

    def _options(self):
        return dict(super()._options(), student_tap=self.student_tap, teacher_tap=self.teacher_tap,
                    connector=self.connector if not isinstance(self.connector, Module) else type(self.connector).__name__)


class FitNet(Hint):
    """FitNet hints (Romero et al.), one-stage as RepDistiller/mdistiller train it: CE plus
    weight 100 times the hint loss on f2 through a ConvReg regressor. (The paper's two-stage
    form -- a hint stage training the student up to the hint layer, then KD -- is
    ``kdcore.distill(..., method='fitnet', hint_epochs=E)``.)"""
    label = "hint"


class _FeatureLoss(Loss):
    """A parameter-free feature or relation term between student and teacher taps.

    taps: student tap names (default: the model's ``feature_taps()[self.default]``);
    teacher_taps: the teacher's (default: its own defaults, paired in order). Several taps
    make one term each, all with this weight (the references sum over stages); the History
    logs them as ``<label>``, ``<label>_2``, ... in tap order."""
    default = "stages"     # which feature_taps() entry the term reads by default
    grad_teacher = False

    def __init__(self, weight, taps=None, teacher_taps=None, **kw):
        super().__init__(weight, **kw)
        self.taps = None if taps is None else _tap_list("taps", taps)
        self.teacher_taps = None if teacher_taps is None else _tap_list("teacher_taps", teacher_taps)

    def _pairs(self, plan):
        def taps_of(who, given):
            if given is not None:
                return given
            t = plan.default_tap(who, self.default)
            return list(t) if isinstance(t, (list, tuple)) else [t]
        s_taps, t_taps = taps_of(0, self.taps), taps_of(1, self.teacher_taps)
        if len(s_taps) != len(t_taps):
            raise ValueError(f"{type(self).__name__}: {len(s_taps)} student taps {s_taps} but {len(t_taps)} teacher "
                             f"taps {t_taps}; give both lists")
        return list(zip(s_taps, t_taps))

    def _opts(self):
        return {}

    def _add(self, plan):
        for s_tap, t_tap in self._pairs(plan):
            plan.add_term(self, self._base(a=plan.ref(0, s_tap), src=[plan.ref(1, t_tap)], **self._opts()))

    def _options(self):
        d = super()._options()
        if self.taps is not None:
            d["taps"] = self.taps
        if self.teacher_taps is not None:
            d["teacher_taps"] = self.teacher_taps
        return d


class AT(_FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis): per stage, a = L2-normalised channel mean
    of |f|^p over the positions; maps of different sizes are average-pooled to the smaller.
    form='code' (default; RepDistiller, mdistiller): mean over n*h*w of (a_s - a_t)^2, weight
    1000 on the stage ends f1..f3. form='paper': (1/n) sum_i ||a_s,i - a_t,i||_2 (the paper's
    beta/2 is the weight)."""
    kind, label = "at", "at"

    def __init__(self, weight=1000.0, p=_DEFAULTS["at"]["p"], form="code", **kw):
        super().__init__(weight, **kw)
        self.p = _check_float("p", p, 1)
        if not _is_choice(form, _kdcore.AT_FORMS):
            raise ValueError(f"form must be 'code' or 'paper', got {form!r}")
        self.form = form

    def _opts(self):
        return dict(p=self.p, form=_kdcore.AT_FORMS[self.form])

    def _options(self):
        return dict(super()._options(), p=self.p, form=self.form)


class SP(_FeatureLoss):
    """Similarity preserving (Tung & Mori): G = F F^T over the batch, rows L2-normalised;
    ||G_t - G_s||_F^2 / n^2 on the last stage map (f3), weight 3000 (RepDistiller)."""
    kind, label, default = "sp", "sp", "stages"

    def __init__(self, weight=3000.0, **kw):
        super().__init__(weight, **kw)

    def _pairs(self, plan):
        pairs = super()._pairs(plan)
        return pairs if self.taps is not None else pairs[-1:]


class NST(_FeatureLoss):
    """Neuron selectivity transfer (Huang & Wang): MMD^2 with the polynomial kernel (u.v)^2
    between the channels' normalised spatial vectors, per stage f1..f3, weight 50
    (mdistiller); computed as per-sample GEMMs."""
    kind, label = "nst", "nst"

    def __init__(self, weight=50.0, **kw):
        super().__init__(weight, **kw)


class RKD(_FeatureLoss):
    """Relational KD (Park et al.): w_dist * distance term + w_angle * angle term (smooth-L1
    of normalised pairwise distances and of triplet angles) on the pooled feature f4;
    weights 25 and 50, term weight 1 (RepDistiller). The History logs both parts."""
    kind, label, default = "rkd", "rkd", "pooled"

    def __init__(self, weight=1.0, w_dist=_DEFAULTS["rkd"]["w_dist"], w_angle=_DEFAULTS["rkd"]["w_angle"], **kw):
        super().__init__(weight, **kw)
        self.w_dist = _check_float("w_dist", w_dist, 0)
        self.w_angle = _check_float("w_angle", w_angle, 0)

    def _opts(self):
        return dict(w_dist=self.w_dist, w_angle=self.w_angle)

    def _add(self, plan):
        for s_tap, t_tap in self._pairs(plan):
            plan.add_term(self, self._base(a=plan.ref(0, s_tap), src=[plan.ref(1, t_tap)], **self._opts()),
                          parts=("rkd_dist", "rkd_angle"))

    def _options(self):
        return dict(super()._options(), w_dist=self.w_dist, w_angle=self.w_angle)


class PKT(_FeatureLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas): KL between the batch's cosine-
    similarity conditional distributions of the pooled features f4, mean over n^2 entries,
    weight 30000 (RepDistiller)."""
    kind, label, default = "pkt", "pkt", "pooled"

    def __init__(self, weight=30000.0, **kw):
        super().__init__(weight, **kw)


class FSP(_FeatureLoss):
    """Flow of solution procedure (Yim et al.): Gram matrices G = F1 F2^T / hw between
    consecutive stage maps (f1->f2, f2->f3), mean squared difference (RepDistiller); student
    and teacher need equal channel counts at those stages. RepDistiller trains it as an
    initialisation phase (weight 50 there), then the student on CE alone: method='fsp'."""
    kind, label = "fsp", "fsp"

    def __init__(self, weight=50.0, **kw):
        super().__init__(weight, **kw)

    def _add(self, plan):
        pairs = self._pairs(plan)
        if len(pairs) < 2:
            raise ValueError("FSP needs at least two consecutive taps per network")
        for (s1, t1), (s2, t2) in zip(pairs, pairs[1:]):
            plan.add_term(self, self._base(a=plan.ref(0, s1), a2=plan.ref(0, s2), src=[plan.ref(1, t1), plan.ref(1, t2)]))


def connector(kind, s_shape, t_shape):
    """A connector mapping per-sample student maps of s_shape (c, h, w) to t_shape.

    'conv1x1': 1x1 conv (no bias) + BN, for equal spatial sizes. 'convreg': RepDistiller's
    ConvReg: a 3x3 stride-2 conv if the student map is twice as large, a valid conv of size
    1 + Hs - Ht if larger, a 3x3 padded conv if equal; then BN and ReLU."""
    (sc, sh, sw), (tc, th, tw) = s_shape, t_shape
    if kind == "conv1x1":
        if (sh, sw) != (th, tw):
            raise ValueError(f"a 1x1 connector needs equal spatial sizes, got {(sh, sw)} and {(th, tw)}")
        return Sequential(Conv2d(sc, tc, 1, bias=False), BatchNorm2d(tc))
    if sh != sw or th != tw:
        raise ValueError(f"ConvReg needs square maps, got {(sh, sw)} and {(th, tw)}")
    if sh == 2 * th:
        conv = Conv2d(sc, tc, 3, stride=2, padding=1)
    elif sh * 2 == th:
        raise ValueError(f"ConvReg from {sh}x{sh} up to {th}x{th} needs a transposed convolution, which kdcore does "
                         "not have yet; choose taps of equal or decreasing size")
    elif sh >= th:
        conv = Conv2d(sc, tc, 1 + sh - th) if sh > th else Conv2d(sc, tc, 3, padding=1)
    else:
        raise ValueError(f"ConvReg cannot map {sh}x{sh} to {th}x{th}")
    return Sequential(conv, BatchNorm2d(tc), ReLU())


# Each method's reference recipe: the terms and weights of RepDistiller / mdistiller (the
# README's method table gives the formulas and which library each form follows).
METHODS = {
    "ce": lambda: [CE(1.0)],
    "kd": lambda: [CE(0.1), KD(0.9, T=4.0)],
    "dkd": lambda: [CE(1.0), DKD(1.0)],
    "mse": lambda: [CE(1.0), LogitMSE(1.0)],
    "fitnet": lambda: [CE(1.0), FitNet(100.0)],
    "at": lambda: [CE(1.0), AT(1000.0)],
    "sp": lambda: [CE(1.0), SP(3000.0)],
    "nst": lambda: [CE(1.0), NST(50.0)],
    "rkd": lambda: [CE(1.0), RKD(1.0)],
    "pkt": lambda: [CE(1.0), PKT(30000.0)],
    # Initialisation-phase methods (RepDistiller): the term alone for init_epochs, then CE.
    "fsp": lambda: [CE(1.0, phase="main"), FSP(50.0, phase="init")],
}


def method_terms(name):
    """Fresh loss terms of a method's reference recipe (``METHODS``)."""
    if not _is_choice(name, METHODS):
        raise ValueError(f"unknown method {name!r}; methods: {sorted(METHODS)}")
    return METHODS[name]()


# ---------------------------------------------------------------------------------------
# The step plan: the nets and terms a list of losses makes, for kdcore._kdcore.step_epoch.

def _chw(data):
    s = tuple(data.shape)
    return (s[0], 1, 1) if len(s) == 1 else s


class _Plan:
    """Nets of a distillation step -- the student (0), the teachers (1..), then connectors --
    and the terms of the losses, with the names the History logs them under."""

    def __init__(self, student, teachers, data):
        self.models = [student] + list(teachers)
        self.chw = _chw(data)
        self.connectors = []      # (module, input ref, description)
        self.terms = []           # C term dicts
        self.labels = []          # (History key, parts keys)
        self._shapes = {}

    def ref(self, who, tap=None):
        """(net, node) of a model's output (tap None) or of a named tap."""
        return (who, -1 if tap is None else self.models[who]._tap_index(tap))

    def default_tap(self, who, key):
        m = self.models[who]
        taps = m.feature_taps() if hasattr(m, "feature_taps") else None
        if not taps or taps.get(key) is None:
            role = "student" if who == 0 else "teacher"
            raise ValueError(f"the {role} ({type(m).__name__}) has no default {key!r} tap; name its taps "
                             f"(model.taps() lists them)")
        return taps[key]

    def _net_shapes(self, who):
        if who not in self._shapes:
            if who < len(self.models):
                net, chw = self.models[who].net, self.chw
            else:
                conn, src, _ = self.connectors[who - len(self.models)]
                net, chw = conn.net, self.shape(src)
            self._shapes[who] = (net.shapes(1, *chw), net)
        return self._shapes[who]

    def shape(self, ref):
        """Per-sample (c, h, w) at a reference."""
        shapes, net = self._net_shapes(ref[0])
        node = ref[1]
        if node < 0:
            node = len(shapes) - 1 if ref[0] >= len(self.models) else self.models[ref[0]]._output_index()
        return tuple(shapes[node])

    def add_connector(self, module, src, what):
        if not isinstance(module, Module):
            raise TypeError(f"a connector must be a kdcore Module, got {type(module).__name__}")
        self.connectors.append((module, src, what))
        return (len(self.models) + len(self.connectors) - 1, -1)

    def add_term(self, loss, term, parts=()):
        label = loss.label
        used = {lab for lab, _ in self.labels}
        k = 2
        while label in used:
            label = f"{loss.label}_{k}"
            k += 1
        self.terms.append(term)
        self.labels.append((label, tuple(f"{label}_{p}" if label != loss.label else p for p in parts)))

    def reads_teacher_taps(self):
        refs = [t["a"] for t in self.terms] + [s for t in self.terms for s in t.get("src", [])]
        refs += [src for _, src, _ in self.connectors]
        return any(r[0] >= 1 and r[0] < len(self.models) and r[1] >= 0 for r in refs)


def check_losses(losses):
    """A non-empty list of Loss terms, as a list."""
    if not isinstance(losses, (list, tuple)) or not losses:
        raise TypeError("losses must be a non-empty list of kdcore.losses terms")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Loss):
            raise TypeError(f"losses[{i}] must be a kdcore.losses term (CE, KD, AT, ...), got {type(loss).__name__}")
    return list(losses)


def build_plan(student, teachers, data, losses):
    """The plan of a list of Loss terms (validated: types, taps, connector shapes)."""
    plan = _Plan(student, teachers, data)
    for loss in check_losses(losses):
        loss._add(plan)
    return plan
