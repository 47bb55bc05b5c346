"""Kill builds at random moments (SIGKILL), resume them: what does a user end up with?

Each trial forks a child that writes a cache of synthetic post-ReLU maps (two layers of
default chunk lengths, batches of 64 that do not end on chunk boundaries, ``--codec``)
and kills it after a random time within one clean build's duration. The driver then
resumes the partial (``resume=True``) and compares every value and label with a clean
build. Each trial ends as one of:

* ``resumed``  -- the resume finished and the cache equals the clean one;
* ``refused``  -- the resume refused the damaged partial (``ResumeError``; the user has
  to start over with ``--overwrite``);
* ``wrong``    -- the resumed cache differs from the clean one (must never happen);
* ``error``    -- another exception; ``complete`` -- the kill came after the commit.

``--baseline COMMIT`` runs the same trials (same seeds, same kill times) against that
commit's code as well, each in its own driver process, so the two are comparable::

    python tools/sweep_kill.py                                # HDF5, 40 trials (~1 min here)
    python tools/sweep_kill.py --baseline de2d0aa --json docs/sweep_kill.json --docs   # and its table
    python tools/sweep_kill.py --render docs/sweep_kill.json --docs                    # the table only
    python tools/sweep_kill.py --backend lmdb --trials 20

``--docs`` writes the table into docs/reliability.md (between the ``sweep_kill`` markers).

Prints JSON: per code (``current``, ``baseline``): the counts and each trial's kill time,
the samples the resume started from, and its outcome.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"conv": (16, 12, 12), "tokens": (10, 24)}
SAMPLES = 2048
BATCH = 64


def synthetic(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = {}
    for name, shape in SHAPES.items():
        x = rng.lognormal(-1.0, 1.0, size=(SAMPLES, *shape)) * (rng.random((SAMPLES, *shape)) > 0.4)
        maps[name] = x.astype(np.float32)
    return maps, rng.integers(0, 10, size=SAMPLES)


def build(fmcache: Any, path: Path, codec: str, backend: str, data: Any, resume: bool = False) -> int:
    """Write (or finish) the cache; returns the sample the writer started from."""
    maps, labels = data
    with fmcache.create_cache(path, backend=backend, resume=resume,
                              fingerprints={"weights": "w", "data": "d"}) as w:
        for name, shape in SHAPES.items():
            w.add_layer(name, shape, codec=codec)
        first = w.samples
        for start in range(first, SAMPLES, BATCH):
            w.append({k: v[start:start + BATCH] for k, v in maps.items()}, labels[start:start + BATCH])
        w.commit()
    return first


def same(fmcache: Any, a: Path, b: Path) -> bool:
    with fmcache.open_cache(a) as x, fmcache.open_cache(b) as y:
        everything = np.arange(SAMPLES)
        if len(x) != len(y) or not np.array_equal(x.labels, y.labels):
            return False
        return all(np.array_equal(x.read_batch(name, everything), y.read_batch(name, everything))
                   for name in SHAPES)


def forked(target: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            target(*args)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the child reports by its exit code
            os._exit(1)
    return pid


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """One code base's trials (run in a process whose ``fmcache`` is that code's)."""
    import fmcache
    from fmcache.errors import ResumeError

    data = synthetic()
    root = Path(tempfile.mkdtemp(prefix="fmcache-kill-"))
    suffix = ".h5" if args.backend == "hdf5" else ".lmdb"
    try:
        clean = root / f"clean{suffix}"
        began = time.perf_counter()
        os.waitpid(forked(build, fmcache, clean, args.codec, args.backend, data), 0)
        duration = time.perf_counter() - began
        rng = np.random.default_rng(args.seed)
        trials = []
        for trial in range(args.trials):
            path = root / f"t{trial}{suffix}"
            delay = float(rng.uniform(0.02, 0.9)) * duration
            pid = forked(build, fmcache, path, args.codec, args.backend, data)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            row: dict[str, Any] = {"kill_s": round(delay, 3)}
            if os.WIFEXITED(status):
                row["outcome"] = "complete"
            else:
                try:
                    row["resumed_from"] = build(fmcache, path, args.codec, args.backend, data, resume=True)
                    row["outcome"] = "resumed" if same(fmcache, path, clean) else "wrong"
                except ResumeError as exc:
                    row["outcome"], row["error"] = "refused", str(exc)[:300]
                except Exception as exc:  # noqa: BLE001 - recorded, not raised
                    row["outcome"], row["error"] = "error", f"{type(exc).__name__}: {exc}"[:300]
            trials.append(row)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            print(f"  trial {trial}: {row}", file=sys.stderr)
        counts = collections.Counter(row["outcome"] for row in trials)
        return {"build_s": round(duration, 3), "counts": dict(counts), "trials": trials}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_driver(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--driver", "--backend", args.backend, "--codec", args.codec,
               "--trials", str(args.trials), "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout)


MARK_BEGIN, MARK_END = "<!-- sweep_kill:start -->", "<!-- sweep_kill:end -->"


def render(result: dict[str, Any]) -> str:
    lines = ["| code | killed builds | resumed, equal to a clean build | refused (`ResumeError`) | wrong | other error |",
             "|---|---|---|---|---|---|"]
    for key in ("baseline", "current"):
        if key not in result:
            continue
        counts = result[key]["counts"]
        killed = sum(n for outcome, n in counts.items() if outcome != "complete")
        name = f"before (`{result[key]['commit']}`)" if key == "baseline" else "now"
        lines.append(f"| {name} | {killed} | {counts.get('resumed', 0)} | {counts.get('refused', 0)} | "
                     f"{counts.get('wrong', 0)} | {counts.get('error', 0)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["hdf5", "lmdb"], default="hdf5")
    parser.add_argument("--codec", default="bf16")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", help="a commit to run the same trials against")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/reliability.md")
    parser.add_argument("--render", help="only render this JSON's table (with --docs: into the page)")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(drive(args)))
        return
    if args.render:
        table = render(json.loads(Path(args.render).read_text()))
        print(table)
        if args.docs:
            sys.path.insert(0, str(REPO / "tools"))
            from bench_read import write_region

            write_region(REPO / "docs" / "reliability.md", MARK_BEGIN, MARK_END, table)
        return
    result: dict[str, Any] = {"backend": args.backend, "codec": args.codec, "samples": SAMPLES,
                              "batch": BATCH, "shapes": {k: list(v) for k, v in SHAPES.items()},
                              "current": run_driver(REPO, args)}
    if args.baseline:
        sys.path.insert(0, str(REPO / "tools"))
        from baseline_tree import baseline_tree

        with baseline_tree(args.baseline) as tree:
            result["baseline"] = {"commit": args.baseline, **run_driver(tree, args)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.docs:
        sys.path.insert(0, str(REPO / "tools"))
        from bench_read import write_region

        write_region(REPO / "docs" / "reliability.md", MARK_BEGIN, MARK_END, render(result))


if __name__ == "__main__":
    main()
