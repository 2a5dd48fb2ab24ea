"""tools/memory_over_epochs.py, the measure of whether a long run stays flat in memory, is honest: it
sees a deliberate leak of a known size, it finds a run without one flat, and on a sweep it follows
each worker process from its first trial to its last."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT, SWEEP_SPACE

TOOL = ROOT / "tools" / "memory_over_epochs.py"
LEAK_MB = 4


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("leak", [0, LEAK_MB])
def test_a_leak_shows_and_a_run_without_one_is_flat(leak, tiny_npy, tmp_path):
    figures = tmp_path / "memory.json"
    done = run_tool("--leak", leak, "--json", figures, "train", "--data", tiny_npy, "--epochs", 20, "--hidden", 16,
                    "--out", tmp_path / "run")

    rss = {int(epoch): mb for epoch, mb in json.loads(figures.read_text())["rss_mb"].items()}
    assert sorted(rss) == list(range(1, 21))
    ratio = rss[20] / rss[2]
    line = f"RSS after epoch 2: {rss[2]:.1f} MB, after epoch 20: {rss[20]:.1f} MB, ratio {ratio:.3f}"
    if leak:
        # 18 epochs of 4 MB written after epoch 2: all of it resident, and the run fails the 5 % limit
        assert rss[20] - rss[2] >= 0.95 * 18 * LEAK_MB and ratio > 1.2
        assert done.returncode == 1 and f"{line} (grew more than 5%)" in done.stdout
    else:
        assert ratio <= 1.05
        assert done.returncode == 0 and f"{line} (flat: within 5%)" in done.stdout, done.stderr


def test_a_sweep_reports_each_worker_from_its_first_trial_to_its_last(tiny_npy, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SWEEP_SPACE)
    figures = tmp_path / "memory.json"
    done = run_tool("--interval", 0.05, "--json", figures, "sweep", "--data", tiny_npy, "--space", space, "--val", 60,
                    "--trials", 3, "--epochs", 6, "--hidden", 16, "--pruner", "none", "--workers", 1,
                    "--out", tmp_path / "sweep")

    assert done.returncode in (0, 1), done.stderr
    measured = json.loads(figures.read_text())
    (pid, worker), = measured["workers"].items()
    assert worker["trials"] == [0, 1, 2]
    peaks = worker["trial_mb"]
    assert len(peaks) == 3 and min(peaks) > 0 and [worker["first_mb"], worker["last_mb"]] == [peaks[0], peaks[-1]]
    assert f"worker {pid}: trials 0, 1, 2; largest RSS in each {', '.join(f'{mb:.1f}' for mb in peaks)} MB" \
        in done.stdout
    assert f"worker {pid}: largest RSS in its first trial {peaks[0]:.1f} MB, in its last {peaks[-1]:.1f} MB, " \
           f"ratio {peaks[-1] / peaks[0]:.3f}" in done.stdout
    assert "the sweep process: largest RSS in the first trial" in done.stdout
