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
                          "recorded": allocator_settings() == applied, "text": str(applied)}))
    """)
    assert out["applied"] == [256, 512] and out["recorded"]
    assert out["text"] == "glibc thresholds fixed: mmap 256 MiB, trim 512 MiB"  # as the benchmarks record it
    assert out["untuned"] > 0.2 * PAGES, out  # glibc's defaults: the pattern faults (the check can fail)
    assert out["tuned"] < 0.02 * PAGES, out


def test_the_environment_variable_leaves_the_allocator_alone() -> None:
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


def test_bad_thresholds_are_refused_before_anything_changes() -> None:
    out = run("""
        from fmcache.memory import allocator_settings, tune_allocator
        refused = []
        for args in [(0, 512), (256, -1), (4096, 512), (256, 2048), (256, 1.5), (1.5, 10), (True, True),
                     ("5", 5), (float("inf"), 5), (None, 5)]:
            try:
                tune_allocator(*args)
            except (TypeError, ValueError) as exc:
                refused.append(type(exc).__name__)
        print(json.dumps({"refused": refused, "recorded": allocator_settings(), "faults": batches_faults()}))
    """)
    assert out["refused"] == ["ValueError"] * 4 + ["TypeError"] * 6, out
    assert out["recorded"] is None and out["faults"] > 0.2 * PAGES, out  # malloc left as it was


@pytest.mark.parametrize("value", ["0", " 0 ", "false", "No", "OFF"])
def test_the_environment_variable_turns_tuning_off_with_the_usual_words(value: str) -> None:
    out = run("""
        from fmcache.memory import tune_allocator
        print(json.dumps({"applied": tune_allocator() is not None}))
    """, env={"FMCACHE_TUNE_MALLOC": value})
    assert out == {"applied": False}


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_dataloader_workers_started_afresh_after_tuning_are_tuned_too(context: str, tmp_path: Path) -> None:
    # a spawned worker imports fmcache (to unpickle the data set, as a FeatureMapDataset's
    # does) and reads the thresholds its parent wrote into FMCACHE_TUNE_MALLOC
    (tmp_path / "faults_ds.py").write_text(PATTERN + textwrap.dedent("""
        import fmcache
        from torch.utils.data import Dataset

        class Faults(Dataset):
            def __len__(self):
                return 1
            def __getitem__(self, i):
                from fmcache.memory import allocator_settings
                return batches_faults(), allocator_settings().trim_threshold_mib
    """))
    out = run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from torch.utils.data import DataLoader
        from faults_ds import Faults
        from fmcache.memory import tune_allocator

        tune_allocator(trim_threshold_mib=300)
        loader = DataLoader(Faults(), batch_size=None, num_workers=1, multiprocessing_context={context!r})
        faults, trim = next(iter(loader))
        print(json.dumps({{"worker": int(faults), "trim": int(trim)}}))
    """)
    assert out["trim"] == 300 and out["worker"] < 0.02 * PAGES, out


def test_the_environment_variable_tunes_a_process_at_import_and_a_malformed_one_warns() -> None:
    body = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fmcache
            from fmcache.memory import allocator_settings
        applied = allocator_settings()
        print(json.dumps({"applied": None if applied is None else [applied.mmap_threshold_mib,
                                                                   applied.trim_threshold_mib],
                          "warned": [str(w.message) for w in caught if "FMCACHE_TUNE_MALLOC" in str(w.message)],
                          "faults": batches_faults()}))
    """
    tuned = run(body, env={"FMCACHE_TUNE_MALLOC": "64,256"})
    assert tuned["applied"] == [64, 256] and not tuned["warned"] and tuned["faults"] < 0.02 * PAGES, tuned
    for bad in ("yes", "256", "256,0", "a,b"):
        left = run(body, env={"FMCACHE_TUNE_MALLOC": bad})
        assert left["applied"] is None and len(left["warned"]) == 1, (bad, left)
        assert left["faults"] > 0.2 * PAGES, (bad, left)


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
