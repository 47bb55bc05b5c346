"""Fingerprints of the frozen prefix's weights and of the input data.

A cache is only valid for the weights and data it was built from. The weights
fingerprint hashes every parameter and buffer (name, dtype, shape, bytes) of the modules
that run before the last boundary (``Capture.ran``). The data fingerprint hashes the
data set's length and ``probes`` evenly spaced samples (input bytes and label): a cheap
check that catches another data set, another order, or other preprocessing, not an edit
of one unprobed sample.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import DataError


def weights_fingerprint(model: nn.Module, module_names: Sequence[str], used: Sequence[str] = ()) -> str:
    """sha256 over the own parameters and buffers of the named modules, then over the
    parameters and buffers named in ``used`` (full names, :class:`UsedTensors`) that those
    modules do not own: a weight the forward takes straight from a module it never calls
    (``F.linear(x, self.embedding.weight)``, tied weights)."""
    modules = dict(model.named_modules())
    digest = hashlib.sha256()
    owned: set[str] = set()
    for name in sorted(set(module_names)):
        module = modules[name]
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tname, tensor in sorted(tensors, key=lambda kv: kv[0]):
            owned.add(f"{name}.{tname}" if name else tname)
            _hash_tensor(digest, f"{name}.{tname}", tensor)
    extra = sorted(set(used) - owned)
    if extra:  # only then: the fingerprints of models without such weights stay as they were
        named = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        digest.update(b"|used directly|")
        for tname in extra:
            _hash_tensor(digest, tname, named[tname])
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class UsedTensors(TorchFunctionMode):
    """Records which of ``model``'s parameters and buffers the torch calls inside the
    ``with`` block take as arguments (``names``: their full names): the weights a forward
    uses, whichever module owns them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._watched = {id(t): name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
        self.names: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self._see(args)
        self._see(kwargs.values())
        return func(*args, **kwargs)

    def _see(self, items: Any) -> None:
        for item in items:
            if isinstance(item, torch.Tensor):
                name = self._watched.get(id(item))
                if name is not None:
                    self.names.add(name)
            elif isinstance(item, (list, tuple)):
                self._see(item)


def _to_bytes(item: Any) -> bytes:
    if isinstance(item, torch.Tensor):  # as raw bytes: numpy has no bfloat16 (or float8)
        t = item.detach().cpu().contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    if isinstance(item, np.ndarray):
        return np.ascontiguousarray(item).tobytes()
    if isinstance(item, (tuple, list)):
        return b"|".join(_to_bytes(x) for x in item)
    return repr(item).encode()


def data_fingerprint(dataset: Any, probes: int = 64) -> str:
    """sha256 over len(dataset) and ``probes`` evenly spaced samples."""
    n = len(dataset)
    digest = hashlib.sha256(f"n={n}|".encode())
    for index in sorted(set(np.linspace(0, n - 1, num=min(probes, n), dtype=np.int64).tolist())):
        digest.update(f"{index}:".encode())
        try:
            item = dataset[index]
        except IndexError as exc:
            raise DataError(f"the data set says it has {n} items (len()), but item {index} raises IndexError: {exc}",
                            hint="make __len__ return the number of items __getitem__ serves") from None
        digest.update(_to_bytes(item))
    return digest.hexdigest()
