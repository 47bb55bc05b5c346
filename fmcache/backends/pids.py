"""This process's id, without a system call per read.

``os.getpid()`` is a system call (~0.2 µs on this VM, 1–2 % of a small map's read), and
the read paths ask once or twice a read whether their handles were opened in this
process (a DataLoader worker's inherited handles must not be used). :data:`PID` holds the
id: set at import, and again in every child ``os.fork`` makes (``os.register_at_fork``:
multiprocessing's fork and forkserver children come from it; spawned ones import afresh).
"""

from __future__ import annotations

import os

#: ``[os.getpid()]`` of this process, kept current across forks
PID = [os.getpid()]


def _in_child() -> None:
    PID[0] = os.getpid()


os.register_at_fork(after_in_child=_in_child)
