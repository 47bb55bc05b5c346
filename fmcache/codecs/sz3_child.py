"""The SZ3 encoding process's own code: run as a script (``python -c`` + ``runpy``, see
:mod:`fmcache.codecs.sz3_process`), importing numpy and pysz only, not fmcache (whose
import brings torch: 1.6 s against 0.08 s).

Protocol on stdin / stdout, little-endian:

    request:  u32 n | JSON {"shape": [rows, cols], "mode": "abs"|"rel", "bound": float,
              "algo": pysz algorithm name} of n bytes | the maps, float32, C order
              (``count`` maps of ``rows x cols``: the JSON's "count")
    answer:   per map, i32 k | u32 crc32 of the k bytes | k bytes: the pysz stream
              (k >= 0), or an error text (-k bytes)

The answers go to a copy of the process's stdout taken at start; stdout itself (file
descriptor 1) is then pointed at stderr, so anything a library prints cannot fall into
the answers (the parent checks each answer's CRC as well).

Before any answer the process writes :data:`HELLO`. A request of n = 0 (or the end of
stdin) ends the process. Each map is compressed with a
fresh ``szConfig`` from :func:`config`, which :meth:`fmcache.codecs.sz3.Sz3._config` calls
too, so the streams are the bytes the codec writes on its own thread.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import zlib
from typing import Any, BinaryIO

import numpy as np
import pysz

#: the first bytes the process writes, once it has imported pysz: the parent knows then
#: that what it started is this script, ready
HELLO = b"fmcache-sz3-child 1\n"
U32 = struct.Struct("<I")
#: an answer's head: its length (negative: an error text) and the CRC-32 of its bytes
ANSWER = struct.Struct("<iI")


def read_exact(stream: BinaryIO, n: int) -> bytearray | None:
    """``n`` bytes, or None at the end of the stream before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            if got == 0:
                return None
            raise EOFError(f"request cut after {got} of {n} bytes")
        got += k
    return buf


def config(shape: tuple[int, ...], mode: str, bound: float, algo: str) -> Any:
    """pysz's configuration of one compression: ``mode`` ``abs`` or ``rel``, ``algo`` a
    pysz algorithm name (:meth:`fmcache.codecs.sz3.Sz3._config` calls this too)."""
    conf = pysz.szConfig(shape)
    if mode == "abs":
        conf.errorBoundMode = pysz.szErrorBoundMode.ABS
        conf.absErrorBound = bound
    else:
        conf.errorBoundMode = pysz.szErrorBoundMode.REL
        conf.relErrorBound = bound
    conf.cmprAlgo = getattr(pysz.szAlgorithm, algo)
    return conf


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    while True:
        head = read_exact(inp, U32.size)
        if head is None:
            return
        (n,) = U32.unpack(head)
        if n == 0:
            return
        text = read_exact(inp, n)
        if text is None:
            raise EOFError("request cut after its length")
        request = json.loads(bytes(text))
        rows, cols = request["shape"]
        count = request["count"]
        body = read_exact(inp, 4 * rows * cols * count) if count else bytearray()
        if body is None:
            raise EOFError("request cut before its maps")
        maps = np.frombuffer(body, dtype="<f4").reshape(count, rows, cols)
        parts = []
        for x in maps:
            try:
                stream, _ratio = pysz.sz.compress(x, config((rows, cols), request["mode"], request["bound"],
                                                           request["algo"]))
                data = stream.tobytes()
                parts.append(ANSWER.pack(len(data), zlib.crc32(data)) + data)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                message = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:4096]
                parts.append(ANSWER.pack(-len(message), zlib.crc32(message)) + message)
        out.write(b"".join(parts))
        out.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group: the parent decides when this process ends
    # (it asks, or closes the pipe), so an interrupted build does not also see it die
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(2, 1)  # what anything prints goes to stderr, not into the answers
    try:
        answers.write(HELLO)
        serve(sys.stdin.buffer, answers)
    except (BrokenPipeError, EOFError):
        pass  # the parent closed the pipes (a build that ended early, or its process died): done


if __name__ == "__main__":
    main()
