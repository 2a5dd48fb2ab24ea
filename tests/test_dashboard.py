"""The asv dashboard as a user builds it (docs/speed.md), looked at in headless chromium.

asv runs against this environment (--python=same) and records two commits. The one benchmark run,
Threads.track_pinned_threads, reports the suite's own thread setting, which is the same at every
commit, so both commits' results can honestly come from this one environment. What is tested is the
way from results to pages a browser draws: tools/asv_dashboard.sh and tools/check_dashboard.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = "bench_training.Threads.track_pinned_threads"


def asv_config(folder):
    """asv.conf.json with everything asv writes moved under `folder`."""
    text = "\n".join(line for line in (ROOT / "asv.conf.json").read_text().splitlines()
                     if not line.strip().startswith("//"))
    config = json.loads(text) | {"repo": str(ROOT), "benchmark_dir": str(ROOT / "benchmarks"),
                                 "results_dir": str(folder / "results"), "html_dir": str(folder / "html"),
                                 "env_dir": str(folder / "env")}
    path = folder / "asv.conf.json"
    path.write_text(json.dumps(config))
    return path


def run(*command, **options):
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **options)


@pytest.fixture(scope="module")
def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("chromium is not installed: apt-get install chromium (.ci/run does)")
    return found


def test_the_dashboard_script_refuses_to_publish_nothing(tmp_path):
    done = run("bash", ROOT / "tools" / "asv_dashboard.sh", asv_config(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (f"asv_dashboard: no benchmark results in {tmp_path / 'results'} to publish: run asv first, e.g. "
         "docs/speed.md's asv run --steps 20 ... (asv run --quick saves none)")]
    assert not (tmp_path / "html").exists()


def test_published_results_of_two_commits_show_in_a_browser(tmp_path, chromium):
    config = asv_config(tmp_path)
    asv = [sys.executable, "-m", "asv"]
    home = dict(os.environ, HOME=str(tmp_path))  # asv keeps its machine file in ~: not the user's
    assert run(*asv, "machine", "--yes", "--machine", "fastnet-test", "--config", config, env=home).returncode == 0
    # --first-parent: asv plots the commits of the branch itself, not those merged into it
    commits = run("git", "-C", ROOT, "rev-list", "--first-parent", "--max-count=2", "HEAD").stdout.split()
    assert len(commits) == 2
    for commit in commits:
        done = run(*asv, "run", "--python=same", "--set-commit-hash", commit, "--machine", "fastnet-test",
                   "--bench", "Threads.track_pinned_threads", "--config", config, env=home)
        assert done.returncode == 0, done.stdout + done.stderr
    published = run("bash", ROOT / "tools" / "asv_dashboard.sh", config, env=home)
    assert published.returncode == 0, published.stderr
    assert "no remote scripts left" in published.stdout

    checker = [sys.executable, ROOT / "tools" / "check_dashboard.py", "--html", tmp_path / "html", "--shots",
               tmp_path / "shots", "--json"]
    shown = run(*checker, "--benchmark", BENCHMARK)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    found = json.loads(shown.stdout)
    assert found["grid"]["plotted"] == [BENCHMARK] and found["grid"]["commits"] == {BENCHMARK: 2}
    assert found["graph"]["line_pixels"] > 0 and not found["graph"]["says_no_data"]
    # A benchmark without results is what an empty dashboard looks like: the checker says so.
    empty = run(*checker, "--benchmark", "bench_training.Throughput.track_samples_per_second")
    assert empty.returncode == 1 and json.loads(empty.stdout)["graph"]["says_no_data"]
