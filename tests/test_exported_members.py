"""The public API is exactly fmcache.__all__ (sorted); a drift fails here."""

import fmcache

EXPECTED = [
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
]


def test_all_is_sorted_and_complete():
    assert fmcache.__all__ == sorted(fmcache.__all__, key=lambda s: (s.startswith("_"), s.lower()))
    assert sorted(fmcache.__all__) == sorted(EXPECTED)


def test_every_exported_name_exists():
    for name in fmcache.__all__:
        assert getattr(fmcache, name) is not None
