"""Frozen prefix -> feature maps -> cache.

:func:`build_cache` runs the prefix of any ``nn.Module`` up to the named boundary modules
(eval mode, no grad, forward stopped after the last boundary), batches, encodes and
writes per-layer, per-sample maps with labels. It records fingerprints of the prefix's
weights and of the data, resumes an interrupted build from its last committed batch,
and can build one shard ``(index, count)`` of the data set (see :mod:`fmcache.shards`).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .augment import AugFamily, default_variants, parse_variant, variant_name
from .backends import backend_class
from .calibrate import Calibration, PixelSpace, calibrate, input_transform
from .capture import Capture, eval_mode, plain_module
from .codecs import Codec, codec_from_spec
from .codecs.lossless import blosc2_releasing_gil
from .codecs.sz3_process import bound, encoding_process
from .errors import BuildError, CodecSpecError, DataError, FmcacheError, NonFiniteError
from .fingerprint import UsedTensors, data_fingerprint, weights_fingerprint
from .gil import frequent_switches
from .manifest import Manifest
from .policy import CompressionPolicy, frozen_fraction
from .sensitivity import select_sensitive
from .tiers import TierPlan
from .writer import backend_id_for, create_cache, default_samples_per_chunk

DEFAULT_CODEC = "bf16"
PlanFor = Callable[[str, tuple[int, ...]], TierPlan]


def shard_range(num_samples: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, stop) of shard ``(index, count)``: contiguous, sizes differing by at most 1."""
    if shard is None:
        return 0, num_samples
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise BuildError(f"shard {index}/{count} is invalid", hint="use --shard i/n with 0 <= i < n")
    return num_samples * index // count, num_samples * (index + 1) // count


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def check_model_and_data(model: Any, dataset: Any) -> int:
    """The data set's length, after typed errors for what the build cannot take: a model
    that is not an ``nn.Module`` (a factory returning something else), a data set without
    a length (an IterableDataset, a generator) and an empty one."""
    if not isinstance(model, nn.Module):
        raise BuildError(f"the model is {_a(type(model).__name__)}, not a torch.nn.Module",
                         hint="the --model factory (or the model argument) must return the network itself")
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__") \
            or not hasattr(dataset, "__getitem__"):
        raise DataError(f"the data set is {_a(type(dataset).__name__)}, not a map-style data set (len() and "
                        "[index])", hint="wrap it in a map-style torch Dataset: fmcache indexes items by position")
    n = len(dataset)
    if n == 0:
        raise DataError("the data set has no items", hint="check the --data factory (or its data_dir)")
    return n


def prefix_fingerprint(model: nn.Module, layers: Sequence[str], example: torch.Tensor) -> str:
    """Fingerprint of the modules that run before the last boundary (and of any parameter
    or buffer the forward uses directly), found by running ``example`` (a batch) through
    the model once, in eval mode as the build does (a BatchNorm in training mode would
    otherwise update its statistics, and the fingerprint with them)."""
    model = plain_module(model)
    with eval_mode(model):
        return _probe(model, Capture(model, layers), example)[0]


def _probe(model: nn.Module, capture: Capture, example: torch.Tensor, batch: int | None = None
           ) -> tuple[str, dict[str, tuple[int, ...]], Callable[[], Any]]:
    """One small forward of ``example`` (``batch`` samples, where known): the prefix's weights
    fingerprint (the modules that ran, and any parameter or buffer the forward used directly),
    each boundary's per-sample map shape (checked to be a map fmcache can store, the samples
    along its first axis) and the no-grad context
    the prefix runs in: ``torch.inference_mode`` (the faster), or ``torch.no_grad`` for a
    model whose forward needs autograd inside (a gradient taken under
    ``torch.enable_grad()``, which inference mode's tensors refuse)."""
    grad_mode: Callable[[], Any] = torch.inference_mode
    with UsedTensors(model) as used:
        try:
            with grad_mode():
                outputs = capture(example, record_prefix=True)
        except FmcacheError:
            raise
        except Exception:  # noqa: BLE001 - once more without inference mode; a second failure is named
            grad_mode = torch.no_grad
            used.names.clear()
            with grad_mode():
                outputs = _forward(model, capture, example, record_prefix=True)
    for name, tensor in outputs.items():
        if tensor.is_complex():
            raise BuildError(f"module {name!r} outputs complex values ({tensor.dtype}); fmcache stores real maps",
                             hint="wrap the module to return torch.view_as_real(output) (real and imaginary "
                                  "parts as a last axis), or choose a module with a real output")
        if batch is not None and tensor.dim() and tensor.shape[0] != batch:
            raise BuildError(f"module {name!r} outputs shape {tuple(tensor.shape)} for a batch of {batch} "
                             f"samples: fmcache stores a module's output per sample along its first axis",
                             hint="put the batch axis first (batch_first=True for torch's transformer and "
                                  "recurrent layers), or wrap the module to return (N, ...)")
        if tensor.dim() < 2:
            raise BuildError(f"module {name!r} outputs one value per sample (batch shape {tuple(tensor.shape)}); "
                             "fmcache caches maps of at least one axis per sample",
                             hint="choose another module, or wrap this one to return shape (N, 1)")
    return (weights_fingerprint(model, capture.ran, used.names),
            {name: tuple(t.shape[1:]) for name, t in outputs.items()}, grad_mode)


def _forward(model: nn.Module, capture: Capture, inputs: Any, *, record_prefix: bool = False) -> dict[str, torch.Tensor]:
    """``capture(inputs)``; the model's own failure as a BuildError that says which inputs
    (shape, dtype, device) met which parameters."""
    try:
        return capture(inputs, record_prefix=record_prefix)
    except FmcacheError:
        raise
    except Exception as exc:
        param = next(itertools.chain(model.parameters(), model.buffers()), None)
        got = (f"inputs {tuple(inputs.shape)} {inputs.dtype} on {inputs.device}" if isinstance(inputs, torch.Tensor)
               else f"inputs of type {type(inputs).__name__}")
        has = f"; its parameters are {param.dtype} on {param.device}" if param is not None else ""
        raise BuildError(f"the model's forward failed on {got}{has}: {type(exc).__name__}: {exc}",
                         hint="give the data set inputs of the dtype and device the model takes (numpy arrays "
                              "are float64 unless made float32), and check that the model runs on one batch"
                         ) from exc


def _collate(items: Sequence[Any]) -> Any:
    """``default_collate`` of ``(input, label)`` items, a list or tuple label (multi-label
    targets) taken as one tensor first: ``default_collate`` turns a batch of lists into a
    list of per-position tensors, which stored each batch's labels transposed. Inputs or
    labels of different shapes are a DataError (torch's own: "stack expects each tensor to
    be equal size")."""
    shapes = {tuple(np.shape(x)) for x, _ in items}
    if len(shapes) > 1:
        raise DataError(f"inputs of different shapes {sorted(shapes)[:4]} in one batch",
                        hint="give every input one shape (resize or crop in the data set): the cache "
                             "stores one map shape per layer")
    for _, y in items:
        _check_label(y)
    items = [(x, _label_value(y)) for x, y in items]
    label_shapes = {tuple(np.shape(y)) for _, y in items}
    if len(label_shapes) > 1:  # torch's stack would say "stack expects each tensor to be equal size"
        raise DataError(f"labels of different shapes {sorted(label_shapes)[:4]} in one batch",
                        hint="give every item a label of one shape (pad multi-label targets to one length); "
                             "then build again with --overwrite")
    return default_collate(items)


def _check_label(label: Any, what: str = "a label") -> None:
    if label is None or isinstance(label, (str, bytes, Mapping)):
        raise DataError(f"{what} is {label!r:.80}: labels must be numeric (int, float or a numeric tensor)",
                        hint="map class names to integers; without labels, return (input, 0)")


def _label_value(label: Any) -> Any:
    """A list or tuple label as one tensor, a numpy uint64 as a Python int (torch has no
    uint64 collate), anything else as it is."""
    if isinstance(label, (list, tuple)):
        return torch.as_tensor(label)
    if isinstance(label, np.unsignedinteger) and label.dtype.itemsize == 8:
        return int(label)
    return label


def _stored(tensor: torch.Tensor) -> np.ndarray:
    """A boundary output as the writer takes it: floats as float32, integers as they are
    (the writer refuses those float32 cannot hold exactly), booleans as 0/1 floats."""
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _labels(label: Any) -> np.ndarray:
    if isinstance(label, torch.Tensor):
        return label.cpu().numpy()
    return np.asarray(label)


def build_cache(model: nn.Module, dataset: Dataset, layers: Sequence[str], out: str | os.PathLike[str], *,
                codec: Codec | str = DEFAULT_CODEC, plans: Mapping[str, TierPlan] | PlanFor | None = None,
                backend: str | None = None, batch_size: int = 64, resume: bool = False,
                overwrite: bool = False, shard: tuple[int, int] | None = None, num_workers: int = 0,
                variants: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                variant_tiers: Sequence[str] | None = None, allow_stale: bool = False,
                allow_nonfinite: bool = False, progress: bool = True, build_info: Mapping[str, Any] | None = None,
                layer_extra: Mapping[str, Mapping[str, Any]] | None = None,
                device: str | torch.device | None = None) -> Manifest:
    """Build (or resume) a cache of ``layers`` of ``model`` over ``dataset``.

    On Linux, call :func:`fmcache.tune_allocator` once before (the ``fmcache`` command
    does): with glibc's own malloc thresholds the prefix's activations can come back as
    fresh pages every batch, which made builds here 1.6–1.9× slower (fmcache.memory).
    Encoding runs on a background thread beside the prefix's forward pass; for the build,
    Python's GIL switch interval is at most 0.1 ms (process-wide, restored after;
    :mod:`fmcache.gil`), and SZ3 tiers of an LMDB cache are compressed by a child process
    (:mod:`fmcache.codecs.sz3_process`; ``FMCACHE_SZ3_PROCESS=0``: on the thread), since
    pysz keeps the GIL while it compresses and held the forward pass up. Builds may run on
    several threads at once, each with a model instance of its own: one instance run by two
    builds at once is refused (BuildError), since its hooks would see both builds' batches.

    Parameters
    ----------
    model
        Any ``nn.Module``; put in eval mode for the build (every submodule's own mode is
        restored afterwards) and run under ``torch.inference_mode`` (``torch.no_grad`` if
        its forward needs autograd inside).
    device
        Where the prefix runs: the model is moved there (and left there). Default: the
        device of the model's first parameter (CPU for a model without any), not moved.
    dataset
        A map-style data set of ``(input, label)``; inputs batch with the default collate.
    layers
        ``named_modules()`` names of the boundaries to cache.
    out
        Cache path; ``.h5``/``.hdf5`` selects HDF5 unless ``backend`` says otherwise.
    codec, plans
        One codec for every channel of every layer, or per layer a ``TierPlan`` (a mapping,
        or a function ``(layer, shape) -> TierPlan``).
    variants
        name -> input transform: for each, the prefix also runs on the transformed batch
        and the ``variant_tiers`` channels of its maps are stored (SACA).
    shard
        ``(index, count)``: build only that contiguous share of the data set.
    allow_nonfinite
        Store NaN/Inf maps (with a codec that keeps them: raw, blosc2, fp16, bf16) rather
        than stop at the first one; recorded in the manifest, so ``verify`` accepts them.
    """
    layers = list(dict.fromkeys(layers))
    model = plain_module(model)  # a torch.compile wrapper: the eager model's names and weights
    if not isinstance(codec, Codec):  # a bad spec fails here, before the prefix runs or anything is written
        codec = codec_from_spec(codec)
    n_total = check_model_and_data(model, dataset)
    capture = Capture(model, layers)  # validates names before anything is written
    lo, hi = shard_range(n_total, shard)
    if hi <= lo:
        assert shard is not None
        raise BuildError(f"shard {shard[0]}/{shard[1]} of a data set of {n_total} items is empty",
                         hint="use fewer shards than items")
    subset = Subset(dataset, range(lo, hi))
    if device is None:
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    else:
        model.to(device)
    with eval_mode(model):
        # A probe of two samples, not a batch: the build runs its own forward over every
        # sample anyway (a whole-batch probe added one batch of forward to each build), and
        # two samples, unlike one, keep a squeeze of the batch axis out of the shapes.
        _check_item(subset[0], lo)
        probe = min(2, hi - lo)
        first_inputs, _ = next(iter(DataLoader(subset, batch_size=probe, collate_fn=_collate)))
        first_inputs = first_inputs.to(device)
        weights, shapes, grad_mode = _probe(model, capture, first_inputs, probe)
        fingerprints = {"weights": weights, "data": data_fingerprint(dataset)}
        info = {"layers": layers, "batch_size": batch_size, "samples_total": n_total,
                "input_shape": list(first_inputs.shape[1:]),
                "shard": {"index": shard[0], "count": shard[1], "start": lo, "stop": hi} if shard else None,
                "variants": sorted(variants or {}), **dict(build_info or {})}
        writer = create_cache(out, backend=backend, overwrite=overwrite, resume=resume,
                              fingerprints=fingerprints, build=info, allow_stale=allow_stale,
                              allow_nonfinite=allow_nonfinite)
        with writer:
            for name in layers:
                plan = _plan_for(plans, name, shapes[name], codec)
                # no chunk longer than the data set: HDF5 allocates an unfiltered chunk whole
                # (a raw cache of 50 samples took 1 MiB for 50 KiB of maps)
                declared = writer.manifest.layers.get(name)  # a resume keeps what the build began with
                spc = declared.samples_per_chunk if declared is not None else \
                    min(default_samples_per_chunk(shapes[name]), hi - lo)
                writer.add_layer(name, shapes[name], plan=plan, variants=sorted(variants or {}),
                                 variant_tiers=variant_tiers, extra=dict((layer_extra or {}).get(name, {})),
                                 samples_per_chunk=spc)
            _run(model, capture, subset, writer, lo, batch_size, num_workers, variants or {}, progress, device,
                 tuple(first_inputs.shape[1:]), grad_mode)
            return writer.commit()


def _plan_for(plans: Mapping[str, TierPlan] | PlanFor | None, name: str, shape: tuple[int, ...],
              codec: Codec | str) -> TierPlan:
    from .codecs import channel_axis

    if plans is None:
        return TierPlan.single(shape[channel_axis(len(shape))], codec)
    if callable(plans):
        return plans(name, shape)
    if name in plans:
        return plans[name]
    return TierPlan.single(shape[channel_axis(len(shape))], codec)


def _check_item(item: Any, index: int) -> None:
    """DataError unless a data set item is an ``(input, label)`` pair the build can batch:
    other shapes failed deep inside the DataLoader or the model (a dict: "'str' object has
    no attribute 'to'"; an input alone was split along its first axis)."""
    where = f"data set item {index}"
    if isinstance(item, Mapping):
        raise DataError(f"{where} is a dict (keys {sorted(map(str, item))[:6]}); the builder needs (input, label) "
                        "pairs", hint="wrap the data set so that __getitem__ returns (input_tensor, label)")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise DataError(f"{where} is {what}; the builder needs (input, label) pairs",
                        hint="wrap the data set so that __getitem__ returns (input_tensor, label); "
                             "without labels, return (input, 0)")
    inputs, label = item
    if not isinstance(inputs, (torch.Tensor, np.ndarray)):
        raise DataError(f"{where}: the input is {_a(type(inputs).__name__)}, not a tensor",
                        hint="return the model's input as a torch.Tensor (or a numpy array)")
    _check_label(label, f"{where}: the label")
    if isinstance(label, (list, tuple)):
        try:
            torch.as_tensor(label)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{where}: the label {str(label)[:80]} is not a numeric array ({exc})",
                            hint="return a label of one numeric type and one shape for every item "
                                 "(a torch tensor, or a list of numbers)") from None


def _batches(loader: DataLoader, first: int, batch_size: int, input_shape: tuple[int, ...]) -> Iterator[Any]:
    """The loader's ``(inputs, labels)`` batches; a DataError names the data set items of
    its batch, and inputs of another shape than the first batch's are one (the stride of
    feature-space augmentation and the variants' transforms are those of one input shape)."""
    where = first
    kept = "the batches before it are kept: fix it and run again with --resume (resume=True)"
    batches = iter(loader)
    while True:
        items = f"data set items {where}-{where + batch_size - 1}"
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as exc:
            raise DataError(f"{items}: {exc.message}", hint=f"{exc.hint}; {kept}") from None
        if tuple(batch[0].shape[1:]) != input_shape:
            raise DataError(f"{items}: inputs of shape {tuple(batch[0].shape[1:])}, the first items' are "
                            f"{input_shape}", hint="give every input one shape (resize or crop in the data set): "
                                                   f"a cache holds one map shape per layer; {kept}")
        yield batch
        where += len(batch[1])


def _run(model: nn.Module, capture: Capture, subset: Subset, writer: Any, lo: int, batch_size: int,
         num_workers: int, variants: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], progress: bool,
         device: str | torch.device, input_shape: tuple[int, ...],
         grad_mode: Callable[[], Any] = torch.inference_mode) -> None:
    start = writer.samples
    remaining = Subset(subset.dataset, range(lo + start, lo + len(subset)))
    if len(remaining) == 0:
        return
    loader = DataLoader(remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(subset), initial=start, unit="sample", desc=f"build {Path(writer.path).name}",
                   dynamic_ncols=True, leave=False)
    t0, raw_bytes = time.perf_counter(), 0

    def append(maps: dict[str, np.ndarray], labels: np.ndarray, extra: dict[str, dict[str, np.ndarray]]) -> None:
        try:
            with bound(process):  # this build's SZ3 process, on its encoding thread
                writer.append(maps, labels, variants=extra or None)
        except NonFiniteError as exc:
            if not lo or exc.sample is None:
                raise
            raise NonFiniteError(f"{exc.message}: data set item {lo + exc.sample} (this shard starts at item {lo})",
                                 sample=exc.sample, hint=exc.hint) from None

    # Encoding and writing batch k runs on one background thread while the prefix computes
    # batch k + 1 (torch, LMDB and blosc2, once told to, release the GIL; by default blosc2
    # keeps it while it compresses and holds up the forward pass's Python on this thread):
    # the build then costs about the larger of the two instead of their sum. At most one
    # batch is in flight, appends keep their order, and an error surfaces at the next batch
    # or at the end. A codec that keeps the GIL while it compresses (pysz) would still hold
    # the forward pass up for Python's whole switch interval each time it wants the GIL
    # back: the interval is shortened for the build (fmcache.gil).
    # SZ3 stored through the bytes face (LMDB) compresses in a process of its own, off the
    # interpreter the forward pass needs (fmcache.codecs.sz3_process).
    codecs = [tier.codec for layer in writer.manifest.layers.values() for tier in layer.plan.tiers] \
        if writer.backend.codec_face == "bytes" else []
    pending: Future[None] | None = None
    with blosc2_releasing_gil(), frequent_switches(), encoding_process(codecs) as process, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmcache-build") as pool:
        try:
            with grad_mode():
                for inputs, labels in _batches(loader, lo + start, batch_size, input_shape):
                    inputs = inputs.to(device)
                    # a forward that changes its input in place (x.sub_(mean)) must not
                    # change what the variants' transforms see
                    maps = {k: _stored(v) for k, v in capture(inputs.clone() if variants else inputs).items()}
                    extra: dict[str, dict[str, np.ndarray]] = {}
                    if variants:
                        for vname, transform in variants.items():
                            vmaps = capture(transform(inputs))
                            for layer, tensor in vmaps.items():
                                extra.setdefault(layer, {})[vname] = _stored(tensor)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(append, maps, _labels(labels), extra)
                    raw_bytes += sum(m.nbytes for m in maps.values())
                    if bar is not None:
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        bar.update(len(labels))
                        bar.set_postfix_str(f"{raw_bytes / elapsed / 1e6:.0f} MB/s")
            if pending is not None:
                pending.result()
        finally:
            if bar is not None:
                bar.close()


# ---- SACA builds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SacaConfig:
    """How a SACA cache is calibrated and which variants it stores.

    Parameters
    ----------
    family
        The training augmentation family (recorded in the manifest; the Dataset draws from it).
    rho
        Fraction of channels in the sensitive tier.
    variants
        Canonical variant names to cache; ``None``: :func:`fmcache.augment.default_variants`
        (flip, then shifts by the stride multiple nearest ``2 max_shift / 3``), the first
        ``max_variants`` of them when that is set.
    n_samples, shifts_per_sample, seed
        Calibration subset size, shift draws per sample, seed (:mod:`fmcache.calibrate`).
    photometric_in_calibration
        Also measure one photometric draw per sample (reported per kind); it counts in the
        selection only when ``family`` itself draws photometric jitter.
    """

    family: AugFamily = field(default_factory=AugFamily)
    rho: float = 0.25
    variants: tuple[str, ...] | None = None
    max_variants: int | None = None
    n_samples: int = 512
    shifts_per_sample: int = 2
    seed: int = 0
    photometric_in_calibration: bool = True

    def __post_init__(self) -> None:
        # checked when made: a bad value failed after calibration, or (``fmcache train``)
        # after a whole epoch of training, with a hint about map shapes
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 <= self.rho <= 1:
            raise BuildError(f"SACA: rho={self.rho!r} must be a fraction in [0, 1]",
                             hint="the share of channels kept as true augmented variants (--rho)")
        for name, least in (("max_variants", 1), ("n_samples", 1), ("shifts_per_sample", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise BuildError(f"SACA: {name}={value!r} must be a whole number >= {least}",
                                 hint="--max-variants, --calib-samples: positive whole numbers")
        if self.variants is not None and not self.family.flip:
            flipped = [v for v in self.variants if parse_variant(v).flip]
            if flipped:  # the Dataset never draws a flip: the stored variant would never be served
                raise BuildError(f"SACA: variants {flipped} flip, but the augmentation family has no flip (--no-flip)",
                                 hint="drop the flip variants, or the family's no-flip")

    def get_config(self) -> dict[str, Any]:
        return {"family": self.family.get_config(), "rho": self.rho,
                "variants": list(self.variants) if self.variants is not None else None,
                "max_variants": self.max_variants,
                "n_samples": self.n_samples, "shifts_per_sample": self.shifts_per_sample, "seed": self.seed,
                "photometric_in_calibration": self.photometric_in_calibration}

    def variant_names(self, stride: int) -> list[str]:
        if self.variants is not None:
            return [variant_name(parse_variant(v)) for v in self.variants]
        names = [variant_name(d) for d in default_variants(self.family.max_shift, stride, flip=self.family.flip)]
        return names if self.max_variants is None else names[:self.max_variants]


def selection_scores(calibration: Calibration, family: AugFamily) -> np.ndarray:
    """Scores the sensitive tier is chosen by: the pair-weighted mean over the kinds
    ``family`` draws (photometric counts only if the family jitters)."""
    kinds = [k for k in calibration.per_kind if k != "photometric" or family.photometric]
    if not kinds:
        return calibration.scores
    weights = np.array([calibration.kind_pairs.get(k, 1) for k in kinds], dtype=np.float64)
    stacked = np.stack([calibration.per_kind[k] for k in kinds])
    return (weights[:, None] * stacked).sum(axis=0) / weights.sum()


def build_saca_cache(model: nn.Module, dataset: Dataset, layer: str, out: str | os.PathLike[str], *,
                     saca: SacaConfig | None = None, policy: CompressionPolicy | None = None,
                     frozen: float | None = None, pixels: PixelSpace | None = None,
                     build_info: Mapping[str, Any] | None = None, **kwargs: Any) -> Manifest:
    """Calibrate, select the sensitive tier, and build a two-tier cache with variants.

    ``policy`` (default :meth:`CompressionPolicy.default`) picks the codecs for the freeze
    depth ``frozen`` (default :func:`fmcache.policy.frozen_fraction` of ``layer``).
    The manifest's layer extra holds the scores, the selection, ``rho`` and their summary;
    its build info the augmentation family, the SACA config and the policy stage.
    Other keyword arguments go to :func:`build_cache`.
    """
    model = plain_module(model)
    check_model_and_data(model, dataset)
    saca = saca or SacaConfig()
    pixels = pixels or PixelSpace()
    policy = policy or CompressionPolicy.default()
    if frozen is None:
        top = layer.split(".")[0]
        frozen = frozen_fraction(model, layer) if top in dict(model.named_children()) else 1.0
    bulk, sensitive = policy.codecs_for(frozen)
    storage = backend_class(backend_id_for(out, kwargs.get("backend"), bool(kwargs.get("resume", False))))
    for spec in (bulk, sensitive):  # a codec the backend refuses: now, not after calibrating
        try:
            storage.check_codec(codec_from_spec(spec), (1, 1))
        except CodecSpecError as exc:
            raise CodecSpecError(f"{out}: layer {layer!r}: {exc.message}", hint=exc.hint) from None
    calib_family = replace(saca.family, photometric=True) if saca.photometric_in_calibration else saca.family
    t0 = time.perf_counter()
    cal = calibrate(model, layer, dataset, calib_family, n_samples=saca.n_samples, seed=saca.seed,
                    shifts_per_sample=saca.shifts_per_sample, pixels=pixels)
    calibrate_s = time.perf_counter() - t0
    scores = selection_scores(cal, saca.family)
    chosen = select_sensitive(scores, saca.rho)
    plan = TierPlan.two_tier(len(scores), chosen.tolist(), sensitive, bulk)
    # rho = 0 (or a rounding to no channel): no sensitive tier, so no variants to keep;
    # the Dataset's "saca" is then feature mode, as docs/saca.md defines it
    names = saca.variant_names(cal.stride) if len(chosen) else []
    transforms = {name: input_transform(parse_variant(name), pixels) for name in names}
    extra = cal.layer_extra(saca.rho, selection=scores)
    info = {"augment_family": saca.family.get_config(), "saca": saca.get_config(), "pixels": pixels.get_config(),
            "policy": policy.get_config(), "frozen_fraction": frozen, "calibrate_s": round(calibrate_s, 3),
            **dict(build_info or {})}
    return build_cache(model, dataset, [layer], out, plans={layer: plan}, variants=transforms or None,
                       variant_tiers=["sensitive"] if transforms else None, build_info=info,
                       layer_extra={layer: extra}, **kwargs)
