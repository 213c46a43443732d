"""Shards, the manifest and resuming: what makes a killed extraction continue where it stopped.

Each rank's rows are cut into fixed, numbered shard ranges (`reader.shard_ranges`). A shard is
renamed into place only once complete (`cache.write_shard`), then recorded: in one process, in the
manifest itself (replaced atomically); with several ranks, in the rank's own `progress-rNN.json`,
which rank 0 merges into the manifest once every rank is done. A rerun recomputes the same ranges
and skips the recorded ones, so the finished cache holds exactly the rows of an uninterrupted run.
An --overwrite run does all of this in a staging folder and swaps the result in at the end; rank 0
holds a lock on the domain's folder throughout, so two runs never write one cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.cache import (
    MANIFEST,
    TEXT_FILE,
    atomic_write_text,
    parse_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from cpl_cache.errors import UserError

STAGING = ".overwrite"  # inside the domain's folder: where an --overwrite run builds its cache
LOCK = ".extract.lock"  # inside the domain's folder: held by the run that writes it

# Manifest keys that must agree for a rerun to continue an existing cache.
IDENTITY_KEYS = ("dataset", "domain", "classes", "dim", "strong", "weak", "preprocessing", "split", "counts")


def shard_prefix(rank: int, world: int) -> str:
    return "shard" if world == 1 else f"shard-r{rank:02d}"


def progress_path(ddir: Path, rank: int) -> Path:
    return ddir / f"progress-r{rank:02d}.json"


def clear_domain(ddir: Path, keep: frozenset[str] | set[str] = frozenset()) -> int:
    """Remove what extract wrote for a domain, the manifest first; other files in the folder, and
    the names in `keep`, stay."""
    removed = 0
    if not ddir.is_dir():
        return 0
    if (ddir / MANIFEST).is_file():
        (ddir / MANIFEST).unlink()  # from here on no reader takes what is left for a cache
        removed += 1
    for p in ddir.iterdir():
        n = p.name
        ours = (
            n == TEXT_FILE
            or (n.startswith("shard-") and n.endswith(".h5"))
            or (n.startswith("progress-r") and n.endswith(".json"))
            or (n.startswith((".shard-", f".{MANIFEST}", f".{TEXT_FILE}", ".progress-r")) and ".tmp-" in n)
        )
        if ours and n not in keep and p.is_file():
            p.unlink()
            removed += 1
    return removed


def staging_dir(ddir: Path) -> Path:
    """Where an --overwrite run builds the new cache; the old one stays in `ddir` until it is done."""
    return ddir / STAGING


def promote(staging: Path, ddir: Path) -> None:
    """Move a finished --overwrite run from `staging` into `ddir`, replacing the old cache only now.

    The staging manifest moves last, so a run killed part-way still finds it and promotes again.
    """
    new = parse_manifest(staging / MANIFEST)
    names = {e["file"] for e in new["shards"]} | {TEXT_FILE}
    clear_domain(ddir, keep=names)  # old files the new cache does not replace
    for name in sorted(names):
        if (staging / name).is_file():
            os.replace(staging / name, ddir / name)
    os.replace(staging / MANIFEST, ddir / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def domain_lock(ddir: Path) -> Iterator[None]:
    """An advisory lock on the domain's folder for a whole run, taken by the writer (rank 0) only:
    a second extract into the same cache refuses instead of interleaving its shards with ours."""
    import fcntl

    path = ddir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise UserError(
                f"another extract{f' (pid {pid})' if pid else ''} is writing {ddir}: it holds the lock "
                f"{path}; wait for it to finish, or pass another --cache-dir"
            ) from None
        except OSError as err:  # a file system without locks (some network mounts): say so, go on
            print(
                f"cpl-cache: cannot lock {path} ({err.strerror or err}); make sure no other extract "
                "writes this cache at the same time",
                file=sys.stderr,
            )
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new run)


def remove_temporaries(ddir: Path, patterns: tuple[str, ...]) -> None:
    """Half-written files of a killed run (temporary names, never listed anywhere)."""
    for pattern in patterns:
        for p in ddir.glob(pattern):
            p.unlink(missing_ok=True)


def _same_model(a: Any, b: Any) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a == b
    if a.get("fingerprint") or b.get("fingerprint"):
        return a.get("fingerprint") == b.get("fingerprint")
    return (a.get("id"), a.get("revision")) == (b.get("id"), b.get("revision"))


def identity_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first way an existing manifest differs from this run, in words; None if it matches."""
    for key in IDENTITY_KEYS:
        a, b = old.get(key), new.get(key)
        same = _same_model(a, b) if key in ("strong", "weak") else a == b
        if not same:
            if key in ("strong", "weak"):
                return f"another {key} model ({(a or {}).get('id')!r}, this run {(b or {}).get('id')!r})"
            if key == "classes" and isinstance(a, list) and isinstance(b, list):
                if len(a) != len(b):
                    return f"{len(a)} classes (this run: {len(b)})"
                i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
                return f"other class names (class {i}: {a[i]!r}, this run {b[i]!r})"
            return f"{key} {_short(a)} (this run: {_short(b)})"
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _continue(ddir: Path, fresh: dict[str, Any], is_writer: bool) -> dict[str, Any]:
    """The existing manifest of `ddir` if this run may continue it (or a fresh one where nothing was
    done yet under another layout); a UserError naming the difference if not."""
    path = ddir / MANIFEST
    old = parse_manifest(path)
    why = identity_mismatch(old, fresh)
    if why is not None:
        raise UserError(
            f"{ddir} holds a cache made with {why}; pass --overwrite to replace it, or another --cache-dir"
        )
    layout, was = fresh["layout"], old.get("layout")
    started = old["shards"] or any(ddir.glob("progress-r*.json"))
    if layout != was and not old["complete"] and not started and is_writer:
        write_manifest(ddir, fresh)  # nothing done yet: the new layout costs nothing
        return fresh
    if layout != was and not old["complete"]:
        raise UserError(
            f"{ddir} holds an unfinished extraction made with {(was or {}).get('world_size')} "
            f"process(es) and --shard-size {(was or {}).get('shard_size')}; resume it with the same, "
            "or pass --overwrite to start over"
        )
    return old


def open_cache(ddir: Path, fresh: dict[str, Any], *, overwrite: bool, is_writer: bool) -> dict[str, Any]:
    """The manifest to extend: a fresh one, or the existing one if it was made the same way.

    `is_writer` (rank 0) writes; other ranks only read and check. With `overwrite` (`ddir` is then
    the staging folder of an --overwrite run) a cache that cannot be continued is started over
    instead of refused; one made the same way is resumed, as without --overwrite.
    """
    if is_writer:
        remove_temporaries(ddir, (f".{MANIFEST}.tmp-*", f".{TEXT_FILE}.tmp-*"))
    if (ddir / MANIFEST).is_file():
        try:
            return _continue(ddir, fresh, is_writer)
        except UserError:
            if not (overwrite and is_writer):
                raise
    if overwrite and is_writer:
        clear_domain(ddir)
    if is_writer:
        write_manifest(ddir, fresh)
    return fresh


def done_shards(ddir: Path, manifest: dict[str, Any], rank: int, world: int) -> dict[int, dict[str, Any]]:
    """This rank's recorded shards by number (only complete shards are ever recorded)."""
    if world == 1:
        entries = manifest.get("shards", [])
    else:
        path = progress_path(ddir, rank)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["shards"] if path.is_file() else []
        except (OSError, ValueError, KeyError):
            raise UserError(f"{path} is unreadable; pass --overwrite to start this domain over") from None
    return {int(e["number"]): e for e in entries if int(e.get("rank", 0)) == rank}


class ShardSink:
    """Collects a rank's batches into its shard ranges and records each shard once it is on disk."""

    def __init__(
        self,
        ddir: Path,
        manifest: dict[str, Any],
        *,
        rank: int,
        world: int,
        ranges: dict[int, tuple[int, int]],
        dim: int,
        num_classes: int,
        labels: np.ndarray,
        split: np.ndarray,
        paths: tuple[str, ...],
    ):
        self.ddir, self.manifest, self.rank, self.world = ddir, manifest, rank, world
        self.ranges = ranges
        self.labels, self.split, self.paths = labels, split, paths
        self.dim, self.num_classes = dim, num_classes
        self.prefix = shard_prefix(rank, world)
        self._chunks: list[dict[str, Any]] = []  # the open shard's batches (shards are cut at fixed ranges)
        self.skipped: list[dict[str, Any]] = []
        self.write_seconds = 0.0  # buffering, shard files and manifest updates (the benchmark reports it)
        self.progress: dict[str, Any] = {"rank": rank, "world_size": world, "shards": [], "skipped": []}
        if world > 1:
            path = progress_path(ddir, rank)
            if path.is_file():
                self.progress = json.loads(path.read_text(encoding="utf-8"))
        remove_temporaries(ddir, (f".{self.prefix}-*.h5.tmp-*", f".{progress_path(ddir, rank).name}.tmp-*"))

    def add(self, shard: int, rows: np.ndarray, embeds: np.ndarray, logits: np.ndarray) -> None:
        t = time.perf_counter()
        self._chunks.append(
            dict(
                image_embeds=embeds,
                weak_logits=logits,
                labels=self.labels[rows],
                split=self.split[rows],
                index=rows,
                paths=[self.paths[r] for r in rows],
            )
        )
        self.write_seconds += time.perf_counter() - t

    def _shard_rows(self) -> dict[str, Any]:
        """The open shard's rows in one piece (zero rows if every image in it was skipped)."""
        if not self._chunks:
            return {
                "image_embeds": np.zeros((0, self.dim)),
                "weak_logits": np.zeros((0, self.num_classes)),
                "labels": np.zeros(0),
                "split": np.zeros(0),
                "index": np.zeros(0),
                "paths": [],
            }
        rows = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0] if k != "paths"}
        rows["paths"] = [p for c in self._chunks for p in c["paths"]]
        return rows

    def skip(self, row: int, reason: str) -> None:
        self.skipped.append({"path": self.paths[row], "index": int(row), "reason": reason})

    def close_shard(self, number: int) -> dict[str, Any]:
        """Write shard `number` (maybe short, or empty if every image in it was skipped) and record it."""
        t = time.perf_counter()
        name = shard_name(number, self.prefix)
        rows, domain = self._shard_rows(), self.manifest["domain"]
        entry = write_shard(self.ddir / name, rows, domain=domain, row_range=self.ranges[number])
        self._chunks = []
        entry.update(rank=self.rank, number=number)
        skipped, self.skipped = self.skipped, []
        if self.world == 1:
            self.manifest["shards"].append(entry)
            self.manifest["skipped"].extend(skipped)
            write_manifest(self.ddir, self.manifest)
        else:
            self.progress["shards"].append(entry)
            self.progress["skipped"].extend(skipped)
            atomic_write_text(progress_path(self.ddir, self.rank), json.dumps(self.progress, indent=1) + "\n")
        self.write_seconds += time.perf_counter() - t
        return entry


def finish(ddir: Path, manifest: dict[str, Any], world: int, expected: dict[int, int]) -> dict[str, Any]:
    """Rank 0, after every rank is done: list all shards and mark the manifest complete.

    `expected` maps rank to its number of shard ranges; a rank short of shards is an error, never a
    silently smaller cache.
    """
    if world > 1:
        shards: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        for rank in range(world):
            path = progress_path(ddir, rank)
            try:
                prog = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise UserError(
                    f"{path} is missing or unreadable; rerun the same command to resume"
                ) from None
            shards.extend(sorted(prog["shards"], key=lambda e: int(e["number"])))
            skipped.extend(prog["skipped"])
        manifest["shards"], manifest["skipped"] = shards, skipped
    for rank, n in expected.items():
        got = {int(e["number"]) for e in manifest["shards"] if int(e.get("rank", 0)) == rank}
        if got != set(range(n)):
            raise UserError(
                f"rank {rank} finished {len(got)} of {n} shards in {ddir}; rerun the same command to resume"
            )
    manifest["skipped"].sort(key=lambda s: int(s["index"]))
    manifest["rows"] = sum(int(e["rows"]) for e in manifest["shards"])
    manifest["complete"] = True
    write_manifest(ddir, manifest)
    if world > 1:
        for rank in range(world):
            progress_path(ddir, rank).unlink(missing_ok=True)
    return manifest
