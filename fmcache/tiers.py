"""Per-channel precision tiers: which channels of a layer go to which codec.

A :class:`TierPlan` splits the C channels of a layer into named tiers (``sensitive``,
``bulk``, ...), each with its own codec. :meth:`TierPlan.split` and
:meth:`TierPlan.merge` are exact inverses. Channels live on axis 0 of (C, H, W) maps and
on the last axis of token maps (T, D) (:func:`fmcache.codecs.channel_axis`); batch
methods take the same with a leading sample axis.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codecs import Codec, channel_axis, codec_from_config, codec_from_spec
from .errors import TierPlanError

_TIER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Tier:
    """A named set of channel indices stored with one codec."""

    name: str
    channels: tuple[int, ...]
    codec: Codec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels": _compress_runs(self.channels), "codec": self.codec.get_config()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], limit: int | None = None) -> Tier:
        """A tier from its manifest entry; ``limit``: the most channels it may hold (its
        plan's count), checked before a run is listed."""
        return cls(str(data["name"]), _expand_runs(data["channels"], limit), codec_from_config(data["codec"]))


class TierPlan:
    """Channels 0..C-1 of a layer, each in exactly one tier.

    Parameters
    ----------
    num_channels
        C, the layer's channel count.
    tiers
        ``Tier`` objects, or ``(name, channels, codec)`` tuples with a codec or spec.
    """

    def __init__(self, num_channels: int, tiers: Sequence[Tier | tuple[str, Sequence[int], Codec | str]]) -> None:
        if not isinstance(num_channels, (int, np.integer)) or num_channels < 1:
            raise TierPlanError(f"a tier plan needs a positive channel count, got {num_channels!r}")
        _check_channel_count(int(num_channels))
        built = [t if isinstance(t, Tier) else Tier(t[0], tuple(int(c) for c in t[1]), codec_from_spec(t[2]))
                 for t in tiers]
        self.num_channels = int(num_channels)
        self.tiers: tuple[Tier, ...] = tuple(built)
        self._validate()
        self._index = {t.name: np.asarray(t.channels, dtype=np.intp) for t in self.tiers}
        # Contiguous tiers are split with slices (views), not fancy indexing (copies).
        self._slices = {t.name: _as_slice(t.channels) for t in self.tiers}

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def single(cls, num_channels: int, codec: Codec | str, name: str = "all") -> TierPlan:
        """Every channel in one tier."""
        return cls(num_channels, [(name, range(num_channels), codec)])

    @classmethod
    def two_tier(cls, num_channels: int, sensitive: Sequence[int], sensitive_codec: Codec | str,
                 bulk_codec: Codec | str) -> TierPlan:
        """``sensitive`` channels with one codec, the rest (``bulk``) with another; empty tiers dropped."""
        chosen = sorted({int(c) for c in sensitive})
        rest = sorted(set(range(num_channels)) - set(chosen))
        tiers: list[tuple[str, Sequence[int], Codec | str]] = []
        if chosen:
            tiers.append(("sensitive", chosen, sensitive_codec))
        if rest:
            tiers.append(("bulk", rest, bulk_codec))
        return cls(num_channels, tiers)

    def _validate(self) -> None:
        if not self.tiers:
            raise TierPlanError("a tier plan needs at least one tier")
        owner: dict[int, str] = {}
        names: set[str] = set()
        for tier in self.tiers:
            if not _TIER_NAME.match(tier.name):
                raise TierPlanError(f"tier name {tier.name!r} must be 1-32 letters, digits, '_' or '-', "
                                    "starting with a letter")
            if tier.name in names:
                raise TierPlanError(f"tier name {tier.name!r} appears twice")
            names.add(tier.name)
            if not tier.channels:
                raise TierPlanError(f"tier {tier.name!r} has no channels", hint="drop empty tiers")
            for c in tier.channels:
                if not 0 <= c < self.num_channels:
                    raise TierPlanError(f"tier {tier.name!r} names channel {c}, outside 0..{self.num_channels - 1}")
                if c in owner:
                    raise TierPlanError(f"channel {c} is in tier {owner[c]!r} and in tier {tier.name!r}")
                owner[c] = tier.name
        missing = self.num_channels - len(owner)  # counted, not listed: a damaged manifest's
        if missing:  # num_channels of 2**31 made a set of every channel (gigabytes; OOM in a fuzz run)
            first = list(itertools.islice((c for c in range(self.num_channels) if c not in owner), 10))
            shown = ", ".join(map(str, first)) + (" ..." if missing > 10 else "")
            raise TierPlanError(f"channels {shown} belong to no tier ({missing} of {self.num_channels})")

    # ---- split / merge ---------------------------------------------------------------
    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierPlanError(f"no tier named {name!r} (tiers: {', '.join(self.names)})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def shared_codec(self) -> Codec | None:
        """The codec of every tier when they all share one and it is channel-wise
        (:attr:`~fmcache.codecs.Codec.channelwise`): storing the map whole with it decodes
        every channel to what its tier would. None otherwise."""
        first = self.tiers[0].codec
        if not first.channelwise or any(t.codec != first for t in self.tiers[1:]):
            return None
        return first

    def select(self, maps: np.ndarray, name: str, *, batched: bool) -> np.ndarray:
        """The channels of tier ``name`` from one map (or a batch)."""
        axis = channel_axis(maps.ndim - (1 if batched else 0)) + (1 if batched else 0)
        if maps.shape[axis] != self.num_channels:
            raise TierPlanError(f"map of shape {maps.shape} has {maps.shape[axis]} channels on axis {axis}, "
                                f"the tier plan has {self.num_channels}")
        index: slice | np.ndarray = self._slices[name] or self._index[name]
        return maps[(slice(None),) * axis + (index,)]

    def split(self, maps: np.ndarray, *, batched: bool = False) -> dict[str, np.ndarray]:
        """tier name -> that tier's channels (views where the tier is contiguous)."""
        return {t.name: self.select(maps, t.name, batched=batched) for t in self.tiers}

    def merge(self, parts: Mapping[str, np.ndarray], *, batched: bool = False,
              out: np.ndarray | None = None) -> np.ndarray:
        """Inverse of :meth:`split`."""
        if set(parts) != set(self.names):
            raise TierPlanError(f"merge needs tiers {sorted(self.names)}, got {sorted(parts)}")
        first = parts[self.tiers[0].name]
        axis = channel_axis(first.ndim - (1 if batched else 0)) + (1 if batched else 0)
        shape = list(first.shape)
        shape[axis] = self.num_channels
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif list(out.shape) != shape:
            raise TierPlanError(f"merge output has shape {out.shape}, expected {tuple(shape)}")
        for t in self.tiers:
            index: slice | np.ndarray = self._slices[t.name] or self._index[t.name]
            out[(slice(None),) * axis + (index,)] = parts[t.name]
        return out

    def tier_shape(self, name: str, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape of tier ``name`` for a layer of ``sample_shape``."""
        shape = list(sample_shape)
        shape[channel_axis(len(sample_shape))] = len(self.tier(name).channels)
        return tuple(shape)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"num_channels": self.num_channels, "tiers": [t.to_dict() for t in self.tiers]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TierPlan:
        try:
            n = int(data["num_channels"])
            _check_channel_count(n)  # before any tier lists its channels
            return cls(n, [Tier.from_dict(t, limit=n) for t in data["tiers"]])
        except (KeyError, TypeError) as exc:
            raise TierPlanError(f"malformed tier plan {data!r}: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TierPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.name}: {len(t.channels)} ch {t.codec.spec}" for t in self.tiers)
        return f"TierPlan({self.num_channels}; {inner})"


def _as_slice(channels: tuple[int, ...]) -> slice | None:
    if channels and list(channels) == list(range(channels[0], channels[0] + len(channels))):
        return slice(channels[0], channels[0] + len(channels))
    return None


def _compress_runs(channels: Sequence[int]) -> list[int | list[int]]:
    """[0,1,2,3,7] -> [[0,4],7]: half-open runs keep big plans short in the manifest."""
    out: list[int | list[int]] = []
    i = 0
    chans = list(channels)
    while i < len(chans):
        j = i
        while j + 1 < len(chans) and chans[j + 1] == chans[j] + 1:
            j += 1
        out.append([chans[i], chans[j] + 1] if j - i >= 2 else chans[i])
        if j - i == 1:
            out.append(chans[j])
        i = j + 1
    return out


#: the most channels a layer may have: each tier lists its channels (a damaged manifest's
#: count or run of 2**31 channels would otherwise list billions: an OOM in a fuzz run)
MAX_CHANNELS = 1 << 24


def _check_channel_count(n: int) -> None:
    if n > MAX_CHANNELS:
        raise TierPlanError(f"a tier plan of {n:,} channels: fmcache lists each tier's channels, at most "
                            f"{MAX_CHANNELS:,}", hint="give the layer's map fewer channels (its channel axis: "
                                                      "the first of (C, ...) maps, the last of (T, D) ones)")


def _expand_runs(items: Sequence[Any], limit: int | None = None) -> tuple[int, ...]:
    """``_compress_runs`` undone; TierPlanError, before listing it, for a run that would
    take the tier past ``limit`` channels."""
    chans: list[int] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise TierPlanError(f"malformed channel run {item!r}: expected [start, stop]")
            start, stop = int(item[0]), int(item[1])
            if limit is not None and stop - start > limit - len(chans):
                raise TierPlanError(f"channel run {item!r} takes a tier past the plan's {limit} channels")
            chans.extend(range(start, stop))
        else:
            chans.append(int(item))
    return tuple(chans)
