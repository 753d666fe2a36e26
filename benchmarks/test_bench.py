"""pytest-benchmark suite: run.py's adapters and measurements on two of its cases per device.

    pytest benchmarks --benchmark-only

Plain ``pytest`` from the repository root does not collect this file (pytest.ini: testpaths = tests).
Each benchmark records the peak bytes and the float64 gradient error in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import peers, run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    CASES = [run.HEADLINE, run.pair_case("tokens", 8192, 1024, 4096, 128256, "bf16")]
else:
    CASES = [run.FOUNDATION, run.pair_case("tokens", 1024, 256, 256, 32000, "fp32")]
IMPLS = {**peers.implementations(DEVICE), "three_matmuls": peers.three_matmuls}
OPTS = peers.Options(compile_peers=True)
REFS = run.References(DEVICE)  # float64 references, shared by the implementations of a case

_problems: dict = {}


def problem_for(case: peers.Case) -> peers.Problem:
    """One problem per case for the whole session, so that each case's float64 reference is
    computed once, whatever order the tests run in."""
    if case not in _problems:
        _problems[case] = peers.make_problem(case, DEVICE)
    return _problems[case]


def _synced(step):
    """``step`` and a wait for the device: the timer then covers the kernels, not their launch."""
    def run_step():
        out = step()
        run.sync(DEVICE)
        return out

    return run_step


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-N{c.tokens}-H{c.H}-V{c.V}-{c.dtype}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, impl, case):
    if impl == "three_matmuls" and not case.floor:
        pytest.skip("the matmul floor is timed on the named cases only")
    problem = problem_for(case)
    prepared = IMPLS[impl](problem, DEVICE, OPTS)
    if isinstance(prepared, str):
        pytest.skip(prepared)
    try:
        benchmark.extra_info["peak_bytes"] = run.measure_peak(prepared, DEVICE)
    except Exception as exc:
        if run.is_oom(exc):
            pytest.skip(f"out of memory: {exc}")
        raise
    benchmark.extra_info["device"] = run.device_name(DEVICE)
    benchmark.extra_info["tokens"] = case.tokens
    benchmark.pedantic(_synced(prepared.step), setup=lambda: run.sync(DEVICE), rounds=3 if DEVICE.type == "cpu" else 10,
                       warmup_rounds=1)
    run.clear(prepared)
    err = run.check_error(IMPLS[impl], prepared, problem, case, DEVICE, OPTS, REFS,
                          err_flops=run.ERR_FLOPS[DEVICE.type])
    benchmark.extra_info.update(err)
    if "grad_err" in err and impl != "cce":  # CCE's default filters small gradients by design
        assert err["grad_err"] < (1e-4 if case.dtype == "fp32" else 5e-2), err
