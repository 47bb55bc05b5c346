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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def weights_fingerprint(model: nn.Module, module_names: Sequence[str]) -> str:
    """sha256 over the own parameters and buffers of the named modules."""
    modules = dict(model.named_modules())
    digest = hashlib.sha256()
    for name in sorted(set(module_names)):
        module = modules[name]
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tname, tensor in sorted(tensors, key=lambda kv: kv[0]):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}.{tname}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _to_bytes(item: Any) -> bytes:
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().contiguous().numpy().tobytes()
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
        digest.update(_to_bytes(dataset[index]))
    return digest.hexdigest()
