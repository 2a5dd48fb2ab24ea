"""`fastnet evaluate --out` (report.json), `fastnet plot` (curves.png, confusion.png) and
`fastnet runs` (the table of past runs), through the real command."""

import json
import os
import statistics

import numpy as np
import pytest
from PIL import Image

from fastnet import report
from helpers import assert_one_line_error, fastnet

NAMES = ["dark", "mid", "bright"]


@pytest.fixture
def tiny_run(tiny_npy, tmp_path):
    """A finished 3-epoch run on the tiny data set, with a validation split."""
    (tiny_npy / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    run = tmp_path / "runs" / "tiny"
    trained = fastnet("train", "--data", tiny_npy, "--epochs", 3, "--hidden", 8, "--batch-size", 32,
                      "--val", 30, "--out", run)
    assert trained.returncode == 0, trained.stderr
    return run


def no_temporaries(folder):
    return not [name for name in os.listdir(folder) if name.startswith(".tmp")]


# --- report.json -----------------------------------------------------------------------------------

def test_precision_recall_and_f1_match_a_hand_computation():
    # rows: true class, columns: predicted. Class "c" has no test images and is predicted once;
    # class "e" has two test images and is never predicted.
    confusion = [[5, 1, 0, 0, 0],
                 [2, 3, 1, 0, 0],
                 [0, 0, 0, 0, 0],
                 [1, 0, 0, 2, 0],
                 [1, 0, 0, 1, 0]]
    result = report.classification_report(confusion, ["a", "b", "c", "d", "e"])
    by_class = {row["class"]: row for row in result["per_class"]}
    assert result["accuracy"] == pytest.approx(10 / 17)
    assert result["images"] == 17
    assert by_class["a"]["precision"] == pytest.approx(5 / 9) and by_class["a"]["recall"] == pytest.approx(5 / 6)
    assert by_class["b"]["precision"] == pytest.approx(3 / 4) and by_class["b"]["recall"] == pytest.approx(3 / 6)
    assert by_class["c"]["precision"] == 0.0 and by_class["c"]["recall"] == 0.0 and by_class["c"]["f1"] == 0.0
    assert by_class["d"]["precision"] == pytest.approx(2 / 3) and by_class["d"]["recall"] == pytest.approx(2 / 3)
    assert by_class["e"]["precision"] == 0.0 and by_class["e"]["recall"] == 0.0 and by_class["e"]["f1"] == 0.0
    assert by_class["a"]["f1"] == pytest.approx(2 * (5 / 9) * (5 / 6) / (5 / 9 + 5 / 6))
    assert [row["support"] for row in result["per_class"]] == [6, 6, 0, 3, 2]
    assert result["macro"]["recall"] == pytest.approx((5 / 6 + 3 / 6 + 0 + 2 / 3 + 0) / 5)
    assert result["confusion"] == confusion
    json.dumps(result, allow_nan=False)  # every figure is a number JSON can hold


def test_evaluate_out_writes_report_json_and_keeps_its_output(tiny_run, tiny_npy, tmp_path):
    out = tmp_path / "reports" / "new"
    result = fastnet("evaluate", tiny_run / "model.npz", "--data", tiny_npy, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "confusion matrix" in result.stdout
    saved = json.loads((out / "report.json").read_text())
    confusion = np.array(saved["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 90 == saved["images"]
    assert saved["class_names"] == NAMES
    assert saved["accuracy"] == pytest.approx(np.trace(confusion) / 90)
    for k, row in enumerate(saved["per_class"]):
        assert row["class"] == NAMES[k]
        assert row["precision"] == pytest.approx(confusion[k, k] / max(confusion[:, k].sum(), 1))
        assert row["recall"] == pytest.approx(confusion[k, k] / max(confusion[k].sum(), 1))
    assert no_temporaries(out)

    as_json = fastnet("evaluate", tiny_run / "model.npz", "--data", tiny_npy, "--out", out, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["confusion"] == saved["confusion"]  # stdout stays one JSON object


def test_evaluate_out_that_cannot_be_written_is_one_line(tiny_run, tiny_npy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(fastnet("evaluate", tiny_run / "model.npz", "--data", tiny_npy, "--out", blocker / "x"),
                          "cannot write report.json", "--out")


# --- Plots -----------------------------------------------------------------------------------------

def assert_is_a_real_picture(path, size=None):
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        if size:
            assert picture.size == size
        pixels = np.asarray(picture.convert("RGB"))
    assert min(pixels.shape[:2]) >= 300
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{path} has only {len(colours)} colours"
    # Not blank: much of the picture is not the white background, and it is far from uniform.
    assert np.mean(pixels.min(axis=2) < 250) > 0.03
    assert pixels.std() > 20


def test_plot_writes_curves_and_confusion_pngs(tiny_run, tiny_npy):
    result = fastnet("plot", tiny_run, "--data", tiny_npy)
    assert result.returncode == 0, result.stderr
    assert "curves.png" in result.stdout and "confusion.png" in result.stdout
    assert_is_a_real_picture(tiny_run / "curves.png", size=(1100, 420))
    assert_is_a_real_picture(tiny_run / "confusion.png")
    assert no_temporaries(tiny_run)


def test_train_with_plot_draws_both_pictures_at_the_end(tiny_npy, tmp_path):
    result = fastnet("train", "--data", tiny_npy, "--epochs", 2, "--hidden", 8, "--out", tmp_path / "run", "--plot")
    assert result.returncode == 0, result.stderr
    assert_is_a_real_picture(tmp_path / "run" / "curves.png")
    assert_is_a_real_picture(tmp_path / "run" / "confusion.png")


def test_plot_takes_the_data_from_the_run_config(tiny_run):
    # No --data: the run's config.json says where its data is.
    result = fastnet("plot", tiny_run)
    assert result.returncode == 0, result.stderr
    assert_is_a_real_picture(tiny_run / "confusion.png")


def test_plot_run_prefers_a_fresh_report_json_and_draws_what_it_says(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    config["data"] = str(tiny_run / "moved-away")  # evaluating would fail: the report must be used
    (tiny_run / "config.json").write_text(json.dumps(config))
    diagonal = {"confusion": [[30, 0, 0], [0, 30, 0], [0, 0, 30]], "class_names": NAMES}
    (tiny_run / "report.json").write_text(json.dumps(diagonal))
    written = report.plot_run(tiny_run)
    assert [os.path.basename(p) for p in written] == ["curves.png", "confusion.png"]
    right = np.asarray(Image.open(tiny_run / "confusion.png").convert("RGB"))

    (tiny_run / "report.json").write_text(json.dumps(diagonal | {"confusion": [[0, 30, 0], [0, 0, 30], [30, 0, 0]]}))
    report.plot_run(tiny_run)
    wrong = np.asarray(Image.open(tiny_run / "confusion.png").convert("RGB"))
    assert right.shape == wrong.shape and np.mean(np.any(right != wrong, axis=2)) > 0.01

    os.utime(tiny_run / "report.json", (0, 0))  # older than the model: stale, so evaluate instead
    assert_one_line_error(fastnet("plot", tiny_run), "moved-away", "does not exist")


@pytest.mark.parametrize(("val_accs", "kept", "chosen"), [
    ([None, None, None], 2, "last epoch"), ([0.50, 0.55, 0.52], 1, "best validation")])
def test_plot_stars_the_kept_model_not_the_best_test_epoch(val_accs, kept, chosen):
    tests = [0.30, 0.35, 0.45]
    epochs = [json.loads(epoch_line(e + 1, tests[e], 100.0, val_acc=v)) for e, v in enumerate(val_accs)]
    acc_axes = report.curves_figure(epochs).axes[1]
    stars = [line for line in acc_axes.lines if line.get_marker() == "*"]
    assert len(stars) == 1
    assert list(stars[0].get_xdata()) == [kept + 1] and list(stars[0].get_ydata()) == pytest.approx([tests[kept] * 100])
    assert stars[0].get_label() == f"kept model: test {tests[kept]:.2%} (epoch {kept + 1}, {chosen})"


def test_plot_legend_lies_below_both_plots_where_no_curve_runs():
    epochs = [json.loads(epoch_line(e, 0.3 + 0.01 * e, 100.0, val_acc=0.4)) for e in range(1, 4)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = report.curves_figure(epochs)
    canvas = FigureCanvasAgg(figure)  # laid out and drawn as the saved PNG is
    canvas.draw()
    renderer = canvas.get_renderer()
    assert [axes.get_legend() for axes in figure.axes] == [None, None]
    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["train", "val", "test",
                                                                "kept model: test 31.00% (epoch 1, best validation)"]
    assert legend.get_window_extent(renderer).y1 <= min(axes.get_tightbbox(renderer).y0 for axes in figure.axes)


def test_plot_joins_the_test_points_of_a_run_evaluated_every_other_epoch():
    """--eval-every 2: epochs 1 and 3 have no test figures, and the test curve joins epochs 2 and 4."""
    epochs = [json.loads(epoch_line(e, 0.3 + 0.01 * e, 100.0)) for e in range(1, 5)]
    for record in epochs[::2]:
        del record["test_loss"], record["test_acc"]
    for axes, value in zip(report.curves_figure(epochs).axes, ("test_loss", "test_acc"), strict=True):
        test = next(line for line in axes.lines if line.get_label() == "test")
        assert list(test.get_xdata()) == [2, 4]
        factor = 100 if value == "test_acc" else 1
        assert list(test.get_ydata()) == pytest.approx([epochs[1][value] * factor, epochs[3][value] * factor])


def test_plot_of_many_classes_stays_readable(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 20, (60, 60)) + np.diag(rng.integers(50, 100, 60))
    path = tmp_path / "confusion.png"
    report.plot_confusion(confusion, [f"class {k}" for k in range(60)], path)
    assert_is_a_real_picture(path)


@pytest.mark.parametrize("setup, phrases", [
    (lambda run: None, ["does not exist"]),
    (lambda run: (run.mkdir(), (run / "config.json").write_text("{}"), (run / "metrics.jsonl").write_text("")),
     ["no finished epoch"]),
])
def test_plot_of_a_run_it_cannot_draw_is_one_line(setup, phrases, tmp_path):
    run = tmp_path / "run"
    setup(run)
    assert_one_line_error(fastnet("plot", run), *phrases)


# --- The table of runs ----------------------------------------------------------------------------

def write_run(folder, config, metrics_text=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if metrics_text is not None:
        (folder / "metrics.jsonl").write_text(metrics_text)


def test_runs_and_plot_titles_mark_a_network_trained_on_principal_components(tmp_path):
    """--pca 128: the first size is 128 components of 3072 pixels, which a bare 128-1024-10 hides."""
    write_run(tmp_path / "pca", {"sizes": [128, 1024, 10], "pca": 128, "whiten": True}, epoch_line(1, 0.5, 100.0))
    write_run(tmp_path / "raw", {"sizes": [3072, 1024, 10], "pca": 0}, epoch_line(1, 0.5, 100.0))
    models = {row["name"]: row["model"] for row in json.loads(fastnet("runs", tmp_path, "--json").stdout)["runs"]}
    assert models == {"pca": "pca128-1024-10", "raw": "3072-1024-10"}
    assert report._describe_run({"sizes": [128, 1024, 10], "pca": 128, "whiten": True}) == (
        "128-1024-10 MLP on 128 whitened principal components")
    assert report._describe_run({"sizes": [3072, 1024, 10], "pca": 0}) == "3072-1024-10 MLP"


def epoch_line(epoch, test_acc, speed, val_acc=None):
    validation = {} if val_acc is None else {"val_loss": 1.2, "val_acc": val_acc}
    return json.dumps({"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.1,
                       "test_acc": test_acc, "epoch_seconds": 1.0, "samples_per_second": speed} | validation) + "\n"


def test_runs_lists_finished_half_finished_and_broken_runs(tiny_run):
    runs = tiny_run.parent
    config = {"backend": "numba", "sizes": [3072, 256, 10], "epochs": 5}
    write_run(runs / "half", config, epoch_line(1, 0.31, 100.0) + epoch_line(2, 0.42, 400.0)
              + epoch_line(3, 0.40, 200.0) + '{"epoch": 4, "test_a')  # killed while writing epoch 4
    write_run(runs / "validated", config, epoch_line(1, 0.30, 100.0, val_acc=0.50)
              + epoch_line(2, 0.35, 100.0, val_acc=0.55) + epoch_line(3, 0.45, 100.0, val_acc=0.52))
    write_run(runs / "starting", config)                       # no metrics.jsonl yet
    write_run(runs / "empty-metrics", config, "")
    write_run(runs / "corrupt", "{not json", "garbage\n")
    (runs / "not-a-run").mkdir()
    (runs / "stray-file.txt").write_text("")

    result = fastnet("runs", runs)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "backend", "model", "epochs", "kept", "test", "samples/s", "date"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"tiny", "half", "validated", "starting", "empty-metrics", "corrupt"}
    # The test accuracy of the model each run keeps: the last epoch's, or the best validation epoch's;
    # never the best test accuracy (42 % and 45 %), which would choose by the test set.
    assert rows["half"][1:5] == ["numba", "3072-256-10", "3/5", "40.00%"] and rows["half"][5] == "200"
    assert rows["validated"][4] == "35.00%"
    assert rows["starting"][3:6] == ["0/5", "-", "-"]
    assert rows["corrupt"][1:6] == ["-", "-", "-", "-", "-"]
    assert rows["tiny"][1:4] == ["numpy", "48-8-3", "3/3"]

    listed = json.loads(fastnet("runs", runs, "--json").stdout)["runs"]
    tiny = next(row for row in listed if row["name"] == "tiny")
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val_accs = [epoch["val_acc"] for epoch in metrics]
    kept = val_accs.index(max(val_accs))  # the first of the best validation epochs, as model.npz keeps
    assert tiny["test_acc"] == metrics[kept]["test_acc"] and tiny["kept_epoch"] == kept + 1
    assert next(row for row in listed if row["name"] == "validated")["kept_epoch"] == 2
    assert tiny["samples_per_second"] == pytest.approx(statistics.median(m["samples_per_second"] for m in metrics))
    assert next(row for row in listed if row["name"] == "corrupt")["model"] is None


def test_runs_defaults_to_the_runs_folder(tmp_path):
    write_run(tmp_path / "runs" / "20250101-120000", {"backend": "numpy", "sizes": [48, 8, 3], "epochs": 2},
              epoch_line(1, 0.5, 1000.0))
    result = fastnet("runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "20250101-120000" in result.stdout and "1/2" in result.stdout and "50.00%" in result.stdout


def test_runs_of_an_empty_or_missing_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = fastnet("runs", tmp_path / "empty")
    assert empty.returncode == 0 and len(empty.stdout.splitlines()) == 1 and "no runs" in empty.stdout
    assert json.loads(fastnet("runs", tmp_path / "empty", "--json").stdout)["runs"] == []
    assert_one_line_error(fastnet("runs", tmp_path / "nowhere"), "does not exist")
