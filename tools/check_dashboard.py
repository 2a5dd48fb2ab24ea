"""Check the published asv dashboard in a real headless browser: serve its folder on 127.0.0.1, open
the benchmark grid and one benchmark's graph in chromium, and count what the pages drew.

    python tools/check_dashboard.py [--html .asv/html] [--benchmark NAME] [--shots DIR]

The grid passes when chromium drew at least one thumbnail of two commits or more; the graph page
passes when its screenshot shows plotted lines (pixels in asv's series colours) and no "No data". Exit
status 0 when both pass, 1 when either shows no data, 2 when the check cannot run (no chromium, no
published pages). The screenshots stay in --shots, to look at.
"""

import argparse
import functools
import html.parser
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCHMARK = "bench_training.Throughput.track_samples_per_second"
COLOUR_DISTANCE = 30  # per channel: anti-aliased line pixels stay this close to their series colour
# asv's page layout (its index.html): a 55-pixel navigation bar on top, and on the graph page a
# 200-pixel column of filter buttons on the left, whose highlight is close to the first series colour.
NAVBAR, FILTERS = 60, 210
NO_DATA = "No data for this combination of filters"


class Thumbnails(html.parser.HTMLParser):
    """Which of the grid's thumbnails (div id="summarygrid-NAME") hold a flot plot (canvas.flot-base)."""

    def __init__(self):
        super().__init__()
        self.plotted, self.names, self._open = {}, [], []  # _open: (name or None) per open div

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            ident = attrs.get("id") or ""
            name = ident.removeprefix("summarygrid-") if ident.startswith("summarygrid-") else None
            if name and name != "display":  # the grid's own container, not a thumbnail
                self.names.append(name)
                self.plotted.setdefault(name, False)
            self._open.append(name)
        elif tag == "canvas" and "flot-base" in (attrs.get("class") or ""):
            for name in reversed(self._open):
                if name:
                    self.plotted[name] = True
                    break

    def handle_endtag(self, tag):
        if tag == "div" and self._open:
            self._open.pop()


def serve(folder):
    """A loopback HTTP server of `folder` in a thread; returns (server, list of paths answered 404)."""
    missing = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_error(self, code, *args, **kwargs):
            if code == 404:
                missing.append(self.path)
            super().send_error(code, *args, **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, missing


def browser():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("check_dashboard: chromium is not installed: apt-get install chromium")
    return found


def render(chromium, url, window, screenshot=None):
    """The page's DOM after its scripts ran (and a screenshot, when asked), from headless chromium."""
    with tempfile.TemporaryDirectory(prefix="fastnet-chromium-") as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={window}", "--virtual-time-budget=20000"]
        dom = subprocess.run(command + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
        if screenshot is not None:
            subprocess.run(command + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120,
                           check=True)
    return dom.stdout


def series_colours(folder):
    """asv's plot colours, as (r, g, b), read from the published asv.js; its grey is left out, since
    the page's frames and text are grey too."""
    script = (folder / "asv.js").read_text()
    listed = re.search(r"var colors = \[(.*?)\]", script, re.DOTALL)
    colours = [tuple(int(code[i:i + 2], 16) for i in (0, 2, 4)) for code in re.findall(r"#([0-9A-Fa-f]{6})",
                                                                                      listed[1])]
    return [colour for colour in colours if max(colour) - min(colour) > 60]


def line_pixels(image_path, colours, left=0):
    """How many pixels of the screenshot, below the navigation bar and right of `left`, are in one of
    the series colours: plotted lines and points."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int16)[NAVBAR:, left:]
    near = np.zeros(pixels.shape[:2], bool)
    for colour in colours:
        near |= (np.abs(pixels - np.array(colour, np.int16)) <= COLOUR_DISTANCE).all(axis=2)
    return int(near.sum())


def summary_points(folder, name):
    """How many commits the thumbnail of benchmark `name` plots (its graphs/summary file)."""
    path = folder / "graphs" / "summary" / f"{name}.json"
    return len(json.loads(path.read_text())) if path.is_file() else 0


def check(folder, benchmark, shots):
    """{"grid": {...}, "graph": {...}, "missing": [...]} of what the browser showed."""
    if not (folder / "index.html").is_file():
        raise SystemExit(f"check_dashboard: no dashboard in {folder}: run tools/asv_dashboard.sh first")
    chromium, colours = browser(), series_colours(folder)
    shots.mkdir(parents=True, exist_ok=True)
    server, missing = serve(folder)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        # A tall window: asv draws a thumbnail only once it scrolls into view.
        grid = Thumbnails()
        grid.feed(render(chromium, base, "1280,4000", shots / "grid.png"))
        graph = render(chromium, base + "#" + benchmark, "1280,900", shots / "graph.png")
    finally:
        server.shutdown()
    plotted = sorted(name for name, drawn in grid.plotted.items() if drawn)
    return {"grid": {"benchmarks": len(grid.names), "plotted": plotted,
                     "commits": {name: summary_points(folder, name) for name in plotted},
                     "line_pixels": line_pixels(shots / "grid.png", colours)},
            "graph": {"benchmark": benchmark, "says_no_data": NO_DATA in graph,
                      "line_pixels": line_pixels(shots / "graph.png", colours, left=FILTERS)},
            "missing": missing, "shots": str(shots)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / ".asv" / "html", help="the published dashboard")
    parser.add_argument("--benchmark", default=DEFAULT_BENCHMARK, help="the graph to open (default: %(default)s)")
    parser.add_argument("--shots", type=Path, default=ROOT / ".asv" / "dashboard-check", help="screenshots go here")
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON object")
    args = parser.parse_args()
    try:
        found = check(args.html, args.benchmark, args.shots)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    grid, graph = found["grid"], found["graph"]
    # A thumbnail of one commit is a frame around a single dot; and a steady figure's line runs along
    # the thumbnail's top edge (its y axis starts at 0 and ends at the largest value), hidden by the
    # frame: so the grid passes on drawn thumbnails of two commits or more, its pixels are reported.
    passed = (any(points > 1 for points in grid["commits"].values()) and graph["line_pixels"] > 0
              and not graph["says_no_data"])
    if args.json:
        print(json.dumps(found | {"passed": passed}))
    else:
        history = sum(points > 1 for points in grid["commits"].values())
        print(f"grid: {len(grid['plotted'])} of {grid['benchmarks']} thumbnails hold a plot, {history} of them of "
              f"two commits or more; {grid['line_pixels']:,} pixels of plotted lines")
        print(f"graph {graph['benchmark']}: {graph['line_pixels']:,} pixels of plotted lines"
              + (f" ('{NO_DATA}')" if graph["says_no_data"] else ""))
        print(f"{len(found['missing'])} requests answered 404 (benchmarks without results have no graph files); "
              f"screenshots in {found['shots']}")
        print("dashboard shows data" if passed else "dashboard shows NO data")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
