"""The data-set scan (paper Fig. 2): exact top-k per unit, shard + merge equals one pass, resume, distinct images."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convscope.data import ImageSet
from convscope.errors import ConvscopeError
from convscope.topk import from_activations, load_topk, merge, save_topk, scan, scan_shard


def _brute_force(acts: torch.Tensor, k: int):
    """Reference: per channel, each image's first row-major maximum, then sort by (-value, image)."""
    n, c = acts.shape[:2]
    out = []
    for ch in range(c):
        entries = []
        for i in range(n):
            flat = acts[i, ch].flatten()
            j = int(torch.argmax(flat))  # first maximum
            entries.append((-float(flat[j]), i, j // acts.shape[-1], j % acts.shape[-1]))
        out.append(sorted(entries)[:k])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 4), st.integers(1, 9), st.lists(st.integers(1, 29), max_size=5),
       st.integers(0, 2**16))
def test_merge_of_any_split_equals_the_single_pass(n, c, k, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, 4, (n, c, 3, 3), generator=g).float()  # few distinct values: many ties
    k = min(k, n)
    whole = from_activations({"l": acts}, torch.arange(n), k)
    bounds = sorted({0, n, *[x for x in cuts if x < n]})
    parts = [from_activations({"l": acts[a:b]}, torch.arange(a, b), k) for a, b in zip(bounds, bounds[1:])]
    merged = merge(parts[::-1])  # order of the partials must not matter either
    perm = torch.randperm(n, generator=g)  # nor the order of the images inside a batch
    shuffled = from_activations({"l": acts[perm]}, perm, k)
    channels_last = from_activations({"l": acts.contiguous(memory_format=torch.channels_last)}, torch.arange(n), k)
    for field in ("values", "images", "positions"):
        assert torch.equal(getattr(shuffled, field)["l"], getattr(whole, field)["l"])
        assert torch.equal(getattr(channels_last, field)["l"], getattr(whole, field)["l"])  # the scan's layout
    for field in ("values", "images", "positions"):
        assert torch.equal(getattr(merged, field)["l"], getattr(whole, field)["l"])
    assert merged.seen == whole.seen == n
    ref = _brute_force(acts, k)
    for ch in range(c):
        assert whole.values["l"][ch].tolist() == [-e[0] for e in ref[ch]]
        assert whole.images["l"][ch].tolist() == [e[1] for e in ref[ch]]
        assert whole.positions["l"][ch].tolist() == [[e[2], e[3]] for e in ref[ch]]


class _Probe(nn.Module):
    """conv: channel 0 = red, channel 1 = green - blue (a hand-set 1x1 conv), then ReLU; fc: the mean red."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, -1.0]]).view(2, 3, 1, 1))
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        h = self.relu(self.conv(x))
        return self.fc(h.mean((2, 3)))


def _dataset():
    """Six 4x4 images; image i has one red pixel of value 40*i at (i % 4, 3 - i % 4), and green where i is odd."""
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    for i in range(6):
        images[i, 0, i % 4, 3 - i % 4] = 40 * i
        if i % 2:
            images[i, 1, 1, 2] = 200
    return ImageSet(images, torch.zeros(6, dtype=torch.long), ["x"])


def test_hand_made_dataset_top_k_is_known():
    data, model = _dataset(), _Probe()
    t = scan(model, data, ["conv", "relu"], k=3, batch_size=4, progress=False)
    # red: the brightest red pixels are images 5, 4, 3 at their known places
    assert t.images["relu"][0].tolist() == [5, 4, 3]
    assert t.values["relu"][0].tolist() == pytest.approx([200 / 255, 160 / 255, 120 / 255])
    assert t.positions["relu"][0].tolist() == [[1, 2], [0, 3], [3, 0]]
    # green: odd images tie at 200/255 at (1, 2) -> ordered by index; every image distinct
    assert t.images["relu"][1].tolist() == [1, 3, 5]
    assert t.positions["relu"][1].tolist() == [[1, 2]] * 3
    # the pre-ReLU layer sees negative green-blue nowhere here; same winners
    assert torch.equal(t.images["conv"], t.images["relu"])
    assert t.seen == 6


def test_distinct_images_per_unit_on_a_real_net():
    from convscope import create_model

    torch.manual_seed(0)
    model = create_model("zfnet_small", 5)
    images = (torch.rand(40, 3, 64, 64) * 255).to(torch.uint8)
    data = ImageSet(images, torch.zeros(40, dtype=torch.long), ["a", "b", "c", "d", "e"])
    t = scan(model, data, ["conv2", "conv5", "fc6"], k=9, batch_size=16, progress=False)
    for layer in ("conv2", "conv5", "fc6"):
        imgs = t.images[layer]
        assert all(len(set(row.tolist())) == 9 for row in imgs)
        assert (t.values[layer][:, :-1] >= t.values[layer][:, 1:]).all()
    # the recorded value is the unit's activation at the recorded position (checked directly)
    from convscope.forward import run_to_all
    from convscope.layers import resolve_layer

    model.eval()
    with torch.no_grad():
        act = run_to_all(model, [resolve_layer(model, "conv5")[1]], data.batch(torch.arange(40))[0])[0]
    for ch in (0, 7, 33):
        for v, i, (r, c) in zip(t.values["conv5"][ch], t.images["conv5"][ch], t.positions["conv5"][ch]):
            assert float(act[i, ch, r, c]) == pytest.approx(float(v), rel=1e-5, abs=1e-6)
            assert float(act[i, ch, r, c]) == pytest.approx(float(act[i, ch].max()), rel=1e-6, abs=1e-7)
    assert (t.positions["fc6"] == 0).all()


class _Viewing(nn.Module):
    """A model as older code writes it: ``x.view(n, -1)`` after a convolution, which a channels-last
    activation refuses (a RuntimeError): the scan must fall back to row-major inputs and still be exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))


def test_a_model_that_refuses_channels_last_is_scanned_row_major():
    torch.manual_seed(0)
    model = _Viewing()
    images = (torch.rand(10, 3, 8, 8) * 255).to(torch.uint8)
    data = ImageSet(images, torch.zeros(10, dtype=torch.long), ["x"])
    with pytest.raises(RuntimeError, match="view"):  # the failure the scan works around
        model(torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    with pytest.warns(UserWarning, match="refused channels-last input .*view.*scanning row-major"):
        t = scan(model, data, ["conv", "fc"], k=3, batch_size=4, progress=False)
    with torch.no_grad():
        x = data.batch(torch.arange(10))[0]
        expect = {"conv": model.conv(x), "fc": model(x)}
    for name, act in expect.items():
        ref = from_activations({name: act}, torch.arange(10), 3)
        assert torch.equal(t.images[name], ref.images[name]) and torch.equal(t.positions[name], ref.positions[name])
        assert torch.allclose(t.values[name], ref.values[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("message", ["DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB",
                                     "CUDA out of memory. Tried to allocate 2.00 GiB"])
def test_out_of_memory_in_the_scan_says_how_to_fit_instead_of_changing_layout(monkeypatch, message):
    import convscope.topk as topk

    def exhausted(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(topk, "_capture", exhausted)
    with pytest.raises(ConvscopeError, match=r"out of memory scanning 4 images at once .*--batch-size 1\)"):
        scan(_Probe(), _dataset(), ["relu"], k=2, batch_size=4, progress=False)


def test_a_models_own_error_in_the_scan_is_raised_not_worked_around(monkeypatch):
    class Broken(_Probe):
        def forward(self, x):
            raise RuntimeError("shapes cannot be multiplied (the model's own bug)")

    with pytest.raises(RuntimeError, match="the model's own bug"), pytest.warns(UserWarning, match="row-major"):
        scan(Broken(), _dataset(), ["relu"], k=2, batch_size=8, progress=False)


def test_interrupted_scan_resumes_to_the_same_result(tmp_path, monkeypatch):
    import convscope.topk as topk

    data, model = _dataset(), _Probe()
    whole = scan(model, data, ["relu"], k=2, batch_size=1, progress=False)
    state = tmp_path / "scan.state"
    calls = {"n": 0}
    real = topk.scan_shard

    def crash_after_two(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(topk, "scan_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        scan(model, data, ["relu"], k=2, batch_size=1, save_every=1, state_path=state, progress=False)
    monkeypatch.setattr(topk, "scan_shard", real)
    seen = []

    def record(m, d, idx, *a, **kw):
        seen.append(idx.tolist())
        return real(m, d, idx, *a, **kw)

    monkeypatch.setattr(topk, "scan_shard", record)
    resumed = scan(model, data, ["relu"], k=2, batch_size=1, save_every=1, state_path=state, progress=False)
    assert seen == [[2], [3], [4], [5]]  # only what was left
    for field in ("values", "images", "positions"):
        assert torch.equal(getattr(resumed, field)["relu"], getattr(whole, field)["relu"])
    monkeypatch.undo()
    other = scan(model, data, ["relu"], k=3, batch_size=1, progress=False)
    with pytest.warns(UserWarning, match="left by another scan .*differs in k.*starts over"):
        got = scan(model, data, ["relu"], k=3, batch_size=1, state_path=state, progress=False)
    assert torch.equal(got.images["relu"], other.images["relu"])


def test_a_scan_never_resumes_from_another_scans_or_a_damaged_state(tmp_path):
    """Before: `scan --split val` killed, then `scan --split test`, resumed from val's state and wrote a top-k
    mixing both splits, labelled test; a damaged state ended in a traceback."""
    import convscope.topk as topk
    from convscope import artifacts

    model, data, state = _Probe(), _dataset(), tmp_path / "state.pt"
    whole = scan(model, data, ["relu"], k=2, batch_size=1, progress=False)
    half = scan_shard(model, data, range(3), ["relu"], k=2)
    key = {"layers": ["relu"], "k": 2, "n": len(data), "batch_size": 1, "class_k": 0}
    saved = {"key": {**key, "split": "val"}, "done": 3, "topk": topk._to_state(half)}
    pickled = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"key": key, "done": 3, "topk": Evil()}, pickled)
    cases = [(saved, "differs in split"), (b"", "damaged"), (b"\x80\x04 truncated", "damaged"), ([1, 2], "damaged"),
             ({**saved, "key": key, "done": -5}, "damaged .*-5"), (pickled.read_bytes(), "damaged .*Unpickling")]
    for content, message in cases:
        if isinstance(content, bytes):
            state.write_bytes(content)
        else:
            artifacts.save_torch(state, content)
        with pytest.warns(UserWarning, match=message):
            got = scan(model, data, ["relu"], k=2, batch_size=1, state_path=state, progress=False,
                       identity={"split": "test"} if content is saved else None)
        assert torch.equal(got.images["relu"], whole.images["relu"]) and got.seen == len(data), message


def test_save_and_load_round_trip(tmp_path):
    t = scan_shard(_Probe(), _dataset(), range(6), ["relu"], k=4)
    path = save_topk(tmp_path / "topk.safetensors", t, {"split": "val"})
    back, info = load_topk(path)
    assert info["split"] == "val" and back.k == 4 and back.seen == 6
    assert torch.equal(back.images["relu"], t.images["relu"])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConvscopeError, match="not a readable convscope scan"):
        load_topk(path)


def test_bad_input():
    data, model = _dataset(), _Probe()
    with pytest.raises(ConvscopeError, match="larger than the data set"):
        scan(model, data, ["relu"], k=7)
    with pytest.raises(ConvscopeError, match="empty"):
        scan(model, data.subset([]), ["relu"], k=1)
    with pytest.raises(ConvscopeError, match="valid layers"):
        scan(model, data, ["conv9"], k=1)


def test_per_class_statistics_are_the_brute_force_ones_and_merge_exactly(tmp_path):
    """Each map's top class_k per class (zennit-crp's per-class reference statistics) equals sorting, per class,
    every image's strongest activation (value descending, lower index first); shards merge exactly; the class
    histogram of a map is the count of the classes of its class_k strongest images."""
    from convscope.models import create_model
    from convscope.topk import class_histogram

    torch.manual_seed(0)
    model = create_model("zfnet_small", num_classes=4, widths=[8, 8, 12, 12, 8], fc=[16, 16]).eval()
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2] * 5 + [1])  # 41 images; class 3 has 5, fewer than class_k
    data = ImageSet(torch.randint(0, 256, (41, 3, 64, 64), generator=g, dtype=torch.uint8), labels, list("abcd"))
    whole = scan(model, data, ["conv2", "conv5"], k=7, batch_size=6, progress=False, class_k=7)
    from convscope.forward import run_to
    from convscope.layers import site

    with torch.no_grad():
        best = run_to(model, site(model, "conv2"), data.batch(torch.arange(41))[0]).flatten(2).amax(2)
    assert whole.class_values["conv2"].shape == (8, 4, 7)
    for ch in range(8):
        for cls in range(4):
            members = torch.nonzero(labels == cls).flatten().tolist()
            ranked = sorted(members, key=lambda i: (-best[i, ch].item(), i))[:7]
            got = whole.class_images["conv2"][ch, cls]
            assert got[:len(ranked)].tolist() == ranked and (got[len(ranked):] == -1).all()
            torch.testing.assert_close(whole.class_values["conv2"][ch, cls, :len(ranked)], best[ranked, ch])
    # the histogram: the classes of each map's 7 strongest images, counted from the scan's own top-7 indices
    hist = class_histogram(whole, "conv5")
    for ch in range(whole.values["conv5"].shape[0]):
        counted = torch.bincount(labels[whole.images["conv5"][ch]], minlength=4)
        assert hist[ch].tolist() == counted.tolist() and hist[ch].sum() == 7
    parts = merge([scan_shard(model, data, range(0, 17), ["conv2", "conv5"], 7, batch_size=5, class_k=7),
                   scan_shard(model, data, range(17, 41), ["conv2", "conv5"], 7, batch_size=9, class_k=7)])
    for layer in ("conv2", "conv5"):
        assert torch.equal(parts.class_images[layer], whole.class_images[layer])
        assert torch.equal(parts.class_values[layer], whole.class_values[layer])
    saved, _ = load_topk(save_topk(tmp_path / "t.safetensors", whole))
    assert saved.class_k == 7 and torch.equal(saved.class_images["conv5"], whole.class_images["conv5"])
    with pytest.raises(ConvscopeError, match="no per-class statistics"):
        class_histogram(scan(model, data, ["conv5"], k=3, progress=False), "conv5")
