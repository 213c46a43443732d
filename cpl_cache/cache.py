"""The feature cache, schema 1: shard writer, manifest, reader into tensors, and the checks.

Layout (see DESIGN.md): `C/{domain}/manifest.json`, `C/{domain}/shard-00000.h5`, ...,
`C/{domain}/text.h5`. A shard is written under a temporary name and renamed when complete; the
manifest is replaced atomically and lists only complete shards, so a crash never leaves a
half-written shard that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.errors import UserError

SCHEMA_VERSION = 1
SPLIT_CODES = {"train": 0, "hold": 1, "test": 2}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}
MANIFEST = "manifest.json"
TEXT_FILE = "text.h5"
ROW_FIELDS = ("image_embeds", "weak_logits", "labels", "split", "index", "paths")
ROW_DTYPES = {
    "image_embeds": np.float16,
    "weak_logits": np.float32,
    "labels": np.int16,
    "split": np.uint8,
    "index": np.int64,
}


def domain_dir(cache_dir: Path | str, domain: str) -> Path:
    return Path(cache_dir) / domain


def shard_name(number: int, prefix: str = "shard") -> str:
    return f"{prefix}-{number:05d}.h5"


# ------------------------------------------------------------------------------------ manifest


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(ddir: Path, manifest: dict[str, Any]) -> None:
    ddir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ddir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def new_manifest(
    *,
    domain: str,
    classes: list[str],
    dim: int,
    strong: dict[str, Any],
    weak: dict[str, Any],
    split: dict[str, Any],
    counts: dict[str, int],
    dataset: str = "domainnet",
    preprocessing: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A manifest with no shards yet (`complete` false until the writer of the last shard says so)."""
    return {
        "schema": SCHEMA_VERSION,
        "dataset": dataset,
        "domain": domain,
        "classes": list(classes),
        "num_classes": len(classes),
        "dim": int(dim),
        "strong": strong,
        "weak": weak,
        "preprocessing": preprocessing or {},
        "split": split,
        "counts": {k: int(counts.get(k, 0)) for k in SPLIT_CODES},
        "shards": [],
        "skipped": [],
        "complete": False,
        **extra,
    }


def read_manifest(
    cache_dir: Path | str,
    domain: str,
    *,
    num_classes: int | None = None,
    dim: int | None = None,
    require_complete: bool = True,
) -> dict[str, Any]:
    """Read and check a domain's manifest against what the caller asks for."""
    ddir = domain_dir(cache_dir, domain)
    path = ddir / MANIFEST
    if not Path(cache_dir).is_dir():
        raise UserError(f"cache folder {cache_dir} does not exist; pass the --cache-dir that extract wrote")
    if not path.is_file():
        raise UserError(
            f"no cached domain {domain!r} under {cache_dir} ({path} is missing); "
            f"run `cpl-cache extract --domain {domain} --cache-dir {cache_dir}` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable manifest ({err}); re-extract with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema {manifest.get('schema') if isinstance(manifest, dict) else '?'}, "
            f"this cpl-cache reads schema {SCHEMA_VERSION}; re-extract with --overwrite"
        )
    if manifest.get("domain") != domain:
        raise UserError(
            f"{ddir} holds domain {manifest.get('domain')!r}, not {domain!r}; "
            f"point --cache-dir at the cache root whose {domain}/ folder extract wrote"
        )
    if num_classes is not None and manifest.get("num_classes") != num_classes:
        raise UserError(
            f"{ddir} has {manifest.get('num_classes')} classes, expected {num_classes}; "
            "use a cache extracted for this class list"
        )
    if dim is not None and manifest.get("dim") != dim:
        raise UserError(
            f"{ddir} has {manifest.get('dim')}-d embeddings, expected {dim}; "
            "use a cache extracted with the same CLIP model"
        )
    if require_complete and not manifest.get("complete", False):
        raise UserError(
            f"{ddir} is an unfinished extraction ({len(manifest.get('shards', []))} shard(s) so far); "
            "rerun the same `cpl-cache extract` command to resume it"
        )
    return manifest


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What results record about the cache they came from, with a fingerprint to compare quickly."""
    keys = ("dataset", "domain", "strong", "weak", "num_classes", "dim", "split", "counts")
    ident = {k: manifest.get(k) for k in keys}
    blob = json.dumps(ident, sort_keys=True).encode()
    ident["fingerprint"] = hashlib.sha1(blob).hexdigest()[:16]
    return ident


# ------------------------------------------------------------------------------------ writing


def write_shard(path: Path, rows: dict[str, Any]) -> int:
    """Write one complete shard under a temporary name, then rename it into place."""
    import h5py

    n = len(rows["index"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        for key, dtype in ROW_DTYPES.items():
            arr = np.ascontiguousarray(rows[key], dtype=dtype)
            if arr.shape[0] != n:
                raise ValueError(f"{key} has {arr.shape[0]} rows, index has {n}")
            f.create_dataset(key, data=arr)
        f.create_dataset("paths", data=list(rows["paths"]), dtype=h5py.string_dtype("utf-8"))
        f.attrs["schema"] = SCHEMA_VERSION
        f.attrs["rows"] = n
    _fsync(tmp)  # on disk before it is renamed and listed: a power cut never lists an empty shard
    os.replace(tmp, path)
    return n


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ShardWriter:
    """Buffers rows and writes a shard each time `shard_size` rows are in.

    `on_shard(entry)` is called after each shard is on disk under its final name, with
    `{"file": name, "rows": n}`; the caller lists it in the manifest (or a rank's progress file).
    """

    ddir: Path
    dim: int
    num_classes: int
    shard_size: int = 10_000
    prefix: str = "shard"
    next_shard: int = 0
    on_shard: Callable[[dict[str, Any]], None] | None = None
    _buf: dict[str, list] = field(default_factory=lambda: {k: [] for k in ROW_FIELDS})
    _buffered: int = 0

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        self.ddir = Path(self.ddir)
        self.ddir.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        *,
        image_embeds: np.ndarray,
        weak_logits: np.ndarray,
        labels: np.ndarray,
        split: np.ndarray,
        index: np.ndarray,
        paths: list[str],
    ) -> None:
        n = len(index)
        if image_embeds.shape != (n, self.dim) or weak_logits.shape != (n, self.num_classes):
            raise ValueError(
                f"batch shapes {image_embeds.shape}, {weak_logits.shape} do not match "
                f"({n}, {self.dim}) and ({n}, {self.num_classes})"
            )
        batch = dict(
            image_embeds=image_embeds,
            weak_logits=weak_logits,
            labels=labels,
            split=split,
            index=index,
            paths=list(paths),
        )
        start = 0
        while start < n:
            take = min(n - start, self.shard_size - self._buffered)
            for k in ROW_FIELDS:
                self._buf[k].append(batch[k][start : start + take])
            self._buffered += take
            start += take
            if self._buffered == self.shard_size:
                self.flush()

    def flush(self) -> dict[str, Any] | None:
        """Write what is buffered as a shard (a short last shard at the end of a run)."""
        if self._buffered == 0:
            return None
        rows = {k: np.concatenate(self._buf[k]) for k in ROW_FIELDS if k != "paths"}
        rows["paths"] = [p for chunk in self._buf["paths"] for p in chunk]
        name = shard_name(self.next_shard, self.prefix)
        n = write_shard(self.ddir / name, rows)
        self.next_shard += 1
        self._buf = {k: [] for k in ROW_FIELDS}
        self._buffered = 0
        entry = {"file": name, "rows": n}
        if self.on_shard is not None:
            self.on_shard(entry)
        return entry


def write_text(
    ddir: Path,
    text_embeds: np.ndarray,
    prompts: list[str],
    logit_scale: float,
    token_ids: np.ndarray | None = None,
    prefix_len: int | None = None,
) -> None:
    """Write `text.h5`: L2-normalised text embeddings of the class prompts and the logit scale;
    optionally the prompts' token ids and `prefix_len`, how many tokens after the start token the
    context phrase ("a photo of a") spans (what the prompt head replaces)."""
    import h5py

    ddir.mkdir(parents=True, exist_ok=True)
    path = ddir / TEXT_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("text_embeds", data=np.asarray(text_embeds, dtype=np.float32))
        f.create_dataset("prompts", data=list(prompts), dtype=h5py.string_dtype("utf-8"))
        if token_ids is not None:
            f.create_dataset("token_ids", data=np.asarray(token_ids, dtype=np.int64))
        f.attrs["logit_scale"] = float(logit_scale)
        if prefix_len is not None:
            f.attrs["prefix_len"] = int(prefix_len)
    _fsync(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ reading


@dataclass
class CachedDomain:
    """One domain's rows as tensors (sorted by `index`), its text prototypes and its manifest."""

    manifest: dict[str, Any]
    image_embeds: Any  # torch.Tensor (N, D) float16
    weak_logits: Any  # torch.Tensor (N, K) float32
    labels: Any  # torch.Tensor (N,) int64
    split: Any  # torch.Tensor (N,) uint8
    index: Any  # torch.Tensor (N,) int64
    text_embeds: Any | None  # torch.Tensor (K, D) float32
    logit_scale: float | None
    token_ids: Any | None = None  # torch.Tensor (K, L) int64, when extract stored them
    prefix_len: int | None = None  # tokens of the context phrase after the start token, with token_ids
    paths: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def rows(self, split: str) -> Any:
        """Row numbers (a LongTensor) of one split: train, hold or test."""
        import torch

        return torch.nonzero(self.split == SPLIT_CODES[split], as_tuple=False).flatten()

    def identity(self) -> dict[str, Any]:
        return manifest_identity(self.manifest)


def _open_shard(path: Path):
    import h5py

    if not path.is_file():
        raise UserError(
            f"shard {path} is listed in the manifest but missing; "
            "rerun extract with --overwrite to rebuild this domain"
        )
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(
            f"shard {path} is unreadable ({str(err).splitlines()[0]}; truncated?); "
            "rerun extract with --overwrite to rebuild this domain"
        ) from None


def _read_rows(path: Path, ds, out: np.ndarray) -> None:
    """Read a whole dataset into `out`: raw bytes for contiguous data (as fast as a flat file)."""
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    if offset is None or out.size == 0:
        ds.read_direct(out)
        return
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < out.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise OSError(f"unexpected end of file reading {ds.name}")
            got += n


def load_domain(
    cache_dir: Path | str,
    domain: str,
    *,
    num_classes: int | None = None,
    dim: int | None = None,
    with_paths: bool = False,
    with_text: bool = True,
) -> CachedDomain:
    """Load every listed shard of a domain into tensors with whole-dataset reads (never row by row)."""
    import h5py
    import torch

    manifest = read_manifest(cache_dir, domain, num_classes=num_classes, dim=dim)
    ddir = domain_dir(cache_dir, domain)
    K, D = int(manifest["num_classes"]), int(manifest["dim"])
    shards = manifest.get("shards", [])
    total = sum(int(s["rows"]) for s in shards)
    out = {
        "image_embeds": np.empty((total, D), np.float16),
        "weak_logits": np.empty((total, K), np.float32),
        "labels": np.empty(total, np.int16),
        "split": np.empty(total, np.uint8),
        "index": np.empty(total, np.int64),
    }
    paths: list[str] = []
    start = 0
    for entry in shards:
        path = ddir / entry["file"]
        n = int(entry["rows"])
        with _open_shard(path) as f:
            for key, arr in out.items():
                try:
                    ds = f[key]
                    if ds.shape[0] != n or ds.shape[1:] != arr.shape[1:] or ds.dtype != arr.dtype:
                        raise UserError(
                            f"shard {path}: {key} is {ds.shape} {ds.dtype}, the manifest says "
                            f"({n}, ...) {arr.dtype}; rerun extract with --overwrite"
                        )
                    _read_rows(path, ds, arr[start : start + n])
                except (OSError, KeyError) as err:
                    raise UserError(
                        f"shard {path} is damaged ({key}: {str(err).splitlines()[0]}); "
                        "rerun extract with --overwrite"
                    ) from None
            if with_paths:
                paths.extend(f["paths"].asstr()[:].tolist())
        start += n

    # Rows of several ranks may interleave; order by index so every consumer sees one order.
    if total and np.any(np.diff(out["index"]) < 0):
        order = np.argsort(out["index"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
        if with_paths:
            paths = [paths[i] for i in order]

    text_embeds = token_ids = prefix_len = None
    logit_scale = None
    tpath = ddir / TEXT_FILE
    if with_text and tpath.is_file():
        try:
            with h5py.File(tpath, "r") as f:
                text_embeds = torch.from_numpy(f["text_embeds"][:])
                logit_scale = float(f.attrs["logit_scale"])
                if "token_ids" in f:
                    token_ids = torch.from_numpy(f["token_ids"][:])
                    if "prefix_len" in f.attrs:
                        prefix_len = int(f.attrs["prefix_len"])
        except (OSError, KeyError) as err:
            raise UserError(f"{tpath} is damaged ({err}); rerun extract with --overwrite") from None
        if tuple(text_embeds.shape) != (K, D):
            raise UserError(f"{tpath} holds {tuple(text_embeds.shape)} text embeddings, expected ({K}, {D})")

    return CachedDomain(
        manifest=manifest,
        image_embeds=torch.from_numpy(out["image_embeds"]),
        weak_logits=torch.from_numpy(out["weak_logits"]),
        labels=torch.from_numpy(out["labels"].astype(np.int64)),
        split=torch.from_numpy(out["split"]),
        index=torch.from_numpy(out["index"]),
        text_embeds=text_embeds,
        logit_scale=logit_scale,
        token_ids=token_ids,
        prefix_len=prefix_len,
        paths=paths if with_paths else None,
    )


# ------------------------------------------------------------------------------------ info


def _size_on_disk(ddir: Path) -> int:
    return sum(p.stat().st_size for p in ddir.iterdir() if p.is_file())


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def describe(cache_dir: Path | str, domain: str | None = None) -> str:
    """Models, counts per split, dimensions and size on disk, checking every shard opens."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"cache folder {cache_dir} does not exist; pass the --cache-dir that extract wrote")
    if domain is not None:
        domains = [domain]
    else:
        domains = sorted(p.name for p in cache_dir.iterdir() if (p / MANIFEST).is_file())
        if not domains:
            raise UserError(f"no cached domains under {cache_dir}; run `cpl-cache extract` first")
    lines = []
    for name in domains:
        m = read_manifest(cache_dir, name, require_complete=False)
        ddir = domain_dir(cache_dir, name)
        split_rows = dict.fromkeys(SPLIT_CODES, 0)
        for entry in m["shards"]:
            with _open_shard(ddir / entry["file"]) as f:
                if f["index"].shape[0] != int(entry["rows"]):
                    raise UserError(
                        f"shard {ddir / entry['file']} has {f['index'].shape[0]} rows, the manifest says "
                        f"{entry['rows']}; rerun extract with --overwrite"
                    )
                codes = np.bincount(f["split"][:], minlength=3)
                for code, cnt in enumerate(codes[:3]):
                    split_rows[SPLIT_NAMES[code]] += int(cnt)
        state = "complete" if m.get("complete") else "INCOMPLETE (rerun extract to resume)"
        counts = ", ".join(f"{k} {v}" for k, v in split_rows.items())
        lines.append(
            f"{name}: {state}; {counts}; D={m['dim']} K={m['num_classes']}; "
            f"{len(m['shards'])} shard(s), {_human(_size_on_disk(ddir))}\n"
            f"  strong {m['strong'].get('id')} ({m['strong'].get('revision') or '-'}), "
            f"weak {m['weak'].get('id')} ({m['weak'].get('revision') or '-'}); "
            f"skipped {len(m.get('skipped', []))}"
        )
    return "\n".join(lines)
