"""Chunked PyTorch backend: any device, the CPU default.

The linear passes walk (token x vocab) tiles of at most the tile budget of float32 logits
(:func:`nca_kernels.config.tile_budget`):
forward folds each tile into an online logsumexp and picks up the target logit; backward
recomputes the tile, turns it into ``grad_tok * (onehot - softmax)`` in place and accumulates
``dH`` and ``dW`` with in-place matmuls. Only response rows are ever gathered.
"""

from __future__ import annotations

import functools

import torch

from .. import config


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """A zeroed dW accumulator ``(V, H)`` for paths that sum dW chunk by chunk: float32 for a 16-bit
    weight when ``config.weight_grad_accum == "float32"``, else the weight's dtype."""
    wide = config.weight_grad_accum == "float32" and weight.element_size() < 4
    return torch.zeros(weight.shape, dtype=torch.float32 if wide else weight.dtype, device=weight.device)


@functools.cache
def wide_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32, out=out)`` adds a ``dtype`` (16-bit)
    product into a float32 ``out`` in place, unrounded, on ``device``. cuBLAS does in recent torch
    releases; CPU kernels and older releases do not. Probed once per device and dtype, on a sum
    that a 16-bit product would round: ``1 + 2**-12``."""
    a = torch.tensor([[1.0, 2.0**-12]], dtype=dtype, device=device)
    out = torch.zeros(1, 1, device=device)
    try:
        torch.addmm(out, a, torch.ones(2, 1, dtype=dtype, device=device), out_dtype=torch.float32, out=out)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return out.item() == 1 + 2.0**-12


def addmm_(out, a, b):
    """``out += a @ b`` in place. Same dtypes: one in-place matmul. A float32 ``out`` and 16-bit
    operands: the matmul adds its float32 result directly where :func:`wide_addmm` says it can, else
    the product is formed in the operands' dtype (one rounding) and then added, in row blocks of at
    most a quarter of the tile budget (a ``(V_tile, H)`` dW product would otherwise double it)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    elif out.dtype == torch.float32 and wide_addmm(out.device, a.dtype):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        step = max(1, config.tile_budget(out.device) // (4 * out.shape[1] * a.element_size()))
        for r0 in range(0, out.shape[0], step):
            out[r0:r0 + step].add_(a[r0:r0 + step] @ b)


def cap_(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """In place: ``softcap * tanh(logits / softcap)``; unchanged when softcap is None."""
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def cap_slope(capped: torch.Tensor, softcap: float) -> torch.Tensor:
    """``d capped / d logits = 1 - (capped / softcap)**2``, from the capped logits (a new tensor)."""
    return (capped / softcap).square_().neg_().add_(1)


def cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` in ``dtype`` (no copy when it already is); None stays None."""
    return None if x is None else x.to(dtype)


def takes_logits_backward(logits2d: torch.Tensor, inplace: bool) -> bool:
    """Whether these passes take a GPU backend's from-logits backward instead of its kernels: float64
    (they have no float64 variant) or an in-place write to rows of non-unit column stride (they
    write unit strides)."""
    return logits2d.dtype == torch.float64 or (inplace and logits2d.stride(-1) != 1)


def available(device: torch.device) -> str | None:
    return None


def _tile(n: int, v: int, h: int, device) -> tuple[int, int]:
    """(tokens, vocab) of one tile of at most the tile budget of float32 logits. Tiles are tall, so
    that each slice of the weight serves many tokens: as many tokens (up to 1024) as keep the token
    chunk's gathered rows and float32 dH accumulator within two tile budgets."""
    budget = config.tile_budget(device)
    tc = max(1, min(n, 1024, 2 * budget // (8 * h)))
    return tc, max(1, min(v, budget // (4 * tc)))


def _row_chunks(n: int, v: int, device):
    rows = max(1, min(n, config.tile_budget(device) // (4 * v)))
    return range(0, n, rows), rows


def _logit_tile(h, weight, bias, v0, v1, acc, softcap):
    """``h @ weight[v0:v1].T + bias[v0:v1]``, capped by softcap, as an ``acc`` tensor (a fresh buffer)."""
    out = (h @ weight[v0:v1].t()).to(acc)
    if bias is not None:
        out += bias[v0:v1]
    return cap_(out, softcap)


def _to_grad_(tile, y, v0, lse, g):
    """In place: ``tile <- g * (onehot(y - v0) - exp(tile - lse))``."""
    tile.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    col = (y - v0).clamp(0, tile.shape[1] - 1)
    hit = ((y >= v0) & (y < v0 + tile.shape[1])).to(tile.dtype)
    tile.scatter_add_(1, col[:, None], (g * hit)[:, None])
    return tile


def _rows(x, index, r0, r1):
    return x[r0:r1] if index is None else x.index_select(0, index[r0:r1])


def _target_logits(h, weight, bias, y, acc, softcap):
    """``(h * weight[y]).sum(-1) + bias[y]`` in ``acc``, capped by softcap: the target logit of each
    row of ``h``, rounded like the tiles of :func:`_logit_tile` (the product to the input dtype, as
    the matmul returns it), so that it matches the logit the logsumexp saw, as in naive PyTorch and
    the other backends. An unrounded target beside a rounded logsumexp cost 6x naive's error on
    peaked, trained-looking bf16 logits; rounded, the error is naive's, which on flat (random)
    logits is above the unrounded target's."""
    out = torch.linalg.vecdot(h.to(acc), weight.index_select(0, y).to(acc)).to(h.dtype).to(acc)
    return cap_(out if bias is None else out + bias.index_select(0, y).to(acc), softcap)


def linear_forward(hidden2d, weight, bias, index, targets, softcap=None):
    acc = accum_dtype(hidden2d.dtype)
    n = hidden2d.shape[0] if index is None else index.numel()
    v = weight.shape[0]
    lse = torch.empty(n, dtype=acc, device=hidden2d.device)
    tgt = torch.empty(n, dtype=acc, device=hidden2d.device)
    tc, vc = _tile(n, v, hidden2d.shape[1], hidden2d.device)
    for t0 in range(0, n, tc):
        t1 = min(n, t0 + tc)
        h = _rows(hidden2d, index, t0, t1)
        tgt[t0:t1] = _target_logits(h, weight, bias, targets[t0:t1], acc, softcap)
        # per-tile logsumexps, folded once per token chunk
        parts = torch.empty(t1 - t0, -(-v // vc), dtype=acc, device=h.device)
        for j, v0 in enumerate(range(0, v, vc)):
            parts[:, j] = torch.logsumexp(_logit_tile(h, weight, bias, v0, min(v, v0 + vc), acc, softcap), dim=1)
        lse[t0:t1] = torch.logsumexp(parts, dim=1)
    return lse, tgt


def linear_backward(hidden2d, weight, bias, index, targets, lse, grad_tok, needs, softcap=None):
    """Per tile: ``P = -g * exp(logits - lse)`` in place, then ``dH += P @ W``, ``dW += P^T @ h``,
    ``db += sum(P)``; the one-hot part (``g`` at each target) is added once per token chunk. With
    softcap, P and the one-hot part are scaled by the cap's slope (:func:`cap_slope`)."""
    need_h, need_w, need_b = needs
    dtype, acc = hidden2d.dtype, accum_dtype(hidden2d.dtype)
    n = hidden2d.shape[0] if index is None else index.numel()
    v, hdim = weight.shape
    dhidden = torch.zeros_like(hidden2d) if need_h else None
    dweight = torch.zeros(v, hdim, dtype=acc, device=weight.device) if need_w else None
    dbias = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
    tc, vc = _tile(n, v, hidden2d.shape[1], hidden2d.device)
    for t0 in range(0, n, tc):
        t1 = min(n, t0 + tc)
        h, y, g = _rows(hidden2d, index, t0, t1), targets[t0:t1], grad_tok[t0:t1]
        dh = torch.zeros(t1 - t0, hdim, dtype=acc, device=h.device) if need_h else None
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            p = _logit_tile(h, weight, bias, v0, v1, acc, softcap)
            slope = None if softcap is None else cap_slope(p, softcap)
            p.sub_(lse[t0:t1, None]).exp_().mul_(-g[:, None])
            if slope is not None:
                p.mul_(slope)
            if need_b:
                dbias[v0:v1] += p.sum(0)
            p = p.to(dtype)
            if need_h:
                addmm_(dh, p, weight[v0:v1])
            if need_w:
                addmm_(dweight[v0:v1], p.t(), h)
            del p
        # the one-hot part, once per token chunk: g at each row's target
        if softcap is not None:
            g = g * cap_slope(_target_logits(h, weight, bias, y, acc, softcap), softcap)
        if need_b:
            dbias.index_add_(0, y, g)
        if need_w:
            dweight.index_add_(0, y, h.to(acc) * g[:, None])
        if need_h:
            dh.addcmul_(weight.index_select(0, y).to(acc), g[:, None])
            if index is None:
                dhidden[t0:t1] = dh
            else:
                dhidden.index_copy_(0, index[t0:t1], dh.to(dtype))
    return dhidden, cast(dweight, dtype), cast(dbias, dtype)


def logits_forward(logits2d, index, targets):
    acc = accum_dtype(logits2d.dtype)
    n = logits2d.shape[0] if index is None else index.numel()
    lse = torch.empty(n, dtype=acc, device=logits2d.device)
    tgt = torch.empty(n, dtype=acc, device=logits2d.device)
    starts, rows = _row_chunks(n, logits2d.shape[1], logits2d.device)
    for r0 in starts:
        r1 = min(n, r0 + rows)
        x = _rows(logits2d, index, r0, r1).to(acc)
        lse[r0:r1] = torch.logsumexp(x, dim=1)
        tgt[r0:r1] = x.gather(1, targets[r0:r1, None]).squeeze(1)
    return lse, tgt


# Rows per step of the in-place exp pass, which allocates nothing: 4 MiB, not the tile budget, so
# that each op has enough work to amortise its thread fork-join (2 threads, 1024 x 32000 float32,
# medians of 7 in three runs: 8-row steps 28.5-34.5 ms, 32-row steps 22.4-28.9 ms).
_EXP_CHUNK_BYTES = 4 << 20


def logits_exp_(logits2d, targets):
    """In place on float32/float64 logits ``(N, V)``: ``logits2d <- exp(logits2d - shift)``, with
    ``shift`` the row max. Returns ``(lse, target_logit, shift)``, each ``(N,)``. One exp pass serves
    forward and gradient: the group-chunked path then only scales rows (:func:`rowchunk.chunk_grads_`)."""
    n, v = logits2d.shape
    lse = torch.empty(n, dtype=logits2d.dtype, device=logits2d.device)
    shift = torch.empty_like(lse)
    tgt = logits2d.gather(1, targets[:, None]).squeeze(1)
    rows = max(1, _EXP_CHUNK_BYTES // (logits2d.element_size() * v))
    for r0 in range(0, n, rows):
        x = logits2d[r0:r0 + rows]
        m = x.amax(1)
        shift[r0:r0 + rows] = m
        lse[r0:r0 + rows] = x.sub_(m[:, None]).exp_().sum(1).log_().add_(m)
    return lse, tgt, shift


def logits_backward(logits2d, index, targets, lse, grad_tok, inplace):
    acc = accum_dtype(logits2d.dtype)
    n = logits2d.shape[0] if index is None else index.numel()
    if inplace:
        out = logits2d
        if index is not None:
            keep = torch.zeros(logits2d.shape[0], dtype=torch.bool, device=logits2d.device)
            keep[index] = True
            out[~keep] = 0
    else:
        out = torch.zeros_like(logits2d)
    starts, rows = _row_chunks(n, logits2d.shape[1], logits2d.device)
    for r0 in starts:
        r1 = min(n, r0 + rows)
        x = _rows(logits2d, index, r0, r1)
        x = x.to(acc, copy=not (inplace and index is None))
        _to_grad_(x, targets[r0:r1], 0, lse[r0:r1], grad_tok[r0:r1])
        if index is None:
            if x.data_ptr() != out[r0:r1].data_ptr():
                out[r0:r1] = x
        else:
            out.index_copy_(0, index[r0:r1], x.to(out.dtype))
    return out
