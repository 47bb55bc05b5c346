"""Codecs on real post-ReLU feature maps: compression ratio, error, speed per core.

The maps come from a CIFAR-style ResNet-18 briefly trained on Fashion-MNIST
(:func:`fmcache.zoo.pretrained_resnet`, cached under ``~/.cache/fmcache/zoo`` after the
first run), captured with forward hooks at ``stem``, ``layer1``, ``layer2`` and ``layer3``
for the first ``--samples`` Fashion-MNIST test images (eval mode, no grad).

For every codec spec and layer, one ``encode`` / ``decode`` call per sample, as a cache
reader makes them:

* ``ratio``       float32 bytes / encoded bytes (shape header included);
* ``max_abs_error``, ``rel_l2_error`` (||x' - x|| / ||x|| over the layer);
* ``zeros_kept``  fraction of the exact zeros of x that decode to exact zeros;
* ``encode_mb_s``, ``decode_mb_s`` (into a preallocated batch buffer, ``out=``),
  ``decode_fresh_mb_s`` (a new array per call): float32 MB (10^6 bytes) per second on
  one core (torch and blosc2 with one thread), median over ``--repeats`` passes.

``memcpy`` is the bound: ``np.copyto`` per sample into the preallocated buffer, and into
a fresh ``np.empty`` per sample. Codec ids that are not registered (or specs they
reject) are skipped with a warning on stderr; the script uses only the codecs' public
face (spec, encode, decode, ``lossless``).

Run from the repository root::

    python tools/bench_codecs.py            # width 64, 200 steps, 256 samples (minutes; the
                                            # first run pre-trains the model, longer)
    python tools/bench_codecs.py --quick    # width 16, 50 steps, 32 samples; writes no docs
    python tools/bench_codecs.py --codecs raw 'zfp:accuracy=0.05' --layers stem layer3

It prints the results as JSON on stdout and (unless ``--quick``) writes
``docs/bench_codecs.json``, ``docs/bench_codecs.png`` (ratio against decode speed, one
panel per layer) and the table between ``<!-- bench:start -->`` and ``<!-- bench:end -->``
in ``docs/codecs.md``; ``--out-dir`` and ``--markdown`` choose other places ('' skips),
``--stem`` other file names and ``--region`` other markers (``<!-- REGION:start -->``:
codecs.md's SZ3 predictor table is ``--region bench_sz3_algo --stem bench_codecs_sz3_algo``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing fmcache

from bench_read import cpu_name  # tools/ is on sys.path when a tool runs as a script
from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

from fmcache.codecs import Codec, codec_from_spec
from fmcache.errors import CodecError, CodecSpecError, UnknownCodecError
from fmcache.zoo import FashionMNIST, pretrained_resnet

DEFAULT_CODECS = (
    "raw",
    "blosc2:cname=zstd,clevel=1,shuffle=byte",
    "blosc2:cname=lz4,clevel=5,shuffle=byte",
    "fp16:cname=none",
    "fp16:cname=lz4,clevel=5,shuffle=byte",
    "bf16:cname=none",
    "bf16:cname=lz4,clevel=5,shuffle=byte",
    "bf16:cname=lz4hc,clevel=1,shuffle=byte",
    "bf16:cname=lz4hc,clevel=5,shuffle=byte",
    "bf16:cname=zstd,clevel=1,shuffle=byte",
    "int8:cname=lz4,clevel=5,shuffle=bit",
    "int8:cname=zstd,clevel=1,shuffle=bit",
    "int4:cname=lz4,clevel=5,shuffle=bit",
    "grid:abs=0.01",
    "grid:abs=0.05",
    "grid:rel=0.01",
    "zfp:accuracy=0.01",
    "zfp:accuracy=0.05",
    "zfp:rate=8",
    "sz3:abs=0.01",
    "sz3:abs=0.05",
    "sz3:rel=0.001",
    "sz3:rel=0.01",
)
DEFAULT_LAYERS = ("stem", "layer1", "layer2", "layer3")
MB = 1e6
RATE_KEYS = tuple(f"{op}{clock}_mb_s" for op in ("encode", "decode", "decode_fresh") for clock in ("", "_wall"))

log = logging.getLogger("bench_codecs")


class MarkdownRegionError(RuntimeError):
    """The markdown file has no well-formed bench region."""


# ---- inputs ----------------------------------------------------------------------------------

@torch.no_grad()
def capture_maps(model: torch.nn.Module, dataset: FashionMNIST, layers: Sequence[str],
                 batch_size: int = 64) -> tuple[dict[str, np.ndarray], float]:
    """Post-ReLU maps (N, C, H, W float32) of ``layers`` for the whole data set, and top-1 accuracy."""
    model.eval()
    captured: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _module, _inputs, output, name=name: captured[name].append(output.detach().numpy().copy()))
        for name in layers]
    correct = 0
    try:
        for start in range(0, len(dataset), batch_size):
            pairs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            logits = model(torch.stack([x for x, _ in pairs]))
            correct += int((logits.argmax(1) == torch.tensor([y for _, y in pairs])).sum())
    finally:
        for hook in hooks:
            hook.remove()
    maps = {name: np.ascontiguousarray(np.concatenate(parts), dtype=np.float32) for name, parts in captured.items()}
    return maps, correct / len(dataset)


# ---- measuring ---------------------------------------------------------------------------------

def timed(run: Callable[[], Any], repeats: int, min_pass_s: float) -> dict[str, float]:
    """Seconds per call of ``run``: median over ``repeats`` passes, CPU and wall time.

    A first call warms up (and gives ``run`` its side effects) and sizes the passes:
    each pass calls ``run`` often enough to last ``min_pass_s``, so tiny layers are not
    timed at the clock's resolution. CPU time is the process's: on a shared machine it
    does not count the time other programs held the core, wall time does.
    """
    start = time.perf_counter()
    run()
    calls = max(1, math.ceil(min_pass_s / max(time.perf_counter() - start, 1e-9)))
    cpu, wall = [], []
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            run()
        cpu.append((time.process_time() - cpu0) / calls)
        wall.append((time.perf_counter() - wall0) / calls)
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall)}


def _rates(prefix: str, megabytes: float, seconds: dict[str, float]) -> dict[str, float]:
    """``{prefix}_mb_s`` from CPU time, ``{prefix}_wall_mb_s`` from wall time."""
    return {f"{prefix}_mb_s": megabytes / seconds["cpu_s"], f"{prefix}_wall_mb_s": megabytes / seconds["wall_s"]}


def error_metrics(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Max abs error, relative L2 error and the fraction of exact zeros kept."""
    diff = decoded.astype(np.float64) - original
    norm = float(np.linalg.norm(original.ravel().astype(np.float64)))
    zeros = original == 0
    n_zeros = int(np.count_nonzero(zeros))
    return {
        "max_abs_error": float(np.abs(diff).max()),
        "rel_l2_error": float(np.linalg.norm(diff.ravel())) / norm if norm else 0.0,
        "zeros_kept": int(np.count_nonzero(decoded[zeros] == 0)) / n_zeros if n_zeros else 1.0,
    }


def bench_memcpy(maps: np.ndarray, repeats: int, min_pass_s: float) -> dict[str, float]:
    """np.copyto per sample into a preallocated buffer and into a fresh one, MB/s."""
    out = np.empty_like(maps)
    out.fill(0)  # touch the pages once, as a reused batch buffer would be

    def reused() -> None:
        for i, sample in enumerate(maps):
            np.copyto(out[i], sample)

    def fresh() -> None:
        for sample in maps:
            np.copyto(np.empty_like(sample), sample)

    megabytes = maps.nbytes / MB
    return {**_rates("reused", megabytes, timed(reused, repeats, min_pass_s)),
            **_rates("fresh", megabytes, timed(fresh, repeats, min_pass_s))}


def bench_codec_layer(codec: Codec, maps: np.ndarray, repeats: int, min_pass_s: float) -> dict[str, float]:
    """Ratio, errors and speeds of one codec on one layer's maps (N samples)."""
    encoded: list[bytes] = []

    def encode() -> None:
        encoded[:] = [codec.encode(sample) for sample in maps]

    out = np.empty_like(maps)
    out.fill(0)

    def decode() -> None:
        for i, record in enumerate(encoded):
            codec.decode(record, out=out[i])

    def decode_fresh() -> None:
        for record in encoded:
            codec.decode(record)

    megabytes = maps.nbytes / MB
    result = _rates("encode", megabytes, timed(encode, repeats, min_pass_s))
    result.update(_rates("decode", megabytes, timed(decode, repeats, min_pass_s)))
    result.update(_rates("decode_fresh", megabytes, timed(decode_fresh, repeats, min_pass_s)))
    result["ratio"] = maps.nbytes / sum(len(record) for record in encoded)
    result.update(error_metrics(maps, out))
    return result


def build_codecs(specs: Sequence[str]) -> tuple[list[Codec], list[dict[str, str]]]:
    """Codecs for the specs that build; the others with the reason, warned on stderr."""
    codecs: list[Codec] = []
    skipped: list[dict[str, str]] = []
    for spec in specs:
        try:
            codecs.append(codec_from_spec(spec))
        except (UnknownCodecError, CodecSpecError) as exc:
            log.warning("skipping codec %r: %s", spec, exc)
            skipped.append({"spec": spec, "reason": str(exc)})
    return codecs, skipped


def run_benchmark(maps: dict[str, np.ndarray], codecs: Sequence[Codec], repeats: int,
                  min_pass_s: float) -> dict[str, Any]:
    """memcpy and every codec on every layer; a codec that fails on a layer is recorded, not fatal."""
    memcpy = {}
    for layer, array in maps.items():
        memcpy[layer] = bench_memcpy(array, repeats, min_pass_s)
        log.info("memcpy %-7s reused %8.0f MB/s  fresh %8.0f MB/s", layer, memcpy[layer]["reused_mb_s"],
                 memcpy[layer]["fresh_mb_s"])
    rows = []
    for codec in codecs:
        per_layer: dict[str, Any] = {}
        for layer, array in maps.items():
            try:
                per_layer[layer] = bench_codec_layer(codec, array, repeats, min_pass_s)
            except CodecError as exc:
                log.warning("codec %s failed on %s: %s", codec.spec, layer, exc)
                per_layer[layer] = {"error": str(exc)}
                continue
            m = per_layer[layer]
            log.info("%-40s %-7s ratio %6.2f  relL2 %.2e  enc %7.0f  dec %7.0f MB/s", codec.spec, layer,
                     m["ratio"], m["rel_l2_error"], m["encode_mb_s"], m["decode_mb_s"])
        rows.append({"spec": codec.spec, "config": codec.get_config(), "lossless": bool(codec.lossless),
                     "layers": per_layer, "all_layers": aggregate(per_layer, maps)})
    return {"memcpy": memcpy, "memcpy_all_layers": aggregate_memcpy(memcpy, maps), "codecs": rows}


def _total_rate(per_layer: dict[str, Any], maps: dict[str, np.ndarray], key: str) -> float:
    # speed over all layers: total MB / total time, so big layers weigh by their size
    seconds = sum(maps[layer].nbytes / MB / m[key] for layer, m in per_layer.items())
    return sum(maps[layer].nbytes for layer in per_layer) / MB / seconds


def aggregate(per_layer: dict[str, Any], maps: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Whole-cache figures over the layers the codec handled (None if it handled none)."""
    ok = {layer: m for layer, m in per_layer.items() if "error" not in m}
    if not ok:
        return None
    stored = sum(maps[layer].nbytes / m["ratio"] for layer, m in ok.items())
    return {
        "ratio": sum(maps[layer].nbytes for layer in ok) / stored,
        "max_rel_l2_error": max(m["rel_l2_error"] for m in ok.values()),
        "max_abs_error": max(m["max_abs_error"] for m in ok.values()),
        "min_zeros_kept": min(m["zeros_kept"] for m in ok.values()),
        **{key: _total_rate(ok, maps, key) for key in RATE_KEYS},
    }


def aggregate_memcpy(memcpy: dict[str, dict[str, float]], maps: dict[str, np.ndarray]) -> dict[str, float]:
    return {key: _total_rate(memcpy, maps, key)
            for key in ("reused_mb_s", "reused_wall_mb_s", "fresh_mb_s", "fresh_wall_mb_s")}


# ---- outputs -------------------------------------------------------------------------------------

def _sig(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.1e}" if value < 0.01 or value >= 1000 else f"{value:.3g}"


def markdown_table(results: dict[str, Any]) -> str:
    """The markdown table (and its caption) for docs/codecs.md."""
    meta = results["meta"]
    layers = list(results["layers"])
    lines = [
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['cpu']}, 1 core; "
        f"torch {meta['versions']['torch']}, blosc2 {meta['versions']['blosc2']}). "
        f"Maps: CIFAR ResNet-18 width {meta['width']}, {meta['steps']} training steps "
        f"(top-1 {meta['accuracy']:.1%} on the maps' images), first {meta['samples']} Fashion-MNIST test images; "
        "zero fraction " + ", ".join(f"{layer} {info['zero_fraction']:.0%}" for layer, info in results["layers"].items())
        + ". MB/s: float32 MB (10^6 bytes) per second of the process's CPU time (wall-time figures, which "
        "count other load on the machine, are in docs/bench_codecs.json), one call per sample, median of "
        f"{meta['repeats']} passes; speeds and the ratio under 'all' are over all layers, errors and zeros kept "
        "are the worst layer's. Do not edit: rerun the script.",
        "",
        (f"| codec | rel L2 error | max abs error | zeros kept | ratio {' / '.join(layers)} | all | "
         "encode MB/s | decode MB/s | decode, fresh array |"),
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    mem = results["memcpy_all_layers"]
    lines.append(f"| memcpy (np.copyto) | 0 | 0 | 100% | {' / '.join('1' for _ in layers)} | 1 | "
                 f"{mem['reused_mb_s']:,.0f} | {mem['reused_mb_s']:,.0f} | {mem['fresh_mb_s']:,.0f} |")
    for row in results["codecs"]:
        total = row["all_layers"]
        if total is None:
            lines.append(f"| `{row['spec']}` | failed on every layer | | | | | | | |")
            continue
        ratios = " / ".join(f"{m['ratio']:.1f}" if "error" not in m else "—" for m in row["layers"].values())
        lines.append(
            f"| `{row['spec']}` | {_sig(total['max_rel_l2_error'])} | {_sig(total['max_abs_error'])} | "
            f"{total['min_zeros_kept']:.0%} | {ratios} | {total['ratio']:.1f} | {total['encode_mb_s']:,.0f} | "
            f"{total['decode_mb_s']:,.0f} | {total['decode_fresh_mb_s']:,.0f} |")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"`{s['spec']}` ({s['reason']})" for s in results["skipped"]) + "."]
    return "\n".join(lines)


def markers(region: str = "bench") -> tuple[str, str]:
    """The lines around a region (``--region``): ``<!-- bench:start -->`` by default."""
    return f"<!-- {region}:start -->", f"<!-- {region}:end -->"


def check_markdown_region(path: Path, region: str = "bench") -> str:
    """The file's text, once it is known to hold one ``region``; MarkdownRegionError otherwise."""
    first, last = markers(region)
    if not path.is_file():
        raise MarkdownRegionError(f"{path} does not exist: it must hold the lines {first} and {last}")
    text = path.read_text(encoding="utf-8")
    begin, end = text.count(first), text.count(last)
    if begin != 1 or end != 1 or text.index(first) > text.index(last):
        raise MarkdownRegionError(
            f"{path} must hold exactly one {first} line followed by one {last} line "
            f"(found {begin} and {end}): add them where the table belongs, or pass --markdown ''")
    return text


def write_markdown_region(path: Path, table: str, region: str = "bench") -> None:
    """Replace only the text between the markers (atomically)."""
    first, last = markers(region)
    text = check_markdown_region(path, region)
    head, rest = text.split(first)
    _, tail = rest.split(last)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{head}{first}\n{table}\n{last}{tail}", encoding="utf-8")
    os.replace(partial, path)


def plot(results: dict[str, Any], path: Path) -> None:
    """Ratio against decode speed, one panel per layer, one colour per codec."""
    plt = pyplot(path)
    if plt is None:
        return
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    layers = list(results["layers"])
    rows = results["codecs"]
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(rows), 2)))
    markers = "os^vDP*Xph<>"
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4.4), sharex=True, sharey=True,
                             squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for k, row in enumerate(rows):
            m = row["layers"].get(layer, {})
            if "ratio" in m:
                ax.scatter(m["decode_mb_s"], m["ratio"], color=colours[k], marker=markers[k % len(markers)],
                           s=46, label=row["spec"], edgecolors="black", linewidths=0.4)
        ax.axvline(results["memcpy"][layer]["reused_mb_s"], color="grey", linestyle="--", linewidth=1,
                   label="memcpy")
        shape = "x".join(map(str, results["layers"][layer]["shape"]))
        ax.set(title=f"{layer} ({shape})", xscale="log", yscale="log", xlabel="decode MB/s (1 core)")
        for axis, subs in ((ax.xaxis, (1.0, 3.0)), (ax.yaxis, (1.0, 2.0, 5.0))):  # plain numbers, not 10^k
            axis.set_major_locator(LogLocator(subs=subs))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("compression ratio")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    meta = results["meta"]
    fig.suptitle(f"Codecs on post-ReLU maps of a CIFAR ResNet-18 (width {meta['width']}, "
                 f"{meta['steps']} steps, {meta['samples']} Fashion-MNIST test images)")
    rows_of_legend = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def single_thread_blosc2() -> None:
    """One blosc2 thread: its decompression otherwise uses its global count (all cores)."""
    try:
        import blosc2
    except ImportError:
        return
    blosc2.set_nthreads(1)


# ---- command line ----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="width 16, 50 steps, 32 samples, and no docs written unless asked")
    parser.add_argument("--width", type=int, help="ResNet width (default 64; --quick 16)")
    parser.add_argument("--steps", type=int, help="pre-training steps (default 200; --quick 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, help="test images (default 256; --quick 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median; >= 3)")
    parser.add_argument("--min-pass-s", type=float, help="shortest timed pass, seconds (default 0.2; --quick 0.05)")
    parser.add_argument("--codecs", nargs="+", metavar="SPEC", help=f"codec specs (default: a list of {len(DEFAULT_CODECS)})")
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="NAME")
    parser.add_argument("--out-dir", help="where bench_codecs.{json,png} go (default docs; --quick: none)")
    parser.add_argument("--markdown", help="file with the bench markers (default docs/codecs.md; --quick: none)")
    parser.add_argument("--region", default="bench",
                        help="the markers' name in --markdown: <!-- REGION:start --> ... <!-- REGION:end -->")
    parser.add_argument("--stem", default="bench_codecs", help="--out-dir's file names: STEM.json, STEM.png")
    parser.add_argument("--cache-dir", help="where the pre-trained model is kept (default ~/.cache/fmcache/zoo)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.width = args.width or (16 if quick else 64)
    args.steps = args.steps if args.steps is not None else (50 if quick else 200)
    args.samples = args.samples or (32 if quick else 256)
    args.min_pass_s = args.min_pass_s if args.min_pass_s is not None else (0.05 if quick else 0.2)
    if args.out_dir is None:
        args.out_dir = "" if quick else str(REPO / "docs")
    if args.markdown is None:
        args.markdown = "" if quick else str(REPO / "docs" / "codecs.md")
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (a median of fewer is not a median)")
    if args.samples < 1 or args.width < 1 or args.steps < 0:
        parser.error("--samples and --width must be >= 1, --steps >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    markdown = Path(args.markdown) if args.markdown else None
    if markdown is not None:
        try:  # fail before minutes of work, not after
            check_markdown_region(markdown, args.region)
        except MarkdownRegionError as exc:
            print(f"bench_codecs: {exc}", file=sys.stderr)
            return 1
    codecs, skipped = build_codecs(args.codecs or DEFAULT_CODECS)
    if not codecs:
        print("bench_codecs: no codec to benchmark (every spec was skipped)", file=sys.stderr)
        return 1

    model = pretrained_resnet(width=args.width, steps=args.steps, seed=args.seed, cache_dir=args.cache_dir)
    torch.set_num_threads(1)  # every figure below is per core
    single_thread_blosc2()
    dataset = FashionMNIST("test", limit=args.samples)
    maps, accuracy = capture_maps(model, dataset, args.layers)
    results: dict[str, Any] = {
        "meta": {
            "command": shlex.join(["python", "tools/bench_codecs.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": 1,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "blosc2": _version("blosc2"), "zfpy": _version("zfpy"),
                         "pysz": _version("pysz")},
            "width": args.width, "steps": args.steps, "seed": args.seed, "samples": len(dataset),
            "repeats": args.repeats, "min_pass_s": args.min_pass_s, "accuracy": accuracy, "mb": MB,
            "clock": "*_mb_s from process CPU time, *_wall_mb_s from wall time",
        },
        "layers": {
            layer: {"shape": list(array.shape[1:]), "sample_bytes": int(array[0].nbytes),
                    "zero_fraction": float(np.count_nonzero(array == 0) / array.size),
                    "max": float(array.max()), "mean": float(array.mean())}
            for layer, array in maps.items()
        },
    }
    results.update(run_benchmark(maps, codecs, args.repeats, args.min_pass_s))
    results["skipped"] = skipped

    text = json.dumps(results, indent=1)
    print(text)
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{args.stem}.json").write_text(text + "\n", encoding="utf-8")
        plot(results, out_dir / f"{args.stem}.png")
        log.info("wrote %s and %s", out_dir / f"{args.stem}.json", out_dir / f"{args.stem}.png")
    if markdown is not None:
        try:
            write_markdown_region(markdown, markdown_table(results), args.region)
        except MarkdownRegionError as exc:  # the file changed while we measured
            print(f"bench_codecs: {exc}", file=sys.stderr)
            return 1
        log.info("updated the %s region of %s", args.region, markdown)
    return 0


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except (ImportError, AttributeError):
        pass
    try:  # pysz has no __version__
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
