"""How much memory a reading process gains over one per-sample pass, per backend.

A DataLoader worker keeps what its reads cache for as long as it lives: on HDF5 the
backend's row LRU (stored rows of whole chunks, ``ROW_CACHE_BYTES``) and HDF5's own chunk
cache per open dataset. This script writes one ``bf16`` cache of synthetic post-ReLU maps
(``--samples`` maps of ``--shape``) per backend and, in a fresh process each (spawned, so
nothing is inherited), opens it, reads every sample once with ``Cache.read`` and reports
the growth of the resident set (``/proc/self/statm``) over the pass, and of its private
part (not file-backed: LMDB's pages are the file's, mapped, shared with the page cache
and dropped by the kernel under pressure), beside the cache's size on disk. ``hdf5 (file-wide chunk cache)`` is the HDF5 reader as it was before session
12: every dataset with the file's 64 MiB chunk cache, so the chunks the row LRU keeps were
kept a second time. Prints JSON; ``--json PATH`` also writes it::

    python tools/bench_read_memory.py                      # ~1 min here
    python tools/bench_read_memory.py --json docs/bench_read_memory.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fmcache
from fmcache.backends import hdf5_backend

MIB = 1 << 20
RUNS = {"lmdb": ("lmdb", False), "hdf5": ("hdf5", False), "hdf5 (file-wide chunk cache)": ("hdf5", True)}


def write(path: Path, backend: str, samples: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    with fmcache.create_cache(path, backend=backend) as writer:
        writer.add_layer("l", shape, codec="bf16")
        for start in range(0, samples, 256):
            n = min(256, samples - start)
            x = rng.lognormal(-1.0, 1.0, (n, *shape)) * (rng.random((n, *shape)) > 0.42)
            writer.append({"l": x.astype(np.float32)}, np.arange(start, start + n) % 10)
        writer.commit()


def resident_mib() -> tuple[float, float]:
    """(resident, of it private: not file-backed) MiB of this process."""
    with open("/proc/self/statm") as fh:
        fields = [int(x) * os.sysconf("SC_PAGE_SIZE") / MIB for x in fh.read().split()]
    return fields[1], fields[1] - fields[2]


def one_pass(path: str, file_wide: bool, queue: Any) -> None:
    """In a fresh process: the resident set's growth over one per-sample pass."""
    if file_wide:  # no per-dataset chunk cache: every dataset takes the file's
        hdf5_backend.Hdf5Backend._row_lru_chunk_caches = lambda self: {}  # type: ignore[method-assign]
    with fmcache.open_cache(path) as cache:
        cache.read("l", 0)
        before = resident_mib()
        for i in range(len(cache)):
            cache.read("l", i)
        after = resident_mib()
        queue.put((after[0] - before[0], after[1] - before[1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 16, 16])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {"settings": {"samples": args.samples, "shape": list(shape), "codec": "bf16",
                                            "row_cache_mib": hdf5_backend.ROW_CACHE_BYTES / MIB,
                                            "hdf5_chunk_cache_mib": hdf5_backend.CHUNK_CACHE_BYTES / MIB,
                                            "float32_mib": args.samples * int(np.prod(shape)) * 4 / MIB},
                               "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {backend: Path(tmp) / f"c.{backend}" for backend in ("lmdb", "hdf5")}
        for backend, path in paths.items():
            write(path, backend, args.samples, shape)
        for name, (backend, file_wide) in RUNS.items():
            queue = ctx.Queue()
            child = ctx.Process(target=one_pass, args=(str(paths[backend]), file_wide, queue))
            child.start()
            resident, private = queue.get(timeout=600)
            child.join()
            size = sum(f.stat().st_size for f in paths[backend].rglob("*")) if paths[backend].is_dir() \
                else paths[backend].stat().st_size
            results["runs"][name] = {"resident_growth_mib": round(resident, 1),
                                     "private_growth_mib": round(private, 1), "stored_mib": round(size / MIB, 1)}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
