"""The numba backend's plan for this machine (fastnet/backends/numba_plan.py): measured, kept for
this machine alone, used by every later process, shown by `fastnet plan`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import fastnet

numba_plan = pytest.importorskip("fastnet.backends.numba_plan", reason="the plan is the numba backend's")
numba_gemm = pytest.importorskip("fastnet.backends.numba_gemm", reason="the plan is the numba backend's")

QUICK = {"R1": 2, "R2": 2}


def in_new_process(code, plan_file, **env):
    """What `code` prints, run in a fresh process that keeps its plan in plan_file."""
    import os
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FASTNET_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=environment | {"FASTNET_PLAN_FILE": str(plan_file)} | env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A plan measured here, with two steps of each workload: the machinery, not a speed."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    code = (f"from fastnet.backends import numba_plan; import json; "
            f"print(json.dumps(numba_plan.measure(log=lambda line: None, steps={QUICK!r}, repeats=1)))")
    return path, json.loads(in_new_process(code, path))


def test_a_measured_plan_is_the_fastest_candidate_and_is_kept_for_this_machine(measured):
    """float32's BLAS and tile size, and where the CPU multiplies bfloat16, the bf16 GEMM and its tile
    size, each the lowest cost of its precision, and the bf16 steps' speed against float32's."""
    path, plan = measured
    assert json.loads(path.read_text()) == plan and plan["fingerprint"] == numba_plan.fingerprint()
    gemms = numba_plan._bf16_gemms()
    chosen = {"fp32": (plan["blas"], plan["entries"]["tile_flops"])}
    if gemms:
        chosen["bf16"] = (plan["bf16_gemm"], plan["entries"]["bf16_tile_flops"])
    else:
        assert "bf16_gemm" not in plan and "bf16_tile_flops" not in plan["entries"]
    for precision, libraries in (("fp32", numba_plan._blases()), ("bf16", gemms)):
        rows = [row for row in plan["timings"] if row["precision"] == precision]
        timed = {(row["library"], row["tile_flops"]) for row in rows}
        assert timed == {(library, t) for library in libraries for t in numba_plan.TILE_FLOPS}
        if not libraries:
            continue
        assert {row["workload"] for row in rows} == set(QUICK)
        lowest = min(row["cost"] for row in rows)
        kept = [row for row in rows if (row["library"], row["tile_flops"]) == chosen[precision]]
        assert kept and all(row["cost"] == lowest for row in kept)
    if gemms:
        def quiet(precision, workload):
            return next(row["seconds_per_step"] for row in plan["timings"] if row["precision"] == precision
                        and (row["library"], row["tile_flops"]) == chosen[precision]
                        and row["workload"] == workload and row["neighbours"] == 0)
        assert plan["bf16_speedup"] == {w: quiet("fp32", w) / quiet("bf16", w) for w in QUICK}


def test_a_new_process_uses_the_plan_and_the_environment_overrides_it(measured):
    path, plan = measured
    code = ("from fastnet.backends import numba_gemm; import json; d = numba_gemm.describe(); "
            "print(json.dumps([d['blas'], d['plan'], d['plan_source']]))")
    blas, entries, source = json.loads(in_new_process(code, path))
    assert blas.startswith(plan["blas"]) and source.startswith("measured on ")
    assert {k: entries[k] for k in plan["entries"]} == plan["entries"]
    other = "mkl" if plan["blas"] == "openblas" else "openblas"
    if other == "mkl" and numba_plan._version("mkl") is None:
        return
    blas, entries, source = json.loads(in_new_process(code, path, FASTNET_BLAS=other, FASTNET_PLAN="tile_flops=7"))
    assert blas.startswith(other) and entries["tile_flops"] == 7
    assert f"overridden by FASTNET_BLAS={other} and FASTNET_PLAN=tile_flops=7" in source


def test_another_machines_plan_or_a_broken_file_is_ignored(measured, tmp_path):
    _, plan = measured
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(plan | {"fingerprint": plan["fingerprint"] | {"cpu": "another CPU"},
                                            "entries": {"tile_flops": 7, "tile_multiple": 1}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"fingerprint": ')
    older = tmp_path / "older.json"  # measured before fastnet recorded oneDNN's version, on another NumPy
    older.write_text(json.dumps(plan | {"fingerprint": {k: v for k, v in plan["fingerprint"].items() if k != "onednn"}
                                        | {"numpy": "1.0.0"}}))
    code = "from fastnet.backends import numba_gemm; print(numba_gemm.plan()['tile_flops'])"
    cpu = plan["fingerprint"]["cpu"]
    onednn = plan["fingerprint"]["onednn"] or "not installed"
    changes = f"numpy 1.0.0 (now {np.__version__}), onednn unrecorded (now {onednn})"
    for path, why in ((elsewhere, f"was measured with cpu another CPU (now {cpu}), so it is ignored"),
                      (older, f"was measured with {changes}, so it is ignored"),
                      (broken, "is unreadable, so it is ignored")):
        assert int(in_new_process(code, path)) == numba_gemm.DEFAULT_PLAN["tile_flops"]
        shown = fastnet("plan", env={"FASTNET_PLAN_FILE": str(path)})
        assert shown.returncode == 0 and f"plan: defaults: {path} {why} (fastnet plan --measure)" in shown.stdout


def test_fastnet_plan_shows_the_plan_in_force(measured, tmp_path):
    path, plan = measured
    shown = fastnet("plan", env={"FASTNET_PLAN_FILE": str(path)})
    assert shown.returncode == 0, shown.stderr
    assert f"BLAS: {plan['blas']}; entries: {plan['entries']}" in shown.stdout
    assert len([line for line in shown.stdout.splitlines() if " R1 " in line and "GEMM" not in line]) == len(
        numba_plan.TILE_FLOPS) * (
        len({(row["precision"], row["library"]) for row in plan["timings"]}))
    if plan.get("bf16_gemm"):
        assert f"bf16 GEMM: {plan['bf16_gemm']}; bf16 steps against float32's: R1 " in shown.stdout
    nothing = fastnet("plan", "--json", env={"FASTNET_PLAN_FILE": str(tmp_path / "none.json")})
    assert json.loads(nothing.stdout) == {"status": "defaults: not measured on this machine (fastnet plan --measure)",
                                          "plan": None}


@pytest.mark.parametrize("variable, value, phrase", [
    ("FASTNET_PLAN", "foo", "FASTNET_PLAN='foo': foo='' is not a plan entry"),
    ("FASTNET_PLAN", "tile_flops=0", "tile_flops='0' is not a plan entry"),
    ("FASTNET_PLAN", "tile_flops=2x", "each a whole number >= 1"),
    ("FASTNET_BLAS", "atlas", "FASTNET_BLAS='atlas' is not a BLAS fastnet can drive: set it to mkl or openblas"),
    ("FASTNET_BF16_GEMM", "openblas", "FASTNET_BF16_GEMM='openblas' is not a bfloat16 GEMM fastnet can call"),
])
def test_a_bad_plan_or_blas_in_the_environment_is_one_line(variable, value, phrase, tmp_path):
    from helpers import assert_one_line_error
    result = fastnet("plan", env={variable: value, "FASTNET_PLAN_FILE": str(tmp_path / "plan.json")})
    assert_one_line_error(result, phrase)


def test_a_plan_file_that_cannot_be_written_is_one_line_before_any_timing(tmp_path):
    from helpers import assert_one_line_error
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "plan.json"  # its folder is a file: nothing can be written there, even by root
    result = fastnet("plan", "--measure", env={"FASTNET_PLAN_FILE": str(path)})
    assert_one_line_error(result, f"cannot write the plan to {path} (File exists): set FASTNET_PLAN_FILE to a file "
                                  f"in a writable folder")  # one line: no "plan: timing" line came first
    assert result.returncode == 2 and (tmp_path / "a-file").read_text() == ""
