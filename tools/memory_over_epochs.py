#!/usr/bin/env python3
"""Whether a long run stays flat in memory: the resident memory (RSS) of `fastnet train` after
every epoch, or of a `fastnet sweep`'s worker processes during each trial.

    python tools/memory_over_epochs.py [--first 2] [--limit 1.05] [--leak MB] [--json FILE] train FLAGS...
    python tools/memory_over_epochs.py [--limit 1.05] [--interval 0.5] [--json FILE] sweep FLAGS...

train: runs `fastnet train FLAGS` in this process, through fastnet's own parser and trainer, and
reads this process's current RSS (VmRSS in /proc/self/status) after every epoch, when the epoch's
checkpoint and line are written. The current RSS, not the high-water mark: a slow leak grows it
after the peak, which a high-water mark would hide. It reports the RSS after epoch --first and after
the last epoch, and their ratio. --leak MB keeps MB more of touched memory after every epoch (an
after_epoch that appends arrays): a deliberate leak, to see what one looks like.

sweep: runs `fastnet sweep FLAGS` as a child and samples the RSS of it and of every process under it
(the Dask nannies and workers) every --interval seconds. After the sweep it reads from the study
which worker process ran each trial, and when the trial started and ended, and reports, per worker,
its largest RSS during each trial, while the trial's data and network were held (the moment a trial
ends, they may already be freed), and compares its first trial with its last; and the sweep
process's RSS during the first and the last trial. Run trials of one setting (a space of one point,
no pruning): trials of wider networks need more memory, which is no leak. Without --out in FLAGS,
the sweep goes to a temporary folder.

The exit status is 1 when a ratio is above --limit (memory grew more than 5 % by default), else 0.
Linux only (/proc); the sweep needs fastnet's sweep extra (psutil comes with Dask).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastnet.cpu import cpu_model  # noqa: E402  (after the path is set)

MB = 2 ** 20


def rss_mb():
    """This process's resident memory now, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    raise SystemExit("memory_over_epochs: no VmRSS in /proc/self/status: this tool needs Linux")


def train_rss(flags, leak_mb=0.0, log=print):
    """{epoch: RSS in MB after it} of `fastnet train FLAGS`, run in this process."""
    import numpy as np

    from fastnet.cli import build_parser, train_config
    from fastnet.cli.commands import backend_threads
    from fastnet.train import train

    args = build_parser().parse_args(["train", *flags])
    config = train_config(args)
    rss, leaked = {}, []

    def after_epoch(summary):
        if leak_mb:
            leaked.append(np.ones(int(leak_mb * MB) // 8))  # ones, not zeros: pages never written stay unmapped
        rss[summary["epoch"]] = rss_mb()

    with backend_threads(args, config.backend):
        train(config, log=log, after_epoch=after_epoch)
    return rss


def sample_tree(process, samples):
    """Append (now, pid, RSS in MB) of `process` and of every process under it."""
    import psutil

    now = datetime.now()
    for member in [process, *process.children(recursive=True)]:
        try:
            samples.append((now, member.pid, member.memory_info().rss / MB))
        except psutil.Error:  # it ended between the listing and the reading
            pass


def sweep_rss(flags, interval):
    """The samples of the sweep's processes, the sweep process's pid, and its trials (number, pid of
    the worker that ran it, when it started and ended), ordered by when they ended."""
    import optuna
    import psutil

    from fastnet.cli import build_parser

    args = build_parser().parse_args(["sweep", *flags])
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="fastnet-memory-sweep-")
        flags = [*flags, "--out", args.out]
    child = subprocess.Popen([sys.executable, "-m", "fastnet", "sweep", *flags])
    process, samples = psutil.Process(child.pid), []
    while child.poll() is None:
        try:
            sample_tree(process, samples)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    if child.wait() != 0:
        raise SystemExit(f"memory_over_epochs: fastnet sweep ended with exit status {child.returncode}")
    storage = args.storage or f"sqlite:///{Path(args.out) / 'study.db'}"
    study = optuna.load_study(study_name=args.study, storage=storage)
    trials = sorted(((t.number, t.user_attrs["pid"], t.datetime_start, t.datetime_complete) for t in study.trials
                     if t.datetime_complete is not None and "pid" in t.user_attrs), key=lambda t: t[3])
    return samples, child.pid, trials


def largest_within(samples, pid, start, end):
    """The largest RSS of `pid` sampled between `start` and `end`, or None."""
    return max((rss for when, which, rss in samples if which == pid and start <= when <= end), default=None)


def report_train(rss, first, limit):
    last = max(rss)
    if first not in rss or first >= last:
        raise SystemExit(f"memory_over_epochs: the run has {last} epochs: --first {first} must be one before the last")
    ratio = rss[last] / rss[first]
    print("RSS after each epoch (MB): " + ", ".join(f"{epoch}: {mb:.1f}" for epoch, mb in sorted(rss.items())))
    print(f"RSS after epoch {first}: {rss[first]:.1f} MB, after epoch {last}: {rss[last]:.1f} MB, ratio "
          f"{ratio:.3f} ({verdict(ratio, limit)})")
    return {"rss_mb": rss, "first": first, "last": last, "ratio": ratio}, ratio


def report_sweep(samples, driver, trials, limit):
    workers = {}
    for number, pid, started, ended in trials:
        workers.setdefault(pid, []).append((number, started, ended))
    figures, ratios = {"workers": {}}, []
    for pid, done in workers.items():
        peaks = [largest_within(samples, pid, started, ended) for _, started, ended in done]
        if None in peaks or len(done) < 2:
            print(f"worker {pid}: {len(done)} trial(s), too few samples to compare")
            continue
        begin, end = peaks[0], peaks[-1]
        ratios.append(end / begin)
        figures["workers"][pid] = {"trials": [n for n, _, _ in done], "trial_mb": peaks, "first_mb": begin,
                                   "last_mb": end, "ratio": end / begin}
        print(f"worker {pid}: trials {', '.join(str(n) for n, _, _ in done)}; largest RSS in each "
              f"{', '.join(f'{mb:.1f}' for mb in peaks)} MB")
        print(f"worker {pid}: largest RSS in its first trial {begin:.1f} MB, in its last {end:.1f} MB, ratio "
              f"{end / begin:.3f} ({verdict(end / begin, limit)})")
    if trials:
        begin = largest_within(samples, driver, trials[0][2], trials[0][3])
        end = largest_within(samples, driver, trials[-1][2], trials[-1][3])
        figures["sweep_process"] = {"first_mb": begin, "last_mb": end, "ratio": end / begin}
        print(f"the sweep process: largest RSS in the first trial {begin:.1f} MB, in the last {end:.1f} MB, "
              f"ratio {end / begin:.3f} ({verdict(end / begin, limit)})")
        ratios.append(end / begin)
    return figures, max(ratios, default=1.0)


def verdict(ratio, limit):
    return f"flat: within {limit - 1:.0%}" if ratio <= limit else f"grew more than {limit - 1:.0%}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first", type=int, default=2, help="train: the epoch the last is compared with "
                        "(default: %(default)s; the first epoch still allocates what the run keeps)")
    parser.add_argument("--limit", type=float, default=1.05, help="the largest ratio that counts as flat "
                        "(default: %(default)s)")
    parser.add_argument("--leak", type=float, default=0.0, metavar="MB", help="train: keep MB more memory after "
                        "every epoch, a deliberate leak (default: none)")
    parser.add_argument("--interval", type=float, default=0.5, help="sweep: seconds between samples "
                        "(default: %(default)s)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("command", choices=["train", "sweep"])
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the flags of fastnet train or fastnet sweep")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.command == "train":
        figures, ratio = report_train(train_rss(args.flags, args.leak), args.first, args.limit)
    else:
        figures, ratio = report_sweep(*sweep_rss(args.flags, args.interval), args.limit)
    print(f"fastnet {args.command} {' '.join(args.flags)}: {time.perf_counter() - started:.0f} s; CPU: {cpu_model()}, "
          f"{os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(figures | {"command": [args.command, *args.flags], "leak_mb": args.leak,
                                                         "cpu": cpu_model()}, indent=2))
    return 1 if ratio > args.limit else 0


if __name__ == "__main__":
    sys.exit(main())
