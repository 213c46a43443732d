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

import hashlib
import os
import posixpath
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpl_cache.cache import SPLIT_CODES
from cpl_cache.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # matched case-insensitively
TRAIN_FRAC = 0.6  # share of each class in train where a layout has no official split

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


# ------------------------------------------------------------------------ class-folder layouts


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


def scan_files(
    images: ImageList,
    rows: Sequence[int] | None = None,
    *,
    sizes: bool = True,
    follow_symlinks: bool = False,
) -> tuple[list[int], list[int]]:
    """Rows whose file is missing, and (with `sizes`) rows whose file is empty (0 bytes), of `rows`
    (default: all).

    Lists each class folder once instead of calling stat per image to find the missing ones (586k
    stats are slow on network disks); with `sizes`, files that exist are stat-ed for their size.
    Unless `follow_symlinks`, a symbolic link that leads out of the data root is refused: one
    realpath per folder, and one per file the listing marks as a link.
    """
    missing: list[int] = []
    empty: list[int] = []
    listings: dict[str, dict[str, int] | None] = {}
    links: dict[str, set[str]] = {}
    real_root = os.path.realpath(images.root)
    for row in range(len(images.paths)) if rows is None else rows:
        rel = images.paths[row]
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            try:
                with os.scandir(images.root / folder) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = None
            else:
                listings[folder] = {e.name: -1 for e in entries}
                links[folder] = {e.name for e in entries if e.is_symlink()}
                if not follow_symlinks:
                    _refuse_link_out(images.root, real_root, folder)
        listing = listings[folder]
        if listing is None or name not in listing:
            missing.append(int(row))
            continue
        if not follow_symlinks and name in links[folder]:
            _refuse_link_out(images.root, real_root, rel)
        if not sizes:
            continue
        if listing[name] < 0:
            try:
                listing[name] = (images.root / rel).stat().st_size
            except OSError:
                missing.append(int(row))
                continue
        if listing[name] == 0:
            empty.append(int(row))
    return missing, empty


def _refuse_link_out(root: Path, real_root: str, rel: str) -> None:
    """A UserError naming the symbolic link if `root/rel` resolves to a place outside the data root."""
    real = os.path.realpath(root / rel)
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return
    parts = [p for p in rel.split("/") if p]
    link = next(
        (
            root.joinpath(*parts[:i])
            for i in range(1, len(parts) + 1)
            if root.joinpath(*parts[:i]).is_symlink()
        ),
        root / rel,
    )
    raise UserError(
        f"{link} is a symbolic link to {os.path.realpath(link)}, outside the data root {root}; "
        "pass --follow-symlinks to read images through it"
    )


def missing_files_error(images: ImageList, missing: Sequence[int], total: int, limit: int = 5) -> UserError:
    """The one line for listed images that are not there: the count and the first few paths."""
    shown = ", ".join(images.paths[r] for r in missing[:limit]) + (", ..." if len(missing) > limit else "")
    return UserError(
        f"{len(missing)} of {total} images listed for {images.domain} are missing under "
        f"{images.root} ({shown}); restore them or drop those lines from the lists"
    )


def check_files(
    images: ImageList, limit: int = 5, *, rows: np.ndarray | None = None, follow_symlinks: bool = False
) -> None:
    """Raise a UserError with the count and the first few paths if any listed image is missing, or
    (unless `follow_symlinks`) reached through a symbolic link out of the data root.

    `rows` restricts the check to some rows (train-weak needs only hold and test).
    """
    picked = None if rows is None else rows.tolist()
    missing, _ = scan_files(images, picked, sizes=False, follow_symlinks=follow_symlinks)
    if missing:
        raise missing_files_error(images, missing, len(images) if rows is None else len(rows), limit)


def prompt_for(class_name: str) -> str:
    """The default CLIP prompt of a class folder name; underscores read as spaces."""
    return f"a photo of a {class_name.replace('_', ' ')}."


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer image (0..65535) or a float one (0..1) as 8-bit grayscale, scaled
    (65535 -> 255, 1.0 -> 255, rounded), where PIL's own convert clips everything above 255 to white."""
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        scaled = np.rint(np.nan_to_num(a.astype(np.float64), nan=0.0) * 255.0)
    else:
        scaled = (np.clip(a.astype(np.int64), 0, 65535) + 128) // 257  # round(v / 257)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def load_rgb(path: Path | str) -> Image.Image:
    """Decode an image to RGB: EXIF rotation applied, transparency composited on white, CMYK converted,
    16-bit and float images scaled to 8 bits. Every stage that reads images decodes through this.

    Raises OSError (PIL.UnidentifiedImageError included) on a file that is not a readable image.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in _WIDE_MODES:
            im = _to_8bit(im)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("L", "RGB") and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


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
