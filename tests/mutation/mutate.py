#!/usr/bin/env python3
"""Mutation check of the training schemes' options and of the step engine that runs them:
breaks each on purpose, in a copy of the repository, and reports which tests notice.

Since the loops became one step engine (kd_step_epoch in kdcore/src/train.c) and every scheme
a configuration of it (kdcore/src/schemes.c), an option's bug lives either in the engine
(term_run, source_weights, source_pred, update_gates, kd_term_weight_, the runner) or in the
scheme's configuration; where one shared engine line implements an option for every scheme
(the CE term's label smoothing), per-scheme mutations restrict the bug to that scheme (L->fn)
so that each scheme's test is shown to check it. The last group breaks the engine itself
(connectors, source gradients, gradient slots, parameter holders, CRD state, skip mode).
The logit-methods group breaks the mechanism of NormKD's and WTTM's losses (losses.c) and
CTKD's gradient reversal and curriculum (train.c), DeepInversion's BN-statistics term
(train.c, losses_feat.c), and MLKD's masks and batch-level gradient (losses.c). The adversarial
data-free group breaks the step cycle (phases, cycle_batch, per-phase term means), reversed
terms, gradient clipping and the L1 loss that DFAD and ZSKT run on. The adversarial KD group
breaks the twin net (its shared parameters and gradient) and the BCE loss. The metrics group breaks kdcore.metrics
(Python only, no rebuild), and the data-free checkpoints group what DAFL's, DFAD's, ZSKT's and
DeepInversion's checkpoints save and restore (Python only).

For every mutation in MUTATIONS below: copy the repository (the files `git ls-files` lists,
untracked ones not ignored included) into a temporary directory, replace the mutation's `old`
snippet (it must occur exactly once; otherwise the mutation is reported NOT APPLIED), rebuild
the extension in place when a C file changed, run the mutation's tests there (PYTHONPATH =
the copy's python/, OMP_NUM_THREADS=1) and record which of them fail. The unmutated copy is
built and its tests run first: they must all pass, or a "caught" would mean nothing.

Exit status 0 only when every selected mutation applied, built and was caught.

    python tests/mutation/mutate.py               # everything (make mutate; ~30 minutes)
    python tests/mutation/mutate.py --list        # names, files, tests
    python tests/mutation/mutate.py --check       # only: does every snippet apply exactly once?
    python tests/mutation/mutate.py --only NAME [--only NAME2 ...]

When the engine or the schemes are rewritten, re-point the snippets (`--check` lists the
ones that no longer apply); each mutation's `what` says which behaviour it breaks, so the new
snippet is the code that implements that behaviour now.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = "kdcore/src/train.c"
TERMS = "kdcore/src/terms.c"
SCHEMES_C = "kdcore/src/schemes.c"
DISTILL = "python/kdcore/distill.py"
SCHEMES = "python/kdcore/schemes.py"
TRAINING = "python/kdcore/training.py"

LOOP = "tests/test_loop_options_torch.py"
STAGES = "tests/test_scheme_stages_torch.py"
SCHEMES_TORCH = "tests/test_schemes_torch.py"
API = "tests/test_distill_api.py"
ENGINE = "tests/test_step_engine.py"
FEATURE = "tests/test_feature_methods_torch.py"
CONN = "tests/test_connector_methods_torch.py"
LOSSES_API = "tests/test_losses_api.py"
NONFINITE = "tests/test_nonfinite.py"
DEEPINV = "tests/test_deepinversion_torch.py"
REVIEWKD = "tests/test_reviewkd_torch.py"
METRICS = "python/kdcore/metrics.py"
METRICS_T = "tests/test_metrics.py"
LOSSES_C = "kdcore/src/losses.c"
LOGIT = "tests/test_logit_methods_torch.py"
CTKD = "tests/test_ctkd_torch.py"
ADV = "tests/test_adversarial_datafree_torch.py"
DATAFREE = "python/kdcore/datafree.py"
MLKD_T = "tests/test_mlkd_torch.py"
ADV_KD = "tests/test_adversarial_kd_torch.py"
RESUME = "tests/test_datafree_resume.py"
WINO = "kdcore/src/winograd.c"
WINO_T = "tests/test_winograd.py"
LAYERS_TORCH = "tests/test_layers_torch.py"


def t(path, *names):
    """Pytest node ids: path::name for each name (all parametrizations of it)."""
    return [f"{path}::{n}" for n in names]


# Each mutation: name, file, old (exact snippet, must occur once), new, what (the behaviour it
# breaks), tests (pytest node ids or paths, run in the mutated copy; any failure = caught).
MUTATIONS = [
    # ---- label smoothing inside every scheme. Every scheme's CE is the engine's CE term
    # (pair_ce reads the train cfg's label smoothing): ls_off_distill breaks it for all;
    # the per-scheme mutations break it only where the engine runs that scheme (L->fn names
    # the public epoch function), so each scheme's own test is shown to check it.
    dict(name="ls_off_distill", file=TERMS, what="the engine's CE term without label smoothing (every scheme)",
         old="return kd_cross_entropy(&p->value, p->da, p->a, p->y, NULL, p->nb, p->ac, p->smooth, p->w, true);",
         new="return kd_cross_entropy(&p->value, p->da, p->a, p->y, NULL, p->nb, p->ac, 0.0f, p->w, true);",
         tests=t(LOOP, "test_distill_label_smoothing") + t(STAGES, "test_fit_and_distill_pass_label_smoothing")),
    # The old loop computed a separate plain CE to report under conditional learning; the
    # engine reports the CE term's own value, so that path is gone. The closest real bug:
    # the CE that conditional learning adds where the teacher is wrong (the moved KD weight)
    # without label smoothing.
    dict(name="ls_off_conditional_reported_ce", file=TRAIN,
         what="conditional learning: the teacher-wrong samples' CE (the moved KD weight) without label smoothing",
         old="kd_cross_entropy(&ce, da, a, L->y, wrong, nb, V, smooth, w, true)",
         new="kd_cross_entropy(&ce, da, a, L->y, wrong, nb, V, 0.0f, w, true)",
         tests=t(LOOP, "test_distill_label_smoothing")),
    dict(name="ls_off_mutual", file=TRAIN, what="mutual learning: the peers' CE without label smoothing",
         old="const float smooth = L->cfg->label_smoothing;",
         new='const float smooth = strcmp(L->fn, "kd_mutual_epoch") == 0 ? 0.0f : L->cfg->label_smoothing;',
         tests=t(LOOP, "test_mutual_k_peers") + t(STAGES, "test_mutual_entry_point")),
    dict(name="ls_off_slkd_student", file=TRAIN, what="SLKD: the student's CE without label smoothing",
         old="const float smooth = L->cfg->label_smoothing;",
         new='const float smooth = strcmp(L->fn, "kd_slkd_epoch") == 0 && t->a.net == 0 ? 0.0f\n'
             '                                                                         : L->cfg->label_smoothing;',
         tests=t(LOOP, "test_slkd_options") + t(STAGES, "test_slkd_sequential_replay")),
    dict(name="ls_off_slkd_sl", file=TRAIN, what="SLKD: the SL-teachers' CE without label smoothing",
         old="const float smooth = L->cfg->label_smoothing;",
         new='const float smooth = strcmp(L->fn, "kd_slkd_epoch") == 0 && t->a.net >= 2 ? 0.0f\n'
             '                                                                         : L->cfg->label_smoothing;',
         tests=t(LOOP, "test_slkd_options") + t(STAGES, "test_slkd_parallel_sl_optimizer")),
    dict(name="ls_off_exits", file=TRAIN, what="multi-exit: the exits' CE without label smoothing",
         old="const float smooth = L->cfg->label_smoothing;",
         new='const float smooth = strcmp(L->fn, "kd_exits_epoch") == 0 ? 0.0f : L->cfg->label_smoothing;',
         tests=t(LOOP, "test_multi_exit") + t(STAGES, "test_multi_exit_defaults")),
    dict(name="ls_not_passed_by_python", file=TRAINING, what="Python: label_smoothing not handed to the C loops",
         old="label_smoothing=label_smoothing, callback=bar,", new="label_smoothing=0.0, callback=bar,",
         tests=t(STAGES, "test_fit_and_distill_pass_label_smoothing", "test_mutual_entry_point")),

    # ---- DGKD's teacher drop: the engine's source weights (source_weights)
    dict(name="teacher_drop_inverted", file=TRAIN, what="each teacher dropped with probability 1 - p",
         old="kd_uniform(kd_hash(sseed ^ 0xD509ull, (uint64_t)t)) < s->drop;",
         new="kd_uniform(kd_hash(sseed ^ 0xD509ull, (uint64_t)t)) >= s->drop;",
         tests=t(LOOP, "test_teacher_drop_rate", "test_teacher_drop_keeps_one")),
    dict(name="teacher_drop_one_draw", file=TRAIN, what="one random draw drops all teachers or none",
         old="kd_uniform(kd_hash(sseed ^ 0xD509ull, (uint64_t)t))", new="kd_uniform(kd_hash(sseed ^ 0xD509ull, 0))",
         tests=t(LOOP, "test_teacher_drop_rate")),
    dict(name="teacher_drop_keep_one_removed", file=TRAIN, what="a step may drop every teacher",
         old="if (weighted > 0 && kept == 0) {", new="if (0) {",
         tests=t(LOOP, "test_teacher_drop_keeps_one", "test_teacher_drop_rate")),
    dict(name="teacher_drop_keep_one_always_first", file=TRAIN,
         what="when all are dropped, always the first teacher is kept",
         old="int pick = (int)(kd_hash(sseed, 0xD50ull) % (uint64_t)weighted);", new="int pick = 0;",
         tests=t(LOOP, "test_teacher_drop_keeps_one")),

    # ---- tolerant term (term_run), student noise (loop_noisy_input; the distill configuration)
    dict(name="tolerant_gradient_doubled", file=TERMS, what="the tolerant term's gradient doubled",
         old="kd_loss_tolerant(&p->value, p->da, p->a, p->nb, p->ac, t->k, p->w, true)",
         new="kd_loss_tolerant(&p->value, p->da, p->a, p->nb, p->ac, t->k, 2 * p->w, true)",
         tests=t(LOOP, "test_distill_tolerant") + t(STAGES, "test_born_again_stages")),
    dict(name="student_noise_doubled", file=TRAIN, what="student input noise with twice the std",
         old="buf[i] = x[i] + noise * kd_normal(seed, i);",
         new="buf[i] = x[i] + 2 * noise * kd_normal(seed, i);",
         tests=t(LOOP, "test_student_noise_exact")),
    dict(name="student_noise_replaces_input", file=TRAIN, what="the student sees the noise instead of x + noise",
         old="buf[i] = x[i] + noise * kd_normal(seed, i);", new="buf[i] = noise * kd_normal(seed, i);",
         tests=t(LOOP, "test_student_noise_exact")),
    # The noise is a per-net input option now: the distill configuration gives it to the
    # teachers too (the same step seed, so the teachers see the student's noisy input).
    dict(name="student_noise_reaches_teacher", file=SCHEMES_C, what="the teacher sees the student's noisy input",
         old='dcfg->teacher_mode, SALT_TEACHER + (uint64_t)t, "teacher");\n',
         new='dcfg->teacher_mode, SALT_TEACHER + (uint64_t)t, "teacher");\n'
             "    for (int t = 0; t < nt; t++) nets[1 + t].input_noise = dcfg->student_noise;\n",
         tests=t(LOOP, "test_student_noise_exact")),
    dict(name="student_noise_same_every_step", file=TRAIN, what="the same noise at every step and epoch",
         old="uint64_t seed = vseed ^ 0x4E015Eull;", new="uint64_t seed = 0x4E015Eull;",
         tests=t(LOOP, "test_student_noise_exact")),

    # ---- warm-up ramp, kd_stop_epoch: a term's weight schedule (kd_term_weight_)
    dict(name="warmup_ramp_off_by_one", file=TRAIN, what="DKD-style warm-up ramp one epoch ahead",
         old="epoch + 1 < t->warmup_epochs) w *= (float)(epoch + 1) / t->warmup_epochs;",
         new="epoch + 2 < t->warmup_epochs) w *= (float)(epoch + 2) / t->warmup_epochs;",
         tests=t(LOOP, "test_distill_weight_by_epoch")),
    dict(name="kd_stop_epoch_off_by_one", file=TRAIN, what="KD switched off one epoch after kd_stop_epoch",
         old="if (t->stop_epoch > 0 && epoch >= t->stop_epoch) w = 0.0f;",
         new="if (t->stop_epoch > 0 && epoch > t->stop_epoch) w = 0.0f;",
         tests=t(LOOP, "test_distill_weight_by_epoch") + t(STAGES, "test_eskd_stages")),

    # ---- conditional learning (term_run; the mixture in source_pred)
    dict(name="conditional_weight_not_moved", file=TRAIN, what="teacher wrong: the KD weight is not moved to CE",
         old="wrong[i] = right ? 0.0f : 1.0f;", new="wrong[i] = 0.0f;",
         tests=t(LOOP, "test_distill_weight_by_epoch", "test_distill_conditional_several_teachers")
         + t(SCHEMES_TORCH, "test_distill_conditional")),
    dict(name="conditional_moves_nominal_weight", file=TRAIN,
         what="teacher wrong: kd_weight moved to CE instead of this epoch's effective weight",
         old="kd_cross_entropy(&ce, da, a, L->y, wrong, nb, V, smooth, w, true)",
         new="kd_cross_entropy(&ce, da, a, L->y, wrong, nb, V, smooth, t->weight, true)",
         tests=t(LOOP, "test_distill_weight_by_epoch", "test_learned_gates_vs_autograd")),
    dict(name="conditional_first_teacher_only", file=TRAIN,
         what="several teachers: 'right' judged by the first teacher instead of the mixture",
         old="const float * zr = source_pred(E, s, gw, pred);", new="const float * zr = ref_data(E, s->ref[0]);",
         tests=t(LOOP, "test_distill_conditional_several_teachers")),
    dict(name="conditional_mixture_at_T", file=TRAIN, what="several teachers: the mixture judged at T, not T = 1",
         old="const float * zr = source_pred(E, s, gw, pred);",
         new="const float * zr = s->n == 1 ? ref_data(E, s->ref[0]) : pred;\n"
             "        for (int j = 0; s->n > 1 && j < s->n; j++) {\n"
             "            if (j == 0) memset(pred, 0, nbv * sizeof(float));\n"
             "            if (gw[j] == 0) continue;\n"
             "            kd_softmax_t(E->tmp, ref_data(E, s->ref[j]), nb, V, t->T);\n"
             "            for (size_t i = 0; i < nbv; i++) pred[i] += gw[j] * E->tmp[i];\n"
             "        }",
         tests=t(LOOP, "test_distill_conditional_several_teachers")),
    # The mixture that judges "right" is source_pred's, shared with the teacher_accuracy monitor.
    dict(name="conditional_mixture_unweighted", file=TRAIN, what="several teachers: the mixture ignores the weights",
         old="for (size_t j = 0; j < nbv; j++) out[j] += gw[t] * E->tmp[j];",
         new="for (size_t j = 0; j < nbv; j++) out[j] += E->tmp[j] / s->n;",
         tests=t(LOOP, "test_distill_conditional_several_teachers")),

    # ---- several teachers: weights (the distill configuration; the engine's loss mixing)
    dict(name="teacher_weights_ignored", file=SCHEMES_C, what="teacher_weights ignored (uniform)",
         old="for (int j = 0; j < nt && dcfg->teacher_weights; j++) t.src.w[j] = dcfg->teacher_weights[j];\n",
         new="",
         tests=t(LOOP, "test_distill_avg_loss_teacher_weights") + t(SCHEMES_TORCH, "test_distill_multi_teacher")),
    dict(name="dkd_teacher_weight_ignored", file=TRAIN, what="DKD, several teachers: each term's gradient unweighted",
         old="p.w = w * gw[j];", new="p.w = t->kind == KD_TERM_DKD ? w : w * gw[j];",
         tests=t(LOOP, "test_distill_avg_loss_teacher_weights")),
    dict(name="mse_teacher_weight_ignored", file=TRAIN, what="MSE, several teachers: each term's gradient unweighted",
         old="p.w = w * gw[j];", new="p.w = t->kind == KD_TERM_MSE ? w : w * gw[j];",
         tests=t(LOOP, "test_distill_avg_loss_teacher_weights")),
    dict(name="dkd_tckd_stat_unweighted", file=TRAIN, what="DKD, several teachers: reported TCKD unweighted",
         old="o->part[0] += gw[j] * p.part[0];", new="o->part[0] += p.part[0];",
         tests=t(LOOP, "test_distill_avg_loss_teacher_weights")),

    # ---- learned gates (update_gates and its call after the checks)
    dict(name="gate_gradient_sign", file=TRAIN, what="learned gates climb the KD loss",
         old="if (g[s] > 0) t->src.gates[s] -= (float)(t->src.gate_lr * g[s] * (G[s] - gsum));",
         new="if (g[s] > 0) t->src.gates[s] += (float)(t->src.gate_lr * g[s] * (G[s] - gsum));",
         tests=t(LOOP, "test_learned_gates_vs_autograd", "test_learned_gates_start_from_teacher_weights")
         + t(API, "test_learned_gate_gradient_matches_finite_differences")),
    dict(name="gate_no_T_squared", file=TRAIN, what="learned gates' gradient without the T^2 factor",
         old="G[s] *= (double)w * T * T / nb;", new="G[s] *= (double)w / nb;",
         tests=t(LOOP, "test_learned_gates_vs_autograd")),
    dict(name="gate_ignores_conditional_weights", file=TRAIN,
         what="learned gates' gradient ignores the conditional per-sample weights",
         old="term->conditional ? sc + 4 * E.BV : NULL, tw[t],", new="NULL, tw[t],",
         tests=t(LOOP, "test_learned_gates_vs_autograd")),
    dict(name="gate_nominal_kd_weight", file=TRAIN, what="learned gates' gradient with kd_weight, not the warm-up's",
         old="term->conditional ? sc + 4 * E.BV : NULL, tw[t],",
         new="term->conditional ? sc + 4 * E.BV : NULL, term->weight,",
         tests=t(LOOP, "test_learned_gates_vs_autograd")),
    dict(name="gate_weights_before_drop", file=TRAIN,
         what="learned gates' gradient from the weights before the drop and renormalisation",
         old="source_weights(&term->src, L.sseed, gw);\n            float * sc",
         new="struct kd_source nodrop = term->src;\n            nodrop.drop = 0;\n"
             "            source_weights(&nodrop, L.sseed, gw);\n            float * sc",
         tests=t(LOOP, "test_learned_gates_vs_autograd")),
    dict(name="gates_start_uniform", file=DISTILL,
         what="Python: learned gates start uniform, not at log(teacher_weights)",
         old="gates = np.log(np.maximum(w0, 1e-12)).astype(np.float32)",
         new="gates = np.zeros(n_teachers, np.float32)",
         tests=t(LOOP, "test_learned_gates_start_from_teacher_weights")),

    # ---- fickle teachers
    dict(name="fickle_mode_ignored", file=SCHEMES_C, what="teachers always in eval mode (fickle has no effect)",
         old='dcfg->teacher_mode, SALT_TEACHER + (uint64_t)t, "teacher");',
         new='KD_MODE_EVAL, SALT_TEACHER + (uint64_t)t, "teacher");',
         tests=t(API, "test_fickle_teacher_runs_dropout_with_frozen_bn")),

    dict(name="fickle_teacher_bn_batch", file=DISTILL, what="Python: a fickle teacher also runs BN in batch mode",
         old="teacher_mode=2 if fickle else 0,", new="teacher_mode=3 if fickle else 0,",
         tests=t(API, "test_fickle_teacher_runs_dropout_with_frozen_bn")),
    dict(name="fickle_teacher_cached", file=DISTILL, what="Python: a fickle teacher's outputs cached (eval mode)",
         old="cacheable = not c.augmented and not fickle", new="cacheable = not c.augmented",
         tests=t(API, "test_fickle_teacher_runs_dropout_with_frozen_bn")),

    # ---- method defaults
    dict(name="kd_default_weights_swapped", file=DISTILL, what="Python: KD's default CE/KD weights swapped",
         old='"kd": (0.1, 0.9, 4.0, 0)', new='"kd": (0.9, 0.1, 4.0, 0)',
         tests=t(STAGES, "test_distill_method_defaults", "test_fit_and_distill_pass_label_smoothing")),
    dict(name="dkd_default_no_warmup", file=DISTILL, what="Python: DKD without its default 20-epoch warm-up",
         old='"dkd": (1.0, 1.0, 4.0, 20)', new='"dkd": (1.0, 1.0, 4.0, 0)',
         tests=t(STAGES, "test_distill_method_defaults")),

    # ---- DML: peer a's KD term has the k - 1 other peers as a loss-mixed source of uniform
    # weights, so the division by k - 1 is the engine's normalised weight of each reference.
    dict(name="dml_kd_weight_not_divided", file=TRAIN,
         what="DML: KD gradient weight not divided by k - 1 (a loss-mixed source's per-reference gradient unweighted)",
         old="p.w = w * gw[j];", new="p.w = w;",
         tests=t(LOOP, "test_mutual_k_peers") + t(STAGES, "test_mutual_entry_point")),
    dict(name="dml_kd_stat_not_averaged", file=TRAIN,
         what="DML: reported KD summed over the other peers (a loss-mixed source's value unweighted)",
         old="o->value += gw[j] * p.value;", new="o->value += p.value;",
         tests=t(LOOP, "test_mutual_k_peers")),
    dict(name="mutual_T_not_passed", file=DISTILL, what="Python: mutual's T not handed to the loop",
         old="c.train._c, epoch, topts, T=T,\n", new="c.train._c, epoch, topts, T=1.0,\n",
         tests=t(STAGES, "test_mutual_entry_point")),

    # ---- SLKD: rho is the weight pair of the L_SLTS term's source (schemes.c); the engine
    # mixes logits (source_pred), probabilities (term_run) and shares a mixed source's gradient.
    dict(name="slkd_rho_swapped", file=SCHEMES_C, what="SLKD fusion with rho and 1 - rho swapped",
         old="if (ns == 2) { slts.src.w[0] = c->rho; slts.src.w[1] = 1 - c->rho; }",
         new="if (ns == 2) { slts.src.w[0] = 1 - c->rho; slts.src.w[1] = c->rho; }",
         tests=t(LOOP, "test_slkd_options") + t(STAGES, "test_slkd_sequential_replay")),
    # The same swap against the full-step parity test alone: its rho0.7 cases must catch it
    # (at its rho = 0.5 the swap is invisible).
    dict(name="slkd_rho_swapped_full_step", file=SCHEMES_C,
         what="SLKD fusion with rho and 1 - rho swapped (seen by the full student + SL-teacher step at rho 0.7)",
         old="if (ns == 2) { slts.src.w[0] = c->rho; slts.src.w[1] = 1 - c->rho; }",
         new="if (ns == 2) { slts.src.w[0] = 1 - c->rho; slts.src.w[1] = c->rho; }",
         tests=t(SCHEMES_TORCH, "test_slkd")),
    dict(name="slkd_rho_swapped_probs", file=TRAIN,
         what="SLKD probability fusion with rho and 1 - rho swapped (the probability mixture's weights reversed)",
         old="for (size_t i = 0; i < nbv; i++) q[i] += gw[j] * E->tmp[i];",
         new="for (size_t i = 0; i < nbv; i++) q[i] += gw[s->n - 1 - j] * E->tmp[i];",
         tests=t(LOOP, "test_slkd_options")),
    dict(name="slkd_sl_grad_shares_swapped", file=TRAIN,
         what="sl_grad: the fused gradient split 1 - rho / rho (a mixed source's gradient shares reversed)",
         old="for (size_t i = 0; i < n; i++) dj[i] += gw[j] * E->dsrc[i];",
         new="for (size_t i = 0; i < n; i++) dj[i] += gw[s->n - 1 - j] * E->dsrc[i];",
         tests=t(LOOP, "test_slkd_options")),
    dict(name="slkd_sl_lr_scale_ignored", file=TRAIN, what="SL-teachers step with the student's lr (lr_scale ignored)",
         old="kd_optim_step(c->opt, L.lr * (c->lr_scale > 0 ? c->lr_scale : 1.0f))", new="kd_optim_step(c->opt, L.lr)",
         tests=t(LOOP, "test_slkd_options") + t(STAGES, "test_slkd_parallel_sl_optimizer")),
    dict(name="slkd_frozen_in_train_mode", file=SCHEMES_C, what="frozen SL-teachers forwarded in train mode (batch BN)",
         old='frozen_net(sl[j], NULL, KD_MODE_EVAL, SALT_SL + (uint64_t)j, "SL-teacher")',
         new='frozen_net(sl[j], NULL, KD_MODE_TRAIN, SALT_SL + (uint64_t)j, "SL-teacher")',
         tests=t(LOOP, "test_slkd_options")),
    dict(name="slkd_sl_lr_scale_inverted", file=DISTILL, what="Python: sl_optimizer's lr ratio inverted",
         old='opts["sl_lr_scale"] = sl_opt.lr / c.opt.lr', new='opts["sl_lr_scale"] = c.opt.lr / sl_opt.lr',
         tests=t(STAGES, "test_slkd_parallel_sl_optimizer")),
    dict(name="slkd_star_replay_off_by_one", file=DISTILL, what="SLKD*: student epoch i replays SL epoch i + 1",
         old="trajectory[j][min(epoch, len(trajectory[j]) - 1)]",
         new="trajectory[j][min(epoch + 1, len(trajectory[j]) - 1)]",
         tests=t(STAGES, "test_slkd_sequential_replay", "test_slkd_star_snapshot_per_epoch")),
    dict(name="slkd_star_replay_lags_one", file=DISTILL,
         what="SLKD*: student epoch i replays SL epoch i - 1 (the snapshot of the epoch before)",
         old="trajectory[j][min(epoch, len(trajectory[j]) - 1)]", new="trajectory[j][max(epoch - 1, 0)]",
         tests=t(STAGES, "test_slkd_star_snapshot_per_epoch")),
    dict(name="slkd_star_final_replays_first", file=DISTILL, what="SLKD* replay='final' replays SL epoch 0",
         old='if replay == "trajectory" else final[j])', new='if replay == "trajectory" else trajectory[j][0])',
         tests=t(STAGES, "test_slkd_sequential_replay", "test_slkd_star_snapshot_per_epoch")),
    dict(name="slkd_star_final_replays_next_to_last", file=DISTILL,
         what="SLKD* replay='final' replays the snapshot before the final one",
         old='if replay == "trajectory" else final[j])', new='if replay == "trajectory" else trajectory[j][-2])',
         tests=t(STAGES, "test_slkd_star_snapshot_per_epoch")),
    dict(name="slkd_star_phase1_weights_swapped", file=DISTILL, what="SLKD* phase 1: CE and KD weights swapped",
         old="ce_weight=alpha, kd_weight=1 - alpha,", new="ce_weight=1 - alpha, kd_weight=alpha,",
         tests=t(STAGES, "test_slkd_sequential_replay")),
    dict(name="slkd_star_phase1_optimizer", file=DISTILL, what="SLKD* phase 1 ignores sl_optimizer",
         old="optimizer=sl_opt, schedule=c.sched,", new="optimizer=c.opt, schedule=c.sched,",
         tests=t(STAGES, "test_slkd_sequential_replay")),
    dict(name="slkd_star_phase1_no_label_smoothing", file=DISTILL, what="SLKD* phase 1 without label smoothing",
         old="kd_weight=1 - alpha, label_smoothing=c.label_smoothing,", new="kd_weight=1 - alpha, label_smoothing=0.0,",
         tests=t(STAGES, "test_slkd_sequential_replay")),

    # ---- multi-exit (the kd_exits_epoch configuration)
    dict(name="exits_teacher_scale_removed", file=SCHEMES_C,
         what="multi-exit with a teacher: 1/n_exits scaling removed",
         old="const float scale = self ? 1.0f : 1.0f / n_exits;", new="const float scale = 1.0f;",
         tests=t(LOOP, "test_multi_exit") + t(STAGES, "test_multi_exit_defaults")),
    dict(name="exits_self_output_ce_weight", file=SCHEMES_C,
         what="self-distillation: the output exit's CE weighted ce_weight",
         old="const float cw = self && is_out ? 1.0f : e->ce_weight;", new="const float cw = e->ce_weight;",
         tests=t(LOOP, "test_multi_exit")),
    dict(name="exits_teacher_skips_output_kd", file=SCHEMES_C, what="with a teacher, the output exit gets no KD term",
         old="if (self && is_out) continue;", new="if (is_out) continue;",
         tests=t(LOOP, "test_multi_exit")),
    dict(name="multi_exit_self_defaults", file=DISTILL, what="Python: multi_exit's self-distillation default weights",
         old='"self": dict(ce_weight=0.7, kd_weight=0.3)', new='"self": dict(ce_weight=0.3, kd_weight=0.3)',
         tests=t(STAGES, "test_multi_exit_defaults")),

    # ---- schemes
    dict(name="ban_weights_swapped", file=SCHEMES, what="BAN: ce_weight and kd_weight swapped",
         old="T=T,\n                        ce_weight=ce_weight, kd_weight=kd_weight, **fit_kw, **dkw)",
         new="T=T,\n                        ce_weight=kd_weight, kd_weight=ce_weight, **fit_kw, **dkw)",
         tests=t(STAGES, "test_born_again_stages")),
    dict(name="ban_teacher_generation_0", file=SCHEMES, what="BAN: every generation learns from generation 0",
         old="h = distill(m, models[k - 1], train,", new="h = distill(m, models[0], train,",
         tests=t(STAGES, "test_born_again_stages")),
    dict(name="ban_tolerant_dropped", file=SCHEMES, what="BAN: generation 0 without the tolerant term",
         old="seed=seed, tolerant=tolerant,", new="seed=seed, tolerant=None,",
         tests=t(STAGES, "test_born_again_stages")),
    dict(name="takd_student_from_teacher", file=SCHEMES, what="TAKD: the student learns from the teacher",
         old="hs = distill(student, prev, train,", new="hs = distill(student, teacher, train,",
         tests=t(STAGES, "test_takd_stages")),
    dict(name="takd_assistant_epochs_ignored", file=SCHEMES, what="TAKD: assistant_epochs ignored",
         old="hists.append(distill(a, prev, train, epochs=a_epochs,",
         new="hists.append(distill(a, prev, train, epochs=epochs,",
         tests=t(STAGES, "test_takd_stages")),
    dict(name="dgkd_assistants_not_guides", file=SCHEMES, what="DGKD: only the teacher guides every stage",
         old="        guides.append(a)\n", new="",
         tests=t(STAGES, "test_dgkd_stages")),
    dict(name="snapshot_min_lr_dropped", file=SCHEMES, what="snapshot distillation: cycles anneal to 0, not min_lr",
         old="sched = Cosine(T_max=epochs_per_cycle, min_lr=min_lr)", new="sched = Cosine(T_max=epochs_per_cycle)",
         tests=t(STAGES, "test_snapshot_distill_stages")),
    dict(name="snapshot_teacher_not_renewed", file=SCHEMES,
         what="snapshot distillation: every cycle learns from the snapshot of cycle 0",
         old="            t = model.copy()\n", new="            t = teachers[0] if teachers else model.copy()\n",
         tests=t(STAGES, "test_snapshot_distill_stages")),
    dict(name="eskd_teacher_not_early", file=SCHEMES, what="ESKD: the student learns from the fully trained teacher",
         old="    early.load_state_dict(checkpoint)\n", new="",
         tests=t(STAGES, "test_eskd_stages")),
    dict(name="eskd_kd_stop_dropped", file=SCHEMES, what="ESKD: kd_stop_epoch not passed to distill",
         old='kd_stop_epoch=None if kd_stop_epoch is None else _check_int("kd_stop_epoch", kd_stop_epoch, 1))',
         new='kd_stop_epoch=None if kd_stop_epoch is None else None)',
         tests=t(STAGES, "test_eskd_stages")),
    dict(name="tfkd_multiplier_ignored", file=SCHEMES, what="Tf-KD: KD weight alpha / K (multiplier ignored)",
         old="ce_w, kd_w = 1.0 - alpha, alpha * multiplier / K", new="ce_w, kd_w = 1.0 - alpha, alpha / K",
         tests=t(STAGES, "test_tf_kd_self_stages", "test_tf_kd_virtual_step")),
    dict(name="tfkd_self_teacher_untrained", file=SCHEMES, what="Tf-KD self: the teacher is not pretrained",
         old="t_hist = fit(teacher, train, epochs=t_epochs, val=val, seed=seed, **fit_kw)", new="t_hist = None",
         tests=t(STAGES, "test_tf_kd_self_stages")),
    dict(name="tfkd_code_form_at_T", file=SCHEMES, what="Tf-KD reg, code form: the student softened by T too",
         old="zt, T_run = (q / np.float32(T)).astype(np.float32), 1.0",
         new="zt, T_run = (q / np.float32(T)).astype(np.float32), T",
         tests=t(STAGES, "test_tf_kd_virtual_step")),

    # ---- the step engine itself (no counterpart in the old per-scheme loops)
    dict(name="connector_input_grad_dropped", file=TRAIN,
         what="a connector's input gradient is not injected into the net it reads",
         old="if ((st = kd_net_grad_add(s->nets[in.net].net, ref_node(&E, in), sn->dinp, 1.0f)) != KD_OK) goto done;",
         new="(void)in;",
         tests=t(ENGINE, "test_connector_hint_step_vs_torch") + t(LOSSES_API, "test_fitnet_step_vs_torch")
         + t(CONN, "test_ofd_step")),
    dict(name="backward_order_reversed", file=TRAIN,
         what="backwards in the step's order: a connector runs after the net it reads (its input gradient is lost)",
         old="for (int i = s->n_nets - 1; i >= 0; i--) {", new="for (int i = 0; i < s->n_nets; i++) {",
         tests=t(ENGINE, "test_connector_hint_step_vs_torch") + t(LOSSES_API, "test_fitnet_step_vs_torch")
         + t(CONN, "test_ofd_step")),
    dict(name="source_grad_dropped", file=TRAIN, what="src.grad ignored: no gradient reaches a trained source",
         old="if (s->grad) {\n            p.db = s->n == 1", new="if (0) {\n            p.db = s->n == 1",
         tests=t(ENGINE, "test_source_gradient_reaches_trained_source_net")
         + t(FEATURE, "test_feature_term_gradient_reaches_a_trained_source")
         + t(CONN, "test_cc_step_trains_both_embeddings", "test_crd_step_and_bank_update")
         + t(LOOP, "test_slkd_options")),
    dict(name="mixed_source_grad_share_unweighted", file=TRAIN,
         what="a mixed source's gradient reaches each reference whole, not its weight's share",
         old="dj[i] += gw[j] * E->dsrc[i];", new="dj[i] += E->dsrc[i];",
         tests=t(LOOP, "test_slkd_options")),
    dict(name="mix_logits_weights_reversed", file=TRAIN, what="a logit-mixed source's weights applied in reverse order",
         old="for (size_t j = 0; j < nbv; j++) out[j] += gw[t] * z[j];",
         new="for (size_t j = 0; j < nbv; j++) out[j] += gw[s->n - 1 - t] * z[j];",
         tests=t(LOOP, "test_slkd_options")),
    dict(name="source_weights_ignored", file=TRAIN, what="a source's given weights ignored (uniform)",
         old="base[t] = uniform ? 1.0f : s->w[t];", new="base[t] = 1.0f;",
         tests=t(LOOP, "test_distill_avg_loss_teacher_weights", "test_slkd_options")),
    dict(name="frozen_net_mode_ignored", file=TRAIN,
         what="frozen nets always forwarded in eval mode (their mode ignored)",
         old="unsigned mode = c->mode | (sn->bp ? KD_MODE_LEAN : KD_MODE_NO_GRAD);",
         new="unsigned mode = sn->bp ? c->mode | KD_MODE_LEAN : KD_MODE_EVAL | KD_MODE_NO_GRAD;",
         tests=t(API, "test_fickle_teacher_runs_dropout_with_frozen_bn")),
    dict(name="source_tap_not_kept", file=TRAIN,
         what="a source's tap is not kept: a frozen net's inference forward does not leave it readable",
         old="for (int j = 0; j < s->terms[t].src.n; j++) KEEP(s->terms[t].src.ref[j]);", new="",
         tests=t(FEATURE, "test_method_step_vs_torch") + t(ENGINE, "test_connector_hint_step_vs_torch")),
    dict(name="term_stop_epoch_ignored", file=TRAIN, what="a term's stop_epoch ignored (the term never switches off)",
         old="if (t->stop_epoch > 0 && epoch >= t->stop_epoch) w = 0.0f;", new="",
         tests=t(LOSSES_API, "test_history_labels_and_schedules") + t(LOOP, "test_distill_weight_by_epoch")
         + t(STAGES, "test_eskd_stages")),
    dict(name="stopped_term_still_runs", file=TRAIN, what="a term of weight 0 (stopped) is still computed and reported",
         old="if (tw[t] == 0 || !on[t]) { memset(&to[t], 0, sizeof to[t]); continue; }",
         new="if (!on[t]) { memset(&to[t], 0, sizeof to[t]); continue; }",
         tests=t(LOSSES_API, "test_history_labels_and_schedules")),
    dict(name="grad_slot_not_cleared", file=TRAIN,
         what="a gradient slot is not cleared at a step's first term: gradients pile up over the steps",
         old="if (!g->touched) { memset(g->g, 0, (size_t)E->L->nb * g->per * sizeof(float)); g->touched = true; }",
         new="if (!g->touched) g->touched = true;",
         tests=t(ENGINE, "test_connector_hint_step_vs_torch")),
    dict(name="net_grad_not_zeroed", file=TRAIN,
         what="a trained net's parameter gradient not zeroed before its backward",
         old="if (v == sn->first_view) kd_net_zero_grad(net);", new=";",
         tests=t(ENGINE, "test_connector_hint_step_vs_torch")),
    dict(name="params_holder_grad_not_zeroed", file=TRAIN,
         what="a parameter holder's gradient not zeroed per step (VID's variances: gradients pile up)",
         old="kd_net_zero_grad(c->net);   // the terms add their parameters' gradients", new=";",
         tests=t(CONN, "test_vid_two_steps_on_the_engine")),
    dict(name="crd_bank_update_skipped", file=TRAIN, what="CRD's memory banks never take the step's embeddings",
         old="if ((st = kd_crd_update(term->crd.bank, es, es + nd, L.idx, nb)) != KD_OK) goto done;", new="(void)es;",
         tests=t(CONN, "test_crd_step_and_bank_update")),
    dict(name="skip_crd_counter_not_restored", file=TRAIN, what="a dropped step leaves CRD's draw counter advanced",
         old="*kd_crd_steps(s->terms[t].crd.bank) = crd_saved[t].steps;", new="",
         tests=t(NONFINITE, "test_engine_skip_restores_crd_state")),
    dict(name="skip_crd_z_not_restored", file=TRAIN, what="a dropped first step leaves CRD's Z set from its batch",
         old="memcpy(kd_crd_z(s->terms[t].crd.bank), crd_saved[t].z, sizeof crd_saved[t].z);", new="",
         tests=t(NONFINITE, "test_engine_skip_restores_crd_state")),
    dict(name="skip_bn_not_restored", file=TRAIN, what="a dropped step leaves the BN statistics its forwards updated",
         old="for (int i = 0; i < L->n_saved; i++) bn_restore(&L->saved[i]);", new="",
         tests=t(NONFINITE, "test_fit_raise_and_skip", "test_mutual_skip_drops_the_step_for_every_peer")),
    # ---- connectors with extra inputs (ReviewKD's fusion reads four student maps)
    dict(name="extra_input_grad_dropped", file=TRAIN,
         what="a connector's extra-input gradients never reach the net they read",
         old="if ((st = kd_net_grad_add(s->nets[in.net].net, ref_node(&E, in), sn->ext_grad[k], 1.0f)) != KD_OK) goto done;",
         new="(void)in;", tests=t(REVIEWKD, "test_reviewkd_step_matches_torch")),
    dict(name="extra_inputs_shifted", file=TRAIN,
         what="a connector's extra inputs fed to its input nodes in the wrong order",
         old="ref_shape(&E, c->inputs[k], &ec, &eh, &ew);\n                        st = kd_net_set_input(c->net, sn->ext_node[k],",
         new="ref_shape(&E, c->inputs[k], &ec, &eh, &ew);\n                        st = kd_net_set_input(c->net, sn->ext_node[c->n_inputs - 1 - k],",
         tests=t(REVIEWKD, "test_reviewkd_step_matches_torch")),

    # ---- logit methods since DKD (kdcore/src/losses.c): each method's own mechanism
    dict(name="normkd_student_std_detached", file=LOSSES_C,
         what="NormKD: the student's std not differentiated in the default form (detach_std's gradient always)",
         old="const bool through_std = sd_s > 0 && !detach_std;", new="const bool through_std = false;",
         tests=t(LOGIT, "test_normkd_loss", "test_normkd_step")),
    dict(name="wttm_weight_dropped", file=LOSSES_C,
         what="WTTM without its per-sample power-sum weight U (plain transformed-teacher matching)",
         old="const double U = exp(lg - g * l1);", new="const double U = 1.0;",
         tests=t(LOGIT, "test_wttm_loss", "test_wttm_step")),
    dict(name="ctkd_reversal_sign", file=TERMS,
         what="CTKD: the temperature's gradient not reversed (it descends the loss with the student)",
         old="p->dparams[0] += (float)(-lam * (double)dT * dT_dp);", new="p->dparams[0] += (float)(lam * (double)dT * dT_dp);",
         tests=t(CTKD, "test_ctkd_steps_at_two_curriculum_epochs")),
    dict(name="ctkd_curriculum_frozen", file=TERMS,
         what="CTKD: the curriculum's lambda of the first epoch kept for every epoch",
         old="kd_ctkd_lambda(p->epoch, t->ctkd.lambda_min,", new="kd_ctkd_lambda(0, t->ctkd.lambda_min,",
         tests=t(CTKD, "test_ctkd_steps_at_two_curriculum_epochs", "test_ctkd_instance_steps_match_torch")),
    dict(name="ctkd_instance_reversal_sign", file=TERMS,
         what="CTKD instance-wise: the temperature net's gradient not reversed",
         old="p->da2[i] += (float)(-lam * (double)dT[i] * dT_dm);", new="p->da2[i] += (float)(lam * (double)dT[i] * dT_dm);",
         tests=t(CTKD, "test_ctkd_instance_steps_match_torch")),
    dict(name="ctkd_instance_not_detached", file="python/kdcore/losses.py",
         what="CTKD instance-wise: the temperature net's reversed gradient flows back into the student's logits",
         old='inputs=[plan.ref(1)], detach=True)', new='inputs=[plan.ref(1)], detach=False)',
         tests=t(CTKD, "test_ctkd_instance_steps_match_torch")),
    dict(name="ctkd_rows_one_temperature", file=LOSSES_C,
         what="CTKD's per-row loss runs every row at the first row's temperature",
         old="const double TT = Tr ? Tr[i] : T;", new="const double TT = Tr ? Tr[0] : T;",
         tests=t(CTKD, "test_ctkd_loss_rows_matches_autograd", "test_ctkd_instance_steps_match_torch")),
    dict(name="deepinv_bn_stats_swapped", file=TRAIN,
         what="DeepInversion: the BN-statistics term compares with the running variance as the mean and back",
         old="t->bnstat.node, &p.rmean, &p.rvar);", new="t->bnstat.node, &p.rvar, &p.rmean);",
         tests=t(DEEPINV, "test_one_sgd_step_matches_torch", "test_one_adam_step_matches_torch")),
    dict(name="deepinv_jitter_backward_unflipped", file="kdcore/src/net.c",
         what="Jitter: the backward undoes the shift but not the flip",
         old="kd_jitter_backward(din, d, N, c, h, w, nd->jit[0], nd->jit[1], nd->jit[2] != 0);",
         new="kd_jitter_backward(din, d, N, c, h, w, nd->jit[0], nd->jit[1], false);",
         tests=t(DEEPINV, "test_jitter_layer_matches_torch")),
    dict(name="deepinv_unbiased_variance", file="kdcore/src/losses_feat.c",
         what="DeepInversion: the BN input's batch variance unbiased (the authors' hook takes the biased one)",
         old="var[c] = q / (double)m;", new="var[c] = q / (double)(m - 1);",
         tests=t(DEEPINV, "test_bnstat_loss_matches_autograd", "test_one_sgd_step_matches_torch")),

    # ---- adversarial data-free distillation (DFAD, ZSKT): the reversed term, the step cycle
    dict(name="adv_reversal_off", file=TRAIN,
         what="a reversed term's gradient not negated (the generator descends the discrepancy)",
         old="if (t->reverse) w = -w;", new="if (0) w = -w;",
         tests=t(ADV, "test_generator_step_receives_the_reversed_gradient")),
    dict(name="adv_reversal_dropped_dfad", file=DATAFREE,
         what="datafree's generator term configured without reverse",
         old="terms.append(dict(disc, phases=gen_mask, grad=True, reverse=True))",
         new="terms.append(dict(disc, phases=gen_mask, grad=True, reverse=False))",
         tests=t(ADV, "test_dfad_iteration_matches_torch", "test_zskt_iteration_matches_torch")),
    dict(name="cycle_update_every_phase", file=TRAIN,
         what="a net with phases updated in every phase of the cycle (the student steps with the generator)",
         old="E.n[i].upd = E.n[i].upd_phases >> phase & 1;", new="E.n[i].upd = E.n[i].upd_phases != 0;",
         tests=t(ADV, "test_generator_step_receives_the_reversed_gradient", "test_dfad_iteration_matches_torch")),
    dict(name="cycle_batch_ignored", file=TRAIN, what="cycle_batch: each step of a cycle reads its own batch",
         old="L.per_batch = n_phases;", new="L.per_batch = 1;",
         tests=t(ADV, "test_zskt_iteration_matches_torch", "test_cycle_batch_repeats_the_batch_and_its_noise")),
    dict(name="cycle_term_mean_over_all_steps", file=TRAIN,
         what="a term's logged value averaged over every step of the epoch, not the steps of its phases",
         old="const double nt = term_seen[t] ? (double)term_seen[t] : 1.0;", new="const double nt = n;",
         tests=t(ADV, "test_dfad_iteration_matches_torch")),
    dict(name="clip_norm_ignored", file=TRAIN, what="a net's clip_norm ignored (its gradient not clipped)",
         old="if (c->clip_norm > 0) clip_grad_norm(c->net, c->clip_norm);", new="",
         tests=t(ADV, "test_zskt_iteration_matches_torch")),
    dict(name="l1_tie_sign", file=LOSSES_C, what="the L1 loss's subgradient at a tie is 1, not torch's 0",
         old="sg = d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0;", new="sg = d >= 0 ? 1.0 : -1.0;",
         tests=t(ADV, "test_l1_loss_matches_autograd")),
    # ---- adversarial KD: the twin net that applies the discriminator to the student's logits,
    # and the BCE loss its terms run
    dict(name="twin_gradient_dropped", file=TRAIN,
         what="a twin's parameter gradient not added to the net it shares (the discriminator learns from the "
              "teacher's logits only)",
         old="for (size_t k = 0; k < kd_net_num_params(o); k++) go[k] += gt[k];", new="(void)go; (void)gt;",
         tests=t(ADV_KD, "test_discriminator_learns_both_sides", "test_cycle_matches_torch")),
    dict(name="twin_params_not_copied", file=TRAIN,
         what="a twin keeps its own parameters instead of taking the shared net's before each forward",
         old="memcpy(kd_net_params(c->net), kd_net_params(o), kd_net_num_params(o) * sizeof(float));",
         new="(void)o;", tests=t(ADV_KD, "test_cycle_matches_torch")),
    dict(name="conditional_labels_zero", file=DISTILL,
         what="the conditional discriminator fed zero rows instead of the labels' one-hot rows",
         old="labels = np.eye(n_cls, dtype=np.float32)[c.train.y] if conditional else None",
         new="labels = np.zeros((len(c.train), n_cls), np.float32) if conditional else None",
         tests=t(ADV_KD, "test_cycle_matches_torch")),
    dict(name="adv_student_tap_swapped", file=DISTILL,
         what="tap=: the twin reads the student at the teacher's tap node (the pair's student name ignored)",
         old="input=(0, taps[0])", new="input=(0, taps[1])",
         tests=t(ADV_KD, "test_tap_cycle_matches_torch")),
    dict(name="bce_target_ignored", file=LOSSES_C, what="BCE's gradient against target 1 whatever the target",
         old="if (dlogits) put(&dlogits[i], g * (sig - y), accumulate);",
         new="if (dlogits) put(&dlogits[i], g * (sig - 1.0), accumulate);",
         tests=t(ADV_KD, "test_bce_loss_matches_autograd")),
    # ---- MLKD (losses.c): its confidence masks and its batch-level gradient
    dict(name="mlkd_class_mask_ignored", file=LOSSES_C,
         what="MLKD: the class-level term not scaled by the fraction of classes its mask keeps",
         old="const double f_c = kept_fraction(conf, work, V, percentile);", new="const double f_c = 1.0;",
         tests=t(MLKD_T, "test_mlkd_loss", "test_mlkd_step")),
    dict(name="mlkd_batch_gradient_dropped", file=LOSSES_C,
         what="MLKD: the batch-level (B x B correlation) term's gradient left out (its value still reported)",
         old="const double er = -4.0 * f_s / N * E[(size_t)i * N + r];", new="const double er = 0.0;",
         tests=t(MLKD_T, "test_mlkd_loss", "test_mlkd_step")),
    # ---- views (train.c), RandAugment (data.c), MLKD's strong-view terms (losses.py)
    dict(name="view_grad_cleared_every_view", file=TRAIN,
         what="a net's gradient cleared before every view's backward (only the last view's gradient kept)",
         old="if (v == sn->first_view) kd_net_zero_grad(net);", new="kd_net_zero_grad(net);",
         tests=t(MLKD_T, "test_two_view_kd_step", "test_mlkd_step_two_views")),
    dict(name="view1_reuses_view0_draws", file=TRAIN, what="view 1 draws its crop and flip with view 0's seed",
         old="L->sseed2 = kd_hash(L->sseed, VIEW1_SALT_);", new="L->sseed2 = L->sseed;",
         tests=t(MLKD_T, "test_step_batch_views")),
    dict(name="view1_forward_reads_view0", file=TRAIN, what="the nets' view-1 forwards read view 0's batch",
         old="const float * xv = v ? L.x2 : L.x;", new="const float * xv = L.x;",
         tests=t(MLKD_T, "test_two_view_kd_step", "test_mlkd_step_two_views")),
    dict(name="ra_cutout_centre_from_0", file="kdcore/src/data.c",
         what="RandAugment's Cutout centre drawn in [0, w) instead of the loader's (1, w]",
         old="const float cx = W + (1.0f - W) * kd_uniform(kd_hash(rs, k + 1));",
         new="const float cx = W * kd_uniform(kd_hash(rs, k + 1));",
         tests=t("tests/test_randaugment.py", "test_batch_applies_drawn_ops_before_normalisation")),
    dict(name="ra_ops_skipped", file="kdcore/src/data.c",
         what="RandAugment's operations and Cutout not applied (the batch only cropped, flipped, normalised)",
         old="        ra_sample_(o, C, H, W, ra_n, kd_hash(seed, si + DRAW_RA_), tmp + (size_t)kd_omp_tid() * chw);\n"
             "        if (norm)\n",
         new="        if (norm)\n",
         tests=t("tests/test_randaugment.py", "test_batch_applies_drawn_ops_before_normalisation")),
    dict(name="loss_view_ignored_for_a", file="python/kdcore/losses.py",
         what="a Loss's view not given to its input a (only its source reads the strong view)",
         old="kw[key] = tuple(kw[key][:2]) + (self.view,)", new="kw[key] = tuple(kw[key][:2])",
         tests=t(MLKD_T, "test_loss_view_option_reads_the_strong_view")),
    dict(name="mlkd_strong_kd_all_on_strong", file="python/kdcore/losses.py",
         what="MLKD: the T 2 and 6 terms of the strong view's KD sum on the strong logits (the authors' read the weak)",
         old="a, t = (plan.ref(0), plan.ref(1)) if T in self.kd_on_weak else strong",
         new="a, t = strong",
         tests=t(MLKD_T, "test_mlkd_step_two_views")),

    # ---- kdcore.metrics (Python only: no rebuild)
    dict(name="metrics_ece_edge_to_upper_bin", file=METRICS, what="a confidence on a bin edge goes to the bin above",
         old='np.searchsorted(edges, conf, side="left")', new='np.searchsorted(edges, conf, side="right")',
         tests=t(METRICS_T, "test_calibration_confidence_on_bin_edges")),
    dict(name="metrics_ece_linspace_edges", file=METRICS, what="bin edges an ulp off k / bins (linspace)",
         old="edges = np.arange(bins + 1) / bins", new="edges = np.linspace(0, 1, bins + 1)",
         tests=t(METRICS_T, "test_calibration_confidence_on_bin_edges")),
    dict(name="metrics_ece_unweighted", file=METRICS, what="ECE as the plain mean over non-empty bins",
         old="float(np.abs(sum_acc - sum_conf).sum() / n)", new="float(np.nanmean(np.abs(bin_acc - bin_conf)))",
         tests=t(METRICS_T, "test_calibration_matches_loop_and_torch")),
    dict(name="metrics_nll_of_prediction", file=METRICS, what="NLL of the predicted class, not the label",
         old="-lp[rows, y].mean()", new="-lp[rows, pred].mean()",
         tests=t(METRICS_T, "test_calibration_matches_loop_and_torch")),
    dict(name="metrics_kl_reversed", file=METRICS, what="kl_divergence computes KL(p_t || p_s)",
         old="return _mean_kl(_log_softmax(zs, T), _log_softmax(zt, T))",
         new="return _mean_kl(_log_softmax(zt, T), _log_softmax(zs, T))",
         tests=t(METRICS_T, "test_kl_divergence_matches_torch")),
    dict(name="metrics_kl_temperature_ignored", file=METRICS, what="kl_divergence at T=1 whatever T",
         old="return _mean_kl(_log_softmax(zs, T), _log_softmax(zt, T))",
         new="return _mean_kl(_log_softmax(zs), _log_softmax(zt))",
         tests=t(METRICS_T, "test_kl_divergence_matches_torch")),
    dict(name="metrics_confusion_transposed", file=METRICS, what="confusion matrix rows = predicted class",
         old="np.bincount(y * k + z.argmax(1),", new="np.bincount(z.argmax(1) * k + y,",
         tests=t(METRICS_T, "test_confusion_matrix_matches_sklearn")),
    dict(name="metrics_normalize_true_pred_swapped", file=METRICS, what='normalize="true" divides by column sums',
         old='"true": cm.sum(1, keepdims=True), "pred": cm.sum(0, keepdims=True)',
         new='"true": cm.sum(0, keepdims=True), "pred": cm.sum(1, keepdims=True)',
         tests=t(METRICS_T, "test_confusion_matrix_matches_sklearn")),
    dict(name="metrics_per_class_is_precision", file=METRICS, what="per-class accuracy divides by predictions",
         old="    n = cm.sum(1)\n", new="    n = cm.sum(0)\n",
         tests=t(METRICS_T, "test_per_class_accuracy_matches_sklearn")),
    dict(name="metrics_cka_not_centred", file=METRICS, what="feature-form CKA without centring",
         old="mx, my = x_sum / n, y_sum / n", new="mx, my = 0 * x_sum, 0 * y_sum",
         tests=t(METRICS_T, "test_linear_cka_feature_form_matches_hsic")),
    dict(name="metrics_cka_gram_not_centred", file=METRICS, what="Gram-form CKA without centring",
         old=".astype(np.float64) - mean[j:j + chunk]", new=".astype(np.float64)",
         tests=t(METRICS_T, "test_linear_cka_gram_form_matches_hsic")),
    dict(name="metrics_cka_gram_never", file=METRICS, what="wide taps (d > n) kept in the d x d form",
         old="gram = max(fx.shape[1], fy.shape[1]) > n", new="gram = False",
         tests=t(METRICS_T, "test_linear_cka_gram_form_matches_hsic")),
    dict(name="metrics_tap_check_removed", file=METRICS, what="an unknown tap reported without the argument's name",
         old="    if tap not in model.taps():", new="    if False:",
         tests=t(METRICS_T, "test_bad_arguments_name_the_argument")),
    dict(name="metrics_label_check_removed", file=METRICS, what="unlabelled data reaches the label metrics",
         old="if labels and data.y is None:", new="if False:",
         tests=t(METRICS_T, "test_bad_arguments_name_the_argument")),
    dict(name="metrics_output_count_check_removed", file=METRICS,
         what="student and teacher with different output counts not reported as such",
         old="if vs != vt:", new="if False:", tests=t(METRICS_T, "test_bad_arguments_name_the_argument")),
    dict(name="metrics_no_eval_mode", file=METRICS, what="metrics run the models in their own (training) mode",
         old="            m.eval()\n", new="            pass\n",
         tests=t(METRICS_T, "test_cka_runs_eval_mode_and_leaves_the_dropout_stream")),
    dict(name="metrics_training_flag_lost", file=METRICS, what="a metric leaves models in training mode",
         old="m.train(training)", new="m.train(True)", tests=t(METRICS_T, "test_training_flag_is_restored")),
    dict(name="metrics_forward_counter_advanced", file=METRICS,
         what="linear_cka's forwards shift the model's later dropout draws",
         old="            m._step = step\n", new="            pass\n",
         tests=t(METRICS_T, "test_cka_runs_eval_mode_and_leaves_the_dropout_stream")),
    # ---- data-free checkpoints (Python only: no rebuild)
    dict(name="dafl_ckpt_generator_optimizer_dropped", file=DATAFREE,
         what="DAFL's checkpoint without the generator's Adam state",
         old="optimizers=[opt_s, opt_g], roles=", new="optimizers=[opt_s, None], roles=",
         tests=t(RESUME, "test_generator_games_resume_is_bitwise")),
    dict(name="adv_ckpt_generator_dropped", file=DATAFREE,
         what="DFAD's and ZSKT's checkpoints hold the student only (the generator restarts from its init)",
         old='hist = c.loop([student, generator], run, optimizers=[bs, bg], roles=["student", "generator"])',
         new='hist = c.loop([student], run, optimizers=[bs], roles=["student"])',
         tests=t(RESUME, "test_generator_games_resume_is_bitwise")),
    dict(name="di_ckpt_optimizer_not_restored", file=DATAFREE,
         what="a DeepInversion resume restarts the batch's optimizer state (Adam moments, step count)",
         old="_load(self.path, {self.ROLE: holder}, {self.ROLE: opt}, exact_roles=True",
         new="_load(self.path, {self.ROLE: holder}, None, exact_roles=True",
         tests=t(RESUME, "test_deepinversion_resume_at_every_chunk_is_bitwise")),
    dict(name="di_ckpt_images_not_restored", file=DATAFREE,
         what="a DeepInversion resume loses the finished batches' images",
         old='exact_roles=True, arrays={"images": images})', new="exact_roles=True)",
         tests=t(RESUME, "test_deepinversion_resume_at_every_chunk_is_bitwise")),
    dict(name="di_ckpt_chunk_index_restarts", file=DATAFREE,
         what="a DeepInversion resume numbers its chunks from 0 (the jitter draws of the first chunks repeat)",
         old="e = -(-done // steps)", new="e = 0",
         tests=t(RESUME, "test_deepinversion_resume_at_every_chunk_is_bitwise")),
    dict(name="di_ckpt_settings_unchecked", file=DATAFREE,
         what="a DeepInversion resume with other settings goes on",
         old="        if diff:\n            what = ", new="        if False:\n            what = ",
         tests=t(RESUME, "test_deepinversion_resume_with_other_settings_raises")),
    dict(name="di_ckpt_batch_end_not_saved", file=DATAFREE,
         what="a batch's last chunk not checkpointed (only every checkpoint_every-th chunk is)",
         old="            wrote = ck is not None and (e % ck.every == 0 or done == iterations)",
         new="            wrote = ck is not None and e % ck.every == 0 and done < iterations",
         tests=t(RESUME, "test_deepinversion_checkpoint_every_and_interrupt",
                 "test_deepinversion_resume_at_every_chunk_is_bitwise")),
    # ---- Winograd F(2x2,3x3) (winograd.c): the convs with C, OC >= 32 run it by default, so
    # the PyTorch parity of conv layers and the switch's comparison with the direct path see it
    dict(name="winograd_kernel_coefficient", file=WINO, what="Winograd's kernel transform: a G coefficient 1/4, not 1/2",
         old="h[2][b] = ((k[0][b] - k[1][b]) + k[2][b]) * 0.5f;", new="h[2][b] = ((k[0][b] - k[1][b]) + k[2][b]) * 0.25f;",
         tests=t(LAYERS_TORCH, "test_conv2d") + [WINO_T]),
    dict(name="winograd_padding_shift", file=WINO,
         what="Winograd's padded image without its left padding column (inputs shifted by one column)",
         old="float * dst = xp + c * plane + (size_t)d->pad * wp + (size_t)d->pad;",
         new="float * dst = xp + c * plane + (size_t)d->pad * wp;",
         tests=t(LAYERS_TORCH, "test_conv2d") + [WINO_T]),
    dict(name="winograd_output_sign", file=WINO, what="Winograd's output transform: a sign of A^T wrong (odd rows and columns)",
         old="v8f b1 = v8_sub(v8_sub(u1[1], u1[2]), u1[3]);", new="v8f b1 = v8_sub(v8_add(u1[1], u1[2]), u1[3]);",
         tests=t(LAYERS_TORCH, "test_conv2d") + [WINO_T]),
    dict(name="winograd_dweight_z_sign", file=WINO,
         what="Winograd's weight gradient: the output-gradient transform's last row without its minus sign",
         old="{ v8_sub(zero, y10), v8_sub(zero, y11) } };", new="{ y10, y11 } };",
         tests=t(LAYERS_TORCH, "test_conv2d") + [WINO_T]),
    dict(name="winograd_dweight_kernel_halving", file=WINO,
         what="Winograd's weight gradient: G^T dU G's middle column without its halving",
         old="g[3 * i + 1] = (h[i][1] - h[i][2]) * 0.5f;", new="g[3 * i + 1] = h[i][1] - h[i][2];",
         tests=t(LAYERS_TORCH, "test_conv2d") + [WINO_T]),
    # ---- which activation gradients a backward computes (net.c): only those that lead to a
    # parameter or to an input gradient asked for
    dict(name="needs_grad_ignores_ancestors", file="kdcore/src/net.c",
         what="a node without parameters takes no gradient even when layers before it have parameters",
         old="need |= s->inp[k] == KD_INPUT ? dinp != NULL : net->nodes[s->inp[k]].needs_grad;",
         new="need |= s->inp[k] == KD_INPUT && dinp != NULL;",
         tests=t("tests/test_models_torch.py", "test_train_parity")),
    dict(name="needs_grad_ignores_input_request", file="kdcore/src/net.c",
         what="the input gradient asked for does not make the layers after the input take gradients (an MLP's dx stays 0)",
         old="need |= s->inp[k] == KD_INPUT ? dinp != NULL : net->nodes[s->inp[k]].needs_grad;",
         new="need |= s->inp[k] == KD_INPUT ? false : net->nodes[s->inp[k]].needs_grad;",
         tests=t("tests/test_models_torch.py", "test_eval_parity")),
]

NAMES = [m["name"] for m in MUTATIONS]
assert len(set(NAMES)) == len(NAMES), "mutation names must be unique"

ROOT = Path(__file__).resolve().parents[2]
C_SUFFIXES = (".c", ".h")


def repo_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def apply(m, tree):
    """Applies the mutation in `tree`; returns None or the reason it cannot be applied."""
    path = tree / m["file"]
    if not path.is_file():
        return f"NOT APPLIED: {m['file']} does not exist"
    text = path.read_text()
    n = text.count(m["old"])
    if n != 1:
        return f"NOT APPLIED: snippet {'not found' if n == 0 else f'found {n} times (ambiguous)'}: {m['old'][:60]!r}"
    path.write_text(text.replace(m["old"], m["new"]))
    return None


def build(tree, log):
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"], cwd=tree,
                       capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    return r.returncode == 0


def run_tests(tree, tests):
    """Runs pytest on `tests` in `tree`: (status, failing node ids, output). status: 'pass',
    'fail' (some test failed), 'crash' (killed by a signal) or 'error' (collection/usage)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "python"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=tree,
                       env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    failed = sorted(set(re.findall(r"^FAILED (\S+)", out, re.M)))
    if r.returncode == 0:
        return "pass", failed, out
    if r.returncode == 1:
        return "fail", failed, out
    if r.returncode < 0:
        return "crash", failed, out
    return "error", failed, out


def summary(nodes):
    """Failing node ids as test names, parametrizations counted: 'test_a (3 of its cases), test_b'."""
    counts = {}
    for node in nodes:
        name = node.split("::", 1)[-1].split("[", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} ({c} cases)" if c > 1 else n for n, c in counts.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet applies exactly once")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output for survivors and errors")
    args = ap.parse_args()

    selected = MUTATIONS
    if args.only:
        unknown = [n for n in args.only if n not in NAMES]
        if unknown:
            sys.exit(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
        selected = [m for m in MUTATIONS if m["name"] in args.only]
    if args.list:
        for m in selected:
            print(f"{m['name']:40s} {m['file']:28s} {m['what']}")
            for node in m["tests"]:
                print(f"{'':40s}   {node}")
        return 0

    files = repo_files()
    if args.check:
        bad = 0
        with tempfile.TemporaryDirectory(prefix="kd-mutate-") as tmp:
            for m in selected:
                tree = Path(tmp) / m["name"]
                (tree / m["file"]).parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / m["file"]).is_file():
                    shutil.copy2(ROOT / m["file"], tree / m["file"])
                why = apply(m, tree)
                bad += why is not None
                print(f"{m['name']:40s} {why or 'applies'}")
        return 1 if bad else 0

    tmp = Path(tempfile.mkdtemp(prefix="kd-mutate-"))
    t0 = time.time()
    try:
        base = tmp / "base"
        for f in files:
            (base / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, base / f)
        print(f"copy of {ROOT} ({len(files)} files) in {tmp}; building it ...", flush=True)
        if not build(base, tmp / "base-build.log"):
            print((tmp / "base-build.log").read_text())
            print("the unmutated copy does not build")
            return 2
        all_tests = sorted({node for m in selected for node in m["tests"]})
        status, failed, out = run_tests(base, all_tests)
        if status != "pass":
            print(out[-4000:])
            print(f"the unmutated copy fails its tests ({status}): {', '.join(failed) or 'see above'}")
            return 2
        print(f"unmutated copy: {len(all_tests)} test functions pass ({time.time() - t0:.0f} s)\n", flush=True)

        rows = []
        for i, m in enumerate(selected):
            t1 = time.time()
            tree = tmp / m["name"]
            shutil.copytree(base, tree, symlinks=True)
            why = apply(m, tree)
            if why is None and m["file"].endswith(C_SUFFIXES) and not build(tree, tmp / f"{m['name']}-build.log"):
                why = f"BUILD FAILED (log: {tmp / (m['name'] + '-build.log')})"
            if why is not None:
                rows.append((m["name"], "no", why))
            else:
                status, failed, out = run_tests(tree, m["tests"])
                if status == "fail":
                    rows.append((m["name"], "yes", summary(failed)))
                elif status == "crash":
                    rows.append((m["name"], "yes", "the test process crashed"))
                else:
                    rows.append((m["name"], "no", "SURVIVED" if status == "pass" else "ERROR running the tests"))
                    if args.verbose:
                        print(out[-3000:])
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
            print(f"[{i + 1}/{len(selected)}] {m['name']}: caught {rows[-1][1]} ({time.time() - t1:.0f} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    w = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':{w}s}  caught  by")
    print(f"{'-' * w}  ------  --")
    for name, caught, by in rows:
        print(f"{name:{w}s}  {caught:6s}  {by}")
    survived = [r for r in rows if r[1] != "yes"]
    print(f"\n{len(rows) - len(survived)}/{len(rows)} mutations caught in {time.time() - t0:.0f} s")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
