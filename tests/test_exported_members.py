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
    "tune_allocator",
]


def test_all_is_complete_without_duplicates():
    # Its order is ruff's (RUF022, `make lint`).
    assert len(set(fmcache.__all__)) == len(fmcache.__all__)
    assert sorted(fmcache.__all__) == sorted(EXPECTED)


def test_every_exported_name_exists():
    for name in fmcache.__all__:
        assert getattr(fmcache, name) is not None
