"""The reference of each command: the epilog its --help prints, as written, below the flags.

Lines are at most 79 characters, so that a terminal of 80 columns shows them as they are.
docs/cli.md is generated from the parsers by tools/cli_reference.py, so the help and the
documentation cannot disagree. Figures that live elsewhere (the recipes, the image suffixes, the
archive's md5) are read from where they live, so the help cannot go stale."""

import textwrap

from fastnet.config import RECIPES
from fastnet.data.components import PCA_SAMPLE
from fastnet.data.downloading import CIFAR10_MD5, CIFAR10_URL
from fastnet.predict import IMAGE_SUFFIXES


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
       a sweep's database went away; the storage refused to write a file (a
       full disk, a quota, an I/O error): the files keep their last whole
       versions, and the same command continues (with --resume RUN_DIR, for
       a run that has a checkpoint)
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
  FASTNET_BF16_GEMM    mkl or onednn: the bfloat16 GEMM of the numba backend's
                       --precision bf16, over its plan
  FASTNET_PLAN         tile_flops=N,tile_multiple=N,pass_elements=N,
                       bf16_tile_flops=N: the numba backend's plan for one
                       command
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
when --warmup is above 0. --val N holds out N training images, each class in
proportion to its size, drawn by the seed, and reports validation loss and
accuracy too.

Recipes. --recipe NAME starts from these settings; any flag given with it
overrides that setting (and --pca 0 turns off the recipe's --whiten too):
{recipes_text()}

Output. After every epoch, one line: the epoch, training loss and accuracy,
validation and test loss and accuracy, the epoch's training time, and
samples per second (of training, without evaluation). On a terminal, a
progress bar runs within each epoch. A run whose training loss rises to more
than twice its lowest (in means over 3,200 images) is blowing up: after that
epoch one warning line names --lr and --batch-size and the lower --lr to
try, and the run goes on (docs/recipes.md, 'When the loss blows up', says
where the default schedule is safe). At the end, one line says after how
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
                  included), val_loss and val_acc with --val, tta ("flip"
                  or "flip+shift") when the test and validation figures
                  are averaged over views of each image, and ema (the
                  decay) when they are the weight average's
  model.npz       the model (with --ema, the weight average) after the
                  last finished epoch, or with --val after the first epoch
                  with the best validation accuracy (never chosen by test
                  accuracy): the parameters, the
                  preprocessing statistics, the class names, the
                  configuration and the version of fastnet that wrote it;
                  what evaluate, predict and fastnet.load take
  checkpoint.npz  all of model.npz, and what resuming needs: the optimizer
                  state (with --ema, the trained parameters in place of
                  the average, and the average too), the epoch and step,
                  the random generator's state, the current epoch's
                  shuffle and running sums, and a
                  fingerprint of the training data; written after every
                  epoch, every --checkpoint-every steps, and when Ctrl-C or
                  SIGTERM stops the run
  .lock           the process id of the fastnet train writing the folder,
                  which holds an flock on it: another fastnet train --out or
                  --resume of the folder stops with one line meanwhile
                  (evaluate, predict and runs only read, and go ahead); the
                  kernel lets go when the run ends or dies, kill -9
                  included; on a filesystem without flock, nothing guards
Every file but .lock is written to a temporary name, flushed to disk and
renamed, so a crash or kill -9 at any moment leaves the old version or the
new one, never half a file. model.npz and checkpoint.npz load with
np.load(path, allow_pickle=False): a checkpoint cannot run code. A file in
another fastnet's format, or edited since it was written (an array removed
or of another shape, a setting no run can use), is refused with one line
that names the version of fastnet that wrote it.

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

A full disk. A file the storage refuses to write (a full disk, a quota, an
I/O error, a filesystem gone read-only) stops the run with one line that
names the file, the system's reason and the filesystem's mount point, and
exit status 3. No file is left half-written, and checkpoint.npz is written
after the epoch's other files, so the last checkpoint stays whole and
nothing is behind it: once the storage is fixed, --resume RUN_DIR, as the
line says, continues to the same bits as a run that never stopped. Before
the first checkpoint, the line says to run the same command again. If only
the plots of --plot fail, the run is whole: fastnet plot RUN_DIR draws them.
A decoded image tree that cannot be cached is one warning: the run goes on.

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
numbers that training printed. --pca 0 trains on the pixels. K components
need K inputs per image and K training images (those left after --val).

Test-time flips and shifts (--tta flip, --tta flip+shift). Every evaluation
scores the mean of the logits of each image and of its mirror image: for a
network trained with --flip, which has learnt to classify the two alike.
flip+shift averages 10 views: those two, each as it is and shifted one pixel
up, down, left and right (padded with the mean pixel, as --translate pads),
for a network trained with --flip and --translate. It changes what the run
reports, never how it trains: each epoch's test and validation figures (the
epoch line says test+flip or test+flip+shift), tta in metrics.jsonl, and the
best epoch with --val. evaluate and predict use the run's --tta unless given
one. Evaluation takes 2 or 10 times as long (a --pca run projects each view
once, before the first epoch); it is not part of the training seconds, but
it is of the command's wall time. --flip, --translate, --cutout and --tta
need images: samples of shape (H, W) or (H, W, C). --translate must be less
than the images' shorter side (a shift as long can leave nothing in view),
and --cutout at most that side.

Weight averaging (--ema DECAY). After every step t, each parameter's
moving average becomes d * average + (1 - d) * parameter, with
d = min(DECAY, (1 + t) / (10 + t)): the warm-up keeps the initial weights
from weighing on it early on. Every evaluation (test, validation, --tta, the
best epoch with --val) is of the average, the epoch line says test(ema), and
model.npz holds it. A DECAY such as 0.9998 is in (0, 1).

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
is written. Exit statuses: 0 done, 2 bad input, 3 divergence, a lost rank or a
write the storage refused, 130 and 143 stopped by SIGINT and SIGTERM."""

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
image (and their shifts). The data must have the inputs and classes the
model was trained on: else one line names the data it was trained on.

--json prints one JSON object: accuracy, loss, tta, images, source,
class_names, per_class_accuracy and confusion (confusion[true][predicted]).

--out DIR also writes DIR/report.json: the accuracy, the loss, the confusion
matrix, the class names, and for each class its precision, recall, F1 and
number of test images, with their macro averages. A class that is never
predicted has precision 0. fastnet plot RUN_DIR draws its confusion matrix
from RUN_DIR/report.json when that is not older than the model. A
report.json that the storage refuses to write (a full disk, an I/O error)
is one line and exit status 3, and leaves no file.

Exit statuses: 0 done, 2 bad input, 3 the storage refused a write."""

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
evaluate, so an image gets the same logits as in evaluate: averaged over its
mirror image (and their shifts) when the run was evaluated so, unless --tta
says otherwise.

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
still classified, and the exit status is then 1. So does a file that is not
regular (a named pipe or a device, through a link too), a link that loops
or leads nowhere, a file over 1 GiB, and an image whose header declares more
than 64 megapixels (8000 x 8000): each is refused before its pixels are
read. A missing model, or no image files at all, is one line and exit
status 2.

--json prints one object: {{"model", "top", "predictions": [{{"file", "top":
[{{"class", "index", "probability"}}]}} or {{"file", "error"}}]}}.

--csv FILE also writes one row per image, under a header row:
  path,class,probability,class_2,probability_2,...,error
up to --top K classes, or only path and error for a file that cannot be
read. FILE is written under a temporary name in its folder and renamed when
complete, so an interrupted run leaves no half-written FILE; a FILE that the
storage refuses to write (a full disk, an I/O error) is one line and exit
status 3.

From Python, fastnet.load(path) returns the model with its preprocessing:
model.predict(images) gives class indices, model.predict_proba(images) the
probabilities, model.class_names the names; images in the model's input
shape, one or a batch, uint8 0-255 or floats in [0, 1].

Exit statuses: 0 done, 1 some images could not be read, 2 bad input, 3 the
storage refused to write --csv FILE."""

EXPORT_EPILOG = """\
Examples:
  fastnet export runs/wide
  fastnet export runs/wide/model.npz --to wide.onnx --top-class --tta none

Writes the model as one ONNX graph (opset 17) that does all that fastnet
predict does after reading a file: it takes a batch of uint8 images, shape
(N, H, W, C) as the model was trained on (any N), casts and standardises
them with the training statistics, projects them onto the principal
components of a --pca run (whitened or not), runs the network (every
activation and layer norm) and ends in the class probabilities: output
"probabilities", float32 (N, classes). --top-class adds "top_class", int64
(N,), the most likely class. A run evaluated with --tta flip keeps it in the
graph (each image's logits averaged with its mirror image's), and one with
--tta flip+shift its 10 views (Pad and Slice), unless --tta none; --tta flip
or flip+shift adds it to any model of images. The model's metadata_props
hold the class names (JSON), the fastnet version and the run's settings.

FILE is written under a temporary name in its folder and renamed when
complete, so a failed export leaves no half-written file. Needs the onnx
package: pip install 'fastnet[onnx]' (with onnxruntime, to run the graph).
A missing model, a FILE in a folder that cannot be written, or onnx not
installed is one line and exit status 2; a write the storage refuses (a full
disk, an I/O error) is one line and exit status 3. docs/onnx.md shows the
graph run by ONNX Runtime.

Exit statuses: 0 done, 2 bad input, 3 the storage refused a write."""

PLOT_EPILOG = """\
Example:
  fastnet plot runs/wide

Writes curves.png and confusion.png into the run folder. curves.png shows
the training, validation and test loss and accuracy of every epoch, from
metrics.jsonl, with a star on the epoch whose model the run kept (model.npz):
its best validation epoch with --val, else its last. confusion.png is the
confusion matrix on the test split, each row divided by its class's count,
labelled with the class names. It comes from evaluating the run's model.npz
on --data. Without --data, it comes from the run's report.json (written by
fastnet evaluate RUN_DIR --out RUN_DIR) when that is not older than the
model, and else from the data the run was trained on (config.json).

Plots need matplotlib: pip install 'fastnet[plot]'. From Python,
fastnet.report.plot_run(run_dir, data=None, backend=None) does the same and
returns the paths.

Exit statuses: 0 done, 2 bad input (no run folder, no finished epoch, no
matplotlib), 3 the storage refused to write a plot."""

RUNS_EPILOG = """\
Prints a table of the runs in DIR, oldest first. A run is a folder with a
config.json, as fastnet train writes; DIR may be one itself.
  $ fastnet runs
  run   backend  model         epochs  kept test  samples/s  date
  wide  numba    3072-1024-10   18/18     56.30%     12,200  2026-12-02 10:15
  long  numpy    3072-512-10     7/18     52.40%      8,700  2026-12-02 11:30
"model" is the layer sizes, pca128-... for a network trained on 128
principal components (--pca 128); "epochs" is finished/planned; "kept test"
is the test accuracy of the model the run keeps in model.npz (its best
validation epoch with --val, else its last), not the best of its epochs'
test accuracies, which would pick a model by the test set; samples/s is the
median over the epochs (the first epoch of a JIT backend would skew a mean);
the date is when the run started. A run that is still going, was killed or
is corrupt shows - where a figure is unknown. --json prints the same as one
object: {"dir", "runs"}.

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
OpenBLAS, or MKL when the mkl extra is installed), which library multiplies
bfloat16 (MKL's or oneDNN's GEMM) and how large the tiles are. fastnet plan
shows the plan in force and where it comes from: measured on this machine,
or the defaults (MKL on Intel CPUs where it is installed, OpenBLAS
elsewhere; for bfloat16, MKL on Intel CPUs and oneDNN elsewhere).

--measure times training steps of the workloads R1 and R2 on synthetic data
for every BLAS and several tile sizes, each in a process of its own, quiet
and beside a busy process, and keeps the fastest over both. Where the CPU
has bfloat16 instructions, it then times bf16 steps for every bf16 GEMM
installed, and keeps the fastest and how its steps compared with float32's:
fastnet train refuses --precision bf16 where they were slower. The plan goes to
$FASTNET_PLAN_FILE, by default plan.json in fastnet's cache folder
($FASTNET_CACHE, else $XDG_CACHE_HOME/fastnet, else ~/.cache/fastnet), with
this machine's fingerprint: the CPU, its vector instructions, its cores, and
the NumPy, Numba, MKL and oneDNN versions. Every later run on this machine
uses it; a plan whose fingerprint differs (another machine's, or this one's
before an upgrade) is ignored, and fastnet plan names what changed. For one
command, FASTNET_BLAS, FASTNET_BF16_GEMM and FASTNET_PLAN override it (see
fastnet --help).
config.json records the plan of each run and where it came from.

A plan changes speed, not results, except through the BLAS it names: each
element of a product is summed whole by one BLAS call, however finely the
product is cut.

Exit statuses: 0 done, 2 no Numba, or a bad FASTNET_BLAS, FASTNET_BF16_GEMM or
FASTNET_PLAN."""

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
once it is back. A file the storage refuses to write (a full disk, an I/O
error), a trial's or the results, stops the sweep with one line and exit
status 3: the study keeps every trial, the settings of a trial that could
not write are tried again, and the same command continues once the storage
is fixed. trials.csv says why each failed trial ended."""

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
folder, 3 the storage refused a write (a full disk): the same command then
resumes the partial download."""
