"""Smoke test of the benchmark harness: tiny shapes, every implementation, no timing assertions."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
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

    from benchmarks import run

    assert run.failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried"))["status"] == "oom"
    assert run.failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))["status"] == "oom"
    long = run.failure(ValueError("x" * 1000))
    assert long["status"] == "error" and long["reason"] == ("ValueError: " + "x" * 1000)[:300]


def test_run_case_drops_a_step_that_fails_while_timed(monkeypatch):
    import argparse

    import torch

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


# --- the harness's arithmetic, on stand-ins (no timing of real kernels) ----------------------------


def test_grad_error_is_the_largest_absolute_error_relative_to_each_reference():
    """grad_err is max(dh_err, dw_err), each max |g - g64| / max |g64| (errors of either sign)."""
    import torch

    from benchmarks import run
    f64 = torch.float64
    rdh, rdw = torch.tensor([[1.0, -4.0]], dtype=f64), torch.tensor([[2.0, 0.5]], dtype=f64)
    dh = (rdh + torch.tensor([[0.0, -0.4]], dtype=f64)).float()  # a negative error: 0.4 / 4
    dw = (rdw + torch.tensor([[0.3, 0.0]], dtype=f64)).float()  # 0.3 / 2, the larger one
    err = run.grad_error((torch.tensor(1.5), dh, dw), (torch.tensor(1.0, dtype=f64), rdh, rdw))
    assert err["dh_err"] == pytest.approx(0.1, rel=1e-6) and err["dw_err"] == pytest.approx(0.15, rel=1e-6)
    assert err["grad_err"] == err["dw_err"] and err["loss_err"] == pytest.approx(0.5)
    missing = run.grad_error((torch.tensor(1.0), None, dw), (torch.tensor(1.0, dtype=f64), rdh, rdw))
    assert missing["grad_err"] == float("inf")


def test_time_interleaved_warms_up_and_syncs_around_each_step(monkeypatch):
    """``warmup`` untimed rounds run before the timed ones, each step timed between two device syncs;
    the output kept is the last round's."""
    import torch

    from benchmarks import run
    events, count = [], []
    monkeypatch.setattr(run, "sync", lambda device: events.append("sync"))

    def step():
        count.append(1)
        events.append("step")
        return len(count)

    times, last = run.time_interleaved({"a": step}, torch.device("cpu"), 2, 1)
    assert len(count) == 3 and len(times["a"]) == 2 and last == {"a": 3}
    assert events == ["sync", "step", "sync"] * 3


def _run_case(monkeypatch, impls, case, fake_times=None, reps=3):
    """run.run_case over ``impls`` on CPU, with the timed rounds replaced by ``fake_times``."""
    import torch

    from benchmarks import peers, run
    if fake_times is not None:
        real = run.time_interleaved

        def timed(steps, device, reps, warmup, failed=None):
            times, last = real(steps, device, reps, warmup, failed)
            return {n: list(fake_times[n]) for n in times}, last

        monkeypatch.setattr(run, "time_interleaved", timed)
    monkeypatch.setattr(peers, "implementations", lambda device: impls)
    args = argparse.Namespace(only=None, skip=None, reps=reps, warmup=0, err_flops=1e12)
    rows = run.run_case(case, torch.device("cpu"), peers.Options(compile_peers=False), args)
    return {r["impl"]: r for r in rows}


def test_run_case_reports_the_median_and_the_ratios(monkeypatch):
    """median_ms is the median of the timed rounds; time_vs_naive and time_vs_matmuls divide by the
    medians of naive and of the three matmuls, peak_vs_naive by naive's peak."""
    from benchmarks import peers
    fake = {"naive": [4.0, 1.0, 31.0], "ours[torch,recompute]": [2.0, 3.0, 1.0], "three_matmuls": [1.0, 0.5, 10.0]}
    impls = {"naive": peers.naive, "ours[torch,recompute]": peers.ours("torch", True)}
    rows = _run_case(monkeypatch, impls, peers.Case("t", B=1, K=2, T=8, H=8, V=32, floor=True), fake)
    naive, ours, floor = rows["naive"], rows["ours[torch,recompute]"], rows["three_matmuls"]
    assert (naive["median_ms"], ours["median_ms"], floor["median_ms"]) == (4.0, 2.0, 1.0)
    assert naive["times_ms"] == fake["naive"]
    assert ours["time_vs_naive"] == 0.5 and ours["time_vs_matmuls"] == 2.0 and naive["time_vs_matmuls"] == 4.0
    assert floor["time_vs_naive"] == 0.25 and naive["time_vs_naive"] == 1.0
    assert ours["peak_vs_naive"] == ours["peak_bytes"] / naive["peak_bytes"] != 1.0
    assert ours["grad_err"] < 1e-4


def test_run_case_records_an_adapter_that_raises(monkeypatch):
    from benchmarks import peers

    def broken(problem, device, opts):
        raise RuntimeError("no kernel for this shape")

    rows = _run_case(monkeypatch, {"naive": peers.naive, "broken": broken},
                     peers.Case("t", B=1, K=2, T=8, H=8, V=32), reps=1)
    assert rows["broken"]["status"] == "error" and rows["broken"]["reason"] == "RuntimeError: no kernel for this shape"
    assert rows["naive"]["status"] == "ok"


def test_check_error_uses_the_problem_the_adapter_solves():
    """An adapter that solves a variant of the problem (Liger's layout) is checked against that."""
    import torch

    from benchmarks import peers, run
    cpu, opts = torch.device("cpu"), peers.Options(compile_peers=False)
    case = peers.Case("t", B=1, K=2, T=8, H=8, V=32)
    given, variant = peers.make_problem(case, cpu, seed=0), peers.make_problem(case, cpu, seed=1)
    prep = peers.naive(variant, cpu, opts)
    prep.solves = variant
    err = run.check_error(peers.naive, prep, given, case, cpu, opts, run.References(cpu), err_flops=1e12)
    assert err["grad_err"] < 1e-5, err


def test_main_settings_cases_and_json_fields(monkeypatch):
    import torch

    from benchmarks import run
    seen = []
    monkeypatch.setattr(run, "run_case", lambda case, device, opts, args: seen.append((case.name, case.V)) or [])
    run.main(["--device", "cpu", "--headline", "--vocab", "128256", "128257"])
    run.main(["--device", "cpu", "--foundation", "--vocab", "31999"])
    assert seen == [("headline", 128256), ("headline", 128257), ("foundation", 31999)]
    seen.clear()
    monkeypatch.setattr(run, "run_case", lambda case, device, opts, args: seen.append((case.name, case.logits)) or [])
    smoke = run.main(["--device", "cpu", "--smoke", "--cases", "no-such-case"])
    assert (smoke["settings"]["reps"], smoke["settings"]["warmup"]) == (1, 0)
    result = run.main(["--device", "cpu", "--quick", "--cases", "foundation", "tokens", "--logits", "peaked"])
    assert seen == [("foundation", "peaked")] + [("tokens", "peaked")] * 3
    assert result["device"] == run.device_name(torch.device("cpu")) and "CPUs" in result["device"]
    assert {"torch", "triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers"} <= set(result["versions"])
    assert result["versions"]["triton"] and result["date"][:2] == "20"


def test_cases_past_the_time_budget_are_recorded_as_skipped(monkeypatch):
    import time

    from benchmarks import run
    ran = []

    def slow_case(case, device, opts, args):
        ran.append(case.name)
        time.sleep(0.2)
        return []

    monkeypatch.setattr(run, "run_case", slow_case)
    result = run.main(["--device", "cpu", "--quick", "--time-budget", "0.1"])
    skipped = [r for r in result["rows"] if r["status"] == "skip"]
    assert len(ran) + len(skipped) == 4 and len(skipped) >= 3, (ran, skipped)
    assert all(r["reason"] == "time budget" and r["impl"] == "*" for r in skipped)


def test_fit_search_runs_once_after_the_headline_case(monkeypatch):
    """On CUDA (stand-ins here), after the headline case's rows, and once with several ``--vocab``."""
    import torch

    from benchmarks import run
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run, "device_name", lambda device: "a stand-in GPU")
    monkeypatch.setattr(run, "run_case", lambda case, device, opts, args: calls.append(("case", case.V)) or [])
    monkeypatch.setattr(run, "fits_search", lambda *a: calls.append(("fits",)) or [{"impl": "x", "fits_tokens": 1}])
    result = run.main(["--device", "cuda", "--headline", "--vocab", "128256", "128257"])
    assert calls == [("case", 128256), ("fits",), ("case", 128257)] and result["fits"][0]["impl"] == "x"
    calls.clear()
    run.main(["--device", "cuda", "--headline", "--no-fit"])
    assert calls == [("case", 128256)]


def test_fits_search_doubles_up_to_the_largest_that_runs(monkeypatch):
    """The GPU fit search on stand-ins that run out of memory past a token count."""
    import torch

    from benchmarks import peers, run
    monkeypatch.setattr(run, "pair_case", lambda name, n, T, H, V, dtype: peers.Case(name, B=n, K=2, T=2, H=2, V=4))

    def fits_up_to(limit):
        def adapter(problem, device, opts):
            tokens = problem.hidden.shape[0] // 2

            def step():
                if tokens > limit:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
            return peers.Prepared(step)
        return adapter

    def broken(problem, device, opts):
        raise ValueError("bad shape")

    impls = {"small": fits_up_to(4), "big": fits_up_to(1 << 30), "none": fits_up_to(0),
             "skip": lambda p, d, o: "needs a GPU", "broken": broken}
    monkeypatch.setattr(peers, "implementations", lambda device: impls)
    args = argparse.Namespace(only=None, skip=None, fit_start=1, fit_max=8)
    out = {f["impl"]: f for f in run.fits_search(torch.device("cpu"), peers.Options(), args, float("inf"))}
    assert (out["small"]["fits_tokens"], out["small"]["first_oom_tokens"]) == (4, 8)
    assert (out["big"]["fits_tokens"], out["big"]["first_oom_tokens"]) == (8, None)
    assert "fits the largest tried (8 tokens)" in out["big"]["note"]
    assert (out["none"]["fits_tokens"], out["none"]["first_oom_tokens"]) == (None, 1)
    assert out["skip"]["status"] == "skip" and out["skip"]["reason"] == "needs a GPU"
    assert out["broken"]["status"] == "error" and out["broken"]["reason"] == "ValueError: bad shape"
    assert out["broken"]["first_oom_tokens"] is None


def test_foundation_targets_pass_only_when_both_are_met():
    from benchmarks import run

    def row(name, impl, peak, time, v=32000):
        return {"name": name, "impl": impl, "status": "ok", "peak_vs_naive": peak, "time_vs_matmuls": time, "V": v}

    out = run.foundation_summary([row("foundation", "ours[torch,recompute]", 0.04, 2.0),
                                  row("foundation", "ours[torch,group]", 0.15, 1.1),
                                  row("tokens", "ours[torch,recompute]", 0.01, 1.0),
                                  row("foundation", "ours[torch,group]", 0.5, 9.0, v=32001)])  # --vocab
    assert out["ours[torch,recompute]"]["pass"] is False and out["ours[torch,group]"]["pass"] is True
    assert out["ours[torch,recompute]"]["peak_vs_naive"] == 0.04
    unjudged = run.foundation_summary([row("foundation", "ours[torch,group]", None, 1.0)])  # naive left out
    assert unjudged["ours[torch,group]"]["pass"] is None


def test_select_only_and_skip():
    from benchmarks import run
    impls = {"naive": 0, "ours[torch,recompute]": 1, "ours[torch,group]": 2, "ours[triton,recompute]": 3}
    assert list(run.select(impls, None, ["group"])) == ["naive", "ours[torch,recompute]", "ours[triton,recompute]"]
    assert list(run.select(impls, ["ours[torch"], ["group"])) == ["ours[torch,recompute]"]
    assert list(run.select(impls, ["naive", "triton"])) == ["naive", "ours[triton,recompute]"]


def test_tile_sweep_rows_chunks_extra_memory_and_ratio(monkeypatch):
    """On the torch backend: a tile as tall as the token count is kept, chunks round up, extra memory
    leaves out the gradients, time_vs_matmuls is the row's time over the three matmuls'."""
    from benchmarks import run, tile_sweep
    grads = (2 * 64 * 32 + 300 * 32) * 2  # dH and dW, bf16 (the headline dtype)
    monkeypatch.setattr(run, "measure_peak", lambda prepared, device: grads + (1 << 20))
    monkeypatch.setattr(run, "time_interleaved",
                        lambda steps, device, reps, warmup: ({n: [2.0 if n == "floor" else 3.0] for n in steps}, {}))
    result = tile_sweep.main(["--device", "cpu", "--case", "1,2,64,32,300", "--rows", "24", "64", "128",
                              "--cols", "512", "--backends", "torch"])
    rows = result["rows"]
    assert [(r["rows"], r["cols"], r["chunks"]) for r in rows] == [(24, 300, 3), (64, 300, 1)]
    assert all(r["extra_mib"] == 1.0 and r["time_vs_matmuls"] == 1.5 and r["grad_err"] < 2e-2 for r in rows), rows
    assert result["three_matmuls_ms"] == 2.0
    assert result["model"]["matmul_flops"] == 6 * 64 * 32 * 300 / 2e-3  # the matmuls' rate in this run
    assert all(0 < r["model_ms"][0] < r["model_ms"][1] for r in rows)


def test_tile_model_bounds(monkeypatch):
    """The roofline model of the recompute schedule: with free memory traffic both bounds are the four
    matmuls (4/3 of the three); with free FLOPs both are the bytes each pass moves; the serial bound
    adds the two, the overlapped one takes the larger per op."""
    import math

    from benchmarks import peers, tile_sweep
    from nca_kernels import config

    monkeypatch.setattr(tile_sweep, "wide_addmm", lambda device, dtype: True)
    case = peers.Case("c", B=1, K=2, T=64, H=32, V=300, dtype="bf16")  # 64 response tokens
    n, h, v = case.tokens, case.H, case.V
    flops = 2 * n * h * v
    lo, hi = tile_sweep.model_ms(16, 128, case, "cuda", flops, math.inf)  # 4 chunks x 3 vocabulary tiles
    assert lo == hi == pytest.approx(4e3)
    # bf16 bytes: the hidden rows read 3 times a tile (two logits matmuls, dW), the weight 5 times a
    # token chunk (two logits matmuls, dH, dW's read and write), the logits 7 times (written twice, the
    # forward pass, the gradient pass's read and write, dH, dW); the float32 dH read and written a tile
    tiles, chunks = 3, 4
    moved = 2 * (3 * n * h * tiles + 5 * v * h * chunks + 7 * n * v) + 2 * 4 * n * h * tiles
    lo, hi = tile_sweep.model_ms(16, 128, case, "cuda", math.inf, 1e3)
    assert lo == hi == pytest.approx(moved)
    lo, hi = tile_sweep.model_ms(16, 128, case, "cuda", flops, 1e3)
    assert hi == pytest.approx(moved + 4e3) and moved < lo < hi
    with config.weight_grad_accumulation("float32"):  # a float32 dW moves twice the bytes
        assert tile_sweep.model_ms(16, 128, case, "cuda", math.inf, 1e3)[0] == pytest.approx(moved + 4 * v * h * chunks)
    monkeypatch.setattr(tile_sweep, "wide_addmm", lambda device, dtype: False)  # a bf16 dH product, written and read
    assert tile_sweep.model_ms(16, 128, case, "cuda", math.inf, 1e3)[0] == pytest.approx(moved + 4 * n * h * tiles)


def test_cuda_peak_is_measured_above_the_bytes_already_allocated(monkeypatch):
    """The CUDA branch of the meter, on a fake allocator: an earlier peak is reset, the inputs left out."""
    import torch

    from benchmarks import memory
    state = {"allocated": 1000, "peak": 5000}  # an earlier call peaked at 5000 bytes

    def reset(device=None):
        state["peak"] = state["allocated"]

    def fn():
        state["peak"] = max(state["peak"], state["allocated"] + 300)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    assert memory.peak_bytes(fn, torch.device("cuda")) == 300


def test_storage_peak_counts_a_storage_once():
    """Two outputs viewing one new storage count its bytes once."""
    import torch

    from benchmarks.memory import StoragePeak

    def two_views(x):
        out = torch.empty(1024)  # 4 KiB, made inside the mode
        return out[:512], out[512:]

    x = torch.zeros(1)  # made before: not counted
    with StoragePeak() as mode:
        a, b = mode.__torch_dispatch__(two_views, (), (x,))
        assert a.untyped_storage()._cdata == b.untyped_storage()._cdata
    assert mode.peak == 4096, mode.peak


def test_accumulation_errors_and_chunk_counts(tmp_path):
    import torch

    from benchmarks import accumulation
    f64 = torch.float64
    r = torch.tensor([[3.0, -4.0]], dtype=f64)
    err = accumulation.errors((r - torch.tensor([[0.0, 0.5]], dtype=f64), r), (r, r))  # dH off by -0.5
    assert err["dh_max"] == pytest.approx(0.5 / 4) and err["dh_rms"] == pytest.approx(0.5 / 5)
    assert err["dw_max"] == 0 and err["dw_rms"] == 0
    out = tmp_path / "acc.json"
    accumulation.main(["--n", "256", "--h", "32", "--v", "64", "--chunks", "3", "8", "--seeds", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["chunks"]) for r in rows] == [("naive", 1)] + [
        (f"rowchunk[{m}]", c) for c in (3, 8) for m in ("weight", "float32")]
    assert [r["tile"][0] for r in rows[1:]] == [86, 86, 32, 32]  # ceil(256 / 3) token rows per chunk
    assert all(0 < r[k] < 2e-2 for r in rows for k in ("dh_max", "dh_rms", "dw_max", "dw_rms")), rows


def test_peer_token_logps_feed_our_loss_like_the_naive_loss():
    """The per-token log-probs of TRL and CCE summed per sequence and fed to our loss with ref_logps."""
    import torch

    from benchmarks import peers
    from nca_kernels import reference
    p = peers.make_problem(peers.Case("t", B=2, K=2, T=8, H=8, V=32), torch.device("cpu"))
    masks = []

    def token_logps(mask):
        masks.append(mask)
        lp = torch.log_softmax((p.hidden @ p.weight.t()).float(), -1)
        return lp.gather(-1, p.labels.clamp(min=0)[..., None]).squeeze(-1) * mask

    got = peers._with_our_loss(p, token_logps)()
    want = reference.fused_nca_loss(p.hidden, p.weight, p.labels, p.rewards, p.ref_logps, **p.loss_kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(masks[0], p.labels != peers.IGNORE)


def test_problem_labels_and_the_matmul_floor_cover_the_response_tokens():
    import torch

    from benchmarks import peers
    case = peers.Case("t", B=1, K=2, T=10, H=8, V=32)
    p = peers.make_problem(case, torch.device("cpu"))
    assert (p.labels[:, : case.prompt_len] == peers.IGNORE).all() and (p.labels[:, case.prompt_len:] >= 0).all()
    assert int((p.labels != peers.IGNORE).sum()) == case.tokens == 10
    floor = peers.three_matmuls(p, torch.device("cpu"), peers.Options())
    loss, dh, dw = floor.step()
    assert loss is None and not floor.has_grads and dh.shape == (case.tokens, case.H) and dw.shape == (case.V, case.H)


def _gpu_run_commands(script: str):
    """The ``(program, argv)`` of every benchmark command in benchmarks/gpu_run.sh: continuation lines
    joined, ``&&`` chains split, argv cut at the first shell operator, shell variables left as they are."""
    text = re.sub(r"\\\n\s*", " ", script).replace('"${bench[@]}"', "python3 benchmarks/run.py --device cuda")
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["python3"] and words[1:2] in (["benchmarks/run.py"], ["benchmarks/tile_sweep.py"]):
                ends = [i for i, w in enumerate(words) if w in (";;", ";", "|", "||") or w.startswith((">", "2>"))]
                yield words[1], words[2:min(ends, default=len(words))]


def test_gpu_run_script_passes_options_the_scripts_take():
    """benchmarks/gpu_run.sh, the next GPU run, is valid bash, has a branch for each of its default steps,
    and every benchmark command in it parses with that script's own options (an unknown flag exits);
    each ``--only``/``--skip`` name selects an implementation the GPU harness has. A mistake here would
    otherwise show only on a GPU machine."""
    import torch

    from benchmarks import peers, run, tile_sweep

    path = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
    subprocess.run(["bash", "-n", path], check=True)
    with open(path) as f:
        script = f.read()
    steps = re.search(r"steps=\((tests[^)]*)\)", script).group(1).split()
    assert steps and all(re.search(rf"^ *(\w+ \| )*{s}( \| \w+)*\)", script, re.M) for s in steps), steps
    names = [*peers.implementations(torch.device("cuda")), "three_matmuls"]
    parsers = {"benchmarks/run.py": run.parser(), "benchmarks/tile_sweep.py": tile_sweep.parser()}
    commands = list(_gpu_run_commands(script))
    assert sorted({p for p, _ in commands}) == sorted(parsers) and len(commands) >= 5
    for program, abbreviated in [("benchmarks/run.py", "--headl"), ("benchmarks/tile_sweep.py", "--prof")]:
        with pytest.raises(SystemExit):  # flags spelt whole: argparse would take these for --headline, --profile
            parsers[program].parse_args([abbreviated])
    for program, argv in commands:
        args = parsers[program].parse_args(argv)
        for name in (getattr(args, "only", None) or []) + (getattr(args, "skip", None) or []):
            assert any(name in impl for impl in names), (program, name)


# --- the peer adapters' wiring, on plain-PyTorch stand-ins for the peers (not installed here) -----

#: Error bound for the adapters that feed per-token log-probs to our loss: their per-sequence sums are
#: taken in float32 (the peers' own precision), so float64 inputs give float32 rounding, not float64's.
F32_SUM_ERR = 1e-6


def _target_logps(hidden, weight, targets):
    """log_softmax(hidden @ weight^T) at each target (index 0 where ignored), in the inputs' dtype."""
    import torch
    return torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)


def _install_peers(monkeypatch, wrong=False):
    """Installs stand-ins for Liger's nca_pair DPO loss, TRL's ChunkedLogProbFunction and CCE's
    linear_cross_entropy as their modules, each computing what the library documents (in the inputs'
    dtype: the libraries accumulate in float32, float64 here leaves only wiring errors above rounding);
    ``wrong`` makes each deliberately wrong (chosen and rejected swapped, targets one row off, the
    loss's sign flipped). Returns the list their calls' arguments are logged to."""
    import types

    import torch
    import torch.nn.functional as F
    calls = []

    class LigerFusedLinearDPOLoss(torch.nn.Module):
        """Liger's nca_pair without a reference model: per-sequence sums of token log-probs (targets
        at their own position, no shift), chosen = first half of the batch, rewards = beta * logp,
        loss = mean over pairs of -logsigmoid(r_c) - 0.5 logsigmoid(-r_c) - 0.5 logsigmoid(-r_r)."""

        def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True,
                     use_ref_model=False, loss_type="sigmoid", average_log_prob=False):
            super().__init__()
            # average_log_prob=False (sums) is assumed to be the default of the installed version
            self.kw = dict(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                           compiled=compiled, use_ref_model=use_ref_model, loss_type=loss_type,
                           average_log_prob=average_log_prob)
            calls.append(("liger", self.kw))

        def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
            kw = self.kw
            if kw["loss_type"] != "nca_pair" or kw["use_ref_model"] or kw["compute_nll_loss"] or bias is not None:
                raise NotImplementedError(f"stand-in has no {kw}")
            mask = target != kw["ignore_index"]
            logps = torch.where(mask, _target_logps(_input, lin_weight, target), 0.0).sum(-1)
            if kw["average_log_prob"]:
                logps = logps / mask.sum(-1)
            n = target.shape[0] // 2
            chosen, rejected = (logps[n:], logps[:n]) if wrong else (logps[:n], logps[n:])
            rc, rr = kw["beta"] * chosen, kw["beta"] * rejected
            losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
            return losses.sum() / n, (chosen, rejected, rc, rr)

    class ChunkedLogProbFunction:
        """TRL's per-row log-probs of ``targets`` under ``hidden @ weight^T (+ bias)``, scaled, soft-capped
        and divided by the temperature; returns (logprobs, entropy). What the ninth argument the
        adapter passes means is not known here: it is taken and ignored."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                  logit_scale=1.0, *rest):
            calls.append(("trl", dict(rows=hidden.shape, bias=bias, temperature=temperature, chunk_size=chunk_size,
                                      softcap=final_logit_softcapping, logit_scale=logit_scale)))
            logits = (hidden @ weight.t() + (0 if bias is None else bias)) * logit_scale
            if final_logit_softcapping is not None:
                logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
            log_p = torch.log_softmax(logits / temperature, -1)
            rows = targets.roll(1) if wrong else targets
            return log_p.gather(-1, rows[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    def linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0,
                             filter_eps="auto", impl="cce", **opts):
        """CCE: F.cross_entropy((e @ c^T).float(), targets) per position, no shift by default; with
        reduction "none" an ignored position is assumed to give 0, as F.cross_entropy's does."""
        calls.append(("cce", dict(ignore_index=ignore_index, reduction=reduction, shift=shift, filter_eps=filter_eps,
                                  impl=impl)))
        if impl not in ("cce", "cce_exact", "torch_compile") or shift or softcap is not None or bias is not None:
            raise NotImplementedError(f"stand-in has no impl={impl!r} shift={shift} softcap/bias")
        mask = targets != ignore_index
        loss = torch.where(mask, _target_logps(e, c, targets) * (1 if wrong else -1), 0.0)
        return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / mask.sum()}[reduction]

    modules = {"liger_kernel.chunked_loss": {"LigerFusedLinearDPOLoss": LigerFusedLinearDPOLoss},
               "trl.kernels": {"ChunkedLogProbFunction": ChunkedLogProbFunction}, "trl.trainer.utils": {},
               "cut_cross_entropy": {"linear_cross_entropy": linear_cross_entropy}}
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, **attrs))
    return calls


def _peer_grad_error(adapter, B, K, rewards=None, device="cpu", compile_peers=False):
    """An adapter's Prepared step on a float64 problem (some response tokens ignored too, so the
    response mask is ragged), through the harness's error check against the float64 reference."""
    import torch

    from benchmarks import peers, run
    cpu = torch.device("cpu")
    case = peers.Case("t", B=B, K=K, T=8, H=8, V=32, dtype="fp64")
    problem = peers.make_problem(case, cpu)
    problem.labels[::2, -2] = peers.IGNORE
    if rewards is not None:
        problem.rewards = torch.tensor(rewards)
    opts = peers.Options(compile_peers=compile_peers)
    prepared = adapter(problem, torch.device(device), opts)
    assert not isinstance(prepared, str), prepared
    err = run.check_error(adapter, prepared, problem, case, cpu, opts, run.References(cpu), err_flops=1e12)
    return err, prepared, problem


@pytest.mark.parametrize("rewards", [[[0.2, 0.7], [0.5, -1.0]], [[0.3, 0.9, 0.5, -0.2]]], ids=["K=2", "K=4"])
def test_liger_adapter_pairs_and_restores_the_layout(monkeypatch, rewards):
    """The Liger adapter puts chosen sequences first (chosen second or first within each pair), maps
    the gradient back, and is checked against the problem it solves: pairs, ref_logps = 0, alpha 0,
    "nca_pair", with the beta it gave Liger (one that keeps beta * logp O(1))."""
    import math

    import torch

    from benchmarks import peers
    calls = _install_peers(monkeypatch)
    B, K = len(rewards), len(rewards[0])
    err, prepared, problem = _peer_grad_error(peers.liger, B, K, rewards)
    assert err["grad_err"] < 1e-10 and err["loss_err"] < 1e-12, err
    solves, S = prepared.solves, B * K
    assert (solves.loss_type, solves.alpha) == ("nca_pair", 0.0)
    assert solves.hidden is problem.hidden and solves.labels is problem.labels  # its reference: the given tokens
    assert torch.equal(solves.rewards, problem.rewards.reshape(S // 2, 2)) and not solves.ref_logps.any()
    tokens = float((problem.labels != peers.IGNORE).sum()) / S
    assert solves.beta == pytest.approx(1 / (tokens * math.log(32)), rel=1e-12)
    assert [kw for name, kw in calls] == [dict(ignore_index=peers.IGNORE, beta=solves.beta, compute_nll_loss=False,
                                               compiled=False, use_ref_model=False, loss_type="nca_pair",
                                               average_log_prob=False)]
    assert ("regrouped" in prepared.note) == (K != 2)
    odd = peers.make_problem(peers.Case("t", B=1, K=3, T=8, H=8, V=32), torch.device("cpu"))
    assert "even number" in peers.liger(odd, torch.device("cpu"), peers.Options())


def test_trl_adapter_gathers_response_rows_and_scatters_them_back(monkeypatch):
    """TRL's function gets the response rows only (hidden and labels gathered by one mask), at
    temperature 1 with no bias, scale or soft cap, and its log-probs land back at their (S, T) places."""
    from benchmarks import peers
    calls = _install_peers(monkeypatch)
    err, prepared, problem = _peer_grad_error(peers.trl, 2, 2)
    assert err["grad_err"] < F32_SUM_ERR and err["loss_err"] < F32_SUM_ERR, err
    n = int((problem.labels != peers.IGNORE).sum())
    assert calls == [("trl", dict(rows=(n, 8), bias=None, temperature=1.0, chunk_size=32768, softcap=None,
                                  logit_scale=1.0))]


def test_cce_adapter_negates_per_token_losses_and_passes_impl(monkeypatch):
    """CCE's per-token losses (reduction "none") are negated into log-probs; ``impl`` and ``filter_eps``
    reach CCE, its Triton kernel is refused off CUDA, and only the compiled path with compilation on
    is marked compiled."""
    import torch

    from benchmarks import peers
    calls = _install_peers(monkeypatch)
    for impl, eps, device, compile_peers in (("torch_compile", "high", "cpu", False), ("cce", None, "cuda", False),
                                             ("torch_compile", "high", "cpu", True)):
        calls.clear()
        err, prepared, _ = _peer_grad_error(peers.cce(impl, eps), 1, 2, device=device, compile_peers=compile_peers)
        assert err["grad_err"] < F32_SUM_ERR and err["loss_err"] < F32_SUM_ERR, err
        assert calls == [("cce", dict(ignore_index=peers.IGNORE, reduction="none", shift=0, filter_eps=eps,
                                      impl=impl))]
        assert prepared.compiled == (impl == "torch_compile" and compile_peers)
        assert ("filter_eps" in prepared.note) == (impl == "cce")
    p = peers.make_problem(peers.Case("t", B=1, K=2, T=8, H=8, V=32), torch.device("cpu"))
    assert "CUDA" in peers.cce("cce")(p, torch.device("cpu"), peers.Options())


@pytest.mark.parametrize("adapter", ["liger", "trl", "cce"])
def test_peer_error_check_fails_on_a_wrong_stand_in(monkeypatch, adapter):
    """The same check on stand-ins that are deliberately wrong (Liger's chosen and rejected swapped,
    TRL's targets one row off, CCE's loss not negated): a large gradient error, so the checks above can fail."""
    from benchmarks import peers
    _install_peers(monkeypatch, wrong=True)
    fn = {"liger": peers.liger, "trl": peers.trl, "cce": peers.cce("torch_compile")}[adapter]
    err, _, _ = _peer_grad_error(fn, 2, 2, [[0.2, 0.7], [0.5, -1.0]])
    assert err["grad_err"] > 1e-2, err
