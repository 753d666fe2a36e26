"""dW and dH error of 16-bit inputs against float64 as the token-chunk count grows, with dW summed in
the weight's dtype (the default) and in float32 (``config.weight_grad_accum = "float32"``).

A CPU model of the GPU recompute schedule (:mod:`nca_kernels.backends.rowchunk`: cuBLAS tiles and
from-logits passes, here the torch backend's passes on the CPU), with the tile budget scaled so
that N tokens fall into (about) the given number of token chunks (at most 1024 tokens each), next
to naive autograd (one rounding).

    python benchmarks/accumulation.py --md benchmarks/results/cpu_accumulation.md \
        --out benchmarks/results/cpu_accumulation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nca_kernels import config
from nca_kernels.backends import rowchunk, torch_chunked


def problem(n, h, v, dtype, seed=0):
    """Random bf16 hidden rows, weight (logits O(1)), labels, per-token gradients, and float64 dH, dW."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    grad = torch.randn(n, generator=g) * 0.1
    dl = -grad.double()[:, None] * torch.softmax(hidden.double() @ weight.double().t(), 1)
    dl[torch.arange(n), targets] += grad.double()
    return hidden, weight, targets, grad, (dl @ weight.double(), dl.t() @ hidden.double())


def errors(got, want) -> dict:
    """Relative max and RMS error of dH and dW."""
    out = {}
    for name, x, r in zip(("dh", "dw"), got, want):
        d = x.double() - r
        out[f"{name}_max"] = float(d.abs().max() / r.abs().max())
        out[f"{name}_rms"] = float(d.norm() / r.norm())
    return out


def naive(hidden, weight, targets, grad):
    """Autograd's bf16 path: 16-bit logits, float32 softmax, one matmul each for dH and dW."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax((h @ w.t()).float(), 1).gather(1, targets[:, None]).squeeze(1)
    (logp * grad).sum().backward()
    return h.grad, w.grad


def chunked(hidden, weight, targets, grad, chunks, mode):
    n, h = hidden.shape
    rows = -(-n // chunks)
    row = rowchunk.tile_row_bytes(h, hidden.dtype, hidden.device)
    with config.chunk_bytes(tile=rows * 2 * row), config.weight_grad_accumulation(mode):
        index = torch.arange(n)
        lse, _ = rowchunk.linear_forward(torch_chunked, hidden, weight, None, index, targets)
        dh, dw, _ = rowchunk.linear_backward(torch_chunked, hidden, weight, None, index, targets, lse, grad,
                                             (True, True, False))
        return dh, dw, rowchunk.tile_shape(n, weight)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=2048)
    ap.add_argument("--chunks", type=int, nargs="*", default=[8, 11, 32, 128])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    rows = []
    for seed in range(args.seeds):
        hidden, weight, targets, grad, want = problem(args.n, args.h, args.v, torch.bfloat16, seed)
        rows.append({"impl": "naive", "seed": seed, "chunks": 1,
                     **errors(naive(hidden, weight, targets, grad), want)})
        for chunks in args.chunks:
            for mode in ("weight", "float32"):
                dh, dw, tile = chunked(hidden, weight, targets, grad, chunks, mode)
                rows.append({"impl": f"rowchunk[{mode}]", "seed": seed, "chunks": -(-args.n // tile[0]),
                             "tile": list(tile), **errors((dh, dw), want)})
    keys = sorted({(r["impl"], r["chunks"]) for r in rows}, key=lambda k: (k[1], k[0] != "naive", k[0]))
    lines = [f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
             f"{datetime.date.today()}: N={args.n} tokens, H={args.h}, V={args.v}, bf16, {args.seeds} seeds "
             "(mean of the per-seed relative errors).", "",
             "| implementation | token chunks | dW max | dW rms | dH max | dH rms |", "|---|---:|---:|---:|---:|---:|"]
    for impl, chunks in keys:
        sel = [r for r in rows if r["impl"] == impl and r["chunks"] == chunks]
        mean = {k: sum(r[k] for r in sel) / len(sel) for k in ("dw_max", "dw_rms", "dh_max", "dh_rms")}
        lines.append(f"| {impl} | {chunks} | {mean['dw_max']:.2e} | {mean['dw_rms']:.2e} | "
                     f"{mean['dh_max']:.2e} | {mean['dh_rms']:.2e} |")
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
