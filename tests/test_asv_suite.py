"""The asv suite (benchmarks/) against this commit: every benchmark's setup and body run once, small,
and none may be skipped.

asv reports a NotImplementedError from setup as a skipped benchmark, which is how the suite survives
old commits that lack a kernel. At HEAD nothing is missing, so a skip here is a regression that asv
would show on the dashboard as n/a. Each benchmark class runs in a fresh process (this file, run as a
script), as asv runs each benchmark: the suite pins thread counts for the rest of its process.
"""

import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_PREFIXES = ("time_", "track_", "peakmem_", "mem_", "timeraw_")


def suite_package():
    """The benchmarks package, imported as asv imports it: by path, without putting the repository
    root on sys.path, where it would shadow the installed fastnet with the source tree's."""
    if "benchmarks" not in sys.modules:
        folder = ROOT / "benchmarks"
        spec = importlib.util.spec_from_file_location("benchmarks", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return sys.modules["benchmarks"]


def suite_modules():
    package = suite_package()
    return [importlib.import_module(f"benchmarks.{info.name}")
            for info in pkgutil.iter_modules(package.__path__) if info.name.startswith("bench_")]


def benchmark_methods(cls):
    return [name for name in dir(cls) if name.startswith(BENCHMARK_PREFIXES) and callable(getattr(cls, name))]


def benchmark_classes():
    """'module.Class' for every class with benchmarks in it, as asv discovers them."""
    return [f"{module.__name__.split('.')[-1]}.{name}" for module in suite_modules()
            for name, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and not name.startswith("_") and benchmark_methods(cls)]


# --- The runner: one class, every parameter combination, in this (fresh) process -----------------

def make_small(module):
    """Fewer steps and images than asv measures with, so the whole suite runs in seconds; every code
    path stays the same."""
    suite = sys.modules["benchmarks"]
    if module.__name__ == "benchmarks.bench_training":
        module.EPOCH_SLICE_STEPS = 3
        module.Throughput.blocks, module.Throughput.steps_per_block = 1, 2
        module.DataParallel.steps = 2
        module.EpochMemory.num_images = 3 * max(w.batch_size for w in suite.WORKLOADS.values())
        module.FullDatasetMemory.images_per_batch, module.FullDatasetMemory.steps = 300, 2
        # What is checked is that each snippet runs, not how long a cold compile takes: NumbaStartup's
        # snippets use the package's own cache, which the rest of the suite fills, instead of empty
        # folders that each cost a compile of every kernel (half a minute on a cold machine).
        module._POPULATE = module._POPULATE.removeprefix(module._FRESH_CACHE)
        module._FRESH_CACHE = ""


def run_timeraw(snippets):
    """asv's timeraw_: the setup part, then the timed part, in a fresh interpreter."""
    code, setup = snippets
    subprocess.run([sys.executable, "-c", textwrap.dedent(setup) + "\n" + textwrap.dedent(code)], check=True,
                   capture_output=True, text=True)


def run_class(qualified):
    module_name, class_name = qualified.split(".")
    suite_package()
    module = importlib.import_module(f"benchmarks.{module_name}")
    make_small(module)
    cls = getattr(module, class_name)
    params = getattr(cls, "params", [])
    if params and not isinstance(params[0], list):
        params = [params]
    cache = (cls().setup_cache(),) if hasattr(cls, "setup_cache") else ()
    outcomes = {}
    for combination in itertools.product(*params):
        for method in benchmark_methods(cls):
            arguments = cache + combination
            instance = cls()
            try:
                if hasattr(instance, "setup"):
                    instance.setup(*arguments)
                value = getattr(instance, method)(*arguments)
                if method.startswith("timeraw_"):
                    run_timeraw(value)
                    value = None
                outcome = {"status": "ok", "value": value}
            except NotImplementedError as exc:
                outcome = {"status": "skipped", "why": str(exc)}
            except subprocess.CalledProcessError as exc:
                outcome = {"status": "error", "why": exc.stderr.strip()[-500:]}
            except Exception as exc:  # noqa: BLE001  (reported to the test, which fails on it)
                outcome = {"status": "error", "why": f"{type(exc).__name__}: {exc}"}
            if hasattr(instance, "teardown"):
                instance.teardown(*arguments)
            outcomes[f"{method}({', '.join(map(str, combination))})"] = outcome
    return outcomes


# --- The tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("qualified", benchmark_classes())
def test_every_benchmark_runs_at_head_without_a_skip(qualified, tmp_path):
    environment = dict(os.environ, FASTNET_BF16_ANY_CPU="1")  # Throughput's bf16 runs on any CPU here
    done = subprocess.run([sys.executable, __file__, qualified], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=600)
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes, f"{qualified} has no benchmark to run"
    failed = {name: outcome for name, outcome in outcomes.items() if outcome["status"] != "ok"}
    assert not failed, failed
    for name, outcome in outcomes.items():
        if name.startswith("track_"):
            assert math.isfinite(outcome["value"]) and outcome["value"] > 0, (name, outcome)


def test_the_suite_covers_every_kind_of_benchmark():
    kinds = {method.split("_")[0] for qualified in benchmark_classes()
             for method in benchmark_methods(getattr(suite_module(qualified), qualified.split(".")[1]))}
    assert kinds == {"time", "track", "peakmem", "timeraw"}


def suite_module(qualified):
    return next(module for module in suite_modules() if module.__name__ == f"benchmarks.{qualified.split('.')[0]}")


if __name__ == "__main__":
    print(json.dumps(run_class(sys.argv[1])))
