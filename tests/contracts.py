"""Each codec's error contract as a checkable bound (docs/codecs.md states the same)."""

from __future__ import annotations

import numpy as np

from fmcache.codecs import Codec, channel_axis


def max_abs_error_bound(codec: Codec, x: np.ndarray) -> np.ndarray:
    """Per-element bound on |x - decode(encode(x))| for one sample ``x``; inf = no bound."""
    cfg = codec.get_config()
    cid = cfg["id"]
    ax = np.abs(x.astype(np.float64))
    if cid in ("raw", "blosc2"):
        return np.zeros_like(ax)
    if cid == "fp16":
        return np.maximum(ax * 2.0**-11, 2.0**-25) * (1 + 1e-6)
    if cid == "bf16":
        return np.maximum(ax * 2.0**-8, 2.0**-126) * (1 + 1e-6)
    if cid in ("int8", "int4"):
        bits = 8 if cid == "int8" else 4
        axis = channel_axis(x.ndim)
        moved = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
        lo, hi = moved.min(axis=1), moved.max(axis=1)
        bound = (hi - lo) / (2 * (2**bits - 1)) + 2.0**-20 * np.maximum(np.abs(lo), np.abs(hi)) + 2.0**-118
        shape = [1] * x.ndim
        shape[axis] = -1
        return np.broadcast_to(bound.reshape(shape), x.shape)
    if cid == "zfp":
        if cfg.get("accuracy") is not None:
            return np.full_like(ax, float(cfg["accuracy"]) * (1 + 1e-6))
        return np.full_like(ax, np.inf)
    if cid == "sz3":
        if cfg.get("abs") is not None:
            return np.full_like(ax, float(cfg["abs"]) * (1 + 1e-5))
        span = float(x.max() - x.min())
        return np.full_like(ax, float(cfg["rel"]) * span * (1 + 1e-5) + 1e-30)
    if cid == "grid":
        if cfg.get("abs") is not None:
            return np.full_like(ax, float(cfg["abs"]))
        return np.full_like(ax, float(cfg["rel"]) * (float(x.max()) - float(x.min())))
    raise KeyError(f"no contract known for codec {cid!r}")


def assert_within_contract(codec: Codec, x: np.ndarray, y: np.ndarray, where: str = "") -> None:
    assert y.shape == x.shape and y.dtype == np.float32, (where, y.shape, y.dtype)
    bound = max_abs_error_bound(codec, x)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    bad = err > bound
    assert not bad.any(), (
        f"{where} {codec.spec}: {int(bad.sum())} values exceed the contract, worst error "
        f"{err[bad].max():.3g} vs bound {bound[bad][np.argmax(err[bad])]:.3g}")
    if codec.keeps_zeros or (codec.codec_id in ("int8", "int4") and x.min() >= 0):
        assert np.all(y[x == 0] == 0), f"{where} {codec.spec}: zeros not kept"
