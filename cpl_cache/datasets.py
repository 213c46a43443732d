"""The DomainNet reader: split lists, label order, the seeded hold/test split, and image decoding.

DomainNet on disk is `R/{domain}/{class}/{file}` plus the lists `R/{domain}_train.txt` and
`R/{domain}_test.txt`, one `{domain}/{class}/{file} {label}` per line. The lists are the authority
on labels; class names in label order come from them, not from sorting folder names.

Splits: `train` is the train list; the test list is divided, stratified by class with a seeded
generator, into `hold` (ground truth for the weak model) and `test`. The assignment is a pure
function of (the listed paths and labels, the fraction, the seed), so train-weak, extract and
train agree on it without talking to each other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpl_cache.cache import SPLIT_CODES
from cpl_cache.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

__all__ = [
    "DATASETS",
    "DOMAINS",
    "SPLIT_CODES",
    "ImageList",
    "check_files",
    "load_dataset",
    "load_domainnet",
    "load_rgb",
    "prompt_for",
    "stratified_split",
]


@dataclass(frozen=True, eq=False)
class ImageList:
    """One domain's images: paths relative to `root`, labels, and the split code of every row.

    Rows are the train list, then the test list, in list order; a row's position is its `index`
    in the cache.
    """

    dataset: str
    domain: str
    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray  # int64
    split: np.ndarray  # uint8 codes, see SPLIT_CODES
    hold_frac: float
    split_seed: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def rows(self, split: str) -> np.ndarray:
        """Row indices (int64) of one split: train, hold or test."""
        if split not in SPLIT_CODES:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLIT_CODES)}")
        return np.flatnonzero(self.split == SPLIT_CODES[split]).astype(np.int64)

    def hold_hash(self) -> str:
        """sha256 hex of the sorted hold paths: identifies the images a weak model may train on."""
        hold = sorted(self.paths[i] for i in self.rows("hold"))
        return hashlib.sha256("\n".join(hold).encode("utf-8")).hexdigest()

    def split_record(self) -> dict:
        """What train-weak stores and extract compares: the split's identity."""
        return {
            "dataset": self.dataset,
            "domain": self.domain,
            "hold_frac": float(self.hold_frac),
            "split_seed": int(self.split_seed),
            "hold_hash": self.hold_hash(),
            "num_hold": int(np.count_nonzero(self.split == SPLIT_CODES["hold"])),
            "classes": list(self.classes),
        }


def stratified_split(labels: np.ndarray, hold_frac: float, seed: int) -> np.ndarray:
    """Bool mask "is hold": within each class a seeded share `hold_frac` of the rows, rest test.

    Each class draws from its own generator `default_rng([seed, class])`, so one class's count never
    moves another class's assignment. The fractional part of `hold_frac * n` is rounded up or down
    at random (with that probability), so odd class sizes do not bias the totals toward one side.
    """
    if not 0.0 <= hold_frac <= 1.0:
        raise UserError(f"--hold-frac must be between 0 and 1, got {hold_frac}")
    if seed < 0:
        raise UserError(f"--split-seed must be a non-negative integer, got {seed}")
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng([int(seed), int(c)])
        exact = hold_frac * len(idx)
        n_hold = int(np.floor(exact))
        if rng.random() < exact - n_hold:
            n_hold += 1
        mask[idx[rng.permutation(len(idx))[:n_hold]]] = True
    return mask


def _read_list(path: Path, domain: str) -> tuple[list[str], list[int], list[str]]:
    """Parse one split list into paths, labels and the `file:line` of each row (for messages)."""
    paths: list[str] = []
    labels: list[int] = []
    where: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            loc = f"{path}:{lineno}"
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{loc}: expected '{domain}/CLASS/FILE LABEL', got {line[:80]!r}")
            rel, label = parts[0].replace("\\", "/"), int(parts[1])
            if label < 0:
                raise UserError(f"{loc}: negative label {label}; labels run from 0 to K-1")
            segs = rel.split("/")
            if len(segs) < 3 or segs[0] != domain or ".." in segs:
                raise UserError(f"{loc}: path {rel!r} is not of the form '{domain}/CLASS/FILE'")
            paths.append(rel)
            labels.append(label)
            where.append(loc)
    return paths, labels, where


def _class_names(paths: list[str], labels: list[int], where: list[str]) -> tuple[str, ...]:
    """Class folder names in label order; each label must name one folder and each folder one label."""
    by_label: dict[int, tuple[str, str]] = {}
    by_folder: dict[str, tuple[int, str]] = {}
    for rel, label, loc in zip(paths, labels, where, strict=True):
        folder = rel.split("/")[1]
        seen = by_label.setdefault(label, (folder, loc))
        if seen[0] != folder:
            raise UserError(
                f"{loc}: label {label} names folder {folder!r}, but {seen[1]} gave it to {seen[0]!r}; "
                "each label must name one class folder (fix the list)"
            )
        other = by_folder.setdefault(folder, (label, loc))
        if other[0] != label:
            raise UserError(
                f"{loc}: folder {folder!r} has label {label}, but {other[1]} gave it label {other[0]}; "
                "each class folder must have one label (fix the list)"
            )
    if not by_label:
        raise UserError(f"the split lists ({where and where[0]}) name no images")
    k = max(by_label) + 1
    missing = [c for c in range(k) if c not in by_label]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"labels run to {k - 1} but {len(missing)} label(s) appear in no list ({shown}); "
            "the class name of a label comes from the lists, so every label 0..K-1 must appear"
        )
    return tuple(by_label[c][0] for c in range(k))


def load_domainnet(root: Path, domain: str, *, hold_frac: float = 0.5, split_seed: int = 0) -> ImageList:
    """Read one DomainNet domain's lists and assign each row to train, hold or test."""
    root = Path(root)
    if domain not in DOMAINS:
        raise UserError(f"unknown DomainNet domain {domain!r}; use one of {', '.join(DOMAINS)}")
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist; --data-root must be the DomainNet folder that holds "
            f"{domain}/ and {domain}_train.txt, {domain}_test.txt"
        )
    lists = {}
    for part in ("train", "test"):
        path = root / f"{domain}_{part}.txt"
        if not path.is_file():
            raise UserError(
                f"{path} not found; --data-root must hold DomainNet's lists ({domain}_{part}.txt)"
            )
        lists[part] = _read_list(path, domain)

    tr_paths, tr_labels, tr_where = lists["train"]
    te_paths, te_labels, te_where = lists["test"]
    paths = tr_paths + te_paths
    classes = _class_names(paths, tr_labels + te_labels, tr_where + te_where)
    labels = np.asarray(tr_labels + te_labels, dtype=np.int64)

    # Split the test list in a canonical (path-sorted) order, so reordering the list moves nothing.
    te_lab = np.asarray(te_labels, dtype=np.int64)
    order = np.argsort(np.asarray(te_paths, dtype=object), kind="stable") if te_paths else np.zeros(0, int)
    hold = np.zeros(len(te_paths), dtype=bool)
    hold[order] = stratified_split(te_lab[order], hold_frac, split_seed)
    split = np.concatenate(
        [
            np.full(len(tr_paths), SPLIT_CODES["train"], dtype=np.uint8),
            np.where(hold, SPLIT_CODES["hold"], SPLIT_CODES["test"]).astype(np.uint8),
        ]
    )
    return ImageList(
        dataset="domainnet",
        domain=domain,
        root=root,
        classes=classes,
        paths=tuple(paths),
        labels=labels,
        split=split,
        hold_frac=float(hold_frac),
        split_seed=int(split_seed),
    )


def check_files(images: ImageList, limit: int = 5, *, rows: np.ndarray | None = None) -> None:
    """Raise a UserError with the count and the first few paths if any listed image is missing.

    `rows` restricts the check to some rows (train-weak needs only hold and test). Lists each class
    folder once instead of calling stat per image (586k stats are slow on network disks).
    """
    paths = images.paths if rows is None else [images.paths[i] for i in rows]
    listing: dict[str, set[str] | None] = {}
    missing: list[str] = []
    for rel in paths:
        folder, _, name = rel.rpartition("/")
        if folder not in listing:
            try:
                listing[folder] = set(os.listdir(images.root / folder))
            except (FileNotFoundError, NotADirectoryError):
                listing[folder] = None
        names = listing[folder]
        if names is None or name not in names:
            missing.append(rel)
    if missing:
        shown = ", ".join(missing[:limit]) + (", ..." if len(missing) > limit else "")
        raise UserError(
            f"{len(missing)} of {len(paths)} images listed for {images.domain} are missing under "
            f"{images.root} ({shown}); restore them or drop those lines from the lists"
        )


def prompt_for(class_name: str) -> str:
    """The default CLIP prompt of a class folder name; underscores read as spaces."""
    return f"a photo of a {class_name.replace('_', ' ')}."


def load_rgb(path: Path | str) -> Image.Image:
    """Decode an image to RGB: EXIF rotation applied, transparency composited on white, CMYK converted.

    Raises OSError (PIL.UnidentifiedImageError included) on a file that is not a readable image.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("L", "RGB") and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


DATASETS: dict[str, Callable[..., ImageList]] = {"domainnet": load_domainnet}


def load_dataset(
    name: str, root: Path, domain: str, *, hold_frac: float = 0.5, split_seed: int = 0
) -> ImageList:
    """Read a registered dataset layout by name."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; use one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](Path(root), domain, hold_frac=hold_frac, split_seed=split_seed)
