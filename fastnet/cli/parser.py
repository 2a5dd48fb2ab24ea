"""The parser of the `fastnet` command: its commands and their flags, with errors that are one line."""

import argparse
import difflib
import textwrap

from fastnet import __version__, backends, distributed
from fastnet.cli import help_texts
from fastnet.cli.flag_types import (
    decay_or_none,
    image_size,
    names,
    none_word,
    norm_name,
    positive_int,
    whole_number,
    widths,
)
from fastnet.config import RECIPES, TrainConfig
from fastnet.data.components import PCA_SAMPLE
from fastnet.errors import FastnetError
from fastnet.model import ACTIVATIONS
from fastnet.optim import OPTIMIZERS, SCHEDULES
from fastnet.precision import CHOICES, PRECISIONS
from fastnet.sweep.run import PRUNERS
from fastnet.sweep.space import FIXED
from fastnet.workloads import WORKLOADS


class UsageError(FastnetError):
    pass


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, raised rather than printed with the usage. A flag
    it does not know gets the nearest one it does as a suggestion, and the help page of the command
    it was typed to. Its description and epilog are printed as written, so that a command's reference
    keeps its paragraphs, lists and examples."""

    def __init__(self, *args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

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
    setting("--test-fraction", type=float, metavar="F", help="of an image tree without test/: hold out this share "
            "of each class of train/ as the test split; 0: none")
    setting("--image-size", type=image_size, metavar="HxW", help="of an image tree: resize every image to HxW "
            "(stretched, Lanczos), as predict does; none: all must have one size")
    setting("--out", metavar="DIR", help="run folder; none means runs/<timestamp>")
    setting("--activation", choices=ACTIVATIONS)
    setting("--norm", type=norm_name, metavar="layernorm|none", help="normalisation of every hidden layer")
    setting("--dropout", type=float, metavar="RATE", help="dropout after every hidden activation")
    setting("--label-smoothing", type=float, metavar="EPSILON")
    setting("--flip", action=argparse.BooleanOptionalAction, help="augment: random horizontal flips")
    setting("--translate", type=int, metavar="PIXELS", help="augment: random shifts of up to PIXELS")
    setting("--cutout", type=int, metavar="PIXELS", help="augment: blank a random PIXELS x PIXELS square")
    setting("--clip", type=float, metavar="NORM", help="clip gradients to this global norm")
    setting("--eval-every", type=positive_int, metavar="EPOCHS", help="evaluate on the test (and validation) "
            "images every EPOCHS epochs, and after the last")
    setting("--precision", choices=CHOICES, help="bf16: mixed precision, the GEMMs on bfloat16 operands, "
            "on CPUs with AMX-BF16 or AVX512-BF16; auto: bf16 where it is faster here, else fp32")
    setting("--pca", type=whole_number, metavar="K", help="train on the images' top K principal components instead "
            f"of their pixels, fitted to {PCA_SAMPLE:,} training images; 0: pixels")
    setting("--whiten", action=argparse.BooleanOptionalAction, help="with --pca: scale every component to unit "
            "variance (PCA whitening)")
    setting("--tta", type=none_word, metavar="flip|flip+shift|none", help="test-time augmentation of every "
            "evaluation: flip averages the logits of each image and its mirror image; flip+shift those of both "
            "as they are and shifted a pixel up, down, left and right (10 views)")
    setting("--ema", type=decay_or_none, metavar="DECAY|none", help="keep an exponential moving average of the "
            "weights with this decay per step, and evaluate and save it as the model")
    setting("--recipe", choices=RECIPES, help="start from a named recipe (see Recipes below); other flags "
            "override its settings")


def build_parser():
    defaults = TrainConfig()
    parser = Parser(prog="fastnet", description="Train dense neural networks on images, fast, on the CPU.",
                    epilog=help_texts.FASTNET_EPILOG)
    parser.add_argument("--version", action="version", version=f"fastnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(group, name, summary, epilog):
        """A (sub)command: `summary` in the list of commands and atop its help, `epilog` below it."""
        description = textwrap.fill(summary[0].upper() + summary[1:] + ".", width=79)  # printed as written
        return group.add_parser(name, help=summary, description=description, epilog=epilog)

    def add_data_and_backend(sub):
        sub.add_argument("--data", metavar="PATH", help="folder of class folders (train/<class>/, test/<class>/), "
                         "CIFAR-10 archive, batches folder or .npy folder "
                         "(default: $FASTNET_DATA or data/)")
        sub.add_argument("--backend", help=f"kernel backend: {', '.join(backends.available())} "
                         "(default: $FASTNET_BACKEND or numpy)")
        sub.add_argument("--threads", type=positive_int, metavar="N",
                         help="cores to use (default: all): the numba backend's threads, or numpy's BLAS threads")

    t = command(commands, "train", "train a network and evaluate it after every epoch", help_texts.TRAIN_EPILOG)
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
                        "computes the first layer (pays on slow links only)")

    e = command(commands, "evaluate", "test accuracy, per-class accuracy and confusion matrix of a model",
                help_texts.EVALUATE_EPILOG)
    e.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    add_data_and_backend(e)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--tta", metavar="flip|flip+shift|none", help="test-time augmentation (default: the one the run "
                   "was evaluated with)")
    e.add_argument("--out", metavar="DIR", help="also write DIR/report.json: accuracy, per-class precision, "
                   "recall and F1, confusion matrix")

    b = command(commands, "bench", "time training steps on synthetic data, per backend and against PyTorch",
                help_texts.BENCH_EPILOG)
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

    pn = command(commands, "plan", "show, or measure again, the numba backend's plan for this machine: "
                 "the BLAS its tiles call and how finely products are cut", help_texts.PLAN_EPILOG)
    pn.add_argument("--measure", action="store_true", help="time every BLAS and tile size here, quiet and beside a "
                    "busy process (a few minutes), and keep the fastest for every later run")
    pn.add_argument("--json", action="store_true", help="print the plan as JSON")

    sw = command(commands, "sweep", "search fastnet train settings with Optuna, trials on Dask workers",
                 help_texts.SWEEP_EPILOG)
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
                    "tcp://HOST:8786 or tls://HOST:8786, instead of on workers started here")
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

    p = command(commands, "predict", "classify image files (PNG, JPEG, BMP) with a trained model",
                help_texts.PREDICT_EPILOG)
    p.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders to search for them")
    p.add_argument("--top", type=positive_int, default=3, metavar="K",
                   help="how many classes to show per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--csv", metavar="FILE", help="also write one CSV row per image: path, class, probability, "
                   "then class_2, probability_2, ... up to --top K, and error")
    p.add_argument("--tta", metavar="flip|flip+shift|none", help="test-time augmentation (default: the one the run "
                   "was evaluated with)")
    p.add_argument("--backend", help=f"kernel backend: {', '.join(backends.available())} "
                   "(default: $FASTNET_BACKEND or numpy)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="cores to use (default: all): the numba backend's threads, or numpy's BLAS threads")

    x = command(commands, "export", "write a trained model as an ONNX graph: uint8 images in, class "
                "probabilities out", help_texts.EXPORT_EPILOG)
    x.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    x.add_argument("--to", metavar="FILE", help="the .onnx file to write (default: model.onnx beside the model)")
    x.add_argument("--tta", metavar="flip|flip+shift|none", help="test-time augmentation in the graph (default: "
                   "the one the run was evaluated with)")
    x.add_argument("--top-class", action="store_true", help="a second output, top_class: each image's most "
                   "likely class index")

    pl = command(commands, "plot", "draw a run's learning curves and confusion matrix as PNG files",
                 help_texts.PLOT_EPILOG)
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by fastnet train")
    add_data_and_backend(pl)

    r = command(commands, "runs", "list past runs: model, epochs, the kept model's test accuracy, speed",
                help_texts.RUNS_EPILOG)
    r.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                   help="the folder that holds the runs (default: %(default)s)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    d = command(commands, "data", "manage datasets", help_texts.DATA_EPILOG)
    data_commands = d.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    dl = command(data_commands, "download", "download the official CIFAR-10 archive", help_texts.DOWNLOAD_EPILOG)
    dl.add_argument("--to", metavar="DIR", help="folder to put it in (default: $FASTNET_DATA or data/)")
    return parser
