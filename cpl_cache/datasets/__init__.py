"""Image sets on disk: DomainNet, Office-Home and any class-folder tree, read into one ImageList.

DomainNet on disk is `R/{domain}/{class}/{file}` plus the lists `R/{domain}_train.txt` and
`R/{domain}_test.txt`, one `{domain}/{class}/{file} {label}` per line. The lists are the authority
on labels; class names in label order come from them, not from sorting folder names.
Splits: `train` is the train list; the test list is divided, stratified by class with a seeded
generator, into `hold` (ground truth for the weak model) and `test`.

Office-Home (`R/{Art,Clipart,Product,Real World}/{class}/*`) and the `folder` layout
(`R/{domain}/{class}/*`, any names) have no official split: the class folders, sorted, give the
label order, and each class is split with a seeded generator into `train` (TRAIN_FRAC of it) and
the rest, which `hold_frac` divides into `hold` and `test` as it divides DomainNet's test list.
A `folder` domain may instead bring DomainNet-style lists, which then rule as they do for DomainNet.

Every assignment is a pure function of (the sorted paths and labels, the fractions, the seed), so
train-weak, extract and train agree on it without talking to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cpl_cache.cache import SPLIT_CODES
from cpl_cache.datasets.files import check_files, load_rgb, missing_files_error, prompt_for, scan_files
from cpl_cache.datasets.folders import load_folder, load_officehome, split_three_ways
from cpl_cache.datasets.lists import (
    DOMAINS,
    IMAGE_SUFFIXES,
    OFFICEHOME_DOMAINS,
    TRAIN_FRAC,
    ImageList,
    load_domainnet,
    stratified_split,
)
from cpl_cache.errors import UserError

__all__ = [
    "DATASETS",
    "DOMAINS",
    "IMAGE_SUFFIXES",
    "OFFICEHOME_DOMAINS",
    "SPLIT_CODES",
    "TRAIN_FRAC",
    "ImageList",
    "check_files",
    "load_dataset",
    "load_domainnet",
    "load_folder",
    "load_officehome",
    "load_rgb",
    "missing_files_error",
    "prompt_for",
    "scan_files",
    "split_three_ways",
    "stratified_split",
]


DATASETS: dict[str, Callable[..., ImageList]] = {
    "domainnet": load_domainnet,
    "officehome": load_officehome,
    "folder": load_folder,
}


def load_dataset(
    name: str, root: Path, domain: str, *, hold_frac: float = 0.5, split_seed: int = 0
) -> ImageList:
    """Read a registered dataset layout by name."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; use one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](Path(root), domain, hold_frac=hold_frac, split_seed=split_seed)
