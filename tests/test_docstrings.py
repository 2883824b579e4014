"""Every public name of kdcore has a docstring: kdcore.__all__, each public submodule's
__all__, the public classes' public methods and properties, and every parameter of the
training entry points is described in its docstring."""
import inspect
import re
import types

import pytest

import kdcore


def _public_api():
    """(qualified name, object) for every public name, public methods of public classes included."""
    seen, out = set(), []

    def add(qual, obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        out.append((qual, obj))
        if inspect.isclass(obj) and obj.__module__.startswith("kdcore"):
            for name, member in vars(obj).items():
                if name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    out.append((f"{qual}.{name}", member))

    for name in kdcore.__all__:
        obj = getattr(kdcore, name)
        if isinstance(obj, types.ModuleType):
            add(f"kdcore.{name}", obj)
            for sub in getattr(obj, "__all__", []):
                add(f"kdcore.{name}.{sub}", getattr(obj, sub))
        else:
            add(f"kdcore.{name}", obj)
    return out


def _doc(obj):
    # inspect.getdoc inherits a docstring from a base class; an own one is wanted for classes
    # and modules, an inherited one is fine for an overriding method.
    if inspect.isclass(obj) or isinstance(obj, types.ModuleType):
        return obj.__doc__
    return inspect.getdoc(obj)


def test_every_public_name_has_a_docstring():
    api = _public_api()
    assert len(api) > 100
    missing = [q for q, obj in api if not (_doc(obj) or "").strip()]
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)


@pytest.mark.parametrize("fn", [kdcore.fit, kdcore.distill, kdcore.mutual, kdcore.slkd, kdcore.multi_exit,
                                kdcore.lr_find], ids=lambda f: f.__name__)
def test_every_parameter_of_the_training_entry_points_is_documented(fn):
    doc = inspect.getdoc(fn)
    undocumented = [p for p in inspect.signature(fn).parameters if not re.search(rf"\b{re.escape(p)}\b", doc)]
    assert not undocumented, f"{fn.__name__}: parameters not in the docstring: {undocumented}"
