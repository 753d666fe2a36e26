"""From-logits kernels: one program per row, walking the vocabulary in ``BLOCK_V`` chunks.

The forward reads each selected row of logits once (online logsumexp) and picks the label's
logit; the backward writes ``grad * (onehot - softmax)`` over every row of the output (zeros for
rows outside ``index``), optionally into the logits buffer itself.

Each row is read as whole 16-byte vectors from its first 16-byte boundary on (:func:`row_split`),
whatever the vocabulary size and row alignment (an odd vocabulary, such as one resized for added
tokens, starts every row elsewhere); the few columns before and after them, the row's edges, are
read one element at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning


@triton.jit
def row_split(row, V, VEC: tl.constexpr):
    """``(head, body)`` of the ``V`` columns at ``row``, ``VEC`` of which fill 16 bytes: columns
    ``[0, head)`` lie before the first 16-byte boundary, ``[head, head + body)`` are whole 16-byte
    vectors (``body`` a multiple of ``VEC``), and the fewer than ``VEC`` after them are the tail."""
    skew = (row.to(tl.int64) % 16) // (16 // VEC)
    head = tl.minimum((VEC - skew) % VEC, V)
    return head, (V - head) // VEC * VEC


@triton.jit
def edge_columns(head, body, V, VEC: tl.constexpr):
    """``(cols, mask)`` of ``2 * VEC`` lanes: the head's columns, then the tail's."""
    lane = tl.arange(0, 2 * VEC)
    cols = tl.where(lane < VEC, lane, head + body + lane - VEC)
    return cols, tl.where(lane < VEC, lane < head, cols < V)


@triton.jit
def softmax_grad(x, cols, y, lse, g):
    """``g * (onehot(y) - exp(x - lse))`` in float32 at columns ``cols``."""
    return g * ((cols == y).to(tl.float32) - tl.exp(x.to(tl.float32) - lse))


@triton.autotune(configs=tuning.row(), key=["V"])
@triton.jit
def logits_forward_kernel(logits_ptr, index_ptr, target_ptr, lse_ptr, tgt_ptr, V, stride, BLOCK_V: tl.constexpr):
    """lse, tgt ``(N,)`` float32 of rows ``index`` of logits ``(M, V)``; one token per program."""
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth
    n = tl.program_id(0)
    row = logits_ptr + tl.load(index_ptr + n) * stride
    head, body = row_split(row, V, VEC)
    vectors = tl.multiple_of(row + head, 16)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, body, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(vectors + offs, mask=offs < body, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have seen only -inf
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    cols, edge = edge_columns(head, body, V, VEC)
    e = tl.load(row + cols, mask=edge, other=float("-inf")).to(tl.float32)
    m_row = tl.maximum(tl.max(m, axis=0), tl.max(e, axis=0))
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)  # an all -inf row (or tile): lse -inf, not NaN
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0) + tl.sum(tl.exp(e - m_row), axis=0))
    tl.store(lse_ptr + n, lse)
    tl.store(tgt_ptr + n, tl.load(row + tl.load(target_ptr + n)).to(tl.float32))


@triton.jit
def logits_backward_kernel(logits_ptr, out_ptr, pos_ptr, target_ptr, lse_ptr, grad_ptr, V, stride, out_stride,
                           BLOCK_V: tl.constexpr, OUT_ALIGNED: tl.constexpr):
    """out ``(M, V)`` <- ``grad * (onehot - softmax)`` for rows with ``pos >= 0``, zeros elsewhere.

    ``pos[row]`` is the token of logits row ``row`` or -1; out may alias logits (in place).
    ``OUT_ALIGNED``: every out row sits at the same offset from a 16-byte boundary as its logits
    row (in place, or equal strides and base alignments), so stores are 16-byte vectors too.
    """
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row)
    src = logits_ptr + row * stride
    dst = out_ptr + row * out_stride
    head, body = row_split(src, V, VEC)
    vectors = tl.multiple_of(src + head, 16)
    out_vectors = dst + head
    if OUT_ALIGNED:
        out_vectors = tl.multiple_of(out_vectors, 16)
    cols, edge = edge_columns(head, body, V, VEC)
    if pos >= 0:
        y = tl.load(target_ptr + pos)
        lse = tl.load(lse_ptr + pos)
        g = tl.load(grad_ptr + pos)
        for v0 in range(0, body, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(vectors + offs, mask=offs < body, other=0.0)
            d = softmax_grad(x, head + offs, y, lse, g)
            tl.store(out_vectors + offs, d.to(out_ptr.dtype.element_ty), mask=offs < body)
        d = softmax_grad(tl.load(src + cols, mask=edge, other=0.0), cols, y, lse, g)
        tl.store(dst + cols, d.to(out_ptr.dtype.element_ty), mask=edge)
    else:
        for v0 in range(0, body, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            tl.store(out_vectors + offs, tl.zeros((BLOCK_V,), dtype=out_ptr.dtype.element_ty), mask=offs < body)
        tl.store(dst + cols, tl.zeros((2 * VEC,), dtype=out_ptr.dtype.element_ty), mask=edge)


# Autotuned twice: in place, benchmarking must restore the logits it overwrites (a clone of the
# whole buffer per trial); out of place nothing needs restoring.
_backward = triton.autotune(configs=tuning.row(), key=["V"])(logits_backward_kernel)
_backward_in_place = triton.autotune(configs=tuning.row(), key=["V"], restore_value=["out_ptr"])(logits_backward_kernel)


def logits_forward(logits2d, index, targets):
    """``(lse, target_logit)`` float32 ``(N,)`` of rows ``index`` of logits2d ``(M, V)``."""
    n = index.numel()
    lse = torch.empty(n, dtype=torch.float32, device=logits2d.device)
    tgt = torch.empty_like(lse)
    if n:
        logits_forward_kernel[(n,)](logits2d, index, targets, lse, tgt, logits2d.shape[1], logits2d.stride(0))
    return lse, tgt


def same_alignment(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether every row of ``b`` (2-D) starts at the same offset from a 16-byte boundary as ``a``'s."""
    return (a.data_ptr() - b.data_ptr()) % 16 == 0 and (a.stride(0) - b.stride(0)) * a.element_size() % 16 == 0


def logits_backward(logits2d, index, targets, lse, grad_tok, inplace):
    """The logits gradient ``(M, V)`` in the logits dtype, zero outside ``index``; ``inplace`` reuses logits2d."""
    m, v = logits2d.shape
    out = logits2d if inplace else torch.empty_like(logits2d, memory_format=torch.contiguous_format)
    pos = torch.full((m,), -1, dtype=torch.int64, device=logits2d.device)
    pos[index] = torch.arange(index.numel(), device=logits2d.device)
    if m:
        kernel = _backward_in_place if inplace else _backward
        kernel[(m,)](logits2d, out, pos, targets, lse, grad_tok.to(torch.float32), v, logits2d.stride(0),
                     out.stride(0), OUT_ALIGNED=same_alignment(logits2d, out))
    return out
