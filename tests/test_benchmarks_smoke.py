"""Smoke test of the benchmark harness: tiny shapes, every implementation, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
