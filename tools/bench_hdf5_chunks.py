"""Where an HDF5 chunk read's time goes, and what reading raw chunks would save.

``bench_read`` showed HDF5's cold per-sample ``bf16`` reads at about half LMDB's speed
while fmcache wrote its chunks through hdf5plugin's filter and read them through h5py
(before session 15; since then it writes and reads them itself, docs/format.md). This
script takes one such chunk read apart (its caches are written through the filter, as
then), on the same real maps (CIFAR ResNet-18 width
32 on Fashion-MNIST, ``--samples``), in a process that has run torch and built its
caches with fmcache, as ``bench_read``'s has (a bare script can sit in another state of
the allocator, which changed the answer in session 10: docs/benchmarks.md, "What
session 10 changed").

``bf16`` (hdf5plugin's Blosc2 filter), per whole chunk of the ``bits`` dataset, every
chunk once per pass:

* ``h5py``           ``ds[lo:hi]`` on a dataset opened as fmcache opens it (64 MiB
                     chunk cache, every pass a fresh file handle: nothing decoded yet);
* ``h5py_nocache``   the same on a handle opened without HDF5's chunk cache;
* ``raw``            ``read_direct_chunk`` into a reused buffer: the stored bytes only;
* ``raw_fletcher``   ... and their fletcher32, with libhdf5's own checksum function;
* ``raw_decode``     ... and python-blosc2's decode of the chunk inside the filter's
                     frame. The frame is B2ND with blocks that cut samples apart, so this
                     is the blocks' order, not the array's: the floor of a raw read, not
                     a usable one (the blocks' shape is in the JSON);
* ``raw_reorder``    ``raw_decode``, then one strided numpy copy of the blocks into the
                     chunk's C order (checked against h5py first): a usable raw read;
* ``raw_b2nd``       ``read_direct_chunk``, fletcher32, then ``blosc2.ndarray_from_cframe``
                     and ``[...]``: a raw read that gives the array (B2ND's reassembly).

* ``direct_h5py``    ``ds[lo:hi]`` on a copy whose chunks this script wrote itself
                     (``write_direct_chunk``): a plain blosc2 frame of one chunk whose
                     blocks are whole samples, in array order, and its fletcher32; the
                     same filter and ``h5dump`` read it (the values are checked);
* ``direct_raw``     ``read_direct_chunk`` of that copy, fletcher32, python-blosc2's decode
                     straight into the chunk's rows: what fmcache writing and reading its
                     own chunks would cost per chunk.

``bf16`` again, a cold pass over every sample, each sample's float32 map into a new
array (``bench_read``'s ``read cold``): ``Cache.read`` on LMDB, on HDF5 as fmcache
writes it now (``hdf5``: its own chunks, read raw against their CRC-32C), and on HDF5
written through the filter (``hdf5 filter``), each with the backend's row LRU at its
default size and at 4 MiB, then lower bounds of other HDF5
read paths, lean loops with none of fmcache's bookkeeping (no LRU, no checks but the
checksum): ``floor h5py`` (whole chunks through h5py, each sample widened), ``floor
direct`` (the self-written chunks read raw: fletcher32, decode, widen), ``floor direct
crc32c`` (the same with a CRC-32C over the chunk in place of fletcher32: a layout
that kept its own checksum beside HDF5's data) and ``floor wide`` (the bf16 values
stored widened to float32, as LMDB's records hold them, read through h5py, each
sample copied out).

ZFP (``zfp:accuracy=0.05``, a chunk per sample), per sample: ``h5py`` (``ds[i:i+1]``)
against ``raw_zfpy`` (``read_direct_chunk``, fletcher32, ``zfpy._decompress`` of the
header-less stream with the dataset's mode; checked bit for bit against h5py first).

MB/s of decoded stored values (bf16: 2 bytes a value) per second of this thread's CPU
time, median (min-max) of ``--repeats`` interleaved passes. Prints JSON; unless
``--quick`` writes ``docs/bench_hdf5_chunks.json``, ``docs/bench_hdf5_chunks.png`` and the
table between ``<!-- bench_hdf5_chunks:start -->`` and ``<!-- bench_hdf5_chunks:end -->``
of docs/benchmarks.md::

    python tools/bench_hdf5_chunks.py            # ~2 min here
    python tools/bench_hdf5_chunks.py --quick    # width 16, 128 samples; docs untouched
    python tools/bench_hdf5_chunks.py --render docs/bench_hdf5_chunks.json \
        --region bench_hdf5_chunks --figure docs/bench_hdf5_chunks.png   # a saved run's table and plot
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import blosc2
import h5py
import hdf5plugin
import numpy as np
import torch
import zfpy
from crc32c import crc32c

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_read import (
    REPO,
    ColdPass,
    build,
    capture_maps,
    cpu_name,
    interleaved,
    render_command,
    summary,
    write_region,
)
from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

from fmcache.backends import hdf5_backend, hdf5_writes
from fmcache.backends.hdf5_backend import CHUNK_CACHE_BYTES, dataset_path


def build_through_the_filter(path: Path, layer: str, maps: np.ndarray, spec: str) -> None:
    """A cache as fmcache wrote it before session 15: every chunk through hdf5plugin's
    filter (B2ND frames), read through h5py (docs/format.md, "Chunks fmcache writes itself")."""
    writes_frames = hdf5_writes.writes_frames
    hdf5_writes.writes_frames = lambda field: False
    try:
        build(path, "hdf5", layer, maps, spec)
    finally:
        hdf5_writes.writes_frames = writes_frames

MARK_BEGIN = "<!-- bench_hdf5_chunks:start -->"
MARK_END = "<!-- bench_hdf5_chunks:end -->"
MB = 1e6


def libhdf5_fletcher32() -> Callable[[int, int], int] | None:
    """libhdf5's ``H5_checksum_fletcher32`` from the library h5py loaded (an exported,
    not a public, symbol), or None where this build does not export it."""
    libs = Path(h5py.__file__).parent.parent / "h5py.libs"
    for lib in sorted(libs.glob("libhdf5-*.so*")) + sorted(libs.glob("libhdf5.so*")):
        try:
            fn = ctypes.CDLL(str(lib)).H5_checksum_fletcher32
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_size_t]
        return fn
    return None


def open_dataset(path: Path, name: str, chunk_cache: bool) -> tuple[h5py.File, h5py.Dataset]:
    fh = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007, rdcc_w0=1.0)
    if chunk_cache:
        return fh, fh[name]
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return fh, h5py.Dataset(h5py.h5d.open(fh.id, name.encode(), dapl=dapl))


def chunk_starts(ds: h5py.Dataset) -> list[tuple[int, ...]]:
    rows = ds.chunks[0]
    return [(lo, *(0,) * (ds.ndim - 1)) for lo in range(0, ds.shape[0], rows)]


def b2nd_frame(raw: memoryview) -> tuple[int, int]:
    """(offset, length) of the one blosc2 chunk inside a filter frame: the frame header's
    length (msgpack int32 at byte 11), then the chunk's cbytes (its header's bytes 12-15)."""
    header = struct.unpack_from(">i", raw, 11)[0]
    return header, struct.unpack_from("<i", raw, header + 12)[0]


def from_blocks(flat: np.ndarray, chunk_shape: Sequence[int], blocks: Sequence[int], dtype: np.dtype,
                out: np.ndarray) -> np.ndarray:
    """A B2ND chunk's values, decoded in its blocks' order (``flat``: the block grid in C
    order, each block in C order, padded to whole blocks), copied into ``out`` (the
    chunk in C order): one strided copy."""
    grid = [-(-c // b) for c, b in zip(chunk_shape, blocks)]
    nd = len(chunk_shape)
    blocked = flat.view(dtype).reshape(*grid, *blocks).transpose([x for i in range(nd) for x in (i, nd + i)])
    padded = blocked.reshape([g * b for g, b in zip(grid, blocks)])
    np.copyto(out, padded[tuple(slice(0, c) for c in chunk_shape)])
    return out


def stored_bits(path: Path, name: str) -> tuple[np.ndarray, tuple[int, ...], tuple[Any, int, Any]]:
    """The dataset's values, its chunk shape and its Blosc2 filter's (codec, clevel,
    shuffle), from hdf5plugin's cd_values layout."""
    with h5py.File(path, "r") as fh:
        ds = fh[name]
        blosc = ds.id.get_create_plist().get_filter_by_id(hdf5plugin.BLOSC2_ID)[1]
        return ds[...], ds.chunks, (blosc2.Codec(blosc[6]), blosc[4], blosc2.Filter(blosc[5]))


def blosc2_filter(codec: Any, clevel: int, shuffle: Any) -> Any:
    """h5py ``create_dataset`` kwargs for hdf5plugin's Blosc2 filter with these settings."""
    return hdf5plugin.Blosc2(cname=codec.name.lower(), clevel=clevel, filters=shuffle.value)


def write_direct(src: Path, name: str, dst: Path, fletcher: Callable[[int, int], int]) -> None:
    """A copy of the ``bits`` dataset ``name`` of ``src`` into ``dst`` (same dataset path,
    filters and chunks), every chunk written with ``write_direct_chunk``: a plain blosc2
    frame holding one chunk whose blocks are whole samples, then its fletcher32."""
    bits, chunks, (codec, clevel, shuffle) = stored_bits(src, name)
    per, sample_bytes = chunks[0], int(np.prod(chunks[1:])) * bits.dtype.itemsize
    cparams = {"codec": codec, "clevel": clevel, "typesize": bits.dtype.itemsize,
               "blocksize": sample_bytes, "filters": [shuffle], "nthreads": 1}
    with h5py.File(dst, "w") as fh:
        out = fh.create_dataset(name, shape=bits.shape, dtype=bits.dtype, chunks=chunks, fletcher32=True,
                                **blosc2_filter(codec, clevel, shuffle))
        for lo in range(0, len(bits), per):
            rows = np.zeros(chunks, dtype=bits.dtype)  # a last partial chunk: zeros past the end
            rows[:min(per, len(bits) - lo)] = bits[lo:lo + per]
            frame = bytes(blosc2.SChunk(chunksize=rows.nbytes, data=rows, cparams=cparams).to_cframe())
            out.id.write_direct_chunk((lo, *(0,) * (bits.ndim - 1)),
                                      frame + struct.pack("<I", fletcher(frame, len(frame))), 0)
    with h5py.File(dst, "r") as fh:
        assert np.array_equal(fh[name][...], bits), "the filter reads the self-written chunks differently"


def bf16_runs(path: Path, name: str, fletcher: Callable[[int, int], int]) -> tuple[dict[str, Any], dict[str, Any]]:
    fh, ds = open_dataset(path, name, True)
    starts, chunk_shape, dtype = chunk_starts(ds), ds.chunks, ds.dtype
    megabytes = ds.shape[0] * int(np.prod(chunk_shape[1:])) * dtype.itemsize / MB
    expected = ds[0:chunk_shape[0]]
    _, raw = ds.id.read_direct_chunk(starts[0])
    fh.close()
    array = blosc2.ndarray_from_cframe(raw[:-4])
    blocks = list(array.blocks)
    assert np.array_equal(np.asarray(array[...]).view(dtype), expected), "B2ND decode differs"
    at, length = b2nd_frame(memoryview(raw))
    scratch = np.empty(struct.unpack_from("<i", raw, at + 4)[0], dtype=np.uint8)  # the padded blocks' bytes
    rows = np.empty(chunk_shape, dtype=dtype)
    blosc2.decompress(raw[at:at + length], dst=scratch)
    assert np.array_equal(from_blocks(scratch, chunk_shape, blocks, dtype, rows), expected), "block order"
    buf = np.empty(4 * int(np.prod(chunk_shape)) * 2 + (1 << 16), dtype=np.uint8)
    address = buf.ctypes.data

    def h5(chunk_cache: bool) -> Callable[[], None]:
        def run() -> None:
            f, d = open_dataset(path, name, chunk_cache)
            rows = d.chunks[0]
            for start in starts:
                d[start[0]:start[0] + rows]
            f.close()
        return run

    def raw_pass(check: bool, decode: str) -> Callable[[], None]:
        def run() -> None:
            f, d = open_dataset(path, name, False)
            for start in starts:
                mask, view = d.id.read_direct_chunk(start, out=buf)
                size = len(view)
                if mask:
                    raise RuntimeError(f"chunk {start}: a filter was skipped (mask {mask})")
                if check and fletcher(address, size - 4) != int.from_bytes(buf[size - 4:size].tobytes(), "little"):
                    raise RuntimeError(f"chunk {start}: fletcher32 mismatch")
                if decode in ("blocks", "reorder"):
                    at, length = b2nd_frame(memoryview(buf)[:size])
                    blosc2.decompress(buf[at:at + length], dst=scratch)
                    if decode == "reorder":
                        from_blocks(scratch, chunk_shape, blocks, dtype, rows)
                elif decode == "array":
                    blosc2.ndarray_from_cframe(bytes(buf[:size - 4]))[...]
            f.close()
        return run

    direct = path.with_name(f"direct-{path.name}")
    write_direct(path, name, direct, fletcher)

    def direct_h5py() -> None:
        f, d = open_dataset(direct, name, True)
        for start in starts:
            d[start[0]:start[0] + chunk_shape[0]]
        f.close()

    def direct_raw() -> None:
        f, d = open_dataset(direct, name, False)
        for start in starts:
            _, view = d.id.read_direct_chunk(start, out=buf)
            size = len(view)
            if fletcher(address, size - 4) != int.from_bytes(buf[size - 4:size].tobytes(), "little"):
                raise RuntimeError(f"chunk {start}: fletcher32 mismatch")
            blosc2.schunk_from_cframe(buf[:size - 4], copy=False).decompress_chunk(0, dst=rows)
        f.close()

    runs = {"h5py": (h5(True), "cpu"), "h5py_nocache": (h5(False), "cpu"), "raw": (raw_pass(False, ""), "cpu"),
            "raw_fletcher": (raw_pass(True, ""), "cpu"), "raw_decode": (raw_pass(True, "blocks"), "cpu"),
            "raw_reorder": (raw_pass(True, "reorder"), "cpu"), "raw_b2nd": (raw_pass(True, "array"), "cpu"),
            "direct_h5py": (direct_h5py, "cpu"), "direct_raw": (direct_raw, "cpu")}
    return runs, {"chunk_shape": list(chunk_shape), "b2nd_blocks": blocks, "megabytes": megabytes}


def zfp_runs(path: Path, name: str, fletcher: Callable[[int, int], int], tolerance: float
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    fh, ds = open_dataset(path, name, True)
    n, view_shape = ds.shape[0], list(ds.shape[1:])
    _, raw = ds.id.read_direct_chunk((0, 0, 0))
    first = zfpy._decompress(raw[:-4], zfpy.type_float, view_shape, tolerance=tolerance)
    assert np.array_equal(first, ds[0]), "zfpy decodes the filter's stream differently"
    megabytes = ds.shape[0] * int(np.prod(view_shape)) * 4 / MB
    fh.close()
    buf = np.empty(8 * int(np.prod(view_shape)) + (1 << 16), dtype=np.uint8)
    address = buf.ctypes.data

    def h5() -> None:
        f, d = open_dataset(path, name, True)
        for i in range(n):
            d[i:i + 1]
        f.close()

    def raw_zfpy() -> None:
        f, d = open_dataset(path, name, True)
        for i in range(n):
            _, view = d.id.read_direct_chunk((i, 0, 0), out=buf)
            size = len(view)
            if fletcher(address, size - 4) != int.from_bytes(buf[size - 4:size].tobytes(), "little"):
                raise RuntimeError(f"chunk {i}: fletcher32 mismatch")
            zfpy._decompress(buf[:size - 4], zfpy.type_float, view_shape, tolerance=tolerance)
        f.close()

    return {"h5py": (h5, "cpu"), "raw_zfpy": (raw_zfpy, "cpu")}, {"megabytes": megabytes, "view_shape": view_shape}


def measure(layer: str, maps: np.ndarray, repeats: int, workdir: Path,
            fletcher: Callable[[int, int], int]) -> dict[str, Any]:
    result: dict[str, Any] = {"shape": list(maps.shape[1:]), "samples": len(maps)}
    for spec, field, make in (("bf16", "bits", None), ("zfp:accuracy=0.05", "values", 0.05)):
        path = workdir / f"{layer}-{field}.h5"
        build_through_the_filter(path, layer, maps, spec)
        name = dataset_path(layer, "all", field)
        runs, info = bf16_runs(path, name, fletcher) if make is None else zfp_runs(path, name, fletcher, make)
        seconds = interleaved(runs, repeats)
        base = seconds["h5py"]
        result[spec] = {**info, "mb_s": {k: summary([info["megabytes"] / s for s in v]) for k, v in seconds.items()},
                        "vs_h5py": {k: summary([b / s for b, s in zip(base, v)]) for k, v in seconds.items()}}
    result["cold_pass"] = cold_passes(layer, maps, repeats, workdir, fletcher)
    return result


def cold_passes(layer: str, maps: np.ndarray, repeats: int, workdir: Path,
                fletcher: Callable[[int, int], int]) -> dict[str, Any]:
    """``bench_read``'s ``read cold`` for ``bf16`` (``Cache.read`` of every sample from a
    freshly opened cache), on LMDB, on HDF5 as fmcache writes it (its own chunks, read
    raw: ``hdf5``) and on HDF5 written through hdf5plugin's filter and read through h5py
    (``hdf5 filter``, what fmcache did before session 15), both with the backend's
    row LRU at its default size and at 4 MiB: a layer that fits the default LRU keeps
    every chunk's rows, each read into newly allocated memory; a smaller LRU evicts and
    the allocator hands the freed memory out again."""
    paths = {backend: workdir / f"cold-{layer}{'.h5' if backend == 'hdf5' else '.lmdb'}" for backend in ("lmdb", "hdf5")}
    for backend, path in paths.items():
        build(path, backend, layer, maps, "bf16")
    filtered = workdir / f"cold-filter-{layer}.h5"
    build_through_the_filter(filtered, layer, maps, "bf16")

    def with_lru(nbytes: int, path: Path = filtered) -> Callable[[], float]:
        run = ColdPass(path, layer, len(maps), first_apart=False)

        def sized() -> float:
            default = hdf5_backend.ROW_CACHE_BYTES
            hdf5_backend.ROW_CACHE_BYTES = nbytes
            try:
                return run()
            finally:
                hdf5_backend.ROW_CACHE_BYTES = default
        return sized

    default_mib = hdf5_backend.ROW_CACHE_BYTES >> 20
    runs = {"lmdb": (ColdPass(paths["lmdb"], layer, len(maps), first_apart=False), "cpu"),
            "hdf5": (ColdPass(paths["hdf5"], layer, len(maps), first_apart=False), "cpu"),
            "hdf5 LRU 4 MiB": (with_lru(4 << 20, paths["hdf5"]), "cpu"),
            f"hdf5 filter LRU {default_mib} MiB": (with_lru(hdf5_backend.ROW_CACHE_BYTES), "cpu"),
            "hdf5 filter LRU 4 MiB": (with_lru(4 << 20), "cpu"), **floor_passes(filtered, layer, workdir, fletcher)}
    seconds = interleaved(runs, repeats)
    megabytes = maps.nbytes / MB
    return {"megabytes_float32": megabytes, "mb_s": {k: summary([megabytes / x for x in v]) for k, v in seconds.items()},
            "vs_lmdb_time": {k: summary([x / b for b, x in zip(seconds["lmdb"], v)]) for k, v in seconds.items()}}


def floor_passes(path: Path, layer: str, workdir: Path, fletcher: Callable[[int, int], int]
                 ) -> dict[str, tuple[Callable[[], float], str]]:
    """The cold pass's lean lower bounds (module docstring): every sample's float32 map
    into a new array, chunk by chunk, with no LRU and no checks but the chunk's checksum.
    Each returns the CPU seconds of opening and closing its file, which the timing leaves out."""
    name = dataset_path(layer, "all", "bits")
    direct, wide = workdir / f"floor-direct-{layer}.h5", workdir / f"floor-wide-{layer}.h5"
    write_direct(path, name, direct, fletcher)
    bits, chunks, settings = stored_bits(path, name)
    with h5py.File(wide, "w") as fh:  # the values LMDB's records hold: bf16 widened to float32
        fh.create_dataset(name, data=(bits.astype(np.uint32) << 16).view(np.float32), chunks=chunks, fletcher32=True,
                          **blosc2_filter(*settings))
    n, per, shape = len(bits), chunks[0], bits.shape[1:]
    buf = np.empty(2 * bits[:per].nbytes + (1 << 16), dtype=np.uint8)
    rows = np.empty(chunks, dtype=bits.dtype)

    def timed(source: Path, body: Callable[[h5py.Dataset], None]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.thread_time()
            fh, ds = open_dataset(source, name, True)
            opening = time.thread_time() - t0
            body(ds)
            t1 = time.thread_time()
            fh.close()
            return opening + time.thread_time() - t1
        return run

    def widen(stored: np.ndarray, count: int) -> None:
        for k in range(count):
            out = np.empty(shape, dtype=np.float32)
            torch.from_numpy(out).copy_(torch.from_numpy(stored[k].view(np.int16)).view(torch.bfloat16))

    def through_h5py(ds: h5py.Dataset) -> None:
        for lo in range(0, n, per):
            got = ds[lo:lo + per]
            widen(got, len(got))

    def raw(check: str) -> Callable[[h5py.Dataset], None]:
        def body(ds: h5py.Dataset) -> None:
            for lo in range(0, n, per):
                _, view = ds.id.read_direct_chunk((lo, *(0,) * len(shape)), out=buf)
                size = len(view) - 4
                stored = int.from_bytes(buf[size:size + 4].tobytes(), "little")
                if check == "fletcher32" and fletcher(buf.ctypes.data, size) != stored:
                    raise RuntimeError(f"chunk at {lo}: fletcher32 mismatch")
                if check == "crc32c":
                    crc32c(buf[:size])  # what a layout with its own CRC-32C would compute
                blosc2.schunk_from_cframe(buf[:size], copy=False).decompress_chunk(0, dst=rows)
                widen(rows, min(per, n - lo))
        return body

    def copied(ds: h5py.Dataset) -> None:
        for lo in range(0, n, per):
            got = ds[lo:lo + per]
            for k in range(len(got)):
                out = np.empty(shape, dtype=np.float32)
                np.copyto(out, got[k])

    return {"floor h5py": (timed(path, through_h5py), "cpu"),
            "floor direct": (timed(direct, raw("fletcher32")), "cpu"),
            "floor direct crc32c": (timed(direct, raw("crc32c")), "cpu"),
            "floor wide": (timed(wide, copied), "cpu")}


def _f(stat: dict[str, float]) -> str:
    return f"{stat['median']:,.0f} ({stat['min']:,.0f}–{stat['max']:,.0f})"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [(f"Settings: ResNet-18 width {s['width']}, {s['samples']} samples, {s['repeats']} repeats; "
              f"{s['cpu']}. MB/s of stored values decoded, per second of CPU time, median (min–max); "
              "`× h5py`: median of per-repeat time ratios against `h5py` (> 1 = faster)."), ""]
    for spec in ("bf16", "zfp:accuracy=0.05"):
        lines += [f"**`{spec}`**", "", "| layer | chunk | B2ND blocks | "
                  + " | ".join(f"{k} | × h5py" for k in next(iter(results["layers"].values()))[spec]["mb_s"]) + " |"]
        keys = list(next(iter(results["layers"].values()))[spec]["mb_s"])
        lines.append("|---|---|---|" + "---:|---:|" * len(keys))
        for layer, res in results["layers"].items():
            e = res[spec]
            chunk = "×".join(map(str, e.get("chunk_shape", [1, *e.get("view_shape", [])])))
            blocks = "×".join(map(str, e["b2nd_blocks"])) if "b2nd_blocks" in e else "–"
            lines.append(f"| {layer} | {chunk} | {blocks} | "
                         + " | ".join(f"{_f(e['mb_s'][k])} | {e['vs_h5py'][k]['median']:.2f}" for k in keys) + " |")
        lines.append("")
    first = next(iter(results["layers"].values()))
    if "cold_pass" in first:
        keys = list(first["cold_pass"]["mb_s"])
        lines += [("**`bf16`, a cold pass over every sample**: `Cache.read`, then the lean floors of other "
                   "HDF5 read paths (float32 MB/s; `× LMDB`: time against LMDB's `Cache.read`, median of "
                   "per-repeat ratios; the target is ≤ 1.5)"), "", "| layer | " + " | ".join(f"{k} | × LMDB" for k in keys) + " |",
                  "|---|" + "---:|---:|" * len(keys)]
        for layer, res in results["layers"].items():
            c = res["cold_pass"]
            lines.append(f"| {layer} | " + " | ".join(f"{_f(c['mb_s'][k])} | {c['vs_lmdb_time'][k]['median']:.2f}"
                                                     for k in keys) + " |")
    return "\n".join(lines).rstrip()


def plot(results: dict[str, Any], path: Path) -> None:
    """Per layer, the ``bf16`` chunk read's variants as bars (median, min-max), h5py first."""
    plt = pyplot(path)
    if plt is None:
        return

    layers = list(results["layers"])
    names = list(results["layers"][layers[0]]["bf16"]["mb_s"])
    cold = "cold_pass" in results["layers"][layers[0]]
    fig, axes = plt.subplots(1, 2 if cold else 1, figsize=(15 if cold else 10, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if cold else [1]})
    ax = axes[0][0]
    width = 0.8 / len(layers)
    y = np.arange(len(names))
    for k, layer in enumerate(layers):
        rates = results["layers"][layer]["bf16"]["mb_s"]
        med = [rates[n]["median"] for n in names]
        err = [[m - rates[n]["min"] for n, m in zip(names, med)], [rates[n]["max"] - m for n, m in zip(names, med)]]
        ax.barh(y + (k - (len(layers) - 1) / 2) * width, med, width, xerr=err, capsize=2,
                label=f"{layer} {tuple(results['layers'][layer]['shape'])}")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("MB/s of bf16 values per core (log)")
    ax.set_title("One HDF5 chunk read of bf16 maps, taken apart (raw_decode: blocks out of order, not usable)")
    ax.legend(fontsize=8)
    if cold:
        ax2 = axes[0][1]
        kinds = list(results["layers"][layers[0]]["cold_pass"]["vs_lmdb_time"])
        y2 = np.arange(len(kinds))
        for k, layer in enumerate(layers):
            ratio = results["layers"][layer]["cold_pass"]["vs_lmdb_time"]
            ax2.barh(y2 + (k - (len(layers) - 1) / 2) * width, [ratio[n]["median"] for n in kinds], width, label=layer)
        ax2.axvline(1.5, color="k", linestyle="--", linewidth=1)
        ax2.text(1.52, len(kinds) - 0.6, "target 1.5", fontsize=8)
        ax2.set_yticks(y2, kinds)
        ax2.invert_yaxis()
        ax2.set_xlabel("time of a cold per-sample pass / LMDB's Cache.read")
        ax2.set_title("Cold per-sample pass: fmcache and lean floors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--render":
        return render_command(argv[1:], "bench_hdf5_chunks.py --render", markdown, plot)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="width 16, 128 samples, layer2; docs untouched")
    parser.add_argument("--samples", type=int, default=None, help="default 512")
    parser.add_argument("--repeats", type=int, default=None, help="default 7; quick 3")
    args = parser.parse_args(argv)
    width, samples = (16, args.samples or 128) if args.quick else (32, args.samples or 512)
    repeats = args.repeats or (3 if args.quick else 7)
    layers = ["layer2"] if args.quick else ["layer1", "layer2", "layer3"]
    fletcher = libhdf5_fletcher32()
    if fletcher is None:
        print("this h5py build does not export H5_checksum_fletcher32: nothing to measure", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    hdf5plugin.register(force=True)
    maps = capture_maps(width, 50, layers, samples)
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {
            "settings": {"width": width, "samples": samples, "repeats": repeats, "cpu": cpu_name(),
                         "cores": os.cpu_count(), "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
                         "hdf5plugin": hdf5plugin.version, "blosc2": blosc2.__version__,
                         "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                         "command": "python tools/bench_hdf5_chunks.py" + (" --quick" if args.quick else "")},
            "layers": {layer: measure(layer, maps[layer], repeats, Path(tmp), fletcher) for layer in layers},
        }
    print(json.dumps(results, indent=1))
    if not args.quick:
        (REPO / "docs" / "bench_hdf5_chunks.json").write_text(json.dumps(results, indent=1) + "\n")
        write_region(REPO / "docs" / "benchmarks.md", MARK_BEGIN, MARK_END, markdown(results))
        plot(results, REPO / "docs" / "bench_hdf5_chunks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
