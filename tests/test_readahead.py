"""ReadAhead: a thread of the training process reads batches ahead (fmcache.readahead).

The batches are the loader's own, bit for bit and in order, held without copies (a batch
buffer reused by the next one would show); an error of the reading thread is raised at
the batch it concerns (damage in a real LMDB cache included); leaving the loop early
stops the thread, which never reads more than ``depth`` batches past the one in hand."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import flip_everywhere, lmdb_record_copies
from test_handover import _saca_cache
from torch.utils.data import Dataset

from fmcache import FeatureMapDataset
from fmcache.errors import CorruptionError, SamplerConfigError
from fmcache.freezing import FreezingTrainer
from fmcache.loader import EpochLoader
from fmcache.readahead import ReadAhead
from fmcache.train import epoch_loader


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fmcache-read-ahead"]


def _held(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch, kept as it came (no clone): a reader refilling a buffer it had already
    handed out would change a batch held here."""
    return [(maps, labels) for maps, labels in batches]


@pytest.mark.parametrize("backend, depth, dtype", [("lmdb", 1, "float32"), ("lmdb", 4, "bf16"),
                                                   ("hdf5", 2, "float32"), ("hdf5", 3, "float32")])
def test_read_ahead_serves_the_loaders_batches_bit_for_bit(tmp_path, backend, depth, dtype):
    path = _saca_cache(tmp_path, backend=backend)
    plain = EpochLoader(FeatureMapDataset(path, augment="saca", seed=5, dtype=dtype), 8)
    ahead = EpochLoader(FeatureMapDataset(path, augment="saca", seed=5, dtype=dtype), 8, read_ahead=depth)
    for epoch in (0, 1, 2):
        batches = ahead(epoch)
        assert isinstance(batches, ReadAhead) and len(batches) == len(plain(epoch)) == 6
        got = _held(batches)
        want = [(m.clone(), y.clone()) for m, y in plain(epoch)]
        assert len(got) == len(want)
        for (gm, gy), (wm, wy) in zip(got, want):
            assert gm.dtype == wm.dtype and gm.shape == wm.shape
            bits = torch.int16 if gm.dtype == torch.bfloat16 else torch.int32
            assert torch.equal(gm.view(bits), wm.view(bits)) and torch.equal(gy, wy)
        # no batch was given out twice or refilled after it was handed out
        assert len({m.data_ptr() for m, _ in got}) == len(got)
    assert not _readers()


class _Numbers(Dataset):
    """Sample i is the tensor [i]; reading ``bad`` raises; ``read`` counts the reads."""

    def __init__(self, n: int, bad: int | None = None) -> None:
        self.n, self.bad, self.read = n, bad, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.read += 1
        if i == self.bad:
            raise KeyError(f"sample {i} is unreadable")
        return torch.tensor([float(i)]), i


def test_an_error_of_the_reading_thread_is_raised_at_its_batch():
    data = _Numbers(40, bad=None)
    order = [int(y) for _, ys in EpochLoader(data, 4, seed=1)(0) for y in ys]
    bad_batch = 6
    data.bad = order[bad_batch * 4 + 2]
    loader = EpochLoader(data, 4, seed=1, read_ahead=3)
    seen = []
    with pytest.raises(KeyError, match=f"sample {data.bad} is unreadable"):
        for _, ys in loader(0):
            seen.append(ys.tolist())
    assert len(seen) == bad_batch  # every batch before the damaged one, and none after
    assert [y for ys in seen for y in ys] == order[:bad_batch * 4]
    assert not _readers()


def test_damage_in_a_cache_read_ahead_is_raised_not_served(tmp_path):
    path = _saca_cache(tmp_path, backend="lmdb")
    offsets, length = lmdb_record_copies(path, 0, 17)
    flip_everywhere(path / "data.mdb", offsets, length // 2)
    loader = EpochLoader(FeatureMapDataset(path, augment="saca", seed=5), 8, read_ahead=2)
    with pytest.raises(CorruptionError, match="sample 17"):
        for _ in loader(0):
            pass
    assert not _readers()


@pytest.mark.parametrize("leave", ["break", "raise"])
def test_leaving_the_loop_early_stops_the_thread_within_its_depth(leave):
    data = _Numbers(400)
    loader = EpochLoader(data, 4, seed=2, read_ahead=2)
    taken = 0

    def loop():
        nonlocal taken
        for _ in loader(0):
            taken += 1
            if taken == 3:
                if leave == "raise":
                    raise RuntimeError("the training step failed")
                break

    if leave == "raise":
        with pytest.raises(RuntimeError, match="training step failed"):
            loop()
    else:
        loop()
    assert not _readers()
    # three batches taken, at most two waiting in the queue and one being read: 6 of 100
    assert taken == 3 and 3 * 4 <= data.read <= (3 + 2 + 1) * 4
    assert [int(y) for _, ys in loader(1) for y in ys][:4]  # the loader serves the next epoch


def test_read_ahead_settings_are_checked():
    data = _Numbers(8)
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(SamplerConfigError, match="read_ahead="):
            EpochLoader(data, 4, read_ahead=bad)
    with pytest.raises(SamplerConfigError, match="num_workers=1") as err:
        EpochLoader(data, 4, num_workers=1, read_ahead=2)
    assert "without workers" in err.value.hint
    with pytest.raises(SamplerConfigError, match="depth=0"):
        ReadAhead([], 0)
    # a plain loader, or a loader of one epoch, without read-ahead is what it was
    assert not isinstance(EpochLoader(data, 4)(0), ReadAhead)
    assert [int(y) for _, ys in epoch_loader(data, 4, 0, seed=3, read_ahead=1) for y in ys] == \
        [int(y) for _, ys in epoch_loader(data, 4, 0, seed=3) for y in ys]


def test_the_trainer_refuses_read_ahead_beside_workers(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 2))
    data = _Numbers(8)
    with pytest.raises(SamplerConfigError, match="read_ahead=2 with num_workers=2"):
        FreezingTrainer(model, data, data, epochs=1, work_dir=tmp_path, num_workers=2, read_ahead=2)


def test_plain_iterables_are_read_ahead_in_order_and_again_on_each_pass():
    source = [np.full(3, i) for i in range(25)]
    ahead = ReadAhead(source, depth=5)
    for _ in range(2):
        assert [int(a[0]) for a in ahead] == list(range(25))
    assert len(ahead) == 25 and not _readers()


def test_reading_ahead_draws_from_the_training_steps_random_numbers_as_the_plain_loader_does(tmp_path):
    """A FeatureMapDataset's draws come from its own seed, and the loader's iterator is
    made in the training loop's thread (a DataLoader draws its base seed from torch's
    global generator then): with a thread reading ahead, torch's and numpy's global
    generators (dropout, the user's shuffles) are where the plain loader leaves them."""
    path = _saca_cache(tmp_path, backend="hdf5")
    after = []
    for depth in (0, 2):
        loader = EpochLoader(FeatureMapDataset(path, augment="saca", seed=5), 8, read_ahead=depth)
        torch.manual_seed(11)
        np.random.seed(11)
        for k, _ in enumerate(loader(0)):
            after.append((depth, k, torch.rand(1).item()))  # a step's draw between batches
        after.append((depth, -1, torch.rand(4).tolist(), np.random.rand(4).tolist()))
    plain = [a[1:] for a in after if a[0] == 0]
    assert plain == [a[1:] for a in after if a[0] == 2] and len(plain) == 7


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_workers_forked_while_a_thread_reads_ahead_read_the_same_batches(tmp_path, backend):
    """A validation loader with workers started mid-epoch forks the training process while
    its read-ahead thread may be inside a read of the same cache (LMDB's fork gate,
    h5py's lock): every batch of both loaders is the plain loader's, and nothing hangs."""
    path = _saca_cache(tmp_path, backend=backend)
    want = [(m.clone(), y.clone()) for m, y in EpochLoader(FeatureMapDataset(path, augment="saca", seed=5), 8)(0)]
    ahead = EpochLoader(FeatureMapDataset(path, augment="saca", seed=5), 8, read_ahead=3)
    got, forked = [], []
    for k, batch in enumerate(ahead(0)):
        got.append(batch)
        if k in (1, 3):  # the thread is reading the next batches now
            with_workers = EpochLoader(FeatureMapDataset(path, augment="saca", seed=5), 8, num_workers=2,
                                       persistent=False)
            forked.append([(m.clone(), y.clone()) for m, y in with_workers(0)])
    for batches in (got, *forked):
        assert len(batches) == len(want)
        for (gm, gy), (wm, wy) in zip(batches, want):
            assert torch.equal(gm, wm) and torch.equal(gy, wy)
    assert not _readers()


# ---- session 19's new-user sweep of read-ahead ---------------------------------------------

HELD_AT_EXIT = '''
import sys, torch
from torch.utils.data import Dataset
from fmcache.loader import EpochLoader
torch.set_num_threads(1)
class Heavy(Dataset):  # a transform that runs torch kernels
    def __len__(self): return 1000
    def __getitem__(self, i):
        x = torch.ones(256, 256)
        for _ in range(20): x = x @ x / 256
        return x[:1, :8], i
batches = iter(EpochLoader(Heavy(), 4, read_ahead=2)(0))  # kept past the loop: the thread reads on
next(batches)
print("exiting", flush=True)
sys.exit(0)
'''


def test_a_pass_still_referenced_at_exit_lets_the_interpreter_exit_cleanly():
    """An iterator kept past its loop left the reading thread inside a torch kernel while
    the interpreter finalised: the process aborted ("terminate called without an active
    exception", status 134) at every such exit. The exit now stops and joins the thread."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", HELD_AT_EXIT], capture_output=True, text=True, timeout=120,
                              check=False, cwd=Path(__file__).parents[1])
        assert done.returncode == 0 and done.stdout.strip() == "exiting", (done.returncode, done.stderr[-1500:])
        assert "terminate called" not in done.stderr


def test_iter_draws_the_loaders_base_seed_at_once_as_the_plain_loader_does():
    """``iter(ReadAhead)`` made nothing until the first ``next()`` (a generator): a draw from
    torch's generator between ``iter()`` and ``next()`` came before the DataLoader's
    base-seed draw, not after it."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(32.0)), batch_size=4,
                                         shuffle=True)
    seen = []
    for source in (loader, ReadAhead(loader, 2)):
        torch.manual_seed(0)
        batches = iter(source)
        between = torch.rand(1).item()
        seen.append((between, next(batches)[0].tolist()))
        del batches
    assert seen[0] == seen[1]


def test_a_pass_closed_by_the_garbage_collector_in_its_own_thread_closes_quietly():
    """The cyclic collector can close an abandoned pass from inside its reading thread;
    its cleanup then joined that very thread: "RuntimeError: cannot join current thread"."""
    errors: list[BaseException] = []
    holder: dict[str, object] = {}
    suspended = threading.Event()

    class ClosesItsPass(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            if i == 20:  # read ahead while the loop holds its first batch: the pass is suspended
                suspended.wait(10)
                try:
                    holder["pass"].close()  # type: ignore[attr-defined]
                except BaseException as exc:  # noqa: BLE001 - what the collector would have printed
                    errors.append(exc)
            return torch.tensor([float(i)]), i

    batches = ReadAhead(torch.utils.data.DataLoader(ClosesItsPass(), batch_size=4), depth=8)
    holder["pass"] = iter(batches)
    first = next(holder["pass"])  # type: ignore[call-overload]
    suspended.set()
    deadline = time.monotonic() + 10
    while not errors and _readers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first[1].tolist() == [0, 1, 2, 3]
    assert errors == [] and not _readers()


class _EpochTagged(Dataset):
    """Items tagged with the epoch set when read (an augmentation's epoch), a read slow
    enough for two threads to interleave."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        time.sleep(0.0002)  # reading, then augmenting for the epoch set
        return torch.tensor([float(i * 1000 + self.epoch)]), i


def test_loaders_sharing_a_data_set_read_ahead_each_their_own_epoch():
    """Two read-ahead loaders over one data set with a ``set_epoch`` (or a Subset of a
    cache), at different epochs: the threads selected each other's epoch between select
    and read (126 of 128 batches wrong in the sweep); each now gets its own epoch's items."""
    want = [[m.clone() for m, _ in EpochLoader(_EpochTagged(), 8, seed=3)(e)] for e in (0, 1)]
    shared = _EpochTagged()
    first, second = (EpochLoader(shared, 8, seed=3, read_ahead=2), EpochLoader(shared, 8, seed=3, read_ahead=2))
    got: list[list[torch.Tensor]] = [[], []]
    for (a, _), (b, _) in zip(first(0), second(1)):
        got[0].append(a)
        got[1].append(b)
    for epoch in (0, 1):
        assert len(got[epoch]) == len(want[epoch]) == 12
        for g, w in zip(got[epoch], want[epoch]):
            assert torch.equal(g, w)
    assert {int(v) % 1000 for m in got[1] for v in m.flatten()} == {1}


def test_a_nested_read_of_a_thread_at_exit_finishes_its_outer_read():
    """At exit a read that starts in a thread other than the main one waits for good; a
    read nested in one already under way waited too, and the exit waited its whole 2 s
    for the outer read it held up (a read-ahead thread mid-batch on HDF5)."""
    from fmcache.backends import inflight

    class Reader:
        @inflight.in_flight
        def outer(self) -> str:
            inflight.EXITING[0] = True  # the exit begins while this read is under way
            return self.inner()

        @inflight.in_flight
        def inner(self) -> str:
            return "read"

    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(Reader().outer()), daemon=True)
    try:
        thread.start()
        thread.join(5)
    finally:
        inflight.EXITING[0] = False
    assert result == ["read"] and not thread.is_alive()
    assert threading.get_ident() not in inflight.READS and thread.ident not in inflight.READS
