"""The method reference pages (docs/methods/) against the library.

* every ``kdcore.losses.METHODS`` name and every training scheme has a page, no page is
  stale, and the index (docs/methods/README.md) and the README's method tables list them;
* every page's "Defaults" table holds the values the library uses, read from the library
  here (recipes, class and function signatures, the case tables of distill.py and
  schemes.py, the C defaults the binding exports), never from a copy in this file;
* the library agrees with itself where one default is kept in two places (distill.py's
  per-method defaults and the recipes, Python classes and functions and the C defaults);
* the loss classes' and functional forms' docstrings state their defaults as they are;
* every ```python block of the pages runs.
"""
import ast
import contextlib
import importlib
import inspect
import io
import math
import os
import re
import warnings

import numpy as np
import pytest

import kdcore
from kdcore import _kdcore, datafree, functional, losses, schemes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "methods")
distill_mod = importlib.import_module("kdcore.distill")   # kdcore.distill is the function

# Pages for options of distill rather than functions: page -> the distill parameters it documents.
OPTION_PAGES = {"multi_teacher": ("multi", "teacher_weights", "learn_gates", "gate_lr", "teacher_drop")}


def page_of_method(name):
    return re.sub(r"[^\w]", "_", name)


def scheme_functions():
    """The training entry points users call besides distill(method=...): the functions of
    kdcore.schemes, kdcore.distill and kdcore.datafree that take a number of epochs
    (``epochs``, ``epochs_per_cycle``) or of iterations (DeepInversion's image synthesis)."""
    out = {}
    for mod in (schemes, distill_mod, datafree):
        for name in mod.__all__:
            f = getattr(mod, name)
            if inspect.isfunction(f) and f is not kdcore.distill and \
                    any(p.startswith(("epochs", "iterations")) for p in inspect.signature(f).parameters):
                out[name] = f
    return out


def expected_pages():
    pages = {page_of_method(m) for m in losses.METHODS}
    pages |= set(scheme_functions()) | set(OPTION_PAGES)
    return pages


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def page_files():
    return sorted(f[:-3] for f in os.listdir(DOCS) if f.endswith(".md") and f != "README.md")


def table_after(text, header):
    """Rows (lists of cells) of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.replace(" ", "").startswith(header.replace(" ", "")):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    return None


def code(cell):
    m = re.match(r"`([^`]*)`", cell)
    return m.group(1) if m else None


# ---- pages, index, README ----------------------------------------------------------------

def test_every_method_and_scheme_has_a_page_and_no_page_is_stale():
    want, have = expected_pages(), set(page_files())
    assert not want - have, f"methods/schemes without a page in docs/methods: {sorted(want - have)}"
    assert not have - want, f"pages that match no method of METHODS nor scheme: {sorted(have - want)}"
    params = inspect.signature(kdcore.distill).parameters
    for page, opts in OPTION_PAGES.items():
        assert all(o in params for o in opts), f"{page}.md documents distill options that no longer exist: {opts}"


def test_the_index_lists_every_page():
    text = read(os.path.join(DOCS, "README.md"))
    links = set(re.findall(r"\]\(([\w]+)\.md\)", text))
    assert links == set(page_files()), f"index vs pages: missing {sorted(set(page_files()) - links)}, " \
                                       f"extra {sorted(links - set(page_files()))}"
    rows = table_after(text, "| method | family | page | reference |")
    assert rows is not None, "the index has no method table"
    named = {code(r[0]): r[2] for r in rows}
    assert set(named) == set(losses.METHODS), f"index methods {sorted(named)} vs METHODS {sorted(losses.METHODS)}"
    for m, link in named.items():
        assert f"]({page_of_method(m)}.md)" in link, f"index: {m} links {link}"


def test_readme_method_table_names_the_methods_of_METHODS():
    text = read(os.path.join(ROOT, "README.md"))
    rows = table_after(text, "| method | family | page |")
    assert rows is not None, "README.md has no '| method | family | page |' table listing every method"
    named = {code(r[0]): r[2] for r in rows}
    assert set(named) == set(losses.METHODS), \
        f"README table {sorted(named)} vs METHODS {sorted(losses.METHODS)}"
    for m, link in named.items():
        assert f"](docs/methods/{page_of_method(m)}.md)" in link, f"README: {m} links {link}"
    rows = table_after(text, "| scheme | page |")
    assert rows is not None, "README.md has no '| scheme | page |' table"
    linked = {re.search(r"docs/methods/(\w+)\.md", r[1]).group(1) for r in rows}
    assert linked == set(scheme_functions()) | set(OPTION_PAGES), f"README scheme table links {sorted(linked)}"


# ---- Defaults tables -----------------------------------------------------------------------

def param_default(obj, param):
    """The default of `param` in the signature of a function, or of a class's __init__ along
    its MRO (terms forward **kw to their bases)."""
    targets = [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    for t in targets:
        p = inspect.signature(t).parameters.get(param)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
    raise AssertionError(f"{getattr(obj, '__name__', obj)} has no parameter {param!r} with a default")


def resolve_callable(name):
    for ns in (losses, kdcore, functional, datafree, schemes, kdcore.models):
        obj = getattr(ns, name, None)
        if callable(obj):
            return obj
    raise AssertionError(f"no kdcore callable named {name!r}")


DISTILL_FIELDS = ("ce_weight", "kd_weight", "T", "warmup_epochs")   # distill.py's _DEFAULTS tuples


def case_default(func, param, case):
    """What `func` uses for `param` when it is not given, in `case`."""
    if func == "distill" and param in DISTILL_FIELDS:
        return distill_mod._DEFAULTS[case][DISTILL_FIELDS.index(param)]
    tables = {"multi_exit": distill_mod._EXIT_DEFAULTS, "tf_kd": schemes._TF_KD_DEFAULTS}
    assert func in tables, f"no case table for {func}({param}) [{case}]"
    return tables[func][case][param]


def resolve(spec, page):
    """The library's value for a Defaults row (the forms are listed in docs/methods/README.md)."""
    m = re.fullmatch(r'TERM_DEFAULTS\["(\w+)"\]\["(\w+)"\]', spec)
    if m:
        return _kdcore.TERM_DEFAULTS[m.group(1)][m.group(2)]
    m = re.fullmatch(r"(\w+)\((\w+)\)(?: \[([\w+]+)\])?", spec)
    if m:
        func, param, case = m.groups()
        if case is not None:
            return case_default(func, param, case)
        return param_default(resolve_callable(func), param)
    m = re.fullmatch(r"(\w+)\.(\w+)", spec)
    if m:
        cls, attr = m.groups()
        methods = [k for k in losses.METHODS if page_of_method(k) == page]
        assert methods, f"{page}.md: {spec!r} reads a recipe term, but {page} is not a method"
        terms = [t for t in losses.method_terms(methods[0]) if type(t).__name__ == cls]
        assert len(terms) == 1, f"{page}.md: the recipe of {methods[0]!r} has {len(terms)} {cls} terms"
        return getattr(terms[0], attr)
    raise AssertionError(f"{page}.md: cannot read the Defaults row {spec!r}")


def same(doc, lib):
    if isinstance(lib, (bool, str)) or lib is None or isinstance(doc, (bool, str)) or doc is None:
        return type(doc) is type(lib) and doc == lib
    if isinstance(lib, tuple) or isinstance(doc, tuple):   # MLKD's temperatures
        return isinstance(lib, tuple) and isinstance(doc, tuple) and len(doc) == len(lib) and \
            all(same(a, b) for a, b in zip(doc, lib))
    # C defaults arrive as float32 values: compare at float32 precision
    return np.float32(doc) == np.float32(lib)


def defaults_rows(page):
    text = read(os.path.join(DOCS, page + ".md"))
    sec = text.split("\n## Defaults\n", 1)
    assert len(sec) == 2, f"{page}.md has no '## Defaults' section"
    rows = table_after(sec[1], "| parameter | default |")
    assert rows, f"{page}.md: the Defaults section has no '| parameter | default |' table"
    return rows


@pytest.mark.parametrize("page", sorted(expected_pages()))
def test_defaults_table_matches_the_library(page):
    bad = []
    for row in defaults_rows(page):
        spec, value = code(row[0]), code(row[1])
        assert spec and value is not None, f"{page}.md: a Defaults row without `parameter` and `value`: {row}"
        doc = ast.literal_eval(value)
        lib = resolve(spec, page)
        if not same(doc, lib):
            bad.append(f"{spec}: page says {doc!r}, the library uses {lib!r}")
    assert not bad, f"{page}.md:\n" + "\n".join(bad)


def test_method_pages_cover_each_recipe_term_weight():
    """Each method page's Defaults table gives the weight of every term of the recipe."""
    for m in losses.METHODS:
        specs = {code(r[0]) for r in defaults_rows(page_of_method(m))}
        for t in losses.method_terms(m):
            assert f"{type(t).__name__}.weight" in specs, f"{page_of_method(m)}.md: no {type(t).__name__}.weight row"


# ---- the library agrees with itself ----------------------------------------------------------

@pytest.mark.parametrize("method", sorted(distill_mod._DEFAULTS))
def test_distill_method_defaults_equal_the_recipe(method):
    """distill(method=m) for ce/kd/dkd/mse takes its defaults from distill.py; the same
    method as terms (losses=method_terms(m)) from the recipe: they must be one recipe."""
    ce_w, kd_w, T, warm = distill_mod._DEFAULTS[method]
    terms = losses.method_terms(method)
    ce = [t for t in terms if isinstance(t, losses.CE)]
    rest = [t for t in terms if not isinstance(t, losses.CE)]
    assert len(ce) == 1 and ce[0].weight == ce_w
    assert len(rest) <= 1
    if not rest:
        assert kd_w == 0.0
        return
    (t,) = rest
    assert t.weight == kd_w, f"{method}: kd_weight {kd_w} vs the recipe's {t.weight}"
    assert t.warmup_epochs == warm, f"{method}: warmup_epochs {warm} vs the recipe's {t.warmup_epochs}"
    if hasattr(t, "T"):
        assert t.T == T, f"{method}: T {T} vs the recipe's {t.T}"


def test_distill_dkd_options_equal_the_dkd_term():
    for p in ("alpha", "beta"):
        assert param_default(kdcore.distill, p) == param_default(losses.DKD, p)


def test_multi_exit_teacher_weights_are_kds():
    kd = {type(t).__name__: t.weight for t in losses.method_terms("kd")}
    assert distill_mod._EXIT_DEFAULTS["teacher"] == dict(ce_weight=kd["CE"], kd_weight=kd["KD"])


def term_classes():
    return [getattr(losses, n) for n in losses.__all__
            if inspect.isclass(getattr(losses, n)) and issubclass(getattr(losses, n), losses.Loss)
            and getattr(losses, n).kind is not None]


# Keys of TERM_DEFAULTS every kind carries (kd_term_default's shared fields); they mean
# something only for the kinds that read them.
SHARED = {"weight", "T", "alpha", "beta", "k"}
READS = {"kd": {"T"}, "dkd": {"T", "alpha", "beta"}, "dist": {"T", "beta"}}


@pytest.mark.parametrize("cls", term_classes(), ids=lambda c: c.__name__)
def test_term_class_defaults_equal_the_c_defaults(cls):
    c = _kdcore.TERM_DEFAULTS[cls.kind]
    keys = (set(c) - SHARED) | READS.get(cls.kind, set())
    checked = 0
    for key in keys:
        try:
            py = param_default(cls, key)
        except AssertionError:
            continue
        if key == "form":
            py = _kdcore.AT_FORMS[py]
        assert same(py, c[key]), f"{cls.__name__}({key}={py!r}) vs C default {c[key]!r}"
        checked += 1
    assert checked >= len(READS.get(cls.kind, ())), f"{cls.__name__}: {checked} defaults compared of {sorted(keys)}"


@pytest.mark.parametrize("fn, kind, pairs", [
    (functional.kd_loss, "kd", {"T": "T"}),
    (functional.soft_target_loss, "kd", {"T": "T"}),
    (functional.dkd_loss, "dkd", {"T": "T", "alpha": "alpha", "beta": "beta"}),
    (functional.dist_loss, "dist", {"T": "T", "beta": "beta", "gamma": "gamma"}),
    (functional.tolerant_loss, "tolerant", {"K": "k"}),
    (functional.at_loss, "at", {"p": "p", "form": "form"}),
    (functional.rkd_loss, "rkd", {"w_dist": "w_dist", "w_angle": "w_angle"}),
    (functional.ab_loss, "ab", {"margin": "margin"}),
    (functional.ft_loss, "ft", {"p1": "p1", "p2": "p2"}),
    (functional.vid_loss, "vid", {"eps": "eps"}),
    (functional.ctkd_temperature, "ctkd", {"t_start": "t_start", "t_range": "t_range"}),
    (functional.ctkd_lambda, "ctkd", {"lambda_min": "lambda_min", "lambda_max": "lambda_max",
                                      "decay_epochs": "decay_epochs"}),
    (functional.mlkd_loss, "mlkd", {"temperatures": "temperatures", "percentile": "percentile"}),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_functional_defaults_equal_the_c_defaults(fn, kind, pairs):
    for py_name, c_name in pairs.items():
        py = param_default(fn, py_name)
        if py_name == "form":
            py = _kdcore.AT_FORMS[py]
        c = _kdcore.TERM_DEFAULTS[kind][c_name]
        assert same(py, c), f"{fn.__name__}({py_name}={py!r}) vs C default {c!r}"


# ---- docstrings state the defaults as they are ------------------------------------------------

NUM = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
WORDS = {"weight": "weight", "alpha": "alpha", "beta": "beta", "gamma": "gamma", "T": "T", "temperature": "T",
         "momentum": "momentum", "margin": "margin", "rate": "rate", "p1": "p1", "p2": "p2",
         "initial variance": "init_var"}
STATED = re.compile(r"(?:(\w+)\s+)?\b(" + "|".join(sorted(WORDS, key=len, reverse=True)) + r")\s+"
                    + NUM + r"(?![\w/^(]|\.\d)")


def stated_defaults(doc, name):
    """(parameter, value) pairs a docstring states as defaults. Phrases: '<word> <number>'
    ('weight 1000', 'temperature 0.07'; not after 'CE', which is the recipe's CE weight),
    'weights a and b' (RKD), 'N-epoch warm-up', 'Linear(d -> N)', 'N negatives',
    'min(N, ...)', 'times a/b' (a weight), "x='v' (default", 'Defaults x=v, y=w', and the
    keyword arguments of a ``Name(...)`` signature quoted in the docstring."""
    doc = " ".join(doc.split())
    out = []
    for prev, word, num in STATED.findall(doc):
        if prev != "CE":
            out.append((WORDS[word], float(num)))
    for a, b in re.findall(r"\bweights " + NUM + " and " + NUM, doc):
        out += [("w_dist", float(a)), ("w_angle", float(b))]
    out += [("warmup_epochs", float(n)) for n in re.findall(r"(\d+)-epoch (?:linear )?warm-up", doc)]
    out += [("dim", float(n)) for n in re.findall(r"Linear\(d -> (\d+)\)", doc)]
    out += [("n_neg", float(n)) for n in re.findall(r"(\d+) negatives", doc)]
    out += [("max_mid_channels", float(n)) for n in re.findall(r"\bmin\((\d+),", doc)]
    out += [("weight", float(a) / float(b)) for a, b in re.findall(r"\btimes (\d+)/(\d+)", doc)]
    out += [(k, v) for k, v in re.findall(r"(\w+)='(\w+)' \(default", doc)]
    for group in re.findall(r"\bDefaults?:? ((?:\w+=[\w.]+(?:, )?)+)", doc):
        out += [(k, v) for k, v in re.findall(r"(\w+)=([\w.]+)", group)]
    m = re.search(r"``" + re.escape(name) + r"\(([^`]*)\)``", doc)
    if m:
        out += [(k, v) for k, v in re.findall(r"(\w+)=([\w.]+)", m.group(1))]
    return out


def literal(v):
    if isinstance(v, str):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def docstring_targets():
    out = [(c.__name__, c) for c in term_classes()]
    out += [(n, getattr(functional, n)) for n in functional.__all__]
    return out


@pytest.mark.parametrize("name, obj", docstring_targets(), ids=[n for n, _ in docstring_targets()])
def test_docstring_defaults_are_the_real_defaults(name, obj):
    doc = inspect.getdoc(obj) if not inspect.isclass(obj) else obj.__doc__
    bad = []
    for key, value in stated_defaults(doc or "", name):
        try:
            real = param_default(obj, key)
        except AssertionError:
            continue          # a number about something else (a reference's setting)
        v = literal(value)
        if isinstance(real, str) or isinstance(v, str):
            ok = real == v
        else:
            ok = math.isclose(float(v), float(real), rel_tol=1e-6)
        if not ok:
            bad.append(f"the docstring says {key} {value}, the default is {real!r}")
    assert not bad, f"{name}: " + "; ".join(bad)


@pytest.mark.parametrize("cls", term_classes(), ids=lambda c: c.__name__)
def test_term_docstring_states_its_main_defaults(cls):
    """A term's docstring names its default weight (and temperature and mixing weights
    where it has them): what a user reads first in help()."""
    keys = {k for k, _ in stated_defaults(cls.__doc__ or "", cls.__name__)}
    missing = []
    for p in ("weight", "T", "alpha", "beta", "gamma"):
        try:
            param_default(cls, p)
        except AssertionError:
            continue
        if p not in keys:
            missing.append(p)
    assert not missing, f"{cls.__name__}'s docstring does not state its default {missing}"


# ---- snippets ---------------------------------------------------------------------------------

def snippets(page):
    return re.findall(r"```python\n(.*?)```", read(os.path.join(DOCS, page + ".md")), flags=re.S)


@pytest.mark.parametrize("page", sorted(expected_pages()))
def test_usage_snippets_run(page):
    blocks = snippets(page)
    assert blocks, f"{page}.md has no ```python usage snippet"
    for i, src in enumerate(blocks):
        ns = {"__name__": f"docs_{page}_{i}"}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("error", UserWarning)     # a snippet should not trigger kdcore's warnings
            exec(compile(src, f"docs/methods/{page}.md[{i}]", "exec"), ns)
