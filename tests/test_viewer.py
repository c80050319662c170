"""The viewer (convscope.viewer): stable unit addresses with neighbour links, run files only, local hosts only,
run text escaped, helpful 404s, and clear errors for a non-run or a busy port."""

import re
import socket

import pytest
from helpers import make_fake_run, write_png

from convscope.errors import ConvscopeError
from convscope.viewer import bind, make_app, safe_path, serve

pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")


@pytest.fixture
def run_dir(tmp_path):
    run = make_fake_run(tmp_path / "run")
    (tmp_path / "secret.txt").write_text("outside the run")
    (run / "figures" / "link_out.txt").symlink_to(tmp_path / "secret.txt")
    (run / "figures" / "link_in.json").symlink_to(run / "config.json")
    return run


@pytest.fixture
def client(run_dir):
    from starlette.testclient import TestClient

    return TestClient(make_app(run_dir), base_url="http://127.0.0.1")


def links(html: str) -> dict[str, str]:
    found = re.findall(r'<link rel="([\w-]+)" href="([^"]*)">', html)
    return {rel: href for rel, href in found if rel not in ("stylesheet", "icon")}


def test_unit_page_shows_the_unit_and_its_neighbours(client):
    r = client.get("/layer/conv5/unit/3")
    assert r.status_code == 200
    html = r.text
    assert 'src="/files/figures/units/conv5/unit_0003.png"' in html
    assert 'src="/files/figures/evolution/conv5/unit_0003.png"' in html
    assert "epochs 1, 2, 3" in html
    assert links(html) == {"prev": "/layer/conv5/unit/2", "next": "/layer/conv5/unit/7",
                           "prev-layer": "/layer/conv1/unit/0", "up": "/layer/conv5"}
    assert 'id="next" href="/layer/conv5/unit/7"' in html and 'id="prev" href="/layer/conv5/unit/2"' in html
    assert '<script src="/static/viewer.js" defer></script>' in html
    assert "Content-Security-Policy" in r.headers and "script-src 'self'" in r.headers["Content-Security-Policy"]


def test_unit_page_of_unit_2_and_crossing_layers(client):
    html = client.get("/layer/conv5/unit/2").text
    assert 'src="/files/figures/units/conv5/unit_0002.png"' in html
    assert links(html)["prev"] == "/layer/conv1/unit/0"  # previous unit crosses into the layer before
    assert links(html)["next"] == "/layer/conv5/unit/3"
    first = client.get("/layer/conv1/unit/0").text
    assert "prev" not in links(first) and links(first)["next-layer"] == "/layer/conv5/unit/2"
    assert links(client.get("/layer/conv5/unit/7").text).get("next") is None
    assert client.get("/files/figures/units/conv5/unit_0002.png").content[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_and_layer_pages(client):
    index = client.get("/")
    assert index.status_code == 200
    for url in ("/layer/conv1", "/layer/conv5", "/layer/conv5/unit/2", "/layer/conv5/unit/7", "/figures"):
        assert f'href="{url}"' in index.text
    assert links(index.text) == {"next": "/layer/conv1/unit/0"}
    layer = client.get("/layer/conv5").text
    assert 'src="/files/figures/fig2_conv5.png"' in layer and 'src="/files/figures/fig4_conv5.png"' in layer
    assert links(layer) == {"next": "/layer/conv5/unit/2", "prev-layer": "/layer/conv1"}
    figures = client.get("/figures").text
    assert 'src="/files/figures/fig6.png"' in figures and 'src="/files/figures/fig7.png"' in figures
    assert "Fig. 7" in figures and "Occlusion sensitivity" in figures


def test_class_names_are_escaped(client):
    html = client.get("/").text
    assert "<li>&lt;img src=x onerror=alert(1)&gt;</li>" in html
    assert "<img src=x" not in html
    assert "<li>dog &amp; co</li>" in html


def test_missing_unit_and_layer_are_404_with_a_helpful_message(client):
    r = client.get("/layer/conv5/unit/99")
    assert r.status_code == 404
    assert "layer &#39;conv5&#39; has no unit 99 in this run; its units: 2, 3, 7" in r.text
    assert "`convscope scan RUN` draws every unit" in r.text and 'id="back" href="/layer/conv5"' in r.text
    r = client.get("/layer/fc9/unit/1")
    assert r.status_code == 404 and "no figures for layer &#39;fc9&#39;; its layers: conv1, conv5" in r.text
    assert client.get("/layer/conv5/unit/abc").status_code == 404


def test_files_serves_run_files_only(client, run_dir):
    assert client.get("/files/config.json").json()["model"] == "zfnet_small"
    assert client.get("/files/figures/link_in.json").status_code == 200  # a link that stays inside is fine
    for url in ("/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt", "/files/figures/%2e%2e/%2e%2e/secret.txt",
                "/files/..%2fsecret.txt", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd",
                f"/files/{run_dir.parent / 'secret.txt'}", "/files/figures/link_out.txt", "/files/nope.png",
                "/files/figures", "/files/"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "outside the run" not in r.text and "root:" not in r.text


def test_safe_path_refuses_traversal(run_dir):
    root = run_dir.resolve()
    assert safe_path(root, "config.json") == root / "config.json"
    for bad in ("../secret.txt", "figures/../../secret.txt", "/etc/passwd", str(root / ".." / "secret.txt"),
                "figures/link_out.txt", "", "a\x00b", "figures/units"):
        assert safe_path(root, bad) is None, bad


def test_foreign_host_is_refused(run_dir):
    from starlette.testclient import TestClient

    app = make_app(run_dir)
    assert TestClient(app, base_url="http://evil.example").get("/").status_code == 400
    assert TestClient(app, base_url="http://127.0.0.1:8765").get("/").status_code == 200
    assert TestClient(app, base_url="http://localhost:8765").get("/files/config.json").status_code == 200
    bound = make_app(run_dir, allowed_hosts=["myhost.lan"])
    assert TestClient(bound, base_url="http://myhost.lan").get("/").status_code == 200


def test_a_non_run_is_an_error(tmp_path):
    with pytest.raises(ConvscopeError, match="not a convscope run"):
        make_app(tmp_path)
    with pytest.raises(ConvscopeError, match="not a convscope run"):
        serve(tmp_path, port=0)


def test_a_port_in_use_is_an_error(run_dir):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConvscopeError, match=f"cannot serve on 127.0.0.1:{port}.*in use.*--port"):
            serve(run_dir, port=port)
        with pytest.raises(ConvscopeError, match="cannot serve on host"):
            bind("no-such-host.invalid", 8000)
    finally:
        taken.close()


def test_static_script_is_served(client):
    r = client.get("/static/viewer.js")
    assert r.status_code == 200 and "ArrowRight" in r.text and "prev-layer" in r.text


def test_the_scan_is_read_again_when_it_changes_and_few_are_kept(tmp_path):
    """The viewer's unit pages read the scan through convscope.scanned: once per version of the file, and a
    process that opens many runs keeps the last few."""
    import os

    import torch

    from convscope import scanned
    from convscope.layout import Layout
    from convscope.topk import TopK, save_topk

    def write(root, value):
        topk = TopK(1, {"conv1": torch.tensor([[value]])}, {"conv1": torch.tensor([[7]])},
                    {"conv1": torch.tensor([[[1, 2]]])}, seen=8)
        save_topk(Layout(root).topk, topk, {"rule": "deconvnet"})

    write(tmp_path / "a", 1.5)
    layout = Layout(tmp_path / "a")
    assert scanned.top(layout, "conv1", 0) == [{"value": 1.5, "image": 7, "position": (1, 2)}]
    write(tmp_path / "a", 2.5)
    os.utime(layout.topk, ns=(1, 1))  # a new version, whatever the clock's resolution
    assert scanned.top(layout, "conv1", 0)[0]["value"] == 2.5
    for i in range(scanned._KEPT + 2):
        write(tmp_path / f"r{i}", float(i))
        assert scanned.top(Layout(tmp_path / f"r{i}"), "conv1", 0)[0]["value"] == float(i)
    assert len(scanned._cache) == scanned._KEPT and layout.topk not in scanned._cache
    assert scanned.rules(layout) == ("deconvnet", ["deconvnet"]) and scanned.unit_classes(layout, "conv1") is None


def test_layers_come_in_the_order_the_forward_pass_reaches_them(tmp_path):
    """An attached ResNet's stem ReLU first, then layer1..layer4 (before: alphabetical, the stem last), as the
    scan records them; a layer with pictures but outside the scan after them."""
    import torch

    from convscope.layout import Layout
    from convscope.topk import TopK, save_topk
    from convscope.viewer import RunView

    root = make_fake_run(tmp_path / "run")
    layout = Layout(root)
    order = ["relu", "layer1", "layer2", "layer10"]
    for layer in order:
        write_png(layout.unit(layer, 0), (8, 8))
    one = {layer: torch.zeros(1, 1) for layer in order}
    save_topk(layout.topk, TopK(1, one, {k: torch.zeros(1, 1, dtype=torch.long) for k in order},
                                {k: torch.zeros(1, 1, 2, dtype=torch.long) for k in order}, seen=1), {})
    assert RunView(root).layers == [*order, "conv1", "conv5"]  # the fake run's own pictures come after
