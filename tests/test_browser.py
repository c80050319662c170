"""The report and the viewer in a real browser (playwright driving Debian's chromium): every image loads, no
console error, keyboard navigation, a malicious class name stays text, and the live server refuses paths out of
the run and foreign hosts."""

import http.client
import socket
import time

import pytest
import torch
from helpers import ARGS, CHROMIUM, EVIL, ODD, Watched, make_fake_run, require_chromium, serving

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _chromium():
    require_chromium()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    run = make_fake_run(root / "run")
    (root / "secret.txt").write_text("outside the run")
    (run / "figures" / "link_out.txt").symlink_to(root / "secret.txt")
    return run


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir) as address:
        yield address


@pytest.mark.parametrize("out", [None, "elsewhere/sub dir/r #2.html"])
def test_report_from_file_shows_every_image(browser, tmp_path, out):
    """Opened from file:// (no server), the page shows each of its 7 images, linked from files of a run whose name
    needs percent-encoding, whether it is written in the run or elsewhere (``out=``); each image links to its
    file (the full size, a click away)."""
    from convscope.report import build_report

    run = make_fake_run(tmp_path / ODD)
    report = build_report(run, out=None if out is None else tmp_path / out)
    assert report.stat().st_size < 40_000
    w = Watched(browser)
    w.page.goto(report.as_uri())
    w.page.wait_for_load_state("load")
    images = w.images()
    assert len(images) == 7
    assert all(complete and width > 0 for _, complete, width in images), images
    assert w.page.evaluate("Array.from(document.images).every(i => i.src.startsWith('file:///') && "
                           "!i.src.includes('data:') && i.closest('a').href === i.src)")
    assert w.page.get_by_text(EVIL, exact=False).count() == 1  # the class name, shown as text
    assert w.page.locator("img[src='x']").count() == 0
    assert w.errors == [] and w.dialogs == []
    w.page.close()


def test_viewer_deep_link_and_keyboard(browser, server):
    host, port = server
    base = f"http://{host}:{port}"
    w = Watched(browser)
    page = w.page
    page.goto(f"{base}/layer/conv5/unit/2")
    assert page.locator("#unit-title").get_attribute("data-unit") == "2"
    assert "conv5 · unit 2" in page.locator("#unit-title").inner_text()
    assert all(width > 0 for _, _, width in w.images()) and len(w.images()) == 2
    page.keyboard.press("ArrowRight")
    page.wait_for_url(f"{base}/layer/conv5/unit/3")
    assert page.locator("#unit-title").get_attribute("data-unit") == "3"
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(f"{base}/layer/conv5/unit/2")
    page.keyboard.press("ArrowUp")
    page.wait_for_url(f"{base}/layer/conv1/unit/0")
    page.keyboard.press("]")
    page.wait_for_url(f"{base}/layer/conv5/unit/2")
    page.keyboard.press("PageUp")
    page.wait_for_url(f"{base}/layer/conv1/unit/0")
    assert page.locator("#help").is_hidden()
    page.keyboard.press("?")
    assert page.locator("#help").is_visible() and "next layer" in page.locator("#help").inner_text()
    page.keyboard.press("Escape")
    assert page.locator("#help").is_hidden()
    assert w.errors == [] and w.dialogs == []
    page.close()


def test_viewer_shows_a_malicious_class_name_as_text(browser, server):
    host, port = server
    w = Watched(browser)
    w.page.goto(f"http://{host}:{port}/")
    assert w.page.locator("ol.classes li").all_inner_texts() == ["cat", EVIL, "dog & co"]
    assert w.page.locator("img").count() == 0
    w.page.goto(f"http://{host}:{port}/figures")
    assert all(width > 0 for _, _, width in w.images()) and len(w.images()) == 3
    time.sleep(0.2)
    assert w.dialogs == [] and w.errors == []
    w.page.close()


def _raw_get(host, port, path, host_header=None):
    """A GET with the path sent exactly as written (browsers and httpx would normalise ``..`` away)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host_header or f"{host}:{port}")
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def test_live_server_serves_the_run_only(server):
    host, port = server
    assert _raw_get(host, port, "/files/config.json")[0] == 200
    for path in ("/files/../secret.txt", "/files/figures/../../secret.txt", "/files/%2e%2e/secret.txt",
                 "/files/%2e%2e%2fsecret.txt", "/files/figures/link_out.txt", "/files//etc/passwd",
                 "/files/%2Fetc%2Fpasswd", "/../secret.txt"):
        status, body = _raw_get(host, port, path)
        assert status == 404, path
        assert b"outside the run" not in body
    assert _raw_get(host, port, "/", host_header="evil.example")[0] == 400
    assert _raw_get(host, port, "/", host_header=f"localhost:{port}")[0] == 200


def test_serve_refuses_a_port_in_use(server, run_dir):
    from convscope.errors import ConvscopeError
    from convscope.viewer import serve

    with pytest.raises(ConvscopeError, match="in use"):
        serve(run_dir, port=server[1])
    with socket.create_connection(server, timeout=5):
        pass  # the running server is untouched


@pytest.fixture(scope="module")
def scanned_run(trained_run, tmp_path_factory):
    """A copy of the trained zfnet_small run with every unit of every conv layer drawn (deconvnet and guided),
    the class statistics over each unit's top 9."""
    import shutil

    from convscope import analyses
    from convscope.run import open_run

    root = tmp_path_factory.mktemp("scanned") / "run"
    shutil.copytree(trained_run.path, root, ignore=shutil.ignore_patterns("checkpoints", "scan", "figures", ".lock"))
    run = open_run(root)
    result, _ = analyses.get("scan").run(run, split="val", rule="deconvnet,guided", class_k=9)
    return root, result, run.split("val")


def test_every_unit_of_a_trained_run_in_the_viewer(browser, scanned_run, monkeypatch):
    """Every conv unit of zfnet_small has a unit page; the layer page shows all its units (paged), jumps to a
    unit by number, sorts by class specificity; the keys move; every image shows; bad unit numbers are 404 pages
    that link back to the layer; the class counts are those of the scan's own top-9 images and labels."""
    from starlette.testclient import TestClient

    import convscope.viewer as viewer
    from convscope.layout import Layout
    from convscope.topk import class_histogram

    root, result, data = scanned_run
    layout = Layout(root)
    widths = {"conv1": 32, "conv2": 64, "conv3": 96, "conv4": 96, "conv5": 64}
    client = TestClient(viewer.make_app(root), base_url="http://127.0.0.1")
    for layer, n in widths.items():
        assert result.units[layer].tolist() == list(range(n))
        for u in range(n):
            assert layout.unit(layer, u).is_file() and layout.unit(layer, u, "guided").is_file()
            assert layout.unit_thumb(layer, u).is_file()
        hist = class_histogram(result.topk, layer)
        for u in range(n):
            counted = torch.bincount(data.labels[result.topk.images[layer][u]], minlength=len(data.classes))
            assert hist[u].tolist() == counted.tolist()
    assert [client.get(f"/layer/{layer}/unit/{u}").status_code for layer, n in widths.items()
            for u in range(n)] == [200] * sum(widths.values())
    # the unit page names the classes of its top 9 with their counts, most first
    hist = class_histogram(result.topk, "conv5")[17]
    best = int(hist.argmax())
    page = client.get("/layer/conv5/unit/17").text
    assert f"{data.classes[best]} <b>{int(hist[best])}</b>" in page and "strongest images" in page
    # sorted by class specificity: the share of the top class never rises down the page
    sorted_page = client.get("/layer/conv5?sort=fig2").text
    import re

    order = [int(u) for u in re.findall(r'id="u(\d+)"', sorted_page)]
    hist = class_histogram(result.topk, "conv5")
    shares = [hist[u].max().item() / 9 for u in order]
    assert sorted(order) == list(range(64)) and shares == sorted(shares, reverse=True) and shares[0] > shares[-1]
    for bad in ("/layer/conv3/unit/96", "/layer/conv3/unit/abc", "/layer/conv3/unit/" + "9" * 5000,
                "/layer/conv3/goto?unit=x", "/layer/conv3?page=9"):
        r = client.get(bad)
        assert r.status_code == 404 and 'id="back" href="/layer/conv3"' in r.text, bad
    monkeypatch.setattr(viewer, "PAGE", 40)  # a layer of thousands pages: here conv3's 96 in three pages
    pages = [client.get(f"/layer/conv3?page={n}").text for n in (1, 2, 3)]
    assert [len(re.findall(r'<img src="/files/figures/units/conv3/thumb/', p)) for p in pages] == [40, 40, 16]
    assert all('loading="lazy"' in p for p in pages)
    monkeypatch.undo()

    with serving(root) as (host, port):
        w = Watched(browser)
        base = f"http://{host}:{port}"
        w.page.goto(f"{base}/layer/conv3")
        for _ in range(20):  # scroll through: lazy thumbnails load as they come into view
            w.page.mouse.wheel(0, 600)
            w.page.wait_for_timeout(50)
        w.page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        images = w.images()
        assert len(images) == 96 + 1 and all(width > 0 for _, _, width in images)  # 96 thumbnails + Fig. 2
        w.page.fill("#jump", "42")
        w.page.press("#jump", "Enter")
        w.page.wait_for_url(f"{base}/layer/conv3/unit/42")
        assert all(width > 0 for _, _, width in w.images())
        w.page.keyboard.press("ArrowRight")
        w.page.wait_for_url(f"{base}/layer/conv3/unit/43")
        w.page.keyboard.press("ArrowDown")
        w.page.wait_for_url(f"{base}/layer/conv4/unit/0")
        w.page.keyboard.press("ArrowLeft")
        w.page.wait_for_url(f"{base}/layer/conv3/unit/95")
        w.page.click("a.rule")
        w.page.wait_for_url(f"{base}/layer/conv3/unit/95?rule=guided")
        src = w.page.get_attribute("#unit-img", "src")
        assert src.endswith("/units/conv3/guided/unit_0095.jpg") and all(x > 0 for _, _, x in w.images())
        assert w.errors == [] and w.dialogs == []


def test_a_projection_at_full_resolution_is_computed_when_a_unit_page_asks(scanned_run):
    """The unit page links each of its projections at full resolution, under the rule shown; asked for, the
    viewer computes it from the run's model: the projection the scan drew, at its receptive field's own pixels
    (enlarged pixel by pixel to 128 px), not the page's 128-px JPEG. A rank or unit the scan has not is a 404."""
    import io

    import numpy as np
    from PIL import Image
    from starlette.testclient import TestClient

    from convscope.imaging import to_image, upscale
    from convscope.viewer import make_app

    root, result, _ = scanned_run
    client = TestClient(make_app(root), base_url="http://127.0.0.1")
    page = client.get("/layer/conv3/unit/5?rule=guided").text
    assert 'href="/layer/conv3/unit/5/zoom/1?rule=guided"' in page and "/zoom/9?rule=guided" in page
    got = client.get("/layer/conv3/unit/5/zoom/3?rule=guided")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB")).astype(int)
    views = result.draw("conv3", torch.tensor([5]), "guided")
    want = upscale(to_image(views.projections[0, 2]), 128)
    assert shown.shape == want.shape and min(want.shape[:2]) >= 128
    assert np.abs(shown - want).max() <= 1  # a grey level at most: float32 sums in another batch
    deconvnet = np.asarray(Image.open(io.BytesIO(client.get("/layer/conv3/unit/5/zoom/3").content)).convert("RGB"))
    assert not np.array_equal(deconvnet, shown)  # the main rule's, not the guided one
    for bad in ("/layer/conv3/unit/5/zoom/10", "/layer/conv3/unit/5/zoom/0", "/layer/conv3/unit/999/zoom/1",
                "/layer/conv9/unit/5/zoom/1", "/layer/conv3/unit/5/zoom/x"):
        assert client.get(bad).status_code == 404, bad
