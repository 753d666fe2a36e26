"""From-logits kernels: one program per row, walking the vocabulary in ``BLOCK_V`` chunks.

The forward reads each selected row of logits once (online logsumexp) and picks the label's
logit; the backward writes ``grad * (onehot - softmax)`` over every row of the output (zeros for
rows outside ``index``), optionally into the logits buffer itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning


@triton.autotune(configs=tuning.row(), key=["V"])
@triton.jit
def logits_forward_kernel(logits_ptr, index_ptr, target_ptr, lse_ptr, tgt_ptr, V, stride, BLOCK_V: tl.constexpr):
    """lse, tgt ``(N,)`` float32 of rows ``index`` of logits ``(M, V)``; one token per program."""
    n = tl.program_id(0)
    row = logits_ptr + tl.load(index_ptr + n) * stride
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have seen only -inf
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)  # an all -inf row (or tile): lse -inf, not NaN
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    tl.store(lse_ptr + n, lse)
    tl.store(tgt_ptr + n, tl.load(row + tl.load(target_ptr + n)).to(tl.float32))


@triton.jit
def logits_backward_kernel(logits_ptr, out_ptr, pos_ptr, target_ptr, lse_ptr, grad_ptr, V, stride, out_stride,
                           BLOCK_V: tl.constexpr):
    """out ``(M, V)`` <- ``grad * (onehot - softmax)`` for rows with ``pos >= 0``, zeros elsewhere.

    ``pos[row]`` is the token of logits row ``row`` or -1; out may alias logits (in place).
    """
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row)
    src = logits_ptr + row * stride
    dst = out_ptr + row * out_stride
    if pos >= 0:
        y = tl.load(target_ptr + pos)
        lse = tl.load(lse_ptr + pos)
        g = tl.load(grad_ptr + pos)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(src + offs, mask=offs < V, other=0.0).to(tl.float32)
            d = g * ((offs == y).to(tl.float32) - tl.exp(x - lse))
            tl.store(dst + offs, d.to(out_ptr.dtype.element_ty), mask=offs < V)
    else:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            tl.store(dst + offs, tl.zeros((BLOCK_V,), dtype=out_ptr.dtype.element_ty), mask=offs < V)


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


def logits_backward(logits2d, index, targets, lse, grad_tok, inplace):
    """The logits gradient ``(M, V)`` in the logits dtype, zero outside ``index``; ``inplace`` reuses logits2d."""
    m, v = logits2d.shape
    out = logits2d if inplace else torch.empty_like(logits2d, memory_format=torch.contiguous_format)
    pos = torch.full((m,), -1, dtype=torch.int64, device=logits2d.device)
    pos[index] = torch.arange(index.numel(), device=logits2d.device)
    if m:
        kernel = _backward_in_place if inplace else _backward
        kernel[(m,)](logits2d, out, pos, targets, lse, grad_tok.to(torch.float32), v, logits2d.stride(0),
                     out.stride(0))
    return out
