"""A local web viewer over a run's artifacts: every scanned layer and unit (paper Fig. 2: its top-9 projections
beside the image patches, and its evolution over training, Fig. 4), and the run's other figures (Fig. 5-7).

Each unit has a stable address (``/layer/conv5/unit/42``); arrow keys move between units and layers (``?``
lists the keys). The viewer computes nothing: it reads the files the analyses wrote, at every request, so a
figure written while it runs shows up on reload. It serves files of the run only (``/files/<path>`` refuses
anything that resolves outside the run, symlinks included), answers only requests addressed to the host it
is bound to (a guard against DNS rebinding), and renders every name from the run as text.
"""

from __future__ import annotations

import mimetypes
import socket
from pathlib import Path
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..analyses import REGISTRY
from ..errors import ConvscopeError, check_int, printable
from ..layout import Layout, natural_key
from ..panels import Line, Panel, Picture, UnitBadge, Zoom
from ..report import NONLINEARITY_NOTE, environment, label_of, model_summary, read_run, require_run
from ..tables import blocks

STATIC = Path(__file__).parent / "static"
PAGE = 256  # units per page of a layer: its thumbnails load lazily, and a layer of thousands pages
INDEXED = 64  # unit links per layer on the index page (the layer's page has them all)
LOCAL_HOSTS = ("127.0.0.1", "localhost")
# Pages load scripts and styles from the viewer only; images from the viewer (and data: in the report).
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                      "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class RunView:
    """What the run holds right now: its layers (those of a per-layer figure or of a unit picture) and per layer
    the units that some analysis has a picture of (:attr:`convscope.analyses.Analysis.units`). Layers come in the
    order the analyses give them (the scan's is the forward pass's), then the others in natural order."""

    def __init__(self, root: Path):
        self.root = root
        self.layout = Layout(root)
        self.units: dict[str, set[int]] = {}
        for analysis in REGISTRY:
            for layer, pictures in analysis.units(self.layout).items() if analysis.units else ():
                self.units.setdefault(layer, set()).update(pictures)
        others = {layer for analysis in REGISTRY if analysis.per_layer
                  for layer in self.layout.layer_figures(analysis.key) if layer not in self.units}
        self.layers = [*self.units, *sorted(others, key=natural_key)]

    def layer_units(self, layer: str) -> list[int]:
        return sorted(self.units.get(layer, ()))

    def sequence(self) -> list[tuple[str, int]]:
        """Every (layer, unit), layer by layer: the order of ArrowRight / ArrowLeft."""
        return [(layer, u) for layer in self.layers for u in self.layer_units(layer)]

    def url(self, path: Path | None) -> str | None:
        return None if path is None else "/files/" + quote(path.relative_to(self.root).as_posix())

    def layer_figure(self, key: str, layer: str) -> str | None:
        p = self.layout.layer_figure(key, layer)
        return self.url(p) if p.is_file() else None


def layer_url(layer: str) -> str:
    return f"/layer/{quote(layer, safe='')}"


def unit_url(layer: str, unit: int) -> str:
    return f"{layer_url(layer)}/unit/{unit}"


def safe_path(root: Path, relative: str) -> Path | None:
    """The file ``relative`` names inside ``root``, or None when it is not a file there: ``..``, absolute
    paths and symlinks that lead out of the run are refused after resolving, so no spelling gets around it."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        return None
    try:
        target = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    if any(part.startswith(".") for part in target.relative_to(root).parts):  # temp files of atomic writes
        return None
    return target


def make_app(run_dir: str | Path, allowed_hosts: list[str] | tuple[str, ...] | None = None) -> Starlette:
    """The viewer of the run in ``run_dir`` as an ASGI app. ``allowed_hosts``: the Host headers it answers
    (default 127.0.0.1 and localhost); any other gets 400."""
    root = require_run(run_dir)
    layout = Layout(root)
    env = environment()
    template = env.get_template("viewer.html")
    files = read_run(layout)
    attached, config = files.attached, files.config
    classes = [printable(c) for c in _classes(layout, config)]
    note = NONLINEARITY_NOTE if config.get("nonlinearities") == "gradient" else None

    def page(request: Request, status: int = 200, **context) -> HTMLResponse:
        art = context.pop("art", None) or RunView(root)
        figures = [(a.ref, figure_url(a.key)) for a, _ in _other_figures(layout)]
        html = template.render(run_name=printable(root.name), config=config,
                               layers=[(printable(n), layer_url(n)) for n in art.layers],
                               report=art.url(layout.report) if layout.report.is_file() else None,
                               figure_links=figures, attached=attached is not None, **{"nav": {}, **context})
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def not_found(request: Request, message: str, art: RunView | None = None, back: str | None = None
                  ) -> HTMLResponse:
        """A 404 page saying what was wrong, with a link back to the layer (``back``) or the index."""
        return page(request, 404, art=art, kind="missing", title="not found", message=message,
                    back=(printable(back), layer_url(back)) if back else None)

    async def index(request: Request) -> Response:
        art = RunView(root)
        layers = [{"name": n, "url": layer_url(n), "units": [(u, unit_url(n, u)) for u in art.layer_units(n)[:INDEXED]],
                   "count": len(art.layer_units(n))} for n in art.layers]
        seq = art.sequence()
        nav = {"next": unit_url(*seq[0])} if seq else {}
        now = read_run(layout)  # read at every request: the run may be written while the viewer runs
        per_unit = [a for a in REGISTRY if a.units]
        return page(request, art=art, kind="index", title=root.name, index_layers=layers, nav=nav, classes=classes,
                    test=now.test, epochs=len(now.metrics), damaged=now.damaged,
                    per_unit=[f"{a.ref} ({a.title.lower()})" for a in per_unit],
                    per_unit_commands=[a.command.format(run="RUN") for a in per_unit])

    def missing_layer(request: Request, layer: str, art: RunView) -> HTMLResponse:
        return not_found(request, f"this run has no figures for layer {layer!r}; its layers: "
                                  f"{', '.join(art.layers) or f'none yet (run `{_unit_command()}`)'}", art)

    async def layer_page(request: Request) -> Response:
        layer = request.path_params["layer"]
        art = RunView(root)
        if layer not in art.layers:
            return missing_layer(request, layer, art)
        units = art.layer_units(layer)
        badges = _badges(layout, layer)  # analysis key -> unit -> badge
        sort = request.query_params.get("sort", "unit")
        tag = request.query_params.get("tag", "")
        tags: dict[str, int] = {}
        for badge in (b for shown in badges.values() for b in shown.values()):
            for t in badge.tags:
                tags[t] = tags.get(t, 0) + 1
        if tag:  # only the units an analysis tagged so (a concept, a category, a verdict)
            units = [u for u in units if any(tag in b[u].tags for b in badges.values() if u in b)]
        if sort in badges:  # highest score first (the scan's: most class-specific; the dissection's: highest IoU)
            ranked = badges[sort]
            units = sorted(units, key=lambda u: (-ranked[u].score, u) if u in ranked else (1, u))
        pages = max(1, -(-len(units) // PAGE))
        number = request.query_params.get("page", "1")
        page_no = int(number) if number.isdigit() and len(number) < 7 else 0
        if not 1 <= page_no <= pages:
            return not_found(request, f"layer {layer!r} has {pages} page(s) of units; there is no page "
                                      f"{number[:20]!r}", art, back=layer)
        i = art.layers.index(layer)

        def query(**changed) -> str:
            params = {"sort": sort if sort != "unit" else "", "tag": tag, **changed}
            return layer_url(layer) + ("?" + urlencode({k: v for k, v in params.items() if v}) if any(
                params.values()) else "")

        def paged(n: int) -> str:
            return query(page=n if n > 1 else "")

        nav = {"next": unit_url(layer, units[0]) if units else None,
               "prev-layer": layer_url(art.layers[i - 1]) if i > 0 else None,
               "next-layer": layer_url(art.layers[i + 1]) if i + 1 < len(art.layers) else None}
        shown = units[(page_no - 1) * PAGE:page_no * PAGE]
        thumbs = [{"unit": u, "url": unit_url(layer, u), "img": art.url(_thumb(layout, layer, u)),
                   "badges": [b[u] for b in badges.values() if u in b]} for u in shown]
        sorts = [("unit", "by number", query(sort=""))] + [
            (a.key, a.sort_label or f"by {a.ref}", query(sort=a.key)) for a in REGISTRY if a.key in badges]
        tag_links = [(t, n, query(tag=t if t != tag else ""))
                     for t, n in sorted(tags.items(), key=lambda x: (-x[1], x[0]))]
        panels = [{"url": art.layer_figure(a.key, layer), "ref": a.ref, "caption": a.caption}
                  for a in REGISTRY if a.per_layer and art.layer_figure(a.key, layer)]
        return page(request, art=art, kind="layer", title=layer, layer=layer, nav=nav, thumbs=thumbs, note=note,
                    layer_figures=panels,
                    n_units=len(units), pages=[(n, paged(n)) for n in range(1, pages + 1)], page_no=page_no,
                    sort=sort, sorts=sorts if badges else [], tag=tag, tag_links=tag_links, layer_link=layer_url(layer),
                    jump=f"{layer_url(layer)}/goto", biggest=max(units) if units else 0)

    async def goto(request: Request) -> Response:
        """The jump box of a layer page: ``?unit=N`` to that unit's page, or a 404 that links back."""
        layer, number = request.path_params["layer"], request.query_params.get("unit", "").strip()
        if number.isdigit() and len(number) <= 9:
            return RedirectResponse(unit_url(layer, int(number)), status_code=303, headers=HEADERS)
        return not_found(request, f"{number[:20]!r}{'...' if len(number) > 20 else ''} is not a unit number",
                         back=layer)

    async def unit_page(request: Request) -> Response:
        layer, number = request.path_params["layer"], request.path_params["unit"]
        if not number.isdigit() or len(number) > 9:  # no 5,000-digit number reaches int()
            return not_found(request, f"{number[:20]!r}{'...' if len(number) > 20 else ''} is not a unit number",
                             back=layer)
        unit = int(number)
        art = RunView(root)
        units = art.layer_units(layer)
        if layer not in art.layers:
            return missing_layer(request, layer, art)
        if unit not in units:
            listed = ", ".join(map(str, units[:40])) + (" ..." if len(units) > 40 else "")
            return not_found(request, f"layer {layer!r} has no unit {unit} in this run; its units: "
                                      f"{listed or 'none'}. `{_unit_command()}` draws every unit (--units N: a sample "
                                      "of N)", art, back=layer)
        seq = art.sequence()
        i = seq.index((layer, unit))
        li = art.layers.index(layer)
        prev_layer = next((n for n in reversed(art.layers[:li]) if art.layer_units(n)), None)
        next_layer = next((n for n in art.layers[li + 1:] if art.layer_units(n)), None)
        nav = {"prev": unit_url(*seq[i - 1]) if i > 0 else None,
               "next": unit_url(*seq[i + 1]) if i + 1 < len(seq) else None,
               "prev-layer": unit_url(prev_layer, art.layer_units(prev_layer)[0]) if prev_layer else None,
               "next-layer": unit_url(next_layer, art.layer_units(next_layer)[0]) if next_layer else None,
               "up": layer_url(layer)}
        panels = [_panel(p, art, unit_url(layer, unit)) for a in REGISTRY if a.unit_panel
                  for p in [a.unit_panel(layout, layer, unit, request.query_params)] if p is not None]
        return page(request, art=art, kind="unit", title=f"{layer} unit {unit}", layer=layer, unit=unit, nav=nav,
                    panels=panels, note=note, position=(units.index(unit) + 1, len(units)))

    async def zoom(request: Request) -> Response:
        """One of a unit's pictures at full resolution, computed now by the analysis that drew it."""
        layer, number, rank = (request.path_params[k] for k in ("layer", "unit", "rank"))
        if number.isdigit() and rank.isdigit() and len(number) <= 9 and len(rank) <= 4:
            for a in REGISTRY:
                picture = a.unit_zoom(layout, layer, int(number), int(rank), request.query_params) if a.unit_zoom \
                    else None
                if picture is not None:
                    return Response(picture, media_type="image/png", headers=HEADERS)
        return not_found(request, f"no picture {rank[:8]!r} of {layer!r} unit {number[:12]!r} to show at full "
                                  "resolution", back=layer)

    def figures(art: RunView, only: str | None = None) -> list[dict]:
        return [{"entry": a, "images": [(label_of(p, root, a.key), art.url(p)) for p in images],
                 "texts": [(p.relative_to(root).as_posix(), blocks(p.read_text(errors="replace"))) for p in texts],
                 "note": note if a.projects else None}
                for a, (images, texts) in _other_figures(layout) if only in (None, a.key)]

    async def figures_page(request: Request) -> Response:
        art = RunView(root)
        return page(request, art=art, kind="figures", title="figures", figures=figures(art))

    async def figure_page(request: Request) -> Response:
        art, key = RunView(root), request.path_params["key"]
        shown = figures(art, key)
        if not shown:
            present = ", ".join(a.key for a, _ in _other_figures(layout)) or "none yet"
            return not_found(request, f"this run has no figure {key!r}; its figures: {present}", art)
        return page(request, art=art, kind="figures", title=shown[0]["entry"].ref, figures=shown)

    async def files(request: Request) -> Response:
        target = safe_path(root, request.path_params["path"])
        if target is None:
            return Response("not found: the viewer serves the files of this run only", 404, headers=HEADERS,
                            media_type="text/plain")
        media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return FileResponse(target, media_type=media, headers=HEADERS)

    routes = [Route("/", index), Route("/figures", figures_page), Route("/figures/{key}", figure_page),
              Route("/layer/{layer}", layer_page), Route("/layer/{layer}/goto", goto),
              Route("/layer/{layer}/unit/{unit}", unit_page), Route("/layer/{layer}/unit/{unit}/zoom/{rank}", zoom),
              Route("/files/{path:path}", files),
              Mount("/static", app=StaticFiles(directory=STATIC), name="static")]
    hosts = list(dict.fromkeys([*LOCAL_HOSTS, *(allowed_hosts or ())]))
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
    app.state.run_dir = root
    return app


def figure_url(key: str) -> str:
    return f"/figures/{quote(key, safe='')}"


def _classes(layout: Layout, config: dict) -> list[str]:
    """The model's class names: recorded in an attached run, read from a trained run's weights."""
    if layout.attach.is_file():
        return list(config.get("classes") or [])

    summary = model_summary(layout)
    return list(summary["classes"]) if summary else list(config.get("classes") or [])


def _other_figures(layout: Layout) -> list[tuple[object, tuple[list[Path], list[Path]]]]:
    """The registry's figures and tables other than the per-layer ones (Fig. 5-7, Tables 1, 3-5, 7) that the run
    has, with their images and text tables."""
    out = []
    for analysis in REGISTRY:
        images, texts = analysis.files(layout)
        if (images or texts) and not analysis.per_layer:
            out.append((analysis, (images, texts)))
    return out


def _unit_command() -> str:
    """The command of the first analysis that draws units (the scan's)."""
    return next(a.command.format(run="RUN") for a in REGISTRY if a.units)


def _thumb(layout: Layout, layer: str, unit: int) -> Path | None:
    """The unit's thumbnail: the first that an analysis gives (:attr:`~convscope.analyses.Analysis.unit_thumb`)."""
    return next((p for a in REGISTRY if a.unit_thumb for p in [a.unit_thumb(layout, layer, unit)] if p), None)


def _badges(layout: Layout, layer: str) -> dict[str, dict[int, UnitBadge]]:
    """The badges of a layer's units from every analysis that has them: analysis key -> unit -> badge."""
    return {a.key: b for a in REGISTRY if a.unit_badges for b in [a.unit_badges(layout, layer)] if b is not None}


def _panel(panel: Panel, art: RunView, here: str) -> dict:
    """A panel as the template draws it: URLs for the run's files, the linked figures and the variants."""
    items = []
    for item in panel.items:
        kind = type(item).__name__.lower()
        fields = dict(vars(item))
        if isinstance(item, Picture):
            fields["url"] = art.url(item.path)
        if isinstance(item, Line):
            fields["url"] = figure_url(item.figure) if item.figure else None
        if isinstance(item, Zoom):  # the variant shown now, kept in each link
            shown = next((name for name, on in panel.variants if on), "")
            query = f"?{urlencode({panel.switch: shown})}" if shown and panel.switch else ""
            fields["links"] = [(str(i), f"{here}/zoom/{i}{query}") for i in range(1, item.count + 1)]
        items.append({"kind": kind, **fields})
    variants = [(name, f"{here}?{urlencode({panel.switch: name})}", on) for name, on in panel.variants]
    return {"items": items, "switch": panel.switch, "variants": variants, "missing": panel.missing}


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on (host, port) (port 0: any free one); a port in use or a bad host is a
    ConvscopeError."""
    check_int(port, "port", 0, 65535)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConvscopeError(f"cannot serve on host {host!r}: {e}; use 127.0.0.1 or localhost") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConvscopeError(f"cannot serve on {host}:{port}: {e.strerror or e}; the port is probably in use: "
                             "pass another one with --port") from e
    sock.set_inheritable(True)
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          allowed_hosts: list[str] | tuple[str, ...] = (), announce=None) -> None:
    """Serve the viewer of ``run_dir`` on http://host:port/ until interrupted (Ctrl-C). It answers requests
    addressed to 127.0.0.1, localhost, ``host`` and ``allowed_hosts`` (names other machines reach it by).
    ``announce(url)`` is called with the address actually bound, once it is."""
    import uvicorn

    app = make_app(run_dir, allowed_hosts=[host, *allowed_hosts])
    sock = bind(host, port)
    if announce is not None:
        bound_host, bound_port = sock.getsockname()[:2]
        announce(f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}/")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["RunView", "bind", "make_app", "safe_path", "serve"]
