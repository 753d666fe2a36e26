"""``@triton.jit`` helpers shared by the fused linear kernels: logit tiles and their gradients.

A tile is ``BLOCK_N`` response tokens (rows of ``hidden`` gathered through ``index``) by
``BLOCK_V`` vocabulary entries, accumulated in float32 over ``BLOCK_K`` slices of the hidden
size. ``UPCAST`` casts dot operands to float32 (the interpreter's bf16 ``tl.dot`` is wrong);
``PRECISION`` is the ``tl.dot`` input precision ("ieee" keeps float32 inputs exact).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in float32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, v0, mask_n, mask_v, H, stride_h, stride_w,
               HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``hidden[rows] @ weight[v0 + j].T + bias[v0 + j]``: ``(BLOCK_N, BLOCK_V)`` float32.

    Masked columns are ``-inf``; masked rows hold finite garbage that callers never store.
    Hidden rows are gathered (int64 row pointers); weight rows are addressed from one base.
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    h_rows = hidden_ptr + rows * stride_h
    w_tile = weight_ptr + tl.cast(v0, tl.int64) * stride_w + offs_v[None, :] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < H
        h = tl.load(h_rows[:, None] + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_tile + cols[:, None], mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        acc = dot(h, w, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + v0 + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask_v[None, :], acc, float("-inf"))


@triton.jit
def grad_tile(logits, offs_v, targets, lse, grad):
    """``grad * (onehot(targets) - exp(logits - lse))`` per row; zero where ``logits`` is -inf."""
    onehot = (offs_v[None, :] == targets[:, None]).to(tl.float32)
    return grad[:, None] * (onehot - tl.exp(logits - lse[:, None]))


@triton.jit
def add_to(ptrs, value, mask, ATOMIC: tl.constexpr):
    """``*ptrs += value`` for a float32 ``value``, by atomics (of the pointee dtype) or by a plain
    read-modify-write that adds in float32 and rounds once to the pointee dtype; the barrier makes
    this program's earlier stores to ``ptrs`` (by other threads of its layout) visible."""
    if ATOMIC:
        tl.atomic_add(ptrs, value.to(ptrs.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.debug_barrier()
        total = tl.load(ptrs, mask=mask).to(tl.float32) + value
        tl.store(ptrs, total.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def accumulate(dl, hidden_ptr, weight_ptr, rows, offs_v, mask_n, mask_v, dh_ptr, dh_rows, dw_ptr,
               H, stride_h, stride_w, stride_dh,
               NEED_H: tl.constexpr, NEED_W: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """Add ``dl @ weight[offs_v]`` to ``dh[dh_rows]`` and ``dl.T @ hidden[rows]`` to ``dw[offs_v]``.

    ``dl`` is a ``(BLOCK_N, BLOCK_V)`` float32 logit-gradient tile; it enters the matmuls in the
    input dtype, the products are float32 and are added ``BLOCK_K`` columns at a time.
    """
    dl = dl.to(weight_ptr.dtype.element_ty)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < H
        if NEED_H:
            w = tl.load(weight_ptr + offs_v[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            dh = dot(dl, w, tl.zeros((dl.shape[0], BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            add_to(dh_ptr + dh_rows[:, None] * stride_dh + cols[None, :], dh,
                   mask_n[:, None] & mask_k[None, :], ATOMIC)
        if NEED_W:
            h = tl.load(hidden_ptr + rows[:, None] * stride_h + cols[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            dw = dot(tl.trans(dl), h, tl.zeros((dl.shape[1], BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
            add_to(dw_ptr + offs_v[:, None].to(tl.int64) * stride_w + cols[None, :], dw,
                   mask_v[:, None] & mask_k[None, :], ATOMIC)
