"""The error tree of fmcache.

Every error fmcache raises on purpose derives from :class:`FmcacheError` and carries a
``hint``: one sentence saying what to do about it. Built-in mixins let callers catch
the familiar types too::

    FmcacheError
    ├── CodecError
    │   ├── UnknownCodecError (KeyError)      unknown codec id in a spec or config
    │   ├── CodecSpecError (ValueError)       malformed spec string or bad parameter
    │   └── EncodeError (ValueError)          input the codec cannot store (NaN, range)
    ├── TierPlanError (ValueError)            overlapping / missing / out-of-range channels
    ├── CacheError
    │   ├── NotACacheError (FileNotFoundError)
    │   ├── IncompleteCacheError              no committed manifest (interrupted build)
    │   ├── FormatVersionError                written by a newer fmcache
    │   ├── CorruptionError                   checksum or structure mismatch
    │   ├── StaleCacheError                   frozen weights or data changed
    │   │   └── CacheReplacedError            a cache replaced under a reader that reopens it
    │   ├── LayerNotFoundError (KeyError)
    │   ├── SampleIndexError (IndexError)
    │   ├── ShapeMismatchError (ValueError)   a batch that does not match its layer
    │   ├── CacheExistsError (FileExistsError)
    │   ├── CacheBusyError                    another process is writing the same path
    │   ├── ReadOnlyError (PermissionError)   read-only cache, file system or directory
    │   ├── DiskFullError (OSError)           no room for the next batch; committed ones kept
    │   └── ResumeError                       an interrupted build that cannot be continued
    ├── BuildError                            the builder could not run the prefix
    │   └── NonFiniteError (ValueError)       NaN/Inf in activations
    ├── SpecImportError (ImportError)         --model / --data 'pkg.module:factory'
    ├── AugmentationError (ValueError)        bad draw, family config, shape or mode
    │   ├── StrideError                       input size not a whole multiple of the map's
    │   ├── VariantNameError                  a variant name that is not canonical
    │   └── SensitivityError                  mismatched maps, rho out of range, no data
    ├── SamplerConfigError (ValueError)       sampler parameter out of range or of the wrong type
    ├── HandoverError (RuntimeError)          no shared memory for the ring of worker batches, or a batch overwritten in it
    ├── PolicyError (ValueError)              bad fractions, codecs or JSON in a compression policy
    ├── FreezeError (ValueError)              schedule or criterion that does not fit the model
    ├── BoundaryError (KeyError)              boundary not a top-level child of the model
    ├── ModelConfigError (ValueError)         zoo model parameter out of range
    ├── TrainingError (ValueError)            pre-training parameters that cannot work, or divergence
    ├── DataError (ValueError)                data file with bad contents, or a bad data parameter
    └── DataFileNotFoundError (FileNotFoundError)  data file that is not there
"""

from __future__ import annotations


class FmcacheError(Exception):
    """Root of every fmcache error. ``hint`` says what to do."""

    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is None and "(hint: " in message:
            # a message that carries its hint already: torch re-raises a DataLoader
            # worker's error as type(exc)(str(exc)), which would add the default again
            hint = ""
        self.hint = hint if hint is not None else self.default_hint
        super().__init__(message)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class CodecError(FmcacheError):
    """A codec could not be built, or could not encode or decode."""


class UnknownCodecError(CodecError, KeyError):
    default_hint = "run `fmcache codecs` or see docs/codecs.md for the registered ids"

    def __str__(self) -> str:  # KeyError would quote the message
        return FmcacheError.__str__(self)


class CodecSpecError(CodecError, ValueError):
    default_hint = "specs read id[:key=value[,key=value]], e.g. 'zfp:accuracy=0.01'"


class EncodeError(CodecError, ValueError):
    """Input the codec cannot store faithfully."""


class TierPlanError(FmcacheError, ValueError):
    default_hint = "every channel 0..C-1 must belong to exactly one tier"


class CacheError(FmcacheError):
    """Something is wrong with a cache on disk or with how it is used."""


class NotACacheError(CacheError, FileNotFoundError):
    default_hint = "point at a directory (LMDB) or .h5 file written by `fmcache build`"


class IncompleteCacheError(CacheError):
    default_hint = "the build was interrupted: run `fmcache build ... --resume` to finish it"


class FormatVersionError(CacheError):
    default_hint = "upgrade fmcache to read this cache"


class CorruptionError(CacheError):
    default_hint = "run `fmcache verify PATH`; rebuild the cache (or the damaged layer) from the source data"


class StaleCacheError(CacheError):
    default_hint = (
        "rebuild the cache for the current weights/data, or pass allow_stale=True "
        "(--allow-stale) if you know the change does not matter"
    )


class CacheReplacedError(StaleCacheError):
    """The cache at a path was replaced (a build or compact committed over it) after a
    reader opened it: a process that reopens it (a DataLoader worker) would read the new
    cache with the old one's layout."""

    default_hint = "open the cache again (create the Dataset again) to read the new one"


class LayerNotFoundError(CacheError, KeyError):
    def __str__(self) -> str:
        return FmcacheError.__str__(self)


class SampleIndexError(CacheError, IndexError):
    pass


class ShapeMismatchError(CacheError, ValueError):
    pass


class CacheExistsError(CacheError, FileExistsError):
    default_hint = "replace it with --overwrite (overwrite=True), or choose another path"


class CacheBusyError(CacheError):
    default_hint = ("wait for the other build, compact or resume of this path to finish (or stop it): two "
                    "writers of one path destroy each other's work")


class ReadOnlyError(CacheError, PermissionError):
    default_hint = "open the cache for writing, or write to a location you can write to"


class DiskFullError(CacheError, OSError):
    default_hint = ("free space (or choose another location) and run it again; an interrupted build keeps "
                    "the batches it wrote and continues with `fmcache build ... --resume`")


class ResumeError(CacheError):
    """The partial cache of an interrupted build is damaged (e.g. HDF5 killed mid-write)."""

    default_hint = "rebuild it from scratch: `fmcache build ... --overwrite` (overwrite=True)"


class BuildError(FmcacheError):
    """The builder could not capture or write feature maps."""


class NonFiniteError(BuildError, ValueError):
    """NaN/Inf in a map appended to a cache that does not allow them; ``sample`` is the
    cache index of the first such map."""

    default_hint = (
        "the frozen prefix produced NaN/Inf: check the input normalisation and the weights; to cache "
        "them as they are, allow them (--allow-nonfinite, allow_nonfinite=True) with a codec that "
        "stores them exactly: raw, blosc2, fp16 or bf16"
    )

    def __init__(self, message: str, *, hint: str | None = None, sample: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.sample = sample


class SpecImportError(FmcacheError, ImportError):
    default_hint = "use 'package.module:factory'; the current directory is importable"


# ---- augmentation, SACA composition and sensitivity (fmcache.augment) ---------------------


class AugmentationError(FmcacheError, ValueError):
    """Bad input to an augmentation function (draw, family, shapes, mode)."""

    default_hint = "see docs/augmentation.md for the conventions (shapes, units, order)"


class StrideError(AugmentationError):
    """The stride of a freeze boundary is not a positive whole number."""

    default_hint = (
        "the input height and width must be the same whole multiple of the map's "
        "(stride = input_H / map_H = input_W / map_W)"
    )


class VariantNameError(AugmentationError):
    """A variant name that does not parse, or is not in canonical form."""

    default_hint = (
        "variant names read identity | flip | shift(DY,DX) | flip+shift(DY,DX) with signed "
        "non-zero offsets and a bare 0, e.g. 'flip+shift(0,+2)'; build them with variant_name()"
    )


class SensitivityError(AugmentationError):
    """Bad input to the sensitivity measurement or channel selection."""

    default_hint = "pass maps of equal shape (..., C, H, W) and rho in [0, 1]; see docs/augmentation.md"


# ---- sampling, policy and progressive freezing ---------------------------------------------


class SamplerConfigError(FmcacheError, ValueError):
    """A sampler parameter is out of range or of the wrong type."""

    default_hint = "see docs/dataset.md, section 'Sampler', for the parameters and their ranges"


class PolicyError(FmcacheError, ValueError):
    """A compression policy that cannot be used (bad fractions, codecs or JSON)."""

    default_hint = "see docs/policy.md for the policy's JSON form"


class FreezeError(FmcacheError, ValueError):
    """A schedule or criterion that cannot be applied to this model."""

    default_hint = "boundaries are top-level children of the model, in forward order"


# ---- the model and data zoo (fmcache.zoo) --------------------------------------------------


class BoundaryError(FmcacheError, KeyError):
    """A freeze boundary that is not the name of a top-level child of the model."""

    default_hint = "name a top-level child (see [name for name, _ in model.named_children()])"

    def __str__(self) -> str:  # KeyError would quote the message
        return FmcacheError.__str__(self)


class ModelConfigError(FmcacheError, ValueError):
    """A model parameter out of range (a non-positive width, say)."""


class TrainingError(FmcacheError, ValueError):
    """Pre-training parameters that cannot work, or a loss that diverged."""


class DataError(FmcacheError, ValueError):
    """A data file whose contents are not what they should be, or a bad data parameter."""

    default_hint = "re-install the files (`apt-get install --reinstall dataset-fashion-mnist`) or pass data_dir"


class DataFileNotFoundError(FmcacheError, FileNotFoundError):
    """A data file that is not there."""

    default_hint = "run `apt-get install dataset-fashion-mnist`, or pass data_dir= a folder with the .gz files"


class HandoverError(FmcacheError, RuntimeError):
    """The ring that hands DataLoader workers' batches to the training process
    (fmcache.handover) could not be made in shared memory, or a batch in it was
    overwritten before the training process copied it out (never handed on as wrong
    numbers)."""

    default_hint = "pass handover='torch' to EpochLoader and report this with your torch version"


__all__ = [
    "AugmentationError",
    "BoundaryError",
    "BuildError",
    "CacheBusyError",
    "CacheError",
    "CacheExistsError",
    "CacheReplacedError",
    "CodecError",
    "CodecSpecError",
    "CorruptionError",
    "DataError",
    "DataFileNotFoundError",
    "DiskFullError",
    "EncodeError",
    "FmcacheError",
    "FormatVersionError",
    "FreezeError",
    "HandoverError",
    "IncompleteCacheError",
    "LayerNotFoundError",
    "ModelConfigError",
    "NonFiniteError",
    "NotACacheError",
    "PolicyError",
    "ReadOnlyError",
    "ResumeError",
    "SampleIndexError",
    "SamplerConfigError",
    "SensitivityError",
    "ShapeMismatchError",
    "SpecImportError",
    "StaleCacheError",
    "StrideError",
    "TierPlanError",
    "TrainingError",
    "UnknownCodecError",
    "VariantNameError",
]
