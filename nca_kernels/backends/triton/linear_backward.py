"""Fused linear backward: recompute logit tiles, form ``grad * (onehot - softmax)`` on chip, and
accumulate ``dH = dl @ W``, ``dW = dl.T @ H`` and ``db = sum(dl)`` without holding any logits.

Two schedules, both recomputing each logit tile once more than the forward, from one kernel
whose ``SCHEDULE`` constexpr picks the loop:

- default (``"tiles"``): one program per (token tile, vocabulary tile), products added with atomics;
- deterministic (``config.deterministic``): split passes without atomics, ``"tokens"`` walking the
  vocabulary per token tile (dH), ``"vocab"`` walking the tokens per vocabulary tile (dW, db); each
  recomputes the logits, so it costs one more forward, and the dH pass has few programs.

Measured on an H100 at the headline config (``benchmarks/results/triton_h100.json``): forward +
backward 118 ms with atomics against 638 ms deterministic, hence the default.

dW is accumulated in the weight's dtype (one rounding per token tile for 16-bit weights), or in
float32 with ``config.weight_grad_accum = "float32"``. dH of 16-bit inputs is accumulated in a
float32 scratch of at most ``config.scratch_bytes`` (token chunks), then rounded once; float32
inputs accumulate straight into the outputs.
With ``config.filter_eps > 0``, tiles whose every gradient entry is below it skip the dH and dW
products (db stays exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import config
from ..torch_chunked import cast, weight_grad_buffer
from . import tuning
from .linear_forward import dot_options
from .tiles import accumulate, grad_tile, logit_tile

#: Schedules of :func:`linear_backward_kernel` (a constexpr: one compiled kernel each).
SCHEDULES = ("tiles", "tokens", "vocab")


@triton.jit
def _tile_grads(hidden_ptr, weight_ptr, bias_ptr, index_ptr, target_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr, n0, v0,
                N, V, H, stride_h, stride_w, stride_dh, filter_eps, HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr,
                NEED_W: tl.constexpr, SCATTER_DH: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute the logits of tokens ``n0 + [0, BLOCK_N)`` x vocabulary ``v0 + [0, BLOCK_V)``, add
    their dH and dW products (unless every gradient entry is below ``filter_eps``) and return the
    tile's column sums ``(BLOCK_V,)`` float32 (its db)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    targets = tl.load(target_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    grad = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    logits = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, v0, mask_n, mask_v, H, stride_h, stride_w,
                        HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    dl = tl.where(mask_n[:, None], grad_tile(logits, offs_v, targets, lse, grad), 0.0)  # masked rows: 0 * exp(bias)
    db = tl.sum(dl, axis=0)
    if tl.max(tl.abs(dl)) >= filter_eps:
        accumulate(dl, hidden_ptr, weight_ptr, rows, offs_v, mask_n, mask_v, dh_ptr,
                   rows if SCATTER_DH else offs_n.to(tl.int64), dw_ptr, H, stride_h, stride_w, stride_dh,
                   NEED_H, NEED_W, ATOMIC, UPCAST, PRECISION, BLOCK_K)
    return db


@triton.autotune(configs=tuning.linear(backward=True), key=["H", "V", "SCHEDULE"],
                 prune_configs_by={"early_config_prune": tuning.by_dtype}, restore_value=["dh_ptr", "dw_ptr", "db_ptr"])
@triton.jit
def linear_backward_kernel(hidden_ptr, weight_ptr, bias_ptr, index_ptr, target_ptr, lse_ptr, grad_ptr, dh_ptr,
                           dw_ptr, db_ptr, N, V, H, stride_h, stride_w, stride_dh, filter_eps,
                           SCHEDULE: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr,
                           NEED_W: tl.constexpr, NEED_B: tl.constexpr, SCATTER_DH: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Add the gradients of ``N`` tokens to dh ``(rows, H)`` float32, dw ``(V, H)`` and db ``(V,)`` float32.

    ``SCHEDULE`` ``"tiles"``: one (token tile, vocab tile) per program, added with atomics;
    consecutive programs share a vocabulary tile, so a chunk of hidden rows stays in L2.
    ``"tokens"``: one token tile per program walks the vocabulary, dH only. ``"vocab"``: one
    vocabulary tile per program walks the tokens, dW and db only, written once (no atomics).
    ``SCATTER_DH``: dh rows are ``index`` (the full dH), else token positions (a scratch chunk).
    """
    if SCHEDULE == "tiles":
        n_tiles = tl.cdiv(N, BLOCK_N)
        v0 = tl.program_id(0) // n_tiles * BLOCK_V
        db = _tile_grads(hidden_ptr, weight_ptr, bias_ptr, index_ptr, target_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr,
                         tl.program_id(0) % n_tiles * BLOCK_N, v0, N, V, H, stride_h, stride_w, stride_dh,
                         filter_eps, HAS_BIAS, NEED_H, NEED_W, SCATTER_DH, True, UPCAST, PRECISION,
                         BLOCK_N, BLOCK_V, BLOCK_K)
        if NEED_B:
            offs_v = v0 + tl.arange(0, BLOCK_V)
            tl.atomic_add(db_ptr + offs_v, db, mask=offs_v < V, sem="relaxed")
    elif SCHEDULE == "tokens":
        for v0 in range(0, V, BLOCK_V):
            _tile_grads(hidden_ptr, weight_ptr, bias_ptr, index_ptr, target_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr,
                        tl.program_id(0) * BLOCK_N, v0, N, V, H, stride_h, stride_w, stride_dh, filter_eps,
                        HAS_BIAS, True, False, SCATTER_DH, False, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    else:
        v0 = tl.program_id(0) * BLOCK_V
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            db += _tile_grads(hidden_ptr, weight_ptr, bias_ptr, index_ptr, target_ptr, lse_ptr, grad_ptr, dh_ptr,
                              dw_ptr, n0, v0, N, V, H, stride_h, stride_w, stride_dh, filter_eps, HAS_BIAS, False,
                              NEED_W, SCATTER_DH, False, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        if NEED_B:
            offs_v = v0 + tl.arange(0, BLOCK_V)
            tl.store(db_ptr + offs_v, db, mask=offs_v < V)


def _launch(schedule, hidden2d, weight, bias, index, targets, lse, grad, dh, dw, db, scatter_dh, needs):
    """Run the backward kernel with one schedule; absent outputs get a dummy pointer."""
    dummy = lse[:1]
    n, (v, h) = index.numel(), weight.shape
    tiles = {"tiles": _all_tiles, "tokens": _token_tiles, "vocab": _vocab_tiles}[schedule]
    linear_backward_kernel[lambda meta: (tiles(n, v, meta),)](
        hidden2d, weight, bias, index, targets, lse, grad,
        dummy if dh is None else dh, dummy if dw is None else dw, dummy if db is None else db,
        n, v, h, hidden2d.stride(0), weight.stride(0), 0 if dh is None else dh.stride(0), float(config.filter_eps),
        SCHEDULE=schedule, HAS_BIAS=bias is not None, NEED_H=needs[0], NEED_W=needs[1], NEED_B=needs[2],
        SCATTER_DH=scatter_dh,
        **dot_options(weight.dtype),
    )


def _all_tiles(n, v, meta):
    return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"])


def _token_tiles(n, v, meta):
    return triton.cdiv(n, meta["BLOCK_N"])


def _vocab_tiles(n, v, meta):
    return triton.cdiv(v, meta["BLOCK_V"])


def linear_backward(hidden2d, weight, bias, index, targets, lse, grad_tok, needs):
    """Gradients ``(dhidden2d, dweight, dbias)`` of ``sum_n grad_tok[n] * logp[n]``; None where not needed."""
    need_h, need_w, need_b = needs
    n, (v, h) = index.numel(), weight.shape
    dhidden = torch.zeros_like(hidden2d) if need_h else None
    dweight = weight_grad_buffer(weight) if need_w else None
    dbias = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
    if n and any(needs):
        args = (hidden2d, weight, bias)
        grad = grad_tok.to(torch.float32)
        direct = hidden2d.dtype == torch.float32  # float32 dH needs no scratch: accumulate in place
        rows = n if direct else max(1, config.scratch_bytes // (4 * h))
        scratch = None if direct or not need_h else torch.empty(min(n, rows), h, dtype=torch.float32,
                                                                 device=hidden2d.device)
        for t0 in range(0, n, rows):
            t = slice(t0, min(n, t0 + rows))
            dh = dhidden if direct else None if scratch is None else scratch[: t.stop - t0].zero_()
            chunk = (index[t], targets[t], lse[t], grad[t])
            if config.deterministic:
                if need_h:
                    _launch("tokens", *args, *chunk, dh, None, None, direct, (True, False, False))
            else:
                _launch("tiles", *args, *chunk, dh, dweight, dbias, direct, (need_h, need_w, need_b))
            if dh is not None and not direct:
                dhidden.index_copy_(0, index[t], dh.to(hidden2d.dtype))
        if config.deterministic and (need_w or need_b):
            _launch("vocab", *args, index, targets, lse, grad, None, dweight, dbias, False, (False, need_w, need_b))
    return dhidden, cast(dweight, weight.dtype), cast(dbias, weight.dtype)
