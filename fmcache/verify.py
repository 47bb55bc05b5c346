"""``fmcache verify``: check every checksum and decode every record."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np

from . import errors
from .cache import open_cache
from .errors import CacheError, CorruptionError, FmcacheError


@dataclass
class VerifyReport:
    path: str
    samples: int
    layers: dict[str, int] = field(default_factory=dict)  # layer -> records decoded
    labels_ok: bool = True


def verify_cache(path: str | os.PathLike[str], progress: Callable[[int], None] | bool | None = None, *,
                 isolated: bool = False) -> VerifyReport:
    """Decode every part of every sample of every layer (and the labels).

    ``progress``: called with the number of samples each step verified; ``True`` shows a
    progress bar (as ``build_cache(progress=True)`` does), ``False`` / ``None`` nothing.

    ``isolated``: read in a child process, so that
    damage which makes a storage library crash the reader is reported rather than
    taking the caller down: LMDB has no page checksums, and a damaged page header made
    it die of SIGBUS (docs/reliability.md). ``fmcache verify`` reads this way.

    Raises
    ------
    CorruptionError
        Naming the first bad layer and sample (or, isolated, the layer and the samples
        verified when the reader crashed).
    """
    if isinstance(progress, bool):
        return _verify_with_bar(path, isolated) if progress else verify_cache(path, None, isolated=isolated)
    try:
        if isolated:
            return _verify_in_child(path, progress)
        return _verify(path, progress)
    except CorruptionError as exc:
        if exc.hint == CorruptionError.default_hint:  # "run `fmcache verify`": what is running
            exc.hint = REBUILD_HINT
        raise


def _verify_with_bar(path: str | os.PathLike[str], isolated: bool) -> VerifyReport:
    """:func:`verify_cache` with a tqdm bar over the samples of every layer."""
    from tqdm.auto import tqdm

    cache = open_cache(path)
    try:  # how many steps: every layer's samples
        total = len(cache) * len(cache.layers)
    finally:
        cache.close()
    with tqdm(total=total, unit="map", desc=f"verify {Path(path).name}", leave=False) as bar:
        return verify_cache(path, bar.update, isolated=isolated)


#: An isolated verify whose child sends nothing (no progress, no result) for this long is
#: stopped and reported as damage: HDF5 looped forever on a zeroed block of its global
#: heap (a new-user sweep), and a chunk's worth of samples takes well under a second.
#: ``FMCACHE_VERIFY_STALL_SECONDS`` overrides it (a very slow disk).
STALL_SECONDS = 300.0


def _verify_in_child(path: str | os.PathLike[str], progress: Callable[[int], None] | None) -> VerifyReport:
    """:func:`_verify` in a child process; its progress, result or error come back over a
    pipe (:func:`_collect`). The child is not forked from this process: one that has run
    torch has OpenMP threads, and a forked child that decodes with torch hung on their
    locks (the CLI tests did). It comes from a fork server that has imported fmcache and
    run nothing (one start per process, then a fork per verify); spawned where there is none."""
    context: BaseContext
    if "forkserver" in mp.get_all_start_methods():
        server = mp.get_context("forkserver")
        server.set_forkserver_preload([__name__])
        context = server
    else:  # pragma: no cover - platforms without fork
        context = mp.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    proc = context.Process(target=_child, args=(str(path), send), daemon=True)
    proc.start()
    send.close()
    stall = float(os.environ.get("FMCACHE_VERIFY_STALL_SECONDS", STALL_SECONDS))
    return _collect(str(path), receive, proc, progress, stall)


def _collect(path: str, receive: Connection, proc: BaseProcess, progress: Callable[[int], None] | None,
             stall_seconds: float) -> VerifyReport:
    """The child's report: progress (passed on), then its result or its error. A child
    that dies without either (a signal) is a CorruptionError naming where it was; one
    that sends nothing for ``stall_seconds`` is stopped (SIGKILL) and reported likewise."""
    layer, done, stalled, heard = None, 0, False, False
    try:
        while True:
            if not receive.poll(stall_seconds):
                stalled = True
                proc.kill()
                break
            try:
                message = receive.recv()
            except EOFError:  # the child is gone without a last word
                break
            heard = True
            if message[0] == "progress":
                done += message[1]
                if progress is not None:
                    progress(message[1])
            elif message[0] == "layer":
                layer, done = message[1], 0
            elif message[0] == "done":
                return message[1]
            else:
                _, name, text, hint = message
                cls = getattr(errors, name, CacheError)
                raise cls(text, hint=hint) if issubclass(cls, FmcacheError) else CacheError(text, hint=hint)
    finally:
        proc.join()
        receive.close()
    at = (f"in layer {layer!r}, after {done} of its samples verified" if layer is not None
          else "before its first layer (reading the manifest or the labels)")
    if stalled:
        raise CorruptionError(f"{path}: reading it made no progress for {stall_seconds:g} s {at}, and the verifying "
                              "process was stopped: the storage library is stuck on damage it cannot report "
                              "(HDF5's metadata has no checksums)")
    code = proc.exitcode if proc.exitcode is not None else 0
    if code > 0 and not heard:  # a Python error before the child ran (_child reports its own)
        raise CacheError(f"{path}: the verifying process could not start (exit code {code}); nothing was read",
                         hint="from a script, call verify_cache(..., isolated=True) under "
                              "`if __name__ == \"__main__\":` (multiprocessing imports the script again in "
                              "its new process), or verify without isolated=True")
    died = signal.Signals(-code).name if code < 0 else f"exit code {code}"
    raise CorruptionError(f"{path}: reading it crashed the verifying process ({died}) {at}: the storage library "
                          "met damage it cannot report (LMDB has no page checksums)")


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the fork server) exits, as it does
    when the verifying process is killed: a child stuck in a storage library's loop kept
    spinning after its verify was gone (a new-user sweep)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() == 1:  # PR_SET_PDEATHSIG
            os._exit(1)  # the parent was gone before the call
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _child(path: str, send: Connection) -> None:
    """The isolated verify's child: :func:`_verify`, reporting over ``send``."""
    _die_with_parent()
    try:
        try:
            report = _verify(path, lambda n: send.send(("progress", n)), lambda name: send.send(("layer", name)))
            send.send(("done", report))
        except FmcacheError as exc:
            send.send(("error", type(exc).__name__, exc.message, exc.hint))
        except Exception as exc:  # noqa: BLE001 - anything else crosses as a CacheError
            send.send(("error", "CacheError", f"{path}: verify failed: {type(exc).__name__}: {exc}", None))
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole process group: the parent says it
        os._exit(130)


#: what to do about damage that verify found
REBUILD_HINT = "rebuild the cache (or the damaged layer) from the source data"


def _verify(path: str | os.PathLike[str], progress: Callable[[int], None] | None,
            on_layer: Callable[[str], None] | None = None) -> VerifyReport:
    cache = open_cache(Path(path))
    with cache:
        report = VerifyReport(str(path), len(cache))
        cache.labels  # noqa: B018 - reading them checks their checksums
        # a cache built with allow_nonfinite stores NaN/Inf on purpose; elsewhere a decoded
        # NaN/Inf means damage that the checksums missed
        nonfinite_ok = bool(cache.manifest.build.get("allow_nonfinite"))
        for name, layer in cache.layers.items():
            if on_layer is not None:
                on_layer(name)
            step = max(1, layer.samples_per_chunk)
            for start in range(0, len(cache), step):
                samples = np.arange(start, min(start + step, len(cache)))
                try:
                    parts = cache.read_parts(name, samples)
                except CorruptionError:
                    for s in samples:  # narrow it down to the first bad sample
                        try:
                            cache.read_parts(name, [int(s)])
                        except CorruptionError as exc:
                            where = f"layer {name!r} sample {int(s)}"
                            # the readers' own messages mostly name the layer and sample already
                            raise CorruptionError(exc.message if where in exc.message else f"{where}: {exc.message}",
                                                  hint=exc.hint) from exc
                    raise
                for part, values in parts.items():
                    if not nonfinite_ok and not np.isfinite(values).all():
                        bad = int(samples[np.argmin(np.isfinite(values.reshape(len(samples), -1)).all(1))])
                        raise CorruptionError(f"layer {name!r} sample {bad} part {part!r}: decoded NaN/Inf, which "
                                              "the cache was not built to hold (allow_nonfinite)",
                                              hint="the stored bytes pass their checksums but decode to NaN/Inf: "
                                                   + REBUILD_HINT)
                report.layers[name] = report.layers.get(name, 0) + len(samples)
                if progress is not None:
                    progress(len(samples))
        return report
