"""A baseline commit checked out beside the working tree, for the before/after tools.

``bench_ab``, ``bench_fastpath`` and ``bench_saca_items`` compare the working tree with an
earlier commit; each takes the commit from :func:`baseline_tree`: a temporary detached
git worktree, removed (with its folder) when the block ends, however it ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def baseline_tree(commit: str) -> Iterator[Path]:
    """The repository at ``commit`` in a temporary worktree (its path) for the block."""
    folder = Path(tempfile.mkdtemp(prefix="fmcache-baseline-"))
    tree = folder / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)
