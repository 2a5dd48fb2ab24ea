"""The backend registry: what is available, how a backend is chosen, registered and refused, and that
the two backend modules mirror each other name for name."""

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from fastnet import backends
from fastnet.backends import numpy_backend
from fastnet.errors import FastnetError
from fastnet.model import MLP
from fastnet.optim import Optimizer
from helpers import COVERED, fastnet


@pytest.fixture
def registry(monkeypatch):
    """The registry's module-level dicts, as copies that are put back after the test."""
    monkeypatch.setattr(backends, "_backends", dict(backends._backends))
    monkeypatch.setattr(backends, "_lazy", dict(backends._lazy))
    monkeypatch.setattr(backends, "_unavailable", dict(backends._unavailable))
    return backends


def numpy_namespace(**replace):
    """A module-like object holding the NumPy kernels (some replaced or, given None, removed)."""
    kernels = {name: getattr(numpy_backend, name) for name in backends.KERNELS} | replace
    return types.SimpleNamespace(**{name: k for name, k in kernels.items() if k is not None})


# --- Choosing a backend ------------------------------------------------------------------------------

def test_numpy_and_numba_are_available():
    assert backends.available()[0] == "numpy"
    assert {"numpy", "numba"} <= set(backends.available())


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_get_returns_a_backend_with_every_kernel(name):
    backend = backends.get(name)
    for kernel in backends.KERNELS:
        assert callable(getattr(backend, kernel, None)), f"{name} lacks {kernel}"
    assert backends.get(name) is backend  # loaded once, then kept
    assert backends.resolve(name) == name


def test_none_means_fastnet_backend_then_numpy(monkeypatch):
    monkeypatch.setenv("FASTNET_BACKEND", "numba")
    assert backends.resolve(None) == "numba"
    assert backends.get(None) is backends.get("numba")
    assert MLP([3, 2], backend=None).backend == "numba"
    assert backends.get("numpy") is numpy_backend  # an explicit name wins over the variable

    monkeypatch.setenv("FASTNET_BACKEND", "")
    assert backends.get(None) is numpy_backend
    monkeypatch.delenv("FASTNET_BACKEND")
    assert backends.resolve(None) == "numpy" and backends.get(None) is numpy_backend
    assert MLP([3, 2], backend=None).backend == "numpy"


@pytest.mark.parametrize("lookup", [backends.get, backends.resolve])
def test_an_unknown_backend_is_one_line_listing_the_available_ones(lookup):
    with pytest.raises(FastnetError) as caught:
        lookup("nope")
    message = str(caught.value)
    assert "\n" not in message and "'nope'" in message
    for name in backends.available():
        assert name in message


def test_unknown_backend_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("FASTNET_BACKEND", "nope")
    with pytest.raises(FastnetError, match="unknown backend 'nope'"):
        backends.get(None)


# --- Registering --------------------------------------------------------------------------------------

def test_register_refuses_a_backend_that_lacks_a_kernel(registry):
    with pytest.raises(ValueError, match=r"'half'.*dense_relu_backward"):
        registry.register("half", numpy_namespace(dense_relu_backward=None))
    with pytest.raises(ValueError, match="adamw_step"):
        registry.register("half", numpy_namespace(adamw_step="not callable"))
    assert "half" not in registry.available()
    with pytest.raises(FastnetError, match="unknown backend 'half'"):
        registry.get("half")


def test_a_registered_namespace_trains_exactly_like_numpy(registry):
    namespace = numpy_namespace()
    registry.register("namespace", namespace)
    assert "namespace" in registry.available() and registry.get("namespace") is namespace

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 10)), rng.integers(0, 3, 6)
    results = []
    for backend in ("numpy", "namespace"):
        net = MLP([10, 8, 3], backend=backend, seed=1)
        assert net.kernels is registry.get(backend)
        optimizer = Optimizer(net.params, "adamw", weight_decay=1e-2, backend=backend)
        loss, grads = net.loss_and_grads(x, y)
        optimizer.step(grads, 0.01)
        results.append((loss, [p.copy() for p in net.params]))
    (loss, params), (expected_loss, expected_params) = results[1], results[0]
    assert loss == expected_loss
    for p, q in zip(params, expected_params, strict=True):
        assert np.array_equal(p, q)
    assert not np.array_equal(params[0], MLP([10, 8, 3], seed=1).params[0])  # the step changed something


def test_a_lazy_backend_whose_package_is_missing(registry):
    registry._lazy["ghost"] = ("fastnet.backends.no_such_module", "no_such_package_for_fastnet")
    assert "ghost" not in registry.available()
    with pytest.raises(FastnetError) as caught:
        registry.get("ghost")
    message = str(caught.value)
    assert "\n" not in message
    assert "'ghost' is unavailable" in message and "pip install no_such_package_for_fastnet" in message
    assert "ghost" in registry._unavailable
    assert "ghost" not in registry.available()
    with pytest.raises(FastnetError, match="unavailable"):  # and it stays so, without a second import
        registry.resolve("ghost")


def test_a_lazy_backend_whose_package_is_there_but_whose_module_is_not(registry):
    # numpy is installed, so "ghost" is listed until its module fails to import.
    registry._lazy["ghost"] = ("fastnet.backends.no_such_module", "numpy")
    assert "ghost" in registry.available()
    with pytest.raises(FastnetError, match=r"'ghost' is unavailable.*no_such_module") as caught:
        registry.get("ghost")
    assert "pip install" not in str(caught.value)  # numpy is installed: installing it is no remedy
    assert "ghost" not in registry.available()


def test_numba_is_imported_only_when_asked_for():
    script = ("import sys, fastnet, fastnet.cli, fastnet.train; from fastnet import backends; "
              "backends.get('numpy'); assert 'numba' in backends.available(); "
              "print('numba' in sys.modules, 'fastnet.backends.numba_backend' in sys.modules); "
              "backends.get('numba'); print('numba' in sys.modules)")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FASTNET_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True"]


# --- The backend modules mirror each other ------------------------------------------------------------

BACKEND_MODULES = ["fastnet.backends.numpy_backend", "fastnet.backends.numba_backend"]


def public_functions(module):
    """The public callables a module defines itself or gathers from the backend's parts (numba_backend
    imports its kernels from numba_dense, numba_elementwise, ...): not what it imports from elsewhere,
    not _private ones, not NAME."""
    return {name for name, value in vars(module).items()
            if callable(value) and not name.startswith("_") and name != "NAME"
            and (getattr(value, "__module__", None) or "").startswith(f"{module.__package__}.")}


@pytest.mark.parametrize("module_name", BACKEND_MODULES)
def test_backend_modules_define_exactly_the_kernels(module_name):
    module = importlib.import_module(module_name)
    for kernel in backends.KERNELS:
        assert callable(getattr(module, kernel, None)), f"{module_name} lacks {kernel}"
    assert public_functions(module) - set(backends.HOOKS) == set(backends.KERNELS)
    assert backends.get(module.NAME) is module


def test_numba_kernels_take_the_arguments_of_their_numpy_twins():
    numba_backend = importlib.import_module("fastnet.backends.numba_backend")
    for kernel in backends.KERNELS:
        twin = getattr(numba_backend, kernel)
        python_function = getattr(twin, "py_func", twin)  # a Numba dispatcher keeps the function it compiles
        assert inspect.signature(python_function) == inspect.signature(getattr(numpy_backend, kernel)), kernel



TWIN_MODULES = sorted(path.stem for path in pathlib.Path(__file__).parent.glob("test_kernel_twins_*.py"))


def test_every_kernel_has_an_equivalence_test():
    """A kernel added to KERNELS needs a test in tests/test_kernel_twins_*.py that compares it across backends."""
    for name in TWIN_MODULES:
        importlib.import_module(name)  # their @covers decorators fill COVERED (pytest may have imported them)
    assert TWIN_MODULES and COVERED == set(backends.KERNELS)


def test_numba_kernels_are_compiled_for_c_contiguous_arrays_alone():
    """Every kernel copies a Fortran-ordered or strided argument on its way in (and a written one back
    out), so Numba compiles it once per dtype, not once per combination of its arguments' layouts."""
    numba_backend = importlib.import_module("fastnet.backends.numba_backend")
    from numba import types as numba_types
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.standard_normal((5, 3)))
    out = np.full((5, 6), np.nan)[:, ::2]  # strided: written through the copy
    numba_backend.tanh_forward(x, out)
    np.testing.assert_allclose(out, np.tanh(x), rtol=1e-12)
    velocity = np.zeros((3, 4)).T  # Fortran-ordered optimizer state, read and written
    param, grad = np.ones((4, 3)), np.full((8, 3), 2.0)[::2]
    numba_backend.momentum_step(param, grad, velocity, 0.5, 0.9, 0.0)
    np.testing.assert_array_equal(velocity, np.full((4, 3), 2.0))
    np.testing.assert_array_equal(param, np.zeros((4, 3)))
    for kernel in backends.KERNELS:
        compiled = getattr(getattr(numba_backend, kernel), "compiled", None)
        assert compiled is not None, f"{kernel} is not wrapped in numba_contiguous.on_contiguous"
        layouts = {a.layout for signature in compiled.signatures for a in signature
                   if isinstance(a, numba_types.Array)}
        assert layouts <= {"C"}, f"{kernel} was compiled for layouts {layouts}"
    assert numba_backend.tanh_forward.compiled.signatures and numba_backend.momentum_step.compiled.signatures

# --- The command line ---------------------------------------------------------------------------------

def test_cli_unknown_backend_is_one_line_listing_the_available_ones(tiny_npy, tmp_path):
    result = fastnet("train", "--backend", "nope", "--data", tiny_npy, "--epochs", 1, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastnet: error: ") and "'nope'" in lines[0], result.stderr
    for name in backends.available():
        assert name in lines[0]
    assert not (tmp_path / "run").exists()  # refused before a run folder is made


def test_cli_takes_the_backend_from_fastnet_backend(tiny_npy, tmp_path):
    run = tmp_path / "run"
    result = fastnet("train", "--data", tiny_npy, "--epochs", 1, "--hidden", 8, "--batch-size", 50,
                         "--out", run, env={"FASTNET_BACKEND": "numba"})
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["backend"] == "numba"
    assert "numba backend" in result.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The accuracy the run printed is the saved model's, as evaluate on the same backend finds it.
    evaluated = fastnet("evaluate", run / "model.npz", "--data", tiny_npy, "--json",
                            env={"FASTNET_BACKEND": "numba"})
    assert evaluated.returncode == 0, evaluated.stderr
    assert len(metrics) == 1 and metrics[0]["test_acc"] == json.loads(evaluated.stdout)["accuracy"]
