"""Mixed precision (--precision bf16): the rounding to bfloat16 against an independent library
(ml_dtypes, JAX's NumPy types), the checks that refuse it where it cannot pay, and what the model,
optimizer and trainer promise about the bf16 copies. The backends' kernels are compared with each
other in test_kernel_twins_*.py."""

import json

import ml_dtypes
import numpy as np
import pytest

from fastnet import backends, cli, cpu, precision
from fastnet.backends import numpy_backend as ref
from fastnet.config import TrainConfig
from fastnet.errors import FastnetError
from fastnet.model import MLP
from fastnet.optim import Optimizer
from fastnet.train import train
from helpers import bf16_values, every_delicate_float32, to_bf16

EPS_BF16 = 2.0 ** -8  # half the spacing of bfloat16 numbers at 1: the largest relative rounding error


# --- The rounding ---------------------------------------------------------------------------------------

def test_rounding_matches_ml_dtypes_on_every_number():
    x = np.concatenate([every_delicate_float32(),
                        np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)])
    numbers = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        expected = numbers.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(to_bf16(numbers), expected)


@pytest.mark.parametrize("bits, expected", [
    (0x3F808000, 0x3F80),  # 1 + 2^-8, halfway between 1 and the next bf16: to the even one, 1
    (0x3F818000, 0x3F82),  # halfway again, now up to the even neighbour
    (0x3F808001, 0x3F81),  # just over halfway: up
    (0xBF808000, 0xBF80),  # the same tie, negative
    (0x7F7FFFFF, 0x7F80),  # the largest float32 rounds past the largest bf16: inf
    (0x7F800000, 0x7F80),  # inf stays inf
    (0xFF800000, 0xFF80),  # and -inf
    (0x00000001, 0x0000),  # the smallest subnormal rounds to 0
    (0x00008000, 0x0000),  # a subnormal tie, to even: 0
    (0x00018000, 0x0002),  # a subnormal tie, to even: up
    (0x80000000, 0x8000),  # -0 keeps its sign
])
def test_rounding_is_to_nearest_ties_to_even(bits, expected):
    assert to_bf16(np.array([bits], np.uint32).view(np.float32))[0] == expected


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00001, 0xFF80FFFF])
def test_a_nan_stays_a_nan_with_its_sign_and_the_quiet_bit(bits):
    """Rounding 0x7FFFFFFF up would carry into the exponent and give inf: NaNs are truncated instead."""
    result = int(to_bf16(np.array([bits], np.uint32).view(np.float32))[0])
    assert np.isnan(bf16_values([result])[0])
    assert result >> 15 == bits >> 31 and result & 0x40 and result >> 7 & 0xFF == 0xFF


def test_every_bf16_number_converts_exactly_and_rounds_back_to_itself():
    bits = np.arange(1 << 16, dtype=np.uint16)
    as_float = np.empty(bits.shape, np.float32)
    ref.bf16_to_float32(bits, as_float)
    assert np.array_equal(as_float.view(np.uint32), bits.astype(np.uint32) << 16)
    numbers = ~np.isnan(as_float)
    assert np.array_equal(to_bf16(as_float[numbers]), bits[numbers])


# --- Where bf16 runs ----------------------------------------------------------------------------------------

def test_bf16_is_refused_on_a_cpu_without_the_instructions(monkeypatch):
    monkeypatch.delenv(precision.ANY_CPU, raising=False)
    with pytest.raises(FastnetError, match=r"AMX-BF16 or AVX512-BF16.*--precision fp32") as refused:
        precision.check("bf16", "numpy", flags={"avx2", "fma", "avx512f"})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("flags, found", [({"amx_bf16", "avx512_bf16"}, ["AMX-BF16", "AVX512-BF16"]),
                                          ({"avx512_bf16"}, ["AVX512-BF16"])])
def test_bf16_runs_where_the_cpu_has_them_and_says_which(monkeypatch, flags, found):
    monkeypatch.delenv(precision.ANY_CPU, raising=False)
    numerics = precision.check("bf16", "numpy", flags=flags)
    assert numerics["precision"] == "bf16" and numerics["instructions"] == found
    assert numerics["gemm"] == backends.bf16_gemm("numpy") and "emulation" in numerics["gemm"]


def test_the_override_runs_bf16_on_any_cpu_and_is_recorded(monkeypatch):
    monkeypatch.setenv(precision.ANY_CPU, "1")
    assert precision.check("bf16", "numpy", flags=set())["instructions"] == [f"none ({precision.ANY_CPU}=1)"]
    assert precision.check("fp32", "numpy", flags=set()) == {"precision": "fp32"}
    with pytest.raises(FastnetError, match="unknown precision 'fp16'"):
        precision.check("fp16", "numpy")


def test_the_numba_backend_without_a_bf16_gemm_says_what_to_install(monkeypatch):
    numba_gemm = pytest.importorskip("fastnet.backends.numba_gemm", reason="the numba backend needs numba")
    from fastnet.backends.numba_blas import Bf16Gemm

    monkeypatch.setattr(numba_gemm, "BF16_GEMM", Bf16Gemm("none", None, 0))
    with pytest.raises(FastnetError, match=r"numba backend needs a bfloat16 GEMM, and neither MKL nor oneDNN is "
                                           r"installed: pip install 'fastnet\[mkl\]' on an Intel CPU, "
                                           r"'fastnet\[onednn\]' on another"):
        precision.check("bf16", "numba", flags={"amx_bf16"})


def a_plan(speedup, gemm="mkl"):
    return {"measured": "2026-12-05", "bf16_gemm": gemm, "bf16_speedup": {"R1": speedup, "R2": speedup}}


@pytest.mark.parametrize("gemm, plan, refused", [
    # MKL's path on an AMD Zen 4: the CPU has AVX512-BF16, MKL's GEMM converts to float32.
    (("mkl", []), None, (r"--precision bf16 would be slower than fp32 here: mkl's bf16 GEMM uses none of this CPU's "
                        r"bf16 instructions .* pip install 'fastnet\[onednn\]', whose GEMM does, or train with "
                        r"--precision fp32 \(or set FASTNET_BF16_ANY_CPU=1 to run bf16 anyway\)")),
    (("onednn", []), None, r"onednn's bf16 GEMM uses none .* pip install 'fastnet\[mkl\]'"),
    (("mkl", ["AVX512-BF16"]), a_plan(0.77), (r"--precision bf16 ran R1's steps at 0.77x fp32's speed on this machine "
                                             r"\(mkl's bf16 GEMM; fastnet plan, measured 2026-12-05\): train with "
                                             r"--precision fp32")),
    (("mkl", ["AMX-BF16", "AVX512-BF16"]), a_plan(1.6), None),
    (("onednn", ["AVX512-BF16"]), None, None),  # not measured: the instructions are there, and used
    (("onednn", ["AVX512-BF16"]), a_plan(0.77, gemm="mkl"), None),  # the plan measured another library
])
def test_bf16_that_would_be_slower_than_fp32_is_refused_unless_insisted_on(monkeypatch, gemm, plan, refused):
    numba_gemm = pytest.importorskip("fastnet.backends.numba_gemm", reason="the numba backend needs numba")
    from fastnet.backends.numba_blas import Bf16Gemm

    name, instructions = gemm
    monkeypatch.setattr(numba_gemm, "BF16_GEMM", Bf16Gemm(name, "lib.so", 1, "1.0", instructions))
    monkeypatch.setattr(numba_gemm, "MEASURED", plan)
    monkeypatch.delenv(precision.ANY_CPU, raising=False)
    if refused is None:
        assert precision.check("bf16", "numba", flags={"avx512_bf16"})["gemm"] == numba_gemm.BF16_GEMM.describe()
        return
    with pytest.raises(FastnetError, match=refused) as caught:
        precision.check("bf16", "numba", flags={"avx512_bf16"})
    assert "\n" not in str(caught.value)
    monkeypatch.setenv(precision.ANY_CPU, "1")
    assert precision.check("bf16", "numba", flags={"avx512_bf16"})["precision"] == "bf16"


@pytest.mark.parametrize("gemm, plan, flags, runs", [
    (("mkl", ["AMX-BF16", "AVX512-BF16"]), None, {"amx_bf16", "avx512_bf16"}, "bf16"),
    (("onednn", ["AVX512-BF16"]), None, {"avx512_bf16"}, "bf16"),
    (("mkl", []), None, {"avx512_bf16"}, "fp32"),  # MKL on a Zen 4: its GEMM converts to float32
    (("mkl", ["AVX512-BF16"]), a_plan(0.77), {"avx512_bf16"}, "fp32"),  # this machine's plan measured it slower
    (("onednn", ["AVX512-BF16"]), None, {"avx2", "fma"}, "fp32"),  # the CPU has no bf16 instructions
])
def test_auto_is_bf16_only_where_bf16_is_faster(monkeypatch, gemm, plan, flags, runs):
    numba_gemm = pytest.importorskip("fastnet.backends.numba_gemm", reason="the numba backend needs numba")
    from fastnet.backends.numba_blas import Bf16Gemm

    name, instructions = gemm
    monkeypatch.setattr(numba_gemm, "BF16_GEMM", Bf16Gemm(name, "lib.so", 1, "1.0", instructions))
    monkeypatch.setattr(numba_gemm, "MEASURED", plan)
    monkeypatch.setenv(precision.ANY_CPU, "1")  # "auto" never takes the override's slow bf16
    numerics = precision.check("auto", "numba", flags=flags)
    assert numerics["precision"] == runs and numerics["asked"] == "auto"
    # bf16 keeps float32 master weights: float64 ones run in fp32 wherever bf16 would pay.
    assert precision.check("auto", "numba", flags=flags, dtype=np.float64) == {"precision": "fp32", "asked": "auto"}
    # The numpy backend's bf16 is an emulation, slower than its float32 everywhere.
    assert precision.check("auto", "numpy", flags={"amx_bf16", "avx512_bf16"})["precision"] == "fp32"


def test_a_run_asked_for_auto_records_the_precision_it_ran(backend, tiny_npy, tmp_path):
    settings = dict(data=str(tiny_npy), backend=backend, hidden=(8,), epochs=1, batch_size=30, precision="auto")
    for dtype in ("float32", "float64"):
        train(TrainConfig(**settings, dtype=dtype, out=str(tmp_path / dtype)), log=lambda line: None)
        config = json.loads((tmp_path / dtype / "config.json").read_text())
        ran = precision.resolve(backend) if dtype == "float32" else "fp32"  # bf16 keeps float32 master weights
        assert config["precision"] == config["numerics"]["precision"] == ran
        assert config["numerics"]["asked"] == "auto"


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["bench", "--steps", "1", "--backend", "numpy"]])
def test_the_cli_refuses_bf16_in_one_line_and_writes_nothing(monkeypatch, capsys, tiny_npy, tmp_path, command):
    monkeypatch.delenv(precision.ANY_CPU, raising=False)
    monkeypatch.setattr(cpu, "flags", lambda: {"avx2", "fma"})
    extra = ["--data", str(tiny_npy), "--out", str(tmp_path / "run")] if command[0] == "train" else []
    assert cli.main([*command, *extra, "--precision", "bf16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastnet: error: --precision bf16 needs a CPU with AMX-BF16")
    assert not (tmp_path / "run").exists()


def test_bf16_keeps_float32_master_weights(monkeypatch):
    with pytest.raises(ValueError, match="float32 master weights"):
        MLP([4, 3, 2], dtype="float64", precision="bf16")
    monkeypatch.setenv(precision.ANY_CPU, "1")
    with pytest.raises(FastnetError, match="needs dtype float32"):
        TrainConfig(precision="bf16", dtype="float64").check()


# --- The model's bf16 copies ---------------------------------------------------------------------------------

def test_the_weight_copies_follow_every_update(backend):
    rng = np.random.default_rng(0)
    net = MLP([20, 16, 5], backend=backend, precision="bf16", seed=1)
    assert all(np.array_equal(W16, to_bf16(W)) for W, W16 in zip(net.weights, net.weights16, strict=True))
    optimizer = Optimizer(net.params, "nesterov", weight_decay=0.01, backend=backend, copies=net.param_copies)
    x, y = rng.standard_normal((8, 20)), rng.integers(0, 5, 8)
    before = [W16.copy() for W16 in net.weights16]
    for _ in range(3):
        _, grads = net.loss_and_grads(x, y)
        optimizer.step(grads, 0.1)
    for W, W16, old in zip(net.weights, net.weights16, before, strict=True):
        assert np.array_equal(W16, to_bf16(W)) and not np.array_equal(W16, old)
    # Written from outside (a checkpoint, a resumed run): refresh_copies catches up.
    for W in net.weights:
        W *= 2
    net.refresh_copies()
    assert all(np.array_equal(W16, to_bf16(W)) for W, W16 in zip(net.weights, net.weights16, strict=True))
    folded = net.with_input_projection(rng.standard_normal((30, 20)).astype(np.float32))
    assert np.array_equal(folded.weights16[0], to_bf16(folded.weights[0]))


def test_training_passes_round_and_evaluation_does_not(backend):
    """loss_and_grads in bf16 differs from float32 by bf16's rounding, not more and not less; forward,
    evaluation, is float32 on the master weights whatever the precision."""
    rng = np.random.default_rng(2)
    sizes, batch = [300, 64, 10], 32
    x, y = rng.standard_normal((batch, sizes[0])), rng.integers(0, sizes[-1], batch)
    fp32, bf16 = (MLP(sizes, backend=backend, precision=p, seed=3) for p in ("fp32", "bf16"))
    assert np.array_equal(bf16.forward(x), fp32.forward(x))
    (loss32, grads32), (loss16, grads16) = fp32.loss_and_grads(x, y), bf16.loss_and_grads(x, y)
    # Each product's operands carry a relative error of up to EPS_BF16 each, which mostly cancel over
    # a sum of random signs; the two layers' errors add, and 8 EPS_BF16 bounds them with room.
    for got, want in zip(grads16, grads32, strict=True):
        scale = float(np.abs(want).max())
        difference = float(np.abs(got - want).max())
        assert difference < 8 * EPS_BF16 * scale, "bf16 gradients are further from float32 than rounding explains"
        assert difference > 100 * np.finfo(np.float32).eps * scale, "bf16 gradients equal float32's: nothing rounded"
    assert loss16 != loss32 and abs(loss16 - loss32) < 8 * EPS_BF16 * loss32


# --- A training run ------------------------------------------------------------------------------------------

def test_a_bf16_run_records_its_numerics_and_learns_as_float32_does(backend, monkeypatch, tiny_npy, tmp_path):
    monkeypatch.setenv(precision.ANY_CPU, "1")
    settings = dict(data=str(tiny_npy), backend=backend, hidden=(32,), epochs=3, batch_size=30)
    runs = {p: train(TrainConfig(**settings, precision=p, out=str(tmp_path / p)), log=lambda line: None)
            for p in ("fp32", "bf16")}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["precision"] == "bf16" and config["numerics"]["precision"] == "bf16"
    assert config["numerics"]["gemm"] == backends.bf16_gemm(backend)
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["numerics"] == {"precision": "fp32"}
    assert runs["bf16"]["test_acc"] > 0.9 and abs(runs["bf16"]["test_acc"] - runs["fp32"]["test_acc"]) <= 0.05
    assert runs["bf16"]["train_loss"] != runs["fp32"]["train_loss"]


def test_a_batch_gathered_in_bf16_needs_no_rounding_pass(backend):
    """The trainer's gather writes ws.inputs16 and run_forward(rounded_inputs=True) reads it: the
    same logits, bit for bit, as the forward pass that rounds the batch itself."""
    rng = np.random.default_rng(4)
    net = MLP([12, 8, 3], backend=backend, precision="bf16", seed=0)
    images = rng.integers(0, 256, (20, 12), dtype=np.uint8)
    shift, scale = np.full(12, 120, np.float32), np.full(12, 1 / 64, np.float32)
    ws = net.workspace(5)
    net.kernels.gather_normalize(images, np.arange(5), shift, scale, ws.inputs, ws.inputs16)
    assert np.array_equal(ws.inputs16, to_bf16(ws.inputs))
    gathered = net.run_forward(ws, rounded_inputs=True).copy()
    ws.inputs16[...] = 0
    assert np.array_equal(net.run_forward(ws), gathered)
    assert MLP([12, 8, 3], backend=backend).workspace(5).inputs16 is None
