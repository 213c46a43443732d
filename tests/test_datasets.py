"""The DomainNet reader: labels from the lists, one-line errors, the seeded stratified split, decoding."""

from __future__ import annotations

import hashlib
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from cpl_cache.datasets import (
    DATASETS,
    DOMAINS,
    SPLIT_CODES,
    check_files,
    load_dataset,
    load_domainnet,
    load_rgb,
    prompt_for,
    stratified_split,
)
from cpl_cache.errors import UserError

# Label order deliberately unlike sorted folder names; "kiwi" appears only in the test list.
TRAIN = ["real/zebra/a.jpg 0", "real/apple/b.jpg 1", "real/zebra/c.jpg 0", "real/mango/d.jpg 2"]
TEST = ["real/kiwi/e.jpg 3", "real/apple/f.jpg 1", "real/zebra/g.jpg 0", "real/mango/h.jpg 2"]
TEST9 = [
    f"real/{c}/{c}{i}.jpg {k}" for k, c in enumerate(["zebra", "apple", "mango", "kiwi"]) for i in range(9)
]


def _write(root, train=TRAIN, test=TEST, domain="real"):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
    (root / f"{domain}_test.txt").write_text("\n".join(test) + "\n")
    return root


def test_classes_and_rows_come_from_the_lists_in_label_order(tmp_path):
    images = load_domainnet(_write(tmp_path), "real")
    assert images.classes == ("zebra", "apple", "mango", "kiwi")
    assert images.paths == tuple(line.split()[0] for line in TRAIN + TEST)
    assert images.labels.dtype == np.int64 and images.labels.tolist() == [0, 1, 0, 2, 3, 1, 0, 2]
    assert images.split.dtype == np.uint8
    assert images.split[:4].tolist() == [SPLIT_CODES["train"]] * 4
    assert set(images.split[4:].tolist()) <= {SPLIT_CODES["hold"], SPLIT_CODES["test"]}
    assert images.rows("train").tolist() == [0, 1, 2, 3]
    assert sorted(images.rows("hold").tolist() + images.rows("test").tolist()) == [4, 5, 6, 7]
    assert (images.dataset, images.domain, images.hold_frac, images.split_seed) == (
        "domainnet",
        "real",
        0.5,
        0,
    )
    assert load_dataset("domainnet", tmp_path, "real").classes == images.classes


def test_hold_hash_is_the_sha256_of_the_sorted_hold_paths(tmp_path):
    images = load_domainnet(_write(tmp_path, TRAIN, TEST9), "real", hold_frac=0.5, split_seed=3)
    hold = sorted(images.paths[i] for i in images.rows("hold"))
    assert images.hold_hash() == hashlib.sha256("\n".join(hold).encode()).hexdigest()
    everything = load_domainnet(tmp_path, "real", hold_frac=1.0)
    assert everything.rows("test").size == 0 and everything.hold_hash() != images.hold_hash()


@pytest.mark.parametrize(
    ("train", "test", "message"),
    [
        (
            ["real/zebra/a.jpg 0", "real/apple/b.jpg 0"],
            TEST,
            "real_train.txt:2: label 0 names folder 'apple'",
        ),
        (TRAIN, TEST[:3] + ["real/zebra/h.jpg 2"], "real_test.txt:4: label 2 names folder 'zebra'"),
        (TRAIN, TEST + ["real/apple/i.jpg 4"], "real_test.txt:5: folder 'apple' has label 4, but"),
        (TRAIN, ["real/kiwi/e.jpg 5"], "label(s) appear in no list (3, 4)"),
        (TRAIN, ["real/kiwi/e.jpg"], "real_test.txt:1: expected 'real/CLASS/FILE LABEL'"),
        (TRAIN, ["real/kiwi/e.jpg three"], "real_test.txt:1: expected"),
        (TRAIN, ["sketch/kiwi/e.jpg 3"], "real_test.txt:1: path 'sketch/kiwi/e.jpg' is not of the form"),
        (TRAIN, ["real/e.jpg 3"], "is not of the form 'real/CLASS/FILE'"),
        (TRAIN, ["real/kiwi/e.jpg -1"], "real_test.txt:1: negative label -1"),
        # An image listed twice would be cached twice; one in both lists would be trained on and scored.
        (
            TRAIN + ["real/zebra/a.jpg 0"],
            TEST,
            "real_train.txt:5: 'real/zebra/a.jpg' is listed twice (first at",
        ),
        (TRAIN, TEST + ["real/apple/./f.jpg 1"], "real_test.txt:5: 'real/apple/./f.jpg' is listed twice"),
        (TRAIN, TEST + ["real/zebra/c.jpg 0"], "real_test.txt:5: 'real/zebra/c.jpg' is in the test list and"),
    ],
)
def test_bad_lists_are_refused_naming_the_line(tmp_path, train, test, message):
    _write(tmp_path, train, test)
    with pytest.raises(UserError, match="^") as err:
        load_domainnet(tmp_path, "real")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_image_in_both_lists_names_both_lines(tmp_path):
    _write(tmp_path, TRAIN, TEST + ["real/mango/d.jpg 2"])
    with pytest.raises(UserError) as err:
        load_domainnet(tmp_path, "real")
    assert str(err.value).startswith(
        f"{tmp_path / 'real_test.txt'}:5: 'real/mango/d.jpg' is in the test list"
    )
    assert f"train list ({tmp_path / 'real_train.txt'}:4)" in str(err.value)


def test_unknown_domain_missing_root_and_missing_list_say_what_was_expected(tmp_path):
    with pytest.raises(UserError) as err:
        load_domainnet(tmp_path, "photo")
    assert "unknown DomainNet domain 'photo'" in str(err.value)
    assert all(d in str(err.value) for d in DOMAINS)

    with pytest.raises(UserError, match="does not exist; --data-root must be the DomainNet folder"):
        load_domainnet(tmp_path / "nowhere", "real")

    _write(tmp_path, domain="quickdraw")
    (tmp_path / "quickdraw_train.txt").unlink()
    with pytest.raises(
        UserError, match=r"quickdraw_train.txt not found; --data-root must hold DomainNet's lists"
    ):
        load_domainnet(tmp_path, "quickdraw")

    with pytest.raises(UserError, match="unknown dataset 'imagenet'; use one of domainnet"):
        load_dataset("imagenet", tmp_path, "real")
    assert "domainnet" in DATASETS


def test_missing_files_are_reported_with_their_count_and_the_first_paths(tmp_path):
    images = load_domainnet(_write(tmp_path), "real")
    present = ["real/zebra/a.jpg", "real/apple/b.jpg", "real/mango/d.jpg"]
    for rel in present:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    with pytest.raises(UserError) as err:
        check_files(images, limit=2)
    msg = str(err.value)
    assert msg.startswith(f"5 of 8 images listed for real are missing under {tmp_path} ")
    assert "(real/zebra/c.jpg, real/kiwi/e.jpg, ...)" in msg  # first two, in list order

    for rel in images.paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    check_files(images)


def _reference_counts(labels, hold_frac):
    """Per class, the hold count must be floor or ceil of hold_frac * n."""
    classes, counts = np.unique(labels, return_counts=True)
    return {
        c: (int(np.floor(hold_frac * n)), int(np.ceil(hold_frac * n)))
        for c, n in zip(classes, counts, strict=True)
    }


def _hold_by_hand(labels, hold_frac, seed):
    """The documented rule written out class by class: default_rng([seed, class]) draws one uniform
    number, which rounds hold_frac * n up with the probability of its fractional part, then one
    permutation whose head is hold. Pins the draws, so a split (and its hold_hash) never moves."""
    hold = [False] * len(labels)
    for c in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == c]
        rng = np.random.default_rng([seed, c])
        n_hold = int(hold_frac * len(rows) // 1)
        n_hold += rng.random() < hold_frac * len(rows) - n_hold
        for j in rng.permutation(len(rows))[:n_hold]:
            hold[rows[j]] = True
    return hold


@pytest.mark.parametrize("hold_frac", [0.0, 0.3, 0.5, 1.0])
def test_split_is_stratified_deterministic_and_a_pure_function(hold_frac):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 301)
    before = labels.copy()
    np.random.seed(1)
    mask = stratified_split(labels, hold_frac, seed=5)
    np.random.seed(2)
    random.seed(2)
    assert np.array_equal(mask, stratified_split(labels, hold_frac, seed=5))  # global state plays no part
    assert np.array_equal(labels, before) and mask.dtype == bool and mask.shape == labels.shape
    assert mask.tolist() == _hold_by_hand(labels.tolist(), hold_frac, 5)
    for c, (lo, hi) in _reference_counts(labels, hold_frac).items():
        assert lo <= mask[labels == c].sum() <= hi
    if 0 < hold_frac < 1:
        assert not np.array_equal(mask, stratified_split(labels, hold_frac, seed=6))


def test_split_of_one_class_does_not_move_when_another_class_changes():
    labels = np.repeat([0, 1, 2], [10, 11, 12])
    mask = stratified_split(labels, 0.5, seed=0)
    fewer = np.repeat([0, 2], [10, 12])
    other = stratified_split(fewer, 0.5, seed=0)
    assert np.array_equal(other[:10], mask[:10]) and np.array_equal(other[10:], mask[21:])


def test_split_with_exact_halves_and_the_totals_are_unbiased():
    labels = np.repeat(np.arange(40), 6)
    mask = stratified_split(labels, 0.5, seed=0)
    assert (np.bincount(labels[mask], minlength=40) == 3).all()
    odd = np.repeat(np.arange(400), 3)  # 1.5 hold per class: rounding must not always go one way
    assert 560 < stratified_split(odd, 0.5, seed=0).sum() < 640


def test_split_does_not_depend_on_the_order_of_the_test_list(tmp_path):
    test = [
        f"real/{c}/{c}{i}.jpg {k}"
        for k, c in enumerate(["zebra", "apple", "mango", "kiwi"])
        for i in range(9)
    ]
    a = load_domainnet(_write(tmp_path / "a", TRAIN, test), "real", split_seed=4)
    shuffled = test[:]
    random.Random(0).shuffle(shuffled)
    b = load_domainnet(_write(tmp_path / "b", TRAIN, shuffled), "real", split_seed=4)
    assert a.hold_hash() == b.hold_hash()
    assert {a.paths[i] for i in a.rows("test")} == {b.paths[i] for i in b.rows("test")}
    for k in range(4):
        assert np.count_nonzero(a.labels[a.rows("hold")] == k) in (4, 5)


def test_bad_split_arguments_are_user_errors():
    with pytest.raises(UserError, match="--hold-frac must be between 0 and 1"):
        stratified_split(np.zeros(3, int), 1.5, 0)
    with pytest.raises(UserError, match="--split-seed must be a non-negative integer"):
        stratified_split(np.zeros(3, int), 0.5, -1)


def test_prompt_reads_underscores_as_spaces():
    assert prompt_for("aircraft_carrier") == "a photo of a aircraft carrier."
    assert prompt_for("The_Eiffel_Tower") == "a photo of a The Eiffel Tower."


def _save(path, im, **kw):
    im.save(path, **kw)
    return path


def test_load_rgb_handles_grayscale_cmyk_palettes_transparency_and_rotation(tmp_path):
    gray = _save(tmp_path / "g.jpg", Image.new("L", (4, 3), 77))
    assert np.asarray(load_rgb(gray)).shape == (3, 4, 3)
    assert abs(int(np.asarray(load_rgb(gray)).astype(int).mean()) - 77) <= 1

    cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (4, 3), (0, 255, 255, 0)))  # red
    with Image.open(cmyk) as im:
        assert np.array_equal(np.asarray(load_rgb(cmyk)), np.asarray(im.convert("RGB")))

    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black must become white
    px = np.asarray(load_rgb(_save(tmp_path / "t.png", rgba)))
    assert px[0, 0].tolist() == [0, 0, 255] and px[0, 1].tolist() == [255, 255, 255]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    px = np.asarray(load_rgb(_save(tmp_path / "p.png", pal, transparency=0)))
    assert px[0, 0].tolist() == [255, 255, 255] and px[0, 1].tolist() == [10, 200, 30]
    px = np.asarray(load_rgb(_save(tmp_path / "q.png", pal)))  # no transparency: palette colours
    assert px[0, 0].tolist() == [0, 0, 0]

    la = Image.new("LA", (1, 1), (0, 0))
    assert np.asarray(load_rgb(_save(tmp_path / "la.png", la)))[0, 0].tolist() == [255, 255, 255]

    rotated = Image.new("RGB", (4, 2), (1, 2, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # camera held sideways: shown rotated by 90 degrees
    assert load_rgb(_save(tmp_path / "r.jpg", rotated, exif=exif)).size == (2, 4)


def _wide(mode: str, values: np.ndarray) -> Image.Image:
    if mode == "I;16B":
        return Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    return Image.fromarray({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode](values))


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif")])
def test_load_rgb_scales_16_bit_and_float_images_to_8_bits(tmp_path, mode, suffix):
    """A 16-bit PNG decoded by `convert("RGB")` is all white (everything above 255 clips)."""
    rng = np.random.default_rng(0)
    v16 = rng.integers(0, 65536, (5, 6))
    v16[0, :3] = [0, 65535, 32896]  # black, white, mid grey (128 * 257)
    values = v16 / 65535 if mode == "F" else v16
    path = _save(tmp_path / f"wide.{suffix}", _wide(mode, values))
    with Image.open(path) as im:
        assert im.mode == mode
    got = np.asarray(load_rgb(path))
    want = np.round(values * 255 if mode == "F" else values / 257).astype(np.uint8)
    assert got.shape == (5, 6, 3) and got.dtype == np.uint8
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=2))
    assert got[0, :3, 0].tolist() == [0, 255, 128]


def test_load_rgb_raises_oserror_on_a_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError):
        load_rgb(bad)


def _tree(root):
    """Every image of the lists on disk (empty files: enough for the file checks)."""
    images = load_domainnet(_write(root), "real")
    for rel in images.paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return images


def test_a_symlink_that_leads_out_of_the_data_root_is_refused_unless_followed(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    images = _tree(root)
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"x")
    (root / "real/apple/b.jpg").unlink()
    (root / "real/apple/b.jpg").symlink_to(outside / "b.jpg")
    with pytest.raises(UserError) as err:
        check_files(images)
    assert str(err.value) == (
        f"{root / 'real/apple/b.jpg'} is a symbolic link to {outside / 'b.jpg'}, outside the data root "
        f"{root}; pass --follow-symlinks to read images through it"
    )
    check_files(images, follow_symlinks=True)

    # A class folder linked from elsewhere is named as the link.
    shutil.move(root / "real/mango", outside / "mango")
    (root / "real/mango").symlink_to(outside / "mango")
    (root / "real/apple/b.jpg").unlink()
    (root / "real/apple/b.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=f"^{root / 'real/mango'} is a symbolic link to {outside / 'mango'}"):
        check_files(images)


def test_symlinks_inside_the_data_root_and_a_linked_root_are_read(tmp_path):
    root = tmp_path / "data"
    images = _tree(root)
    (root / "store").mkdir()
    shutil.move(root / "real/apple/b.jpg", root / "store/b.jpg")
    (root / "real/apple/b.jpg").symlink_to("../../store/b.jpg")
    check_files(images)
    (tmp_path / "link").symlink_to(root)
    check_files(load_domainnet(tmp_path / "link", "real"))
