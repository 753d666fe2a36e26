"""Fused linear forward: per-token logsumexp and target logit, logits never written.

Programs cover ``BLOCK_N`` response tokens (hidden rows gathered through ``index``; ignored
tokens are never loaded) times one contiguous split of the vocabulary. Each walks its split in
``BLOCK_V`` tiles computed with ``tl.dot`` and folds them into an online logsumexp; the program
whose split holds a token's label stores its logit. The splits' partial logsumexps (a
``(splits, N)`` float32 buffer) reduce on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .tiles import logit_tile


@triton.autotune(configs=tuning.linear(), key=["H", "V"], prune_configs_by={"early_config_prune": tuning.by_dtype})
@triton.jit
def linear_forward_kernel(hidden_ptr, weight_ptr, bias_ptr, index_ptr, target_ptr, part_ptr, tgt_ptr,
                          N, V, H, v_per_split, stride_h, stride_w,
                          HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """part ``(splits, N)`` <- logsumexp of each split; tgt ``(N,)`` <- the target logit."""
    split = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    targets = tl.load(target_ptr + offs_n, mask=mask_n, other=-1)
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        logits = logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, v0, mask_n, offs_v < v_hi, H,
                            stride_h, stride_w, HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with only -inf so far (bias)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(offs_v[None, :] == targets[:, None], logits, 0.0), axis=1)
    tl.store(part_ptr + split * N + offs_n, m + tl.log(s), mask=mask_n)
    mine = (targets >= v_lo) & (targets < v_hi)
    tl.store(tgt_ptr + offs_n, tgt, mask=mask_n & mine)


def dot_options(dtype: torch.dtype) -> dict:
    """Constexprs that make ``tl.dot`` exact for the input dtype (see :mod:`.tiles`)."""
    return dict(UPCAST=tuning.INTERPRET, PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits: about 16 full waves of 128-token programs, so the last wave's tail is small."""
    if device.type != "cuda":
        return 2 if v > 32 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(v, 1024), triton.cdiv(16 * sms, triton.cdiv(n, 128))))


def linear_forward(hidden2d, weight, bias, index, targets):
    """``(lse, target_logit)``, float32 ``(N,)``, of the rows ``hidden2d[index]`` (M, H) against weight (V, H)."""
    n, (v, h) = index.numel(), weight.shape
    lse = torch.empty(n, dtype=torch.float32, device=hidden2d.device)
    tgt = torch.empty_like(lse)
    if n == 0:
        return lse, tgt
    splits = _splits(n, v, hidden2d.device)
    align = max(c.kwargs["BLOCK_V"] for c in tuning.linear())  # whole tiles for every config
    v_per_split = triton.cdiv(triton.cdiv(v, splits), align) * align
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty(splits, n, dtype=torch.float32, device=hidden2d.device)
    linear_forward_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](
        hidden2d, weight, bias, index, targets, part, tgt, n, v, h, v_per_split,
        hidden2d.stride(0), weight.stride(0), HAS_BIAS=bias is not None, **dot_options(weight.dtype),
    )
    return (part[0] if splits == 1 else torch.logsumexp(part, dim=0)), tgt
