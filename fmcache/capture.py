"""Capture the outputs of named modules with forward hooks, stopping the forward early.

The frozen prefix of any ``nn.Module`` is "everything that runs before the last
requested boundary has fired": hooks record each boundary's output and, once all have
fired, raise a private exception that ends the forward pass, so later layers are never
computed. A module that fires more than once (a shared block) contributes its first
output.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import BuildError, LayerNotFoundError


class _StopForward(BaseException):
    """Raised inside a hook once every boundary has fired. A BaseException, so that a
    model whose forward catches ``Exception`` (a fallback path) does not swallow it and
    run on past the prefix."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside, and afterwards every submodule's own ``training`` flag
    as it was: ``model.train(was_training)`` would also switch a frozen BatchNorm or
    Dropout that the user had put in eval mode back to training."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def plain_module(model: Any) -> Any:
    """The module a ``torch.compile`` wrapper holds (layer names, weights and fingerprint are
    the eager model's, without the wrapper's ``_orig_mod.`` prefix); anything else as is."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(model, nn.Module) and isinstance(inner, nn.Module) else model


def resolve_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """name -> module for each requested boundary; a typed error suggests near names."""
    if not names:
        raise BuildError("no layer given", hint="pass at least one module name, e.g. --layer layer2")
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
            tops = [n for n, _ in model.named_children()]
            raise LayerNotFoundError(
                f"the model ({type(model).__name__}) has no module named {name!r}",
                hint=f"did you mean {', '.join(close)}?" if close else
                f"names come from model.named_modules(); top level: {', '.join(tops)}")
        found[name] = modules[name]
    return found


def _as_tensor(name: str, output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BuildError(f"module {name!r} returned {type(output).__name__}, not a tensor",
                     hint="choose a module whose output is a tensor (or a tuple starting with one)")


#: id(model) -> the thread capturing from it now
_capturing: dict[int, int] = {}
_capturing_lock = threading.Lock()


@contextmanager
def _only_here(model: nn.Module) -> Iterator[None]:
    """BuildError if another thread is capturing from the same model instance: hooks are
    the model's, so each forward pass would also fire the other's hooks and record its
    maps as the other batch's (one build failed with "never ran", the other could store
    the wrong batch's maps)."""
    me = threading.get_ident()
    with _capturing_lock:
        owner = _capturing.get(id(model))
        if owner is not None and owner != me:
            raise BuildError(f"another thread is running this {type(model).__name__} instance for a build "
                             "right now; its hooks would see the other build's batches",
                             hint="give each concurrent build a model of its own (copy.deepcopy(model)), or "
                                  "run the builds one after the other")
        _capturing[id(model)] = me
    try:
        yield
    finally:
        with _capturing_lock:
            if owner is None:
                del _capturing[id(model)]


class Capture:
    """Run ``model`` on inputs and return the outputs of ``names``.

    ``Capture(model, ["layer2"])(x)`` -> ``{"layer2": tensor}``; eval mode and no grad
    are the caller's business (the builder sets both). ``ran`` lists the modules whose
    forward started before the stop, in order (the frozen prefix).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.modules = resolve_modules(model, self.names)
        self.ran: list[str] = []

    def __call__(self, inputs: Any, *, record_prefix: bool = False) -> dict[str, torch.Tensor]:
        with _only_here(self.model):
            return self._capture(inputs, record_prefix)

    def _capture(self, inputs: Any, record_prefix: bool) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if name not in outputs:
                    # A copy, of every boundary: until the last one fires the forward goes
                    # on, and a later in-place op (ReLU(inplace=True), a residual's
                    # `out += x`) would overwrite an earlier output's storage; and a module
                    # may return a buffer it reuses (static output buffers, `out=` kernels),
                    # which the next forward (the next batch, a SACA variant) overwrites while
                    # the builder still encodes this one.
                    outputs[name] = _as_tensor(name, output).detach().clone()
                if len(outputs) == len(self.names):
                    raise _StopForward

            return hook

        for name, module in self.modules.items():
            try:
                handles.append(module.register_forward_hook(make_hook(name)))
            except RuntimeError as exc:  # torch.jit.script modules take no hooks
                for handle in handles:
                    handle.remove()
                raise BuildError(f"cannot watch module {name!r} of {type(self.model).__name__}: {exc}",
                                 hint="pass the eager nn.Module, not its torch.jit.script version") from None
        if record_prefix:
            self.ran = []
            for mname, module in self.model.named_modules():
                handles.append(module.register_forward_pre_hook(
                    lambda _m, _a, mname=mname: self.ran.append(mname) if mname not in self.ran else None))
        try:
            self.model(inputs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in self.names if n not in outputs]
        if missing:
            traced = isinstance(self.model, torch.jit.ScriptModule)
            raise BuildError(f"modules {missing} never ran in the model's forward pass"
                             + (" (a traced model: torch.jit.trace runs its graph, not the modules' "
                                "forward)" if traced else ""),
                             hint="pass the eager nn.Module the trace was made from" if traced else
                             "choose modules that the forward of this model calls")
        return outputs
