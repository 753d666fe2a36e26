"""Linear passes built from a backend's logits passes and matmuls (cuBLAS on GPU).

- Row chunks of full-vocabulary logits (at most the group byte budget) for the group-chunked
  fused loss: ``logits_chunk`` makes one, ``chunk_stats_`` reduces it, ``chunk_grads_`` turns it
  in place into ``grad_tok * (onehot - softmax)`` and adds ``dH``, ``dW``, ``db``.
- (tokens x vocab) tiles (at most the tile byte budget) for the minimal-memory linear passes of
  backends whose fused kernels are slower than the matmuls (``cuda``; ``triton`` by default).

Buffers and matmul outputs are in the input dtype (as cuBLAS returns them), identical in forward
and backward, so the softmax of the backward is consistent with the forward's logsumexp;
statistics are reduced in float32 by the logits kernels; ``dW`` accumulates across chunks in the
buffer of :func:`~nca_kernels.backends.torch_chunked.weight_grad_buffer` (the weight's dtype by
default: one rounding per chunk for 16-bit weights; float32 with ``config.weight_grad_accum``).
"""

from __future__ import annotations

import torch

from .. import config
from .torch_chunked import accum_dtype, addmm_, cap_, cap_slope, cast, weight_grad_buffer, wide_addmm


def row_stride(cols: int, dtype: torch.dtype, device) -> int:
    """The row stride of :func:`aligned_rows`: ``cols`` rounded up to whole 16 bytes of ``dtype``,
    except on the CPU, whose BLAS takes any leading dimension (there the padded rows of an odd
    vocabulary, V=32001, made the group mode's matmuls 7% slower with 2 threads)."""
    if torch.device(device).type == "cpu":
        return cols
    step = 16 // dtype.itemsize
    return -(-cols // step) * step


def aligned_rows(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``(rows, cols)`` buffer whose rows start on 16-byte boundaries off the CPU
    (:func:`row_stride`): cuBLAS' fastest 16-bit kernels need that of a matrix's leading dimension,
    and the from-logits Triton kernels then read every row as whole vectors but its tail. An odd
    vocabulary (one resized for added tokens) would otherwise start each row elsewhere."""
    return torch.empty(rows, row_stride(cols, dtype, device), dtype=dtype, device=device)[:, :cols]


def rows_per_chunk(weight: torch.Tensor) -> tuple[int, int]:
    """``(pack, cap)`` rows of the group budget (:func:`config.group_budget`), a row costing its
    logits (:func:`aligned_rows`) plus its gathered hidden row and its ``dH`` row (the matmul
    operands beside the buffer)."""
    v, h = weight.shape
    row = (row_stride(v, weight.dtype, weight.device) + 2 * h) * weight.element_size()
    return tuple(max(1, size // row) for size in config.group_budget(weight.device))


def logits_chunk(hidden2d, weight, bias, index, out=None, softcap=None) -> torch.Tensor:
    """``hidden2d[index] @ weight.T + bias``, capped by softcap: ``(len(index), V)`` in the input
    dtype, into ``out`` (rows ``[:len(index)]`` of a reused buffer) when given."""
    h = hidden2d.index_select(0, index)
    if out is None:
        out = aligned_rows(h.shape[0], weight.shape[0], h.dtype, h.device)
    out = torch.mm(h, weight.t(), out=out[: h.shape[0]])
    return cap_(out if bias is None else out.add_(bias), softcap)


def grads_(be, buf, targets, lse, grad_tok, softcap):
    """In place: logits ``buf`` (capped when softcap is set) become ``grad_tok * (onehot - softmax)``,
    times the cap's slope with softcap (which holds one more buffer like ``buf``)."""
    slope = None if softcap is None else cap_slope(buf, softcap)
    dl = be.logits_backward(buf, None, targets, lse, grad_tok, True)
    return dl if slope is None else dl.mul_(slope)


def chunk_stats_(be, buf, targets, keep, softcap=None) -> tuple:
    """``(lse, target_logit, shift)`` of the rows of ``buf``. With ``keep`` (``buf`` serves the
    gradient next) and a backend that has ``logits_exp_`` for ``buf``'s dtype, ``buf`` becomes
    ``exp(buf - shift)``, so the gradient needs no second exp; otherwise ``shift`` is None and
    ``buf`` is unchanged. (16-bit buffers keep their logits: their exp would lose the statistics'
    float32 accuracy; so do capped ones: the cap's slope in the gradient needs them.)"""
    if keep and softcap is None and hasattr(be, "logits_exp_") and buf.dtype == accum_dtype(buf.dtype):
        return be.logits_exp_(buf, targets)
    return (*be.logits_forward(buf, None, targets), None)


def chunk_grads_(be, buf, hidden2d, weight, index, targets, lse, shift, grad_tok, dhidden, dweight,
                 dbias, softcap=None) -> None:
    """Turn ``buf`` (the logits of rows ``index``, capped by softcap, or their ``exp(logits - shift)``
    when ``shift`` is given, see :func:`chunk_stats_`) into their gradient in place and add dH, dW, db."""
    if shift is None:
        dl = grads_(be, buf, targets, lse, grad_tok, softcap)
    else:  # -g * softmax is a row scaling of exp(logits - shift); then the one-hot part
        dl = buf.mul_((grad_tok * torch.exp(shift - lse)).neg_()[:, None])
        dl.scatter_add_(1, targets[:, None], grad_tok[:, None])
    if dbias is not None:
        dbias += dl.sum(0, dtype=dbias.dtype)
    if dhidden is not None:
        dhidden.index_copy_(0, index, dl @ weight)
    if dweight is not None:
        addmm_(dweight, dl.t(), hidden2d.index_select(0, index))


def tile_row_bytes(h: int, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes per token row of a backward tile beside its logits: the gathered hidden row, the ``dH``
    accumulator row (float32; float64 for float64 inputs) and, where :func:`addmm_` must round a
    16-bit product before adding it, that product row. (The float32 dW mode's product, formed
    where it must be rounded too, in blocks of a quarter of the budget, is that mode's own cost.)"""
    size = dtype.itemsize
    acc = accum_dtype(dtype)
    product = 0 if acc == dtype or wide_addmm(device, dtype) else size
    return (size + acc.itemsize + product) * h


#: A tile narrower than the vocabulary is a multiple of this many columns (when the budget allows
#: one): every tile but the last then splits into whole 128-column blocks, the width of cuBLAS'
#: output tiles. (On a GPU its rows start on 16 bytes whatever its width: :func:`aligned_rows`.)
TILE_COLUMNS = 128


def tile_shape(n: int, weight: torch.Tensor) -> tuple[int, int]:
    """(tokens, vocab) of one backward tile within the tile budget: at most half of it (and 1024
    rows) for the token rows (:func:`tile_row_bytes`), the rest for the logits, whose rows are
    padded to whole 16 bytes off the CPU (:func:`aligned_rows`)."""
    v, h = weight.shape
    row = tile_row_bytes(h, weight.dtype, weight.device)
    budget = config.tile_budget(weight.device)
    rows = max(1, min(n, 1024, budget // (2 * row)))
    fit, step = (budget - rows * row) // (rows * weight.element_size()), row_stride(1, weight.dtype, weight.device)
    cols = max(1, min(v, fit if fit < step else fit - fit % step))
    if TILE_COLUMNS <= cols < v:
        cols -= cols % TILE_COLUMNS
    return rows, cols


def _tiles(n: int, weight: torch.Tensor):
    """Yield ``(rows, v0, v1)`` over the (tokens x vocab) tiles; token chunks outermost."""
    rows, cols = tile_shape(n, weight)
    v = weight.shape[0]
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows)), [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)]


def every_row(index, m: int, device) -> torch.Tensor:
    """``index``, or all ``m`` rows when it is None (the backend protocol allows both)."""
    return torch.arange(m, device=device) if index is None else index


def _logit_tile(h, weight, bias, v0, v1, softcap):
    out = torch.mm(h, weight[v0:v1].t(), out=aligned_rows(h.shape[0], v1 - v0, h.dtype, h.device))
    return cap_(out if bias is None else out.add_(bias[v0:v1]), softcap)


def linear_forward(be, hidden2d, weight, bias, index, targets, softcap=None):
    """Forward from (tokens x vocab) tiles: a matmul makes each tile, ``be.logits_forward`` reduces
    it to a per-row logsumexp (and the label's logit when the label falls in the tile); the tiles'
    logsumexps fold once per token chunk. Backward recomputes the very same tiles."""
    acc = accum_dtype(hidden2d.dtype)
    index = every_row(index, hidden2d.shape[0], hidden2d.device)
    n = index.numel()
    lse = torch.empty(n, dtype=acc, device=hidden2d.device)
    tgt = torch.zeros(n, dtype=acc, device=hidden2d.device)
    for r, vtiles in _tiles(n, weight):
        h, y = hidden2d.index_select(0, index[r]), targets[r]
        parts = torch.empty(h.shape[0], len(vtiles), dtype=acc, device=h.device)
        for j, (v0, v1) in enumerate(vtiles):
            hit = (y >= v0) & (y < v1)
            parts[:, j], picked = be.logits_forward(_logit_tile(h, weight, bias, v0, v1, softcap), None,
                                                    torch.where(hit, y - v0, 0))
            tgt[r] = torch.where(hit, picked, tgt[r])
        lse[r] = torch.logsumexp(parts, dim=1)
    return lse, tgt


def linear_backward(be, hidden2d, weight, bias, index, targets, lse, grad_tok, needs, softcap=None):
    """Backward from the forward's tiles: a matmul recomputes each tile, ``be.logits_backward`` turns
    it in place into ``grad_tok * (onehot - softmax)`` (labels shifted to the tile's columns, so a
    label outside the tile adds no one-hot; ``lse`` is the full row's), and two more matmuls add its
    share of ``dH`` (a float32 accumulator per token chunk) and ``dW`` (see :func:`weight_grad_buffer`);
    products go into float32 accumulators unrounded where the matmul allows (:func:`addmm_`)."""
    need_h, need_w, need_b = needs
    acc = accum_dtype(weight.dtype)
    index = every_row(index, hidden2d.shape[0], hidden2d.device)
    dhidden = torch.zeros_like(hidden2d) if need_h else None
    dweight = weight_grad_buffer(weight) if need_w else None
    dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    for r, vtiles in _tiles(index.numel(), weight):
        h = hidden2d.index_select(0, index[r])
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        for v0, v1 in vtiles:
            dl = grads_(be, _logit_tile(h, weight, bias, v0, v1, softcap), targets[r] - v0, lse[r], grad_tok[r],
                        softcap)
            if need_b:
                dbias[v0:v1] += dl.sum(0, dtype=acc)
            if need_h:
                addmm_(dh, dl, weight[v0:v1])
            if need_w:
                addmm_(dweight[v0:v1], dl.t(), h)
            del dl
        if need_h:
            dhidden.index_copy_(0, index[r], dh.to(hidden2d.dtype))
    return dhidden, cast(dweight, weight.dtype), cast(dbias, weight.dtype)
