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
from .functional import _mlkd_temperatures
from .nn import (_ADD, _BATCHNORM, _CONCAT, _CONV2D, _INPUT_NODE, _MUL, _SIGMOID, _UPSAMPLE, BatchNorm2d, Conv2d,
                 Linear, Module, ReLU, Sequential, _check_bool, _check_float, _check_int, _is_choice, _join)

__all__ = ["Loss", "CE", "KD", "DKD", "DIST", "NormKD", "WTTM", "CTKD", "MLKD", "LogitMSE", "Hint", "FitNet", "AT", "SP", "NST", "RKD", "PKT", "FSP", "OFD",
           "AB", "VID", "CC", "CRD", "FT", "ReviewKD", "ReviewFusion", "METHODS", "method_terms", "connector"]

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

    ``view``: the view of each batch the term reads, 0 (the batch under ``augment``) or 1 (the
    strong view: the same samples under ``augment`` plus RandAugment of 2 operations and Cutout,
    as MLKD's loader); the
    student and the teacher run a forward on each view a term reads, with its own BN batch
    statistics, and one update from the summed gradients (docs/methods/mlkd.md).

    Subclasses set ``kind`` (the C term kind) and ``label`` (the History key) and implement
    ``_add(plan)``, which appends the term's C configuration to the step plan."""
    kind = None
    label = None
    needs_init = False   # it has its own initialisation phase (FT trains its paraphraser there)

    def __init__(self, weight=1.0, warmup_epochs=0, stop_epoch=None, phase="all", view=0):
        if isinstance(view, bool) or view not in (0, 1):
            raise ValueError(f"view must be 0 or 1, got {view!r}")
        self.view = view
        self.weight = _check_float("weight", weight, 0)
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        self.stop_epoch = 0 if stop_epoch is None else _check_int("stop_epoch", stop_epoch, 1)
        if not _is_choice(phase, ("all", "init", "main")):
            raise ValueError(f"phase must be 'all', 'init' or 'main', got {phase!r}")
        # 'init': only in the initialisation phase (distill's init_epochs), 'main': only after it
        self.phase = phase

    def _base(self, **kw):
        if self.view:
            # the term's references read the strong view
            for key in ("a", "a2"):
                if key in kw:
                    kw[key] = tuple(kw[key][:2]) + (self.view,)
            if "src" in kw:
                kw["src"] = [tuple(r[:2]) + (self.view,) for r in kw["src"]]
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
        if self.view:
            d["view"] = self.view
        return d


class CE(Loss):
    """Cross-entropy with the labels (the training options' label smoothing applies); default
    weight 1."""
    kind, label = "ce", "ce"

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0)))


class _LogitLoss(Loss):
    """A term between the student's and the teacher's logits. standardize=True z-scores each
    row of logits of both first, (z - mean) / (std + 1e-7) with the unbiased std: logit
    standardisation (Sun et al., CVPR 2024), a pre-processing of KD, DKD, DIST and logit MSE;
    the temperature then divides the z-scores. One teacher (the engine refuses several)."""

    def __init__(self, weight=1.0, standardize=False, **kw):
        super().__init__(weight, **kw)
        self.standardize = _check_bool("standardize", standardize)

    def _base(self, **kw):
        d = super()._base(**kw)
        if self.standardize:
            d["standardize"] = True
        return d

    def _options(self):
        return dict(super()._options(), **({"standardize": True} if self.standardize else {}))


class KD(_LogitLoss):
    """Hinton KD: T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T)) (RepDistiller, mdistiller).
    Defaults: weight 0.9, T 4, their recipe (method='kd' adds CE 0.1).

    conditional=True: per sample, the term where the teacher predicts the label, else
    cross-entropy with the label at this weight (Meng et al. 2019). standardize=True: logit
    standardisation (see _LogitLoss; its paper's CIFAR recipe is KD(9, T=2) with CE 0.1:
    method='kd+ls')."""
    kind, label = "kd", "kd"

    def __init__(self, weight=0.9, T=_DEFAULTS["kd"]["T"], conditional=False, **kw):
        super().__init__(weight, **kw)
        self.T = _check_float("T", T, 0, lo_open=True)
        self.conditional = _check_bool("conditional", conditional)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], T=self.T, conditional=self.conditional))

    def _options(self):
        return dict(super()._options(), T=self.T, **({"conditional": True} if self.conditional else {}))


class DKD(_LogitLoss):
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


class DIST(_LogitLoss):
    """DIST (Huang et al. 2022, "Knowledge distillation from a stronger teacher"): Pearson
    relations between the softened distributions, T^2 (beta * inter + gamma * intra), inter
    per sample over classes, intra per class over the batch (kdcore.functional.dist_loss).
    Defaults: the paper's CIFAR recipe, weight 1, beta 2, gamma 2, T 4, with CE weight 1; the
    History logs both parts (``dist_inter``, ``dist_intra``, without T^2 and weights)."""
    kind, label = "dist", "dist"

    def __init__(self, weight=1.0, beta=_DEFAULTS["dist"]["beta"], gamma=_DEFAULTS["dist"]["gamma"],
                 T=_DEFAULTS["dist"]["T"], **kw):
        super().__init__(weight, **kw)
        self.beta = _check_float("beta", beta, 0)
        self.gamma = _check_float("gamma", gamma, 0)
        self.T = _check_float("T", T, 0, lo_open=True)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], T=self.T, beta=self.beta, gamma=self.gamma),
                      parts=("dist_inter", "dist_intra"))

    def _options(self):
        return dict(super()._options(), beta=self.beta, gamma=self.gamma, T=self.T)


class NormKD(Loss):
    """NormKD (Chi et al. 2023, "NormKD: Normalized logits for knowledge distillation"): KD at
    a temperature per sample and per side, t_norm times the std of that sample's logits
    (kdcore.functional.normkd_loss). The gradient reaches the student through its std too, as
    in the authors' code; detach_std=True holds the student's std constant. Defaults: the
    authors' CIFAR-100 setting, weight 0.9 and t_norm 2 (with CE 0.1); their ImageNet
    setting puts CE and NormKD at 0.5 each with a t_norm of 1."""
    kind, label = "normkd", "normkd"

    def __init__(self, weight=0.9, t_norm=_DEFAULTS["normkd"]["t_norm"], detach_std=False, **kw):
        super().__init__(weight, **kw)
        self.t_norm = _check_float("t_norm", t_norm, 0, lo_open=True)
        self.detach_std = _check_bool("detach_std", detach_std)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], t_norm=self.t_norm,
                                       detach_std=self.detach_std))

    def _options(self):
        return dict(super()._options(), t_norm=self.t_norm, **({"detach_std": True} if self.detach_std else {}))


class WTTM(Loss):
    """WTTM (Zheng & Yang, ICLR 2024, "Knowledge distillation based on transformed teacher
    matching"): the student at temperature 1 matches the teacher's distribution raised to
    the power gamma (= 1/T) and renormalised, each sample weighted by the teacher's power sum
    U = sum_k p_k^gamma (kdcore.functional.wttm_loss). Defaults: the authors' CIFAR-100
    command, gamma 0.2 at weight 4 with CE 1 (their paper tunes gamma and the weight per
    teacher-student pair)."""
    kind, label = "wttm", "wttm"

    def __init__(self, weight=4.0, gamma=_DEFAULTS["wttm"]["gamma"], **kw):
        super().__init__(weight, **kw)
        self.gamma = _check_float("gamma", gamma, 0, lo_open=True)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], gamma=self.gamma))

    def _options(self):
        return dict(super()._options(), gamma=self.gamma)


class CTKD(Loss):
    """CTKD (Li et al., AAAI 2023, "Curriculum temperature for knowledge distillation"; the
    authors' global temperature): KD, T^2 mean_i KL(softmax(t_i/T) || softmax(s_i/T)), at a
    learned temperature T = t_start + t_range * sigmoid(p) whose parameter p (initially
    ``init``) the student's optimizer updates through a gradient-reversal layer: p receives
    -lambda * dL/dp, so the temperature ascends the loss the student descends. lambda follows
    a cosine curriculum over epochs, lambda_min + (lambda_max - lambda_min) * (1 - cos(pi e /
    decay_epochs)) / 2 with e = min(epoch + 1, decay_epochs) (kdcore.functional.ctkd_lambda).
    The History logs the temperature after each epoch (``ctkd_T``) and the epoch's lambda
    (``ctkd_lambda``); p is a parameter holder, saved in checkpoints. Defaults: the authors'
    CIFAR-100 script, CTKD weight 0.9 with CE 0.1, t_start 1, t_range 20 (their ``--t_end``, used as the
    range), p 1 (so T starts at 15.6), lambda 0 -> 1 over 10 epochs.

    temperature="instance" (the paper's instance-wise temperature): a small net,
    ``kdcore.models.ctkd_temperature(classes, hidden, seed)`` (Linear(2 classes, hidden) ->
    ReLU -> Linear(hidden, 1) on the student's and the teacher's logits concatenated), gives
    each sample i a value m_i and the loss runs row i at T_i = t_start + t_range *
    sigmoid(m_i): T_i^2 mean_i KL(softmax(t_i/T_i) || softmax(s_i/T_i)). The net trains with
    the student's optimizer through the same reversal (it receives -lambda * dL/dm); it reads
    the logits detached, so the student learns through its logits only. ``init`` is then
    unused; the net is ``student.connectors[0]`` afterwards and the History logs
    ``ctkd_lambda`` (no single temperature)."""
    kind, label = "ctkd", "ctkd"

    def __init__(self, weight=0.9, t_start=_DEFAULTS["ctkd"]["t_start"], t_range=_DEFAULTS["ctkd"]["t_range"],
                 init=1.0, lambda_min=_DEFAULTS["ctkd"]["lambda_min"], lambda_max=_DEFAULTS["ctkd"]["lambda_max"],
                 decay_epochs=_DEFAULTS["ctkd"]["decay_epochs"], temperature="global", hidden=64, seed=0, **kw):
        super().__init__(weight, **kw)
        if not isinstance(temperature, str) or temperature not in ("global", "instance"):
            raise ValueError(f"temperature must be 'global' or 'instance', got {temperature!r}")
        self.temperature = temperature
        self.hidden = _check_int("hidden", hidden, 1)
        self.seed = _check_int("seed", seed, 0)
        self.t_start = _check_float("t_start", t_start, 0, lo_open=True)
        self.t_range = _check_float("t_range", t_range, 0)
        self.init = _check_float("init", init)
        self.lambda_min = _check_float("lambda_min", lambda_min)
        self.lambda_max = _check_float("lambda_max", lambda_max)
        self.decay_epochs = _check_int("decay_epochs", decay_epochs, 1)

    def _add(self, plan):
        opts = dict(t_start=self.t_start, t_range=self.t_range, lambda_min=self.lambda_min,
                    lambda_max=self.lambda_max, decay_epochs=self.decay_epochs)
        if self.temperature == "instance":
            from .models import ctkd_temperature
            classes = plan.shape(plan.ref(0))
            net = ctkd_temperature(int(classes[0] * classes[1] * classes[2]), self.hidden, self.seed)
            temp = plan.add_connector(net, plan.ref(0), "ctkd temperature net", inputs=[plan.ref(1)], detach=True)
            plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], temp=temp, **opts))

            def log_lambda(epoch):
                lam = _kdcore.ctkd_lambda(epoch, self.lambda_min, self.lambda_max, self.decay_epochs)
                return {f"{label}_lambda": lam}
            label = plan.labels[-1][0]
            plan.add_log(log_lambda)
            return
        holder = Sequential(Linear(1, 1, bias=False))   # the temperature's parameter p
        holder.parameters()["0.weight"][...] = self.init
        h = plan.add_params(holder, "ctkd temperature")
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], params=h, t_start=self.t_start,
                                       t_range=self.t_range, lambda_min=self.lambda_min, lambda_max=self.lambda_max,
                                       decay_epochs=self.decay_epochs))
        label = plan.labels[-1][0]
        p = holder.parameters()["0.weight"]

        def log(epoch):
            T, _ = _kdcore.ctkd_temperature(float(p.reshape(-1)[0]), self.t_start, self.t_range)
            lam = _kdcore.ctkd_lambda(epoch, self.lambda_min, self.lambda_max, self.decay_epochs)
            return {f"{label}_T": T, f"{label}_lambda": lam}
        plan.add_log(log)

    def _options(self):
        extra = dict(temperature="instance", hidden=self.hidden, seed=self.seed) if self.temperature == "instance" else {}
        return dict(super()._options(), t_start=self.t_start, t_range=self.t_range, init=self.init,
                    lambda_min=self.lambda_min, lambda_max=self.lambda_max, decay_epochs=self.decay_epochs, **extra)


class MLKD(Loss):
    """MLKD (Jin, Wang & Lin, CVPR 2023, "Multi-level logit distillation"). On the weak view
    (view 0): KD (instance level), the class-correlation (C x C) and sample-correlation (B x B)
    alignments of the softened predictions, each at every temperature of ``temperatures`` and
    scaled by the fraction of samples (instance, batch) or classes (class) that the teacher's
    confidence masks keep at ``percentile`` (kdcore.functional.mlkd_loss).

    ``strong_view=True`` (``method='mlkd'``'s recipe) adds the authors' strong-view terms: CE with the labels on the
    strong view (view 1: see Loss) at ``strong_ce``, and the unmasked KD sum at every
    temperature, each KD term at this term's weight (and its warm-up and stop epoch), on the
    strong view's logits except the temperatures in ``kd_on_weak``, which the authors' code
    takes on the weak logits again (2 and 6). The History logs them, unweighted, as
    ``mlkd_strong_ce`` and ``mlkd_kd_T<T>`` per temperature. ``strong_view=False`` (the
    default of the class): the weak view alone. Defaults: the authors' code, weight 0.9 (with
    CE 0.1), temperatures (4, 3, 5, 2, 6), percentile 50, strong_ce 0.1, kd_on_weak (2, 6).
    The History logs the parts ``mlkd_instance`` and ``mlkd_class_batch`` (unweighted)."""
    kind, label = "mlkd", "mlkd"

    def __init__(self, weight=0.9, temperatures=_DEFAULTS["mlkd"]["temperatures"],
                 percentile=_DEFAULTS["mlkd"]["percentile"], strong_view=False, strong_ce=0.1, kd_on_weak=(2.0, 6.0),
                 **kw):
        super().__init__(weight, **kw)
        if self.view:
            raise ValueError("MLKD reads both views itself (strong_view); leave view at 0")
        self.temperatures = _mlkd_temperatures(temperatures)
        self.percentile = _check_float("percentile", percentile, 0, 100)
        self.strong_view = _check_bool("strong_view", strong_view)
        self.strong_ce = _check_float("strong_ce", strong_ce, 0)
        if not isinstance(kd_on_weak, (list, tuple)):
            raise TypeError(f"kd_on_weak must be a tuple of temperatures, got {type(kd_on_weak).__name__}")
        self.kd_on_weak = tuple(_check_float("kd_on_weak", t, 0, lo_open=True) for t in kd_on_weak)

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)], temperatures=list(self.temperatures),
                                       percentile=self.percentile),
                      parts=("mlkd_instance", "mlkd_class_batch"))
        if not self.strong_view:
            return
        strong = plan.ref(0) + (1,), plan.ref(1) + (1,)
        common = dict(warmup_epochs=self.warmup_epochs, stop_epoch=self.stop_epoch)
        plan.add_term(self, dict(kind=_KINDS["ce"], weight=self.strong_ce, a=strong[0]), label="mlkd_strong_ce")
        for T in self.temperatures:
            a, t = (plan.ref(0), plan.ref(1)) if T in self.kd_on_weak else strong
            plan.add_term(self, dict(kind=_KINDS["kd"], weight=self.weight, a=a, src=[t], T=T, **common),
                          label=f"mlkd_kd_T{T:g}")

    def _options(self):
        d = dict(super()._options(), temperatures=self.temperatures, percentile=self.percentile)
        if self.strong_view:
            d["strong_view"] = True
            if self.strong_ce != 0.1:
                d["strong_ce"] = self.strong_ce
            if self.kd_on_weak != (2.0, 6.0):
                d["kd_on_weak"] = self.kd_on_weak
        return d


class LogitMSE(_LogitLoss):
    """Logit regression (Ba & Caruana): mean over N*V of (z_s - z_t)^2 (F.mse_loss); default
    weight 1 (method='mse' adds CE 1)."""
    kind, label = "mse", "logit_mse"

    def _add(self, plan):
        plan.add_term(self, self._base(a=plan.ref(0), src=[plan.ref(1)]))


class Hint(Loss):
    """Feature regression: mean of (r(f_s) - f_t)^2 over a student tap passed through a
    connector r and a teacher tap of the connector's output shape (F.mse_loss).

    student_tap / teacher_tap: tap names (default: the models' hint layer, f2).
    connector: a kdcore Module mapping the student map to the teacher map's shape, or
    'convreg' (RepDistiller's ConvReg: conv + BN + ReLU chosen by the spatial ratio),
    'conv1x1' (1x1 conv + BN) or None (the maps already match). Default weight 100, FitNet's
    (RepDistiller)."""
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


class _ConnectorStages(_FeatureLoss):
    """Per-stage terms between a connector on the student tap and the teacher tap, each
    stage with its own factor on the weight."""

    def _stage_factors(self, n):
        return [1.0] * n

    def _pairs_with_factors(self, plan):
        pairs = self._pairs(plan)
        return list(zip(pairs, self._stage_factors(len(pairs))))


class OFD(_ConnectorStages):
    """Overhaul of feature distillation (Heo et al.; mdistiller): per stage, the student's
    pre-ReLU map through a 1x1 conv + BN connector against the teacher's pre-ReLU map clamped
    below at its per-channel margin m_c = E[x | x < 0] of x ~ N(beta_c, gamma_c^2) (from the
    teacher's BN before the ReLU), partial L2 (0 where the student is below a non-positive
    target), sum / n; stage i of n weighted 1/2^(n-i-1); weight 1e-3 (mdistiller)."""
    kind, label, default = "ofd", "ofd", "stages_pre"

    def __init__(self, weight=1e-3, seed=0, **kw):
        super().__init__(weight, **kw)
        self.seed = _check_int("seed", seed, 0)

    def _stage_factors(self, n):
        return [1.0 / 2 ** (n - i - 1) for i in range(n)]

    def _add(self, plan):
        from .functional import ofd_margin
        teacher = plan.models[1]
        taps = teacher.feature_taps() or {}
        bns = taps.get("stages_bn") if self.teacher_taps is None else None
        pairs = self._pairs_with_factors(plan)
        if not bns or len(bns) != len(pairs):
            raise ValueError("OFD needs the teacher's BN layers before its stage ReLUs (feature_taps()['stages_bn']); "
                             "a model of your own can define them in model.default_taps")
        sd = teacher.state_dict()
        for k, (((s_tap, t_tap), f), bn) in enumerate(zip(pairs, bns)):
            s_ref, t_ref = plan.ref(0, s_tap), plan.ref(1, t_tap)
            key = teacher._key(teacher._graph.names[teacher._tap_index(bn)])
            margin = ofd_margin(sd[key + ".weight"], sd[key + ".bias"])
            sc, tc = plan.shape(s_ref)[0], plan.shape(t_ref)[0]
            conn = Sequential(Conv2d(sc, tc, 1, bias=False), BatchNorm2d(tc))
            conn.reset_parameters(self.seed + k)
            a = plan.add_connector(conn, s_ref, f"ofd {s_tap}")
            plan.add_term(self, dict(self._base(a=a, src=[t_ref], margin=margin), weight=self.weight * f))


class AB(_ConnectorStages):
    """Activation boundaries (Heo et al.; RepDistiller): per stage, a connector (conv + BN,
    RepDistiller's ConvReg without its ReLU) on the student's pre-ReLU map, hinge-squared
    against the sign of the teacher's pre-ReLU map with margin 1, sum / n; stage i of n
    weighted 2^(i-n+1), times 3/1000. An initialisation phase (RepDistiller: 30 epochs), then
    CE alone: method='ab'."""
    kind, label, default = "ab", "ab", "stages_pre"

    def __init__(self, weight=3e-3, margin=1.0, seed=0, **kw):
        super().__init__(weight, **kw)
        self.margin = _check_float("margin", margin, 0)
        self.seed = _check_int("seed", seed, 0)

    def _stage_factors(self, n):
        return [2.0 ** (i - n + 1) for i in range(n)]

    def _add(self, plan):
        for k, ((s_tap, t_tap), f) in enumerate(self._pairs_with_factors(plan)):
            s_ref, t_ref = plan.ref(0, s_tap), plan.ref(1, t_tap)
            conn = connector("convreg", plan.shape(s_ref), plan.shape(t_ref), relu=False)
            conn.reset_parameters(self.seed + k)
            a = plan.add_connector(conn, s_ref, f"ab {s_tap}")
            plan.add_term(self, dict(self._base(a=a, src=[t_ref], margin=self.margin), weight=self.weight * f))

    def _options(self):
        return dict(super()._options(), margin=self.margin)


class VID(_ConnectorStages):
    """Variational information distillation (Ahn et al.; RepDistiller): per stage a regressor
    mu (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv to the teacher's channels) on the student
    map, and learned per-channel variances softplus(log_scale) + eps (initial variance 5);
    loss = mean of (log sigma^2 + (mu - t)^2 / sigma^2) / 2; weight 1 per stage f1..f3. The
    maps must have equal spatial sizes (RepDistiller pools the larger student map first)."""
    kind, label, default = "vid", "vid", "stages"

    def __init__(self, weight=1.0, init_var=5.0, eps=1e-5, seed=0, **kw):
        super().__init__(weight, **kw)
        self.init_var = _check_float("init_var", init_var, 0, lo_open=True)
        self.eps = _check_float("eps", eps, 0, lo_open=True)
        self.seed = _check_int("seed", seed, 0)

    def _add(self, plan):
        from .functional import vid_log_scale
        for k, (s_tap, t_tap) in enumerate(self._pairs(plan)):
            s_ref, t_ref = plan.ref(0, s_tap), plan.ref(1, t_tap)
            (sc, sh, sw), (tc, th, tw) = plan.shape(s_ref), plan.shape(t_ref)
            if (sh, sw) != (th, tw):
                raise ValueError(f"VID: the student map at {s_tap!r} is {sh}x{sw}, the teacher's at {t_tap!r} "
                                 f"{th}x{tw}; choose taps of equal spatial size")
            reg = Sequential(Conv2d(sc, tc, 1, bias=False), ReLU(), Conv2d(tc, tc, 1, bias=False), ReLU(),
                             Conv2d(tc, tc, 1, bias=False))
            reg.reset_parameters(self.seed + k)
            a = plan.add_connector(reg, s_ref, f"vid regressor {s_tap}")
            holder = Sequential(Linear(1, tc, bias=False))   # the tc variances' parameters
            holder.parameters()["0.weight"][...] = vid_log_scale(tc, self.init_var, self.eps)[:, None]
            h = plan.add_params(holder, f"vid log_scale {t_tap}")
            plan.add_term(self, self._base(a=a, src=[t_ref], params=h, eps=self.eps))

    def _options(self):
        return dict(super()._options(), init_var=self.init_var, eps=self.eps)


class CC(_FeatureLoss):
    """Correlation congruence (Peng et al.; RepDistiller's form from the authors' code): the
    pooled features f4 of student and teacher each through a trainable Linear(d -> 128);
    loss = mean over consecutive samples of sum_d |e_s - e_t|_i,d |e_s - e_t|_i+1,d; weight
    0.02 (RepDistiller). (The paper's Gaussian-kernel correlation matrices are another loss.)"""
    kind, label, default = "cc", "cc", "pooled"

    def __init__(self, weight=0.02, dim=128, seed=0, **kw):
        super().__init__(weight, **kw)
        self.dim = _check_int("dim", dim, 1)
        self.seed = _check_int("seed", seed, 0)

    def _embeds(self, plan, s_tap, t_tap, tag):
        s_ref, t_ref = plan.ref(0, s_tap), plan.ref(1, t_tap)
        (sc, sh, sw), (tc, th, tw) = plan.shape(s_ref), plan.shape(t_ref)
        if sh * sw > 1 or th * tw > 1:
            raise ValueError(f"{tag}: the taps must be flat features (the pooled f4), got {plan.shape(s_ref)} and "
                             f"{plan.shape(t_ref)}")
        es, et = Sequential(Linear(sc, self.dim)), Sequential(Linear(tc, self.dim))
        es.reset_parameters(self.seed)
        et.reset_parameters(self.seed + 1)
        return plan.add_connector(es, s_ref, f"{tag} student embed"), plan.add_connector(et, t_ref, f"{tag} teacher embed")

    def _add(self, plan):
        for s_tap, t_tap in self._pairs(plan):
            a, b = self._embeds(plan, s_tap, t_tap, "cc")
            plan.add_term(self, self._base(a=a, src=[b], grad=True))

    def _options(self):
        return dict(super()._options(), dim=self.dim)


class CRD(CC):
    """Contrastive representation distillation (Tian et al.; RepDistiller): the pooled
    features f4 through trainable Linear(d -> 128) + L2 normalisation on each side; NCE
    against two memory banks of the data set's size (n_data x 128 each, momentum 0.5,
    temperature 0.07, n_neg negatives per sample from the other samples -- or, with
    class_negatives, from other classes as RepDistiller's default); weight 0.8 (CE 1).
    RepDistiller draws 16384 negatives, the default here too and the dominant cost of a CPU
    step (choose fewer, or in_batch=True for in-batch negatives and no banks). The banks are
    saved in checkpoints."""
    kind, label = "crd", "crd"

    def __init__(self, weight=0.8, dim=128, n_neg=16384, T=0.07, momentum=0.5, class_negatives=False,
                 in_batch=False, seed=0, **kw):
        super().__init__(weight, dim=dim, seed=seed, **kw)
        self.n_neg = _check_int("n_neg", n_neg, 1)
        self.T = _check_float("T", T, 0, lo_open=True)
        self.momentum = _check_float("momentum", momentum, 0, 1, hi_open=True)
        self.class_negatives = _check_bool("class_negatives", class_negatives)
        self.in_batch = _check_bool("in_batch", in_batch)

    def _add(self, plan):
        from .functional import CRDBank
        for s_tap, t_tap in self._pairs(plan):
            a, b = self._embeds(plan, s_tap, t_tap, "crd")
            bank = CRDBank(plan.n_data, dim=self.dim, n_neg=self.n_neg, T=self.T, momentum=self.momentum,
                           seed=self.seed, in_batch=self.in_batch)
            if self.class_negatives:
                bank.set_labels(plan.labels_of_data)
            plan.add_state(f"crd{len(plan.states)}", bank._c)
            plan.add_term(self, self._base(a=a, src=[b], grad=True, bank=bank._c,
                                           class_negatives=self.class_negatives))

    def _options(self):
        return dict(super()._options(), n_neg=self.n_neg, T=self.T, momentum=self.momentum,
                    class_negatives=self.class_negatives, in_batch=self.in_batch)


class FT(_FeatureLoss):
    """Factor transfer (Kim et al.; RepDistiller): a paraphraser (conv auto-encoder, factor
    rate 0.5) is first trained to reconstruct the teacher's last stage map f3 (the
    initialisation phase: the student does not train); then a translator on the student's f3
    learns the paraphraser's factor: loss = mean |F_s - F_t|^p2 of the L2-normalised channel
    means of the factors^p1 (p1 2, p2 1); weight 200 (CE 1). Deviation: RepDistiller's
    paraphraser and translator use LeakyReLU(0.1) and transposed convolutions; kdcore has
    ReLU and (equivalent at stride 1) convolutions."""
    kind, label, default = "ft", "ft", "stages"
    needs_init = True

    def __init__(self, weight=200.0, rate=0.5, p1=2, p2=1.0, seed=0, **kw):
        super().__init__(weight, **kw)
        self.rate = _check_float("rate", rate, 0, lo_open=True)
        self.p1 = _check_int("p1", p1, 1)
        self.p2 = _check_float("p2", p2, 0, lo_open=True)
        self.seed = _check_int("seed", seed, 0)
        self._para = None

    def _pairs(self, plan):
        pairs = super()._pairs(plan)
        return pairs if self.taps is not None else pairs[-1:]

    def _add(self, plan):
        (s_tap, t_tap), = self._pairs(plan)
        s_ref, t_ref = plan.ref(0, s_tap), plan.ref(1, t_tap)
        sc, tc = plan.shape(s_ref)[0], plan.shape(t_ref)[0]
        fc = max(1, int(tc * self.rate))
        if self._para is None:   # kept across the phases: trained in 'init', frozen after
            self._para = Sequential(Conv2d(tc, tc, 3, padding=1), ReLU(), Conv2d(tc, fc, 3, padding=1), ReLU(),
                                    Conv2d(fc, fc, 3, padding=1), ReLU(),      # encoder: the factor is node 5
                                    Conv2d(fc, fc, 3, padding=1), ReLU(), Conv2d(fc, tc, 3, padding=1), ReLU(),
                                    Conv2d(tc, tc, 3, padding=1))
            self._para.reset_parameters(self.seed)
        if plan.phase == "init":
            p = plan.add_connector(self._para, t_ref, "ft paraphraser")
            plan.add_term(self, dict(kind=_KINDS["mse"], a=p, src=[t_ref], weight=1.0), label="ft_reconstruction")
            return
        para = plan.add_connector(self._para, t_ref, "ft paraphraser (frozen)", trained=False)
        tr = Sequential(Conv2d(sc, sc, 3, padding=1), ReLU(), Conv2d(sc, fc, 3, padding=1), ReLU(),
                        Conv2d(fc, fc, 3, padding=1), ReLU())
        tr.reset_parameters(self.seed + 1)
        a = plan.add_connector(tr, s_ref, "ft translator")
        plan.add_term(self, self._base(a=a, src=[(para[0], 5)], p1=self.p1, p2=self.p2))

    def _options(self):
        return dict(super()._options(), rate=self.rate, p1=self.p1, p2=self.p2)


class ReviewFusion(Module):
    """ReviewKD's attention-based fusion (ABF, Chen et al. 2021; mdistiller's ABF modules) as
    one connector over several student maps, listed deepest first: ``in_channels``, ``sizes``
    ((h, w) per map), and the teacher maps it is compared with, ``out_channels`` and
    ``out_sizes``. The deepest map is the net's input; every other map is an extra input
    node (``abf<k>.input``, k = 1, 2, ...), given by the step engine. Level k:

        x = BN(conv1x1(map_k -> mid))                        (abf<k>.conv1.0, .conv1.1)
        k > 0:  y = nearest(residual_{k-1}, size_k); z = cat(x, y)
                x = x * sigmoid(conv1x1_a(z)) + y * sigmoid(conv1x1_b(z))   (abf<k>.att_conv.a/b)
        x resized (nearest) to out_size_k when it differs;  residual_k = x
        out_k = BN(conv3x3(x -> out_channels_k))             (abf<k>.conv2.0, .conv2.1: a tap)

    mdistiller's attention conv has two output channels; here it is two one-channel convs
    (``att_conv.a`` holds its first row, ``att_conv.b`` the second: the same function).
    conv1 and conv2 are initialised as mdistiller's kaiming_uniform_(a=1), U(+-sqrt(3/fan_in))."""

    def __init__(self, in_channels, sizes, out_channels, out_sizes, mid_channels):
        super().__init__()
        n = len(in_channels)
        if n < 1 or not (len(sizes) == len(out_channels) == len(out_sizes) == n):
            raise ValueError("in_channels, sizes, out_channels and out_sizes must be lists of one length >= 1")
        self.in_channels = [_check_int("in_channels", c, 1) for c in in_channels]
        self.out_channels = [_check_int("out_channels", c, 1) for c in out_channels]
        self.sizes = [tuple(_check_int("sizes", v, 1) for v in hw) for hw in sizes]
        self.out_sizes = [tuple(_check_int("out_sizes", v, 1) for v in hw) for hw in out_sizes]
        self.mid_channels = _check_int("mid_channels", mid_channels, 1)

    def level_taps(self):
        """The output tap of every level, deepest first."""
        return [f"abf{k}.conv2.1" for k in range(len(self.in_channels))]

    def input_taps(self):
        """The extra input nodes, for maps 1, 2, ... (map 0 is the net's input)."""
        return [f"abf{k}.input" for k in range(1, len(self.in_channels))]

    def _emit(self, g, x, prefix):
        mid, res, out = self.mid_channels, None, x
        for k, (cin, size, cout, osize) in enumerate(zip(self.in_channels, self.sizes, self.out_channels,
                                                        self.out_sizes)):
            p = _join(prefix, f"abf{k}")
            inp = x if k == 0 else g.add(_INPUT_NODE, f"{p}.input", [], in_ch=cin)
            h = g.add(_CONV2D, f"{p}.conv1.0", [inp], in_ch=cin, out_ch=mid, kernel=1, bias=False)
            h = g.add(_BATCHNORM, f"{p}.conv1.1", [h], in_ch=mid)
            if k > 0:
                y = g.add(_UPSAMPLE, f"{p}.upsample", [res], size=size)
                z = g.add(_CONCAT, f"{p}.cat", [h, y])
                att = [g.add(_SIGMOID, f"{p}.att_{c}", [g.add(_CONV2D, f"{p}.att_conv.{c}", [z], in_ch=2 * mid, out_ch=1,
                                                                  kernel=1)]) for c in "ab"]
                h = g.add(_ADD, f"{p}.fuse", [g.add(_MUL, f"{p}.att_x", [h, att[0]]),
                                              g.add(_MUL, f"{p}.att_y", [y, att[1]])])
            if osize != size:
                h = g.add(_UPSAMPLE, f"{p}.resize", [h], size=osize)
            res = h
            out = g.add(_CONV2D, f"{p}.conv2.0", [h], in_ch=mid, out_ch=cout, kernel=3, padding=1, bias=False)
            out = g.add(_BATCHNORM, f"{p}.conv2.1", [out], in_ch=cout)
        return out

    def reset_parameters(self, seed=0):
        super().reset_parameters(seed)
        for name, w in self.named_parameters():
            if (".conv1.0." in name or ".conv2.0." in name) and name.endswith("weight"):
                w *= 3.0 ** 0.5   # U(+-1/sqrt(fan_in)) -> kaiming_uniform_(a=1)
        return self

    def _describe(self):
        return (f"in_channels={self.in_channels}, sizes={self.sizes}, out_channels={self.out_channels}, "
                f"out_sizes={self.out_sizes}, mid_channels={self.mid_channels}")


class ReviewKD(Loss):
    """ReviewKD (Chen et al. 2021, "Distilling knowledge via knowledge review"; mdistiller's
    form): the student's stage maps and pooled feature (default taps: ``stages`` + ``pooled``,
    post-activation as mdistiller's CIFAR recipe) go through one ``ReviewFusion`` connector,
    deepest first, each fused with the residual of the level below it; each level's output is
    compared with the teacher's map (``stages_pre`` + ``pooled``) by the hierarchical context
    loss (kdcore.functional.hcl_loss: MSE at full size plus MSE of 4x4, 2x2, 1x1 average pools
    smaller than the map, weights halving, normalised). Loss = weight * sum over levels.
    mdistiller: weight 1 (5 for resnet32x4 -> resnet8x4), a 20-epoch linear warm-up, CE
    weight 1, mid channels min(512, the student's pooled channels)."""
    kind, label = "hcl", "reviewkd"

    def __init__(self, weight=1.0, warmup_epochs=20, taps=None, teacher_taps=None, max_mid_channels=512, seed=0,
                 **kw):
        super().__init__(weight, warmup_epochs=warmup_epochs, **kw)
        self.taps = None if taps is None else _tap_list("taps", taps)
        self.teacher_taps = None if teacher_taps is None else _tap_list("teacher_taps", teacher_taps)
        self.max_mid_channels = _check_int("max_mid_channels", max_mid_channels, 1)
        self.seed = _check_int("seed", seed, 0)

    def _taps(self, plan, who, given, keys):
        if given is not None:
            return given
        out = []
        for key in keys:
            t = plan.default_tap(who, key)
            out += list(t) if isinstance(t, (list, tuple)) else [t]
        return out

    def _add(self, plan):
        s_taps = self._taps(plan, 0, self.taps, ("stages", "pooled"))
        t_taps = self._taps(plan, 1, self.teacher_taps, ("stages_pre", "pooled"))
        if len(s_taps) != len(t_taps):
            raise ValueError(f"ReviewKD: {len(s_taps)} student taps {s_taps} but {len(t_taps)} teacher taps {t_taps}")
        s_refs = [plan.ref(0, t) for t in s_taps][::-1]   # deepest first
        t_refs = [plan.ref(1, t) for t in t_taps][::-1]
        s_sh, t_sh = [plan.shape(r) for r in s_refs], [plan.shape(r) for r in t_refs]
        fusion = ReviewFusion([c for c, _, _ in s_sh], [(h, w) for _, h, w in s_sh], [c for c, _, _ in t_sh],
                              [(h, w) for _, h, w in t_sh], min(self.max_mid_channels, s_sh[0][0]))
        fusion.reset_parameters(self.seed)
        ref = plan.add_connector(fusion, s_refs[0], "reviewkd fusion", inputs=s_refs[1:])
        for k, (tap, t_ref) in enumerate(zip(fusion.level_taps(), t_refs)):
            plan.add_term(self, self._base(a=(ref[0], fusion._tap_index(tap)), src=[t_ref]))

    def _options(self):
        d = dict(super()._options())
        if self.taps is not None:
            d["taps"] = self.taps
        if self.teacher_taps is not None:
            d["teacher_taps"] = self.teacher_taps
        return d


def connector(kind, s_shape, t_shape, relu=True):
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
    return Sequential(conv, BatchNorm2d(tc), ReLU()) if relu else Sequential(conv, BatchNorm2d(tc))


# Each method's reference recipe: the terms and weights of RepDistiller / mdistiller (the
# README's method table gives the formulas and which library each form follows).
METHODS = {
    "ce": lambda: [CE(1.0)],
    "kd": lambda: [CE(0.1), KD(0.9, T=4.0)],
    "kd+ls": lambda: [CE(0.1), KD(9.0, T=2.0, standardize=True)],
    "dkd": lambda: [CE(1.0), DKD(1.0)],
    "mse": lambda: [CE(1.0), LogitMSE(1.0)],
    "dist": lambda: [CE(1.0), DIST(1.0)],
    "normkd": lambda: [CE(0.1), NormKD(0.9, t_norm=2.0)],
    "wttm": lambda: [CE(1.0), WTTM(4.0, gamma=0.2)],
    "ctkd": lambda: [CE(0.1), CTKD(0.9)],
    "mlkd": lambda: [CE(0.1), MLKD(0.9, strong_view=True)],
    "fitnet": lambda: [CE(1.0), FitNet(100.0)],
    "at": lambda: [CE(1.0), AT(1000.0)],
    "sp": lambda: [CE(1.0), SP(3000.0)],
    "nst": lambda: [CE(1.0), NST(50.0)],
    "rkd": lambda: [CE(1.0), RKD(1.0)],
    "pkt": lambda: [CE(1.0), PKT(30000.0)],
    "ofd": lambda: [CE(1.0), OFD(1e-3)],
    "vid": lambda: [CE(1.0), VID(1.0)],
    "cc": lambda: [CE(1.0), CC(0.02)],
    "crd": lambda: [CE(1.0), CRD(0.8)],
    "crd+kd": lambda: [CE(1.0), KD(1.0, T=4.0), CRD(0.8)],
    "reviewkd": lambda: [CE(1.0), ReviewKD(1.0)],
    # Initialisation-phase methods (RepDistiller): the term alone for init_epochs, then CE
    # (FT: the paraphraser's training, then CE + the factor term).
    "fsp": lambda: [CE(1.0, phase="main"), FSP(50.0, phase="init")],
    "ab": lambda: [CE(1.0, phase="main"), AB(3e-3, phase="init")],
    "ft": lambda: [CE(1.0, phase="main"), FT(200.0)],
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

    def __init__(self, student, teachers, data, phase="all"):
        self.models = [student] + list(teachers)
        self.chw = _chw(data)
        self.n_data = len(data)
        self.labels_of_data = data.y
        self.phase = phase         # 'init' (an initialisation phase), 'main' (after one) or 'all'
        self.connectors = []       # (module, input ref or None for a parameter holder, description, trained)
        self.extra_inputs = {}     # connector index -> refs feeding its extra input nodes (ReviewKD)
        self.detached = set()      # connector indices whose input gets no gradient back (CTKD's temperature net)
        self.terms = []            # C term dicts
        self.labels = []           # (History key, parts keys)
        self.states = {}           # name -> C state with a views() method (CRD banks), checkpointed
        self.logs = []             # callables epoch -> dict of History values (CTKD's temperature)
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
                conn, src, _, _ = self.connectors[who - len(self.models)]
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

    def add_connector(self, module, src, what, trained=True, inputs=(), detach=False):
        """A net reading `src` (a (net, node) reference), trained with the student unless
        trained=False; `inputs` feed its extra input nodes, in node order; detach=True: no
        gradient goes back through it to the net it reads. Returns the reference of its
        output."""
        if not isinstance(module, Module):
            raise TypeError(f"a connector must be a kdcore Module, got {type(module).__name__}")
        if inputs:
            nodes = [i for i, k in enumerate(module._graph_kinds()) if k == _INPUT_NODE]
            if len(nodes) != len(inputs):
                raise ValueError(f"{what}: {len(inputs)} extra inputs for {len(nodes)} input nodes")
            for node, r in zip(nodes, inputs):
                module.net.set_input(node, self.shape(r))
            self.extra_inputs[len(self.connectors)] = list(inputs)
        if detach:
            self.detached.add(len(self.connectors))
        self.connectors.append((module, src, what, trained))
        return (len(self.models) + len(self.connectors) - 1, -1)

    def add_params(self, module, what):
        """A parameter holder (no forward): a term's own trained parameters; returns its index."""
        self.connectors.append((module, None, what, True))
        return len(self.models) + len(self.connectors) - 1

    def add_log(self, fn):
        """A callable epoch -> dict of values the History logs after each epoch."""
        self.logs.append(fn)

    def add_state(self, name, obj):
        self.states[name] = obj

    def add_term(self, loss, term, parts=(), label=None):
        label = label or loss.label
        used = {lab for lab, _ in self.labels}
        k = 2
        while label in used:
            label = f"{loss.label}_{k}"
            k += 1
        self.terms.append(term)
        self.labels.append((label, tuple(f"{label}_{p}" if label != loss.label else p for p in parts)))

    def reads_teacher_taps(self):
        refs = [t["a"] for t in self.terms] + [s for t in self.terms for s in t.get("src", [])]
        refs += [src for _, src, _, _ in self.connectors if src is not None]
        refs += [r for rs in self.extra_inputs.values() for r in rs]
        return any(r[0] >= 1 and r[0] < len(self.models) and r[1] >= 0 for r in refs)

    def views(self):
        """Per model (student, teachers) the bit mask of the views its terms read (view 0 always,
        the view of the monitor and of every term's default)."""
        v = [1] * len(self.models)
        refs = [t["a"] for t in self.terms] + [s for t in self.terms for s in t.get("src", [])]
        refs += [t["a2"] for t in self.terms if "a2" in t]
        for r in refs:
            if len(r) > 2 and r[0] < len(self.models):
                v[r[0]] |= 1 << r[2]
        return v

    def reads_student(self):
        refs = [t["a"] for t in self.terms] + [s for t in self.terms for s in t.get("src", [])]
        refs += [t["a2"] for t in self.terms if "a2" in t]
        refs += [src for _, src, _, _ in self.connectors if src is not None]
        refs += [r for rs in self.extra_inputs.values() for r in rs]
        return any(r[0] == 0 for r in refs)


def check_losses(losses):
    """A non-empty list of Loss terms, as a list."""
    if not isinstance(losses, (list, tuple)) or not losses:
        raise TypeError("losses must be a non-empty list of kdcore.losses terms")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Loss):
            raise TypeError(f"losses[{i}] must be a kdcore.losses term (CE, KD, AT, ...), got {type(loss).__name__}")
    return list(losses)


def build_plan(student, teachers, data, losses, phase="all"):
    """The plan of a list of Loss terms (validated: types, taps, connector shapes)."""
    plan = _Plan(student, teachers, data, phase)
    for loss in check_losses(losses):
        loss._add(plan)
    return plan
