"""DomainNet-style split lists: the ImageList every layout reads into, the seeded stratified splits,
and the lists that rule labels and class order."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpl_cache.cache import SPLIT_CODES
from cpl_cache.errors import UserError

if TYPE_CHECKING:
    pass


DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # matched case-insensitively
TRAIN_FRAC = 0.6  # share of each class in train where a layout has no official split


@dataclass(frozen=True, eq=False)
class ImageList:
    """One domain's images: paths relative to `root`, labels, and the split code of every row.

    Rows are the train list, then the test list, in list order (or, for a layout without lists, the
    class folders in label order, each one's files sorted by name); a row's position is its `index`
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
    mask = np.zeros(len(labels), dtype=bool)
    for rows, (n_hold,) in _seeded_class_draws(labels, seed, (("--hold-frac", hold_frac),)):
        mask[rows[:n_hold]] = True
    return mask


def _seeded_class_draws(
    labels: np.ndarray, seed: int, shares: tuple[tuple[str, float], ...]
) -> list[tuple[np.ndarray, list[int]]]:
    """Per class, its rows in a seeded order and how many of them each share takes, in turn.

    Each class draws from its own generator `default_rng([seed, class])`: first one uniform number
    per share, which rounds `share * rows left` up or down at random with the probability of its
    fractional part (so odd class sizes do not bias totals), then one permutation of the class's rows.
    A share applies to the rows the shares before it left. `shares` pairs each fraction with the name
    a message gives it; every fraction must lie in [0, 1] and the seed must be non-negative.
    """
    for name, frac in shares:
        if not 0.0 <= frac <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, got {frac}")
    if seed < 0:
        raise UserError(f"--split-seed must be a non-negative integer, got {seed}")
    labels = np.asarray(labels)
    draws = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng([int(seed), int(c)])
        counts: list[int] = []
        left = len(idx)
        for _, frac in shares:
            exact = frac * left
            n = int(np.floor(exact))
            if rng.random() < exact - n:
                n += 1
            counts.append(n)
            left -= n
        draws.append((idx[rng.permutation(len(idx))], counts))
    return draws


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


def _check_listed_once(lists: tuple[tuple[str, list[str], list[str]], ...]) -> None:
    """Refuse an image listed twice: twice in one list would cache its row twice; in the train and
    the test list, train-weak would train on an image the test split scores."""
    seen: dict[str, tuple[str, str]] = {}
    for part, paths, where in lists:
        for rel, loc in zip(paths, where, strict=True):
            key = posixpath.normpath(rel)
            if key not in seen:
                seen[key] = (part, loc)
                continue
            other, first = seen[key]
            if other == part:
                raise UserError(
                    f"{loc}: {rel!r} is listed twice (first at {first}); remove the duplicate line"
                )
            raise UserError(
                f"{loc}: {rel!r} is in the {part} list and in the {other} list ({first}); an image in both "
                "would be trained on and scored: remove it from one of them"
            )


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
        other = (
            f"; {domain!r} is an Office-Home domain, pass --dataset officehome"
            if domain in OFFICEHOME_DOMAINS
            else ""
        )
        raise UserError(f"unknown DomainNet domain {domain!r}; use one of {', '.join(DOMAINS)}{other}")
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist; --data-root must be the DomainNet folder that holds "
            f"{domain}/ and {domain}_train.txt, {domain}_test.txt"
        )
    for part in ("train", "test"):
        path = root / f"{domain}_{part}.txt"
        if not path.is_file():
            raise UserError(
                f"{path} not found; --data-root must hold DomainNet's lists ({domain}_{part}.txt)"
            )
    return _from_lists("domainnet", root, domain, hold_frac, split_seed)


def _from_lists(dataset: str, root: Path, domain: str, hold_frac: float, split_seed: int) -> ImageList:
    """A domain whose `{domain}_train.txt` and `{domain}_test.txt` give paths, labels and the train split."""
    tr_paths, tr_labels, tr_where = _read_list(root / f"{domain}_train.txt", domain)
    te_paths, te_labels, te_where = _read_list(root / f"{domain}_test.txt", domain)
    _check_listed_once((("train", tr_paths, tr_where), ("test", te_paths, te_where)))
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
        dataset=dataset,
        domain=domain,
        root=root,
        classes=classes,
        paths=tuple(paths),
        labels=labels,
        split=split,
        hold_frac=float(hold_frac),
        split_seed=int(split_seed),
    )
