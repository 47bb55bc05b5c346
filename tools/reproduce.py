"""Reproduce the freezing-with-cached-feature-maps comparison on Fashion-MNIST.

The six arms of :mod:`fmcache.experiment` (``full``, ``classic_freeze``, ``cache_fp32_noaug``,
``cache_fp32_feature``, ``fmcache_no_saca``, ``fmcache``; its docstring says what each
does), with the same model, data, epochs, freezing schedule and seeds.

Each finished (arm, seed) is saved as JSON under ``runs/reproduce/<setting hash>/`` and
skipped when the script runs again (resume). After each one the aggregate is written:
``docs/results.json``, the table in ``docs/results.md`` (between markers) and two PNG plots.

    .venv/bin/python tools/reproduce.py --quick          # under a minute here, writes runs/quick/
    .venv/bin/python tools/reproduce.py                  # the full setting, writes docs/
    .venv/bin/python tools/reproduce.py --render-only    # redraw docs from saved results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

from fmcache.experiment import ARMS, run_arm
from fmcache.policy import CompressionPolicy
from fmcache.zoo import native_bf16

# Session 2's setting (docs/results.md says why): a prefix pre-trained for 400 steps, then
# 12 epochs on 10k images with layer1-3 frozen after the first; one torch thread, so a
# neighbour on the second core disturbs the timing less; one DataLoader worker per arm
# (raw images for full/classic, cached maps for the others), on the second core. Runs 1-3 used width 8, 50
# pre-training steps, 3k images, 6 epochs, "1:layer2,3:layer3", rho 0.25, V=3, 512 calib.
FULL = {"width": 16, "pretrain_steps": 400, "train_samples": 10000, "test_samples": 10000, "epochs": 12,
        "schedule": "1:layer3", "batch_size": 128, "lr": 0.05, "seeds": [0, 1, 2],
        "rho": 0.125, "variants": None, "max_variants": 1, "calib_samples": 128, "threads": 1, "workers": 1}
QUICK = {**FULL, "width": 8, "pretrain_steps": 50, "train_samples": 512, "test_samples": 500, "epochs": 3,
         "schedule": "1:layer2,2:layer3", "seeds": [0], "calib_samples": 128}


def run_one(arm: str, seed: int, setting: dict[str, Any], work: Path) -> dict[str, Any]:
    policy = CompressionPolicy.from_config(setting["policy"]) if setting.get("policy") else None
    return run_arm(arm, seed=seed, width=setting["width"], pretrain_steps=setting["pretrain_steps"],
                   train_samples=setting["train_samples"], test_samples=setting["test_samples"],
                   epochs=setting["epochs"], schedule=setting["schedule"], batch_size=setting["batch_size"],
                   num_workers=setting.get("workers", 0),
                   lr=setting["lr"], work_dir=work, rho=setting["rho"],
                   variants=tuple(setting["variants"]) if setting["variants"] is not None else None,
                   max_variants=setting.get("max_variants"), calib_samples=setting["calib_samples"], policy=policy,
                   log=lambda m: print(f"  [{arm} s{seed}] {m}", flush=True))


def setting_hash(setting: dict[str, Any]) -> str:
    keyed = {k: v for k, v in setting.items() if k not in ("seeds", "threads")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]


def aggregate(setting: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in ARMS:
        rs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        arms[arm] = {"seeds": [r["seed"] for r in rs], "acc": [r["acc"] for r in rs],
                     "wall_s": [round(r["wall_s"], 2) for r in rs],
                     "cpu_s": [round(r["cpu_s"], 2) if "cpu_s" in r else None for r in rs], "cache_bytes": rs[0]["cache_bytes"],
                     "cache_bytes_peak": rs[0]["cache_bytes_peak"], "build_s": [round(r["build_s"], 2) for r in rs],
                     "builds": [{k: b[k] for k in ("boundary", "stored_bytes", "raw_bytes", "codecs", "build_s")}
                                for b in rs[0]["builds"]]}
    return {"setting": setting, "arms": arms}


def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def targets(agg: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met?) read from the aggregate, each over the seeds that every arm
    it involves finished (paired); None where a target cannot be decided."""
    a = agg["arms"]

    def paired(arms: tuple[str, ...], key: str) -> tuple[list[float], str] | None:
        if not all(x in a for x in arms):
            return None
        per = [{s: v for s, v in zip(a[x]["seeds"], a[x][key]) if v is not None} for x in arms]
        seeds = sorted(set.intersection(*(set(p) for p in per)))
        if not seeds:
            return None
        return [statistics.mean(p[s] for s in seeds) for p in per], f" (seeds {','.join(map(str, seeds))})"

    out: list[tuple[str, str, bool | None]] = []
    if got := paired(("fmcache", "classic_freeze"), "acc"):
        (fm, cl), tag = got
        out.append(("fmcache acc within 0.3 pt of classic_freeze", f"{100 * (fm - cl):+.2f} pt{tag}",
                    abs(fm - cl) <= 0.003))
    if got := paired(("fmcache", "full"), "acc"):
        (fm, fu), tag = got
        out.append(("fmcache acc within 0.5 pt of full", f"{100 * (fm - fu):+.2f} pt{tag}", fm - fu >= -0.005))
    if got := paired(("fmcache", "full"), "wall_s"):
        (fw, uw), tag = got
        out.append(("fmcache wall <= 0.6x full", f"{fw / uw:.2f}x{tag}", fw / uw <= 0.6))
    if got := paired(("fmcache", "classic_freeze"), "wall_s"):
        (fw, cw), tag = got
        out.append(("fmcache wall <= 0.75x classic_freeze", f"{fw / cw:.2f}x{tag}", fw / cw <= 0.75))
    if got := paired(("fmcache", "classic_freeze"), "cpu_s"):
        (fc, cc), tag = got
        out.append(("(extra, load-robust) fmcache CPU (process + workers) <= 0.75x classic_freeze", f"{fc / cc:.2f}x{tag}",
                    fc / cc <= 0.75))
    if "fmcache" in a and "cache_fp32_noaug" in a:
        r = a["fmcache"]["cache_bytes"] / max(a["cache_fp32_noaug"]["cache_bytes"], 1)
        out.append(("fmcache bytes <= 1/8 of cache_fp32_noaug (variants included)", f"1/{1 / r:.1f}", r <= 1 / 8))
    if got := paired(("fmcache", "classic_freeze", "cache_fp32_noaug"), "acc"):
        (fm, cl, no), tag = got
        gap = cl - no
        closed = (fm - no) / gap if gap > 0 else float("nan")
        out.append(("SACA closes >= 50 % of the cache_fp32_noaug -> classic_freeze gap",
                    (f"{100 * closed:.0f} % of a {100 * gap:.2f} pt gap" if gap > 0 else
                     f"no gap: noaug is {-100 * gap:.2f} pt better") + tag,
                    (closed >= 0.5) if gap > 0 else None))
    return out


def table(agg: dict[str, Any]) -> str:
    lines = [("| arm | seeds | test acc (%) | train wall s (incl. builds) | builds s | cache bytes (all builds) "
             "| CPU s, process + workers (seeds that recorded it) |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    for arm, r in agg["arms"].items():
        cpu = [c for c in r.get("cpu_s") or [] if c is not None]
        lines.append(f"| {arm} | {len(r['acc'])} | {_ms(r['acc'], 100)} | {_ms(r['wall_s'], 1, 1)} | "
                     f"{_ms(r['build_s'], 1, 1)} | {r['cache_bytes']:,} | "
                     f"{_ms(cpu, 1, 1) + f' ({len(cpu)})' if cpu else '-'} |")
    missing = [a for a in ARMS if a not in agg["arms"]]
    if missing:
        lines.append("")
        lines.append("Not finished: " + ", ".join(missing) + ".")
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---:|---|")
    for name, value, ok in targets(agg):
        lines.append(f"| {name} | {value} | {'yes' if ok else ('n/a' if ok is None else '**no**')} |")
    return "\n".join(lines)


def plots(agg: dict[str, Any], out_dir: Path, stem: str) -> None:
    plt = pyplot(out_dir)
    if plt is None:
        return

    arms = agg["arms"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in arms.items():
        ax.errorbar(statistics.mean(r["wall_s"]), 100 * statistics.mean(r["acc"]),
                    yerr=100 * statistics.stdev(r["acc"]) if len(r["acc"]) > 1 else 0, fmt="o", label=arm, capsize=3)
    ax.set_xlabel("training wall time incl. cache builds (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, ResNet-18: accuracy vs wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_acc_vs_wall.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [a for a in arms if arms[a]["cache_bytes"] > 0]
    ax.bar(names, [arms[a]["cache_bytes"] / 2**20 for a in names])
    ax.set_ylabel("cache MiB (all builds, variants included)")
    ax.set_title("bytes per arm")
    ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_bytes.png", dpi=110)
    plt.close(fig)


def render(setting: dict[str, Any], results: list[dict[str, Any]], json_path: Path, md_path: Path | None) -> None:
    agg = aggregate(setting, results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(agg, indent=1))
    stem = json_path.stem
    plots(agg, json_path.parent, stem)
    text = table(agg)
    print(text, flush=True)
    if md_path is not None:
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        doc = md_path.read_text() if md_path.exists() else f"# Results\n\n{start}\n{end}\n"
        if start not in doc:
            doc += f"\n{start}\n{end}\n"
        head, rest = doc.split(start, 1)
        tail = rest.split(end, 1)[1]
        md_path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("*-seed*.json"))]


def item_timing(samples: int = 1024, repeats: int = 3, batch: int = 128) -> dict[str, Any]:
    """Microseconds per item of FeatureMapDataset in each augment mode, on SACA caches of
    layer2 and layer3 (reading + decoding + augmentation + collate; the same batches in each
    mode, best of ``repeats``, one process, no workers)."""
    import tempfile
    import time

    import numpy as np

    from fmcache.builder import build_saca_cache
    from fmcache.dataset import FeatureMapDataset, collate
    from fmcache.experiment import FAMILY, PIXELS, SacaConfig
    from fmcache.zoo import FashionMNIST, pretrained_resnet

    model = pretrained_resnet(width=FULL["width"], steps=FULL["pretrain_steps"])
    out: dict[str, Any] = {"samples": samples, "batch": batch, "width": FULL["width"],
                           "order": "uniform permutation (not chunk-aware)", "layers": {}}
    for layer in ("layer2", "layer3"):
        entry: dict[str, Any] = {}
        out["layers"][layer] = entry
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "t.lmdb"
            manifest = build_saca_cache(model, FashionMNIST("train", limit=samples), layer, path,
                                        saca=SacaConfig(family=FAMILY, n_samples=128, max_variants=FULL["max_variants"]),
                                        pixels=PIXELS, progress=False, batch_size=256)
            entry["codecs"] = {t.name: t.codec.spec for t in manifest.layers[layer].plan.tiers}
            entry["shape"] = list(manifest.layers[layer].shape)
            order = np.random.default_rng(0).permutation(samples)
            for mode in ("none", "feature", "saca"):
                ds = FeatureMapDataset(path, augment=mode, seed=0)
                best = float("inf")
                for r in range(repeats):
                    ds.set_epoch(r)
                    t0 = time.perf_counter()
                    for lo in range(0, samples, batch):
                        collate(ds.__getitems__(order[lo:lo + batch].tolist()))
                    best = min(best, time.perf_counter() - t0)
                entry[f"{mode}_us_per_item"] = round(1e6 * best / samples, 1)
    return out


POLICY_CODECS = ("int8:cname=zstd,clevel=1,shuffle=bit", "int4:cname=zstd,clevel=1,shuffle=bit",
                 "fp16:cname=zstd,clevel=1,shuffle=byte", "bf16:cname=zstd,clevel=1,shuffle=byte",
                 "zfp:accuracy=0.05", "zfp:accuracy=0.1", "sz3:rel=0.01", "sz3:rel=0.05",
                 "grid:rel=0.01", "grid:rel=0.05")


def policy_codecs(width: int = 16, samples: int = 128) -> list[dict[str, Any]]:
    """Ratio vs float32 and mean per-sample relative L2 error of candidate policy codecs on
    layer2/layer3 maps of the briefly pre-trained ResNet-18 (the default policy's evidence)."""
    import numpy as np

    from fmcache.capture import Capture
    from fmcache.codecs import codec_from_spec
    from fmcache.zoo import FashionMNIST, pretrained_resnet

    model = pretrained_resnet(width=width, steps=FULL["pretrain_steps"]).eval()
    data = FashionMNIST("train", limit=samples)
    x = torch.stack([data[i][0] for i in range(samples)])
    with torch.inference_mode():
        maps = Capture(model, ["layer2", "layer3"])(x)
    rows = []
    for layer, tensor in maps.items():
        arr = tensor.float().numpy()
        for spec in POLICY_CODECS:
            codec = codec_from_spec(spec)
            nbytes, errors = 0, []
            for sample in arr:
                blob = codec.encode(sample)
                nbytes += len(blob)
                back = codec.decode(blob)
                errors.append(float(np.linalg.norm(back - sample) / max(float(np.linalg.norm(sample)), 1e-12)))
            rows.append({"layer": layer, "codec": codec.spec, "ratio": round(arr.nbytes / nbytes, 2),
                         "rel_l2": float(f"{statistics.mean(errors):.3g}")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bytes_ablation(samples: int = 500) -> list[dict[str, Any]]:
    """Cache bytes of SACA builds (both freeze boundaries of the schedule) relative to a float32
    cache without variants, over rho x V x policy; no training (the pre-trained prefix)."""
    import tempfile

    from fmcache.builder import build_cache, build_saca_cache
    from fmcache.experiment import FAMILY, PIXELS, SacaConfig
    from fmcache.policy import frozen_fraction
    from fmcache.zoo import FashionMNIST, pretrained_resnet

    model = pretrained_resnet(width=FULL["width"], steps=FULL["pretrain_steps"])
    data = FashionMNIST("train", limit=samples)
    policies = {"default": CompressionPolicy.default(),
                "sz3-0.05-both": CompressionPolicy.constant("sz3:rel=0.05", "sz3:rel=0.05")}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = 0
        for layer in ("layer2", "layer3"):
            fp32 += sum(build_cache(model, data, [layer], Path(tmp) / f"raw-{layer}.lmdb", codec="raw",
                                    progress=False, batch_size=250).layers[layer].stored_bytes.values())
        for pname, policy in policies.items():
            for rho in (0.25, 0.125):
                for v in (3, 1):
                    total = 0
                    for layer in ("layer2", "layer3"):
                        m = build_saca_cache(model, data, layer, Path(tmp) / "s.lmdb", overwrite=True, progress=False,
                                             saca=SacaConfig(family=FAMILY, rho=rho, max_variants=v, n_samples=128),
                                             policy=policy, frozen=frozen_fraction(model, layer), pixels=PIXELS,
                                             batch_size=250)
                        total += sum(m.layers[layer].stored_bytes.values())
                    rows.append({"policy": pname, "rho": rho, "variants": v, "bytes": total,
                                 "fraction_of_fp32": round(total / fp32, 4)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small version (under a minute here)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of the arms")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the setting's)")
    ap.add_argument("--set", action="append", default=[], help="override a setting: KEY=JSON (repeatable)")
    ap.add_argument("--render-only", action="store_true", help="redraw the outputs from saved results")
    ap.add_argument("--item-timing", action="store_true", help="time Dataset items per augment mode and exit")
    ap.add_argument("--policy-codecs", action="store_true", help="measure the policy's candidate codecs and exit")
    ap.add_argument("--bytes-ablation", action="store_true", help="cache bytes over rho x V x policy and exit")
    ap.add_argument("--out", help="results JSON (default docs/results.json, or runs/quick/results.json)")
    args = ap.parse_args()
    setting = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        setting[key] = json.loads(value)
    if args.seeds:
        setting["seeds"] = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(int(setting["threads"]))
    if args.policy_codecs:
        (ROOT / "docs/policy_codecs.json").write_text(json.dumps(policy_codecs(), indent=1))
        return
    if args.bytes_ablation:
        (ROOT / "docs/bytes_ablation.json").write_text(json.dumps(bytes_ablation(), indent=1))
        return
    if args.item_timing:
        timing = item_timing()
        print(json.dumps(timing), flush=True)
        (ROOT / "docs/item_timing.json").write_text(json.dumps(timing, indent=1))
        return
    tag = setting_hash(setting)
    run_dir = ROOT / "runs" / "reproduce" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "setting.json").write_text(json.dumps(setting, indent=1))
    out = Path(args.out) if args.out else (ROOT / "runs/quick/results.json" if args.quick else ROOT / "docs/results.json")
    md = None if args.quick and not args.out else out.with_suffix(".md")
    setting_doc = {**setting, "hash": tag, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                   "torch": torch.__version__, "native_bf16": native_bf16(),
                   "data": f"Fashion-MNIST train[:{setting['train_samples']}], test[:{setting['test_samples']}]"}
    arms = [a for a in args.arms.split(",") if a]
    print(f"setting {tag}: {json.dumps(setting)}", flush=True)
    if not args.render_only:
        for seed in setting["seeds"]:
            for arm in arms:
                path = run_dir / f"{arm}-seed{seed}.json"
                if path.exists():
                    print(f"skip {arm} seed {seed} (done: {path.name})", flush=True)
                    continue
                print(f"== {arm} seed {seed}", flush=True)
                result = run_one(arm, seed, setting, run_dir / "work" / f"{arm}-{seed}")
                print(f"== {arm} seed {seed}: acc {100 * result['acc']:.2f} %, wall {result['wall_s']:.1f} s, "
                      f"builds {result['build_s']:.1f} s, cache {result['cache_bytes']:,} B", flush=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1))
                tmp.replace(path)
                render(setting_doc, load_results(run_dir), out, md)
    render(setting_doc, load_results(run_dir), out, md)


if __name__ == "__main__":
    main()
