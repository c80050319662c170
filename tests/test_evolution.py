"""Fig. 4: each unit's strongest training activation at every saved epoch, projected."""

import numpy as np
import pytest
import torch

import convscope as cs
from convscope.data import ImageSet
from convscope.evolution import EvolutionResult, evolution, evolution_grid, write_evolution
from convscope.layout import Layout
from convscope.topk import scan


def test_evolution_tracks_the_strongest_activation_at_each_epoch(tmp_path):
    torch.manual_seed(0)
    early = cs.create_model("zfnet_small", 3)
    late = cs.create_model("zfnet_small", 3)
    data = ImageSet((torch.rand(20, 3, 64, 64) * 255).to(torch.uint8), torch.arange(20) % 3, ["a", "b", "c"])
    units = {"conv1": torch.tensor([0, 5]), "conv5": torch.tensor([2, 9, 30])}
    ev = evolution({1: early, 5: late, 2: early}, data, units)
    assert ev["conv5"].epochs == [1, 2, 5]
    for layer, u in units.items():
        e = ev[layer]
        assert e.projections.shape[:2] == (3, len(u))
        # the same weights at epochs 1 and 2: the same pictures
        assert torch.equal(e.projections[0], e.projections[1]) and torch.equal(e.images[0], e.images[1])
        for epoch_i, model in ((0, early), (2, late)):
            ref = scan(model, data, [layer], k=1, progress=False)
            assert e.images[epoch_i].tolist() == ref.images[layer][u, 0].tolist()
            torch.testing.assert_close(e.values[epoch_i], ref.values[layer][u, 0])
    assert not torch.equal(ev["conv5"].projections[0], ev["conv5"].projections[2])
    grid = evolution_grid(ev["conv5"])  # conv5 sees the whole 64 px image: 64 px tiles, 3 units x 3 epochs
    assert grid.shape == (2 + 3 * 66, 2 + 3 * 66, 3)
    row, col = 1, 2  # unit 9 at epoch 5
    tile = grid[2 + row * 66:2 + row * 66 + 64, 2 + col * 66:2 + col * 66 + 64]
    assert (tile == cs.to_image(ev["conv5"].projections[col, row])).all()
    layout = Layout(tmp_path)
    paths = write_evolution(EvolutionResult(ev, "deconvnet", "error"), layout)
    names = sorted(p.relative_to(tmp_path / "figures").as_posix() for p in paths)
    assert names[-3:] == ["fig4.json", "fig4_conv1.png", "fig4_conv5.png"]
    assert names[:5] == ["evolution/conv1/unit_0000.png", "evolution/conv1/unit_0005.png",
                         "evolution/conv5/unit_0002.png", "evolution/conv5/unit_0009.png",
                         "evolution/conv5/unit_0030.png"]
    from PIL import Image

    assert (np.asarray(Image.open(layout.layer_figure("fig4", "conv5"))) == grid).all()
    # a later call for one layer keeps the others' numbers
    write_evolution(EvolutionResult({"conv1": ev["conv1"]}, "deconvnet", "error"), layout)
    import json

    saved = json.loads(layout.figure("fig4", ".json").read_text())
    assert sorted(saved) == ["conv1", "conv5"]
    assert saved["conv5"]["images"] == ev["conv5"].images.tolist() and saved["conv5"]["epochs"] == [1, 2, 5]
    # a damaged record (a half-written file from before atomic writes, an edit) is written anew, not a crash
    layout.figure("fig4", ".json").write_text('{"conv5": [1, 2')
    write_evolution(EvolutionResult({"conv1": ev["conv1"]}, "deconvnet", "error"), layout)
    assert sorted(json.loads(layout.figure("fig4", ".json").read_text())) == ["conv1"]
    with pytest.raises(cs.ConvscopeError, match="no checkpoints"):
        evolution({}, data, units)
