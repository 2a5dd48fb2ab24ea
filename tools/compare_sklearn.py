"""Compare fastnet.sklearn.MLPClassifier with scikit-learn's MLPClassifier, fit against fit.

    python tools/compare_sklearn.py [--data PATH] [--train-size 10000] [--hidden 128] [--batch 200]
                                    [--epochs 10] [--repeats 3] [--sides sklearn,fastnet:numba,...]
                                    [--quiet-wait 30] [--json FILE]

Each side fits a classifier as its users would, on the first --train-size CIFAR-10 training images as
float32 in [0, 1] (the same X for every side), a 3072-H-10 network (H: --hidden), --epochs epochs of
SGD with momentum 0.9 (not Nesterov's), the harness's constant learning rate 0.01, no L2 penalty,
batch --batch, seed 0; then scores the 10,000 test images. Sides:

  sklearn              scikit-learn's MLPClassifier(solver="sgd", nesterovs_momentum=False, ...), which keeps
                       float32 for float32 X
  sklearn+scaler       the same behind a StandardScaler: each feature standardised, as fastnet's estimator does
  fastnet:numba        fastnet.sklearn.MLPClassifier(optimizer="momentum", schedule="constant", backend="numba")
  fastnet:numpy        the same on the numpy backend
  fastnet:numba@bf16   the numba backend in mixed precision (precision="bf16"), where fastnet allows it

The timed part is the whole fit (input checks, standardisation, the epochs) after an untimed fit of
one epoch on four batches, which imports the libraries, loads the kernels and starts the thread pools;
"epoch s" is that fit's seconds over its epochs. Every fit runs in a fresh process of its own
(fastnet.harness.measure, the harness of fastnet bench and tools/compare_workloads.py), the repeats
interleaved (A B C A B C ...), medians reported with the spread; "others" is the most cores other
processes kept busy during one of a side's fits.
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The workers, in processes of their own, import the same fastnet (a checkout need not install it).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from fastnet import harness  # noqa: E402
from fastnet.cpu import DISTURBED, cpu_model  # noqa: E402

SIDES = ("sklearn", "sklearn+scaler", "fastnet:numba", "fastnet:numpy", "fastnet:numba@bf16")
REFERENCE = "sklearn"
# The goals: faster per epoch than scikit-learn's float32 fit, at its test accuracy or better (within a point).
GOALS = {"fastnet:numba": 4.0, "fastnet:numpy": 1.5}
ACCURACY_POINTS = 1.0


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "cifar-10-batches-py"),
                        help="a CIFAR-10 dataset in any layout fastnet reads (default: data/cifar-10-batches-py)")
    parser.add_argument("--train-size", type=int, default=10_000, help="the first N training images (default 10,000)")
    parser.add_argument("--hidden", type=int, default=128, help="the hidden layer's width H of 3072-H-10 (default 128)")
    parser.add_argument("--batch", type=int, default=200, help="minibatch rows, scikit-learn's default (200)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each fit (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="fits of each side, interleaved (default 3)")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help=f"comma-separated, of {', '.join(SIDES)} (default: all)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for an idle second first")
    parser.add_argument("--json", help="also write every run's result to this file")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in ("sklearn", "sklearn+scaler") and not s.startswith("fastnet:")]
    if unknown:
        parser.error(f"unknown sides {unknown}: choose from {', '.join(SIDES)}")
    sizes = [3072, args.hidden, 10]
    results = []
    for repeat in range(args.repeats):
        for side in sides:
            spec = {"side": side, "sizes": sizes, "batch": args.batch, "epochs": args.epochs,
                    "train_size": args.train_size, "data": str(Path(args.data).resolve())}
            result = harness.measure(spec, args.quiet_wait) | {"side": side}
            results.append(result)
            print(f"  run {repeat + 1}/{args.repeats} {side}: "
                  + (result["error"] if "error" in result else f"{result['seconds']:.2f} s, "
                     f"test accuracy {result['test_accuracy']:.2%}"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(sides, results, sizes, args)


def report(sides, results, sizes, args):
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} logical cores")
    print(f"python {sys.version.split()[0]}; numpy {version('numpy')}; scikit-learn {version('scikit-learn')}; "
          f"numba {version('numba')}; threadpoolctl {version('threadpoolctl')}")
    print(f"{args.train_size:,} training images as float32 in [0, 1], MLP {'-'.join(map(str, sizes))}, batch "
          f"{args.batch}, {args.epochs} epochs of SGD with momentum {harness.MOMENTUM}, lr {harness.LR}; median of "
          f"{args.repeats} fits, each in its own process")
    print(f"{'side':<20}{'epoch s (min-max)':>22}{'samples/s':>11}{'x sklearn':>10}{'test acc':>10}{'warm-up s':>11}"
          f"{'cpu/wall':>9}{'others':>8}  BLAS")
    figures = {}
    for side in sides:
        runs = [r for r in results if r["side"] == side and "error" not in r]
        errors = [r["error"] for r in results if r["side"] == side and "error" in r]
        if errors:
            print(f"{side:<20}FAILED {len(errors)} of {args.repeats}: {errors[0]}")
        if not runs:
            continue
        s = harness.summarize(runs, sizes)
        epoch = [seconds / args.epochs for seconds in s["seconds_runs"]]
        accuracy = statistics.median(r["test_accuracy"] for r in runs)
        figures[side] = (s["samples_per_second"], accuracy)
        spread = f"{statistics.median(epoch):.3f} ({epoch[0]:.3f}-{epoch[-1]:.3f})"
        ratio = s["samples_per_second"] / figures[REFERENCE][0] if REFERENCE in figures else float("nan")
        pools = runs[0]["threadpools"]
        blas = harness.describe_pools(pools)
        print(f"{side:<20}{spread:>22}{s['samples_per_second']:>11,.0f}{ratio:>10.2f}{accuracy:>10.2%}"
              f"{s['warmup_seconds']:>11.2f}{s['cpu_per_wall']:>9.2f}{s['other_load']:>8.2f}  {blas}")
        if runs[0].get("epochs_seconds") is not None:
            inside = statistics.median(r["epochs_seconds"] / r["seconds"] for r in runs)
            print(f"{'':<20}the epochs took {inside:.0%} of the fit, the rest the estimator's own: input checks, "
                  f"standardisation, building the run")
        if s["disturbed_runs"]:
            print(f"       WARNING: other processes kept > {DISTURBED} cores busy during {s['disturbed_runs']} of "
                  f"{len(runs)} {side} fits")
    if REFERENCE not in figures:
        return
    speed, accuracy = figures[REFERENCE]
    for side, (their_speed, their_accuracy) in figures.items():
        if side == REFERENCE:
            continue
        ratio, points = their_speed / speed, 100 * (their_accuracy - accuracy)
        goal = GOALS.get(side)
        verdict = ""
        if goal:
            met = ratio >= goal and points >= -ACCURACY_POINTS
            verdict = (f" (goal >= {goal:.1f}x at the accuracy within {ACCURACY_POINTS:g} point: "
                       f"{'met' if met else 'NOT met'})")
        print(f"{side} / {REFERENCE}: {ratio:.2f}x the samples/s, test accuracy {points:+.2f} points{verdict}")


if __name__ == "__main__":
    main()
