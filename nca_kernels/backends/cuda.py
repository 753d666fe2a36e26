"""CUDA backend: the compiled from-logits kernels of ``csrc/``.

The extension is ``nca_kernels._C``, built by ``setup.py`` when a CUDA build of torch and nvcc
are present; without it, a source checkout is compiled once at first use with
``torch.utils.cpp_extension.load``. The logits passes run the kernels (float32, float16,
bfloat16; float64 stays on the torch backend's passes); the linear passes are
:mod:`~nca_kernels.backends.rowchunk` chunks (cuBLAS matmul into a buffer, these kernels on it).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from . import rowchunk, torch_chunked

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
BUILD_HINT = (
    "to build it, install a CUDA build of torch and nvcc, then run `pip install -e . --no-build-isolation` in a "
    "source checkout (or just import from a source checkout: the extension then JIT-compiles at first use)"
)


@functools.cache
def _extension():
    """The compiled module, or a string saying why there is none (the JIT build is tried once)."""
    try:
        from .. import _C

        return _C
    except ImportError:
        missing = "backend 'cuda' is unusable: the extension nca_kernels._C is not built"
    if torch.version.cuda is None:
        return f"{missing} and torch {torch.__version__} is a CPU build; {BUILD_HINT}"
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        return f"{missing} and nvcc was not found for a JIT build (set CUDA_HOME); {BUILD_HINT}"
    if not (_CSRC / "bindings.cpp").is_file():
        return f"{missing} and no csrc/ sources lie next to the package for a JIT build; {BUILD_HINT}"
    sources = sorted(str(p) for p in _CSRC.glob("*.cu")) + [str(_CSRC / "bindings.cpp")]
    try:
        return load(name="nca_kernels_cuda", sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
    except Exception as exc:  # compiler or linker failure: report it as the reason
        return f"{missing} and its JIT build failed: {exc}"


def available(device: torch.device) -> str | None:
    if device.type != "cuda":  # before the extension: no JIT build for tensors it could not take
        return f"backend 'cuda' needs tensors on a CUDA device, got device {device}"
    ext = _extension()
    return ext if isinstance(ext, str) else None


def logits_forward(logits2d, index, targets):
    if logits2d.dtype == torch.float64:
        return torch_chunked.logits_forward(logits2d, index, targets)
    lse, tgt = _extension().logits_forward(logits2d, index, targets)
    return lse, tgt


def logits_backward(logits2d, index, targets, lse, grad_tok, inplace):
    if torch_chunked.takes_logits_backward(logits2d, inplace):
        return torch_chunked.logits_backward(logits2d, index, targets, lse, grad_tok, inplace)
    return _extension().logits_backward(logits2d, index, targets, lse, grad_tok, inplace)


linear_forward = functools.partial(rowchunk.linear_forward, sys.modules[__name__])
linear_backward = functools.partial(rowchunk.linear_backward, sys.modules[__name__])
