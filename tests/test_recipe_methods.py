"""The recipe methods the online and self-distillation studies need (kdcore.recipes):
born_again, tf_kd_self, snapshot_distill and mutual with a peer of another architecture (options.peer_model),
each checked bitwise against a direct call of the library function with the same seed; the
earlier stages' models a run keeps (stage-<k>.safetensors); the CPU times it records."""
import os

import numpy as np
import pytest

import kdcore
from kdcore import recipes

TEACHER = dict(model="mlp", hidden=[24], epochs=2, train_size=300, schedule="cosine", lr=0.05, batch_size=64)


def recipe(**over):
    raw = dict(name="r", teacher=None, student=dict(model="mlp", hidden=[12]),
               data=dict(train_size=300, val_split=100, test_size=300), method="scratch", epochs=2, batch_size=64)
    raw.update(over)
    return recipes.validate(raw)


def params(model):
    return {k: np.array(v) for k, v in model.state_dict().items()}


def same_weights(a, b):
    pa, pb = params(a), params(b)
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def run(cfg, seed, tmp_path):
    m = recipes.run_one(cfg, seed, tmp_path / "runs")
    folder = recipes.run_dir(tmp_path / "runs", cfg, seed)
    p = recipes.prepare(cfg, seed, tmp_path / "cache")
    return m, folder, p, recipes._read_json(os.path.join(folder, "history.json"))


def load(path, like):
    m = like.fresh()
    kdcore.load(path, m)
    return m


def common(p, seed):
    return dict(epochs=2, batch_size=64, optimizer=p["optimizer"], schedule=p["schedule"], val=p["val"], seed=seed,
                progress=False)


def test_born_again_is_kdcore_born_again(tmp_path):
    cfg = recipe(method="born_again", options=dict(generations=3, T=2.0))
    m, folder, p, hist = run(cfg, 2, tmp_path)
    r = kdcore.born_again(p["student"], p["train"], generations=3, T=2.0, **common(p, 2))
    assert hist["train_loss"] == list(r.histories[-1]["train_loss"])
    assert same_weights(load(os.path.join(folder, "student.safetensors"), p["student"]), r.models[-1])
    for k in range(2):   # the earlier generations, kept
        assert same_weights(load(os.path.join(folder, f"stage-{k}.safetensors"), p["student"]), r.models[k])
    assert not os.path.exists(os.path.join(folder, "stage-2.safetensors"))
    # the per-epoch measures are the last generation's, the stages' accuracies each generation's
    acc = [kdcore.evaluate(g, p["test"], batch_size=500)["accuracy"] for g in r.models]
    assert m["test_acc"] == hist["test_acc"][-1] == acc[-1]
    assert m["stage_last_test_acc"] == acc
    assert len(hist["test_acc"]) == 2 and acc[0] != acc[-1]


def test_tf_kd_self_is_kdcore_tf_kd_self(tmp_path):
    cfg = recipe(method="tf_kd_self", options=dict(teacher_epochs=1, alpha=0.5, T=3.0))
    m, folder, p, hist = run(cfg, 1, tmp_path)
    r = kdcore.tf_kd(p["student"], p["train"], mode="self", teacher_epochs=1, alpha=0.5, T=3.0, **common(p, 1))
    assert hist["train_loss"] == list(r.student_history["train_loss"])
    assert same_weights(load(os.path.join(folder, "student.safetensors"), p["student"]), r.student)
    assert same_weights(load(os.path.join(folder, "stage-0.safetensors"), p["student"]), r.teacher)
    # the pretrained copy's epoch is measured apart: the History's epochs are the student's
    assert len(hist["test_acc"]) == 2
    assert m["stage_last_test_acc"][0] == kdcore.evaluate(r.teacher, p["test"], batch_size=500)["accuracy"]
    assert m["teacher"] is None


def test_mutual_with_a_peer_of_another_architecture(tmp_path):
    peer = dict(model="mlp", hidden=[40, 20])
    cfg = recipe(method="mutual", options=dict(peer_model=peer, T=2.0))
    assert cfg["options"]["peer_model"] == peer
    m, folder, p, hist = run(cfg, 3, tmp_path)
    big = kdcore.models.mlp([784, 40, 20, 10], seed=3 + 7919)
    h = kdcore.mutual([p["student"], big], p["train"], T=2.0, **common(p, 3))
    assert hist["train_loss"] == list(h["train_loss"]) and hist["peer1_loss"] == list(h["peer1_loss"])
    assert hist["peer1_val_acc"] == list(h["peer1_val_acc"])
    assert same_weights(load(os.path.join(folder, "student.safetensors"), p["student"]), p["student"])
    assert not any(f.startswith("stage-") for f in os.listdir(folder))
    # without peer_model the peers are the student's architecture: another run
    same = recipes.run_one(recipe(method="mutual", name="same"), 3, tmp_path / "runs")
    assert same["best_test_acc"] != m["best_test_acc"] or same["last_test_nll"] != m["last_test_nll"]


def test_cpu_times_are_recorded(tmp_path):
    cfg = recipe(method="kd", teacher=dict(TEACHER))
    m = recipes.run_one(cfg, 0, tmp_path / "runs", cache=tmp_path / "cache")
    assert m["teacher"]["source"] == "trained" and m["teacher"]["cpu_time"] > 0
    assert 0 < m["cpu_time"]
    again = recipes.run_one(dict(cfg, name="again"), 0, tmp_path / "runs", cache=tmp_path / "cache")
    assert again["teacher"] == dict(m["teacher"], source="cache")


@pytest.mark.parametrize("over, msg", [
    (dict(method="born_again", options=dict(generations=0)), "options.generations: expected an int >= 1"),
    (dict(method="born_again", options=dict(peers=2)), "options.peers: not an option of method 'born_again'"),
    (dict(method="born_again", options=dict(distill_kw={})), "options.distill_kw: not an option"),
    (dict(method="tf_kd_self", options=dict(a=0.9)), "options.a: not an option of method 'tf_kd_self'"),
    (dict(method="tf_kd_self", options=dict(form="paper")), "options.form: not an option"),
    (dict(method="tf_kd_self", options=dict(teacher_epochs=0)), "options.teacher_epochs: expected an int >= 1"),
    (dict(method="tf_kd_self", options=dict(teacher={})), "options.teacher: not an option"),
    (dict(method="tf_kd_reg", options=dict(teacher_epochs=2)), "options.teacher_epochs: not an option of method "
                                                               "'tf_kd_reg'"),
    (dict(method="mutual", options=dict(peers=1)), "options.peers: expected an int >= 2"),
    (dict(method="mutual", options=dict(peer_model=dict(model="nope"))), "options.peer_model.model: expected one of"),
    (dict(method="mutual", options=dict(peer_model=dict(model="cnn", hidden=[3]))),
     "options.peer_model.hidden: only for model mlp"),
    (dict(method="mutual", options=dict(peer_model="mlp")), "options.peer_model: expected a mapping"),
    (dict(method="kd", teacher=dict(TEACHER), options=dict(peer_model=dict(model="mlp"))),
     "options.peer_model: not an option of method 'kd'"),
])
def test_refusals(over, msg):
    with pytest.raises(recipes.RecipeError, match=msg):
        recipe(**over)


def test_the_new_methods_need_no_teacher():
    for method in ("born_again", "tf_kd_self", "mutual"):
        assert recipe(method=method)["teacher"] is None
    assert recipe(method="snapshot_distill", options=dict(cycles=2))["teacher"] is None
    with pytest.raises(recipes.RecipeError, match="teacher: required by method 'kd'"):
        recipe(method="kd")


def test_snapshot_distill_is_kdcore_snapshot_distill(tmp_path):
    cfg = recipe(method="snapshot_distill", epochs=4, schedule="cosine", options=dict(cycles=2, T=3.0))
    m, folder, p, hist = run(cfg, 4, tmp_path)
    r = kdcore.snapshot_distill(p["student"], p["train"], cycles=2, epochs_per_cycle=2, T=3.0,
                                **{k: v for k, v in common(p, 4).items() if k not in ("epochs", "schedule")})
    assert hist["train_loss"] == list(r.history["train_loss"]) and hist["cycle"] == [0, 0, 1, 1]
    assert same_weights(load(os.path.join(folder, "student.safetensors"), p["student"]), r.model)
    assert len(hist["test_acc"]) == 4 and m["test_acc"] == hist["test_acc"][-1]


@pytest.mark.parametrize("over, msg", [
    (dict(epochs=5, options=dict(cycles=2)), "epochs: 5 is not a multiple of options.cycles \\(2\\)"),
    (dict(epochs=4), "epochs: 4 is not a multiple of options.cycles \\(3\\)"),
    (dict(epochs=4, options=dict(cycles=2), schedule="constant"), "schedule: snapshot_distill restarts"),
    (dict(epochs=4, options=dict(epochs_per_cycle=2)), "options.epochs_per_cycle: set by the recipe's epochs"),
    (dict(epochs=4, options=dict(cycles=2, min_lr=-1.0)), "options.min_lr: expected a number >= 0"),
])
def test_snapshot_distill_refusals(over, msg):
    with pytest.raises(recipes.RecipeError, match=msg):
        recipe(method="snapshot_distill", **over)
