"""The feature cache, schema 1: shard writer, manifest, reader into tensors, and the checks.

Layout (docs/design.md): `C/{domain}/manifest.json`, `C/{domain}/shard-00000.h5`, ...,
`C/{domain}/text.h5`. A shard is written under a temporary name and renamed when complete; the
manifest is replaced atomically and lists only complete shards, so a crash never leaves a
half-written shard that looks valid. Each shard carries its domain, its row range and a random id,
which the manifest records too: the reader refuses a shard that is not the one listed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import uuid
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

# The manifest's schema: each key a reader relies on and its JSON type, checked in one place
# (`parse_manifest`), so a damaged manifest is one line, never a traceback further on.
MANIFEST_FIELDS: dict[str, type] = {
    "schema": int,
    "dataset": str,
    "domain": str,
    "classes": list,
    "num_classes": int,
    "dim": int,
    "strong": dict,
    "weak": dict,
    "preprocessing": dict,
    "split": dict,
    "counts": dict,
    "shards": list,
    "skipped": list,
    "complete": bool,
}
MANIFEST_OPTIONAL: dict[str, type] = {"rows": int, "layout": dict}
SHARD_FIELDS: dict[str, type] = {"file": str, "rows": int, "id": str, "range": list}
SKIPPED_FIELDS: dict[str, type] = {"path": str, "index": int}


def domain_dir(cache_dir: Path | str, domain: str) -> Path:
    return Path(cache_dir) / domain


def shard_name(number: int, prefix: str = "shard") -> str:
    return f"{prefix}-{number:05d}.h5"


# ------------------------------------------------------------------------------------ manifest


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(path: Path, err: OSError) -> UserError:
    """The one line for a file that could not be written: the path, the reason and the fix."""
    why = err.strerror or str(err) or type(err).__name__
    if err.errno in _DISK_FULL:
        fix = "free space on that disk (or use another folder) and rerun the same command"
    elif err.errno in _NOT_WRITABLE:
        fix = "its folder is not writable; make it writable or pass another folder"
    else:
        fix = "check that disk and rerun the same command"
    return UserError(f"cannot write {path} ({why}); {fix}")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a mix.

    On any failure the temporary file is removed; a failing disk (full, read-only, denied) raises
    a UserError naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it is renamed and listed
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


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


_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def _damaged(where: str, what: str) -> UserError:
    return UserError(f"{where} {what}; the manifest is damaged: re-extract with --overwrite")


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _check_fields(
    where: str, obj: Any, fields: dict[str, type], optional: dict[str, type] | None = None
) -> None:
    """`obj` is a JSON object with each key of `fields` of its type (and of `optional`, where present)."""
    if not isinstance(obj, dict):
        raise _damaged(where, f"is {json.dumps(obj)[:40]}, expected an object")
    for key, kind in (fields | (optional or {})).items():
        if key not in obj:
            if key in fields:
                raise _damaged(where, f"lacks {key!r}")
        elif not _is(obj[key], kind):
            raise _damaged(where, f"has {key!r} {json.dumps(obj[key])[:40]}, expected {_TYPE_NAMES[kind]}")


def _is_plain_name(name: str) -> bool:
    """A file name of the domain's own folder: no folder part, nothing absolute, no `..`."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and Path(name).name == name


def _check_shard_entries(path: Path, shards: list[Any]) -> None:
    """Each listed shard: its fields, a file name inside the domain's folder, a row range that holds
    its rows; no two shards (nor one shard listed twice) claim the same rows."""
    spans = []
    for i, entry in enumerate(shards):
        where = f"{path}: shard entry {i}"
        if isinstance(entry, dict) and "id" not in entry and "file" in entry:
            raise UserError(
                f"{path} lists shards without their identity (written by an older cpl-cache); "
                "re-extract with --overwrite"
            )
        _check_fields(where, entry, SHARD_FIELDS)
        name, rows, span = entry["file"], entry["rows"], entry["range"]
        if not _is_plain_name(name):
            raise _damaged(where, f"has file {name!r}, which is not a file name inside {path.parent}")
        if len(span) != 2 or not all(_is(v, int) for v in span) or not 0 <= span[0] <= span[1]:
            raise _damaged(where, f"has range {json.dumps(span)[:40]}, expected [start, stop] row numbers")
        if not 0 <= rows <= span[1] - span[0]:
            raise _damaged(where, f"has {rows} rows in the range {span}")
        spans.append((span[0], span[1], name))
    spans.sort()
    for (_, stop, a), (start, _, b) in zip(spans[:-1], spans[1:], strict=True):
        if start < stop:
            raise _damaged(f"{path}:", f"shards {a} and {b} both claim row {start}")


def parse_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest and check it against the schema (`MANIFEST_FIELDS`): a UserError, never a traceback."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable manifest ({err}); re-extract with --overwrite") from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else "?"
    if not _is(schema, int) or schema != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema {json.dumps(schema)[:40]}, this cpl-cache reads schema {SCHEMA_VERSION}; "
            "re-extract with --overwrite"
        )
    _check_fields(str(path), manifest, MANIFEST_FIELDS, MANIFEST_OPTIONAL)
    classes = manifest["classes"]
    if not all(isinstance(c, str) for c in classes) or manifest["num_classes"] != len(classes):
        raise _damaged(str(path), f"has num_classes {manifest['num_classes']} and {len(classes)} class names")
    if manifest["dim"] < 1:
        raise _damaged(str(path), f"has dim {manifest['dim']}")
    if not all(_is(v, int) for v in manifest["counts"].values()):
        raise _damaged(str(path), "has counts that are not integers")
    _check_shard_entries(path, manifest["shards"])
    for i, skipped in enumerate(manifest["skipped"]):
        _check_fields(f"{path}: skipped entry {i}", skipped, SKIPPED_FIELDS)
    return manifest


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
    manifest = parse_manifest(path)
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
    if require_complete and not manifest["complete"]:
        raise UserError(
            f"{ddir} is an unfinished extraction ({len(manifest['shards'])} shard(s) so far); "
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


@contextlib.contextmanager
def _h5_image(path: Path) -> Any:
    """An HDF5 file built in memory and written to `path` atomically on leaving the block.

    HDF5 never touches the disk itself: a full or failing disk is a plain OSError of one write
    (`atomic_write_bytes`), never an HDF5 file left open that fails again when it is collected.
    """
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        yield f
    atomic_write_bytes(path, buf.getbuffer())


def write_shard(
    path: Path, rows: dict[str, Any], *, domain: str, row_range: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Write one complete shard under a temporary name, then rename it into place; returns its
    manifest entry: file, rows, a new random id and the row range [start, stop) of the image list it
    covers (default: its smallest index to its largest + 1), all also stored in the shard."""
    import h5py

    n = len(rows["index"])
    index = np.asarray(rows["index"], dtype=np.int64)
    if row_range is None:
        row_range = (int(index.min()), int(index.max()) + 1) if n else (0, 0)
    entry = {"file": path.name, "rows": n, "id": uuid.uuid4().hex, "range": [int(v) for v in row_range]}
    with _h5_image(path) as f:
        for key, dtype in ROW_DTYPES.items():
            arr = np.ascontiguousarray(rows[key], dtype=dtype)
            if arr.shape[0] != n:
                raise ValueError(f"{key} has {arr.shape[0]} rows, index has {n}")
            f.create_dataset(key, data=arr)
        f.create_dataset("paths", data=list(rows["paths"]), dtype=h5py.string_dtype("utf-8"))
        f.attrs["schema"] = SCHEMA_VERSION
        f.attrs["rows"] = n
        f.attrs["domain"] = domain
        f.attrs["id"] = entry["id"]
        f.attrs["range"] = np.asarray(entry["range"], dtype=np.int64)
    return entry


@dataclass
class ShardWriter:
    """Buffers rows and writes a shard each time `shard_size` rows are in.

    `on_shard(entry)` is called after each shard is on disk under its final name, with the entry
    `write_shard` returns; the caller lists it in the manifest. The domain is the folder's name.
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
        entry = write_shard(self.ddir / name, rows, domain=self.ddir.name)
        self.next_shard += 1
        self._buf = {k: [] for k in ROW_FIELDS}
        self._buffered = 0
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
    with _h5_image(ddir / TEXT_FILE) as f:
        f.create_dataset("text_embeds", data=np.asarray(text_embeds, dtype=np.float32))
        f.create_dataset("prompts", data=list(prompts), dtype=h5py.string_dtype("utf-8"))
        if token_ids is not None:
            f.create_dataset("token_ids", data=np.asarray(token_ids, dtype=np.int64))
        f.attrs["logit_scale"] = float(logit_scale)
        if prefix_len is not None:
            f.attrs["prefix_len"] = int(prefix_len)


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


def _check_shard(path: Path, f: Any, entry: dict[str, Any], domain: str) -> None:
    """The open shard is the one the manifest lists: its domain, its id, its row range and count."""
    fix = "restore the shard extract wrote there, or rerun extract with --overwrite"
    attrs = f.attrs
    if "id" not in attrs or "domain" not in attrs or "range" not in attrs:
        raise UserError(
            f"shard {path} carries no identity (written by an older cpl-cache, or not by extract); "
            "rerun extract with --overwrite"
        )
    if str(attrs["domain"]) != domain:
        raise UserError(
            f"shard {path} holds rows of domain {str(attrs['domain'])!r}, not {domain!r} "
            f"(copied from another cache?); {fix}"
        )
    if str(attrs["id"]) != entry["id"]:
        raise UserError(
            f"shard {path} is not the shard the manifest lists (its id differs: replaced or copied "
            f"from another cache?); {fix}"
        )
    if [int(v) for v in np.ravel(attrs["range"])] != entry["range"] or int(attrs["rows"]) != entry["rows"]:
        raise UserError(
            f"shard {path} covers rows {np.ravel(attrs['range']).tolist()} ({int(attrs['rows'])}), the "
            f"manifest says {entry['range']} ({entry['rows']}); {fix}"
        )


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
            _check_shard(path, f, entry, domain)
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
        index = out["index"][start : start + n]
        if n and not (entry["range"][0] <= index.min() and index.max() < entry["range"][1]):
            raise UserError(
                f"shard {path} holds rows outside its range {entry['range']}; rerun extract with --overwrite"
            )
        _check_rows(path, out["split"][start : start + n], out["image_embeds"][start : start + n])
        start += n
    _check_counts(ddir, manifest, out["split"])

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


def _check_rows(path: Path, split: np.ndarray, embeds: np.ndarray) -> None:
    """Refuse split codes other than 0, 1, 2 (rows that no split would ever read) and image embeddings
    that are NaN, infinite or all zero (rows that would be scored as predictions), naming the shard."""
    bad = split > max(SPLIT_CODES.values())
    if bad.any():
        raise UserError(
            f"shard {path} has {int(bad.sum())} row(s) of split {sorted(set(split[bad].tolist()))}, not 0 "
            "(train), 1 (hold) or 2 (test); the cache is damaged: rerun extract with --overwrite"
        )
    broken = ~np.isfinite(embeds).all(axis=1) | ~(embeds != 0).any(axis=1)
    if broken.any():
        where = ", ".join(
            f"{name} {int((broken & (split == code)).sum())}" for name, code in SPLIT_CODES.items()
            if (broken & (split == code)).any()
        )  # fmt: skip
        raise UserError(
            f"shard {path} has {int(broken.sum())} image embedding(s) that are NaN, infinite or all zero "
            f"({where}); the cache is damaged: rerun extract with --overwrite"
        )


def _check_counts(ddir: Path, manifest: dict[str, Any], split: np.ndarray) -> None:
    """The rows per split the shards hold against the manifest's counts (less the images it skipped)."""
    if not manifest.get("complete"):
        return
    have = {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}
    want = {name: int(manifest["counts"].get(name, 0)) for name in SPLIT_CODES}
    skipped = len(manifest.get("skipped", []))
    exact = skipped == 0 and have != want
    short = sum(want.values()) - skipped != sum(have.values()) or any(have[k] > want[k] for k in want)
    if exact or short:
        raise UserError(
            f"{ddir / MANIFEST} counts {want} rows per split (less {skipped} skipped) but the shards hold "
            f"{have}; the cache is damaged: rerun extract with --overwrite"
        )


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
        splits: list[np.ndarray] = []
        for entry in m["shards"]:
            with _open_shard(ddir / entry["file"]) as f:
                _check_shard(ddir / entry["file"], f, entry, name)
                if f["index"].shape[0] != int(entry["rows"]):
                    raise UserError(
                        f"shard {ddir / entry['file']} has {f['index'].shape[0]} rows, the manifest says "
                        f"{entry['rows']}; rerun extract with --overwrite"
                    )
                split = f["split"][:]
                _check_rows(ddir / entry["file"], split, f["image_embeds"][:])
                splits.append(split)
                codes = np.bincount(split, minlength=3)
                for code, cnt in enumerate(codes[:3]):
                    split_rows[SPLIT_NAMES[code]] += int(cnt)
        _check_counts(ddir, m, np.concatenate(splits) if splits else np.empty(0, np.uint8))
        state = "complete" if m.get("complete") else "INCOMPLETE (rerun extract to resume)"
        if m.get("complete") and not (ddir / TEXT_FILE).is_file():
            state = (
                f"complete but {TEXT_FILE} is missing (zero-shot and the proto and prompt heads need it: "
                "rerun extract with --overwrite)"
            )
        counts = ", ".join(f"{k} {v}" for k, v in split_rows.items())
        lines.append(
            f"{name}: {state}; {counts}; D={m['dim']} K={m['num_classes']}; "
            f"{len(m['shards'])} shard(s), {_human(_size_on_disk(ddir))}\n"
            f"  strong {m['strong'].get('id')} ({m['strong'].get('revision') or '-'}), "
            f"weak {m['weak'].get('id')} ({m['weak'].get('revision') or '-'}); "
            f"skipped {len(m.get('skipped', []))}"
        )
    return "\n".join(lines)
