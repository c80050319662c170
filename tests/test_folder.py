import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.data.folder import FolderDataset, load_folder, scan_folder
from convscope.errors import ConvscopeError

RED, BLUE, GREEN = (200, 10, 30), (5, 20, 240), (0, 255, 0)


def _solid(path, size, colour, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _split_lr(path):
    """128 wide x 64 high: left half red, right half blue. The centre crop keeps columns 32..95."""
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, :64] = RED
    a[:, 64:] = BLUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _band_top(path):
    """48 wide x 96 high, grey (L mode): top 20 rows 250, the rest 60. The centre crop keeps rows 24..71.

    Bilinear at scale 2/3 reads 1.5 source rows beyond the crop, so the band stays 2.5 rows clear of it.
    """
    a = np.full((96, 48), 60, np.uint8)
    a[:20] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="L").save(path)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    _solid(root / "b_blue" / "wide.png", (90, 40), BLUE)
    _solid(root / "b_blue" / "tall.bmp", (17, 50), BLUE, "BMP")
    _solid(root / "a_red" / "square.png", (32, 32), RED)
    _solid(root / "a_red" / "nested" / "big.png", (300, 200), RED)
    _split_lr(root / "c_mixed" / "lr.png")
    _band_top(root / "c_mixed" / "tb.png")
    # Ignored: hidden file, hidden folder, non-image extension.
    _solid(root / "a_red" / ".hidden.png", (8, 8), GREEN)
    _solid(root / ".cache" / "x.png", (8, 8), GREEN)
    (root / "a_red" / "notes.txt").write_text("not an image")
    # Unreadable: random bytes named .jpg, a PNG cut in half.
    (root / "b_blue" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "a_red" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def test_scan_classes_and_files(tree):
    classes, samples = scan_folder(tree)
    assert classes == ["a_red", "b_blue", "c_mixed"]
    names = [(p.relative_to(tree).as_posix(), label) for p, label in samples]
    # A folder's own files (sorted) come before its sub-folders', as in torchvision's ImageFolder.
    assert names == [("a_red/square.png", 0), ("a_red/truncated.png", 0), ("a_red/nested/big.png", 0),
                     ("b_blue/corrupt.jpg", 1), ("b_blue/tall.bmp", 1), ("b_blue/wide.png", 1),
                     ("c_mixed/lr.png", 2), ("c_mixed/tb.png", 2)]


def test_load_folder_skips_bad_files_with_one_warning(tree):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_folder(tree, size=32)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "skipped 2 unreadable image files of image folder" in msg
    assert "corrupt.jpg" in msg and "truncated.png" in msg
    assert ds.classes == ["a_red", "b_blue", "c_mixed"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (6, 3, 32, 32)
    for i, colour in enumerate([RED, RED, BLUE, BLUE]):  # solid colours survive resize and crop exactly
        assert torch.equal(ds.images[i], torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))

    lr = ds.images[4]  # source columns 32..95 scaled by 1/2: red 32..63 -> 0..15, blue 64..95 -> 16..31
    assert torch.equal(lr[:, :, :15], torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 15))
    assert torch.equal(lr[:, :, 17:], torch.tensor(BLUE, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 15))
    # The two columns at the edge are blends, red-heavy on the left, blue-heavy on the right.
    assert RED[0] > lr[0, 0, 15] > lr[0, 0, 16] > BLUE[0]
    assert RED[2] < lr[2, 0, 15] < lr[2, 0, 16] < BLUE[2]

    tb = ds.images[5]  # grey -> RGB; the bright top band (rows 0..19) lies outside the crop (rows 24..71)
    assert torch.equal(tb, torch.full((3, 32, 32), 60, dtype=torch.uint8))


def test_folder_dataset_is_lazy_and_names_bad_file(tree):
    ds = FolderDataset(tree, size=16)
    assert ds.classes == ["a_red", "b_blue", "c_mixed"] and len(ds) == 8
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2]
    image, label = ds[2]
    assert label == 0 and image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert torch.allclose(image, torch.tensor(RED).view(3, 1, 1).float().expand(3, 16, 16) / 255)
    image, label = ds[7]
    assert label == 2 and torch.allclose(image, torch.full((3, 16, 16), 60 / 255))
    with pytest.raises(ConvscopeError, match="truncated.png"):
        ds[1]
    with pytest.raises(ConvscopeError, match="corrupt.jpg"):
        ds[3]


def test_folder_matches_in_memory(tree):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem = load_folder(tree, size=24)
    lazy = FolderDataset(tree, size=24)
    good = [0, 2, 4, 5, 6, 7]
    for i, j in enumerate(good):
        x, y = lazy[j]
        assert y == int(mem.labels[i]) and torch.equal((x * 255).round().to(torch.uint8), mem.images[i])


def test_jpeg_colour_close(tmp_path):
    _solid(tmp_path / "k" / "x.jpg", (100, 60), (120, 60, 30), "JPEG")
    ds = load_folder(tmp_path, size=20)
    assert (ds.images[0].int() - torch.tensor([120, 60, 30]).view(3, 1, 1)).abs().max() <= 3


def test_errors(tmp_path):
    with pytest.raises(ConvscopeError, match="does not exist"):
        load_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ConvscopeError, match="is not a folder"):
        FolderDataset(tmp_path / "file.png")
    with pytest.raises(ConvscopeError, match="no class folders"):
        load_folder(tmp_path)  # only a loose file, no sub-folders
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ConvscopeError, match="no image files"):
        FolderDataset(tmp_path)
    (tmp_path / "cls" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConvscopeError, match="none of the 1 image files"):
        load_folder(tmp_path)
    with pytest.raises(ConvscopeError, match="size"):
        load_folder(tmp_path, size=0)


def test_crop_in_one_step_equals_resize_then_crop(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high
    (tmp_path / "k").mkdir()
    Image.fromarray(a).save(tmp_path / "k" / "r.png")
    got = load_folder(tmp_path, size=32).images[0]
    ref = Image.fromarray(a).resize((48, 32), Image.Resampling.BILINEAR).crop((8, 0, 40, 32))
    assert torch.equal(got, torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_symlink_loops_other_classes_and_fifos_are_skipped(tmp_path):
    """Before: `ln -s .. root/cat/loop` was followed until the OS stopped it (820 samples for 20 files, dog images
    labelled cat), and a FIFO named x.png hung the loader for good."""
    root = tmp_path / "root"
    for c, colour in (("cat", RED), ("dog", BLUE)):
        for i in range(3):
            _solid(root / c / f"{i}.png", (16, 16), colour)
    (root / "cat" / "loop").symlink_to("..")  # back up to the root: every class again
    (root / "cat" / "dogs").symlink_to(root / "dog")  # another class's folder
    (root / "cat" / "self").symlink_to(".")  # a loop on itself
    _solid(tmp_path / "elsewhere" / "more.png", (16, 16), RED)
    (root / "cat" / "external").symlink_to(tmp_path / "elsewhere")  # a store outside the tree: followed
    (root / "cat" / "again.png").symlink_to(root / "cat" / "0.png")  # the same file twice: once
    os.mkfifo(root / "dog" / "x.png")
    with pytest.warns(UserWarning, match="skipped 5 entries that are not a readable regular image"):
        classes, samples = scan_folder(root)
    assert classes == ["cat", "dog"]
    names = [(p.relative_to(root).as_posix(), label) for p, label in samples]
    assert names == [("cat/0.png", 0), ("cat/1.png", 0), ("cat/2.png", 0), ("cat/external/more.png", 0),
                     ("dog/0.png", 1), ("dog/1.png", 1), ("dog/2.png", 1)]
    with pytest.warns(UserWarning):
        data = load_folder(root, size=8)
    assert len(data) == 7 and data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_class_names_that_are_not_utf8_are_shown_escaped(tmp_path):
    root = tmp_path / "root"
    bad = os.fsdecode(b"caf\xe9")  # Latin-1, not UTF-8: the OS keeps the byte as a surrogate
    _solid(root / bad / "0.png", (8, 8), RED)
    _solid(root / "dog" / "0.png", (8, 8), BLUE)
    classes, samples = scan_folder(root)
    assert classes == ["caf\\xe9", "dog"]
    classes[0].encode("utf-8")  # printable, writable as JSON, HTML, a terminal line
    assert load_folder(root, size=8).images.shape == (2, 3, 8, 8)  # the files themselves are read as they are


def test_every_entry_that_is_not_a_readable_image_is_skipped_and_counted_in_one_note(tmp_path):
    """Folders as people keep them (issue 27): each kind of entry that is not a readable regular image is
    skipped, named with why, and counted with the unreadable images in one note; images reached through links,
    inside the tree or outside it, are read."""
    root = tmp_path / "root"
    for c, colour in (("cat", RED), ("dog", BLUE)):
        _solid(root / c / "0.png", (16, 16), colour)
    _solid(tmp_path / "outside" / "far.png", (16, 16), RED)
    cat = root / "cat"
    (cat / "self.png").symlink_to("self.png")  # a link to itself: ELOOP, a traceback before
    (cat / "loop").symlink_to("loop")  # the same, not named like an image
    (cat / "gone.png").symlink_to(tmp_path / "nothing.png")  # a link to nothing
    (cat / "zero.png").symlink_to("/dev/zero")  # a device
    os.mkfifo(cat / "pipe.png")  # a FIFO: it would block a reader for good
    (cat / "folder.png").mkdir()  # a folder named like an image
    (cat / "empty.png").write_bytes(b"")  # an empty file
    (cat / "far.png").symlink_to(tmp_path / "outside" / "far.png")  # a link out of the tree: an image
    (root / "dog" / "alias.png").symlink_to(root / "dog" / "0.png")  # a second name for the same file: once
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # unreadable when decoded
    with pytest.warns(UserWarning) as caught:
        classes, samples = scan_folder(root)
    note = str(caught[0].message)
    assert note.startswith("skipped 7 entries that are not a readable regular image of image folder")
    assert "loop (unreadable: Too many levels of symbolic links)" in note  # the first three are named
    names = sorted(p.relative_to(root).as_posix() for p, _ in samples)
    assert names == ["cat/0.png", "cat/far.png", "dog/0.png", "dog/broken.png"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_folder(root, size=8)
    assert len(caught) == 1 and str(caught[0].message).startswith(
        "skipped 1 unreadable image file and 7 entries that are not a readable regular image of image folder")
    assert len(data) == 3 and data.labels.tolist() == [0, 0, 1]
    kinds = _kinds(root)
    assert kinds == {"self.png": "unreadable", "loop": "unreadable", "gone.png": "a link to nothing",
                     "zero.png": "not a regular file", "pipe.png": "not a regular file", "empty.png": "an empty file",
                     "alias.png": "the same file as one already listed"}


def _kinds(root):
    """Each skipped entry's name -> the reason scan_folder gives (its words up to a colon)."""
    from convscope.data.folder import _scan

    out = {}
    for entry in _scan(root)[2]:
        path, _, why = entry.partition(" (")
        out[os.path.basename(path)] = why.rstrip(")").split(":")[0]
    return out
