"""fmcache.codecs.sz3_process: SZ3 compressed in a process of its own during builds."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import feature_maps, post_relu_maps
from torch import nn
from torch.utils.data import TensorDataset

import fmcache
from fmcache.builder import build_cache
from fmcache.codecs import codec_from_spec, sz3_process
from fmcache.codecs.sz3_child import ANSWER, HELLO, U32, serve
from fmcache.codecs.sz3_process import ENV, Sz3Process, active_process, encoding_process
from fmcache.errors import EncodeError

SPECS = ["sz3:abs=0.02", "sz3:rel=0.01", "sz3:abs=1e-3,algo=nopred", "sz3:rel=0.05,algo=interp",
         "sz3:abs=0.1,algo=lorenzo-reg"]


@pytest.fixture
def process():  # one per test function (hypothesis's examples share it)
    with encoding_process([codec_from_spec("sz3:abs=1")]) as p:
        yield p


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(maps=st.one_of(post_relu_maps(), feature_maps()), n=st.integers(1, 4))
def test_the_process_writes_the_codecs_own_bytes(process, spec, maps, n):
    """Tiny maps (stored raw), constant ones, negative ones, every predictor and mode:
    what the build stores through the process is what encode writes on its own."""
    codec = codec_from_spec(spec)
    batch = np.stack([maps * (k + 1) for k in range(n)]).astype(np.float32)
    assert active_process() is process
    assert codec.encode_batch(batch) == [codec.encode(x) for x in batch]


def test_non_finite_maps_are_refused_as_encode_refuses_them(process):
    """(The writer refuses NaN/Inf before any codec sees them; the codec alone must too.)"""
    codec = codec_from_spec("sz3:abs=0.01")
    bad = np.ones((4, 2, 4, 4), np.float32)
    bad[2, 1, 3, 0] = np.nan
    with pytest.raises(EncodeError, match=r"codec 'sz3' cannot store NaN/Inf \(1 non-finite values\)"):
        codec.encode_batch(bad)
    assert active_process() is process


def test_the_child_reports_a_failure_per_map_and_the_codec_raises_it(process):
    """An algorithm name pysz does not know: the child answers with the error's text for
    each map (it does not die), the parent returns it."""
    answers = process.compress(np.zeros((2, 3, 5), np.float32), "abs", 0.1, "NO_SUCH_ALGO")
    assert len(answers) == 2 and all(isinstance(a, str) and "NO_SUCH_ALGO" in a for a in answers)
    assert active_process() is process  # still serving
    codec = codec_from_spec("sz3:abs=0.1")
    assert codec.encode_batch(np.ones((2, 3, 5), np.float32)) == [codec.encode(np.ones((3, 5), np.float32))] * 2


def _request(shape, count, body, algo="INTERP_LORENZO"):
    text = json.dumps({"shape": list(shape), "count": count, "mode": "abs", "bound": 0.1, "algo": algo}).encode()
    return U32.pack(len(text)) + text + body


def test_the_child_serves_requests_until_a_zero_length_one():
    maps = np.random.default_rng(0).random((3, 16, 64), dtype=np.float32)
    out = io.BytesIO()
    serve(io.BytesIO(_request((16, 64), 3, maps.tobytes()) + U32.pack(0) + b"ignored"), out)
    answer = memoryview(out.getvalue())
    at, streams = 0, []
    for _ in range(3):
        k, crc = ANSWER.unpack_from(answer, at)
        assert k > 0
        streams.append(bytes(answer[at + 8:at + 8 + k]))
        assert zlib.crc32(streams[-1]) == crc
        at += 8 + k
    assert at == len(answer)
    codec = codec_from_spec("sz3:abs=0.1")
    for x, stream in zip(maps, streams):
        payload = codec.encode(x)
        assert payload[9] == 1  # after the 2-D shape header: mode 1, the stream (not raw)
        assert payload[-len(stream):] == stream


def test_the_child_refuses_a_cut_request():
    with pytest.raises(EOFError, match="cut"):
        serve(io.BytesIO(_request((4, 8), 3, b"\0" * 50)), io.BytesIO())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.seen: list[int | None] = []
        self.kill_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        process = active_process()
        self.seen.append(process.pid if process is not None else None)
        if self.kill_at is not None and len(self.seen) == self.kill_at and process is not None:
            process.proc.kill()
        return self.relu(self.conv(x))


def _data(n=48):
    return TensorDataset(torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(0)), torch.arange(n))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _maps(path):
    with fmcache.open_cache(path) as cache:
        return np.stack([cache.read("relu", i) for i in range(len(cache))])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_lmdb_build_with_sz3_runs_one_process_and_ends_it(tmp_path, num_workers):
    """Forked DataLoader workers hold the pipe's ends too: the process must still end."""
    torch.manual_seed(0)
    model = Net()
    build_cache(model, _data(), ["relu"], tmp_path / "c.lmdb", codec="sz3:abs=0.01", batch_size=8,
                num_workers=num_workers, progress=False)
    batches = model.seen[1:]  # the first call is the probe, before the loop
    assert len(batches) == 6 and batches[0] is not None and set(batches) == {batches[0]}
    assert not _alive(batches[0])
    with torch.inference_mode():
        expected = model.relu(model.conv(_data().tensors[0])).numpy()
    assert np.abs(_maps(tmp_path / "c.lmdb") - expected).max() <= 0.01


@pytest.mark.parametrize(("path", "codec", "env"), [("c.h5", "sz3:abs=0.01", None), ("c.lmdb", "bf16", None),
                                                   ("c.lmdb", "sz3:abs=0.01", "0"), ("c.lmdb", "sz3:abs=0.01", "off")])
def test_no_process_without_sz3_through_the_bytes_face_or_when_turned_off(tmp_path, monkeypatch, path, codec, env):
    if env is not None:
        monkeypatch.setenv(ENV, env)
    model = Net()
    build_cache(model, _data(16), ["relu"], tmp_path / path, codec=codec, batch_size=8, progress=False)
    assert model.seen == [None] * 3


def test_a_killed_process_leaves_the_build_to_its_thread_with_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = Net()
    build_cache(model, _data(), ["relu"], tmp_path / "whole.lmdb", codec="sz3:abs=0.01", batch_size=8,
                progress=False)
    model.seen.clear()
    model.kill_at = 3  # the probe, batch 0, then killed during batch 1's forward pass
    with pytest.warns(RuntimeWarning, match=r"SZ3 encoding process \(pid \d+\) ended.*on the build's thread"):
        build_cache(model, _data(), ["relu"], tmp_path / "killed.lmdb", codec="sz3:abs=0.01", batch_size=8,
                    progress=False)
    assert model.seen[1] is not None and model.seen[-1] is None
    whole, killed = _maps(tmp_path / "whole.lmdb"), _maps(tmp_path / "killed.lmdb")
    assert whole.tobytes() == killed.tobytes()


def test_a_process_that_cannot_start_is_a_warning(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no more processes")

    monkeypatch.setattr(sz3_process.subprocess, "Popen", refuse)
    model = Net()
    with pytest.warns(RuntimeWarning, match="could not start its SZ3 encoding process"):
        build_cache(model, _data(16), ["relu"], tmp_path / "c.lmdb", codec="sz3:abs=0.01", batch_size=8,
                    progress=False)
    assert model.seen == [None] * 3
    assert _maps(tmp_path / "c.lmdb").shape == (16, 4, 12, 12)


def test_a_closed_process_is_not_served():
    process = Sz3Process()
    process.close()
    assert not _alive(process.pid)
    with pytest.raises(sz3_process.ProcessGone):
        process.compress(np.zeros((1, 2, 2), np.float32), "abs", 0.1, "INTERP_LORENZO")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        process.close()  # twice: nothing


def test_what_the_child_prints_does_not_reach_the_answers():
    """pysz (or SZ3's C code) printing to stdout must not shift the answers: the child
    answers on a copy of stdout and points stdout at stderr."""
    noisy = ("import os, sys\n"
             "from fmcache.codecs import sz3_child\n"
             "real = sz3_child.serve\n"
             "def serve(inp, out):\n"
             "    os.write(1, b'noise from C')\n"
             "    print('noise from Python', flush=True)\n"
             "    real(inp, out)\n"
             "sz3_child.serve = serve\n"
             "sz3_child.main()\n")
    process = Sz3Process([sys.executable, "-c", noisy])
    try:
        maps = np.random.default_rng(1).random((2, 16, 64), dtype=np.float32)
        codec = codec_from_spec("sz3:abs=0.05")
        streams = process.compress(maps, "abs", 0.05, "INTERP_LORENZO")
        assert [codec.encode(x)[-len(s):] for x, s in zip(maps, streams)] == streams
    finally:
        process.close()


@pytest.mark.parametrize(("answer", "why"), [("b'\\x05\\0\\0\\0' + b'\\0' * 4 + b'hello'", "fails its CRC-32"),
                                           ("b'nois' + b'e from C'", "claims 1936289646 bytes")])
def test_an_answer_out_of_step_ends_the_process_at_once(answer, why):
    """A process whose answer is not what it says (a wrong CRC, a length read from text)
    is not trusted, and not waited for."""
    liar = ("import sys, time\n"
            f"sys.stdout.buffer.write({HELLO!r})\n"
            "sys.stdin.buffer.read(4)\n"
            f"sys.stdout.buffer.write({answer})\n"
            "sys.stdout.flush()\n"
            "time.sleep(30)\n")
    process = Sz3Process([sys.executable, "-c", liar])
    with pytest.raises(sz3_process.ProcessGone, match=why):
        process.compress(np.zeros((1, 4, 4), np.float32), "abs", 0.1, "INTERP_LORENZO")
    assert not _alive(process.pid)


def test_ctrl_c_leaves_the_process_to_its_parent():
    """Ctrl-C goes to the whole process group; the parent decides when the child ends."""
    process = Sz3Process()
    try:
        maps = np.random.default_rng(2).random((2, 16, 64), dtype=np.float32)
        first = process.compress(maps, "abs", 0.05, "INTERP_LORENZO")  # started and serving
        os.kill(process.pid, signal.SIGINT)
        assert process.compress(maps, "abs", 0.05, "INTERP_LORENZO") == first
    finally:
        process.close()
    assert not _alive(process.pid)


def test_a_process_that_is_not_the_child_is_found_out_at_once():
    """A wrong ``sys.executable`` (an embedding program) runs something else: its first
    bytes are not the child's greeting, so the build's thread takes over at the first batch."""
    impostor = "import sys, time; print('usage: app [options]'); sys.stdout.flush(); time.sleep(30)"
    process = Sz3Process([sys.executable, "-c", impostor])
    with pytest.raises(sz3_process.ProcessGone, match="not the child's greeting"):
        process.compress(np.zeros((1, 4, 4), np.float32), "abs", 0.1, "INTERP_LORENZO")
    assert not _alive(process.pid)


def test_a_process_closed_before_its_first_request_ends_quietly():
    """A build whose model fails in its first batch closed the child before it had
    greeted: the child printed a BrokenPipeError traceback beside the user's own error."""
    script = ("from fmcache.codecs import codec_from_spec\n"
              "from fmcache.codecs.sz3_process import encoding_process\n"
              "with encoding_process([codec_from_spec('sz3:abs=0.1')]) as p:\n"
              "    pass\n"
              "print('pid', p.pid)\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("pid")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_a_stopped_process_that_takes_no_input_is_given_up(monkeypatch):
    """A child stopped between requests: a request larger than the pipe's buffer (1 MiB,
    ``PIPE_BYTES``) used to block the build's thread for ever."""
    monkeypatch.setattr(sz3_process, "SILENCE_S", 2.0)
    process = Sz3Process()
    try:
        maps = np.random.default_rng(3).random((8, 256, 256), dtype=np.float32)  # 2 MiB: more than the pipe holds
        process.compress(maps[:1], "abs", 0.05, "INTERP_LORENZO")
        os.kill(process.pid, signal.SIGSTOP)
        with pytest.raises(sz3_process.ProcessGone, match="took no input for 2 s"):
            process.compress(maps, "abs", 0.05, "INTERP_LORENZO")
    finally:
        process.close()
    assert not _alive(process.pid)


def test_a_process_serves_only_the_threads_it_is_bound_to():
    """Two builds at once: each build's encoding thread sees its own process (one build's
    end closed the process the other was about to use, a warning without a cause)."""
    seen: dict[str, object] = {}
    with encoding_process([codec_from_spec("sz3:abs=0.1")]) as mine:
        def elsewhere() -> None:
            seen["unbound"] = active_process()
            with sz3_process.bound(mine):
                seen["bound"] = active_process()
            seen["after"] = active_process()

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(10)
        assert active_process() is mine
    assert seen == {"unbound": None, "bound": mine, "after": None}
    assert active_process() is None
