"""The manifest: a versioned, self-describing record of a cache.

It is written last: a cache without a committed manifest is incomplete. The JSON form
(``Manifest.to_dict``) is what ``fmcache inspect --json`` builds on and what both
backends store (LMDB: a checksummed record; HDF5: a root attribute plus its CRC-32).

Format versions: 1 — the first; 2 — LMDB records checksummed with CRC-32C (``FMR2``,
:mod:`fmcache.record`) instead of zlib's CRC-32 (``FMR1``, still read); 3 — ``FMR3``
records (names block apart from the lengths, parsed once per layer) and ``bf16``
payloads with blosc2 holding the widened float32 words (stage byte 2,
:mod:`fmcache.codecs.cast`), which decode without a widening pass (both older forms
still read); 4 — ``blosc2`` codec payloads carry a CRC-32C of their frame
(:mod:`fmcache.codecs.lossless`; the bare frames of 1-3 still read); 5 — a layer whose
tiers all share one channel-wise codec may be *packed* (``"packed": true``): its base map
is stored as one part, :data:`WHOLE_PART`, every channel in order, instead of a part per
tier (layers of 1-4 have no ``packed`` and read as before). A reader refuses a
manifest whose ``format_version`` is newer than :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .codecs import Codec
from .errors import CorruptionError, FormatVersionError, StaleCacheError
from .tiers import TierPlan

FORMAT_VERSION = 6
VARIANT_SEP = "@"
#: The one base part of a packed layer: the whole map, every channel in order (tier
#: names start with a letter, so no tier is called this).
WHOLE_PART = "_whole"


def part_name(tier: str, variant: str | None = None) -> str:
    """Storage name of a tier's base map (``bulk``) or of a variant (``sensitive@flip``)."""
    return tier if variant is None else f"{tier}{VARIANT_SEP}{variant}"


#: the fields of a layer entry that decide how its records are written
LAYOUT_KEYS = ("name", "shape", "dtype", "samples_per_chunk", "plan", "variants", "variant_tiers", "packed")


@dataclass
class LayerInfo:
    """One cached layer: per-sample shape, tier plan, variants, bytes."""

    name: str
    shape: tuple[int, ...]
    plan: TierPlan
    samples_per_chunk: int
    variants: tuple[str, ...] = ()
    variant_tiers: tuple[str, ...] = ()
    dtype: str = "float32"
    raw_bytes: dict[str, int] = field(default_factory=dict)
    stored_bytes: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the base map is stored whole (:data:`WHOLE_PART`, the tiers' shared codec), not per tier
    packed: bool = False

    def parts(self) -> list[tuple[str, str, str | None]]:
        """(part name, tier, variant) for every stored part, base parts first; a packed
        layer's base part has the tier ``""`` (it holds every tier)."""
        out: list[tuple[str, str, str | None]] = (
            [(WHOLE_PART, "", None)] if self.packed else [(t, t, None) for t in self.plan.names])
        for variant in self.variants:
            out.extend((part_name(t, variant), t, variant) for t in self.variant_tiers)
        return out

    @property
    def base_parts(self) -> tuple[str, ...]:
        """The stored parts of the base map: :data:`WHOLE_PART` when packed, else the tiers."""
        return (WHOLE_PART,) if self.packed else self.plan.names

    def part_shape(self, part: str) -> tuple[int, ...]:
        if part == WHOLE_PART:
            return self.shape
        tier = part.split(VARIANT_SEP, 1)[0]
        return self.plan.tier_shape(tier, self.shape)

    def part_codec(self, part: str) -> Codec:
        """The codec part ``part`` is stored with."""
        if part == WHOLE_PART:
            return self.plan.tiers[0].codec
        return self.plan.tier(part.split(VARIANT_SEP, 1)[0]).codec

    @property
    def sample_nbytes(self) -> int:
        n = 4
        for d in self.shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "samples_per_chunk": self.samples_per_chunk,
            "plan": self.plan.to_dict(),
            "variants": list(self.variants),
            "variant_tiers": list(self.variant_tiers),
            "raw_bytes": dict(self.raw_bytes),
            "stored_bytes": dict(self.stored_bytes),
            "extra": self.extra,
            **({"packed": True} if self.packed else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerInfo:
        plan = TierPlan.from_dict(data["plan"])
        return cls(
            name=str(data["name"]),
            shape=tuple(int(d) for d in data["shape"]),
            plan=plan,
            samples_per_chunk=int(data["samples_per_chunk"]),
            variants=tuple(data.get("variants", ())),
            variant_tiers=tuple(data.get("variant_tiers", ())),
            dtype=str(data.get("dtype", "float32")),
            raw_bytes={k: int(v) for k, v in data.get("raw_bytes", {}).items()},
            stored_bytes={k: int(v) for k, v in data.get("stored_bytes", {}).items()},
            extra=dict(data.get("extra", {})),
            packed=_packed(data, plan),
        )

    def same_layout(self, other: LayerInfo) -> bool:
        """Equal in everything that decides how records are written (not in byte counts)."""
        a, b = self.to_dict(), other.to_dict()
        return all(a.get(k) == b.get(k) for k in LAYOUT_KEYS)


def _packed(data: Mapping[str, Any], plan: TierPlan) -> bool:
    """A layer entry's ``packed`` flag, checked against its plan: only a plan whose tiers
    share one channel-wise codec can have been packed (anything else is a damaged manifest)."""
    packed = data.get("packed", False)
    if not isinstance(packed, bool):
        raise TypeError(f"layer {data.get('name')!r}: 'packed' must be true or false, got {packed!r}")
    if packed and plan.shared_codec() is None:
        raise ValueError(f"layer {data.get('name')!r} is marked packed, but its tiers do not share "
                         "one channel-wise codec")
    return packed


@dataclass
class Manifest:
    """Everything a reader needs to interpret a cache."""

    backend: str
    layers: dict[str, LayerInfo]
    samples: int = 0
    labels: dict[str, Any] | None = None
    fingerprints: dict[str, str | None] = field(default_factory=lambda: {"weights": None, "data": None})
    build: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    format_version: int = FORMAT_VERSION
    fmcache_version: str = ""
    created_utc: str = field(default_factory=lambda: utc_now())
    committed_utc: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "fmcache_version": self.fmcache_version,
            "backend": self.backend,
            "complete": self.complete,
            "samples": self.samples,
            "labels": self.labels,
            "layers": [layer.to_dict() for layer in self.layers.values()],
            "fingerprints": dict(self.fingerprints),
            "build": self.build,
            "created_utc": self.created_utc,
            "committed_utc": self.committed_utc,
            "extra": self.extra,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        version = data.get("format_version")
        if not isinstance(version, int):
            raise CorruptionError(f"{where}: no integer format_version")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: written by format version {version} (fmcache {data.get('fmcache_version', '?')}); "
                f"this fmcache reads versions up to {FORMAT_VERSION}")
        try:
            layers = [LayerInfo.from_dict(item) for item in data["layers"]]
            return cls(
                backend=str(data["backend"]),
                layers={layer.name: layer for layer in layers},
                samples=int(data["samples"]),
                labels=data.get("labels"),
                fingerprints=dict(data.get("fingerprints") or {}),
                build=dict(data.get("build") or {}),
                complete=bool(data.get("complete", False)),
                format_version=version,
                fmcache_version=str(data.get("fmcache_version", "")),
                created_utc=str(data.get("created_utc", "")),
                committed_utc=data.get("committed_utc"),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # any field of the wrong JSON type ends here (found by tests/test_reliability_fuzz.py)
            raise CorruptionError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, data: bytes | memoryview | str, where: str = "manifest") -> Manifest:
        try:
            parsed = json.loads(bytes(data) if not isinstance(data, str) else data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptionError(f"{where}: manifest is not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise CorruptionError(f"{where}: manifest is not a JSON object")
        return cls.from_dict(parsed, where)


def json_crc32(data: bytes) -> int:
    """The checksum stored beside a manifest where the backend has no record framing."""
    return zlib.crc32(data)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_fingerprints(recorded: Mapping[str, str | None], given: Mapping[str, str | None], what: str,
                        allow_stale: bool) -> None:
    """StaleCacheError where a fingerprint given differs from the recorded one (unless
    ``allow_stale``); a side that is None is not compared."""
    for key in ("weights", "data"):
        have, want = recorded.get(key), given.get(key)
        if have is not None and want is not None and have != want and not allow_stale:
            label = "frozen-prefix weights" if key == "weights" else "input data"
            raise StaleCacheError(f"{what}: the {label} changed since the cache was built "
                                  f"(recorded {have[:12]}, now {want[:12]})")
