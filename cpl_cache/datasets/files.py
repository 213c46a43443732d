"""The files behind an ImageList: existence and size checks, links out of the root, and decoding an
image to RGB the same way everywhere."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpl_cache.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

from cpl_cache.datasets.lists import ImageList


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
