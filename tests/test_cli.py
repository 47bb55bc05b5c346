"""The fmcache command: CliRunner for each command, one run of the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner
from fmnist_small import N_SAMPLES

import fmcache
from fmcache.backends.lmdb_backend import record_key
from fmcache.cli import main

HERE = Path(__file__).parent
BUILD = ["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset",
         "--layer", "block1", "--layer", "block2", "--batch-size", "32", "--no-progress"]


@pytest.fixture()
def runner(monkeypatch):
    monkeypatch.chdir(HERE)  # the current directory is importable for --model/--data
    return CliRunner()


@pytest.fixture()
def built(runner, tmp_path):
    out = tmp_path / "c.lmdb"
    result = runner.invoke(main, [*BUILD, "--out", str(out), "--codec", "int8"])
    assert result.exit_code == 0, result.output
    return out


def test_build_prints_the_inspect_table(runner, tmp_path):
    out = tmp_path / "c.h5"
    result = runner.invoke(main, [*BUILD, "--out", str(out), "--codec", "zfp:accuracy=0.01"])
    assert result.exit_code == 0, result.output
    assert "hdf5" in result.output and "block2" in result.output and "zfp:accuracy=0.01" in result.output
    assert len(fmcache.open_cache(out)) == N_SAMPLES


def test_inspect_json_has_the_documented_fields(runner, built):
    result = runner.invoke(main, ["inspect", str(built), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["samples"] == N_SAMPLES and doc["complete"] is True
    assert doc["backend"] == "lmdb" and doc["format_version"] == fmcache.FORMAT_VERSION
    layer = doc["layers"]["block2"]
    assert layer["shape"] == [8, 16, 16] and layer["dtype"] == "float32"
    assert layer["raw_bytes"] == N_SAMPLES * 8 * 16 * 16 * 4
    assert 0 < layer["stored_bytes"] < layer["raw_bytes"] / 2  # int8 is at least 2x smaller than fp32
    assert layer["tiers"] == [{"name": "all", "channels": 8, "codec": "int8:cname=lz4,clevel=5,shuffle=bit",
                               "raw_bytes": layer["raw_bytes"], "stored_bytes": layer["stored_bytes"]}]


def test_inspect_reports_an_interrupted_build(runner, tmp_path):
    out = tmp_path / "c.lmdb"
    w = fmcache.create_cache(out)
    w.add_layer("l", (2, 2, 2), codec="raw")
    w.append({"l": np.ones((3, 2, 2, 2), np.float32)}, [0, 1, 2])
    w.close()
    result = runner.invoke(main, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["complete"] is False and doc["samples"] == 3
    assert doc["layers"]["l"]["stored_bytes"] is None  # counted at commit, not shown as 0 B
    table = runner.invoke(main, ["inspect", str(out)]).output
    assert "--resume" in table and " 0 B" not in table, table
    by_partial = runner.invoke(main, ["inspect", f"{out}.partial", "--json"])  # the path a user sees on disk
    assert by_partial.exit_code == 0 and json.loads(by_partial.output)["samples"] == 3, by_partial.output


def test_verify_passes_a_good_cache(runner, built):
    result = runner.invoke(main, ["verify", str(built), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{N_SAMPLES} samples" in result.output and "block1 (96 records)" in result.output


def test_verify_names_the_first_bad_layer_and_sample(runner, built):
    env = lmdb.open(str(built), subdir=True)
    with env.begin(write=True) as txn:
        key = record_key(1, 17)  # layer block2 (declared second), sample 17
        value = bytearray(txn.get(key))
        value[len(value) // 2] ^= 0x40
        txn.put(key, bytes(value))
    env.close()
    result = runner.invoke(main, ["verify", str(built), "--no-progress"])
    assert result.exit_code == 1
    assert "layer 'block2' sample 17" in result.output and "checksum" in result.output
    assert result.output.count("layer 'block2' sample 17") == 1  # said once (it was repeated)
    assert "Traceback" not in result.output
    # the hint says what to do next, not to run the command that is running
    assert "hint: rebuild the cache" in result.output and "run `fmcache verify" not in result.output


def test_compact_converts_drops_and_reencodes(runner, built, tmp_path):
    dst = tmp_path / "small.h5"
    result = runner.invoke(main, ["compact", str(built), str(dst), "--codec", "fp16", "--drop-layer", "block1"])
    assert result.exit_code == 0, result.output
    src, out = fmcache.open_cache(built), fmcache.open_cache(dst)
    assert out.backend_id == "hdf5" and list(out.layers) == ["block2"]
    assert out.layers["block2"].plan.tiers[0].codec.codec_id == "fp16"
    a, b = src.read_batch("block2", range(N_SAMPLES)), out.read_batch("block2", range(N_SAMPLES))
    np.testing.assert_allclose(b, a, rtol=2**-11, atol=2**-24)  # fp16 of the int8-decoded maps
    np.testing.assert_array_equal(out.labels, src.labels)
    assert list(src.layers) == ["block1", "block2"]  # the source is untouched


def test_shards_build_and_merge(runner, tmp_path):
    parts = []
    for i in range(2):
        p = tmp_path / f"s{i}.lmdb"
        result = runner.invoke(main, [*BUILD, "--out", str(p), "--shard", f"{i}/2", "--codec", "raw"])
        assert result.exit_code == 0, result.output
        parts.append(str(p))
    taken = tmp_path / "taken"
    (taken / "x").mkdir(parents=True)
    refused = runner.invoke(main, ["merge", str(taken), *parts])
    assert refused.exit_code == 1 and "already exists" in refused.output, refused.output
    assert "--overwrite" not in refused.output and "remove OUT first" in refused.output  # merge has no --overwrite
    (tmp_path / "all").mkdir()  # an empty folder made for OUT is taken
    failed = runner.invoke(main, ["merge", str(tmp_path / "all"), parts[0]])  # a shard missing: refused
    assert failed.exit_code == 1 and (tmp_path / "all").is_dir()  # and the user's folder kept (it was removed)
    for bad in ("2/2", "-1/2", "1/0"):
        result = runner.invoke(main, [*BUILD, "--out", str(tmp_path / "x.lmdb"), "--shard", bad])
        assert result.exit_code == 2 and "0 <= i < n" in result.output, (bad, result.output)
    result = runner.invoke(main, ["merge", str(tmp_path / "all"), *parts])
    assert result.exit_code == 0, result.output
    assert len(fmcache.open_cache(tmp_path / "all")) == N_SAMPLES


def test_codecs_lists_every_registered_codec(runner):
    result = runner.invoke(main, ["codecs"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines()}
    assert listed == set(fmcache.registered_codecs())
    params = {line.split()[0]: line.split(" params ")[1] for line in result.output.splitlines()}
    assert params["sz3"] == "abs, rel, algo" and params["bf16"] == "cname, clevel, shuffle"
    assert params["raw"] == "none"  # what a spec error's hint sends the user here for


@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent/cache.lmdb"], "does not exist"),
    (["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset", "--layer", "nope",
      "--out", "{tmp}/x.lmdb", "--no-progress"], "no module named 'nope'"),
    (["build", "--model", "fmnist_small:nothing", "--data", "fmnist_small:train_subset", "--layer", "block1",
      "--out", "{tmp}/x.lmdb"], "has no attribute 'nothing'"),
    (["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset", "--layer", "block1",
      "--out", "{tmp}/x.lmdb", "--codec", "zfp:accuracy=-1", "--no-progress"], "zfp"),
    (["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset", "--layer", "block1",
      "--out", "{tmp}/x.lmdb", "--codec", "gzip", "--no-progress"], "unknown codec id 'gzip'"),
], ids=["missing-path", "bad-layer", "bad-factory", "bad-codec-param", "unknown-codec"])
def test_errors_are_one_line_and_exit_1(runner, tmp_path, args, message):
    result = runner.invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert not (tmp_path / "x.lmdb").exists()
    assert not (tmp_path / "x.lmdb.partial").exists()  # nothing was committed: nothing left to block a rerun


def test_a_failed_build_leaves_nothing_that_blocks_the_next(runner, tmp_path):
    """A bad codec spec, then NaN maps: each failed before its first batch was written,
    and left a .partial that refused the next build as "interrupted" (a new-user sweep);
    now the rerun with a good spec just builds."""
    out = tmp_path / "c.h5"
    bad = runner.invoke(main, [*BUILD, "--out", str(out), "--codec", "bf16:foo=1"])
    assert bad.exit_code == 1 and "codec 'bf16' has no parameter 'foo'" in bad.output, bad.output
    assert "_Cast16" not in bad.output
    nan = runner.invoke(main, [*BUILD, "--model", "fmnist_small:nan_model", "--out", str(out), "--codec", "raw"])
    assert nan.exit_code == 1 and "NaN/Inf in the map of sample 0" in nan.output, nan.output
    assert "--allow-nonfinite" in nan.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    good = runner.invoke(main, [*BUILD, "--out", str(out), "--codec", "bf16"])
    assert good.exit_code == 0, good.output


@pytest.mark.parametrize("codec", ["raw", "bf16"])
def test_allow_nonfinite_builds_keep_nan_and_inf_and_verify(runner, tmp_path, codec):
    """--allow-nonfinite stores a diverged prefix's NaN/Inf exactly (raw, bf16) and
    verify takes them for stored values; without the flag verify calls them damage."""
    out = tmp_path / "c.lmdb"
    result = runner.invoke(main, [*BUILD, "--model", "fmnist_small:nan_model", "--out", str(out), "--codec", codec,
                                  "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    with fmcache.open_cache(out) as cache:
        first = cache.read("block1", 5).reshape(-1)
        assert np.isnan(first[0]) and first[1] == np.inf and np.isfinite(first[2:]).all()
        assert cache.manifest.build["allow_nonfinite"] is True
    assert runner.invoke(main, ["verify", str(out), "--no-progress"]).exit_code == 0
    plain = tmp_path / "plain.lmdb"  # the same values written without the flag: verify refuses them
    with fmcache.open_cache(out) as cache, fmcache.create_cache(plain, allow_nonfinite=True) as writer:
        writer.add_layer("block1", cache.layer("block1").shape, codec=codec)
        writer.append({"block1": cache.read_batch("block1", range(8))}, np.zeros(8, np.int64))
        writer.manifest.build.pop("allow_nonfinite")
        writer.commit()
    refused = runner.invoke(main, ["verify", str(plain), "--no-progress"])
    assert refused.exit_code == 1 and "decoded NaN/Inf" in refused.output, refused.output


@pytest.mark.parametrize("args, message", [
    (["--model", "fmnist_small:not_a_model"], "the model is an int, not a torch.nn.Module"),
    (["--data", "fmnist_small:empty_data"], "the data set has no items"),
    (["--data", "fmnist_small:streamed_data"], "the data set is a _Stream, not a map-style data set"),
    (["--data", "fmnist_small:ragged_inputs"], "inputs of different shapes"),
    (["--data-dir", "/tmp"], "'fmnist_small:train_subset' cannot be called with data_dir="),
    (["--codec", "raw:level=1"], "codec 'raw' has no parameter 'level' (hint: its parameters: none"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
], ids=["not-a-module", "empty", "iterable", "ragged", "no-data-dir", "raw-param", "batch-0"])
def test_build_inputs_a_new_user_gets_wrong_are_named(runner, tmp_path, args, message):
    """A new user's sweep: these gave raw AttributeError / TypeError / torch messages
    ("'int' object has no attribute 'named_modules'", "shard None of 0 samples is empty",
    "its parameters: args, kwargs", torch's "stack expects each tensor to be equal size")."""
    result = runner.invoke(main, [*BUILD, "--out", str(tmp_path / "c.lmdb"), *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("data, message", [
    ("dict_items", "data set item 0 is a dict (keys ['image', 'label'])"),
    ("triple_items", "data set item 0 is a tuple of 3; the builder needs (input, label) pairs"),
    ("input_only", "data set item 0 is a Tensor; the builder needs (input, label) pairs"),
    ("none_labels", "data set item 0: the label is None: labels must be numeric"),
    ("string_labels", "data set item 0: the label is 'shirt': labels must be numeric"),
])
def test_data_sets_of_other_shapes_get_a_clear_error(runner, tmp_path, data, message):
    result = runner.invoke(main, [*BUILD, "--data", f"fmnist_small:{data}", "--out", str(tmp_path / "c.lmdb")])
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_compact_over_an_unfinished_destination_says_to_overwrite(runner, built, tmp_path):
    dst = tmp_path / "small.h5"
    Path(str(dst) + ".partial").write_bytes(b"left by a compaction that was killed")
    result = runner.invoke(main, ["compact", str(built), str(dst)])
    assert result.exit_code == 1 and "compact cannot resume" in result.output and "--resume" not in result.output
    result = runner.invoke(main, ["compact", str(built), str(dst), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not Path(str(dst) + ".partial").exists()


def test_debug_shows_the_traceback(runner):
    result = runner.invoke(main, ["--debug", "inspect", "/nonexistent/c.lmdb"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "NotACacheError" in result.output


def test_installed_command_runs_in_a_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("fmcache")
    assert exe.exists(), "the console script is installed with the package"
    out = tmp_path / "c.h5"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.run([str(exe), *BUILD, "--out", str(out), "--codec", "bf16"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(exe), "inspect", str(out), "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["samples"] == N_SAMPLES
    proc = subprocess.run([str(exe), "verify", "/nonexistent"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
def test_inspect_names_a_build_in_progress_and_an_interrupted_compact(tmp_path, suffix):
    """inspect during an HDF5 build said HDF5 cannot open it (run verify, rebuild); a
    compact's leftover DST.partial said to finish it with `fmcache build --resume`."""
    import os

    from fmcache.report import inspect_cache, render_table

    path = tmp_path / f"c{suffix}"
    writer = fmcache.create_cache(path)
    writer.add_layer("l", (2,), codec="raw")
    writer.append({"l": np.ones((3, 2), np.float32)}, np.arange(3))
    summary = inspect_cache(path)
    assert not summary["complete"] and f"being written now (process {os.getpid()})" in summary["hint"]
    assert "INCOMPLETE" in render_table(summary)
    writer.close()  # interrupted: the partial stays, nobody writes it
    assert "fmcache build ... --resume" in inspect_cache(path)["hint"]
    dst = tmp_path / f"d{suffix}"
    with fmcache.create_cache(dst, build={"compacted_from": str(path)}) as compacting:
        compacting.add_layer("l", (2,), codec="raw")
        compacting.append({"l": np.ones((3, 2), np.float32)}, np.arange(3))
    hint = inspect_cache(dst)["hint"]
    assert "interrupted compact" in hint and "--resume" not in hint
    with pytest.raises(fmcache.errors.IncompleteCacheError, match="interrupted build or compact") as info:
        fmcache.open_cache(dst)  # reading it: both ways out (it said to resume a build)
    assert "compact cannot resume" in info.value.hint



def test_compact_copies_a_cache_built_with_allow_nonfinite(tmp_path):
    """compact refused such a cache (NonFiniteError, with a hint to pass --allow-nonfinite,
    which compact has not): it could never be converted or re-encoded."""
    from fmcache.compact import compact_cache

    x = np.ones((4, 2, 3, 3), np.float32)
    x[0, 0, 0, 0], x[1, 1, 2, 2], x[2, 0, 1, 1] = np.nan, np.inf, -np.inf
    src = tmp_path / "s.lmdb"
    with fmcache.create_cache(src, allow_nonfinite=True) as writer:
        writer.add_layer("l", (2, 3, 3), codec="bf16")
        writer.append({"l": x}, np.arange(4))
        writer.commit()
    for dst, codec in ((tmp_path / "d.h5", "raw"), (tmp_path / "d.lmdb", None)):
        compact_cache(src, dst, codec=codec)
        np.testing.assert_array_equal(fmcache.open_cache(dst).read_batch("l", range(4)), x)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_build_says_how_to_continue(tmp_path, sig):
    """Ctrl-C printed only click's "Aborted!"; SIGTERM (kill, timeout, a scheduler's
    preemption) killed the build on the spot. Either way the partial is kept, the rows
    held back are written, and --resume finishes it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "c.lmdb"
    (tmp_path / "slowdata.py").write_text(
        "import time\nimport torch\nfrom fmnist_small import train_subset\n\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __init__(self):\n        self.base = train_subset()\n"
        "    def __len__(self):\n        return len(self.base)\n"
        "    def __getitem__(self, i):\n        time.sleep(0.03)\n        return self.base[i]\n\n"
        "def data():\n    return Slow()\n")
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{tmp_path}"}
    cmd = [sys.executable, "-c", "from fmcache.cli import main; main()", "build", "--model", "fmnist_small:tiny_model",
           "--data", "slowdata:data", "--layer", "block1", "--out", str(out), "--no-progress", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    partial = Path(f"{out}.partial")
    deadline = time.time() + 120
    while not (partial / "data.mdb").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the build finished before the interrupt")
    assert proc.returncode == 128 + getattr(signal, sig)
    assert "interrupted: the batches already written are kept" in err and "--resume" in err
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert len(fmcache.open_cache(out)) == 96


def test_build_and_train_options_a_build_would_ignore_or_misread_are_usage_errors(runner, tmp_path):
    """--codec with --saca (the policy's codecs were used), --rho / --policy without --saca
    (accepted, unused), --pixels a,b (a ValueError), train --test-samples 0 ("accuracy
    0.00 %"), --num-workers -1 (torch's ValueError) and --read-ahead beside workers."""
    base = ["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset", "--layer", "block1",
            "--out", str(tmp_path / "c.lmdb"), "--no-progress"]
    for extra, message in ((["--saca", "--codec", "int8"], "--codec is not read by a --saca build"),
                           (["--rho", "0.5", "--pixels", "0,1"], "--rho, --pixels are not read by a build without --saca"),
                           (["--saca", "--pixels", "a,b"], "is not MEAN,STD")):
        result = runner.invoke(main, base + extra)
        assert result.exit_code == 2 and message in result.output, result.output
    # SACA options out of range (the second sweep: exit 1 after the model loaded, not 2)
    for extra in (["--rho", "1.5"], ["--calib-samples", "0"], ["--max-variants", "0"], ["--max-shift", "-1"]):
        result = runner.invoke(main, base + ["--saca", *extra])
        assert result.exit_code == 2 and "Invalid value" in result.output, (extra, result.output)
    for extra in (["--test-samples", "0"], ["--num-workers", "-1"], ["--read-ahead", "-1"], ["--rho", "-0.1"],
                  ["--max-variants", "0"]):
        result = runner.invoke(main, ["train", "--work-dir", str(tmp_path / "t"), *extra])
        assert result.exit_code == 2 and "Invalid value" in result.output
    result = runner.invoke(main, ["train", "--work-dir", str(tmp_path / "t"), "--num-workers", "1", "--read-ahead", "2"])
    assert result.exit_code == 2 and "--read-ahead reads on a thread without workers" in result.output
    assert not (tmp_path / "c.lmdb").exists() and not (tmp_path / "t").exists()


def test_first_contact_details_from_the_packaging_sweep(runner, tmp_path):
    """demo ran a whole pre-training for --epochs 0; `python -m fmcache` did not exist; a
    factory with a required argument got the hint for an extra one."""
    import subprocess
    import sys

    for option in (["--epochs", "0"], ["--samples", "0"], ["--width", "0"]):
        result = runner.invoke(main, ["demo", *option])
        assert result.exit_code == 2 and "is not in the range" in result.output
    done = subprocess.run([sys.executable, "-m", "fmcache", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"fmcache, version {fmcache.__version__}"
    (tmp_path / "needs_args.py").write_text("def make(width):\n    raise AssertionError('not called')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        result = runner.invoke(main, ["build", "--model", "needs_args:make", "--data", "needs_args:make",
                                      "--layer", "x", "--out", str(tmp_path / "c.lmdb")])
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code == 1 and "missing a required argument: 'width'" in result.output
    assert "give the missing ones defaults" in result.output


def test_inspect_columns_fit_long_layer_names_and_full_codec_specs(tmp_path):
    """A full grid spec (47 characters) and a long layer name pushed the columns after
    them out of line (a helper's sweep): every tier row's codec starts under the header's
    ``codec`` and its ratio ends where the header's ``ratio`` does."""
    from fmcache.report import inspect_cache, render_table

    path = tmp_path / "c.lmdb"
    long_name = "encoder.blocks.11.attention.output"
    with fmcache.create_cache(path) as w:
        w.add_layer("a", (4, 3, 3), codec="bf16")
        w.add_layer(long_name, (4, 3, 3), codec="grid:rel=0.05")
        w.append({"a": np.ones((2, 4, 3, 3), np.float32), long_name: np.ones((2, 4, 3, 3), np.float32)}, [0, 1])
        w.commit()
    lines = render_table(inspect_cache(path)).splitlines()
    header = next(line for line in lines if "codec" in line and "ratio" in line)
    rows = [line for line in lines if line.rstrip().endswith("x") and "total" not in line]
    assert len(rows) == 2
    for row in rows:
        codec = row[header.index("codec"):].split()[0]
        assert codec.startswith(("bf16:", "grid:rel=0.05,cname=zstd")), row
        assert len(row.rstrip()) == len(header.rstrip()), (row, header)
