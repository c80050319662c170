"""The static report's weight and load time: the size of ``report.html`` and of everything it loads, and the time
chromium takes from ``goto`` to the load event, opening the page from ``file://`` (no server), as a reader does.

    python benchmarks/report.py RUN [--no-build]

It (re)builds ``RUN/report.html`` first (so it writes into RUN: point it at a copy of a run you care about),
then opens the page in headless chromium (/usr/bin/chromium; no ``playwright install``) in a fresh context each
time (no cache) and prints the median of 5 loads. Every ``<img>`` is then scrolled into view and must show
(``naturalWidth > 0``). Targets (the demo's run): report.html < 2 MB, load < 1 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def loaded_bytes(page) -> int:
    """Bytes of the page and the images it has loaded (file:// has no transfer sizes: read them from disk)."""
    urls = {page.url, *page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth)"
                                     ".map(i => i.currentSrc)")}
    return sum(Path(unquote(urlsplit(u).path)).stat().st_size for u in urls if u.startswith("file:"))


def main(run: Path, build: bool = True) -> None:
    from playwright.sync_api import sync_playwright

    from convscope.report import build_report

    if build:
        t0 = time.perf_counter()
        report = build_report(run)
        print(f"build_report: {time.perf_counter() - t0:.2f} s")
    else:
        report = run / "report.html"
    print(f"report.html: {report.stat().st_size / 1e6:.2f} MB (target < 2 MB)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        times, loads = [], []
        for _ in range(5):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            t0 = time.perf_counter()
            page.goto(report.as_uri(), wait_until="load")
            times.append(time.perf_counter() - t0)
            loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventStart") / 1000)
            if len(times) < 5:
                context.close()
        print(f"goto -> load event: median {sorted(times)[2]:.3f} s, runs {', '.join(f'{t:.3f}' for t in times)} "
              f"(navigation timing: {sorted(loads)[2]:.3f} s; target < 1 s)")
        print(f"loaded with the page (before load): {loaded_bytes(page) / 1e6:.2f} MB")
        images = page.locator("img")
        for i in range(images.count()):
            images.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
        widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        print(f"images: {len(widths)}, showing (naturalWidth > 0): {sum(w > 0 for w in widths)}; everything "
              f"loaded after scrolling: {loaded_bytes(page) / 1e6:.2f} MB")
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), build="--no-build" not in sys.argv[2:])
