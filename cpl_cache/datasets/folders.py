"""Class-folder layouts without official splits: Office-Home and any `R/{domain}/{class}/*` tree."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpl_cache.cache import SPLIT_CODES
from cpl_cache.errors import UserError

if TYPE_CHECKING:
    pass

from cpl_cache.datasets.lists import (
    IMAGE_SUFFIXES,
    OFFICEHOME_DOMAINS,
    TRAIN_FRAC,
    ImageList,
    _from_lists,
    _seeded_class_draws,
)


def split_three_ways(
    labels: np.ndarray, hold_frac: float, seed: int, *, train_frac: float = TRAIN_FRAC
) -> np.ndarray:
    """Split codes (uint8) for a layout without an official split: per class, `train_frac` to train,
    then `hold_frac` of the rest to hold and the remainder to test.

    Each class draws one permutation from its own generator `default_rng([seed, class])`; train takes
    its head, hold the next rows, test the tail. So `hold_frac` never moves a train row, and one
    class's size never moves another class's rows. Fractional counts are rounded up or down at
    random with that probability, as in `stratified_split`. Rows are taken in the order given, so
    callers pass them in a canonical (sorted) order.
    """
    codes = np.full(len(labels), SPLIT_CODES["test"], dtype=np.uint8)
    shares = (("the train share", train_frac), ("--hold-frac", hold_frac))
    for rows, (n_train, n_hold) in _seeded_class_draws(labels, seed, shares):
        codes[rows[:n_train]] = SPLIT_CODES["train"]
        codes[rows[n_train : n_train + n_hold]] = SPLIT_CODES["hold"]
    return codes


def _name_key(name: str) -> str:
    """Sort key of a file or folder name: NFC, so a tree copied from macOS (NFD names) sorts the same."""
    return unicodedata.normalize("NFC", name)


def _visible_dirs(folder: Path) -> list[str]:
    """Sub-folder names, sorted, without hidden ones and archive debris such as __MACOSX."""
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise UserError(
            f"cannot list {folder} ({err.strerror or err}); check the path and permissions"
        ) from None
    names = [e.name for e in entries if e.is_dir() and not e.name.startswith((".", "__MACOSX"))]
    return sorted(names, key=_name_key)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _check_utf8(rel: str, root: Path) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise UserError(
            f"{root / shown}: the name is not valid UTF-8, so the cache cannot record it; rename it"
        ) from None


def _scan_tree(dataset: str, root: Path, domain: str, hold_frac: float, split_seed: int) -> ImageList:
    """`root/{domain}/{class}/*`: sorted class folders give the labels, sorted files the rows."""
    ddir = root / domain
    classes = _visible_dirs(ddir)
    if not classes:
        raise UserError(
            f"{ddir} holds no class folders; the layout is {root}/{domain}/CLASS/IMAGE, one folder a class"
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        try:
            names = [e.name for e in os.scandir(ddir / cls) if e.is_file() and _is_image(e.name)]
        except OSError as err:
            raise UserError(f"cannot list {ddir / cls} ({err.strerror or err}); check permissions") from None
        if not names:
            raise UserError(
                f"class folder {ddir / cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); add its images "
                "or move the folder out of the domain"
            )
        for name in sorted(names, key=lambda n: (_name_key(n), n)):
            rel = f"{domain}/{cls}/{name}"
            _check_utf8(rel, root)
            paths.append(rel)
            labels.append(label)
    labels_arr = np.asarray(labels, dtype=np.int64)
    return ImageList(
        dataset=dataset,
        domain=domain,
        root=root,
        classes=tuple(_name_key(c) for c in classes),
        paths=tuple(paths),
        labels=labels_arr,
        split=split_three_ways(labels_arr, hold_frac, split_seed),
        hold_frac=float(hold_frac),
        split_seed=int(split_seed),
    )


def _check_domain_name(domain: str) -> None:
    if not domain or domain.strip() != domain or "/" in domain or "\\" in domain or domain in (".", ".."):
        raise UserError(
            f"--domain {domain!r} is not a folder name; pass the name of a folder under --data-root"
        )


def load_officehome(root: Path, domain: str, *, hold_frac: float = 0.5, split_seed: int = 0) -> ImageList:
    """One Office-Home domain (`Real World` with its space, as in the official archive), split per class."""
    root = Path(root)
    if domain not in OFFICEHOME_DOMAINS:
        squashed = {d.lower().replace(" ", ""): d for d in OFFICEHOME_DOMAINS}
        guess = squashed.get(domain.lower().replace("_", "").replace("-", "").replace(" ", ""))
        hint = f' (did you mean "{guess}"? quote it: --domain "{guess}")' if guess else ""
        raise UserError(
            f"unknown Office-Home domain {domain!r}{hint}; use one of "
            f"{', '.join(repr(d) for d in OFFICEHOME_DOMAINS)}"
        )
    if not (root / domain).is_dir():
        what = "does not exist" if not root.is_dir() else f"has no {domain}/ folder"
        raise UserError(
            f"data root {root} {what}; --data-root must be the Office-Home folder that holds "
            f"{', '.join(d + '/' for d in OFFICEHOME_DOMAINS)} (the unpacked official archive)"
        )
    return _scan_tree("officehome", root, domain, hold_frac, split_seed)


def load_folder(root: Path, domain: str, *, hold_frac: float = 0.5, split_seed: int = 0) -> ImageList:
    """Any `root/{domain}/{class}/*` tree; `root/{domain}_train.txt` and `_test.txt`, when both exist,
    give the labels and the train split as DomainNet's lists do."""
    root = Path(root)
    _check_domain_name(domain)
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist; --data-root must be the folder that holds {domain}/CLASS/IMAGE"
        )
    lists = [root / f"{domain}_{part}.txt" for part in ("train", "test")]
    present = [p.is_file() for p in lists]
    if all(present):
        return _from_lists("folder", root, domain, hold_frac, split_seed)
    if any(present):
        have, lack = (lists[0], lists[1]) if present[0] else (lists[1], lists[0])
        raise UserError(
            f"{have} exists but {lack} does not; give both lists, or neither for a seeded split of {domain}/"
        )
    if not (root / domain).is_dir():
        found = _visible_dirs(root)
        shown = ", ".join(repr(d) for d in found[:10]) + (" ..." if len(found) > 10 else "")
        raise UserError(
            f"no domain folder {domain!r} under {root}; "
            + (f"domains there: {shown}" if found else "the layout is ROOT/DOMAIN/CLASS/IMAGE")
        )
    return _scan_tree("folder", root, domain, hold_frac, split_seed)
