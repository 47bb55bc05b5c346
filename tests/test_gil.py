"""fmcache.gil: the GIL switch interval a build runs under, set and restored."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fmcache
from fmcache.builder import build_cache
from fmcache.gil import BUILD_SWITCH_INTERVAL, frequent_switches


@pytest.fixture(autouse=True)
def _default_interval():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(before)


def test_shortens_for_the_block_and_restores():
    with frequent_switches():
        assert sys.getswitchinterval() == pytest.approx(BUILD_SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_never_lengthens():
    sys.setswitchinterval(1e-5)
    with frequent_switches(1e-3):
        assert sys.getswitchinterval() == pytest.approx(1e-5)
    assert sys.getswitchinterval() == pytest.approx(1e-5)


def test_nested_blocks_restore_once_the_outer_ends():
    with frequent_switches():
        with frequent_switches():
            pass
        assert sys.getswitchinterval() == pytest.approx(BUILD_SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_restores_after_an_error():
    with pytest.raises(KeyError), frequent_switches():
        raise KeyError("x")
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_a_value_set_inside_the_block_is_kept():
    with frequent_switches():
        sys.setswitchinterval(0.002)
    assert sys.getswitchinterval() == pytest.approx(0.002)


def test_overlapping_blocks_on_two_threads_restore_when_the_last_ends():
    """Two builds on two threads: the first to finish must not restore 5 ms under the
    other, and the last must not leave 0.1 ms behind (it found 0.1 ms when it began)."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, float] = {}

    def first() -> None:
        with frequent_switches():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with frequent_switches():
            second_in.set()
            first_out.wait(5)
            seen["after the first ended"] = sys.getswitchinterval()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["after the first ended"] == pytest.approx(BUILD_SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), 1e-7])
def test_refuses_an_interval_the_interpreter_cannot_keep(interval):
    """1e-7 s was stored as 0 (the interpreter keeps whole microseconds)."""
    with pytest.raises(ValueError, match="at least 1e-06 s"), frequent_switches(interval):
        pass
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_an_inner_block_may_shorten_it_further_until_the_outermost_ends():
    with frequent_switches():
        with frequent_switches(1e-5):
            assert sys.getswitchinterval() == pytest.approx(1e-5)
        assert sys.getswitchinterval() == pytest.approx(1e-5)  # "at most": not lengthened back
    assert sys.getswitchinterval() == pytest.approx(0.005)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sys.getswitchinterval())
        return self.conv(x)


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
def test_a_build_runs_its_forward_passes_under_the_short_interval_and_restores_it(tmp_path, suffix):
    model = _Recorder()
    inputs = torch.randn(40, 1, 6, 6)
    data = TensorDataset(inputs, torch.arange(40))
    codec = "sz3:abs=0.01" if suffix == ".lmdb" else "bf16"  # pysz keeps the GIL; blosc2 releases it
    build_cache(model, data, ["conv"], tmp_path / f"c{suffix}", batch_size=8, codec=codec, progress=False)
    # the first pass is the probe (before any encoding); every batch after it ran short
    batches = model.seen[1:]
    assert len(batches) == 5
    assert batches == [pytest.approx(BUILD_SWITCH_INTERVAL)] * 5
    assert sys.getswitchinterval() == pytest.approx(0.005)
    with torch.inference_mode():
        expected = model.conv(inputs).numpy()
    bound = 0.01 if suffix == ".lmdb" else 2.0**-8 * np.abs(expected) + 2.0**-126
    with fmcache.open_cache(tmp_path / f"c{suffix}") as cache:
        for i in (0, 17, 39):
            assert (np.abs(cache.read("conv", i) - expected[i]) <= (bound if np.isscalar(bound) else bound[i])).all()
