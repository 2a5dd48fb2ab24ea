#!/usr/bin/env python3
"""Check optuna-dashboard's page of a fastnet sweep's study in a real (headless) browser.

    python tools/check_study_dashboard.py STORAGE_URL [--study fastnet] [--shot study.png]

It starts `optuna-dashboard STORAGE_URL` on a free loopback port, as docs/sweeps.md shows, opens the
study's page in Debian's chromium after its scripts ran, and compares what the page says with the
study in the database: the study's name, its best trial's number and validation accuracy, and the
name of every setting the sweep varied. Prints one line per finding; exit status 0 when all agree,
1 when one does not, 2 when optuna-dashboard or chromium is missing or does not start.
"""

import argparse
import html
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from check_dashboard import browser, render

START_TIMEOUT = 60  # seconds for optuna-dashboard to answer


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def page_text(dom):
    """The words a person sees: the DOM without its styles, scripts and tags."""
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]*>", " ", dom)))


def expected(storage, name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        best = optuna.load_study(study_name=name, storage=storage).best_trial
    except KeyError:
        raise SystemExit(f"check_study_dashboard: {storage} has no study {name}") from None
    except ValueError:
        raise SystemExit(f"check_study_dashboard: study {name} has no complete trial to show yet") from None
    return {"best": best.number, "value": best.value, "settings": sorted(best.params)}


def dashboard_page(storage, name, shot):
    """The text of study `name`'s page as chromium draws it, from an optuna-dashboard started here."""
    command = shutil.which("optuna-dashboard")
    if command is None:
        raise SystemExit("check_study_dashboard: optuna-dashboard is not installed: pip install optuna-dashboard")
    port = free_port()
    server = subprocess.Popen([command, storage, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2))
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"check_study_dashboard: optuna-dashboard did not start: "
                                     f"{server.stderr.read().strip()[-300:]}") from None
                time.sleep(0.3)
        study_id = next(s["study_id"] for s in studies["study_summaries"] if s["study_name"] == name)
        return page_text(render(browser(), f"http://127.0.0.1:{port}/dashboard/studies/{study_id}", "1400,1000",
                                shot))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="the study's Optuna storage URL, e.g. sqlite:///sweeps/NAME/study.db")
    parser.add_argument("--study", default="fastnet", help="the study's name (default: %(default)s)")
    parser.add_argument("--shot", help="also save a screenshot of the page here")
    args = parser.parse_args()
    try:
        want = expected(args.storage, args.study)
        text = dashboard_page(args.storage, args.study, args.shot)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    # The page writes the best value to 4 significant digits (plotly's default); the study stores it whole.
    findings = {f"study {args.study}": f"{args.study} (id=" in text,
                f"best trial {want['best']}": f"Best Trial (number={want['best']})" in text,
                f"its validation accuracy {want['value']:.4g}": f" {want['value']:.4g} " in text}
    findings |= {f"setting {name}": f"{name}: " in text for name in want["settings"]}
    for finding, shown in findings.items():
        print(f"{'shown  ' if shown else 'MISSING'} {finding}")
    return 0 if all(findings.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
