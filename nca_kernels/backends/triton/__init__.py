"""Triton backend: one-pass from-logits kernels, and fused LM-head kernels that never write logits.

The four passes of the backend protocol (see :mod:`nca_kernels.backends`). The linear passes run,
by default, as cuBLAS (tokens x vocab) tiles reduced by the from-logits kernels (``rowchunk``,
faster on the H100 than the fused kernels); the fused kernels run them with
``config.backward="fused"``, ``filter_eps`` or ``deterministic`` (see :mod:`nca_kernels.config`),
except for capped logits (``softcap``), which the fused kernels do not compute.
Runs on CUDA, and on CPU only under ``TRITON_INTERPRET=1`` (set before this module is imported).
Inputs in bf16, fp16 or fp32 accumulate in float32; float64 inputs, which the GPU tensor cores do
not serve, go to the chunked PyTorch backend. Under the interpreter (triton 3.7) float32 -> bf16 casts round toward
zero where GPUs round to nearest even, so 16-bit results there carry up to twice the rounding.
"""

from __future__ import annotations

import os
import sys

import torch

from ... import config
from .. import rowchunk, torch_chunked
from ..rowchunk import every_row
from . import linear_backward as _bwd
from . import linear_forward as _fwd
from . import logits as _logits
from . import tuning

__all__ = ["available", "linear_backward", "linear_forward", "logits_backward", "logits_forward"]


def available(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if tuning.INTERPRET:
            return None
        return "TRITON_INTERPRET=1 was set after the triton backend was imported; set it before importing"
    return f"backend 'triton' needs a CUDA device (on CPU only under TRITON_INTERPRET=1), got {device}"


def _contiguous_rows(x):
    """``x`` with unit stride along its last dimension (row stride free; a bias, which the fused
    kernels read without a stride, made contiguous); None stays None."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _fused_schedule(softcap) -> bool:
    """Whether the fused kernels, which never write a tile, run the linear passes: when asked for
    (``config.backward="fused"``, or an option only they have: ``filter_eps``, ``deterministic``)
    and the logits are not capped, which they do not do. Capped logits always take the matmul
    schedule, in every mode: it filters nothing, and its linear passes use no atomics."""
    asked = config.backward == "fused" or config.deterministic or bool(config.filter_eps)
    return asked and softcap is None


def linear_forward(hidden2d, weight, bias, index, targets, softcap=None):
    if hidden2d.dtype == torch.float64:
        return torch_chunked.linear_forward(hidden2d, weight, bias, index, targets, softcap)
    if not _fused_schedule(softcap):
        return rowchunk.linear_forward(sys.modules[__name__], hidden2d, weight, bias, index, targets, softcap)
    return _fwd.linear_forward(_contiguous_rows(hidden2d), weight.contiguous(), _contiguous_rows(bias),
                               every_row(index, hidden2d.shape[0], hidden2d.device), targets)


def linear_backward(hidden2d, weight, bias, index, targets, lse, grad_tok, needs, softcap=None):
    if hidden2d.dtype == torch.float64:
        return torch_chunked.linear_backward(hidden2d, weight, bias, index, targets, lse, grad_tok, needs, softcap)
    if not _fused_schedule(softcap):
        return rowchunk.linear_backward(sys.modules[__name__], hidden2d, weight, bias, index, targets, lse, grad_tok,
                                        needs, softcap)
    return _bwd.linear_backward(_contiguous_rows(hidden2d), weight.contiguous(), _contiguous_rows(bias),
                                every_row(index, hidden2d.shape[0], hidden2d.device), targets, lse, grad_tok, needs)


def logits_forward(logits2d, index, targets):
    if logits2d.dtype == torch.float64:
        return torch_chunked.logits_forward(logits2d, index, targets)
    return _logits.logits_forward(_contiguous_rows(logits2d), every_row(index, logits2d.shape[0], logits2d.device),
                                  targets)


def logits_backward(logits2d, index, targets, lse, grad_tok, inplace):
    if torch_chunked.takes_logits_backward(logits2d, inplace):
        return torch_chunked.logits_backward(logits2d, index, targets, lse, grad_tok, inplace)
    return _logits.logits_backward(_contiguous_rows(logits2d), every_row(index, logits2d.shape[0], logits2d.device),
                                   targets, lse, grad_tok, inplace)
