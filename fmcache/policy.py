"""Progressive compression: the freeze stage decides the codecs of the bulk and sensitive tiers.

The deeper the freeze, the fewer epochs remain to consume the cache and the smaller the
trainable suffix, so the looser the codec can be (docs/policy.md gives the default's
measurements). A :class:`CompressionPolicy` is an ordered list of :class:`PolicyStage`;
stage ``i`` applies while the frozen fraction is ``<= stages[i].up_to`` (the last stage
has ``up_to = 1.0``). The JSON form round-trips (:meth:`CompressionPolicy.to_json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .codecs import codec_from_spec
from .errors import FmcacheError, PolicyError
from .sensitivity import select_sensitive
from .tiers import TierPlan


@dataclass(frozen=True)
class PolicyStage:
    """Codecs for freeze stages with a frozen fraction up to ``up_to`` (inclusive)."""

    up_to: float
    bulk: str
    sensitive: str

    def __post_init__(self) -> None:
        if isinstance(self.up_to, bool) or not isinstance(self.up_to, (int, float)) \
                or not 0.0 < float(self.up_to) <= 1.0:
            raise PolicyError(f"stage up_to must lie in (0, 1], got {self.up_to!r}")
        for what in ("bulk", "sensitive"):
            spec = getattr(self, what)
            try:
                object.__setattr__(self, what, codec_from_spec(spec).spec)  # canonical spec
            except FmcacheError as exc:
                raise PolicyError(f"stage up to {self.up_to}: bad {what} codec {spec!r}: {exc}") from None
        object.__setattr__(self, "up_to", float(self.up_to))

    def to_dict(self) -> dict[str, Any]:
        return {"up_to": self.up_to, "bulk": self.bulk, "sensitive": self.sensitive}


class CompressionPolicy:
    """Frozen fraction -> (bulk codec, sensitive codec).

    Parameters
    ----------
    stages
        :class:`PolicyStage` objects or dicts, with strictly increasing ``up_to`` ending at 1.0.
    """

    def __init__(self, stages: Sequence[PolicyStage | Mapping[str, Any]]) -> None:
        if not isinstance(stages, (list, tuple)):
            raise PolicyError(f"stages must be a list of stages, got {type(stages).__name__}")
        built = []
        for s in stages:
            if isinstance(s, PolicyStage):
                built.append(s)
            elif isinstance(s, Mapping):
                unknown = set(s) - {"up_to", "bulk", "sensitive"}
                if unknown or not {"up_to", "bulk", "sensitive"} <= set(s):
                    raise PolicyError(f"a stage needs exactly up_to, bulk, sensitive; got {sorted(s)}")
                built.append(PolicyStage(s["up_to"], s["bulk"], s["sensitive"]))
            else:
                raise PolicyError(f"a stage must be a PolicyStage or a mapping, got {type(s).__name__}")
        if not built:
            raise PolicyError("a policy needs at least one stage")
        bounds = [s.up_to for s in built]
        if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])) or bounds[-1] != 1.0:
            raise PolicyError(f"stage bounds {bounds} must increase strictly and end at 1.0")
        self.stages: tuple[PolicyStage, ...] = tuple(built)

    @classmethod
    def constant(cls, bulk: str, sensitive: str | None = None) -> CompressionPolicy:
        """One stage: the same codecs at every freeze depth."""
        return cls([PolicyStage(1.0, bulk, sensitive or bulk)])

    @classmethod
    def default(cls) -> CompressionPolicy:
        """The default (docs/policy.md, measured on ResNet-18 maps of Fashion-MNIST):

        ======================  =========================  =====================
        frozen fraction         bulk                       sensitive
        ======================  =========================  =====================
        <= 0.35 (stem, layer1)  int8 + zstd (~5x, 0.4 %)   fp16 + zstd (~3x)
        <= 0.55 (layer2)        int4 + zstd (~10x, 6 %)    int8 + zstd (~5x)
        beyond (layer3, ...)    grid rel 0.05 (~12-15x)    int4 + zstd (~7-10x)
        ======================  =========================  =====================
        """
        return cls([
            PolicyStage(0.35, "int8:cname=zstd,clevel=1,shuffle=bit", "fp16:cname=zstd,clevel=1,shuffle=byte"),
            PolicyStage(0.55, "int4:cname=zstd,clevel=1,shuffle=bit", "int8:cname=zstd,clevel=1,shuffle=bit"),
            PolicyStage(1.0, "grid:rel=0.05", "int4:cname=zstd,clevel=1,shuffle=bit"),
        ])

    def stage_for(self, frozen_fraction: float) -> PolicyStage:
        """The stage whose range holds ``frozen_fraction`` (in [0, 1])."""
        if not isinstance(frozen_fraction, (int, float)) or not 0.0 <= float(frozen_fraction) <= 1.0:
            raise PolicyError(f"frozen fraction must lie in [0, 1], got {frozen_fraction!r}")
        for stage in self.stages:
            if frozen_fraction <= stage.up_to + 1e-12:
                return stage
        return self.stages[-1]

    def codecs_for(self, frozen_fraction: float) -> tuple[str, str]:
        """``(bulk spec, sensitive spec)`` at this freeze depth."""
        stage = self.stage_for(frozen_fraction)
        return stage.bulk, stage.sensitive

    def plan_for(self, frozen_fraction: float, scores: Sequence[float], rho: float) -> TierPlan:
        """Tier plan: the top ``rho`` channels by score in the sensitive tier, the rest bulk."""
        bulk, sensitive = self.codecs_for(frozen_fraction)
        chosen = select_sensitive(scores, rho)
        return TierPlan.two_tier(len(scores), chosen.tolist(), sensitive, bulk)

    # ---- JSON ------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CompressionPolicy:
        if not isinstance(config, Mapping) or set(config) != {"stages"} \
                or not isinstance(config["stages"], (list, tuple)):
            raise PolicyError(f"a policy config is {{'stages': [...]}} and nothing else, got {config!r:.80}")
        return cls(config["stages"])

    def to_json(self) -> str:
        return json.dumps(self.get_config(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CompressionPolicy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy JSON does not parse: {exc}") from None
        return cls.from_config(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CompressionPolicy:
        """:meth:`from_json` of a file; its PolicyError names the file (``--policy FILE``)."""
        try:
            return cls.from_json(Path(path).read_text())
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc.message}", hint=exc.hint) from None
        except (OSError, UnicodeError) as exc:
            raise PolicyError(f"{path}: cannot read the policy file ({exc})") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressionPolicy) and self.get_config() == other.get_config()

    def __repr__(self) -> str:
        return "CompressionPolicy(" + "; ".join(f"<= {s.up_to:.3g}: bulk {s.bulk}, sensitive {s.sensitive}"
                                                for s in self.stages) + ")"


def frozen_fraction(model: nn.Module, boundary: str) -> float:
    """How much of ``model`` a freeze at top-level child ``boundary`` freezes: the share of
    top-level children *with parameters* up to and including it. A nested module
    (``"layer2.0.conv1"``) counts as its top-level child (``"layer2"``): a SACA build at a
    nested name took the deepest stage (1.0, the most lossy codecs) before."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    order = [n for n, _ in model.named_children()]
    if boundary not in order and boundary.split(".")[0] in order:
        boundary = boundary.split(".")[0]
    if boundary not in order:
        raise PolicyError(f"{boundary!r} is not a top-level child of {type(model).__name__}",
                          hint=f"choose one of {', '.join(order)}")
    cut = order.index(boundary)
    frozen = [n for n in names if order.index(n) <= cut]
    return len(frozen) / max(len(names), 1)


__all__ = ["CompressionPolicy", "PolicyError", "PolicyStage", "frozen_fraction"]
