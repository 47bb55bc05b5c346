"""Damage every part of a small cache in turn and read it whole: what does fmcache do?

HDF5's earliest file format (the one fmcache writes) checksums chunk bytes (fletcher32)
but not its metadata: object headers, B-trees, heaps; LMDB checksums nothing (fmcache's
records carry their own CRC and key). This script writes a small cache (``--backend``;
48 samples; a ``(6, 8, 8)`` layer with ``--codec`` and a ``(5, 7)`` token layer, raw;
labels), then for every ``--step``-th byte of the file (LMDB: ``data.mdb``) either flips one bit (0x10) or,
with ``--zero N``, zeroes ``N`` bytes from there, and reads the damaged copy in a forked
child (batch reads and per-sample reads of both layers, and the labels) under a time
limit. Each copy ends as one of:

* ``identical`` -- every value and label as written (the byte was unused or redundant);
* ``typed``     -- an ``FmcacheError`` (what the reliability rules ask for);
* ``wrong``     -- values or labels that differ, with no error (must never happen);
* ``untyped``   -- another exception (a bare h5py / numpy error);
* ``crash``     -- the child died of a signal; ``hang`` -- it ran past ``--timeout``.

Prints JSON (counts, and the offsets of anything but identical / typed)::

    python tools/sweep_damage.py                    # raw, every 7th byte (~15 min here)
    python tools/sweep_damage.py --codec int8 --step 64 --zero 512
    python tools/sweep_damage.py --backend lmdb --codec bf16 --step 31   # the LMDB file instead
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fmcache
from fmcache.errors import FmcacheError

SAMPLES = 48


def write(path: Path, codec: str, backend: str = "hdf5") -> dict[str, np.ndarray]:
    """The cache, and what reading it gives undamaged."""
    rng = np.random.default_rng(0)
    maps = (rng.lognormal(-1, 1, (SAMPLES, 6, 8, 8)) * (rng.random((SAMPLES, 6, 8, 8)) > 0.4)).astype(np.float32)
    tokens = rng.standard_normal((SAMPLES, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 10, SAMPLES)
    with fmcache.create_cache(path, backend=backend) as writer:
        writer.add_layer("a", (6, 8, 8), codec=codec, samples_per_chunk=8)
        writer.add_layer("t", (5, 7), codec="raw", samples_per_chunk=8)
        for start in range(0, SAMPLES, 16):
            writer.append({"a": maps[start:start + 16], "t": tokens[start:start + 16]}, labels[start:start + 16])
        writer.commit()
    return read_all(path)


def read_all(path: Path) -> dict[str, np.ndarray]:
    with fmcache.open_cache(path) as cache:
        found = {name: cache.read_batch(name, range(SAMPLES)) for name in ("a", "t")}
        found.update({f"{name} per sample": np.stack([cache.read(name, i) for i in range(SAMPLES)])
                      for name in ("a", "t")})
        found["labels"] = np.asarray(cache.labels)
    return found


def _child(path: Path, truth: dict[str, np.ndarray], conn: Any) -> None:
    try:
        got = read_all(path)
        same = all(np.array_equal(got[k], v) for k, v in truth.items())
        conn.send(("identical", "") if same else ("wrong", ", ".join(k for k, v in truth.items()
                                                                     if not np.array_equal(got[k], v))))
    except FmcacheError as exc:
        conn.send(("typed", type(exc).__name__))
    except Exception as exc:  # noqa: BLE001 - what the sweep looks for
        conn.send(("untyped", f"{type(exc).__name__}: {str(exc)[:120]}"))


def outcome(path: Path, truth: dict[str, np.ndarray], timeout: float) -> tuple[str, str]:
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(path, truth, send))
    proc.start()
    send.close()
    got = receive.recv() if receive.poll(timeout) else None
    if got is None and proc.is_alive():
        proc.kill()
        proc.join()
        return "hang", f"past {timeout:g} s"
    proc.join()
    if got is None:
        return "crash", f"exit code {proc.exitcode}"
    return got


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--codec", default="raw")
    parser.add_argument("--backend", choices=["hdf5", "lmdb"], default="hdf5",
                        help="lmdb: damage the cache's data.mdb (LMDB pages have no checksums either)")
    parser.add_argument("--step", type=int, default=7, help="damage every STEP-th byte")
    parser.add_argument("--zero", type=int, default=0, help="zero this many bytes instead of flipping one bit")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a read counts as a hang")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        suffix = ".h5" if args.backend == "hdf5" else ".lmdb"
        source, damaged = Path(tmp) / f"c{suffix}", Path(tmp) / f"damaged{suffix}"
        truth = write(source, args.codec, args.backend)
        if args.backend == "lmdb":  # the directory's data file is what gets damaged
            shutil.copytree(source, damaged)
            source_file, damaged_file = source / "data.mdb", damaged / "data.mdb"
        else:
            source_file, damaged_file = source, damaged
        blob = source_file.read_bytes()
        counts: collections.Counter[str] = collections.Counter()
        notable: list[list[Any]] = []
        for offset in range(0, len(blob), args.step):
            data = bytearray(blob)
            if args.zero:
                data[offset:offset + args.zero] = bytes(len(data[offset:offset + args.zero]))
            else:
                data[offset] ^= 0x10
            damaged_file.write_bytes(bytes(data))
            kind, detail = outcome(damaged, truth, args.timeout)
            counts[kind] += 1
            if kind not in ("identical", "typed"):
                notable.append([offset, kind, detail])
    print(json.dumps({"settings": {"backend": args.backend, "codec": args.codec, "step": args.step, "zero": args.zero,
                                   "file_bytes": len(blob), "fmcache": fmcache.__version__},
                      "counts": dict(counts), "notable": notable}, indent=1))
    return 0 if not notable else 1


if __name__ == "__main__":
    raise SystemExit(main())
