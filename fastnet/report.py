"""What a run leaves behind, made readable: the classification report of `fastnet evaluate --out`,
the plots of `fastnet plot`, and the table of `fastnet runs`.

Every file here is written under a temporary name in its own folder and then renamed, so a reader
(or a second `fastnet plot` on the same run) never sees half a file. matplotlib is imported only when
a plot is drawn: it is an optional extra, and slow to import.
"""

import json
import math
import os
import statistics
from datetime import datetime

import numpy as np

from fastnet import checkpoint, data, storage
from fastnet.errors import CheckpointError, FastnetError
from fastnet.evaluation import evaluation_inputs, normalizer, saved_tta
from fastnet.run_folder import best_epoch

MISSING = "-"


# --- Files ------------------------------------------------------------------------------------------

def write_json(path, value):
    storage.write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def read_json(path):
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(path):
    """The epochs in a metrics.jsonl, skipping lines that are not JSON objects: the last line of a
    run that is still going (or was killed) may be half written."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    epochs = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            epochs.append(record)
    return epochs


def kept_epoch(epochs):
    """(the index in `epochs` of the epoch whose model the run keeps in model.npz, whether validation
    chose it), by run_folder.best_epoch's rule: the best validation accuracy, else the last epoch. Never
    the best test accuracy, which would be a choice made on the test set. Records without a number
    for val_acc (hand-written or damaged ones) do not compete."""
    validated = [{"val_acc": _number(r.get("val_acc"))} if _number(r.get("val_acc")) is not None else {}
                 for r in epochs]
    return best_epoch(validated) - 1, any(validated)


def _number(value):
    """A finite float, or None: metrics written by hand or by older versions may hold anything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --- Classification report --------------------------------------------------------------------------

def classification_report(confusion, class_names):
    """Accuracy and per-class precision, recall and F1 from counts[true, predicted].

    A class that is never predicted has precision 0, and one with no test images has recall 0 (the
    convention scikit-learn follows), so every figure is a number and the report stays valid JSON.
    """
    confusion = np.asarray(confusion, np.int64)
    hits = confusion.diagonal().astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    total = int(confusion.sum())
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "images": total,
        "class_names": list(class_names),
        "per_class": [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
                       "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)],
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "confusion": confusion.tolist(),
    }


def write_classification_report(folder, evaluation, model=None):
    """Write folder/report.json from what `fastnet evaluate` computed; returns its path."""
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "report.json")
        report = classification_report(evaluation["confusion"], evaluation["class_names"])
        report |= {"accuracy": evaluation["accuracy"], "loss": _number(evaluation.get("loss")),
                   "model": None if model is None else os.fspath(model), "source": evaluation.get("source")}
        write_json(path, report)
    except OSError as exc:
        raise storage.refused(folder, exc) or FastnetError(
            f"cannot write report.json to {folder} ({exc.strerror or exc}): pass a writable folder with --out") from exc
    return path


def dataset_of_run(config, data_path=None):
    """The data at `data_path` as the run with this config.json read it: an image tree with the run's
    --image-size and, when it has no test/, the same --test-fraction split drawn again from --seed."""
    kind, found = data.find_dataset(data.default_data_path() if data_path is None else data_path)
    if kind != "images":
        return data.load_dataset(found)
    fraction = 0.0 if (found / "test").is_dir() else config.get("test_fraction", 0.0)
    return data.load_dataset(found, fraction, config.get("seed", 0), config.get("image_size"))


def evaluate_saved_model(model_path, data_path=None, backend=None, tta="run"):
    """(the loaded checkpoint, the dataset, its Evaluation on the test split) for a saved model, with
    the test-time augmentation `tta` (one of evaluation.TTA; "run": the one its run was evaluated with)."""
    saved = checkpoint.load(model_path, backend=backend)
    dataset = dataset_of_run(saved.config, data_path)
    if dataset.input_size != saved.net.sizes[0] or dataset.num_classes != saved.net.sizes[-1]:
        trained_on = saved.config.get("data_source") or saved.config.get("data") or "another dataset"
        raise CheckpointError(
            f"{checkpoint.model_file(model_path)} was trained on {trained_on} ({saved.net.sizes[0]} inputs, "
            f"{saved.net.sizes[-1]} classes), but {dataset.source} has {dataset.input_size} inputs and "
            f"{dataset.num_classes} classes: pass that data with --data")
    shift, scale = normalizer(saved.mean, saved.std, dataset.input_size, dataset.test_images.dtype,
                              saved.net.dtype)
    inputs = evaluation_inputs(dataset.test_images, dataset.sample_shape, shift, scale, saved.projection,
                               saved.net.kernels, saved_tta(saved.config, tta))
    # As training evaluated it: a --pca network on the components, not the one that folds them in.
    return saved, dataset, inputs.evaluate(saved.trained_net, dataset.test_labels)


def confusion_on_test_split(model_path, data_path=None, backend=None):
    """(counts[true, predicted], class names) of a saved model on the test split of `data_path`."""
    saved, dataset, result = evaluate_saved_model(model_path, data_path, backend)
    return result.confusion(dataset.test_labels, dataset.num_classes), list(saved.class_names)


# --- Plots ------------------------------------------------------------------------------------------

def _figure(width, height):
    """A matplotlib Figure that draws with Agg and touches no global state: no pyplot, no
    matplotlib.use(), so a caller's own interactive backend is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise FastnetError("matplotlib is not installed, and plots need it: pip install 'fastnet[plot]' "
                           "(or pip install matplotlib)") from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(figure, path):
    storage.write_atomically(path, lambda f: figure.savefig(f, format="png", facecolor="white"))


def plot_curves(epochs, path, title=""):
    """Loss and accuracy per epoch, train against test (and validation when there is one), as a PNG."""
    _save_png(curves_figure(epochs, title), path)


def curves_figure(epochs, title=""):
    """plot_curves's figure: its axes are the loss's and the accuracy's, the kept model starred."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = _figure(11, 4.2)
    loss_axes, acc_axes = figure.subplots(1, 2)
    x = [record.get("epoch", i + 1) for i, record in enumerate(epochs)]
    series = (("train", "tab:blue", "-"), ("val", "tab:green", "--"), ("test", "tab:orange", "-"))
    for split, colour, style in series:
        for axes, metric, factor in ((loss_axes, "loss", 1.0), (acc_axes, "acc", 100.0)):
            # Only the epochs that were evaluated: with --eval-every a gap between them is not a break in
            # the curve, and a NaN there would leave each point unjoined.
            points = [(e, v * factor) for e, record in zip(x, epochs, strict=True)
                      if (v := _number(record.get(f"{split}_{metric}"))) is not None]
            if not points:
                continue
            # Markers, so that a run with a single epoch still shows its points.
            axes.plot(*zip(*points, strict=True), style, color=colour, marker="o", markersize=3.5, linewidth=1.8,
                      label=split)

    kept, by_validation = kept_epoch(epochs)
    kept_test = _number(epochs[kept].get("test_acc"))
    if kept_test is not None:
        chosen = "best validation" if by_validation else "last epoch"
        acc_axes.plot([x[kept]], [kept_test * 100], marker="*", markersize=14, color="tab:red", linestyle="none",
                      label=f"kept model: test {kept_test:.2%} (epoch {x[kept]}, {chosen})", zorder=3)

    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    acc_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    acc_axes.yaxis.set_major_formatter(PercentFormatter())
    for axes in (loss_axes, acc_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(x)) == 1:  # one epoch: matplotlib would zoom into fractions of it
            axes.set_xlim(x[0] - 1, x[0] + 1)
        axes.grid(True, alpha=0.3)
    # One legend for both plots, below them, where no curve can run under it: the loss plot's series
    # are the accuracy plot's, which adds the kept model's star.
    if acc_axes.lines:
        figure.legend(handles=acc_axes.lines, loc="outside lower center", ncols=len(acc_axes.lines), frameon=False)
    if title:
        figure.suptitle(title)
    return figure


def plot_confusion(confusion, class_names, path, title="Confusion matrix"):
    """The confusion matrix with each row divided by its true class's count, so every row reads as
    where that class's images went, whatever the class sizes; the numbers are percentages."""
    from matplotlib.ticker import PercentFormatter

    confusion = np.asarray(confusion, np.float64)
    k = len(class_names)
    support = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)

    side = min(max(4.5, 0.5 * k + 2.5), 14)
    figure = _figure(side + 1.2, side)
    axes = figure.subplots()
    # With many classes every share is small and a 0-100 % scale would look blank, so the colours
    # then span 0 to the largest share; the colour bar says which.
    top = 1.0 if k <= 20 else max(float(share.max()), 1e-9)
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=top, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("share of the true class")
    colorbar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))

    # Names and numbers only while they fit; a few hundred classes still give a readable picture.
    if k <= 40:
        axes.set_xticks(range(k), class_names, rotation=45, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(k), class_names)
    if k <= 20:
        for true in range(k):
            for guess in range(k):
                value = share[true, guess]
                axes.text(guess, true, f"{value * 100:.0f}", ha="center", va="center", fontsize=9,
                          color="white" if value > 0.55 else ("black" if value > 0 else "0.7"))
    axes.set(xlabel="predicted class", ylabel="true class", title=title)
    _save_png(figure, path)


def plot_run(run_dir, data=None, backend=None):
    """Write curves.png and confusion.png into a run folder; returns the paths written.

    The curves come from metrics.jsonl. The confusion matrix comes from evaluating the run's
    model.npz on the test split of `data`. Without `data` it comes from the run's report.json (what
    `fastnet evaluate --out RUN_DIR` writes) when that is at least as new as the model, and else from
    evaluating on the data the run was trained on (config.json's "data", None meaning the default).
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FastnetError(f"run folder {run_dir} does not exist: pass a folder that fastnet train wrote")
    config = read_json(os.path.join(run_dir, "config.json")) or {}
    epochs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not epochs:
        raise FastnetError(f"{run_dir} has no finished epoch in metrics.jsonl: plot a run that has "
                           "completed at least one epoch")
    name = os.path.basename(os.path.abspath(run_dir))
    description = _describe_run(config)
    written = []

    curves = os.path.join(run_dir, "curves.png")
    plot_curves(epochs, curves, title=f"{name}: {description}" if description else name)
    written.append(curves)

    model = os.path.join(run_dir, "model.npz")
    report_path = os.path.join(run_dir, "report.json")
    saved = read_json(report_path) if data is None and _not_older(report_path, model) else None
    if saved and "confusion" in saved and "class_names" in saved:
        confusion, class_names = np.array(saved["confusion"]), saved["class_names"]
    else:
        if not os.path.isfile(model):
            raise FastnetError(f"{run_dir} has no model.npz, so no confusion matrix: wrote {curves} only")
        data = data if data is not None else config.get("data")
        confusion, class_names = confusion_on_test_split(model, data, backend)
    accuracy = np.trace(confusion) / max(int(np.sum(confusion)), 1)
    matrix = os.path.join(run_dir, "confusion.png")
    plot_confusion(confusion, class_names, matrix,
                   title=f"{name}: test accuracy {accuracy:.2%} on {int(np.sum(confusion))} images")
    written.append(matrix)
    return written


def _not_older(path, reference):
    try:
        return os.path.getmtime(path) >= os.path.getmtime(reference)
    except OSError:
        return os.path.isfile(path)


def _describe_run(config):
    sizes = config.get("sizes")
    parts = []
    if isinstance(sizes, list) and sizes:
        described = "-".join(map(str, sizes)) + " MLP"
        components = _components(config)
        if components:
            whitened = "whitened " if config.get("whiten") else ""
            described += f" on {components} {whitened}principal components"
        parts.append(described)
    for key, label in (("backend", "{} backend"), ("optimizer", "{}"), ("lr", "lr {}"), ("batch_size", "batch {}")):
        if config.get(key) is not None:
            parts.append(label.format(config[key]))
    return ", ".join(parts)


# --- The table of runs ------------------------------------------------------------------------------

def run_summary(run_dir):
    """One row of `fastnet runs`: what config.json and metrics.jsonl say, None where they say
    nothing (a run that is still going, was killed or is corrupt)."""
    config = read_json(os.path.join(run_dir, "config.json")) or {}
    epochs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    done = [e for e in (_number(r.get("epoch")) for r in epochs) if e is not None]
    kept = kept_epoch(epochs)[0] if epochs else None  # model.npz's epoch, counted from 0
    speeds = [s for s in (_number(r.get("samples_per_second")) for r in epochs) if s is not None]
    planned = config.get("epochs")
    return {
        "name": os.path.basename(os.path.abspath(run_dir)),
        "path": run_dir,
        "backend": config.get("backend") if isinstance(config.get("backend"), str) else None,
        "model": _model_name(config),
        "epochs_done": int(max(done)) if done else (len(epochs) or (0 if config else None)),
        "epochs_planned": planned if isinstance(planned, int) and not isinstance(planned, bool) else None,
        # The test accuracy of the model the run keeps (kept_epoch), not the best over its epochs.
        "test_acc": None if kept is None else _number(epochs[kept].get("test_acc")),
        "kept_epoch": None if kept is None else kept + 1,
        # The median, because the first epoch of a JIT backend or a busy machine skews a mean.
        "samples_per_second": statistics.median(speeds) if speeds else None,
        "date": _run_date(run_dir, config),
    }


def _model_name(config):
    """The layer sizes, the first marked "pca" when the run trained on principal components (--pca):
    128 inputs are then 128 components, not 128 pixels."""
    sizes = config.get("sizes")
    if not (isinstance(sizes, list) and sizes):
        return None
    name = "-".join(map(str, sizes))
    return f"pca{name}" if _components(config) else name


def _components(config):
    """The number of principal components a run trained on (--pca), or None."""
    pca = config.get("pca")
    return pca if isinstance(pca, int) and not isinstance(pca, bool) and pca > 0 else None


def _run_date(run_dir, config):
    """When the run started: config.json's "started", else (runs from before it was recorded) when
    config.json was written."""
    try:
        return datetime.fromisoformat(config["started"]).strftime("%Y-%m-%d %H:%M")
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return datetime.fromtimestamp(os.path.getmtime(os.path.join(run_dir, "config.json"))).strftime("%Y-%m-%d %H:%M")
    except OSError:
        return None


def list_runs(folder):
    """Summaries of the runs in `folder`, oldest first: each subfolder with a config.json, or the
    folder itself when it is a run."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FastnetError(f"runs folder {folder} does not exist: train first (fastnet train), or pass "
                           "the folder that holds your runs")
    if os.path.isfile(os.path.join(folder, "config.json")):
        candidates = [folder]
    else:
        try:
            candidates = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        except OSError as exc:
            raise FastnetError(f"cannot list {folder} ({exc.strerror}): check its permissions") from exc
        candidates = [c for c in candidates if os.path.isfile(os.path.join(c, "config.json"))]
    rows = [run_summary(c) for c in candidates]
    return sorted(rows, key=lambda row: (row["date"] or "", row["name"]))


def format_runs(rows):
    """The runs as an aligned text table, '-' where a figure is unknown."""
    def show(value, text):
        return MISSING if value is None else text(value)

    def epochs(row):
        if row["epochs_done"] is None and row["epochs_planned"] is None:
            return MISSING
        return f"{show(row['epochs_done'], str)}/{show(row['epochs_planned'], str)}"

    header = ("run", "backend", "model", "epochs", "kept test", "samples/s", "date")
    right = {"epochs", "kept test", "samples/s"}
    table = [header] + [(
        row["name"], show(row["backend"], str), show(row["model"], str), epochs(row),
        show(row["test_acc"], lambda a: f"{a:.2%}"),
        show(row["samples_per_second"], lambda s: f"{s:,.0f}"),
        show(row["date"], str)) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if title in right else cell.ljust(w)
                               for cell, w, title in zip(line, widths, header, strict=True)).rstrip()
                     for line in table)
