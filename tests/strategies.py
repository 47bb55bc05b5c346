"""Feature-map generators for tests: hypothesis strategies and a plain numpy function.

``realistic_post_relu(rng, shape)`` mimics the post-ReLU maps measured on a CIFAR-style
ResNet-18 (measurements.md): 35-50 % exact zeros overall, per-channel zero fractions
spread around that, a heavy right tail, a little spatial correlation. Other tests and
tools import it, so it takes a numpy ``Generator`` and does not need hypothesis.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _smooth_hw(x: np.ndarray) -> np.ndarray:
    """3x3 box blur over the last two axes (edge-padded): neighbouring pixels correlate."""
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(x, pad, mode="edge")
    h, w = x.shape[-2:]
    total = sum(p[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return total / 9.0


def realistic_post_relu(rng: np.random.Generator, shape: tuple[int, ...],
                        zero_fraction: float | None = None) -> np.ndarray:
    """A float32 map that looks like a post-ReLU activation.

    Parameters
    ----------
    rng : numpy Generator supplying the randomness.
    shape : (C, H, W) (any ndim >= 3 has channels on axis 0), or (T, D) / (D,) with
        channels on the last axis.
    zero_fraction : overall fraction of exact zeros; drawn from U(0.35, 0.50) if None.

    Returns
    -------
    float32 array of ``shape``: non-negative, about ``zero_fraction`` exact zeros (each
    channel between 0.05 and 0.9), positives with a lognormal-like heavy right tail and a
    per-channel scale.
    """
    shape = tuple(int(d) for d in shape)
    if zero_fraction is None:
        zero_fraction = float(rng.uniform(0.35, 0.50))
    channel_first = len(shape) >= 3
    n_channels = shape[0] if channel_first else shape[-1]
    pre = rng.standard_normal(shape)
    if channel_first:  # neighbours correlate; unit spread again so the tail stays realistic
        smooth = _smooth_hw(pre)
        pre = smooth / max(float(smooth.std()), 1e-6) + 0.3 * rng.standard_normal(shape)
    # Per-channel zero fractions spread around the target, then centred back on it.
    spread = rng.uniform(-0.2, 0.2, n_channels)
    per_channel = np.clip(zero_fraction + spread - spread.mean(), 0.05, 0.9)
    # Channels on one axis, everything else flattened: (C, rest).
    flat = pre.reshape(n_channels, -1) if channel_first else pre.reshape(-1, n_channels).T
    if flat.shape[1] >= 4:
        thresholds = np.array([np.quantile(row, q) for row, q in zip(flat, per_channel)])
    else:  # too few values per channel for a per-channel quantile: one threshold
        thresholds = np.full(n_channels, np.quantile(flat, zero_fraction))
    positive = np.maximum(flat - thresholds[:, None], 0.0)
    positive[flat <= thresholds[:, None]] = 0.0  # exact zeros below the threshold
    scale = rng.lognormal(-0.5, 0.6, n_channels)[:, None]
    tail = scale * np.expm1(0.8 * positive)  # heavy right tail, zero stays zero
    out = tail if channel_first else tail.T
    return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)


_chw_shapes = st.tuples(st.integers(1, 13), st.integers(1, 9), st.integers(1, 9))
_td_shapes = st.tuples(st.integers(1, 17), st.integers(1, 24))
_d_shapes = st.tuples(st.integers(1, 40))
_KINDS = ("normal", "uniform", "lognormal-sparse", "spiky", "constant", "zeros", "smooth")


def _numpy_map(rng: np.random.Generator, shape: tuple[int, ...], kind: str, exponent: int) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-1.0, 1.0, shape)
    elif kind == "lognormal-sparse":
        x = rng.lognormal(0.0, 1.5, shape) * (rng.random(shape) > 0.45)
    elif kind == "spiky":  # magnitudes spread over 6 decades within one map
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape)
    elif kind == "constant":
        x = np.full(shape, rng.standard_normal())
    elif kind == "zeros":
        x = np.zeros(shape)
    else:
        x = np.cumsum(rng.standard_normal(shape), axis=-1)
    return (x * 2.0**exponent).astype(np.float32)


@st.composite
def feature_maps(draw: st.DrawFn, max_abs: float = 1e4) -> np.ndarray:
    """Random float32 maps, shapes (C, H, W), (T, D) or (D,), odd sizes and single elements.

    Values are finite with ``|x| <= max_abs``; about a third are element-wise hypothesis
    floats (edge values: 0, -0, subnormals, the bounds), the rest numpy-generated maps of
    several kinds scaled by a power of two.
    """
    shape = draw(st.one_of(_chw_shapes, _td_shapes, _d_shapes))
    if draw(st.integers(0, 2)) == 0:
        elements = st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False)
        return draw(hnp.arrays(np.float32, shape, elements=elements))
    kind = draw(st.sampled_from(_KINDS))
    exponent = draw(st.integers(-12, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    x = _numpy_map(np.random.default_rng(seed), shape, kind, exponent)
    return np.clip(x, -max_abs, max_abs)


@st.composite
def post_relu_maps(draw: st.DrawFn) -> np.ndarray:
    """Realistic post-ReLU maps (:func:`realistic_post_relu`), shape (C, H, W), C odd too."""
    shape = draw(st.tuples(st.sampled_from([1, 3, 5, 8, 12, 17]), st.integers(1, 12), st.integers(1, 12)))
    seed = draw(st.integers(0, 2**32 - 1))
    return realistic_post_relu(np.random.default_rng(seed), shape)


@st.composite
def batches(draw: st.DrawFn, maps: st.SearchStrategy[np.ndarray] | None = None,
            max_samples: int = 4) -> np.ndarray:
    """A batch ``(N, *shape)`` of maps of one shape (the HDF5 face works on batches)."""
    first = draw(maps if maps is not None else feature_maps())
    n = draw(st.integers(1, max_samples))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Further samples: the first one permuted and rescaled, so they share its character.
    others = [rng.permutation(first.reshape(-1)).reshape(first.shape) * np.float32(rng.uniform(0.5, 1.0))
              for _ in range(n - 1)]
    return np.stack([first, *others]).astype(np.float32)
