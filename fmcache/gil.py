"""How soon a thread waiting for the GIL gets it: shortened while a build encodes.

The builder encodes batch k on a background thread while its own thread runs the prefix
on batch k + 1. torch releases the GIL inside each operator, but the forward pass needs
it back between operators (module calls, hooks); a codec whose bindings keep the GIL
while they compress (pysz's SZ3 does: a loop of small convolutions ran 11x slower beside
a thread compressing with it, and not at all slower beside zfpy's ZFP; blosc2 is told to
release it, :func:`fmcache.codecs.lossless.blosc2_releasing_gil`) holds the forward pass up: a
thread that wants the GIL waits Python's switch interval (5 ms by default) before it
asks the holder to drop it, and the holder drops it only between its C calls. With the
interval at 0.1 ms the forward pass gets the GIL back after at most that plus one
sample's compression: width-16 builds with ``sz3:abs=0.02`` compressing on the build's
thread took 2.33 / 1.73 / 1.29x one forward pass at layer1 / layer2 / layer3 with the
default interval and 1.83 / 1.41 / 1.27x with 0.1 ms (``tools/bench_build.py
--sz3-ablation``); since the same session LMDB builds compress SZ3 in a process of their
own (:mod:`fmcache.codecs.sz3_process`, 1.66 / 1.14 / 1.09x), and the short interval
stays for everything else a build's thread may run that keeps the GIL. ``bf16`` builds,
whose encoder releases it, measured the same either way (0.94-1.01).

The interval is process-wide: :func:`frequent_switches` shortens it (never lengthens
it) for its block, an inner block may shorten it further (it stays so until the outermost
ends), and the value found by the outermost block is restored when the last such block
ends, unless something else changed it meanwhile. Nested and concurrent blocks (two builds on two
threads) are counted, so neither restores it under the other.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: the interval a build runs under (seconds)
BUILD_SWITCH_INTERVAL = 1e-4
#: the shortest interval the interpreter keeps (it stores whole microseconds: 1e-7 became 0)
MIN_INTERVAL = 1e-6

_lock = threading.Lock()
_depth = 0
_saved = 0.0
_set = 0.0


@contextmanager
def frequent_switches(interval: float = BUILD_SWITCH_INTERVAL) -> Iterator[None]:
    """Python's switch interval at most ``interval`` seconds for the block (see above)."""
    global _depth, _saved, _set
    if not interval >= MIN_INTERVAL:
        raise ValueError(f"a switch interval must be at least {MIN_INTERVAL} s (the interpreter keeps whole "
                         f"microseconds), got {interval!r}")
    with _lock:
        if _depth == 0:
            _saved = sys.getswitchinterval()
        if interval < sys.getswitchinterval():  # an inner block may shorten it further
            sys.setswitchinterval(interval)
        _set = sys.getswitchinterval()  # as the interpreter stores it (whole microseconds)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and sys.getswitchinterval() == _set:
                sys.setswitchinterval(_saved)
