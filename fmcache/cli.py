"""The ``fmcache`` command: parse, call one library function, render.

Errors print one line (``error: ...`` with the hint) and exit 1; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import __version__
from .errors import FmcacheError


class _Group(click.Group):
    """Turns library errors into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        stopped: list[int] = []

        def terminate(signum: int, _frame: Any) -> None:  # kill, timeout, a scheduler's preemption
            stopped.append(signum)
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:  # click's own handler said only "Aborted!"
            then = {"build": ": the batches already written are kept (HDF5: up to each layer's last whole "
                             "chunk): run the same command with --resume to continue", "compact": ": nothing was committed", "merge": ": nothing was committed",
                    "train": ": nothing was committed"}.get(ctx.invoked_subcommand or "", "")
            click.echo(f"interrupted{then}", err=True)
            ctx.exit(128 + (stopped[0] if stopped else signal.SIGINT))
        except Exception as exc:  # noqa: BLE001 - the CLI boundary
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            elif isinstance(exc, FmcacheError):
                click.echo(f"error: {exc}", err=True)
            else:
                click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
            ctx.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="fmcache")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """fmcache: cache the feature maps of frozen layers, train from them.

    Set FMCACHE_TUNE_MALLOC=0 to leave glibc's malloc thresholds as they are (the command
    fixes them so that freed batches stay mapped: fmcache.memory).
    """
    from .memory import tune_allocator

    tune_allocator()
    ctx.obj = {"debug": debug}


def _pixel_space(text: str) -> Any:
    """``--pixels MEAN,STD[,LO,HI]``, MEAN and STD one number or one per channel (``a/b/c``)."""
    from .calibrate import PixelSpace
    from .errors import SensitivityError

    fields = text.split(",")
    try:
        values = [tuple(float(v) for v in f.split("/")) for f in fields]
        if len(values) not in (2, 4) or (len(values) == 4 and (len(values[2]) > 1 or len(values[3]) > 1)):
            raise ValueError(text)
        mean, std = (v[0] if len(v) == 1 else v for v in values[:2])
        return PixelSpace(mean, std, (values[2][0], values[3][0]) if len(values) == 4 else None)
    except (ValueError, SensitivityError) as exc:
        detail = f": {exc.message}" if isinstance(exc, SensitivityError) else ""
        raise click.BadParameter(f"{text!r} is not MEAN,STD[,LO,HI] (MEAN and STD one number, or one per channel "
                                 f"as M1/M2/M3){detail}", param_hint="--pixels") from None


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, _, count = value.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not i/n", param_hint="--shard") from None
    if not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: shard i of n needs 0 <= i < n", param_hint="--shard")
    return i, n


def _progress(total: int, desc: str, unit: str = "sample") -> tuple[Callable[[int], None], Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    return bar.update, bar


@main.command()
@click.option("--model", "model_ref", required=True, help="package.module:factory returning an nn.Module.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="A state dict (.pt) to load.")
@click.option("--data", "data_ref", required=True, help="package.module:factory returning a map-style Dataset.")
@click.option("--data-dir", type=click.Path(), help="Passed to the data factory as data_dir=.")
@click.option("--layer", "layers", multiple=True, required=True, help="Boundary module name (repeatable).")
@click.option("--out", required=True, type=click.Path(), help="Cache path (.h5/.hdf5 -> HDF5, else LMDB).")
@click.option("--backend", type=click.Choice(["lmdb", "hdf5"]), help="Override the suffix rule.")
@click.option("--codec", default="bf16", show_default=True, help="Codec spec for every channel.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader workers for the input data.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build from its last batch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache (at commit).")
@click.option("--shard", help="Build only share i/n of the data (merge with `fmcache merge`).")
@click.option("--allow-stale", is_flag=True, help="Resume even if weights/data fingerprints changed.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Store NaN/Inf maps (raw, blosc2, fp16, bf16 keep them) instead of stopping at the first.")
@click.option("--no-progress", is_flag=True)
@click.option("--saca", is_flag=True, help="Calibrate sensitivity, two tiers by --policy, cache variants.")
@click.option("--rho", default=0.25, show_default=True, type=click.FloatRange(0, 1),
              help="SACA: fraction of channels in the sensitive tier.")
@click.option("--variants", help="SACA: comma-separated variant names (default: flip + stride-multiple shifts).")
@click.option("--max-variants", type=click.IntRange(min=1), help="SACA: keep only the first N default variants.")
@click.option("--calib-samples", default=512, show_default=True, type=click.IntRange(min=1),
              help="SACA: calibration subset size (at most the data set's size is used).")
@click.option("--max-shift", default=4, show_default=True, type=click.IntRange(min=0),
              help="SACA: augmentation family's max shift (pixels).")
@click.option("--no-flip", is_flag=True, help="SACA: the augmentation family has no horizontal flip.")
@click.option("--photometric", is_flag=True, help="SACA: the training family also jitters brightness/contrast.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="SACA: compression policy JSON (default: the built-in one, docs/policy.md).")
@click.option("--frozen-fraction", type=float, help="SACA: freeze depth for the policy (default: from the model).")
@click.option("--pixels", default="0,1", show_default=True,
              help="SACA: MEAN,STD[,LO,HI] of the inputs' normalisation and raw range (Fashion-MNIST: "
                   "0.286,0.353,0,1); per channel M1/M2/M3,S1/S2/S3[,LO,HI] (ImageNet: "
                   "0.485/0.456/0.406,0.229/0.224/0.225,0,1).")
def build(model_ref: str, weights: str | None, data_ref: str, data_dir: str | None, layers: tuple[str, ...],
          out: str, backend: str | None, codec: str, batch_size: int, num_workers: int, resume: bool,
          overwrite: bool, shard: str | None, allow_stale: bool, allow_nonfinite: bool, no_progress: bool,
          saca: bool, rho: float,
          variants: str | None, max_variants: int | None, calib_samples: int, max_shift: int, no_flip: bool,
          photometric: bool, policy_path: str | None, frozen_fraction: float | None, pixels: str) -> None:
    """Run the frozen prefix over a data set and cache LAYER outputs."""

    from .builder import build_cache
    from .refs import call_factory, load_weights
    from .report import inspect_cache, render_table

    _check_saca_options(saca)
    space = _pixel_space(pixels) if saca else None  # usage errors before the model is loaded
    model = call_factory(model_ref)
    if weights:
        load_weights(model, weights)
    dataset = call_factory(data_ref, **({"data_dir": data_dir} if data_dir else {}))
    info = {"model": model_ref, "data": data_ref, "weights": weights}
    common: dict[str, Any] = {"backend": backend, "batch_size": batch_size, "num_workers": num_workers,
                              "resume": resume, "overwrite": overwrite, "shard": _shard(shard),
                              "allow_stale": allow_stale, "allow_nonfinite": allow_nonfinite,
                              "progress": not no_progress, "build_info": info}
    if saca:
        from .augment import AugFamily
        from .builder import SacaConfig, build_saca_cache
        from .policy import CompressionPolicy

        if len(layers) != 1:
            raise click.UsageError("--saca builds one layer: give exactly one --layer")
        family = AugFamily(flip=not no_flip, max_shift=max_shift, photometric=photometric)
        config = SacaConfig(family=family, rho=rho, n_samples=calib_samples, max_variants=max_variants,
                            variants=_variant_list(variants) if variants else None)
        policy = CompressionPolicy.from_file(policy_path) if policy_path else None
        size = len(dataset) if hasattr(dataset, "__len__") else None
        if size is not None and 0 < size < calib_samples:  # the calibration takes what there is
            click.echo(f"note: SACA calibrates on all {size} items of the data set (--calib-samples "
                       f"{calib_samples}); few items make a noisy sensitivity ranking", err=True)
        build_saca_cache(model, dataset, layers[0], out, saca=config, policy=policy, frozen=frozen_fraction,
                         pixels=space, **common)
    else:
        build_cache(model, dataset, layers, out, codec=codec, **common)
    click.echo(render_table(inspect_cache(out)))


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Show a cache's layers, tiers, codecs and bytes."""
    from .report import inspect_cache, render_table, require_cache

    summary = inspect_cache(require_cache(path))
    click.echo(json.dumps(summary, indent=1) if as_json else render_table(summary))


@main.command()
@click.argument("path", type=click.Path())
@click.option("--no-progress", is_flag=True)
def verify(path: str, no_progress: bool) -> None:
    """Check every checksum and decode every record; exit 1 at the first bad one."""
    from .cache import open_cache
    from .verify import verify_cache

    with open_cache(path) as cache:
        total = len(cache) * len(cache.layers)
    # one step per sample and layer: "maps" (samples would count a 2-layer cache twice)
    update, bar = (None, None) if no_progress else _progress(total, "verify", unit="map")
    try:
        report = verify_cache(path, progress=update, isolated=True)  # a crashing reader is reported, not fatal
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"ok: {path}: {report.samples} samples, layers "
               + ", ".join(f"{k} ({v} records)" for k, v in report.layers.items()))


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--codec", help="Re-encode every tier with this codec spec.")
@click.option("--backend", type=click.Choice(["lmdb", "hdf5"]), help="Destination backend (default: DST suffix).")
@click.option("--drop-layer", "drop", multiple=True, help="Leave this layer out (repeatable).")
@click.option("--overwrite", is_flag=True)
def compact(src: str, dst: str, codec: str | None, backend: str | None, drop: tuple[str, ...],
            overwrite: bool) -> None:
    """Rewrite SRC as DST: new codec, other backend, fewer layers. SRC is never touched."""
    from .compact import compact_cache
    from .report import inspect_cache, render_table

    compact_cache(src, dst, codec=codec, backend=backend, drop_layers=drop, overwrite=overwrite)
    click.echo(render_table(inspect_cache(dst)))


@main.command()
@click.argument("out", type=click.Path())
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True))
def merge(out: str, shards: tuple[str, ...]) -> None:
    """Merge the shard caches of one build (--shard i/n) into OUT."""
    from .report import inspect_cache, render_table
    from .shards import merge_shards

    merge_shards(shards, out)
    click.echo(render_table(inspect_cache(out)))


#: build options that only a SACA build reads, and the one it does not
_SACA_ONLY = ("rho", "variants", "max_variants", "calib_samples", "max_shift", "no_flip", "photometric",
              "policy_path", "frozen_fraction", "pixels")


def _check_saca_options(saca: bool) -> None:
    """Options given on the command line that this build would ignore, refused: a plain
    build took --rho or --policy silently, a SACA build --codec (its codecs come from the
    policy)."""
    ctx = click.get_current_context()
    given = [name for name in (*_SACA_ONLY, "codec")
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    ignored = [name for name in given if (name == "codec") == saca]
    if ignored:
        flags = ", ".join("--" + name.removesuffix("_path").replace("_", "-") for name in ignored)
        raise click.UsageError(f"{flags} {'is' if len(ignored) == 1 else 'are'} not read by "
                               + ("a --saca build (its codecs come from --policy)" if saca else
                                  "a build without --saca"))


def _variant_list(text: str) -> tuple[str, ...]:
    """``--variants`` split at the commas between names, not those inside ``shift(DY,DX)``."""
    return tuple(v.strip() for v in re.split(r",(?![^()]*\))", text) if v.strip())


@main.command()
def codecs() -> None:
    """List the registered codecs, their default configs and their parameters."""
    from .codecs import registered_codecs

    for codec_id, cls in registered_codecs().items():
        try:
            spec = cls().spec  # type: ignore[call-arg]
        except FmcacheError:
            spec = f"{codec_id}:... (parameters required)"
        contract = "lossless" if cls.lossless else "lossy"
        params = ", ".join(cls.param_names()) or "none"
        click.echo(f"{codec_id:<8} {contract:<9} default {spec:<42} params {params}")


@main.command()
@click.option("--out-dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--samples", default=4000, show_default=True, type=click.IntRange(min=256),
              help="Training samples of Fashion-MNIST.")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--layer", default="layer2", show_default=True, help="Freeze boundary.")
@click.option("--width", default=8, show_default=True, type=click.IntRange(min=1), help="ResNet-18 base width.")
@click.option("--codec", default="bf16", show_default=True)
@click.option("--data-dir", type=click.Path(), help="Fashion-MNIST IDX folder.")
def demo(out_dir: str, samples: int, epochs: int, layer: str, width: int, codec: str,
         data_dir: str | None) -> None:
    """The main job: build a cache, inspect it, train the suffix from it vs. recomputing."""
    from .demo import run_demo

    run_demo(Path(out_dir), samples=samples, epochs=epochs, layer=layer, width=width, codec=codec,
             data_dir=data_dir, echo=click.echo)


@main.command()
@click.option("--arm", default="fmcache", show_default=True,
              type=click.Choice(["full", "classic_freeze", "cache_fp32_noaug", "cache_fp32_feature",
                                 "fmcache_no_saca", "fmcache"]),
              help="What to train from after each freeze point (docs/results.md).")
@click.option("--schedule", default="1:layer2,3:layer3", show_default=True, help="EPOCH:BOUNDARY,...")
@click.option("--adaptive", is_flag=True, help="Freeze when a block's parameter change flattens (no schedule).")
@click.option("--epochs", default=6, show_default=True)
@click.option("--samples", default=3000, show_default=True, help="Fashion-MNIST training samples.")
@click.option("--test-samples", default=10000, show_default=True, type=click.IntRange(min=1))
@click.option("--width", default=8, show_default=True, type=click.IntRange(min=1), help="ResNet-18 base width.")
@click.option("--seed", default=0, show_default=True)
@click.option("--rho", default=0.25, show_default=True, type=click.FloatRange(0, 1))
@click.option("--max-variants", type=click.IntRange(min=1), help="Keep only the first N default SACA variants.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False), help="Policy JSON.")
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader workers (reading, decoding and augmenting beside the training step).")
@click.option("--read-ahead", default=0, show_default=True, type=click.IntRange(min=0),
              help="Without workers: batches a thread reads ahead of the training step (0: none).")
@click.option("--work-dir", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(arm: str, schedule: str, adaptive: bool, epochs: int, samples: int, test_samples: int, width: int,
          seed: int, rho: float, max_variants: int | None, policy_path: str | None, num_workers: int,
          read_ahead: int, work_dir: str, as_json: bool) -> None:
    """Freezing training of ResNet-18 on Fashion-MNIST, building a cache at each freeze point."""
    from .experiment import run_arm
    from .policy import CompressionPolicy

    if adaptive and click.get_current_context().get_parameter_source("schedule") == ParameterSource.COMMANDLINE:
        raise click.UsageError("--adaptive freezes when a block's change flattens, --schedule at given epochs: "
                               "give one of them")
    if read_ahead and num_workers:
        raise click.UsageError("--read-ahead reads on a thread without workers; --num-workers reads in worker "
                               "processes: give one of them")
    policy = CompressionPolicy.from_file(policy_path) if policy_path else None
    result = run_arm(arm, seed=seed, width=width, train_samples=samples, test_samples=test_samples, epochs=epochs,
                     schedule=schedule, adaptive=adaptive, work_dir=work_dir, rho=rho, max_variants=max_variants,
                     policy=policy, num_workers=num_workers, read_ahead=read_ahead,
                     # with --json, stdout is the JSON alone: the progress lines go to stderr
                     log=(lambda line: click.echo(line, err=True)) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result, indent=1, default=str))
    else:
        click.echo(f"{arm}: test accuracy {100 * result['acc']:.2f} %, wall {result['wall_s']:.1f} s "
                   f"(cache builds {result['build_s']:.1f} s), cache bytes {result['cache_bytes']:,}")


if __name__ == "__main__":  # pragma: no cover
    main()
