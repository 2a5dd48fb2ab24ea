"""The `fastnet` command: parses flags, calls train / evaluate / data download, and turns every
problem the user can fix into one line on stderr and exit status 2."""

import argparse
import difflib
import json
import os
import signal
import sys
import textwrap
import threading

import numpy as np

from fastnet import __version__, backends, bench, data, distributed, precision, report, settings
from fastnet.config import RECIPES, TrainConfig, recipe_config
from fastnet.data.components import PCA_SAMPLE
from fastnet.data.downloading import CIFAR10_MD5, CIFAR10_URL
from fastnet.errors import FastnetError, Interrupted, PeerLost, SettingError
from fastnet.evaluation import saved_tta
from fastnet.model import ACTIVATIONS, NORMS
from fastnet.optim import OPTIMIZERS, SCHEDULES
from fastnet.precision import PRECISIONS
from fastnet.predict import IMAGE_SUFFIXES
from fastnet.run_folder import resumed_config
from fastnet.sweep.run import PRUNERS
from fastnet.sweep.space import FIXED
from fastnet.train import train
from fastnet.workloads import WORKLOADS

USAGE_ERROR = 2
# What --resume lets a user change: where the data is and how fast it runs, never the numbers.
RESUMABLE_CHANGES = {"data", "backend", "checkpoint_every"}


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


def whole_number(text, minimum=None):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"{text} is {'not positive' if minimum > 0 else 'negative'}")
    return value


def positive_int(text):
    return whole_number(text, 1)


def widths(text):
    """--hidden: a comma list of positive integers, e.g. 512,512."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers, e.g. 512,512")
    return values


def image_size(text):
    """--image-size: HxW, e.g. 32x32."""
    try:
        return settings.image_size("image_size", text)
    except SettingError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HxW in pixels, e.g. 32x32") from None


def norm_name(text):
    if text not in NORMS and text != "none":
        raise argparse.ArgumentTypeError(f"{text!r} is not a normalisation: choose layernorm or none")
    return None if text == "none" else text


def none_word(text):
    """The command line's none as Python's None; any other word as it is, for the setting's rule
    (fastnet.settings) to judge, so that its message is the one the Python API gives."""
    return None if text == "none" else text


def tta_flag(args):
    """evaluate's and predict's --tta as report and predict take it: "run" when not given."""
    if args.tta is None:
        return "run"
    return settings.test_time_augmentation("tta", none_word(args.tta))


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
    setting("--precision", choices=PRECISIONS, help="bf16: mixed precision, the GEMMs on bfloat16 operands, "
            "on CPUs with AMX-BF16 or AVX512-BF16")
    setting("--pca", type=whole_number, metavar="K", help="train on the images' top K principal components instead "
            "of their pixels, fitted to 5,000 training images; 0: pixels")
    setting("--whiten", action=argparse.BooleanOptionalAction, help="with --pca: scale every component to unit "
            "variance (PCA whitening)")
    setting("--tta", type=none_word, metavar="flip|none", help="test-time augmentation of every evaluation: flip "
            "averages the logits of each image and its mirror image")
    setting("--recipe", choices=RECIPES, help="start from a named recipe (see Recipes below); other flags "
            "override its settings")


# --- The reference of each command ------------------------------------------------------------------
# Each command's --help ends with its full reference (its epilog), printed as written: lines of at most
# 79 characters, so that a terminal of 80 columns shows them as they are. docs/cli.md is generated from
# these parsers by tools/cli_reference.py, so the help and the documentation cannot disagree.


def as_flags(chosen):
    """Settings as the command line writes them, a flag and its value each: {"pca": 256, "flip": True}
    -> ["--pca 256", "--flip"]."""
    words = []
    for name, value in chosen.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, tuple):
            words.append(f"{flag} {','.join(map(str, value))}")
        else:
            words.append(f"{flag} {value}")
    return words


def recipes_text():
    """The recipes as the flags they stand for, from RECIPES itself; a line never parts a flag from
    its value."""
    glue = "\N{NO-BREAK SPACE}"
    return "\n".join(textwrap.fill(" ".join(word.replace(" ", glue) for word in as_flags(chosen)), width=79,
                                   initial_indent=f"  {name:<6}", subsequent_indent=" " * 8,
                                   break_on_hyphens=False).replace(glue, " ")
                     for name, chosen in RECIPES.items())


EXIT_STATUSES = """\
Exit statuses:
  0    done
  1    fastnet predict: some images could not be read (the others were
       classified)
  2    bad input: a flag, a setting, the data, a model or checkpoint file
  3    training diverged; a rank of a data-parallel run died or went silent;
       a sweep's database went away
  130  stopped by Ctrl-C (SIGINT)
  141  the reader of the output went away (as with | head)
  143  stopped by SIGTERM"""

FASTNET_EPILOG = f"""\
Run 'fastnet COMMAND --help' for the full reference of a command: its flags,
what it prints and the files it writes. 'python -m fastnet' is the same
command as 'fastnet'.

Environment:
  FASTNET_DATA         the dataset when --data is not given (else data/)
  FASTNET_BACKEND      the kernel backend when --backend is not given (else
                       numpy)
  FASTNET_BLAS         mkl or openblas: the BLAS the numba backend's tiles
                       call, over its plan (see 'fastnet plan --help')
  FASTNET_PLAN         tile_flops=N,tile_multiple=N,pass_elements=N: the numba
                       backend's plan for one command
  FASTNET_PLAN_FILE    where 'fastnet plan --measure' keeps the plan
  FASTNET_BF16_ANY_CPU 1: allow --precision bf16 on a CPU without bfloat16
                       instructions (no faster than fp32; for tests)

Errors. Every mistake a user can fix (a bad flag, missing or corrupt data, a
checkpoint that is not fastnet's or does not fit the data) is one line on
stderr that says what to do, never a traceback.

{EXIT_STATUSES}"""

TRAIN_EPILOG = f"""\
Examples:
  fastnet train                         the default run, on the data in data/
  fastnet train --recipe fast           a named recipe; other flags override it
  fastnet train --backend numba --val 5000 --hidden 1024,1024 --out runs/wide
  fastnet train --resume runs/wide      continue a stopped run

Data. --data is the CIFAR-10 archive cifar-10-python.tar.gz (read in place,
never unpacked), the unpacked cifar-10-batches-py/ folder, or a folder of
.npy files {{train,test}}_{{images,labels}}.npy; the folder that holds any of
these works too. Without --data, the data is in $FASTNET_DATA, else in data/;
when there is none there, fastnet train downloads CIFAR-10 there first. The
input size and the number of classes come from the data. Each batch is
scaled to [0, 1] and standardised per channel, with the mean and standard
deviation of the training split (after --val), saved with the model.

Defaults. Each flag above shows its default. Weight decay applies to the
weight matrices, not to the biases. The schedules: onecycle goes up from
lr/25 to lr over the first --warmup of the steps (0.3 when not given), then
down along half a cosine to lr/25/1e4; step is lr, then lr/10 after half the
steps and lr/100 after three quarters; cosine goes from lr down to 0 along
half a cosine; constant stays at lr. All but onecycle first ramp up from 0
when --warmup is above 0. --val N holds out N training images, drawn by the
seed, and reports validation loss and accuracy too.

Recipes. --recipe NAME starts from these settings; any flag given with it
overrides that setting (and --pca 0 turns off the recipe's --whiten too):
{recipes_text()}

Output. After every epoch, one line: the epoch, training loss and accuracy,
validation and test loss and accuracy, the epoch's training time, and
samples per second (of training, without evaluation). On a terminal, a
progress bar runs within each epoch. At the end, one line says after how
many seconds of training the test accuracy first reached 50, 55, 60, 65 and
70 %.

The run folder (--out, default runs/<timestamp>/) holds:
  config.json     every setting, the layer sizes, the backend, the data
                  source, the kernels' start-up time, how the run used the
                  cores (parallelism), the BLAS libraries with their thread
                  counts and OpenBLAS kernel type, and the numerics: the
                  precision and, for bf16, the CPU's bfloat16 instructions
                  and the library of the bf16 GEMM
  metrics.jsonl   one JSON object per epoch: epoch, train_loss, train_acc,
                  test_loss, test_acc, epoch_seconds, samples_per_second, lr,
                  train_seconds (the training time so far, the --pca fit
                  included), val_loss and val_acc with --val, and tta
                  ("flip") when the test and validation figures are
                  flip-averaged
  model.npz       the model after the last finished epoch, or with --val
                  after the first epoch with the best validation accuracy
                  (never chosen by test accuracy): the parameters, the
                  preprocessing statistics, the class names and the
                  configuration; what evaluate, predict and fastnet.load take
  checkpoint.npz  all of model.npz, and what resuming needs: the optimizer
                  state, the epoch and step, the random generator's state,
                  the current epoch's shuffle and running sums, and a
                  fingerprint of the training data; written after every
                  epoch, every --checkpoint-every steps, and when Ctrl-C or
                  SIGTERM stops the run
Every file is written to a temporary name, flushed to disk and renamed, so a
crash or kill -9 at any moment leaves the old version or the new one, never
half a file. model.npz and checkpoint.npz load with np.load(path,
allow_pickle=False): a checkpoint cannot run code.

Stopping and resuming. Ctrl-C (SIGINT) or SIGTERM stops training after the
current step, writes checkpoint.npz, prints how to continue, and exits with
status 130 or 143. A second Ctrl-C stops at once. --resume RUN_DIR continues
from the checkpoint with the run's own settings: the run settings above
cannot be given again; --data, --backend, --threads and --checkpoint-every
can. The resumed run ends with the same parameters and metrics, bit for bit,
as a run that never stopped, on the same backend (and, for the numpy
backend, the same --threads, since BLAS's threads split its sums). A resumed
run that changes either says so.

Divergence. A NaN or infinite loss (checked every step), evaluation loss or
parameter (checked before every checkpoint) stops the run with one line that
names the epoch and step and suggests a lower learning rate, and exit status
3. Nothing is written after it, so the last checkpoint is the last good
state.

Backends and threads. --backend numpy is the reference; numba is faster.
Both give the same results up to float32 rounding. The numba backend
compiles its kernels on first use and caches them on disk; the first line of
a run says how long they took to get ready, apart from training time.
--threads N: the numpy backend gives the N cores to BLAS; the numba backend
keeps BLAS on one thread and runs N threads of its own, fewer while other
processes keep cores busy. On the numba backend the same seed gives the same
bits on any number of threads; on numpy, for the same seed and --threads.

Principal components (--pca K). Before the first epoch, the covariance of
{PCA_SAMPLE:,} standardised training images (all of them when there are fewer),
drawn by the seed, gives the K directions in which the images vary most.
Every training image is projected onto them once, and the first layer has K
inputs instead of one per pixel. The fit and the projection count as
training time. --whiten divides each component by its standard deviation, so
that every input has unit variance; the faintest components, mostly noise,
are raised only part of the way. The scaling is part of the projection and
costs nothing per step. With --flip, the components are fitted to the images
and their mirror images, so that a flip only changes the signs of some
components. With --translate or --cutout, each batch is augmented as pixels
and then projected: one more product per step. model.npz keeps the
projection: evaluate, predict and fastnet.load take raw images, and find the
numbers that training printed. --pca 0 trains on the pixels.

Test-time flips (--tta flip). Every evaluation scores the mean of the logits
of each image and of its mirror image: for a network trained with --flip,
which has learnt to classify the two alike. It changes what the run reports,
never how it trains: each epoch's test and validation figures (the epoch
line says test+flip), tta in metrics.jsonl, and the best epoch with --val.
evaluate and predict use the run's --tta unless given one. Evaluation takes
twice as long; it is not part of the training seconds. --flip, --translate,
--cutout and --tta need images: samples of shape (H, W) or (H, W, C).

Mixed precision (--precision bf16). Every product reads bfloat16 operands
and sums in float32; the master weights, the optimizer state, the loss, layer
norm and the activations stay float32. Evaluation runs in float32 on the
master weights. It needs a CPU with AMX-BF16 or AVX512-BF16 and, on the numba
backend, MKL's bfloat16 GEMM (pip install 'fastnet[mkl]').

Data-parallel training (--distributed). Under mpirun -n N, every process
(rank) holds the whole model, trains on its share of each batch, and the
ranks sum their gradients every step, in a fixed order: the same N gives the
same bits on every rerun. Rank 0 writes the run folder and prints the log.
Each rank uses its share of its machine's cores unless --threads says
otherwise. A rank that dies, or sends nothing for --peer-timeout seconds,
stops the run with one line and exit status 3; the last checkpoint stays,
and --resume under mpirun continues it. It needs an MPI library and mpi4py
(pip install 'fastnet[mpi]'):
  mpirun -n 2 fastnet train --distributed --backend numba
  mpirun -n 2 fastnet train --distributed --resume runs/NAME

Errors. A bad flag or setting, missing or corrupt data, or a checkpoint that
does not fit the data is one line on stderr and exit status 2, and nothing
is written. Exit statuses: 0 done, 2 bad input, 3 divergence or a lost rank,
130 and 143 stopped by SIGINT and SIGTERM."""

EVALUATE_EPILOG = """\
Examples:
  fastnet evaluate runs/wide
  fastnet evaluate runs/wide/model.npz --data data/cifar-10-batches-py --json
  fastnet evaluate runs/wide --out runs/wide

Prints the test accuracy and loss, the accuracy of each class and the
confusion matrix (rows: the true class, columns: the predicted one) of the
model on the test split of --data. The model is evaluated as training
evaluated it, so the accuracy is the test_acc that metrics.jsonl records for
the epoch model.npz holds. --tta: the run's own test-time augmentation unless
given; the first line says when each image was averaged with its mirror
image. The data must have the inputs and classes the model was trained on:
else one line names the data it was trained on.

--json prints one JSON object: accuracy, loss, tta, images, source,
class_names, per_class_accuracy and confusion (confusion[true][predicted]).

--out DIR also writes DIR/report.json: the accuracy, the loss, the confusion
matrix, the class names, and for each class its precision, recall, F1 and
number of test images, with their macro averages. A class that is never
predicted has precision 0. fastnet plot RUN_DIR draws its confusion matrix
from RUN_DIR/report.json when that is not older than the model.

Exit statuses: 0 done, 2 bad input."""

PREDICT_EPILOG = f"""\
Examples:
  fastnet predict runs/wide photos/
  fastnet predict runs/wide/model.npz cat.png ship.jpg --top 1 --json
  fastnet predict runs/wide photos/ --csv predictions.csv --top 5

Reads image files with Pillow (PNG, JPEG, BMP, and anything else Pillow
opens). Each image is turned upright as its EXIF tag says, converted to the
model's channels (RGB for CIFAR-10, greyscale for one channel, transparent
pixels on white), and resized to the model's input size (stretched, not
cropped). The preprocessing saved with the model follows, as in train and
evaluate, so an image gets the same logits as in evaluate: flip-averaged
when the run was evaluated so, unless --tta says otherwise.

A folder stands for the image files anywhere under it, in the order of
their paths relative to it, sorted: the files whose names end in
  {' '.join(IMAGE_SUFFIXES)}
in any case, not starting with a dot. Other files are skipped and counted
in one warning line. Symbolic links to folders are followed, except one
whose target is inside a folder already read or holds one (a link to an
ancestor loops): it is named in one warning line and not followed, so each
image is classified once. A folder that cannot be listed is one line and
exit status 2. Each file gets one line:
  photos/cat.png: cat 61.2%, dog 20.4%, frog 6.0%
A file that cannot be read gets one error line on stderr; the others are
still classified, and the exit status is then 1. A missing model, or no
image files at all, is one line and exit status 2.

--json prints one object: {{"model", "top", "predictions": [{{"file", "top":
[{{"class", "index", "probability"}}]}} or {{"file", "error"}}]}}.

--csv FILE also writes one row per image, under a header row:
  path,class,probability,class_2,probability_2,...,error
up to --top K classes, or only path and error for a file that cannot be
read. FILE is written under a temporary name in its folder and renamed when
complete, so an interrupted run leaves no half-written FILE.

From Python, fastnet.load(path) returns the model with its preprocessing:
model.predict(images) gives class indices, model.predict_proba(images) the
probabilities, model.class_names the names; images in the model's input
shape, one or a batch, uint8 0-255 or floats in [0, 1].

Exit statuses: 0 done, 1 some images could not be read, 2 bad input."""

PLOT_EPILOG = """\
Example:
  fastnet plot runs/wide

Writes curves.png and confusion.png into the run folder. curves.png shows
the training, validation and test loss and accuracy of every epoch, from
metrics.jsonl, with the best test accuracy marked. confusion.png is the
confusion matrix on the test split, each row divided by its class's count,
labelled with the class names. It comes from evaluating the run's model.npz
on --data. Without --data, it comes from the run's report.json (written by
fastnet evaluate RUN_DIR --out RUN_DIR) when that is not older than the
model, and else from the data the run was trained on (config.json).

Plots need matplotlib: pip install 'fastnet[plot]'. From Python,
fastnet.report.plot_run(run_dir, data=None, backend=None) does the same and
returns the paths.

Exit statuses: 0 done, 2 bad input (no run folder, no finished epoch, no
matplotlib)."""

RUNS_EPILOG = """\
Prints a table of the runs in DIR, oldest first. A run is a folder with a
config.json, as fastnet train writes; DIR may be one itself.
  $ fastnet runs
  run   backend  model         epochs  best test  samples/s  date
  wide  numba    3072-1024-10   18/18     56.30%     12,200  2026-12-02 10:15
  long  numpy    3072-512-10     7/18     52.40%      8,700  2026-12-02 11:30
"epochs" is finished/planned; samples/s is the median over the epochs (the
first epoch of a JIT backend would skew a mean); the date is when the run
started. A run that is still going, was killed or is corrupt shows - where a
figure is unknown. --json prints the same as one object: {"dir", "runs"}.

Exit statuses: 0 done (also when DIR holds no run), 2 no such folder."""

BENCH_EPILOG = """\
Examples:
  fastnet bench
  fastnet bench --backend numba --workload R2 --repeats 5 --json

Times training steps on synthetic CIFAR-shaped data (uint8 images of 3,072
inputs, 10 classes) through the loop fastnet train runs, with SGD and
momentum. For each backend it prints samples/s (the median of --repeats
runs, and their min-max), ms/step, useful GFLOP/s, the percentage of this
machine's float32 sgemm peak (measured in the same command), the warm-up
time, which includes JIT compilation, and "others": the most cores other
processes kept busy during a run. It flags runs that other processes
disturbed: rerun those on an idle machine before comparing. A line per
backend says how it used the cores (for numba, with its plan: see fastnet
plan), and for numba in fp32 how much longer a step takes than its products
alone.

When PyTorch is importable, it times the same model in PyTorch and prints
each backend's speed against it (vs torch). Every side runs in a process of
its own, and the sides take turns (A B C A B C ...), so that a change in the
machine's load reaches every side alike. With --ranks N, each backend is also
timed data-parallel as the side BACKEND:TxN: N ranks under mpirun, T threads
each. --json prints one JSON object, for scripts.

Exit statuses: 0 done, 2 bad input (an unknown backend, bf16 on a CPU
without it)."""

PLAN_EPILOG = """\
The numba backend cuts every product into tiles of the output, and one BLAS
call sums each tile. Its plan says which BLAS the tiles call (NumPy's
OpenBLAS, or MKL when the mkl extra is installed) and how large the tiles
are. fastnet plan shows the plan in force and where it comes from: measured
on this machine, or the defaults (MKL on Intel CPUs where it is installed,
OpenBLAS elsewhere).

--measure times training steps of the workloads R1 and R2 on synthetic data
for every BLAS and several tile sizes, each in a process of its own, quiet
and beside a busy process, and keeps the fastest over both. The plan goes to
$FASTNET_PLAN_FILE, by default plan.json in fastnet's cache folder
($FASTNET_CACHE, else $XDG_CACHE_HOME/fastnet, else ~/.cache/fastnet), with
this machine's fingerprint: the CPU, its vector instructions, its cores, and
the NumPy, Numba and MKL versions. Every later run on this machine uses it; a
plan measured on another machine is ignored. For one command, FASTNET_BLAS and
FASTNET_PLAN override it (see fastnet --help). config.json records the plan
of each run and where it came from.

A plan changes speed, not results, except through the BLAS it names: each
element of a product is summed whole by one BLAS call, however finely the
product is cut.

Exit statuses: 0 done, 2 no Numba, or a bad FASTNET_BLAS or FASTNET_PLAN."""

SWEEP_EPILOG = """\
Examples:
  fastnet sweep --data data --trials 30 --epochs 18
  fastnet sweep --space my_space.toml --trials 50 --lr 0.05
  fastnet sweep --storage postgresql://fastnet:PASSWORD@db-host/sweeps \\
                --study wide-nets --trials 100

Searches fastnet train settings with Optuna (TPE, seeded) and runs the
trials on Dask workers: by default one worker process per core of this
machine, each trial on --threads-per-trial cores. It needs the sweep extra:
pip install 'fastnet[sweep]'.

Trials are chosen, and pruned (--pruner), on the validation accuracy of --val
held-out training images; the test set never takes part. The search space is
a TOML file with one table per setting: a range (low and high, optionally
log = true, and step for whole numbers) or a list of choices, written as the
command line writes them:
  [lr]
  low = 0.005
  high = 0.2
  log = true

  [activation]
  choices = ["relu", "gelu"]
The space is checked whole before anything runs: an unknown setting, one a
sweep fixes (--data, --epochs, --val, --seed ...), an empty range or a value
fastnet train would refuse is one line and exit status 2. The fastnet train
settings given as flags here are the same for every trial.

Output. A line per finished trial: trials done, pruned, failed and running,
and the best validation accuracy so far with its settings. At the end, a
table of the trials and, for the best, the fastnet train command that
repeats it bit for bit. The sweep folder (--out, default
sweeps/<timestamp>/) holds trials.csv, sweep.json, the study's database
study.db (unless --storage), and trials/trial-NNNN/, each trial's run
folder, which fastnet runs and fastnet plot read.

The study. Run the same command again and it continues the same study, up
to --trials finished trials in all. Several fastnet sweep processes, on any
machines, given the same --storage (a PostgreSQL URL) and --study share its
trials and stop together. A password in the URL is shown as *** in every
line and file fastnet writes.

A cluster of your own. --scheduler sends the trials to a running Dask
scheduler instead of starting workers here. Start one worker process per
core, each with one thread (dask worker tcp://HOST:8786 --nworkers 2
--nthreads 1); every worker reads the images from --data, so that path must
be the same on every machine. A tcp:// scheduler runs whatever code anyone
who reaches its port sends it: keep it on a network you trust, or use
tls:// with certificates of one certificate authority (--tls-ca-file,
--tls-cert, --tls-key).

When things go wrong. A worker that dies mid-trial fails its trial, and its
settings are tried again. Ctrl-C marks the running trials failed, writes the
results so far and exits with status 130; the same command continues the
study. A scheduler or database that cannot be reached is one line and exit
status 2, before anything runs. A database lost mid-sweep stops the sweep
with exit status 3: what it recorded is kept, and the same command continues
once it is back. trials.csv says why each failed trial ended."""

DATA_EPILOG = """\
Run 'fastnet data download --help' for the reference of the one action."""

DOWNLOAD_EPILOG = f"""\
Downloads the official CIFAR-10 archive (170 MB) into DIR, with a progress
bar, and checks its md5 before the file gets its final name:
  {CIFAR10_URL}
  md5 {CIFAR10_MD5}
A partial download (DIR/cifar-10-python.tar.gz.part) resumes where it
stopped, and an intact copy already there is kept. fastnet train finds the
archive in data/ or $FASTNET_DATA without --data, and reads it in place,
never unpacked.

Offline. On a machine with a network, download the archive and check that
md5sum prints the md5 above. Copy it into data/ of the folder you run
fastnet from, or anywhere else and pass its path with --data (or set
FASTNET_DATA). Without a network, fastnet data download fails with one line
that says where to put the file.

Exit statuses: 0 done, 2 no network, a corrupt download or an unwritable
folder."""


def build_parser():
    defaults = TrainConfig()
    parser = Parser(prog="fastnet", description="Train dense neural networks on images, fast, on the CPU.",
                    epilog=FASTNET_EPILOG)
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

    t = command(commands, "train", "train a network and evaluate it after every epoch", TRAIN_EPILOG)
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
                EVALUATE_EPILOG)
    e.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    add_data_and_backend(e)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--tta", metavar="flip|none", help="test-time augmentation (default: the one the run "
                   "was evaluated with)")
    e.add_argument("--out", metavar="DIR", help="also write DIR/report.json: accuracy, per-class precision, "
                   "recall and F1, confusion matrix")

    b = command(commands, "bench", "time training steps on synthetic data, per backend and against PyTorch",
                BENCH_EPILOG)
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
                 "the BLAS its tiles call and how finely products are cut", PLAN_EPILOG)
    pn.add_argument("--measure", action="store_true", help="time every BLAS and tile size here, quiet and beside a "
                    "busy process (a few minutes), and keep the fastest for every later run")
    pn.add_argument("--json", action="store_true", help="print the plan as JSON")

    sw = command(commands, "sweep", "search fastnet train settings with Optuna, trials on Dask workers",
                 SWEEP_EPILOG)
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

    p = command(commands, "predict", "classify image files (PNG, JPEG, BMP) with a trained model", PREDICT_EPILOG)
    p.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder of fastnet train, or a model.npz it wrote")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders to search for them")
    p.add_argument("--top", type=positive_int, default=3, metavar="K",
                   help="how many classes to show per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--csv", metavar="FILE", help="also write one CSV row per image: path, class, probability, "
                   "then class_2, probability_2, ... up to --top K, and error")
    p.add_argument("--tta", metavar="flip|none", help="test-time augmentation (default: the one the run "
                   "was evaluated with)")
    p.add_argument("--backend", help=f"kernel backend: {', '.join(backends.available())} "
                   "(default: $FASTNET_BACKEND or numpy)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="cores to use (default: all): the numba backend's threads, or numpy's BLAS threads")

    pl = command(commands, "plot", "draw a run's learning curves and confusion matrix as PNG files", PLOT_EPILOG)
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by fastnet train")
    add_data_and_backend(pl)

    r = command(commands, "runs", "list past runs: model, epochs, best test accuracy, speed", RUNS_EPILOG)
    r.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                   help="the folder that holds the runs (default: %(default)s)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    d = command(commands, "data", "manage datasets", DATA_EPILOG)
    data_commands = d.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    dl = command(data_commands, "download", "download the official CIFAR-10 archive", DOWNLOAD_EPILOG)
    dl.add_argument("--to", metavar="DIR", help="folder to put it in (default: $FASTNET_DATA or data/)")
    return parser


def blas_threads(args, backend=None):
    """Run the command on --threads cores: the backend's own way of using them (see
    backends.use_threads), or its default when --threads is not given."""
    return backends.use_threads(backend or args.backend, args.threads)


def train_config(args):
    """The TrainConfig that `fastnet train` with these parsed arguments runs."""
    # --data, --backend and --checkpoint-every are None when not typed; a run setting is there only when
    # typed, and then None is what the user asked for (--norm none), even over a recipe's value.
    given = {k: v for k, v in vars(args).items()
             if k in TrainConfig.__dataclass_fields__ and (v is not None or k not in RESUMABLE_CHANGES)}
    if args.resume:
        changed = sorted(set(given) - RESUMABLE_CHANGES)
        if changed:
            raise UsageError(f"--resume continues a run with the settings it started with: drop "
                             f"{', '.join('--' + name.replace('_', '-') for name in changed)}")
        return resumed_config(args.resume, **given)
    return recipe_config(**given)


def run_train(args):
    config = train_config(args)
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
        files, warnings = predict.image_files(args.images)
        for warning in warnings:
            print(f"fastnet: warning: {warning}", file=sys.stderr)
        table = predict.CsvWriter(args.csv, args.top, model.num_classes) if args.csv else None
        results, failed = [], 0
        try:
            for path, top, error in predict.predict_files(model, files, args.top):
                if table is not None:
                    table.write(path, top, error)
                if error is not None:
                    failed += 1
                    print(f"fastnet: error: {error}", file=sys.stderr)
                    results.append({"file": path, "error": str(error)})
                elif args.json:
                    results.append({"file": path, "top": [{"class": name, "index": index, "probability": p}
                                                          for index, name, p in top]})
                else:
                    print(f"{path}: " + ", ".join(f"{name} {predict.percent(p)}" for _, name, p in top),
                          flush=True)
        except BaseException:
            if table is not None:
                table.abort()  # an interrupted run leaves no half-written CSV
            raise
        if table is not None:
            table.close()
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
