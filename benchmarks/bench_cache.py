"""Cache write/load benchmark: schema-1 shards against the same bytes in flat .npy files, side by side.

    python benchmarks/bench_cache.py                 # quickdraw size: 172,500 rows, 512-d, 345 classes
    python benchmarks/bench_cache.py --rows 20000    # quick

Writes bench-results/cache.json. Reads are timed warm (the files sit in the page cache for both
readers), best of `--repeats`, so the ratio measures the reader's own overhead, not the disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cpl_cache.cache import ShardWriter, load_domain, new_manifest, write_manifest

FIELDS = ("image_embeds", "weak_logits", "labels", "split", "index")


def make_rows(n: int, dim: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image_embeds": rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16),
        "weak_logits": rng.standard_normal((n, k), dtype=np.float32),
        "labels": rng.integers(0, k, n).astype(np.int16),
        "split": rng.integers(0, 3, n).astype(np.uint8),
        "index": np.arange(n, dtype=np.int64),
    }


def write_cache(
    root: Path, rows: dict[str, np.ndarray], paths: list[str], shard_size: int, batch: int
) -> None:
    n, dim = rows["image_embeds"].shape
    k = rows["weak_logits"].shape[1]
    ddir = root / "quickdraw"
    manifest = new_manifest(
        domain="quickdraw",
        classes=[f"c{i}" for i in range(k)],
        dim=dim,
        strong={"id": "bench"},
        weak={"id": "bench"},
        split={"hold_frac": 0.5, "seed": 0},
        counts={"train": n},
    )

    def listed(entry):
        manifest["shards"].append(entry)
        write_manifest(ddir, manifest)

    writer = ShardWriter(ddir, dim=dim, num_classes=k, shard_size=shard_size, on_shard=listed)
    for lo in range(0, n, batch):  # batches as extract hands them over
        writer.add(**{f: rows[f][lo : lo + batch] for f in FIELDS}, paths=paths[lo : lo + batch])
    writer.flush()
    manifest["complete"] = True
    write_manifest(ddir, manifest)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=172_500)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=345)
    ap.add_argument("--shard-size", type=int, default=10_000, help="rows per shard (extract's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-results/cache.json"))
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args()

    rows = make_rows(args.rows, args.dim, args.classes)
    paths = [f"quickdraw/class_{i % args.classes}/{i:07d}.png" for i in range(args.rows)]
    nbytes = sum(rows[f].nbytes for f in FIELDS)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.workdir))
    try:
        flat = work / "flat"
        flat.mkdir()
        t_flat_write = best_of(lambda: [np.save(flat / f"{f}.npy", rows[f]) for f in FIELDS], 1)
        t_cache_write = best_of(lambda: write_cache(work / "cache", rows, paths, args.shard_size, 256), 1)

        def read_flat():
            return {f: np.load(flat / f"{f}.npy") for f in FIELDS}

        def read_cache():
            return load_domain(work / "cache", "quickdraw", with_text=False)

        got = read_cache()
        assert got.image_embeds.numpy().tobytes() == rows["image_embeds"].tobytes()
        assert got.weak_logits.numpy().tobytes() == rows["weak_logits"].tobytes()
        read_flat()
        t_flat, t_cache = [], []
        for _ in range(args.repeats):  # interleaved so both see the same machine load
            t_flat.append(best_of(read_flat, 1))
            t_cache.append(best_of(read_cache, 1))
        t_flat_read, t_cache_read = min(t_flat), min(t_cache)
        size_cache = sum(p.stat().st_size for p in (work / "cache" / "quickdraw").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = nbytes / 2**20
    result = {
        "rows": args.rows,
        "dim": args.dim,
        "classes": args.classes,
        "shard_size": args.shard_size,
        "payload_mib": round(mb, 1),
        "cache_size_mib_with_paths": round(size_cache / 2**20, 1),
        "write_s": {"cache": round(t_cache_write, 3), "flat_npy": round(t_flat_write, 3)},
        "read_s": {"cache": round(t_cache_read, 3), "flat_npy": round(t_flat_read, 3)},
        "read_mib_per_s": {"cache": round(mb / t_cache_read, 1), "flat_npy": round(mb / t_flat_read, 1)},
        "read_rate_ratio_cache_over_flat": round(t_flat_read / t_cache_read, 3),
        "goal_read_rate_ratio": 0.70,
    }
    result["goal_met"] = result["read_rate_ratio_cache_over_flat"] >= 0.70
    print(
        f"cache benchmark: {args.rows} rows, {args.dim}-d float16 + {args.classes} float32 logits,"
        f" {mb:.0f} MiB"
    )
    print(f"{'':10} {'write s':>9} {'read s':>9} {'read MiB/s':>11}")
    for name, key in (("hdf5 cache", "cache"), ("flat .npy", "flat_npy")):
        print(
            f"{name:10} {result['write_s'][key]:9.3f} {result['read_s'][key]:9.3f} "
            f"{result['read_mib_per_s'][key]:11.1f}"
        )
    print(
        f"cache reads at {result['read_rate_ratio_cache_over_flat']:.0%} of the flat-file rate "
        f"(goal >= 70%: {'met' if result['goal_met'] else 'NOT met'})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
