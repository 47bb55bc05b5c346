"""The error tree: every error lives in fmcache/errors.py, under FmcacheError, drawn in its docstring.

Modules that raise an error may re-export it (``from fmcache.zoo.resnet import BoundaryError``),
but the class must be the very one in :mod:`fmcache.errors`, and the tree in that module's
docstring must name every class with its place and its built-in mixins, so it cannot drift.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import pytest

import fmcache
import fmcache.errors
from fmcache.errors import FmcacheError

# Modules that once defined their own errors, with the errors each must still provide.
REEXPORTERS: dict[str, tuple[str, ...]] = {
    "fmcache.augment": ("AugmentationError", "SensitivityError", "StrideError", "VariantNameError"),
    "fmcache.augment.errors": ("AugmentationError", "SensitivityError", "StrideError", "VariantNameError"),
    "fmcache.zoo": ("BoundaryError", "DataError", "DataFileNotFoundError", "ModelConfigError", "TrainingError"),
    "fmcache.zoo.fashion_mnist": ("DataError", "DataFileNotFoundError"),
    "fmcache.zoo.pretrain": ("TrainingError",),
    "fmcache.zoo.resnet": ("BoundaryError", "ModelConfigError"),
    "fmcache.sampler": ("SamplerConfigError",),
    "fmcache.freezing": ("FreezeError",),
    "fmcache.policy": ("PolicyError",),
}


def _exception_classes(module: ModuleType) -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException)
    }


def _fmcache_errors() -> dict[str, type[FmcacheError]]:
    return {
        name: cls
        for name, cls in _exception_classes(fmcache.errors).items()
        if cls.__module__ == fmcache.errors.__name__
    }


def _tree() -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """``{name: (parent name, mixin names)}`` as drawn in the docstring of fmcache/errors.py."""
    doc = fmcache.errors.__doc__ or ""
    entry = re.compile(r"^ {4}((?:[│ ] {3})*)(?:[├└]── )?([A-Z]\w*)(?: \(([\w, ]+)\))?(?:\s|$)")
    tree: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    stack: list[str] = []  # stack[d] is the latest entry at depth d
    started = False
    for line in doc.splitlines():
        if line.strip() == "FmcacheError":
            started = True
        if not started or not line.strip():
            continue
        match = entry.match(line)
        assert match, f"unreadable line in the error tree: {line!r}"
        indent, name, mixins = match.groups()
        depth = len(indent) // 4 + (0 if name == "FmcacheError" else 1)
        del stack[depth:]
        parent = stack[-1] if stack else None
        stack.append(name)
        assert name not in tree, f"{name} appears twice in the error tree"
        tree[name] = (parent, tuple(m.strip() for m in mixins.split(",")) if mixins else ())
    return tree


def test_every_error_in_fmcache_errors_derives_from_fmcache_error() -> None:
    classes = _exception_classes(fmcache.errors)
    assert classes, "fmcache.errors defines no exception classes?"
    for name, cls in classes.items():
        if issubclass(cls, Exception):
            assert issubclass(cls, FmcacheError), f"fmcache.errors.{name} does not derive from FmcacheError"


def test_all_lists_every_error() -> None:
    assert sorted(fmcache.errors.__all__) == sorted(_fmcache_errors())


@pytest.mark.parametrize("module_name", sorted(REEXPORTERS))
def test_modules_reexport_the_central_classes(module_name: str) -> None:
    module = importlib.import_module(module_name)
    found = _exception_classes(module)
    missing = set(REEXPORTERS[module_name]) - set(found)
    assert not missing, f"{module_name} no longer provides {sorted(missing)}"
    for name, cls in found.items():
        if not issubclass(cls, FmcacheError):
            continue
        assert cls.__module__ == "fmcache.errors", f"{module_name}.{name} is defined outside fmcache/errors.py"
        assert cls is getattr(fmcache.errors, name, None), f"{module_name}.{name} is not fmcache.errors.{name}"
    exported = getattr(module, "__all__", None)
    if exported is not None:
        for name in REEXPORTERS[module_name]:
            assert name in exported, f"{name} dropped from {module_name}.__all__"


def test_no_fmcache_module_defines_its_own_error() -> None:
    for info in pkgutil.walk_packages(fmcache.__path__, "fmcache."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional backend that is not installed here
            continue
        for name, cls in _exception_classes(module).items():
            if issubclass(cls, FmcacheError):
                assert cls.__module__ == "fmcache.errors", f"{info.name}.{name} belongs in fmcache/errors.py"


def test_the_docstring_tree_names_every_error() -> None:
    doc = fmcache.errors.__doc__ or ""
    for name in _fmcache_errors():
        assert re.search(rf"\b{name}\b", doc), f"{name} is missing from the tree in fmcache/errors.py"


def test_the_docstring_tree_matches_the_classes() -> None:
    tree = _tree()
    classes = _fmcache_errors()
    assert set(tree) == set(classes), "the tree and the classes of fmcache/errors.py differ"
    for name, (parent, mixins) in tree.items():
        cls = classes[name]
        fmcache_bases = [base.__name__ for base in cls.__bases__ if issubclass(base, FmcacheError)]
        other_bases = tuple(base.__name__ for base in cls.__bases__ if not issubclass(base, FmcacheError))
        if name == "FmcacheError":
            assert parent is None
            continue
        assert fmcache_bases == [parent], f"{name} sits under {parent} in the tree, but derives from {fmcache_bases}"
        assert mixins == other_bases, f"the tree gives {name} the mixins {mixins}, the class {other_bases}"
