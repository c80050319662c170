"""Screenshots of the report and the viewer of a run, for the README: ``docs/report.png`` and ``docs/viewer.png``.

    python docs/screenshots.py RUN [--unit conv5/17] [--out docs]

RUN should have been scanned and its evolution drawn (``convscope scan RUN``, ``convscope evolution RUN``).
Needs playwright and Debian's chromium (``apt-get install chromium``; never ``playwright install``).
"""

import argparse
import io
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from convscope import artifacts
from convscope.report import build_report
from convscope.viewer import bind, make_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def save(png: bytes, path: Path) -> None:
    """A screenshot reduced to 256 colours (a third of the size; the figures are pixel art anyway)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        artifacts.save_image(path, im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--unit", default=None, help="layer/unit to show in the viewer (default: conv5's first)")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--section", default="fig2", help="report section to scroll to")
    a = parser.parse_args()
    out = Path(a.out)

    report = build_report(a.run)
    app = make_app(a.run)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 1250}, device_scale_factor=1)
            page.goto(report.as_uri())
            page.evaluate(f"document.getElementById('{a.section}').scrollIntoView()")
            save(page.screenshot(), out / "report.png")
            page.set_viewport_size({"width": 1200, "height": 1000})
            if a.unit:
                url = f"{base}/layer/{a.unit.replace('/', '/unit/')}"
            else:
                page.goto(f"{base}/layer/conv5")
                url = page.locator(".thumbs a").first.get_attribute("href")
                url = base + url
            page.goto(url)
            save(page.screenshot(), out / "viewer.png")
            browser.close()
    finally:
        server.should_exit = True
        time.sleep(0.3)
        sock.close()
    print(f"wrote {out / 'report.png'} and {out / 'viewer.png'}")


if __name__ == "__main__":
    main()
