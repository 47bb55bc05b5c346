"""matplotlib for the tools' figures, or a note that says how to get it.

matplotlib is an optional extra (``pip install 'fmcache[plots]'``). Without it a tool
still writes its JSON and its tables; only the figure is left out, with a line saying so
(a missing matplotlib used to end a run of many minutes at its very end, tables unwritten).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def pyplot(figure: Path | str) -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (and a note) where it is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, {figure} was not drawn (pip install 'fmcache[plots]')",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
