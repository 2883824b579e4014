"""The recipe keys the study scripts' teachers need (kdcore.recipes): teacher.snapshot (the
teacher after N of its epochs, bitwise the full run's weights then), teacher.seed as a list
(several teachers, multi-teacher KD, measured against their mixture) and method tf_kd_reg
(teacher-free KD from a virtual teacher, as kdcore.tf_kd runs it)."""
import numpy as np
import pytest

import kdcore
from kdcore import recipes
from kdcore.metrics import _log_softmax

TEACHER = dict(model="mlp", hidden=[24], epochs=4, train_size=400, schedule="cosine", lr=0.05, batch_size=64)


def recipe(**over):
    raw = dict(name="r", teacher=dict(TEACHER), student=dict(model="mlp", hidden=[12]),
               data=dict(train_size=300, val_split=100, test_size=300), method="kd", epochs=2, batch_size=64)
    raw.update(over)
    return recipes.validate(raw)


def params(model):
    return {k: np.array(v) for k, v in model.state_dict().items()}


def test_snapshot_is_the_full_run_after_n_epochs(tmp_path):
    cache = tmp_path / "cache"
    snap = recipes.prepare(recipe(teacher=dict(TEACHER, snapshot=2)), 0, cache)
    full = recipes.prepare(recipe(), 0, cache)
    assert snap["teacher_info"]["path"] != full["teacher_info"]["path"]
    # the same run, kept after its second epoch: fit's own snapshot of that epoch
    ref = recipes.prepare(recipe(), 0, cache, train_teacher=False)["teacher"]
    full_set, _, _, _ = recipes._splits(recipe(), 0)
    t_data = full_set.subset(np.sort(np.random.default_rng(0).permutation(len(full_set))[:TEACHER["train_size"]]))
    hist = kdcore.fit(ref, t_data, epochs=4, batch_size=64, optimizer=recipes._optimizer("sgd", 0.05, ""),
                      schedule="cosine", seed=0, progress=False, keep_snapshots=[1, 3])
    got, want_final = params(snap["teacher"]), params(full["teacher"])
    for k, v in hist.snapshots[1].items():
        assert np.array_equal(got[k], np.asarray(v)), k
    for k, v in hist.snapshots[3].items():
        assert np.array_equal(want_final[k], np.asarray(v)), k
    assert any(not np.array_equal(got[k], want_final[k]) for k in got)
    # cached: loading it again gives the same weights
    again = recipes.prepare(recipe(teacher=dict(TEACHER, snapshot=2)), 0, cache)
    assert again["teacher_info"]["source"] == "cache"
    assert all(np.array_equal(params(again["teacher"])[k], got[k]) for k in got)


def test_a_recipe_without_snapshot_keeps_its_cache_key():
    # caches written before teacher.snapshot existed stay valid
    cfg = recipe()
    key = recipes._teacher_key(cfg)
    assert "snapshot" not in key["teacher"]
    assert recipes._teacher_key(recipe(teacher=dict(TEACHER, snapshot=2)))["teacher"]["snapshot"] == 2
    # the last epoch is the end of the run: the same teacher, the same cache entry
    assert recipes._teacher_key(recipe(teacher=dict(TEACHER, snapshot=4))) == key


def test_several_teachers_one_per_seed(tmp_path):
    cache = tmp_path / "cache"
    cfg = recipe(teacher=dict(TEACHER, seed=[0, 1]))
    p = recipes.prepare(cfg, 0, cache)
    assert isinstance(p["teacher"], list) and len(p["teacher"]) == 2
    single = recipes.prepare(recipe(teacher=dict(TEACHER, seed=1)), 0, cache)
    assert p["teacher_info"][1] == dict(single["teacher_info"], source="trained")
    assert single["teacher_info"]["source"] == "cache"   # the list's second teacher is the seed-1 teacher
    z = [kdcore.predict(t, p["test"]) for t in p["teacher"]]
    zt = recipes._teacher_logits(p["teacher"], p["test"])
    mix = (np.exp(_log_softmax(z[0])) + np.exp(_log_softmax(z[1]))) / 2
    assert np.allclose(np.exp(_log_softmax(zt)), mix, atol=1e-5)
    m = recipes.run_one(cfg, 0, tmp_path / "runs", cache=cache)
    rep = m["report"]
    assert rep["teacher_accuracy"] == pytest.approx(np.mean(zt.argmax(1) == p["test"].y))
    assert rep["teacher_accuracies"] == [pytest.approx(np.mean(zi.argmax(1) == p["test"].y)) for zi in z]
    assert 0 <= m["best_test_agreement"] <= 1


@pytest.mark.parametrize("over, msg", [
    (dict(teacher=dict(TEACHER, seed=[0, 0])), "teacher.seed: a seed appears twice"),
    (dict(teacher=dict(TEACHER, seed=[0, 1]), method="slkd"), "teacher.seed: a list of seeds .* not 'slkd'"),
    (dict(teacher=dict(TEACHER, seed=[0, 1]), method="scratch"), "teacher.seed: a list of seeds .* not 'scratch'"),
    (dict(teacher=dict(TEACHER, seed=[0])), "teacher.seed: expected"),
    (dict(teacher=dict(TEACHER, snapshot=5)), "teacher.snapshot: 5 is past the teacher's 4 epochs"),
    (dict(teacher=dict(TEACHER, snapshot=0)), "teacher.snapshot: expected an int >= 1"),
    (dict(method="tf_kd_reg", teacher=None, options=dict(alpha=1.5)), "options.alpha: expected a number >= 0 and <= 1"),
    (dict(method="tf_kd_reg", teacher=None, options=dict(mode="self")), "options.mode: not an option"),
    (dict(method="tf_kd_reg", teacher=None, options=dict(a=1.0)), "options.a: expected a number > 0 and < 1"),
])
def test_refusals(over, msg):
    with pytest.raises(recipes.RecipeError, match=msg):
        recipe(**over)


def test_tf_kd_reg_is_kdcore_tf_kd_virtual(tmp_path):
    cfg = recipe(method="tf_kd_reg", teacher=None, options=dict(alpha=0.2, T=10.0))
    m = recipes.run_one(cfg, 3, tmp_path / "runs")
    assert m["method"] == "tf_kd_reg" and m["teacher"] is None
    p = recipes.prepare(cfg, 3, tmp_path / "cache")
    r = kdcore.tf_kd(p["student"], p["train"], mode="virtual", epochs=2, batch_size=64, optimizer=p["optimizer"],
                     schedule=p["schedule"], val=p["val"], seed=3, alpha=0.2, T=10.0, progress=False)
    assert m["test_acc"] == kdcore.evaluate(r.student, p["test"], batch_size=500)["accuracy"]
    hist = recipes._read_json(str(tmp_path / "runs" / "r" / "seed-3" / "history.json"))
    assert hist["train_loss"] == pytest.approx(list(r.student_history["train_loss"]), rel=0, abs=0)


def test_teacher_path_is_where_the_cache_puts_the_teacher(tmp_path):
    cache = tmp_path / "cache"
    cfg = recipe()
    path = recipes.teacher_path(cfg, cache)
    assert not (tmp_path / "cache").exists()
    p = recipes.prepare(cfg, 0, cache)
    info = p["teacher_info"]
    assert (info["source"], info["path"]) == ("trained", path) and info["cpu_time"] > 0
    assert recipes.teacher_path(recipe(teacher=dict(TEACHER, snapshot=2)), cache) != path
    # another recipe loads it as its checkpoint: the same weights
    loaded = recipes.prepare(recipe(teacher=dict(model="mlp", hidden=[24], checkpoint=path)), 0, cache)
    assert all(np.array_equal(v, params(p["teacher"])[k]) for k, v in params(loaded["teacher"]).items())
    for teacher, what in ((dict(model="mlp", hidden=[24], checkpoint=path), "a checkpoint"),
                          (dict(TEACHER, seed=[0, 1]), "a list of seeds")):
        with pytest.raises(recipes.RecipeError, match=f"teacher: teacher_path is for .* not {what}"):
            recipes.teacher_path(recipe(teacher=teacher), cache)
    with pytest.raises(recipes.RecipeError, match="not none"):
        recipes.teacher_path(recipe(teacher=None, method="scratch"), cache)
