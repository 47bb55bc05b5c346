"""Shuffle quality of ChunkShuffleSampler on label-sorted data, against the alternatives.

The worst case for a chunk-local shuffle is data stored sorted by label: every chunk then
holds one class. This script orders 60 000 such samples (10 classes) with

* ``chunks``    -- ChunkShuffleSampler(shuffle="chunks"): shuffled chunks, sliding buffer;
* ``window``    -- shuffled chunks, then each window of ``buffer_chunks`` chunks permuted;
* ``reservoir`` -- shuffled chunks through a standard shuffle buffer of
  ``buffer_chunks * chunk_size`` sample slots (emit a random slot, refill it);
* ``exact`` and ``none`` -- a uniform permutation and the stored order,

for chunk sizes 64 and 256 and buffers of 4/8/16/32 chunks, and measures per batch of 128:
the mean number of distinct classes, the mean Kolmogorov-Smirnov distance between the
batch's label distribution and the global one, the distinct chunks a batch touches (chunk
decodes without a cache); per epoch, the chunks a reader must hold to open each chunk once
(chunks between their first and last use) and the chunk opens per chunk for a reader with
an LRU cache of ``buffer_chunks + 2`` decoded chunks; also the mean |position - sample| / N.

Run from the repository root::

    python tools/shuffle_quality.py            # prints JSON, writes docs/shuffle_quality.{json,png}
                                               # and the table in docs/dataset.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing fmcache

from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

from fmcache.sampler import ChunkShuffleSampler, epoch_stream

NUM_SAMPLES = 60_000
NUM_CLASSES = 10
BATCH_SIZE = 128
CHUNK_SIZES = (64, 256)
BUFFER_CHUNKS = (4, 8, 16, 32)
BUFFERED_POLICIES = ("chunks", "window", "reservoir")
BASELINES = ("exact", "none")
DOC_BEGIN = "<!-- shuffle_quality:begin (written by tools/shuffle_quality.py) -->"
DOC_END = "<!-- shuffle_quality:end -->"


# -- the alternatives to the sliding buffer, built on the same shuffled chunk stream -------


def window_order(
    stream: np.ndarray, chunk_size: int, buffer_chunks: int, rng: np.random.Generator
) -> np.ndarray:
    """Permute each run of ``buffer_chunks`` consecutive chunks of ``stream`` on its own."""
    chunk_ids = stream // chunk_size
    starts = np.flatnonzero(np.r_[True, chunk_ids[1:] != chunk_ids[:-1]])
    bounds = np.r_[starts[::buffer_chunks], stream.size]
    return np.concatenate([stream[a:b][rng.permutation(b - a)] for a, b in itertools.pairwise(bounds)])


def reservoir_order(
    stream: np.ndarray, chunk_size: int, buffer_chunks: int, rng: np.random.Generator
) -> np.ndarray:
    """A standard shuffle buffer of ``buffer_chunks * chunk_size`` slots fed by ``stream``."""
    slots = min(buffer_chunks * chunk_size, stream.size)
    buffer = stream[:slots].copy()
    picks = rng.integers(0, slots, size=stream.size - slots)
    out = np.empty_like(stream)
    for step, incoming in enumerate(stream[slots:].tolist()):
        slot = picks[step]
        out[step] = buffer[slot]
        buffer[slot] = incoming
    out[stream.size - slots :] = buffer[rng.permutation(slots)]
    return out


def order_for(policy: str, chunk_size: int, buffer_chunks: int, epoch: int, seed: int) -> np.ndarray:
    if policy in ("chunks", "exact", "none"):
        sampler = ChunkShuffleSampler(
            NUM_SAMPLES,
            chunk_size,
            buffer_chunks=buffer_chunks,
            seed=seed,
            shuffle=policy,  # type: ignore[arg-type]
            rank=0,
            world_size=1,
        )
        return sampler.epoch_indices(epoch)
    stream = epoch_stream(NUM_SAMPLES, chunk_size, "chunks", np.random.default_rng((seed, epoch)))
    rng = np.random.default_rng((seed, epoch, 1))
    shuffle = {"window": window_order, "reservoir": reservoir_order}[policy]
    return shuffle(stream, chunk_size, buffer_chunks, rng)


# -- metrics ------------------------------------------------------------------------------


def lru_opens(chunks: list[int], capacity: int) -> int:
    """Chunk opens (decodes) of a reader keeping the ``capacity`` most recently used chunks."""
    cache: OrderedDict[int, None] = OrderedDict()
    opens = 0
    for chunk in chunks:
        if chunk in cache:
            cache.move_to_end(chunk)
            continue
        opens += 1
        cache[chunk] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return opens


def open_chunks(chunks: np.ndarray) -> np.ndarray:
    """Per position, the chunks between their first and last use: the decoded chunks a reader
    must hold to open each chunk once (the memory a policy needs)."""
    _, first = np.unique(chunks, return_index=True)
    _, from_end = np.unique(chunks[::-1], return_index=True)
    last = chunks.size - 1 - from_end
    change = np.zeros(chunks.size + 1, dtype=np.int64)
    np.add.at(change, first, 1)
    np.add.at(change, last + 1, -1)
    return np.cumsum(change)[:-1]


def measure(order: np.ndarray, labels: np.ndarray, chunk_size: int, buffer_chunks: int) -> dict[str, float]:
    num_batches = order.size // BATCH_SIZE
    batches = order[: num_batches * BATCH_SIZE].reshape(num_batches, BATCH_SIZE)
    batch_labels = labels[batches]
    counts = np.stack([np.bincount(row, minlength=NUM_CLASSES) for row in batch_labels])
    global_cdf = np.cumsum(np.bincount(labels, minlength=NUM_CLASSES)) / labels.size
    ks = np.abs(np.cumsum(counts, axis=1) / BATCH_SIZE - global_cdf).max(axis=1)
    batch_chunks = [np.unique(row).size for row in batches // chunk_size]
    num_chunks = -(-order.size // chunk_size)
    held = open_chunks(order // chunk_size)
    return {
        "distinct_classes_per_batch": float((counts > 0).sum(axis=1).mean()),
        "ks_per_batch": float(ks.mean()),
        "mean_abs_displacement": float(np.abs(order - np.arange(order.size)).mean() / order.size),
        "chunks_per_batch_mean": float(np.mean(batch_chunks)),
        "chunks_per_batch_max": int(np.max(batch_chunks)),
        "open_chunks_mean": float(held.mean()),
        "open_chunks_max": int(held.max()),
        "opens_per_chunk_lru": lru_opens((order // chunk_size).tolist(), buffer_chunks + 2) / num_chunks,
    }


def run(epochs: int, seed: int) -> dict:
    labels = np.arange(NUM_SAMPLES) * NUM_CLASSES // NUM_SAMPLES  # sorted by label
    rows = []
    for chunk_size in CHUNK_SIZES:
        for buffer_chunks in BUFFER_CHUNKS:
            for policy in BUFFERED_POLICIES + BASELINES:
                per_epoch = [
                    measure(
                        order_for(policy, chunk_size, buffer_chunks, epoch, seed),
                        labels,
                        chunk_size,
                        buffer_chunks,
                    )
                    for epoch in range(epochs)
                ]
                row: dict = {"chunk_size": chunk_size, "buffer_chunks": buffer_chunks, "policy": policy}
                for key in per_epoch[0]:
                    values = [m[key] for m in per_epoch]
                    row[key] = max(values) if key.endswith("_max") else round(float(np.mean(values)), 4)
                rows.append(row)
    return {
        "tool": "tools/shuffle_quality.py",
        "setup": {
            "num_samples": NUM_SAMPLES,
            "num_classes": NUM_CLASSES,
            "labels": "sorted (class = i * 10 // N)",
            "batch_size": BATCH_SIZE,
            "epochs": epochs,
            "seed": seed,
            "lru_capacity_chunks": "buffer_chunks + 2",
        },
        "rows": rows,
    }


# -- outputs ------------------------------------------------------------------------------


def lookup(rows: list[dict], chunk_size: int, buffer_chunks: int, policy: str) -> dict:
    return next(
        r
        for r in rows
        if (r["chunk_size"], r["buffer_chunks"], r["policy"]) == (chunk_size, buffer_chunks, policy)
    )


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "Classes = mean distinct classes per batch of 128 (of 10); KS = mean KS distance of a batch's",
        "labels to the global distribution; chunks/batch = mean (max) distinct chunks a batch touches;",
        "open = mean (max) chunks between their first and last use, i.e. decoded chunks a reader must hold",
        "to open each chunk once per epoch; opens = chunk opens per chunk per epoch with an LRU cache of",
        "`buffer_chunks + 2` decoded chunks.",
        f"60 000 label-sorted samples, 10 classes, mean of {result['setup']['epochs']} epochs.",
        "",
        "| chunk | buffer | policy | classes | KS | chunks/batch | open | opens |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for chunk_size in CHUNK_SIZES:
        for buffer_chunks in BUFFER_CHUNKS:
            for policy in BUFFERED_POLICIES:
                r = lookup(rows, chunk_size, buffer_chunks, policy)
                name = "**chunks** (ours)" if policy == "chunks" else policy
                lines.append(
                    f"| {chunk_size} | {buffer_chunks} | {name} | {r['distinct_classes_per_batch']:.2f} "
                    f"| {r['ks_per_batch']:.3f} | {r['chunks_per_batch_mean']:.1f} ({r['chunks_per_batch_max']}) "
                    f"| {r['open_chunks_mean']:.1f} ({r['open_chunks_max']}) | {r['opens_per_chunk_lru']:.2f} |"
                )
        for policy in BASELINES:
            r = lookup(rows, chunk_size, BUFFER_CHUNKS[1], policy)
            lines.append(
                f"| {chunk_size} | – | {policy} | {r['distinct_classes_per_batch']:.2f} | {r['ks_per_batch']:.3f} "
                f"| {r['chunks_per_batch_mean']:.1f} ({r['chunks_per_batch_max']}) "
                f"| {r['open_chunks_mean']:.1f} ({r['open_chunks_max']}) "
                f"| {r['opens_per_chunk_lru']:.2f} (LRU {BUFFER_CHUNKS[1] + 2}) |"
            )
    displacement = {
        p: lookup(rows, CHUNK_SIZES[0], BUFFER_CHUNKS[1], p)["mean_abs_displacement"]
        for p in ("chunks", "exact", "none")
    }
    lines += [
        "",
        "Mean |position − sample| / N (chunk 64, buffer 8): "
        + ", ".join(f"{p} {v:.3f}" for p, v in displacement.items())
        + " — the chunk order is global, so samples travel as far as under `exact`.",
    ]
    return "\n".join(lines)


def write_doc_table(doc: Path, table: str) -> None:
    text = doc.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise SystemExit(
            f"{doc}: markers {DOC_BEGIN!r} and {DOC_END!r} not found; add them under '## Shuffle quality'"
        )
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    doc.write_text(f"{head}{DOC_BEGIN}\n{table}\n{DOC_END}{tail}")


def plot(result: dict, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    rows = result["rows"]
    # Quality against memory: x is the decoded chunks a reader must hold (open_chunks_mean).
    panels = (
        ("distinct_classes_per_batch", "distinct classes per batch (of 10)", "open_chunks_mean"),
        ("ks_per_batch", "KS distance per batch", "open_chunks_mean"),
        ("opens_per_chunk_lru", "chunk opens per chunk, LRU of buffer+2 chunks", "buffer_chunks"),
    )
    styles = {"chunks": "-", "window": "--", "reservoir": ":"}
    colours = {64: "tab:blue", 256: "tab:orange"}
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.4))
    for ax, (key, title, x_key) in zip(axes, panels):
        for chunk_size in CHUNK_SIZES:
            for policy in BUFFERED_POLICIES:
                points = [lookup(rows, chunk_size, b, policy) for b in BUFFER_CHUNKS]
                ax.plot(
                    [p[x_key] for p in points],
                    [p[key] for p in points],
                    styles[policy],
                    marker="o",
                    color=colours[chunk_size],
                    label=f"{policy}, chunk {chunk_size}",
                )
        if x_key == "open_chunks_mean":
            for chunk_size in CHUNK_SIZES:
                for policy, marker in (("exact", "*"), ("none", "s")):
                    point = lookup(rows, chunk_size, BUFFER_CHUNKS[1], policy)
                    ax.plot(
                        point[x_key],
                        point[key],
                        marker,
                        color=colours[chunk_size],
                        ms=9,
                        label=f"{policy}, chunk {chunk_size}",
                    )
            ax.set_xlabel("decoded chunks held to open each chunk once (mean)")
        else:
            ax.set_xticks(BUFFER_CHUNKS, [str(b) for b in BUFFER_CHUNKS])
            ax.set_yscale("log")
            ax.set_xlabel("buffer_chunks")
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Shuffle quality on 60 000 label-sorted samples, batch 128")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "shuffle_quality.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "shuffle_quality.png")
    parser.add_argument(
        "--doc",
        type=Path,
        default=REPO / "docs" / "dataset.md",
        help="markdown file whose shuffle_quality markers receive the table",
    )
    args = parser.parse_args(argv)
    result = run(args.epochs, args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    args.json.write_text(text + "\n")
    plot(result, args.png)
    write_doc_table(args.doc, markdown_table(result))


if __name__ == "__main__":
    main()
