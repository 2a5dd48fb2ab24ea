"""What each command of `fastnet` does with its parsed arguments: run_train, run_evaluate, ..."""

import json
import sys

import numpy as np

from fastnet import backends, bench, data, distributed, precision, report
from fastnet.cli.flag_types import tta_flag
from fastnet.cli.parser import UsageError
from fastnet.config import TrainConfig, recipe_config
from fastnet.errors import StorageError
from fastnet.evaluation import TTA_VIEWS, saved_tta
from fastnet.run_folder import resumed_config
from fastnet.sweep.space import FIXED
from fastnet.train import train
from fastnet.workloads import WORKLOADS

# What --resume lets a user change: where the data is and how fast it runs, never the numbers.
RESUMABLE_CHANGES = {"data", "backend", "checkpoint_every"}


def backend_threads(args, backend=None):
    """A context in which the command's backend runs on --threads cores, its own way (see
    backends.use_threads): numba's threads over a single-threaded BLAS, or numpy's BLAS threads; the
    backend's default when --threads is not given. `backend` is the one the command runs on when
    that is not --backend: a recipe's, a resumed run's."""
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
    with backend_threads(args, config.backend):
        summary = train(config, resume=bool(args.resume), parallel=parallel)
        if parallel is not None and not parallel.writes:
            return
        if args.plot:
            try:
                written = report.plot_run(summary["out"], data=config.data, backend=config.backend)
            except StorageError as exc:  # the run itself is whole: only the plots are left to draw
                raise exc.continued(f"draw the plots with: fastnet plot {summary['out']}") from exc
            print("wrote " + " and ".join(written))
    kept, epochs = summary["kept"], summary["epoch"]
    which = ("" if kept["epoch"] == epochs else
             f" (epoch {kept['epoch']}, the best by validation accuracy: test accuracy {kept['test_acc']:.2%})")
    print(f"done: test accuracy {summary['test_acc']:.2%} after {epochs} epoch{'' if epochs == 1 else 's'}; "
          f"model in {summary['out']}/model.npz{which}")


def run_evaluate(args):
    with backend_threads(args):
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
    views = f", {TTA_VIEWS[evaluation['tta']]}" if evaluation["tta"] else ""
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

    with backend_threads(args):
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


def run_export(args):
    from fastnet import onnx_export

    onnx_export.require_onnx()
    path, model = onnx_export.export(args.model, args.to, tta_flag(args), args.top_class)
    print(onnx_export.describe(path, model))


def run_plot(args):
    with backend_threads(args):
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
