#!/usr/bin/env python3
"""How fast a sweep finishes trials on this machine: W workers x T threads per trial, compared.

    python tools/sweep_throughput.py [--data PATH] [--layouts 2x1,1x2] [--trials 4] [--epochs 2]
                                     [--repeats 3] [--backend numpy] [--json FILE]

Each layout WxT runs `fastnet sweep --workers W --threads-per-trial T` in a process of its own on a
space of one point (fastnet train's default settings, so that every trial is the same work), with
pruning off, --trials trials of --epochs epochs on the CIFAR-10 at --data. Layouts are interleaved
(A B A B ...) and repeated, each run in a new sweep folder. A run's throughput is its finished
trials per hour, from the first trial's start to the last trial's end as the study recorded them:
the Dask cluster's start and the sweep's results are left out, each trial's own reading of the
data and compiling is in. The table shows each layout's median and min-max, the whole command's wall
time and how many cores other processes kept busy meanwhile, the ratio of the first layout to the
others, the CPU, its vector instructions and NumPy's BLAS kernel.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastnet.cpu import DISTURBED, cpu_model, run_child  # noqa: E402  (after the path is set)
from fastnet.harness import blas_libraries  # noqa: E402

ONE_POINT = "[lr]\nchoices = [0.05]\n"  # fastnet train's own learning rate: the default run, every trial


def run_layout(layout, args, folder):
    """One sweep with `layout` (workers, threads); returns its figures."""
    import optuna

    workers, threads = layout
    out = folder / f"{workers}x{threads}-{len(list(folder.iterdir()))}"
    command = [sys.executable, "-m", "fastnet", "sweep", "--space", str(folder / "space.toml"), "--out", str(out),
               "--trials", str(args.trials), "--epochs", str(args.epochs), "--pruner", "none",
               "--workers", str(workers), "--threads-per-trial", str(threads), "--backend", args.backend]
    if args.data:
        command += ["--data", args.data]
    started = time.perf_counter()
    done, others = run_child(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"sweep_throughput: the {workers}x{threads} sweep failed: {done.stderr.strip()[-300:]}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = optuna.load_study(study_name="fastnet", storage=f"sqlite:///{out / 'study.db'}").trials
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"trials_per_hour": 3600 * len(finished) / span, "seconds_per_trial": [
        (t.datetime_complete - t.datetime_start).total_seconds() for t in finished], "span": span, "wall": wall,
        "others": others, "val_acc": [t.value for t in finished]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the CIFAR-10 to train on (default: fastnet's, data/ or $FASTNET_DATA)")
    parser.add_argument("--layouts", default="2x1,1x2", help="WxT,... workers x threads per trial; the first is "
                        "compared with the others (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=4, help="finished trials per sweep (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each layout, interleaved (default: %(default)s)")
    parser.add_argument("--backend", default="numpy", help="the trials' backend (default: %(default)s, fastnet "
                        "train's)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    layouts = [tuple(int(n) for n in text.split("x")) for text in args.layouts.split(",")]
    runs = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory(prefix="fastnet-sweep-throughput-") as name:
        folder = Path(name)
        (folder / "space.toml").write_text(ONE_POINT)
        for repeat in range(args.repeats):
            for layout in layouts:
                runs[layout].append(run_layout(layout, args, folder))
                last = runs[layout][-1]
                print(f"run {repeat + 1}/{args.repeats} {layout[0]}x{layout[1]}: {last['trials_per_hour']:.0f} "
                      f"trials/h, {last['wall']:.0f} s in all, others {last['others']:.2f} cores", flush=True)
    medians = {layout: statistics.median(r["trials_per_hour"] for r in rs) for layout, rs in runs.items()}
    print(f"\nfastnet sweep, {args.trials} trials of {args.epochs} epochs of fastnet train's defaults "
          f"(MLP 3072-512-512-10, batch 128, {args.backend} backend), CIFAR-10, pruning off; {args.repeats} "
          f"interleaved runs per layout, medians")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; BLAS: {blas_libraries()}")
    print(f"{'layout':<22}{'trials/h':>10}{'min-max':>13}{'s/trial':>9}{'wall s':>8}{'others':>8}")
    for (workers, threads), rs in runs.items():
        rates = sorted(r["trials_per_hour"] for r in rs)
        per_trial = statistics.median(s for r in rs for s in r["seconds_per_trial"])
        name = f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"
        print(f"{name:<22}{medians[(workers, threads)]:>10.0f}"
              f"{f'{rates[0]:.0f}-{rates[-1]:.0f}':>13}{per_trial:>9.1f}"
              f"{statistics.median(r['wall'] for r in rs):>8.0f}{max(r['others'] for r in rs):>8.2f}")
    first = layouts[0]
    for other in layouts[1:]:
        print(f"{first[0]}x{first[1]} against {other[0]}x{other[1]}: {medians[first] / medians[other]:.2f}x the trials "
              f"per hour")
    disturbed = [r for rs in runs.values() for r in rs if r["others"] > DISTURBED]
    if disturbed:
        print(f"disturbed: other processes kept more than {DISTURBED} cores busy during {len(disturbed)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{w}x{t}": rs for (w, t), rs in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
