"""Triton backend at the headline config (GPU): correctness, time against the three cuBLAS
matmuls, peak extra memory, the deterministic schedule and gradient filtering.

    python -m benchmarks.triton_tune OUT.json [--b 4 --k 4 --t 1024 --h 4096 --v 128256]

Measures, side by side in one run, for ``sequence_logprobs(..., backend="triton")`` forward +
backward in bf16 (first half of every sequence prompt):

- the error of log-probs and gradients against the chunked torch backend (float32 accumulation);
- median times (``triton.testing.do_bench``) of forward, forward+backward, and of the three matmuls
  ``logits = h @ W.T``, ``dH = dl @ W``, ``dW = dl.T @ h`` over the response rows (the floor);
- peak memory beyond the inputs and their gradients;
- the autotuner's pick for every kernel;
- with ``filter_eps = 2**-12`` on trained-looking logits (:func:`benchmarks.peers.peaked`): time and error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import triton
from triton.testing import do_bench

from benchmarks.peers import peaked
from nca_kernels import chunk_bytes, config, sequence_logprobs

IGNORE = -100


def batch(b, k, t, h, v, dtype, seed=0):
    """Random bf16 batch: hidden ``(b*k, t, h)``, weight ``(v, h)`` with O(1) logits, labels."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(b * k, t, h, generator=g, device="cuda", dtype=dtype)
    weight = torch.randn(v, h, generator=g, device="cuda", dtype=dtype) / h**0.5
    labels = torch.randint(0, v, (b * k, t), generator=g, device="cuda")
    labels[:, : t // 2] = IGNORE
    return hidden, weight, labels


def tail_mass(hidden, weight, labels, eps, rows=64):
    """Mean softmax mass on entries below ``eps`` over the first ``rows`` response tokens."""
    h = hidden.reshape(-1, hidden.shape[-1])[(labels != IGNORE).reshape(-1)][:rows]
    p = torch.softmax(h.float() @ weight.float().t(), dim=-1)
    return (p * (p < eps)).sum(-1).mean().item()


def fwd_bwd(hidden, weight, labels, grad, backend="triton"):
    """Log-probs and (dhidden, dweight) of ``sum(grad * logps)``."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out = sequence_logprobs(h, w, labels, backend=backend)
    dh, dw = torch.autograd.grad(out, (h, w), grad)
    return out.detach(), dh, dw


def rel(a, b):
    """``|a - b| / |b|`` in the Frobenius norm, float32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def errors(got, want):
    return {"logps_max_abs": (got[0] - want[0]).abs().max().item(),
            "dhidden_rel": rel(got[1], want[1]), "dweight_rel": rel(got[2], want[2])}


def ms(fn):
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def matmul_floor(hidden, weight, labels):
    """Times of the three cuBLAS matmuls the response rows need, and of the logits one alone."""
    rows = hidden.detach().reshape(-1, hidden.shape[-1])[(labels != IGNORE).reshape(-1)]
    dl = torch.randn(rows.shape[0], weight.shape[0], device=rows.device, dtype=rows.dtype)
    return {"three_matmuls": ms(lambda: (rows @ weight.t(), dl @ weight, dl.t() @ rows)),
            "matmul_logits": ms(lambda: rows @ weight.t())}


def peak_extra_mib(fn, grads_bytes):
    """Peak bytes allocated by ``fn`` beyond what existed before and the gradients it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - grads_bytes
    del result
    return extra / 2**20


def backward_parts(hidden, weight, labels):
    """Times of the backward kernels alone: recompute only (db), + dH, + dW, + both."""
    from nca_kernels.backends import triton as be

    h2d = hidden.detach().reshape(-1, hidden.shape[-1])
    index = (labels != IGNORE).reshape(-1).nonzero().squeeze(1)
    targets = labels.reshape(-1)[index]
    lse, _ = be.linear_forward(h2d, weight.detach(), None, index, targets)
    g = torch.randn_like(lse) / 100
    parts = {"recompute_only": (False, False, True), "dh": (True, False, False), "dw": (False, True, False),
             "dh_dw": (True, True, False)}
    return {name: ms(lambda needs=needs: be.linear_backward(h2d, weight.detach(), None, index, targets, lse, g, needs))
            for name, needs in parts.items()}


def best_configs():
    """The autotuner's pick per kernel and key (for the backward, the key ends with the schedule), and
    the per-config timings of the last key it tuned."""
    from nca_kernels.backends.triton.linear_backward import linear_backward_kernel
    from nca_kernels.backends.triton.linear_forward import linear_forward_kernel

    return {k.fn.__name__: {"best": {str(key): str(cfg) for key, cfg in k.cache.items()},
                            "ms": {str(c): _first(t) for c, t in (getattr(k, "configs_timings", None) or {}).items()}}
            for k in (linear_forward_kernel, linear_backward_kernel)}


def _first(timing):
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    for name, default in (("b", 4), ("k", 4), ("t", 1024), ("h", 4096), ("v", 128256)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    dtype = torch.bfloat16
    hidden, weight, labels = batch(args.b, args.k, args.t, args.h, args.v, dtype)
    grad = torch.randn(hidden.shape[0], device="cuda") / 100
    n = int((labels != IGNORE).sum())
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "config": {"B": args.b, "K": args.k, "T": args.t, "H": args.h, "V": args.v, "dtype": "bf16",
                   "response_tokens": n},
    }

    with chunk_bytes(tile=1 << 28):
        reference = fwd_bwd(hidden, weight, labels, grad, backend="torch")
    result["error_vs_torch_backend"] = errors(fwd_bwd(hidden, weight, labels, grad), reference)
    with config.triton_options(deterministic=True):
        det = fwd_bwd(hidden, weight, labels, grad)
        again = fwd_bwd(hidden, weight, labels, grad)
        result["deterministic_error_vs_torch_backend"] = errors(det, reference)
        result["deterministic_grads_bitwise_repeatable"] = all(torch.equal(a, b) for a, b in zip(det[1:], again[1:]))
    del det, again, reference

    times = matmul_floor(hidden, weight, labels)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    times["forward"] = ms(lambda: sequence_logprobs(h, w, labels, backend="triton"))

    def step():
        return torch.autograd.grad(sequence_logprobs(h, w, labels, backend="triton"), (h, w), grad)

    times["forward_backward"] = ms(step)
    grads_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    result["peak_extra_mib"] = peak_extra_mib(step, grads_bytes)
    with config.triton_options(deterministic=True):
        step()
        times["forward_backward_deterministic"] = ms(step)
        result["peak_extra_mib_deterministic"] = peak_extra_mib(step, grads_bytes)
    times["backward_parts"] = backward_parts(h, w, labels)
    times["ratio_to_three_matmuls"] = times["forward_backward"] / times["three_matmuls"]
    times["ratio_deterministic_to_three_matmuls"] = times["forward_backward_deterministic"] / times["three_matmuls"]
    result["times_ms"] = times
    result["autotuned"] = best_configs()

    ph, pw = peaked(hidden, weight, labels)
    exact = fwd_bwd(ph, pw, labels, grad)
    eps = 2**-12
    filt = {"logits": " ".join(peaked.__doc__.split()), "eps": eps,
            "tail_mass_below_eps": tail_mass(ph, pw, labels, eps)}
    hp, wp = ph.detach().requires_grad_(), pw.detach().requires_grad_()

    def peaked_step():
        return torch.autograd.grad(sequence_logprobs(hp, wp, labels, backend="triton"), (hp, wp), grad)

    filt["time_ms_off"] = ms(peaked_step)
    with config.triton_options(filter_eps=eps):
        filt["error_vs_unfiltered"] = errors(fwd_bwd(ph, pw, labels, grad), exact)
        filt["time_ms_on"] = ms(peaked_step)
    result["filter"] = filt
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
