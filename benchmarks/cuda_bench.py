"""CUDA backend on a GPU: kernel bandwidth and the group-chunked fused loss at the headline config.

1. From-logits forward + in-place backward over a (rows, V) bf16 buffer: bytes moved (read once
   forward, read + write backward: 3 x buffer) per second, against a large device-to-device copy
   (read + write). Target: >= 80% of the copy.
2. Headline (H=4096, V=128256, 4 prompts x 4 responses x 1024 tokens, first half prompt, bf16):
   ``fused_nca_loss(recompute=False, backend="cuda")`` forward + backward against the three
   cuBLAS matmuls it needs on the response tokens (logits, dH, dW). Target: <= 1.15x. Also
   ``recompute=True`` (8·N·H·V FLOPs instead of 6) and the peak memory above inputs and their
   gradients, against the group byte budget.

Usage (from the repository root, GPU only): python -m benchmarks.cuda_bench --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform

import torch
from triton.testing import do_bench

import nca_kernels
from benchmarks.memory import peak_bytes
from nca_kernels.backends import cuda, get_backend

IGNORE = -100


def _ms(fn, rep=500):
    return do_bench(fn, warmup=100, rep=rep, return_mode="median")


def _three_matmuls(hr, w, logits, dh, dw):
    """logits = hr @ w.T, dH = logits @ w, dW = logits.T @ hr, into preallocated outputs."""
    torch.mm(hr, w.t(), out=logits)
    torch.mm(logits, w, out=dh)
    torch.mm(logits.t(), hr, out=dw)


def bandwidth(rows: int, vocab: int, dtype: torch.dtype) -> dict:
    dev = torch.device("cuda")
    x = torch.randn(rows, vocab, device=dev).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=dev)
    grad = torch.randn(rows, device=dev)
    nbytes = x.numel() * x.element_size()
    copy_ms = _ms(functools.partial(torch.Tensor.copy_, torch.empty_like(x), x))
    lse, _ = cuda.logits_forward(x, None, targets)
    fwd_ms = _ms(lambda: cuda.logits_forward(x, None, targets))
    bwd_ms = _ms(lambda: cuda.logits_backward(x, None, targets, lse, grad, True))  # values stay bounded
    copy_bps = 2 * nbytes / (copy_ms * 1e-3)
    kernel_bps = 3 * nbytes / ((fwd_ms + bwd_ms) * 1e-3)
    return {
        "shape": [rows, vocab], "dtype": str(dtype), "buffer_bytes": nbytes,
        "copy_ms": copy_ms, "forward_ms": fwd_ms, "backward_inplace_ms": bwd_ms,
        "copy_GBps": copy_bps / 1e9, "fwd_bwd_GBps": kernel_bps / 1e9,
        "fraction_of_copy": kernel_bps / copy_bps, "target": ">= 0.80",
    }


def headline(b=4, k=4, t=1024, h=4096, v=128256, dtype=torch.bfloat16, group_bytes=1 << 30) -> dict:
    dev = torch.device("cuda")
    get_backend("cuda", dev)  # fail here, with the build hint, if the extension is unusable
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(b * k, t, h, device=dev, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=dev, generator=g) / math.sqrt(h)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (b * k, t), device=dev, generator=g)
    labels[:, : t // 2] = IGNORE
    rewards = torch.randn(b, k, device=dev, generator=g)
    ref_logps = -torch.rand(b, k, device=dev, generator=g) * t

    def loss_and_grads(recompute):
        loss = nca_kernels.fused_nca_loss(hidden, weight, labels, rewards, ref_logps, beta=0.1, alpha=0.5,
                                          recompute=recompute, backend="cuda")
        return torch.autograd.grad(loss, [hidden, weight])

    # the three matmuls on the N response tokens: logits, dH = dlogits @ W, dW = dlogits^T @ H
    index = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
    hr = hidden.detach().reshape(-1, h).index_select(0, index)
    w = weight.detach()
    n = hr.shape[0]
    mm_ms = _ms(functools.partial(_three_matmuls, hr, w, torch.empty(n, v, device=dev, dtype=dtype),
                                  torch.empty_like(hr), torch.empty_like(w)), rep=1000)
    with nca_kernels.chunk_bytes(group=group_bytes):
        fused_ms = _ms(lambda: loss_and_grads(False), rep=1000)
        recompute_ms = _ms(lambda: loss_and_grads(True), rep=1000)
        peak = peak_bytes(lambda: loss_and_grads(False), dev)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    flops = 6 * n * h * v
    return {
        "config": {"prompts": b, "responses": k, "tokens": t, "hidden": h, "vocab": v, "dtype": str(dtype),
                   "response_tokens": n, "group_bytes": group_bytes},
        "matmuls_ms": mm_ms, "matmuls_TFLOPs": flops / (mm_ms * 1e-3) / 1e12,
        "fused_recompute_false_ms": fused_ms, "ratio_vs_matmuls": fused_ms / mm_ms, "target": "<= 1.15",
        "fused_recompute_true_ms": recompute_ms, "recompute_true_ratio_vs_matmuls": recompute_ms / mm_ms,
        "peak_bytes": peak, "gradient_bytes": grad_bytes, "peak_extra_bytes": peak - grad_bytes,
        "peak_extra_vs_group_bytes": (peak - grad_bytes) / group_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_bench.py needs a CUDA device")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "bandwidth": [bandwidth(4096, 128256, torch.bfloat16), bandwidth(8192, 32003, torch.float32)],
        "headline": headline(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
