import json

import pytest

from fmcache import FORMAT_VERSION, LayerInfo, Manifest, TierPlan
from fmcache.errors import CorruptionError, FormatVersionError


def _manifest() -> Manifest:
    plan = TierPlan.two_tier(8, [1, 5], "fp16", "int8")
    layer = LayerInfo("layer2", (8, 4, 4), plan, samples_per_chunk=16, variants=("flip",),
                      variant_tiers=("sensitive",), raw_bytes={"bulk": 10}, stored_bytes={"bulk": 3},
                      extra={"sensitivity": [0.1] * 8})
    return Manifest(backend="lmdb", layers={"layer2": layer}, samples=5,
                    labels={"dtype": "<i8", "shape": []}, fingerprints={"weights": "ab", "data": "cd"},
                    build={"batch_size": 4}, complete=True)


def test_json_round_trip_is_lossless():
    m = _manifest()
    again = Manifest.from_json(m.to_json())
    assert again.to_dict() == m.to_dict()
    assert again.layers["layer2"].parts() == [("sensitive", "sensitive", None), ("bulk", "bulk", None),
                                              ("sensitive@flip", "sensitive", "flip")]


def test_part_shapes_follow_the_tier_plan():
    layer = _manifest().layers["layer2"]
    assert layer.part_shape("sensitive@flip") == (2, 4, 4)
    assert layer.part_shape("bulk") == (6, 4, 4)


def test_newer_format_is_refused():
    d = _manifest().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(FormatVersionError, match=f"format version {FORMAT_VERSION + 1}"):
        Manifest.from_json(json.dumps(d))


@pytest.mark.parametrize("text", [b"{", b"[]", b'{"format_version": 1}', b'{"format_version": "1"}', b"\xff"],
                         ids=["truncated", "not-object", "no-layers", "str-version", "not-utf8"])
def test_malformed_manifests_are_corruption(text):
    with pytest.raises(CorruptionError):
        Manifest.from_json(text)
