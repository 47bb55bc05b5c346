"""Models and data sets by reference: ``'package.module:factory'``.

The CLI takes ``--model`` and ``--data`` as such references; the factory is called with
no arguments (or the keyword arguments given) and must return an ``nn.Module`` or a
map-style ``Dataset``. The current directory is importable, as for ``python -m``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import SpecImportError


def load_factory(ref: str) -> Callable[..., Any]:
    """The callable named by ``'package.module:attr'``."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpecImportError(f"{ref!r} is not a 'package.module:factory' reference")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecImportError(f"cannot import {module_name!r} for {ref!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SpecImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise SpecImportError(f"{ref!r} names a {type(target).__name__}, not a callable factory")
    return target


def call_factory(ref: str, **kwargs: Any) -> Any:
    """``load_factory(ref)(**kwargs)``; a factory that takes none of ``kwargs`` (``--data-dir``
    given for a factory without ``data_dir``) is a SpecImportError naming it, not a TypeError
    from inside the call."""
    factory = load_factory(ref)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        given = ", ".join(f"{k}=" for k in kwargs) or "no arguments"
        missing = "missing" in str(exc)
        hint = ("the CLI calls factories with no arguments (--data-dir passes data_dir=): give the missing "
                "ones defaults, or pass --data-dir where it is data_dir") if missing else \
            "give it a parameter of that name, or leave out the option that passes it (--data-dir passes data_dir=)"
        raise SpecImportError(f"{ref!r} cannot be called with {given} ({exc})", hint=hint) from None
    except ValueError:  # no signature to check (some builtins): let the call say
        pass
    return factory(**kwargs)


def load_weights(model: Any, path: str) -> None:
    """``model.load_state_dict(torch.load(path))`` (``--weights``), its failures BuildErrors
    that name the file: a file that is no state dict was torch's unpickling traceback, a
    state dict of another model its "Missing key(s)" RuntimeError."""
    import torch

    from .errors import BuildError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise BuildError(f"{path}: not a state dict torch.load can read ({type(exc).__name__}: {first})",
                         hint="pass a file saved with torch.save(model.state_dict(), PATH)") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines())[:400]  # the key names too
        raise BuildError(f"{path}: its weights do not fit the model {type(model).__name__}: {first}",
                         hint="pass the state dict saved from this --model (the same factory and arguments)"
                         ) from None
