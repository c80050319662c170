"""The embedded synthetic data set: determinism, ground truth, colour-blindness of labels, sizes, poses, cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convscope.data import synthetic as syn
from convscope.data.synthetic import CLASSES, PARTS, cache_path, load_synthetic, preview, render_pose
from convscope.errors import ConvscopeError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def val120():
    return load_synthetic("val", n=120, cache=False)


def _same(a, b):
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.truth.masks, b.truth.masks)
    assert torch.equal(a.truth.boxes, b.truth.boxes)
    for name in PARTS:
        assert torch.equal(a.truth.parts[name].nan_to_num(-1), b.truth.parts[name].nan_to_num(-1)), name


def _bbox(mask: torch.Tensor) -> list[int]:
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def test_names():
    assert len(CLASSES) >= 10 and len(set(CLASSES)) == len(CLASSES)
    assert {"face", "car", "house", "clock", "bicycle"} <= set(CLASSES)
    assert {"left_eye", "right_eye", "nose", "front_wheel", "back_wheel", "window"} <= set(PARTS)
    assert len(set(PARTS)) == len(PARTS)


def test_deterministic_and_prefix_stable():
    a = load_synthetic("train", n=14, seed=3, cache=False)
    b = load_synthetic("train", n=14, seed=3, cache=False)
    _same(a, b)
    longer = load_synthetic("train", n=30, seed=3, cache=False).subset(torch.arange(14))
    _same(a, longer)
    other_seed = load_synthetic("train", n=14, seed=4, cache=False)
    other_split = load_synthetic("test", n=14, seed=3, cache=False)
    for other in (other_seed, other_split):
        differ = (other.images != a.images).flatten(1).any(1)
        assert differ.all()
    assert a.images.shape == (14, 3, 64, 64) and a.images.dtype == torch.uint8
    assert torch.equal(a.labels, torch.arange(14) % len(CLASSES))


def test_defaults_and_metadata():
    assert syn.DEFAULT_N == {"train": 10000, "val": 1000, "test": 2000}
    d = load_synthetic("test", n=3, size=32, cache=False)
    assert d.classes == CLASSES and d.image_size == 32 and d.name == "synthetic/test"
    x, y = d[1]
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and y == 1


def test_ground_truth_consistent(val120):
    d, t = val120, val120.truth
    n = len(d)
    assert sorted(set(d.labels.tolist())) == list(range(len(CLASSES)))
    assert t.masks.shape == (n, 64, 64) and t.masks.dtype == torch.bool
    assert t.boxes.shape == (n, 4) and t.boxes.dtype == torch.float32
    area = t.masks.flatten(1).float().mean(1)
    assert float(area.min()) > 0.02 and float(area.max()) < 0.6
    for i in range(n):
        assert t.boxes[i].tolist() == _bbox(t.masks[i])
    side = (t.boxes[:, 2:] - t.boxes[:, :2]).max(1).values / 64
    assert 0.2 < float(side.min()) and float(side.max()) < 0.8 and 0.35 < float(side.mean()) < 0.55
    present = 0
    for name in PARTS:
        xy = t.parts[name]
        assert xy.shape == (n, 2) and xy.dtype == torch.float32
        has = ~torch.isnan(xy[:, 0])
        assert torch.equal(has, ~torch.isnan(xy[:, 1]))
        for i in torch.nonzero(has).flatten().tolist():
            x, y = math.floor(xy[i, 0]), math.floor(xy[i, 1])
            assert 0 <= x < 64 and 0 <= y < 64, (name, i)
            assert bool(t.masks[i, y, x]), f"{name} of image {i} ({CLASSES[int(d.labels[i])]}) is off its mask"
            present += 1
    assert present > 3 * n


def test_parts_follow_the_class(val120):
    t, labels = val120.truth, val120.labels
    # which parts an image has depends on its class only: NaN exactly for the parts its class lacks
    for c, name in enumerate(CLASSES):
        rows = labels == c
        has = torch.stack([~torch.isnan(t.parts[p][rows, 0]) for p in PARTS], 1)
        assert (has == has[0]).all(), name
        assert 2 <= int(has[0].sum()) <= 8, name
    face = labels == CLASSES.index("face")
    for p in ("left_eye", "right_eye", "nose", "mouth"):
        assert not torch.isnan(t.parts[p][face]).any()
    for p in ("front_wheel", "roof", "sail"):
        assert torch.isnan(t.parts[p][face]).all()
    # the viewer's left: left_eye lies left of right_eye along the face's own horizontal, flipped or not
    d = t.parts["right_eye"][face] - t.parts["left_eye"][face]
    assert (d[:, 0] > 0).all()
    # shared part types: the parts of more than one class
    owners = {p: sum(not torch.isnan(t.parts[p][labels == c, 0]).all() for c in range(len(CLASSES))) for p in PARTS}
    assert owners["left_eye"] >= 2 and owners["window"] >= 3 and owners["front_wheel"] >= 2


def test_colour_does_not_classify():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import NearestCentroid

    d = load_synthetic("train", n=360, cache=False)
    img = d.images.float()
    mask = d.truth.masks[:, None].float()
    whole = img.mean((2, 3)).numpy() / 255
    obj = ((img * mask).sum((2, 3)) / mask.sum((2, 3))).numpy() / 255
    y = d.labels.numpy()
    chance = 1 / len(CLASSES)
    both = np.concatenate([whole, obj], 1)
    for clf, features in ((NearestCentroid(), whole), (NearestCentroid(), obj), (LogisticRegression(), both)):
        acc = cross_val_score(clf, features, y, cv=4).mean()
        assert acc < chance + 0.07, (clf, acc)
    # control: the same kind of classifier does see the arrangement, in the object's silhouette (cropped to its box)
    crops = []
    for i in range(len(d)):
        x0, y0, x1, y1 = (int(v) for v in d.truth.boxes[i])
        crops.append(F.interpolate(mask[i: i + 1, :, y0:y1, x0:x1], size=(8, 8), mode="area").flatten())
    acc = cross_val_score(NearestCentroid(), torch.stack(crops).numpy(), y, cv=4).mean()
    assert acc > 0.6, acc


def test_224_is_the_same_scene():
    small = load_synthetic("val", n=12, size=64, cache=False)
    big = load_synthetic("val", n=12, size=224, cache=False)
    assert big.images.shape == (12, 3, 224, 224)
    down = F.adaptive_avg_pool2d(big.truth.masks[:, None].float(), 64)[:, 0] >= 0.5
    m = small.truth.masks
    iou = (down & m).flatten(1).sum(1).float() / (down | m).flatten(1).sum(1).float()
    assert float(iou.min()) > 0.85
    img = F.adaptive_avg_pool2d(big.images.float(), 64)
    assert float((img - small.images.float()).abs().mean()) < 8.0
    for name in PARTS:
        a, b = small.truth.parts[name], big.truth.parts[name] * (64 / 224)
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.allclose(a.nan_to_num(0), b.nan_to_num(0), atol=1e-3)
    assert (small.truth.boxes - big.truth.boxes * (64 / 224)).abs().max() < 1.5


def test_render_pose_identity_is_the_stored_image(val120):
    for i in (0, 5, 13, 119):
        image, truth = render_pose("val", i)
        assert torch.equal(image, val120.images[i])
        assert torch.equal(truth.masks[0], val120.truth.masks[i])
        assert torch.equal(truth.boxes[0], val120.truth.boxes[i])
        for name in PARTS:
            assert torch.equal(truth.parts[name][0].nan_to_num(-1), val120.truth.parts[name][i].nan_to_num(-1))


@settings(max_examples=12, deadline=None)
@given(index=st.integers(0, 119), dx=st.integers(-6, 6), dy=st.integers(-6, 6))
def test_render_pose_translation_moves_only_the_object(val120, index, dx, dy):
    image, truth = render_pose("val", index, dx=float(dx), dy=float(dy))
    box0 = val120.truth.boxes[index]
    inside = box0[0] + dx >= 0 and box0[1] + dy >= 0 and box0[2] + dx <= 64 and box0[3] + dy <= 64
    if inside:
        shift = torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        assert (truth.boxes[0] - (box0 + shift)).abs().max() <= 1
        assert int(truth.masks[0].sum()) == pytest.approx(int(val120.truth.masks[index].sum()), abs=8)
    for name in PARTS:
        a, b = val120.truth.parts[name][index], truth.parts[name][0]
        if not torch.isnan(a).any():
            assert torch.allclose(b - a, torch.tensor([dx, dy], dtype=torch.float32), atol=1e-3)
    # background, distractors and noise stay: pixels away from the object before and after are unchanged
    grow = torch.nn.functional.max_pool2d(
        (val120.truth.masks[index] | truth.masks[0])[None, None].float(), 3, 1, 1)[0, 0].bool()
    assert torch.equal(image[:, ~grow], val120.images[index][:, ~grow])


def test_render_pose_scale_and_rotation(val120):
    face = CLASSES.index("face")
    base = val120.truth
    eye_gap = torch.linalg.vector_norm(base.parts["right_eye"][face] - base.parts["left_eye"][face])
    _, scaled = render_pose("val", face, scale=1.25)
    gap = torch.linalg.vector_norm(scaled.parts["right_eye"][0] - scaled.parts["left_eye"][0])
    assert float(gap) == pytest.approx(1.25 * float(eye_gap), rel=1e-4)
    area0 = float(base.masks[face].sum())
    assert float(scaled.masks[0].sum()) == pytest.approx(1.25 ** 2 * area0, rel=0.08)
    _, turned = render_pose("val", face, rotation=90.0)
    v0 = base.parts["right_eye"][face] - base.parts["left_eye"][face]
    v1 = turned.parts["right_eye"][0] - turned.parts["left_eye"][0]
    # counter-clockwise on screen (y down): (x, y) -> (y, -x)
    assert torch.allclose(v1, torch.stack([v0[1], -v0[0]]), atol=1e-3)
    # far enough away the object is gone, and its box says so
    image, gone = render_pose("val", face, dx=200.0)
    assert not gone.masks.any() and torch.isnan(gone.boxes).all()
    assert image.shape == (3, 64, 64)


def test_classes_restrict_and_relabel(val120):
    names = ["car", "face", "tree"]
    d = load_synthetic("val", n=9, classes=names, cache=False)
    assert d.classes == names
    assert d.labels.tolist() == [0, 1, 2] * 3
    full = [CLASSES.index(c) for c in names]
    for j in range(9):
        i = (j // 3) * len(CLASSES) + full[j % 3]
        assert torch.equal(d.images[j], val120.images[i])
        assert torch.equal(d.truth.masks[j], val120.truth.masks[i])
    image, _ = render_pose("val", 4, classes=names)
    assert torch.equal(image, d.images[4])


def test_bad_names_list_the_valid_ones():
    with pytest.raises(ConvscopeError, match="train, val, test"):
        load_synthetic("training", n=2, cache=False)
    with pytest.raises(ConvscopeError, match="face, car"):
        load_synthetic("train", n=2, classes=["face", "unicorn"], cache=False)
    with pytest.raises(ConvscopeError, match="valid splits"):
        render_pose("dev", 0)
    with pytest.raises(ConvscopeError):
        load_synthetic("train", n=2, classes=["face", "face"], cache=False)
    with pytest.raises(ConvscopeError):
        load_synthetic("train", n=-1, cache=False)


def test_cache_is_read_back(tmp_path, monkeypatch):
    first = load_synthetic("test", n=10, seed=1)
    path = cache_path("test", 10, 64, 1)
    assert path.exists() and path.parent == tmp_path / "cache" and path.suffix == ".npz"
    assert path != cache_path("test", 10, 64, 2) and path != cache_path("test", 11, 64, 1)
    assert path != cache_path("test", 10, 64, 1, classes=["face", "car"])

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache file should have been read")

    monkeypatch.setattr(syn, "_generate", no_generation)
    _same(first, load_synthetic("test", n=10, seed=1))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong shape"])
def test_corrupt_cache_is_regenerated(damage):
    first = load_synthetic("test", n=6)
    path = cache_path("test", 6)
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        np.savez(path, images=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_synthetic("test", n=6)
    _same(first, again)
    with np.load(path) as f:  # rewritten whole
        assert f["images"].shape == (6, 3, 64, 64)


def test_preview_draws_the_ground_truth(val120):
    plain = val120.subset(torch.arange(6))
    plain.truth = None
    marked = preview(val120, n=6, scale=2)
    bare = preview(plain, n=6, scale=2)
    assert marked.size == bare.size == (3 * (128 + 4) + 4, 2 * (128 + 14 + 4) + 4)
    a, b = np.asarray(marked).astype(int), np.asarray(bare).astype(int)
    assert (np.abs(a - b).sum(2) > 0).mean() > 0.005
    # the first image's box is outlined in yellow at its scaled corner
    x0, y0, _, _ = (int(v) * 2 for v in val120.truth.boxes[0].tolist())
    assert tuple(a[4 + y0, 4 + x0]) == (255, 255, 0)


def test_parts_that_correspond_keep_one_colour_in_the_same_scenes(val120):
    """synthetic-parts: the same scenes (masks, boxes, part centres, labels, every other pixel), every eye and
    nose in its one colour; on the default set those parts take any colour. The default set's cache name stays."""
    from convscope.data import DataSpec

    fixed = DataSpec("synthetic-parts", n_val=120).load("val")
    assert fixed.name == "synthetic-parts/val" and fixed.classes == val120.classes
    assert torch.equal(fixed.labels, val120.labels) and torch.equal(fixed.truth.masks, val120.truth.masks)
    for k in PARTS:
        assert torch.equal(fixed.truth.parts[k].nan_to_num(-1), val120.truth.parts[k].nan_to_num(-1)), k
    inside = torch.zeros_like(fixed.truth.masks)
    for name, colour in syn.FIXED_PARTS.items():
        xy = fixed.truth.parts[name]
        rows = torch.nonzero(~torch.isnan(xy[:, 0])).flatten()
        assert len(rows) >= 4, name  # faces, robots, fish and rockets among 120 images
        at = [(int(i), int(xy[i, 1]), int(xy[i, 0])) for i in rows]
        got = torch.stack([fixed.images[i, :, y, x] for i, y, x in at]).int()
        was = torch.stack([val120.images[i, :, y, x] for i, y, x in at]).float()
        assert (got - torch.tensor(colour)).abs().max() <= 4, name  # the colour, give or take the pixel noise
        assert was.std(0).mean() > 30, name  # the default set's part colours vary
        for i, y, x in at:
            inside[i, max(y - 8, 0):y + 8, max(x - 8, 0):x + 8] = True
    changed = (fixed.images != val120.images).any(1)
    assert changed.any() and not (changed & ~inside).any()  # nothing changed away from those parts
    assert cache_path("val", 120).name == "synthetic-val-120-64px-41bfa3bb27e7204c4a5b.npz"  # as before the option
    assert cache_path("val", 120, fixed_parts=True).name.startswith("synthetic-parts-val-120-64px-")


def test_concept_maps_are_rendered_with_the_images_and_change_no_pixel(tmp_path, monkeypatch):
    """The dissection's concepts (issue 28): the object map is the object's mask with its class, each named part's
    centre lies on that part (where no later part covers it), shapes include the distractors, every pixel has a
    colour name and every background pixel a texture; a subset's maps are the set's; the images are unchanged."""
    from convscope.data import synthetic as syn

    monkeypatch.setenv("CONVSCOPE_CACHE", str(tmp_path))
    data = syn.load_synthetic("val", n=48, cache=False)
    maps = syn.concept_maps(data.truth.scenes, 64)
    assert maps.shape == (48, 5, 64, 64) and list(syn.CONCEPTS) == ["object", "part", "shape", "colour", "texture"]
    obj, part, shape, colour, texture = maps.unbind(1)
    assert torch.equal(obj > 0, data.truth.masks)
    assert torch.equal(obj.long().amax((1, 2)) - 1, data.labels)
    hits = total = 0
    for k, name in enumerate(syn.PARTS):
        xy = data.truth.parts[name]
        for i in torch.nonzero(~xy[:, 0].isnan()).flatten().tolist():
            x, y = (int(v) for v in xy[i].floor().tolist())
            total += 1
            hits += int(part[i, y, x]) == k + 1
    assert total > 150 and hits / total > 0.9, (hits, total)
    assert bool((part > 0).le(obj > 0).all()) and bool(((shape > 0) & (obj == 0)).any())  # distractors are shapes
    assert bool((colour > 0).all()) and torch.equal(texture == 0, (obj > 0) | (shape > 0))
    striped = torch.tensor([syn._sample_scene(0, 1, i).background["stripes"] is not None for i in range(48)])
    assert torch.equal((texture == 1).flatten(1).any(1), striped)
    sub = data.subset(torch.tensor([7, 3]))
    assert torch.equal(syn.concept_maps(sub.truth.scenes, 64, cache=False), maps[[7, 3]])
    assert len(list(tmp_path.glob("concepts-*.npz"))) == 1 and torch.equal(syn.concept_maps(data.truth.scenes, 64),
                                                                              maps)  # read back from the cache
    scene = syn._sample_scene(0, 1, 5)
    plain, with_maps = syn._render(scene, 64), syn._render(scene, 64, concepts=True)
    for a, b in zip(plain, with_maps[:3]):
        np.testing.assert_array_equal(a, b)  # image, mask, part centres (NaN where absent)
    names = list(syn.COLOURS)
    pure = np.array([[syn.COLOURS[n] for n in names]], np.uint8)
    assert syn.colour_names(pure)[0].tolist() == [k + 1 for k in range(len(names))]


def test_a_scene_drawn_without_a_concept_changes_only_that_concepts_pixels():
    """The check by cause's exact removal: the object or a part drawn away changes its own pixels (and the
    anti-aliased ones at its edge) and nothing else; a shape drawn away changes its pixels; colours and textures
    cannot be drawn away (None)."""
    from convscope.data import synthetic as syn

    data = syn.load_synthetic("val", n=24, cache=False)
    maps = syn.concept_maps(data.truth.scenes, 64, cache=False)
    checked = 0
    for i in range(len(data)):
        scene = data.truth.scenes[i].tolist()
        original = data.images[i].permute(1, 2, 0).numpy().astype(int)
        for category, j in (("object", 0), ("part", 1), ("shape", 2)):
            labels = maps[i, j].unique().tolist()
            label = max(labels)
            if label == 0:
                continue
            name = syn.CONCEPTS[category][label - 1]
            mask = (maps[i, j] == label).float()
            near = F.max_pool2d(mask[None, None], 3, 1, 1)[0, 0].bool().numpy()
            drawn = syn.render_without(scene, 64, category, name)
            changed = np.abs(drawn.astype(int) - original).sum(-1) > 0
            if category != "shape":  # a distractor's arm thinner than half a pixel changes pixels the map gives none
                assert not (changed & ~near).any(), (i, category, name)
            assert changed[mask.bool().numpy()].mean() > 0.8, (i, category, name)
            checked += 1
        assert syn.render_without(scene, 64, "colour", "red") is None
        assert syn.render_without(scene, 64, "part", "no such part") is None
    assert checked >= 60
