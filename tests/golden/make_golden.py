"""Write the golden caches of the current format version (run once per new version).

    python tests/golden/make_golden.py

creates ``tests/golden/v<FORMAT_VERSION>/`` with an LMDB and an HDF5 cache of the same
small maps (two tiers with a variant, error-bounded and quantised codecs, token maps; from
version 5 a packed layer),
``inputs.npz`` (what was written) and ``decoded.npz`` (what this version decoded). Every
test run decodes them again (tests/test_golden.py): a format or decoder change that
alters old caches fails there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import fmcache
from fmcache import TierPlan


def golden_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261125)
    conv = (rng.lognormal(-1, 1, size=(5, 6, 4, 4)) * (rng.random((5, 6, 4, 4)) > 0.4)).astype(np.float32)
    tokens = rng.normal(size=(5, 7, 3)).astype(np.float32)
    return {"conv": conv, "conv_flip": conv[..., ::-1].copy(), "tokens": tokens, "labels": np.arange(5) * 3}


def write(path: Path, data: dict[str, np.ndarray]) -> None:
    with fmcache.create_cache(path, fingerprints={"weights": "golden-weights", "data": "golden-data"}) as w:
        # from version 3 the sensitive tier is bf16 (its stage-2 payloads are new in v3)
        sensitive = "bf16" if fmcache.FORMAT_VERSION >= 3 else "fp16"
        w.add_layer("stage.1", (6, 4, 4), plan=TierPlan(6, [("sensitive", [1, 4], sensitive),
                                                              ("bulk", [0, 2, 3, 5], "int8")]), variants=["flip"])
        # from version 4 tokens tier "a" is the lossless blosc2 codec (its CRC-framed payloads are new in v4)
        first = "blosc2" if fmcache.FORMAT_VERSION >= 4 else "zfp:accuracy=0.01"
        w.add_layer("tokens", (7, 3), plan=TierPlan(3, [("a", [0], first),
                                                        ("b", [1, 2], "sz3:abs=0.001")]))
        maps, variants = {"stage.1": data["conv"], "tokens": data["tokens"]}, {"stage.1": {"flip": data["conv_flip"]}}
        if fmcache.FORMAT_VERSION >= 5:  # from version 5 a layer whose tiers share a codec is packed
            w.add_layer("packed", (6, 4, 4), plan=TierPlan.two_tier(6, [1, 4], "bf16", "bf16"), variants=["flip"])
            maps["packed"], variants["packed"] = data["conv"], {"flip": data["conv_flip"]}
        for s in (0, 3):
            sl = slice(s, s + 3)
            w.append({k: v[sl] for k, v in maps.items()}, data["labels"][sl],
                     variants={k: {v: x[sl] for v, x in d.items()} for k, d in variants.items()})
        w.commit()


def main() -> None:
    out = Path(__file__).parent / f"v{fmcache.FORMAT_VERSION}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = golden_inputs()
    np.savez(out / "inputs.npz", **data)
    decoded = {}
    for name in ("cache.lmdb", "cache.h5"):
        write(out / name, data)
        cache = fmcache.open_cache(out / name)
        for layer in cache.layers:
            for part, values in cache.read_parts(layer, range(len(cache))).items():
                decoded[f"{name}|{layer}|{part}"] = values
        cache.close()
    (out / "cache.lmdb" / "lock.mdb").unlink(missing_ok=True)  # readers open without the lock file
    np.savez(out / "decoded.npz", **decoded)


if __name__ == "__main__":
    main()
