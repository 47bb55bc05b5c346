"""End to end: real Fashion-MNIST through a small CNN into both backends and back."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from contracts import assert_within_contract
from fmnist_small import N_SAMPLES, tiny_model, train_subset
from torch import nn
from torch.utils.data import DataLoader

import fmcache
from fmcache import FeatureMapDataset
from fmcache.builder import build_cache, shard_range
from fmcache.capture import Capture
from fmcache.errors import BuildError, LayerNotFoundError, StaleCacheError
from fmcache.report import inspect_cache
from fmcache.shards import merge_shards

HERE = Path(__file__).parent


def prefix_outputs(model: torch.nn.Module, dataset, layers):
    from fmcache.capture import Capture

    capture = Capture(model.eval(), layers)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return {k: v.numpy() for k, v in capture(x).items()}


@pytest.fixture(scope="module")
def data():
    return train_subset()


@pytest.mark.parametrize("backend,codec", [("lmdb", "bf16"), ("hdf5", "zfp:accuracy=0.01"), ("lmdb", "int8"),
                                           ("hdf5", "sz3:abs=0.001")])
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_build_then_dataloader_workers_match_the_prefix(tmp_path, data, backend, codec, start_method):
    model = tiny_model()
    out = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    build_cache(model, data, ["block2", "block1"], out, codec=codec, batch_size=40, progress=False)
    truth = prefix_outputs(model, data, ["block1", "block2"])
    labels = np.array([data[i][1] for i in range(len(data))])
    codec_obj = fmcache.codec_from_spec(codec)
    for layer in ("block1", "block2"):
        ds = FeatureMapDataset(out, layer)
        loader = DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=mp.get_context(start_method))
        got_x, got_y = zip(*[(x.numpy(), y.numpy()) for x, y in loader])
        got_x, got_y = np.concatenate(got_x), np.concatenate(got_y)
        np.testing.assert_array_equal(got_y, labels)
        for i in range(N_SAMPLES):
            assert_within_contract(codec_obj, truth[layer][i], got_x[i], f"{layer}[{i}]")


def test_forward_stops_after_the_last_boundary(data):
    model = tiny_model()
    ran = []
    model.fc.register_forward_hook(lambda *a: ran.append("fc"))
    model.block3.register_forward_hook(lambda *a: ran.append("block3"))
    from fmcache.capture import Capture

    Capture(model, ["block2"])(torch.zeros(2, 1, 32, 32))
    assert ran == []


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_a_boundary_overwritten_in_place_later_is_cached_as_the_module_returned_it(tmp_path, backend):
    """``Conv -> ReLU(inplace=True) -> Conv`` cached at both convs: the first conv's output
    was stored after the in-place ReLU had overwritten it (the hook kept a tensor sharing
    its storage); every boundary but the last is now copied when it fires."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(12, 3, 8, 8)
    out = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    build_cache(model, [(x[i], i) for i in range(12)], ["0", "2", "4"], out, codec="raw", batch_size=5,
                progress=False)
    with torch.no_grad():
        expected = {"0": model[0](x), "2": model[2](model[1](model[0](x)))}
        expected["4"] = model[4](model[3](expected["2"].clone()))
    assert float(expected["0"].min()) < 0 and float(expected["2"].min()) < 0  # what the ReLUs overwrite
    with fmcache.open_cache(out) as cache:
        for name, want in expected.items():
            np.testing.assert_allclose(cache.read_batch(name, range(12)), want.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=name)


def test_unknown_layer_is_a_typed_error_with_suggestions(tmp_path, data):
    with pytest.raises(LayerNotFoundError, match="no module named 'blok2'") as info:
        build_cache(tiny_model(), data, ["blok2"], tmp_path / "c.lmdb", progress=False)
    assert "block2" in info.value.hint
    assert not (tmp_path / "c.lmdb").exists() and not (tmp_path / "c.lmdb.partial").exists()


def test_fingerprints_refuse_changed_weights(tmp_path, data):
    model = tiny_model()
    out = tmp_path / "c.lmdb"
    m = build_cache(model, data, ["block2"], out, progress=False)
    with torch.no_grad():
        model.block3[0].weight.add_(1.0)  # after the boundary: not part of the prefix
    again = fmcache.builder.prefix_fingerprint(model, ["block2"], torch.zeros(1, 1, 32, 32))
    assert again == m.fingerprints["weights"]
    with torch.no_grad():
        model.block1[0].weight.add_(1e-3)
    changed = fmcache.builder.prefix_fingerprint(model, ["block2"], torch.zeros(1, 1, 32, 32))
    with pytest.raises(StaleCacheError):
        fmcache.open_cache(out, weights_fingerprint=changed)
    with pytest.raises(StaleCacheError):
        FeatureMapDataset(out, weights_fingerprint=changed)


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
import fmcache.cache as cache_mod
from fmnist_small import tiny_model, train_subset
from fmcache.builder import build_cache
original = cache_mod.CacheWriter.append
calls = []
def append(self, *a, **k):
    result = original(self, *a, **k)
    calls.append(1)
    if len(calls) == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
cache_mod.CacheWriter.append = append
build_cache(tiny_model(), train_subset(), ["block1", "block2"], {out!r}, codec={codec!r}, batch_size=16,
            progress=False, resume=True)
"""


@pytest.mark.parametrize("backend,codec", [("lmdb", "bf16"), ("hdf5", "zfp:accuracy=0.01")])
def test_sigkill_then_resume_equals_an_uninterrupted_build(tmp_path, data, backend, codec):
    suffix = ".h5" if backend == "hdf5" else ".lmdb"
    killed, clean = tmp_path / f"killed{suffix}", tmp_path / f"clean{suffix}"
    script = KILL_SCRIPT.format(here=str(HERE), out=str(killed), codec=codec, kill_after=3)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with pytest.raises(fmcache.errors.IncompleteCacheError):
        fmcache.open_cache(killed)
    build_cache(tiny_model(), data, ["block1", "block2"], killed, codec=codec, batch_size=16, progress=False,
                resume=True)
    build_cache(tiny_model(), data, ["block1", "block2"], clean, codec=codec, batch_size=16, progress=False)
    a, b = fmcache.open_cache(killed), fmcache.open_cache(clean)
    assert len(a) == len(b) == N_SAMPLES
    np.testing.assert_array_equal(a.labels, b.labels)
    for layer in ("block1", "block2"):
        np.testing.assert_array_equal(a.read_batch(layer, range(N_SAMPLES)), b.read_batch(layer, range(N_SAMPLES)))
        assert a.layers[layer].stored_bytes == b.layers[layer].stored_bytes
    assert a.manifest.fingerprints == b.manifest.fingerprints


def test_resume_with_other_data_is_refused(tmp_path, data):
    out = tmp_path / "c.lmdb"
    script = KILL_SCRIPT.format(here=str(HERE), out=str(out), codec="bf16", kill_after=2)
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, check=False)
    other = fmcache.zoo.FashionMNIST("test", limit=N_SAMPLES)
    with pytest.raises(StaleCacheError, match="input data changed"):
        build_cache(tiny_model(), other, ["block1", "block2"], out, batch_size=16, progress=False, resume=True)


def test_shards_merge_into_one_cache(tmp_path, data):
    model = tiny_model()
    parts = []
    for i in range(3):
        p = tmp_path / f"s{i}.lmdb"
        build_cache(model, data, ["block2"], p, codec="raw", shard=(i, 3), progress=False)
        parts.append(p)
    assert [len(fmcache.open_cache(p)) for p in parts] == [32, 32, 32]
    merged = merge_shards(parts[::-1], tmp_path / "merged")
    cache = fmcache.open_cache(merged)
    truth = prefix_outputs(model, data, ["block2"])["block2"]
    np.testing.assert_array_equal(cache.read_batch("block2", range(N_SAMPLES)), truth)
    np.testing.assert_array_equal(cache.labels, [data[i][1] for i in range(N_SAMPLES)])
    ds = FeatureMapDataset(merged, "block2")
    np.testing.assert_array_equal(ds[95][0].numpy(), truth[95])


def test_shards_of_both_backends_merge_and_inspect_names_both(tmp_path, data):
    """A merge of an LMDB and an HDF5 shard reads as one cache; inspect named only the
    first shard's backend."""
    model = tiny_model()
    parts = [tmp_path / "s0.lmdb", tmp_path / "s1.h5"]
    for i, p in enumerate(parts):
        build_cache(model, data, ["block2"], p, codec="raw", shard=(i, 2), progress=False)
    cache = fmcache.open_cache(merge_shards(parts, tmp_path / "merged"))
    np.testing.assert_array_equal(cache.read_batch("block2", range(N_SAMPLES)),
                                  prefix_outputs(model, data, ["block2"])["block2"])
    assert cache.backend_id == "lmdb+hdf5"
    assert inspect_cache(tmp_path / "merged")["backend"] == "lmdb+hdf5"


def test_a_shard_replaced_after_the_merge_is_refused(tmp_path, data):
    """A shard file swapped for another build's (other data, another shard range) was
    served as part of the merge; verify passed."""
    import shutil

    model = tiny_model()
    parts = [tmp_path / f"s{i}.lmdb" for i in range(2)]
    for i, p in enumerate(parts):
        build_cache(model, data, ["block2"], p, codec="raw", shard=(i, 2), progress=False)
    merged = merge_shards(parts, tmp_path / "merged")
    other = fmcache.zoo.FashionMNIST("test", limit=N_SAMPLES)
    for index, why in ((1, "fingerprints differ"), (0, "shard starts at sample 0, expected 48")):
        swap = tmp_path / f"other{index}.lmdb"
        build_cache(model, other if index == 1 else data, ["block2"], swap, codec="raw", shard=(index, 2),
                    progress=False)
        target = merged / "shard-00001-of-00002.lmdb"
        backup = tmp_path / "backup.lmdb"
        shutil.move(target, backup)
        shutil.copytree(swap, target)
        with pytest.raises(fmcache.errors.CorruptionError, match=f"{why}.*|replaced"):
            fmcache.open_cache(merged)
        shutil.rmtree(target)
        shutil.move(backup, target)
    assert len(fmcache.open_cache(merged)) == N_SAMPLES


def test_merge_refuses_missing_shards(tmp_path, data):
    model = tiny_model()
    parts = []
    for i in (0, 2):
        p = tmp_path / f"s{i}.lmdb"
        build_cache(model, data, ["block2"], p, codec="raw", shard=(i, 3), progress=False)
        parts.append(p)
    with pytest.raises(fmcache.errors.CacheError, match="expected 32"):
        merge_shards(parts, tmp_path / "merged")
    assert all(p.exists() for p in parts)  # nothing moved


@pytest.mark.parametrize("n,count", [(10, 3), (96, 4), (5, 5), (7, 1)])
def test_shard_ranges_partition_the_data(n, count):
    ranges = [shard_range(n, (i, count)) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_bad_shard_is_refused():
    with pytest.raises(BuildError):
        shard_range(10, (3, 3))


DDP_SCRIPT = """
import os, sys, json
import torch.distributed as dist
sys.path.insert(0, {here!r})
from fmcache import FeatureMapDataset
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
ds = FeatureMapDataset({path!r}, "block2")
sampler = ds.sampler()
seen = {{}}
for epoch in (0, 1):
    sampler.set_epoch(epoch)
    seen[epoch] = [int(i) for i in sampler]
    assert all(ds[i][0].shape == (8, 16, 16) for i in seen[epoch][:3])
print(json.dumps(seen))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_get_disjoint_complete_shares(tmp_path, data):
    import socket

    out = tmp_path / "c.lmdb"
    build_cache(tiny_model(), data, ["block2"], out, codec="bf16", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = DDP_SCRIPT.format(here=str(HERE), path=str(out), port=port)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-1500:] for o in outs]
    import json

    shares = [json.loads(o[0].decode().strip().splitlines()[-1]) for o in outs]
    for epoch in ("0", "1"):
        a, b = set(shares[0][epoch]), set(shares[1][epoch])
        assert not a & b and a | b == set(range(N_SAMPLES))
        assert len(shares[0][epoch]) == len(shares[1][epoch]) == N_SAMPLES // 2
    assert shares[0]["0"] != shares[0]["1"]


class _Squeezed(torch.nn.Module):
    """A boundary that squeezes its output: (N, 4, 1) -> (N, 4), but (4,) for N = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).unsqueeze(-1).squeeze()


def test_build_probes_shapes_with_more_than_one_sample(tmp_path):
    """The builder learns each boundary's per-sample shape from a probe of two samples: a
    one-sample probe would see a squeezed batch axis and record the wrong shape."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Squeezed(), torch.nn.Linear(4, 2))
    xs = torch.randn(6, 3)
    data = [(xs[i], i % 2) for i in range(6)]
    m = build_cache(model, data, ["0"], tmp_path / "c.lmdb", codec="raw", batch_size=3, progress=False)
    assert m.layers["0"].shape == (4,)
    with torch.no_grad():
        expected = model[0](xs).numpy()
    with fmcache.open_cache(tmp_path / "c.lmdb") as cache:
        np.testing.assert_array_equal(cache.read_batch("0", range(6)), expected)


def test_blosc2_compresses_without_the_gil_during_a_build():
    """python-blosc2 keeps the GIL through a compression by default, which let the builder's
    encoder thread stall its forward pass; inside ``blosc2_releasing_gil`` (the builder's
    pipeline) another thread runs Python while blosc2 compresses, and the process-wide
    setting is restored afterwards, after an error too."""
    import threading

    import blosc2

    from fmcache.codecs.lossless import blosc2_releasing_gil

    data = np.random.default_rng(0).integers(0, 4, 1_000_000, dtype=np.uint8)

    def steps_while_compressing() -> int:
        worker = threading.Thread(target=lambda: blosc2.compress2(data, codec=blosc2.Codec.ZSTD, clevel=9,
                                                                  nthreads=1))
        steps = 0
        worker.start()
        while worker.is_alive():
            steps += 1
        worker.join()
        return steps

    before = blosc2.set_releasegil(False)
    try:
        with pytest.raises(RuntimeError, match="inside"), blosc2_releasing_gil():
            assert blosc2.set_releasegil(True) is True  # on inside the block
            assert steps_while_compressing() > 100_000  # held: only the moments around the C call
            raise RuntimeError("inside")
        assert blosc2.set_releasegil(False) is False  # restored
    finally:
        blosc2.set_releasegil(before)


@pytest.mark.parametrize("batch_size", [3, 4])
@pytest.mark.parametrize("kind", [list, tuple])
def test_list_labels_are_stored_per_sample(tmp_path, batch_size, kind):
    """Multi-label targets as Python lists: ``default_collate`` made a list of per-position
    tensors of a batch, stored transposed (batch size = label length) or refused with a
    message about the maps (otherwise). Each item's label is now one row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    labels = [kind([i, 100 + i, 200 + i]) for i in range(9)]
    data = [(torch.randn(1, 8, 8), labels[i]) for i in range(9)]
    build_cache(model, data, ["1"], tmp_path / "c.lmdb", codec="raw", batch_size=batch_size, progress=False)
    with fmcache.open_cache(tmp_path / "c.lmdb") as cache:
        np.testing.assert_array_equal(cache.labels, np.array([list(y) for y in labels]))
        assert FeatureMapDataset(tmp_path / "c.lmdb")[4][1].tolist() == [4, 104, 204]


def test_ragged_or_mixed_labels_are_refused_with_what_to_do(tmp_path):
    from fmcache.errors import DataError, ShapeMismatchError
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    ragged = [(torch.randn(1, 8, 8), [1, [2, 3]]) for _ in range(4)]
    with pytest.raises(DataError, match="data set item 0: the label .* is not a numeric array"):
        build_cache(model, ragged, ["0"], tmp_path / "a.lmdb", progress=False)
    mixed = [(torch.randn(1, 8, 8), 3 if i < 4 else 2.5) for i in range(8)]
    with pytest.raises(ShapeMismatchError, match="labels at sample 4") as info:
        build_cache(model, mixed, ["0"], tmp_path / "b.lmdb", batch_size=4, progress=False)
    assert "float(y)" in info.value.hint and "--overwrite" in info.value.hint


class _FailsOnce(torch.utils.data.Dataset):
    """40 items; item ``fail_at`` raises once the model has run a batch of the build (an
    interrupted build: the shape probe and the data fingerprint read items before that)."""

    def __init__(self, model: torch.nn.Module, fail_at: int | None = None) -> None:
        self.x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.fail_at, self.forwards = fail_at, 0
        if fail_at is not None:
            model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        if i == self.fail_at and self.forwards >= 2:  # the probe's forward, then a batch's
            raise RuntimeError("interrupted")
        return self.x[i], i


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_resume_as_another_shard_or_layers_is_refused_and_the_same_one_finishes(tmp_path, backend):
    """An interrupted shard 0/2 resumed as shard 1/2 appended items 32.. after items 0..11
    under shard 0's manifest (the fingerprints cover the whole data set, so they passed)."""
    from fmcache.errors import ResumeError
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    out = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    kwargs = {"codec": "raw", "batch_size": 4, "progress": False}
    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(model, _FailsOnce(model, fail_at=14), ["1"], out, shard=(0, 2), **kwargs)
    assert Path(f"{out}.partial").exists()
    with pytest.raises(ResumeError, match=r"started with shard .*'index': 0.*this build has .*'index': 1"):
        build_cache(model, _FailsOnce(model), ["1"], out, shard=(1, 2), resume=True, **kwargs)
    with pytest.raises(ResumeError, match="started with layers"):
        build_cache(model, _FailsOnce(model), ["0", "1"], out, shard=(0, 2), resume=True, **kwargs)
    manifest = build_cache(model, _FailsOnce(model), ["1"], out, shard=(0, 2), resume=True, **kwargs)
    assert manifest.samples == 20
    with fmcache.open_cache(out) as cache:
        assert cache.labels.tolist() == list(range(20))


def test_merge_refuses_up_front_what_would_fail_after_moving_shards(tmp_path, data):
    """OUT inside a shard, or a shard on another file system, failed with an OSError after
    some shards were moved; a merged cache passed as a shard was "not an fmcache cache";
    shards of other layer orders were "layers, tier plans or their packing differ"."""
    import os
    import shutil
    import tempfile

    model = tiny_model()
    parts = [tmp_path / f"s{i}.lmdb" for i in range(2)]
    for i, p in enumerate(parts):
        build_cache(model, data, ["block2"], p, codec="raw", shard=(i, 2), progress=False)
    with pytest.raises(fmcache.errors.CacheError, match="inside the shard"):
        merge_shards(parts, parts[0] / "merged")
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm")) / "s1.lmdb"
        try:
            shutil.copytree(parts[1], elsewhere)
            with pytest.raises(fmcache.errors.CacheError, match="another file system"):
                merge_shards([parts[0], elsewhere], tmp_path / "m")
        finally:
            shutil.rmtree(elsewhere.parent)
    assert all(p.exists() for p in parts) and not (tmp_path / "m.partial").exists()
    merged = merge_shards(parts, tmp_path / "m")
    with pytest.raises(fmcache.errors.CacheError, match="is a merged cache, not a shard"):
        merge_shards([merged], tmp_path / "again")
    other = [tmp_path / f"o{i}.lmdb" for i in range(2)]
    for i, p in enumerate(other):
        build_cache(model, data, ["block1", "block2"] if i == 0 else ["block2", "block1"], p, codec="raw",
                    shard=(i, 2), progress=False)
    with pytest.raises(fmcache.errors.CacheError, match=r"layers \['block2', 'block1'\] differ"):
        merge_shards(other, tmp_path / "o")


def test_one_model_captured_from_two_threads_at_once_is_refused_not_mixed():
    """Two builds of one model instance at once: each forward fired the other's hooks too,
    so one build failed with "never ran" and the other could store the other's batch."""
    entered, release = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            entered.set()
            release.wait(10)
            return self.conv(x)

    model = Slow()
    x = torch.randn(2, 1, 4, 4)
    got: dict[str, object] = {}

    def first() -> None:
        got["first"] = Capture(model, ["conv"])(x)["conv"]

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(10)
    with pytest.raises(BuildError, match="another thread is running this Slow instance"):
        Capture(model, ["conv"])(x)
    release.set()
    thread.join(10)
    with torch.no_grad():
        assert torch.equal(got["first"], model.conv(x))
    assert torch.equal(Capture(model, ["conv"])(x)["conv"], got["first"])  # free again afterwards
