"""The SLKD study's grid (benchmarks/study_slkd.py): every ablation of R9 is in it with the
options it claims, each differing from the SLKD row by that option alone, on the pairs of
distill_bench.py and feature_bench.py; and the recipes' ``options.sl_optimizer`` that the
study's SLKD rows use, and its ``sl_tau2`` that the slkd-no-tau2 row uses."""
import functools
import importlib.util
import inspect
import os

import pytest

import kdcore
from kdcore import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study():
    spec = importlib.util.spec_from_file_location("study_slkd", os.path.join(ROOT, "benchmarks", "study_slkd.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _study()
SLKD = dict(T=4.0, alpha=0.1, lam=1.0, eta=3.0, rho=0.5, n_sl=2, fuse="logits", sequential=False)
# row -> the options that differ from the "slkd" row
ABLATIONS = {"slkd": {}, "slkd-lam0": {"lam": 0.0}, "slkd-eta0": {"eta": 0.0}, "slkd-1sl": {"n_sl": 1},
             "slkd-rho0.7": {"rho": 0.7}, "slkd-star": {"sequential": True}, "slkd-probs": {"fuse": "probs"},
             "slkd-no-tau2": {"sl_tau2": False}}


@pytest.mark.parametrize("pair, lr", [("mlp", 0.05), ("conv", 0.05)])
def test_grid_has_every_ablation_with_its_options(pair, lr):
    grid = study.build_grid(pair)
    assert list(grid) == ["scratch", "kd", "kd-slkd-weights"] + list(ABLATIONS)
    cfg = {row: c for row, (_, c) in grid.items()}
    assert cfg["scratch"]["method"] == "scratch" and cfg["scratch"]["lr"] == lr
    assert (cfg["kd"]["method"], cfg["kd"]["options"], cfg["kd"]["lr"]) == \
        ("kd", dict(T=4.0, ce_weight=0.1, kd_weight=0.9), lr)
    # the control: SLKD's total weights (lambda + eta) * alpha and (lambda + eta) * (1 - alpha), at SLKD's lr
    assert cfg["kd-slkd-weights"]["method"] == "kd"
    assert cfg["kd-slkd-weights"]["options"] == dict(T=4.0, ce_weight=0.4, kd_weight=3.6)
    assert cfg["kd-slkd-weights"]["lr"] == lr / 4
    sl_opt = dict(name="sgd", momentum=0.9, weight_decay=5e-4, lr=lr)
    for row, change in ABLATIONS.items():
        c = cfg[row]
        assert c["method"] == "slkd" and c["lr"] == lr / 4, row
        assert c["options"] == dict(SLKD, **change, sl_optimizer=sl_opt), row
        diff = {k for k in set(c["options"]) | set(cfg["slkd"]["options"])
                if c["options"].get(k) != cfg["slkd"]["options"].get(k)}
        assert diff == set(change), row
        assert {k: v for k, v in c.items() if k not in ("name", "options")} == \
            {k: v for k, v in cfg["slkd"].items() if k not in ("name", "options")}, row
    # every SLKD option of the grid is a parameter of kdcore.slkd with a default of its type
    params = inspect.signature(kdcore.slkd).parameters
    for k, v in list(SLKD.items()) + [kv for change in ABLATIONS.values() for kv in change.items()]:
        assert type(params[k].default) is type(v), k
    # the rows differ only by method, lr and options: same data, models, budget and seeds
    for row, c in cfg.items():
        assert c["name"] == f"r9-{pair}-{row}"
        for k in ("teacher", "student", "data", "epochs", "batch_size", "optimizer", "schedule", "augment", "seeds"):
            assert c[k] == cfg["kd"][k], (row, k)
    assert cfg["kd"]["seeds"] == [0, 1, 2]
    assert cfg["kd"]["data"] == dict(source="fashion_mnist", train_size=6000, val_split=5000, test_size=None)


def test_pairs_are_the_benchmarks_pairs():
    mlp = study.build_grid("mlp")["kd"][1]
    assert mlp["teacher"] == dict(model="mlp", hidden=[1200, 1200], dropout=0.2, epochs=20,
                                  optimizer=dict(name="sgd", momentum=0.9, weight_decay=5e-4), lr=0.05,
                                  schedule="cosine", batch_size=128, seed=0)
    assert mlp["student"] == dict(model="mlp", hidden=[256]) and mlp["epochs"] == 20
    conv = study.build_grid("conv")["kd"][1]
    assert conv["teacher"] == dict(model="cnn", width=32, epochs=5, optimizer=dict(name="sgd", momentum=0.9,
                                                                                  weight_decay=5e-4),
                                   lr=0.05, schedule="cosine", batch_size=128, seed=0)
    assert conv["student"] == dict(model="cnn", width=16) and conv["epochs"] == 4 and conv["augment"] is False
    quick = study.build_grid("conv", seeds=[0], quick=True)["slkd"][1]
    assert (quick["epochs"], quick["seeds"], quick["data"]["train_size"], quick["teacher"]["train_size"]) == \
        (2, [0], 1000, 5000)


def test_no_tau2_row_is_the_slkd_option():
    # The row drops T^2 from the student's SL-teacher term through kdcore.slkd's own option
    # (the study has no rows it cannot run), and --rows selects rows for a paired rerun.
    assert not hasattr(study, "NOT_AVAILABLE")
    params = inspect.signature(kdcore.slkd).parameters
    assert params["sl_tau2"].default is True
    assert "A8 sl_tau2" in kdcore.slkd.__doc__
    grid = study.build_grid("mlp")
    assert grid["slkd-no-tau2"][1]["options"]["sl_tau2"] is False
    assert "sl_tau2" not in grid["slkd"][1]["options"]
    sub = study.build_grid("mlp", rows=["slkd", "kd", "slkd-no-tau2"])
    assert list(sub) == ["kd", "slkd", "slkd-no-tau2"]   # table order, not the argument's
    assert {r: c for r, (_, c) in sub.items()} == {r: grid[r][1] for r in sub}
    with pytest.raises(ValueError, match="rows: unknown"):
        study.build_grid("mlp", rows=["kd", "slkd-typo"])
    with pytest.raises(ValueError, match="must include kd"):
        study.build_grid("mlp", rows=["slkd"])


def _slkd_recipe(**options):
    return recipes.validate(dict(name="s", teacher=dict(model="mlp", hidden=[16], epochs=1),
                                 student=dict(model="mlp", hidden=[8]), data=dict(train_size=64, test_size=64),
                                 method="slkd", lr=0.02, epochs=1, batch_size=32, options=options))


def test_recipe_sl_optimizer_reaches_slkd(tmp_path, monkeypatch):
    seen = {}
    # a stand-in that records the keyword arguments (wraps: recipes read kdcore.slkd's signature)
    monkeypatch.setattr(kdcore, "slkd", functools.wraps(kdcore.slkd)(lambda *a, **kw: seen.update(kw)))
    for spec in (dict(name="sgd", lr=0.5, momentum=0.8, weight_decay=1e-3), "adam"):
        seen.clear()
        cfg = _slkd_recipe(sl_optimizer=spec)
        p = recipes.prepare(cfg, 0, tmp_path / "cache", train_teacher=False)
        recipes._train(cfg, p, 0, callback=None)
        opt = seen["sl_optimizer"]
        if spec == "adam":   # a name goes through as it is: kdcore.slkd builds it with its defaults
            assert opt == "adam"
        else:
            assert type(opt) is kdcore.optim.SGD
            assert (opt.lr, opt.momentum, opt.weight_decay) == (0.5, 0.8, 1e-3)
        assert seen["optimizer"].lr == 0.02   # the student's own recipe is untouched
    seen.clear()
    cfg = _slkd_recipe()
    recipes._train(cfg, recipes.prepare(cfg, 0, tmp_path / "cache", train_teacher=False), 0, callback=None)
    assert seen and "sl_optimizer" not in seen


def test_recipe_sl_tau2_reaches_slkd(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(kdcore, "slkd", functools.wraps(kdcore.slkd)(lambda *a, **kw: seen.update(kw)))
    cfg = _slkd_recipe(sl_tau2=False)
    recipes._train(cfg, recipes.prepare(cfg, 0, tmp_path / "cache", train_teacher=False), 0, callback=None)
    assert seen["sl_tau2"] is False
    for bad in ("no", 0, 1.0, [False]):
        with pytest.raises(recipes.RecipeError, match="options.sl_tau2: expected true or false"):
            _slkd_recipe(sl_tau2=bad)


@pytest.mark.parametrize("spec, msg", [
    (dict(name="sgd", betas=[0.9, 0.99]), "options.sl_optimizer.betas: not an option of sgd"),
    (dict(name="sgd", lr=-1), "options.sl_optimizer.lr: expected a number >= 0"),
    (dict(name="sgd", rate=1), "options.sl_optimizer.rate: unknown key"),
    ("nope", "options.sl_optimizer: expected one of sgd, adam, adamw or an optimizer mapping"),
])
def test_recipe_sl_optimizer_refusals(spec, msg):
    with pytest.raises(recipes.RecipeError, match=msg):
        _slkd_recipe(sl_optimizer=spec)
