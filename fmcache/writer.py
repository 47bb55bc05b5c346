"""Create, append to and commit caches: the writing half of :mod:`fmcache.cache`.

Writing goes to ``<path>.partial`` (a directory for LMDB, a file for HDF5) while the
writer holds the path's lock. Each appended batch is stored atomically with a progress
blob, so an interrupted build can resume from its last batch (HDF5: from its last whole
chunks, :mod:`fmcache.backends.hdf5_writes`). :meth:`CacheWriter.commit`
writes the manifest *last* and then moves the partial location to ``path``: a cache at
``path`` is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .backends import Backend, PartSpec, backend_class, backend_for_suffix, detect_backend
from .codecs import Codec, channel_axis, codec_from_spec
from .codecs.base import as_float32, as_numpy
from .errors import (
    CacheError,
    CacheExistsError,
    CodecSpecError,
    CorruptionError,
    DiskFullError,
    EncodeError,
    FmcacheError,
    LayerNotFoundError,
    NonFiniteError,
    ResumeError,
    SampleIndexError,
    ShapeMismatchError,
)
from .manifest import LAYOUT_KEYS, WHOLE_PART, LayerInfo, Manifest, check_fingerprints, part_name, utc_now
from .paths import BuildLock, check_replaceable, install, interrupted_merge, partial_path, remove_path
from .tiers import TierPlan

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

TARGET_CHUNK_BYTES = 1 << 20
#: Free space kept beyond a batch's raw size: room for backend metadata (HDF5 writes
#: metadata lazily and crashes badly on a full disk, so we stop before it is full).
FREE_SPACE_MARGIN_BYTES = 1 << 20
#: Build settings (``Manifest.build``) a resume must share with the interrupted build:
#: they decide which data set items its samples are (a batch size may change).
RESUME_SAME_BUILD = ("shard", "layers", "samples_total", "variants", "input_shape")
#: Samples re-read per step when a resume checks what a non-atomic backend committed.
RESUME_CHECK_SAMPLES = 256


def default_samples_per_chunk(shape: Sequence[int]) -> int:
    """Samples per storage chunk: about 1 MiB of float32, between 1 and 1024."""
    nbytes = 4 * int(np.prod(shape))
    return int(min(1024, max(1, TARGET_CHUNK_BYTES // nbytes)))


class CacheWriter:
    """Builds a cache: declare layers, append batches, commit. Use :func:`create_cache`."""

    def __init__(self, path: str | os.PathLike[str], *, backend: str | None = None, overwrite: bool = False,
                 resume: bool = False, fingerprints: Mapping[str, str | None] | None = None,
                 build: Mapping[str, Any] | None = None, allow_stale: bool = False,
                 allow_nonfinite: bool = False) -> None:
        self.path = Path(os.path.abspath(path))  # a worker that reopens it may run in another directory
        self.partial = partial_path(self.path)
        self.allow_nonfinite = allow_nonfinite
        self._dtypes: dict[str, np.dtype] = {}  # first dtype seen per layer (and variant)
        self._committed = False
        self._write_failed = False
        self._lock = BuildLock(self.path)  # first: one writer per path
        try:
            self._start(backend, overwrite, resume, fingerprints, build, allow_stale, allow_nonfinite)
        except BaseException:
            self._lock.release()
            raise

    def _start(self, backend: str | None, overwrite: bool, resume: bool,
               fingerprints: Mapping[str, str | None] | None, build: Mapping[str, Any] | None,
               allow_stale: bool, allow_nonfinite: bool) -> None:
        if self.path.exists() and not overwrite:
            raise CacheExistsError(f"{self.path} already exists")
        if overwrite:
            check_replaceable(self.path)
        backend_id = backend_id_for(self.path, backend, resume)
        cls = backend_class(backend_id)
        fingerprints = dict(fingerprints or {})
        draft = None
        if resume and self.partial.exists():
            if detect_backend(self.partial) != backend_id:
                raise CacheError(f"{self.partial} is not a {backend_id} cache; cannot resume it as one")
            self.backend: Backend = cls(self.partial, writable=True)
            try:
                raw = self.backend.get_meta("draft")
                if raw is not None:
                    draft = Manifest.from_json(raw, f"{self.partial}: draft")
            except CorruptionError as exc:
                self.backend.close()
                raise ResumeError(f"cannot resume {self.partial}: {exc.message}") from exc
            except BaseException:
                self.backend.close()
                raise
            if draft is None:  # created but nothing declared yet: start again
                self.backend.close()
                remove_path(self.partial)
        elif self.partial.exists():
            if interrupted_merge(self.partial) is not None:  # never deleted: it holds the user's shards
                raise CacheExistsError(f"{self.partial} holds the shards of an interrupted merge",
                                       hint="run the same `fmcache merge` again: it moves them back, then merges")
            if not overwrite:
                raise CacheExistsError(f"{self.partial} holds an interrupted build",
                                       hint="finish it with --resume (resume=True), or start over with --overwrite "
                                            "(overwrite=True)")
            remove_path(self.partial)  # PATH.partial: a name of fmcache's own
        if draft is None:
            self.backend = cls.create(self.partial)
            self.manifest = Manifest(backend=backend_id, layers={}, fingerprints=fingerprints,
                                     build=dict(build or {}), fmcache_version=__version__)
            if allow_nonfinite:  # `verify` then takes decoded NaN/Inf for stored values, not damage
                self.manifest.build["allow_nonfinite"] = True
            self._write_draft()
            self.samples = 0
        else:
            try:
                self._reopen(draft, fingerprints, allow_stale, build or {})
            except BaseException:
                self.backend.close()
                raise

    def _reopen(self, draft: Manifest, fingerprints: Mapping[str, str | None], allow_stale: bool,
                build: Mapping[str, Any]) -> None:
        """Continue an interrupted build from its last committed batch."""
        # which samples go where: a resume as another shard appended another range of
        # the data set after this one's first samples, under this shard's manifest. First:
        # another layer set changes the prefix that runs, hence its weights fingerprint,
        # and a resume named that (--allow-stale) instead of the layers
        for key in RESUME_SAME_BUILD:
            if key in build and key in draft.build and build[key] != draft.build[key]:
                raise ResumeError(f"cannot resume {self.partial}: it was started with {key} "
                                  f"{draft.build[key]!r}, this build has {build[key]!r}",
                                  hint="resume with the options the build began with (--shard, --layer), "
                                       "or start over with --overwrite")
        check_fingerprints(draft.fingerprints, fingerprints, f"resuming {self.partial}", allow_stale)
        self.manifest = draft
        for index, layer in enumerate(draft.layers.values()):
            self._declare(index, layer)
        try:
            progress = self.backend.get_meta("progress")
            self.samples = int(json.loads(progress)["samples"]) if progress else 0
            if not self.backend.crash_atomic:
                self._check_committed()
            self.backend.truncate(self.samples)
        except (CorruptionError, SampleIndexError) as exc:
            raise ResumeError(f"cannot resume {self.partial}: what it committed is damaged ({exc.message})") from exc

    def _check_committed(self) -> None:
        """Re-read (checksums, decode) every committed sample and label: HDF5 may have
        been killed half-way through writing its metadata."""
        self.backend.read_labels(self.samples)
        for name in self.manifest.layers:
            for start in range(0, self.samples, RESUME_CHECK_SAMPLES):
                self.backend.read(name, np.arange(start, min(start + RESUME_CHECK_SAMPLES, self.samples)))

    # ---- declaring ------------------------------------------------------------------------
    def add_layer(self, name: str, shape: Sequence[int], *, codec: Codec | str | None = None,
                  plan: TierPlan | None = None, variants: Sequence[str] = (),
                  variant_tiers: Sequence[str] | None = None, samples_per_chunk: int | None = None,
                  extra: Mapping[str, Any] | None = None, packed: bool | None = None) -> LayerInfo:
        """Declare a layer: per-sample ``shape`` ((C, H, W), (T, D), ...) and either one
        ``codec`` for all channels or a tier ``plan``. ``variants`` names augmented copies
        stored for ``variant_tiers`` (default: the tier named 'sensitive' if any, else all).
        On resume, re-declaring a layer with the same layout is a no-op.

        ``packed``: store the base map whole (one part, one decode a sample, no merge)
        rather than tier by tier. The default (None) packs a plan of several tiers that
        share one channel-wise codec (:meth:`TierPlan.shared_codec`), where it changes no
        value; True asks for it (an error where the tiers cannot share a part), False
        keeps a part per tier."""
        shape = tuple(int(d) for d in shape)
        if not shape or any(d < 1 for d in shape):
            raise ShapeMismatchError(f"layer {name!r}: shape {shape} must be non-empty and positive")
        if not isinstance(name, str) or not name:
            raise CacheError(f"layer name {name!r} must be a non-empty string")
        channels = shape[channel_axis(len(shape))]
        if plan is None:
            plan = TierPlan.single(channels, codec_from_spec(codec if codec is not None else "raw"))
        elif codec is not None:
            raise CacheError(f"layer {name!r}: give a codec or a tier plan, not both")
        if plan.num_channels != channels:
            raise ShapeMismatchError(f"layer {name!r}: the tier plan covers {plan.num_channels} channels, "
                                     f"shape {shape} has {channels}")
        if variant_tiers is None:
            variant_tiers = ("sensitive",) if "sensitive" in plan.names else plan.names
        for tier in variant_tiers:
            plan.tier(tier)
        if len(set(variants)) != len(variants) or any(not v or "@" in v or "/" in v for v in variants):
            raise CacheError(f"layer {name!r}: variant names {list(variants)} must be unique, without '@' or '/'")
        shared = plan.shared_codec() is not None
        if packed and not shared:
            raise CacheError(f"layer {name!r}: packed=True needs tiers that share one channel-wise codec, "
                             f"got {plan!r}", hint="give every tier the same codec (not sz3/zfp), or packed=None")
        existing = self.manifest.layers.get(name)
        if packed is None:  # on resume, the layout the build began with
            packed = existing.packed if existing is not None else shared and len(plan.tiers) > 1
        info = LayerInfo(name=name, shape=shape, plan=plan,
                         samples_per_chunk=int(samples_per_chunk or default_samples_per_chunk(shape)),
                         variants=tuple(variants), variant_tiers=tuple(variant_tiers) if variants else (),
                         extra=dict(extra or {}), packed=bool(packed) and len(plan.tiers) > 1)
        if existing is not None:
            if existing.same_layout(info):
                return existing
            raise CacheError(f"{self.path}: layer {name!r} is already declared with another layout: "
                             f"{_layout_difference(existing, info)}",
                             hint="on resume, use the same codecs, tiers and variants as the first run")
        if self.samples:
            raise CacheError(f"cannot add layer {name!r} after {self.samples} samples were written")
        self._declare(len(self.manifest.layers), info)  # first: a refused codec leaves no manifest entry
        self.manifest.layers[name] = info
        self._write_draft()
        return info

    def _declare(self, index: int, layer: LayerInfo) -> None:
        """The layer declared in the backend; a codec it cannot store is a CodecSpecError
        that names the cache the user asked for (the backend writes to its ``.partial``)."""
        try:
            self.backend.declare_layer(index, layer.name, _part_specs(layer), layer.samples_per_chunk)
        except CodecSpecError as exc:
            raise CodecSpecError(f"{self.path}: {exc.message}", hint=exc.hint) from None

    def set_layer_extra(self, name: str, **extra: Any) -> None:
        """Attach JSON data (e.g. sensitivity scores) to a layer's manifest entry."""
        self._layer(name).extra.update(extra)
        self._write_draft()

    # ---- appending ------------------------------------------------------------------------
    def append(self, maps: Mapping[str, np.ndarray], labels: Sequence[Any] | np.ndarray,
               variants: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> int:
        """Append a batch: ``maps[layer]`` is ``(N, *shape)``; ``variants[layer][name]`` the
        augmented maps, full channels. Returns the number of samples now stored."""
        if not self.manifest.layers:
            raise CacheError("declare layers with add_layer() before appending")
        if set(maps) != set(self.manifest.layers):
            raise CacheError(f"append needs maps for layers {sorted(self.manifest.layers)}, got {sorted(maps)}")
        labels_arr = np.asarray(labels)
        if labels_arr.ndim == 0 or labels_arr.dtype.kind not in "biuf":
            raise ShapeMismatchError(f"labels must be a numeric array with one row per sample, got {labels_arr!r:.80}")
        n = len(labels_arr)
        self._check_labels(labels_arr)
        parts: dict[str, dict[str, np.ndarray]] = {}
        for name, layer in self.manifest.layers.items():
            batch = self._checked(name, layer, maps[name], n, "")
            layer_parts = {WHOLE_PART: batch} if layer.packed else layer.plan.split(batch, batched=True)
            for variant in layer.variants:
                given = (variants or {}).get(name, {}).get(variant)
                if given is None:
                    raise CacheError(f"layer {name!r}: append needs variant {variant!r} (declared in add_layer)")
                vbatch = self._checked(name, layer, given, n, f" variant {variant!r}")
                for tier in layer.variant_tiers:
                    layer_parts[part_name(tier, variant)] = layer.plan.select(vbatch, tier, batched=True)
            parts[name] = layer_parts
        self._check_free_space(parts, labels_arr)
        progress = json.dumps({"samples": self.samples + n}).encode()
        try:
            self.backend.write_batch(self.samples, parts, labels_arr, progress)
        except BaseException:
            self._write_failed = True  # the backend may hold part of this batch: close() adds nothing
            raise
        self.samples += n
        return self.samples

    def _checked(self, name: str, layer: LayerInfo, batch: np.ndarray, n: int, what: str) -> np.ndarray:
        arr = as_numpy(batch)
        if arr.shape != (n, *layer.shape):
            axis0 = "" if arr.shape[:1] == (n,) else (
                f" (its first axis holds {arr.shape[0] if arr.ndim else 'nothing'}, not the batch's {n} samples: "
                "a module that puts another axis first, such as a sequence-first transformer, or "
                "squeezes a batch of one)")
            raise ShapeMismatchError(
                f"layer {name!r}{what}: batch of shape {arr.shape} at sample {self.samples}, "
                f"expected {(n, *layer.shape)}{axis0}",
                hint="every batch must keep the layer's per-sample shape and the labels' length, the "
                     "samples along the first axis")
        if arr.dtype.kind not in "fiu":
            raise ShapeMismatchError(f"layer {name!r}{what}: dtype {arr.dtype} is not numeric")
        first = self._dtypes.setdefault(name + what, arr.dtype)
        if arr.dtype != first:
            raise ShapeMismatchError(f"layer {name!r}{what}: dtype changed from {first} to {arr.dtype} "
                                     f"at sample {self.samples}",
                                     hint="cast every batch to one dtype (the builder uses float32)")
        try:
            arr = as_float32(arr, f"{self.partial}: layer {name!r}{what}, the batch at sample {self.samples}")
        except EncodeError:
            for i in range(n):  # name the sample, as the codecs' refusals do
                as_float32(arr[i], f"{self.partial}: layer {name!r}{what}, sample {self.samples + i}")
            raise
        if self.allow_nonfinite:  # allowed, but only in tiers whose codec holds them
            for tier in layer.plan.tiers:
                if tier.codec.stores_nonfinite:
                    continue
                finite = np.isfinite(layer.plan.select(arr, tier.name, batched=True).reshape(n, -1)).all(axis=1)
                if not finite.all():
                    bad = self.samples + int(np.argmin(finite))
                    raise NonFiniteError(f"layer {name!r}{what}: NaN/Inf in the map of sample {bad}, in channels "
                                         f"of tier {tier.name!r}, whose codec {tier.codec.codec_id!r} cannot "
                                         "store them", sample=bad,
                                         hint="--allow-nonfinite needs codecs that keep NaN/Inf: raw, blosc2, "
                                              "fp16 or bf16")
        else:
            finite = np.isfinite(arr.reshape(n, -1)).all(axis=1)
            if not finite.all():
                bad = self.samples + int(np.argmin(finite))
                raise NonFiniteError(f"layer {name!r}{what}: NaN/Inf in the map of sample {bad} "
                                     f"({int((~finite).sum())} samples in this batch)", sample=bad)
        return arr

    def _check_free_space(self, parts: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray) -> None:
        """DiskFullError before writing a batch that might not fit (its raw size bounds
        what the codecs produce): a full disk must never reach the backend mid-batch."""
        need = labels.nbytes + FREE_SPACE_MARGIN_BYTES
        need += sum(4 * arr.size for layer_parts in parts.values() for arr in layer_parts.values())
        free = shutil.disk_usage(self.partial.parent).free
        if free < need:
            raise DiskFullError(f"{self.partial}: {free} bytes free, the batch at sample {self.samples} "
                                f"may need up to {need}; nothing of it was written")

    def _check_labels(self, labels: np.ndarray) -> None:
        info = {"dtype": labels.dtype.str, "shape": list(labels.shape[1:])}
        if self.manifest.labels is None:
            self.manifest.labels = info
            self._write_draft()
        elif self.manifest.labels != info:
            raise ShapeMismatchError(f"labels at sample {self.samples} are {info}, "
                                     f"earlier batches were {self.manifest.labels}",
                                     hint="every item's label needs one dtype and shape (e.g. return float(y) "
                                          "or int(y) throughout); then build again with --overwrite: the "
                                          "committed batches hold the old label type")

    # ---- committing -------------------------------------------------------------------------
    def commit(self, extra: Mapping[str, Any] | None = None) -> Manifest:
        """Write the manifest (last), close, and move the cache to its final path."""
        if self.samples == 0:
            raise CacheError(f"{self.path}: nothing to commit, no samples were appended")
        self.backend.finish()  # rows held back for chunks still filling (HDF5)
        manifest = self.manifest
        manifest.samples = self.samples
        manifest.extra.update(extra or {})
        for layer in manifest.layers.values():
            layer.stored_bytes = self.backend.stored_bytes(layer.name)
            layer.raw_bytes = {part: 4 * self.samples * int(np.prod(layer.part_shape(part)))
                               for part, _, _ in layer.parts()}
        manifest.complete = True
        manifest.committed_utc = utc_now()
        self.backend.put_meta("manifest", manifest.to_json())
        self.backend.flush()
        self.backend.close()
        install(self.partial, self.path)
        self._committed = True
        self._lock.release()
        return manifest

    def close(self) -> None:
        """Close without committing; the partial cache stays for ``resume`` when it holds
        committed samples. One that holds none (the build failed before its first batch
        was written: a bad codec spec, NaN in the first maps, bad labels) is removed: there
        is nothing in it to resume, and left behind it would refuse the next build."""
        if not self._committed:
            if self.samples and not self._write_failed and self.backend.writable:
                try:  # the backend's last word before a resume (HDF5 keeps its held rows to itself)
                    self.backend.finish(json.dumps({"samples": self.samples}).encode())
                except (FmcacheError, OSError):
                    pass  # the last progress mark stands: the resume recomputes from there
            self.backend.close()
            if self.samples == 0 and self.partial.exists():
                remove_path(self.partial)
        self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------
    def _layer(self, name: str) -> LayerInfo:
        try:
            return self.manifest.layers[name]
        except KeyError:
            raise LayerNotFoundError(f"no layer {name!r} declared", hint="call add_layer first") from None

    def _write_draft(self) -> None:
        self.backend.put_meta("draft", self.manifest.to_json())


def backend_id_for(path: str | os.PathLike[str], backend: str | None = None, resume: bool = False) -> str:
    """The backend a cache at ``path`` is written with: ``backend`` when given, else (on
    resume) that of the unfinished ``PATH.partial``, else the suffix's."""
    full = Path(os.path.abspath(path))
    partial = partial_path(full)
    return backend or (detect_backend(partial) if resume and partial.exists() else None) or backend_for_suffix(full)


def create_cache(path: str | os.PathLike[str], **kwargs: Any) -> CacheWriter:
    """Start (or with ``resume=True`` continue) writing a cache at ``path``.

    Keyword arguments are those of :class:`CacheWriter`: ``backend`` ('lmdb' or 'hdf5';
    default from the suffix, ``.h5``/``.hdf5`` -> hdf5), ``overwrite``, ``resume``,
    ``fingerprints``, ``build``, ``allow_stale``, ``allow_nonfinite``.
    """
    return CacheWriter(path, **kwargs)


def _layout_difference(was: LayerInfo, now: LayerInfo) -> str:
    """What differs between a declared layer and a new declaration of it, in words."""
    if was.plan != now.plan:
        def tiers(plan: Any, channels: bool) -> str:
            return ", ".join(f"{t.name} {t.codec.spec}" + (f" ({len(t.channels)} channels)" if channels else "")
                             for t in plan.tiers)
        # the channel counts only where the codecs alone read the same (another --rho)
        counts = tiers(was.plan, False) == tiers(now.plan, False)
        return f"tiers {tiers(was.plan, counts)} when it began, now {tiers(now.plan, counts)}" + (
            " (the same counts: other channels, another calibration)"
            if counts and tiers(was.plan, True) == tiers(now.plan, True) else "")
    a, b = was.to_dict(), now.to_dict()
    return "; ".join(f"{key} {a.get(key)!r} when it began, now {b.get(key)!r}"
                     for key in LAYOUT_KEYS if a.get(key) != b.get(key)) or "another layout"


def _part_specs(layer: LayerInfo) -> list[PartSpec]:
    return [PartSpec(name, layer.part_shape(name), layer.part_codec(name)) for name, _, _ in layer.parts()]
