"""fmcache: cache the feature maps of frozen layers as a data set.

Public API (everything else is private and may change)::

    codec_from_spec, codec_from_config, registered_codecs   codecs
    TierPlan                                                 per-channel precision tiers
    create_cache, open_cache, Cache, CacheWriter, Manifest   the engine
    FeatureMapDataset                                        a cached layer as a torch Dataset
"""

__version__ = "0.1.0"

from .cache import Cache, CacheWriter, create_cache, open_cache  # noqa: E402
from .codecs import Codec, codec_from_config, codec_from_spec, registered_codecs  # noqa: E402
from .manifest import FORMAT_VERSION, LayerInfo, Manifest  # noqa: E402
from .tiers import Tier, TierPlan  # noqa: E402
from .dataset import FeatureMapDataset  # noqa: E402

__all__ = [
    "Cache",
    "CacheWriter",
    "Codec",
    "codec_from_config",
    "codec_from_spec",
    "create_cache",
    "FeatureMapDataset",
    "FORMAT_VERSION",
    "LayerInfo",
    "Manifest",
    "open_cache",
    "registered_codecs",
    "Tier",
    "TierPlan",
    "__version__",
]
