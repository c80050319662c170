"""The report and the viewer in a real browser (playwright driving Debian's chromium): every image loads, no
console error, keyboard navigation, a malicious class name stays text, and the live server refuses paths out of
the run and foreign hosts."""

import contextlib
import http.client
import socket
import threading
import time
from pathlib import Path

import pytest
from test_report import EVIL, ODD, make_fake_run

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"no chromium at {CHROMIUM} (apt-get install -y chromium)")]


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


@contextlib.contextmanager
def serving(run_dir):
    """The viewer of ``run_dir`` served by uvicorn on a free port of 127.0.0.1, in a background thread."""
    import uvicorn

    from convscope.viewer import bind, make_app

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(run_dir), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the viewer did not start"
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir) as address:
        yield address


class Watched:
    """A page with its console errors, page errors and dialogs recorded."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.errors, self.dialogs = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def images(self):
        return self.page.evaluate("Array.from(document.images).map(i => [i.getAttribute('alt'), i.complete, "
                                  "i.naturalWidth])")


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
