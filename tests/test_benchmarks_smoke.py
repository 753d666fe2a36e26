"""Smoke test of the benchmark harness: tiny shapes, every implementation, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    # The Triton interpreter (set for the test suite) makes every Triton step take seconds; its rows are
    # tested elsewhere, so here they are skipped (with their reason) to keep the smoke run short.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--device", "cpu", "--smoke",
                           "--out", str(out), "--plot", str(tmp_path / "smoke.png")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["versions"]["torch"] and result["date"]
    rows = result["rows"]
    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    for impl in ("naive", "ours[torch,recompute]", "ours[torch,group]", "ours[triton,recompute]",
                 "liger[nca_pair]", "trl[chunked_logprob]", "cce[torch_compile]"):
        assert impl in by_impl, f"no row for {impl}"
        for r in by_impl[impl]:
            assert r["status"] in ("ok", "skip"), r
            if r["status"] == "skip":
                assert r["reason"], r  # every skipped implementation says why
                continue
            assert r["peak_bytes"] > 0 and r["median_ms"] > 0, r
            assert r["grad_err"] < 1e-4, r  # fp32 against the float64 reference
    for impl in ("naive", "ours[torch,recompute]", "ours[torch,group]"):
        assert all(r["status"] == "ok" for r in by_impl[impl]), by_impl[impl]
    floor = by_impl["three_matmuls"]
    assert floor and all(r["status"] == "ok" and "time_vs_naive" in r for r in floor)
    assert (tmp_path / "smoke.png").exists()


def test_reference_in_chunks_is_the_naive_reference():
    """The benchmark's float64 reference walks sequences in chunks (any chunk size gives the
    unchunked naive loss and gradients), so full-size cases need no reduced instance."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import peers, run
    from nca_kernels import reference

    problem = peers.make_problem(peers.Case("t", B=3, K=4, T=40, H=24, V=300, dtype="bf16"), torch.device("cpu"))
    h, w = (x.detach().double().requires_grad_() for x in problem.leaves())
    loss = reference.fused_nca_loss(h, w, problem.labels, problem.rewards.double(), problem.ref_logps.double(),
                                    **problem.loss_kwargs)
    loss.backward()
    for chunk_logits in (1 << 30, 2 * 40 * 300, 1):  # one chunk, two sequences, one sequence
        got_loss, dh, dw = run.reference_grads(problem, torch.device("cpu"), chunk_logits)
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(dh, h.grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(dw, w.grad, rtol=1e-12, atol=1e-15)


def test_peaked_logits_have_a_head_and_a_tail():
    """The gradient-filtering rows run on ``--logits peaked`` inputs: a softmax with a short head
    above 2**-12 and a tail below it that still holds some mass (random weights give a flat softmax
    with most entries above it, on which filtering would look better than it is)."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import peers

    eps, v = 2.0**-12, 2000

    def head_and_tail(logits):
        problem = peers.make_problem(peers.Case("t", B=1, K=2, T=64, H=64, V=v, logits=logits), torch.device("cpu"))
        mask = problem.labels != peers.IGNORE
        p = torch.softmax(problem.hidden[mask].detach() @ problem.weight.detach().t(), -1)
        return float((p >= eps).sum(1).float().mean()), float((p * (p < eps)).sum(1).mean())

    head, tail = head_and_tail("peaked")
    assert head < 0.15 * v and tail > 0.005
    assert head_and_tail("random")[0] > 0.4 * v


def test_run_peaked_smoke(tmp_path):
    out = tmp_path / "peaked.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--device", "cpu", "--smoke",
                           "--logits", "peaked", "--only", "naive", "ours[torch,recompute]", "filter",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} - {"three_matmuls"} == {"naive", "ours[torch,recompute]",
                                                            "ours[triton,recompute,filter]"}
    for r in rows:
        if r["impl"] == "three_matmuls":
            continue
        assert r["logits"] == "peaked" and r["config"].endswith("peaked logits"), r
        if r["impl"] == "ours[triton,recompute,filter]":
            assert r["status"] == "skip" and "triton" in r["reason"], r  # no GPU, no interpreter here
        else:
            assert r["status"] == "ok" and r["grad_err"] < 1e-4, r


def test_filter_row_filters_forward_and_backward():
    """The filtered row runs on peaked inputs only, and holds ``filter_eps`` over its whole step
    (backward included): with an eps above every gradient entry, the Triton backward skips every
    tile (in the interpreter here)."""
    import dataclasses

    import pytest
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import peers
    from nca_kernels.backends import unavailable_reason

    cpu = torch.device("cpu")
    if unavailable_reason("triton", cpu) is not None:
        pytest.skip("needs the Triton interpreter")
    case = peers.Case("t", B=1, K=2, T=12, H=16, V=40, logits="peaked")
    flat = peers.make_problem(dataclasses.replace(case, logits="random"), cpu)
    assert "peaked" in peers.ours("triton", True, 1e-3)(flat, cpu, peers.Options())  # refused, with the reason
    problem = peers.make_problem(case, cpu)
    loss, dh, dw = peers.ours("triton", True, 0.9)(problem, cpu, peers.Options()).step()
    assert torch.isfinite(loss) and dh.abs().max() == 0 and dw.abs().max() == 0
    loss, dh, dw = peers.ours("triton", True)(problem, cpu, peers.Options()).step()
    assert dh.abs().max() > 0 and dw.abs().max() > 0


def test_tile_sweep_forces_each_shape():
    """benchmarks/tile_sweep.py (a GPU tuning aid) on a tiny case in the Triton interpreter: each
    forced tile shape runs, and taller tiles (fewer token chunks) change the dW rounding."""
    import pytest
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import tile_sweep
    from nca_kernels.backends import unavailable_reason

    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("needs the Triton interpreter")
    result = tile_sweep.main(["--device", "cpu", "--case", "1,2,64,32,300", "--rows", "16", "32", "--cols", "512",
                              "--backends", "triton"])
    rows = result["rows"]
    assert [(r["rows"], r["cols"], r["chunks"]) for r in rows] == [(16, 300, 4), (32, 300, 2)]
    assert all(r["median_ms"] > 0 and r["grad_err"] < 2e-2 for r in rows), rows
    assert rows[0]["dw_err"] != rows[1]["dw_err"]


def test_reduced_instance_only_past_the_float64_budget():
    sys.path.insert(0, ROOT)
    from benchmarks import peers

    case = peers.Case("c", B=4, K=2, T=512, H=64, V=1000)
    assert case.reduced(case.reference_flops) is case  # within budget: checked at full size
    small = case.reduced(case.reference_flops / 10)  # fewer prompts first, then shorter sequences
    assert small.reference_flops <= case.reference_flops / 10 and small.B == 1 and small.T < case.T
    assert (small.K, small.H, small.V, small.dtype) == (case.K, case.H, case.V, case.dtype)
    assert "reduced" in small.label()


def test_run_quick(tmp_path):
    """``run.py --device cpu --quick`` (issue 5's CPU sweep, one timed round here): every case and
    output file, every row ok or skipped with its reason; no timing assertions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out, md, png = tmp_path / "quick.json", tmp_path / "quick.md", tmp_path / "quick.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--device", "cpu", "--quick",
                           "--reps", "1", "--out", str(out), "--md", str(md), "--plot", str(png)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["name"] for r in rows} == {"foundation", "tokens"}
    assert all(r["status"] == "ok" or (r["status"] == "skip" and r["reason"]) for r in rows), rows
    ours = [r for r in rows if r["impl"] in ("naive", "ours[torch,recompute]", "ours[torch,group]")]
    assert len(ours) == 3 * 4 and all(r["status"] == "ok" and r["grad_err"] < 1e-4 for r in ours), ours
    assert "issue-2 targets" in proc.stdout and md.read_text().count("**") >= 8 and png.stat().st_size > 0


def test_a_failing_step_is_recorded_not_fatal():
    """An implementation that raises while timed (a peer's first compilation, say) leaves the round
    robin with its error; the others keep their times and outputs."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import run

    calls = []

    def broken():
        calls.append("broken")
        raise RuntimeError("compile failed")

    failed = {}
    times, last = run.time_interleaved({"ok": lambda: 7, "broken": broken}, torch.device("cpu"), 3, 1, failed)
    assert list(times) == ["ok"] and len(times["ok"]) == 3 and last == {"ok": 7}
    assert str(failed["broken"]) == "compile failed" and calls == ["broken"]
    assert run.failure(failed["broken"]) == {"status": "error", "reason": "RuntimeError: compile failed"}
    with pytest.raises(RuntimeError, match="compile failed"):  # without a failed dict the error propagates
        run.time_interleaved({"broken": broken}, torch.device("cpu"), 1, 0)


def test_failure_status_and_reason():
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import run

    assert run.failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried"))["status"] == "oom"
    assert run.failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))["status"] == "oom"
    long = run.failure(ValueError("x" * 1000))
    assert long["status"] == "error" and long["reason"] == ("ValueError: " + "x" * 1000)[:300]


def test_run_case_drops_a_step_that_fails_while_timed(monkeypatch):
    import argparse

    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import peers, run

    def flaky(problem, device, opts):
        prep = peers.naive(problem, device, opts)
        calls, step = [], prep.step

        def later_fails():
            calls.append(1)
            if len(calls) > 1:  # the memory run passes, the timed round does not
                raise RuntimeError("compile failed")
            return step()

        prep.step = later_fails
        return prep

    monkeypatch.setattr(peers, "implementations", lambda device: {"naive": peers.naive, "flaky": flaky})
    args = argparse.Namespace(only=None, skip=None, reps=1, warmup=0, err_flops=1e12)
    case = peers.Case("t", B=1, K=2, T=8, H=8, V=32)
    rows = {r["impl"]: r for r in run.run_case(case, torch.device("cpu"), peers.Options(compile_peers=False), args)}
    assert rows["flaky"]["status"] == "error" and rows["flaky"]["reason"] == "RuntimeError: compile failed"
    assert "median_ms" not in rows["flaky"] and "grad_err" not in rows["flaky"]
    assert rows["naive"]["status"] == "ok" and rows["naive"]["median_ms"] > 0 and rows["naive"]["grad_err"] < 1e-4


def test_quick_cpu_settings_are_recorded():
    sys.path.insert(0, ROOT)
    from benchmarks import run

    result = run.main(["--device", "cpu", "--quick", "--cases", "no-such-case"])
    settings = result["settings"]
    assert result["rows"] == [] and settings["time_budget"] == 240.0 and settings["err_flops"] == 1.2e11
    assert (settings["reps"], settings["warmup"]) == (3, 0)
    given = run.main(["--device", "cpu", "--quick", "--cases", "no-such-case", "--time-budget", "5"])
    assert given["settings"]["time_budget"] == 5


def test_reduced_instances_share_their_reference(monkeypatch):
    """Implementations checked on a reduced instance of one case share one float64 reference."""
    import argparse

    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import peers, run

    calls = []
    reference_grads = run.reference_grads
    monkeypatch.setattr(run, "reference_grads", lambda *a, **k: calls.append(1) or reference_grads(*a, **k))
    impls = {n: peers.implementations(torch.device("cpu"))[n] for n in ("naive", "ours[torch,recompute]",
                                                                         "ours[torch,group]")}
    monkeypatch.setattr(peers, "implementations", lambda device: impls)
    case = peers.Case("t", B=4, K=2, T=16, H=8, V=40)
    args = argparse.Namespace(only=None, skip=None, reps=1, warmup=0, err_flops=case.reference_flops / 3)
    rows = run.run_case(case, torch.device("cpu"), peers.Options(compile_peers=False), args)
    assert len(rows) == 3 and all(r["err_on"] and r["grad_err"] < 1e-5 for r in rows), rows
    assert len(calls) == 1
