"""Sharded builds and their merge.

A build split across processes or ranks writes one cache per shard (``--shard i/n``:
samples ``[i*N/n, (i+1)*N/n)``). :func:`merge_shards` moves the shard caches into one
directory and writes ``fmcache-shards.json`` last (the commit point): a lossless, O(1)
merge, since no map is decoded or re-encoded. :func:`fmcache.open_cache` opens such a
directory as a :class:`ShardedCache`, which reads like one cache (``fmcache compact``
rewrites it as a single flat cache when wanted).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import Cache, partial_path
from .errors import CacheError, CacheExistsError, CorruptionError, IncompleteCacheError, SampleIndexError
from .manifest import LayerInfo, Manifest, json_crc32
from .paths import MERGE_JOURNAL, BuildLock, interrupted_merge, undo_merge

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

SHARDS_FILE = "fmcache-shards.json"


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / SHARDS_FILE).is_file()


def check_shards(caches: Sequence[Cache]) -> int:
    """That ``caches`` (in data order) are every shard of one build, each once: their
    recorded ranges follow on, their fingerprints, layers and tier plans agree, and
    together they cover the build's data set. Returns the number of samples."""
    first = caches[0].manifest
    expected = 0
    for cache in caches:
        m = cache.manifest
        shard = m.build.get("shard") or {"start": 0, "stop": len(cache)}
        if shard["start"] != expected or shard["stop"] - shard["start"] != len(cache):
            raise CacheError(f"{cache.path}: shard starts at sample {shard['start']}, expected {expected}",
                             hint="pass every shard of the build; none may be missing or repeated")
        expected = shard["stop"]
        if m.fingerprints != first.fingerprints:
            raise CacheError(f"{cache.path}: fingerprints differ from {caches[0].path}'s; shards of one build only",
                             hint="build every shard from the same model weights and data set")
        if list(m.layers) != list(first.layers):
            raise CacheError(f"{cache.path}: layers {list(m.layers)} differ from {caches[0].path}'s "
                             f"{list(first.layers)}", hint="build every shard with the same --layer options, "
                                                           "in the same order")
        if [(layer.to_dict()["plan"], layer.packed) for layer in m.layers.values()] != \
                [(layer.to_dict()["plan"], layer.packed) for layer in first.layers.values()]:
            raise CacheError(f"{cache.path}: tier plans (codecs, channels) or their packing differ from "
                             f"{caches[0].path}'s", hint="build every shard with the same codec options")
    total = first.build.get("samples_total", expected)
    if expected != total:
        raise CacheError(f"the shards cover samples 0..{expected - 1} of {total}", hint="pass every shard")
    return expected


def _check_movable(shards: Sequence[str | os.PathLike[str]], out: Path) -> None:
    """What would make the merge fail part-way, after it moved some shards: a shard that
    is itself a merge, OUT inside a shard, a shard on another file system than OUT (a
    move there is a copy, which os.replace refuses)."""
    target = out.resolve()
    device = os.stat(target.parent if target.parent.exists() else Path.cwd()).st_dev
    for shard in map(Path, shards):
        if shard.is_symlink():  # moved into OUT, a relative link would point nowhere
            raise CacheError(f"{shard} is a symbolic link: merge moves the shards themselves",
                             hint=f"give the shard's own path ({shard.resolve()})")
        if is_sharded(shard):
            raise CacheError(f"{shard} is a merged cache, not a shard",
                             hint="merge the original shards together, or `fmcache compact` this merge into one "
                                  "cache first")
        here = shard.resolve()
        if here == target or here in target.parents:
            raise CacheError(f"OUT {out} is inside the shard {shard}", hint="put OUT beside the shards")
        if here.exists() and os.stat(here).st_dev != device:
            raise CacheError(f"{shard} is on another file system than OUT {out}: merge moves the shards",
                             hint="put the shards and OUT on one file system (or `fmcache compact` a shard "
                                  "across first)")


def merge_shards(shards: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Move complete shard caches (in data order) into ``out`` and commit the merge."""
    out = Path(out)
    empty_folder = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if out.exists() and not empty_folder:
        raise CacheExistsError(f"{out} already exists",
                               hint="merge moves the shards into a new OUT and never replaces one: choose "
                                    "another path, or remove OUT first")
    staging = partial_path(out)
    with BuildLock(out):
        moves = interrupted_merge(staging) if staging.exists() else None
        if moves is not None:  # a merge killed part-way: its shards go back first
            try:
                undo_merge(staging, moves)
            except OSError as exc:  # their folder moved or gone meanwhile
                raise CacheError(f"{staging} holds shards an interrupted merge moved there, and they cannot go "
                                 f"back ({exc})", hint=f"move its shard-* folders back by hand: where each came "
                                 f"from is in {staging / MERGE_JOURNAL}; then merge again") from None
        elif staging.is_dir() and not staging.is_symlink() and not any(staging.iterdir()):
            staging.rmdir()  # a merge killed before it wrote its journal: nothing moved
        if staging.exists():
            raise CacheExistsError(f"{staging} exists: left by an interrupted build or merge",
                                   hint="if it holds shard-* caches, move them back to where they were; then "
                                        "remove it and merge again")
        return _merge(shards, out, staging, empty_folder)


def _merge(shards: Sequence[str | os.PathLike[str]], out: Path, staging: Path, empty_folder: bool) -> Path:
    _check_movable(shards, out)
    caches = [Cache(p) for p in shards]
    if not caches:
        raise CacheError("merge_shards needs at least one shard")
    caches.sort(key=lambda c: (c.manifest.build.get("shard") or {}).get("start", 0))
    expected = check_shards(caches)
    for cache in caches:
        cache.close()
    if empty_folder:
        out.rmdir()  # an empty folder made for OUT: taken once the shards are known good (kept otherwise)
    staging.mkdir(parents=True)
    moves = [(str(c.path), f"shard-{i:05d}-of-{len(caches):05d}{c.path.suffix}") for i, c in enumerate(caches)]
    # the journal first: a merge killed while it moves shards is undone by the next one
    (staging / MERGE_JOURNAL).write_text(json.dumps({"moves": moves}))
    try:
        for src, name in moves:
            os.replace(src, staging / name)
        doc = json.dumps({"format_version": 1, "shards": [name for _, name in moves], "samples": expected}).encode()
        (staging / SHARDS_FILE).write_bytes(doc)
        (staging / (SHARDS_FILE + ".crc32")).write_text(str(json_crc32(doc)))
        os.replace(staging, out)
    except BaseException as exc:  # a full disk, Ctrl-C: every shard back where it was
        try:
            undo_merge(staging, moves)
        except OSError as undo:
            raise CacheError(f"the merge into {out} failed ({exc}) and moving the shards back failed too ({undo})",
                             hint=f"the shards are in {staging} (shard-*, in the order of "
                                  f"{staging / MERGE_JOURNAL}): move them back by hand") from exc
        raise
    (out / MERGE_JOURNAL).unlink()
    return out


class ShardedCache:
    """Several shard caches read as one (same API as :class:`fmcache.Cache`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(path))  # a worker that reopens it may run in another directory
        raw = (self.path / SHARDS_FILE).read_bytes()
        crc_file = self.path / (SHARDS_FILE + ".crc32")
        if not crc_file.exists() or int(crc_file.read_text()) != json_crc32(raw):
            raise CorruptionError(f"{self.path}: {SHARDS_FILE} fails its checksum")
        doc = json.loads(raw)
        if not doc.get("shards"):
            raise IncompleteCacheError(f"{self.path}: no shards listed")
        self.shards = [Cache(self.path / name) for name in doc["shards"]]
        try:  # what the merge checked, again: a shard file replaced since was served as if nothing changed
            if check_shards(self.shards) != doc.get("samples"):
                raise CacheError(f"the shards hold other samples than the {doc.get('samples')} the merge recorded")
        except CacheError as exc:
            raise CorruptionError(f"{self.path}: {exc.message}",
                                  hint="a shard file was replaced or changed after the merge: restore it, or "
                                       "merge the build's shards again") from None
        sizes = [len(c) for c in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        base = self.shards[0].manifest
        self.manifest = Manifest(**{**base.__dict__, "samples": int(self.offsets[-1]),
                                    "extra": {**base.extra, "shards": doc["shards"]}})
        self.manifest.layers = {name: _merged_layer(name, self.shards) for name in base.layers}
        self._labels: np.ndarray | None = None

    @property
    def layers(self) -> dict[str, LayerInfo]:
        return self.manifest.layers

    @property
    def identity(self) -> int:
        """:attr:`Cache.identity` of the merge: its shards' together."""
        return zlib.crc32(b"".join(shard.identity.to_bytes(4, "little") for shard in self.shards))

    @property
    def backend_id(self) -> str:
        """The shards' backend; ``"lmdb+hdf5"`` (in shard order) for shards of both."""
        return "+".join(dict.fromkeys(shard.backend_id for shard in self.shards))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def labels(self) -> np.ndarray | None:
        if self._labels is None:
            parts = [c.labels for c in self.shards]
            self._labels = None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore[arg-type]
        return self._labels

    def layer(self, name: str) -> LayerInfo:
        self.shards[0].layer(name)
        return self.manifest.layers[name]

    def _split(self, samples: Iterable[int] | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.atleast_1d(np.asarray(samples, dtype=np.int64))
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise SampleIndexError(f"{self.path}: sample out of range (the cache has {n} samples)")
        idx = np.where(idx < 0, idx + n, idx)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        return idx, shard, idx - self.offsets[shard]

    def _gather(self, samples: Iterable[int] | int, read: Any) -> dict[str, np.ndarray]:
        idx, shard, local = self._split(samples)
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            for part, values in read(self.shards[int(s)], local[rows]).items():
                if part not in out:
                    out[part] = np.empty((len(idx), *values.shape[1:]), dtype=values.dtype)
                out[part][rows] = values
        return out

    def read_parts(self, layer: str, samples: Iterable[int], parts: Sequence[str] | None = None
                   ) -> dict[str, np.ndarray]:
        return self._gather(samples, lambda c, s: c.read_parts(layer, s, parts))

    def read_batch(self, layer: str, samples: Iterable[int], out: np.ndarray | None = None) -> np.ndarray:
        result = self._gather(samples, lambda c, s: {"": c.read_batch(layer, s)})[""]
        if out is not None:
            out[...] = result
            return out
        return result

    def read_batch_picked(self, layer: str, samples: Iterable[int], picks: Sequence[str | None], *,
                          merged: bool = True, replace: str | None = None) -> tuple[Any, np.ndarray]:
        idx, shard, local = self._split(samples)
        if len(picks) != len(idx):
            raise ValueError(f"{len(picks)} picks for {len(idx)} samples")
        if not len(idx):
            return self.shards[0].read_batch_picked(layer, [], [], merged=merged, replace=replace)
        pieces = []
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            base, got = self.shards[int(s)].read_batch_picked(layer, local[rows], [picks[int(r)] for r in rows],
                                                              merged=merged, replace=replace)
            pieces.append((rows, {"": base} if merged else base, got))
        shape = next((p.shape[1:] for _, _, p in pieces if p.shape[1:] != (0,)), (0,))
        picked = np.empty((len(idx), *shape), dtype=np.float32)
        parts: dict[str, np.ndarray] = {}
        for rows, base, got in pieces:
            for name, values in base.items():
                if name not in parts:
                    parts[name] = np.empty((len(idx), *values.shape[1:]), dtype=np.float32)
                parts[name][rows] = values
            if got.shape[1:] == shape:  # a shard whose rows picked nothing returns (k, 0)
                picked[rows] = got
        return (parts[""] if merged else parts), picked

    def read(self, layer: str, sample: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.read_batch(layer, [sample], None if out is None else out[None])[0]

    def check_fingerprints(self, **kwargs: Any) -> None:
        self.shards[0].check_fingerprints(**kwargs)

    def close(self) -> None:
        for c in self.shards:
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merged_layer(name: str, shards: list[Cache]) -> LayerInfo:
    first = shards[0].manifest.layers[name]
    merged = LayerInfo.from_dict(first.to_dict())
    for key in ("raw_bytes", "stored_bytes"):
        totals: dict[str, int] = {}
        for cache in shards:
            for part, n in getattr(cache.manifest.layers[name], key).items():
                totals[part] = totals.get(part, 0) + n
        setattr(merged, key, totals)
    return merged
