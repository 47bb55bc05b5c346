"""fmcache: cache the feature maps of frozen layers as a data set.

Public API (everything else is private and may change)::

    codec_from_spec, codec_from_config, registered_codecs   codecs
    TierPlan                                                 per-channel precision tiers
    create_cache, open_cache, Cache, CacheWriter, Manifest   the engine
    FeatureMapDataset                                        a cached layer as a torch Dataset
    tune_allocator                                           keep freed batches mapped (glibc)
"""

__version__ = "0.1.0"

from .cache import Cache, open_cache
from .codecs import Codec, codec_from_config, codec_from_spec, registered_codecs
from .dataset import FeatureMapDataset
from .manifest import FORMAT_VERSION, LayerInfo, Manifest
from .memory import tune_allocator
from .tiers import Tier, TierPlan
from .writer import CacheWriter, create_cache

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheWriter",
    "Codec",
    "FeatureMapDataset",
    "LayerInfo",
    "Manifest",
    "Tier",
    "TierPlan",
    "__version__",
    "codec_from_config",
    "codec_from_spec",
    "create_cache",
    "open_cache",
    "registered_codecs",
    "tune_allocator",
]
