"""fmcache.memory: glibc's thresholds fixed, so freed batches stay mapped.

Each check runs in a fresh interpreter (the setting is process-wide and lasts), and counts
the page faults of a batch-like pattern: four 6 MiB arrays written and freed, twenty
times. glibc's defaults return them to the kernel every time (a fault per page); tuned,
the second round faults (almost) never. The untuned counts show the check can fail (about a
third of the pages: numpy asks for huge pages for arrays this large, so a fault may map 2 MiB).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

PAGES = 20 * 4 * (6 << 20) // 4096

PATTERN = textwrap.dedent("""
    import json, resource, sys
    import numpy as np

    def batches_faults():
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        counts = []
        for _ in range(2):
            before = faults()
            for _ in range(20):
                arrays = [np.ones(6 << 20, dtype=np.uint8) for _ in range(4)]
                del arrays
            counts.append(faults() - before)
        return counts[-1]  # the second round: after the heap has grown once
""")


def run(body: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:

    script = PATTERN + textwrap.dedent(body)
    full_env = {k: v for k, v in os.environ.items() if k != "FMCACHE_TUNE_MALLOC"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=full_env, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tuned_process_keeps_freed_batches_mapped_and_untuned_one_does_not() -> None:
    out = run("""
        from fmcache.memory import allocator_settings, tune_allocator
        untuned = batches_faults()
        applied = tune_allocator()
        print(json.dumps({"untuned": untuned, "tuned": batches_faults(),
                          "applied": [applied.mmap_threshold_mib, applied.trim_threshold_mib],
                          "recorded": allocator_settings() == applied}))
    """)
    assert out["applied"] == [256, 512] and out["recorded"]
    assert out["untuned"] > 0.2 * PAGES, out  # glibc's defaults: the pattern faults (the check can fail)
    assert out["tuned"] < 0.02 * PAGES, out


def test_environment_variable_leaves_the_allocator_alone() -> None:
    out = run("""
        from fmcache.memory import allocator_settings, tune_allocator
        print(json.dumps({"applied": tune_allocator() is None, "recorded": allocator_settings(),
                          "faults": batches_faults()}))
    """, env={"FMCACHE_TUNE_MALLOC": "0"})
    assert out["applied"] and out["recorded"] is None
    assert out["faults"] > 0.2 * PAGES, out


def test_smaller_thresholds_apply_and_a_batch_above_the_mmap_threshold_is_returned_at_once() -> None:
    out = run("""
        from fmcache.memory import tune_allocator
        applied = tune_allocator(mmap_threshold_mib=4, trim_threshold_mib=64)
        print(json.dumps({"applied": [applied.mmap_threshold_mib, applied.trim_threshold_mib],
                          "faults": batches_faults()}))
    """)
    assert out["applied"] == [4, 64]
    assert out["faults"] > 0.2 * PAGES, out  # 6 MiB > 4 MiB: mapped apart, every round


def test_thresholds_below_one_mib_are_refused() -> None:
    from fmcache.memory import tune_allocator

    with pytest.raises(ValueError, match="at least 1 MiB"):
        tune_allocator(mmap_threshold_mib=0)


def test_dataloader_workers_forked_after_tuning_inherit_it() -> None:
    out = run("""
        import torch
        from torch.utils.data import DataLoader, Dataset
        from fmcache.memory import tune_allocator

        class Faults(Dataset):
            def __len__(self):
                return 1
            def __getitem__(self, i):
                return batches_faults()

        tune_allocator()
        loader = DataLoader(Faults(), batch_size=None, num_workers=1,
                            multiprocessing_context="fork")
        print(json.dumps({"worker": int(next(iter(loader)))}))
    """)
    assert out["worker"] < 0.02 * PAGES, out


def test_the_command_line_tunes_at_start(tmp_path: Path) -> None:
    out = run("""
        from fmcache.cli import main
        from fmcache.memory import allocator_settings
        try:
            main(["codecs"], standalone_mode=False)
        finally:
            applied = allocator_settings()
        print(json.dumps({"applied": applied is not None, "faults": batches_faults()}))
    """)
    assert out["applied"] and out["faults"] < 0.02 * PAGES, out
