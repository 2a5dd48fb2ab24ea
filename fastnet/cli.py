"""The `fastnet` command: parses flags, calls train / evaluate / data download, and turns every
problem the user can fix into one line on stderr and exit status 2."""

import argparse
import difflib
import json
import os
import signal
import sys
import threading

import numpy as np

from fastnet import __version__, backends, bench, data, distributed, precision, report
from fastnet.errors import FastnetError, Interrupted, PeerLost, SettingError
from fastnet.model import ACTIVATIONS, NORMS
from fastnet.optim import OPTIMIZERS, SCHEDULES
from fastnet.precision import PRECISIONS
from fastnet.sweep.run import PRUNERS
from fastnet.sweep.space import FIXED
from fastnet.train import RECIPES, TTA, TrainConfig, recipe_config, resumed_config, saved_tta, train
from fastnet.workloads import WORKLOADS

USAGE_ERROR = 2
# What --resume lets a user change: where the data is and how fast it runs, never the numbers.
RESUMABLE_CHANGES = {"data", "backend", "checkpoint_every"}


class UsageError(FastnetError):
    pass


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, raised rather than printed with the usage. A flag
    it does not know gets the nearest one it does as a suggestion, and the help page of the command
    it was typed to."""

    def error(self, message):
        raise UsageError(f"{message}: see '{self.prog} --help'")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.command_parser(parsed)
            known = [flag for action in command._actions for flag in action.option_strings]
            guesses = [close[0] for word in unknown if word.startswith("--")
                       for close in [difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75)] if close]
            hint = f": did you mean {' or '.join(dict.fromkeys(guesses))}? see" if guesses else ": see"
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}{hint} '{command.prog} --help'")
        return parsed

    def command_parser(self, parsed):
        """The parser of the (sub)command that `parsed` ran: fastnet train's for `fastnet train ...`."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)].command_parser(parsed)
        return self


def whole_number(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} is {'not positive' if minimum > 0 else 'negative'}")
    return value


def positive_int(text):
    return whole_number(text, 1)


def count(text):
    """A whole number, 0 or more."""
    return whole_number(text, 0)


def widths(text):
    """--hidden: a comma list of positive integers, e.g. 512,512."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers, e.g. 512,512")
    return values


def norm_name(text):
    if text not in NORMS and text != "none":
        raise argparse.ArgumentTypeError(f"{text!r} is not a normalisation: choose layernorm or none")
    return None if text == "none" else text


def tta_name(text):
    """--tta: a test-time augmentation of TTA, or none."""
    if text != "none" and text not in TTA:
        raise argparse.ArgumentTypeError(f"{text!r} is not a test-time augmentation: choose flip or none")
    return None if text == "none" else text


def tta_flag(args):
    """evaluate's and predict's --tta as report and predict take it: "run" when not given."""
    return {None: "run", "none": None}.get(args.tta, args.tta)


def names(text):
    """--backend for bench: a comma list of backend names."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of backend names, e.g. numpy,numba")
    return values


def add_run_settings(run, defaults, leave_out=()):
    """The flags of the settings that define a run's numbers, on argument group `run`; those named in
    `leave_out` (TrainConfig names) are not added."""

    def setting(flag, help="", **kwargs):
        if flag.lstrip("-").replace("-", "_") in leave_out:
            return
        default = getattr(defaults, flag.lstrip("-").replace("-", "_"))
        if default is None:
            shown = "none"
        elif isinstance(default, tuple):
            shown = ",".join(map(str, default))
        else:
            shown = default
        run.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} (default: {shown})".strip(), **kwargs)

    setting("--hidden", type=widths, metavar="W,W,...", help="hidden layer widths")
    setting("--epochs", type=positive_int)
    setting("--batch-size", type=positive_int)
    setting("--optimizer", choices=OPTIMIZERS)
    setting("--lr", type=float, help="peak learning rate")
    setting("--momentum", type=float)
    setting("--weight-decay", type=float)
    setting("--schedule", choices=SCHEDULES)
    setting("--warmup", type=float, help="fraction of the run spent warming up; none means 0.3 for "
            "onecycle, else 0")
    setting("--seed", type=int)
    setting("--val", type=int, metavar="N", help="hold out N training images for validation; 0: none")
    setting("--out", metavar="DIR", help="run folder; none means runs/<timestamp>")
    setting("--activation", choices=ACTIVATIONS)
    setting("--norm", type=norm_name, metavar="layernorm|none", help="normalisation of every hidden layer")
    setting("--dropout", type=float, metavar="RATE", help="dropout after every hidden activation")
    setting("--label-smoothing", type=float, metavar="EPSILON")
    setting("--flip", action=argparse.BooleanOptionalAction, help="augment: random horizontal flips")
    setting("--translate", type=int, metavar="PIXELS", help="augment: random shifts of up to PIXELS")
    setting("--cutout", type=int, metavar="PIXELS", help="augment: blank a random PIXELS x PIXELS square")
    setting("--clip", type=float, metavar="NORM", help="clip gradients to this global norm")
    setting("--precision", choices=PRECISIONS, help="bf16: mixed precision, the GEMMs on bfloat16 operands, "
            "on CPUs with AMX-BF16 or AVX512-BF16")
    setting("--pca", type=count, metavar="K", help="train on the images' top K principal components instead "
            "of their pixels, fitted to 5,000 training images; 0: pixels")
    setting("--whiten", action=argparse.BooleanOptionalAction, help="with --pca: scale every component to unit "
            "variance (PCA whitening)")
    setting("--tta", type=tta_name, metavar="flip|none", help="test-time augmentation of every evaluation: flip "
            "averages the logits of each image and its mirror image")
    setting("--recipe", choices=RECIPES, help="start from a named recipe (fast: about a minute; best: at "
            "most 15 minutes); other flags override its settings")


def build_parser():
    defaults = TrainConfig()
    parser = Parser(prog="fastnet", description="Train dense neural networks on images, fast, on the CPU.")
    parser.add_argument("--version", action="version", version=f"fastnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add_data_and_backend(sub):
        sub.add_argument("--data", metavar="PATH", help="CIFAR-10 archive, batches folder or .npy folder "
                         "(default: $FASTNET_DATA or data/)")
        sub.add_argument("--backend", help=f"kernel backend: {', '.join(backends.available())} "
                         "(default: $FASTNET_BACKEND or numpy)")
        sub.add_argument("--threads", type=positive_int, metavar="N",
                         help="cores to use (default: all): the numba backend's threads, or numpy's BLAS threads")

    t = commands.add_parser("train", help="train a network and evaluate it after every epoch")
    add_data_and_backend(t)
    # The settings that define a run's numbers. They default to SUPPRESS so that the namespace holds
    # only what was typed: --resume must know which settings the user tried to change.
    add_run_settings(t.add_argument_group("run settings (fixed for a run: --resume takes them from its checkpoint)"),
                     defaults)
    t.add_argument("--checkpoint-every", type=positive_int, metavar="STEPS",
                   help="also write checkpoint.npz every STEPS steps (default: after every epoch only)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint.npz, with its own settings")
    t.add_argument("--plot", action="store_true",
                   help="at the end, draw curves.png and confusion.png into the run folder (needs matplotlib)")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel training over MPI, one process per share of each batch: launch as "
                        "mpirun -n N fastnet train --distributed ... (needs mpi4py; --threads defaults to the "
                        "cores per rank)")
    t.add_argument("--peer-timeout", type=float, default=distributed.PEER_TIMEOUT, metavar="SECONDS",
                   help="with --distributed: stop when a rank has sent nothing for this long (default: %(default)g)")
    t.add_argument("--overlap", action="store_true",
                   help="with --distributed: sum the upper layers' gradients on a thread of each rank while backward "
                        "computes the first layer (pays on slow links only: see the README)")

    e = commands.add_parser("evaluate", help="test accuracy, per-class accuracy and confusion matrix of a model")
    e.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    add_data_and_backend(e)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--tta", choices=("flip", "none"), help="test-time augmentation (default: the one the run "
                   "was evaluated with)")
    e.add_argument("--out", metavar="DIR", help="also write DIR/report.json: accuracy, per-class precision, "
                   "recall and F1, confusion matrix")

    b = commands.add_parser("bench", help="time training steps on synthetic data, per backend and against PyTorch")
    b.add_argument("--backend", type=names, default=",".join(backends.available()), metavar="B,B,...",
                   help="backends to time (default: %(default)s)")
    b.add_argument("--workload", choices=list(WORKLOADS), default="R1",
                   help="the network and batch size: " + "; ".join(map(str, WORKLOADS.values()))
                   + " (default: %(default)s)")
    b.add_argument("--hidden", type=widths, metavar="W,W,...", help="hidden layer widths instead of the workload's")
    b.add_argument("--batch-size", type=positive_int, help="batch size instead of the workload's")
    b.add_argument("--steps", type=positive_int, default=100, help="timed training steps (default: %(default)s)")
    b.add_argument("--repeats", type=positive_int, default=3,
                   help="runs of each side, interleaved; the table shows the median (default: %(default)s)")
    b.add_argument("--threads", type=positive_int, metavar="N", help="cores each side uses (default: all)")
    b.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fastnet's sides in this precision; PyTorch's under bf16 autocast for bf16 "
                   "(default: %(default)s)")
    b.add_argument("--ranks", type=positive_int, metavar="N",
                   help="also time each backend data-parallel on N ranks under mpirun, the cores shared among "
                        "them (fastnet train --distributed; needs mpi4py and an MPI)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    pn = commands.add_parser("plan", help="show, or measure again, the numba backend's plan for this machine: "
                             "the BLAS its tiles call and how finely products are cut")
    pn.add_argument("--measure", action="store_true", help="time every BLAS and tile size here, quiet and beside a "
                    "busy process (1.5 minutes on 2 cores), and keep the fastest for every later run")
    pn.add_argument("--json", action="store_true", help="print the plan as JSON")

    sw = commands.add_parser("sweep", help="search fastnet train settings with Optuna, trials on Dask workers")
    sw.add_argument("--data", metavar="PATH", help="the dataset, at a path every worker can read "
                    "(default: $FASTNET_DATA or data/)")
    sw.add_argument("--backend", help=f"kernel backend of every trial: {', '.join(backends.available())}")
    sw.add_argument("--space", metavar="SPACE.toml", help="the search space (default: fastnet's, "
                    "fastnet/sweep/default_space.toml)")
    sw.add_argument("--trials", type=positive_int, default=20, help="finished trials the study ends with, "
                    "counting those of earlier runs of the same study (default: %(default)s)")
    sw.add_argument("--timeout", type=float, metavar="MINUTES", help="start no trial after this long")
    sw.add_argument("--workers", type=positive_int, metavar="W", help="Dask worker processes on this machine "
                    "(default: one per core)")
    sw.add_argument("--scheduler", metavar="ADDRESS", help="run the trials on the Dask cluster of this scheduler, "
                    "tcp://HOST:8786 or tls://HOST:8786, instead of on workers started here (README, Sweeps)")
    for name, what in (("ca-file", "the certificate authority's"), ("cert", "this client's certificate"),
                       ("key", "this client's private key")):
        sw.add_argument(f"--tls-{name}", metavar="PEM", help=f"with a tls:// scheduler: {what} PEM file")
    sw.add_argument("--threads-per-trial", type=positive_int, default=1, metavar="T",
                    help="cores each trial uses (default: %(default)s)")
    sw.add_argument("--storage", metavar="URL", help="the study's database, an Optuna RDB URL such as "
                    "postgresql://user@host/db (default: sqlite in the sweep folder)")
    sw.add_argument("--study", default="fastnet", help="the study's name in the database (default: %(default)s)")
    sw.add_argument("--val", type=positive_int, default=5000, metavar="N",
                    help="training images held out to choose on; the test set never is (default: %(default)s)")
    sw.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="(default: %(default)s)")
    sw.add_argument("--pruner", choices=PRUNERS, default="median",
                    help="stop trials behind the others on validation accuracy (default: %(default)s)")
    sw.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    sw.add_argument("--out", metavar="DIR", help="the sweep folder (default: sweeps/<timestamp>)")
    add_run_settings(sw.add_argument_group("fastnet train settings, fixed for every trial"), defaults,
                     leave_out=FIXED)

    p = commands.add_parser("predict", help="classify image files (PNG, JPEG, BMP) with a trained model")
    p.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("--top", type=positive_int, default=3, metavar="K",
                   help="how many classes to show per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--tta", choices=("flip", "none"), help="test-time augmentation (default: the one the run "
                   "was evaluated with)")
    p.add_argument("--backend", help=f"kernel backend: {', '.join(backends.available())} "
                   "(default: $FASTNET_BACKEND or numpy)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="cores to use (default: all): the numba backend's threads, or numpy's BLAS threads")

    pl = commands.add_parser("plot", help="draw a run's learning curves and confusion matrix as PNG files")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by fastnet train")
    add_data_and_backend(pl)

    r = commands.add_parser("runs", help="list past runs: model, epochs, best test accuracy, speed")
    r.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                   help="the folder that holds the runs (default: %(default)s)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    d = commands.add_parser("data", help="manage datasets")
    data_commands = d.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    dl = data_commands.add_parser("download", help="download the official CIFAR-10 archive")
    dl.add_argument("--to", metavar="DIR", help="folder to put it in (default: $FASTNET_DATA or data/)")
    return parser


def blas_threads(args, backend=None):
    """Run the command on --threads cores: the backend's own way of using them (see
    backends.use_threads), or its default when --threads is not given."""
    return backends.use_threads(backend or args.backend, args.threads)


def run_train(args):
    # --data, --backend and --checkpoint-every are None when not typed; a run setting is there only when
    # typed, and then None is what the user asked for (--norm none), even over a recipe's value.
    given = {k: v for k, v in vars(args).items()
             if k in TrainConfig.__dataclass_fields__ and (v is not None or k not in RESUMABLE_CHANGES)}
    if args.resume:
        changed = sorted(set(given) - RESUMABLE_CHANGES)
        if changed:
            raise UsageError(f"--resume continues a run with the settings it started with: drop "
                             f"{', '.join('--' + name.replace('_', '-') for name in changed)}")
        config = resumed_config(args.resume, **given)
    else:
        config = recipe_config(**given)
    if args.overlap and not args.distributed:
        raise UsageError("--overlap overlaps the sums of a data-parallel run: add --distributed, under mpirun")
    parallel = distributed.start(args.peer_timeout, args.overlap) if args.distributed else None
    if parallel is not None and args.threads is None:
        args.threads = parallel.default_threads()
    with blas_threads(args, config.backend):
        summary = train(config, resume=bool(args.resume), parallel=parallel)
        if parallel is not None and not parallel.writes:
            return
        if args.plot:
            print("wrote " + " and ".join(report.plot_run(summary["out"], data=config.data, backend=config.backend)))
    kept, epochs = summary["kept"], summary["epoch"]
    which = ("" if kept["epoch"] == epochs else
             f" (epoch {kept['epoch']}, the best by validation accuracy: test accuracy {kept['test_acc']:.2%})")
    print(f"done: test accuracy {summary['test_acc']:.2%} after {epochs} epoch{'' if epochs == 1 else 's'}; "
          f"model in {summary['out']}/model.npz{which}")


def run_evaluate(args):
    with blas_threads(args):
        evaluation = evaluation_report(args)
    if args.out:
        written = report.write_classification_report(args.out, evaluation, model=args.model)
        if not args.json:
            print(f"report written to {written}")
    if args.json:
        print(json.dumps(evaluation))
        return
    print_report(evaluation)


def evaluation_report(args):
    """Accuracy, loss, per-class accuracy and confusion matrix of a saved model on the test split."""
    saved, dataset, result = report.evaluate_saved_model(args.model, args.data, args.backend, tta_flag(args))
    confusion = result.confusion(dataset.test_labels, dataset.num_classes)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {"accuracy": result.accuracy, "loss": result.loss, "tta": saved_tta(saved.config, tta_flag(args)),
            "images": len(dataset.test_labels),
            "source": dataset.source, "class_names": saved.class_names,
            "per_class_accuracy": per_class.tolist(), "confusion": confusion.tolist()}


def print_report(evaluation):
    names, confusion = evaluation["class_names"], evaluation["confusion"]
    views = ", each averaged with its mirror image" if evaluation["tta"] == "flip" else ""
    print(f"test accuracy {evaluation['accuracy']:.2%}  loss {evaluation['loss']:.4f}  on {evaluation['images']} "
          f"images from {evaluation['source']}{views}")
    width = max(len(n) for n in names)
    print(f"{'class':<{width}}  accuracy")
    for name, acc in zip(names, evaluation["per_class_accuracy"], strict=True):
        print(f"{name:<{width}}  {acc:7.2%}")
    print("confusion matrix (rows: true class, columns: predicted):")
    cell = max(len(str(max(max(row) for row in confusion))), 4)
    print(" " * width + "  " + " ".join(f"{i:>{cell}}" for i in range(len(names))))
    for name, row in zip(names, confusion, strict=True):
        print(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row))


def run_bench(args):
    for name in args.backend:
        backends.resolve(name)  # an unknown or unavailable name stops here, in one line
        precision.check(args.precision, name)
    workload = WORKLOADS[args.workload]
    timings = bench.bench(args.backend, args.hidden or workload.hidden, args.batch_size or workload.batch_size,
                          args.steps, args.threads, args.precision, args.repeats, args.ranks)
    print(json.dumps(timings) if args.json else bench.format_report(timings))


def run_plan(args):
    backends.resolve("numba")  # the plan is the numba backend's: without Numba, one line says so
    from fastnet.backends import numba_plan
    if args.measure:
        numba_plan.measure(log=lambda line: print(line, file=sys.stderr))
    saved = numba_plan.load()
    if args.json:
        print(json.dumps({"status": numba_plan.status(), "plan": saved}))
    else:
        print(numba_plan.format_plan(saved))


def run_data(args):
    if args.data_command != "download":
        raise UsageError("fastnet data needs an action: fastnet data download [--to DIR]")
    path = data.download(to=args.to, log=print)
    print(f"CIFAR-10 archive ready: {path}")


def terminate(signum, frame):
    """SIGTERM outside training (where fastnet.train handles it) ends the command like Ctrl-C."""
    raise Interrupted(signum, "terminated")


def run_sweep(args):
    from fastnet.sweep import run

    fixed = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k not in FIXED}
    config = run.SweepConfig(data=args.data, space=args.space, trials=args.trials, timeout=args.timeout,
                             workers=args.workers, scheduler=args.scheduler, tls_ca_file=args.tls_ca_file,
                             tls_cert=args.tls_cert, tls_key=args.tls_key,
                             threads_per_trial=args.threads_per_trial, storage=args.storage,
                             study=args.study, val=args.val, epochs=args.epochs, pruner=args.pruner, seed=args.seed,
                             out=args.out, backend=args.backend, fixed=fixed)
    summary = run.sweep(config)
    print(run.format_results(summary))


def run_predict(args):
    from fastnet import predict

    with blas_threads(args):
        model = predict.load(args.model, backend=args.backend, tta=tta_flag(args))
        if predict.image_geometry(model.sample_shape) is None:
            raise UsageError(f"{args.model} takes samples of shape {model.sample_shape}, which no image file "
                             "maps onto: use fastnet.load(...).predict on arrays instead")
        results, failed = [], 0
        for path, top, error in predict.predict_files(model, predict.image_files(args.images), args.top):
            if error is not None:
                failed += 1
                print(f"fastnet: error: {error}", file=sys.stderr)
                results.append({"file": path, "error": str(error)})
            elif args.json:
                results.append({"file": path, "top": [{"class": name, "index": index, "probability": p}
                                                      for index, name, p in top]})
            else:
                print(f"{path}: " + ", ".join(f"{name} {predict.percent(p)}" for _, name, p in top), flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "top": args.top, "predictions": results}))
    if failed:
        raise SystemExit(1)  # each failure already has its own line; the others were classified


def run_plot(args):
    with blas_threads(args):
        written = report.plot_run(args.run_dir, data=args.data, backend=args.backend)
    print("wrote " + " and ".join(written))


def run_runs(args):
    rows = report.list_runs(args.dir)
    if args.json:
        print(json.dumps({"dir": args.dir, "runs": rows}))
    elif rows:
        print(report.format_runs(rows))
    else:
        print(f"no runs in {args.dir}: a run is a folder with a config.json, as fastnet train writes")


def main(argv=None):
    parser = build_parser()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return USAGE_ERROR
        {"train": run_train, "evaluate": run_evaluate, "bench": run_bench, "sweep": run_sweep, "data": run_data,
         "predict": run_predict, "plot": run_plot, "runs": run_runs, "plan": run_plan}[args.command](args)
    except FastnetError as exc:
        message = exc.on_command_line() if isinstance(exc, SettingError) else exc
        # Every rank of a data-parallel run meets the same bad setting: rank 0 says it once.
        if distributed.running is None or distributed.running.writes or isinstance(exc, PeerLost):
            print(f"fastnet: error: {message}", file=sys.stderr)
        distributed.abort(exc.exit_status)
        return exc.exit_status
    except Interrupted as exc:
        if distributed.running is None or distributed.running.writes:  # every rank stopped at this step
            print(f"fastnet: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fastnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `fastnet evaluate ... | head`): not an error worth a traceback.
        # Point stdout at /dev/null so Python's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
