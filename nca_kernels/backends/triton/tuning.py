"""Block shapes, warps and stages the autotuner may pick, per kernel.

On a GPU every kernel is autotuned over its list, keyed on ``H`` and ``V`` (and the argument
dtypes). The fused linear kernels hold two lists, one for 16-bit inputs and one for float32, and
try only the one of the weight's dtype (:func:`by_dtype`). Under ``TRITON_INTERPRET=1`` each kernel
gets one small config: multi-config autotuning needs a GPU benchmark, and small blocks keep the
interpreter quick. :mod:`nca_kernels.compile_check` compiles every kernel for sm_90 with every
config listed here and reports the registers and spills of each.
"""

from __future__ import annotations

import os

import torch
import triton

#: True when kernels run in the Triton interpreter (read once, as ``@triton.jit`` does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(rows, names):
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


_TILE = ("BLOCK_N", "BLOCK_V", "BLOCK_K")
_ROW = ("BLOCK_V",)

#: (BLOCK_N tokens, BLOCK_V vocab, BLOCK_K hidden, warps, stages) for the fused linear kernels.
HOPPER_LINEAR = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 4)], _TILE)
#: The backward holds a logit tile and two partial products: smaller tiles, fewer stages. A wider
#: tile halves the atomic adds on one side (BLOCK_V: dH, BLOCK_N: dW) at some register spilling.
HOPPER_LINEAR_BACKWARD = _configs(
    [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (256, 128, 32, 8, 3),
     (128, 256, 32, 8, 3)], _TILE
)
#: float32 inputs multiply in IEEE float32 on the CUDA cores, with the dot operands in registers:
#: the 16-bit tiles spill there (ptxas for sm_90: up to 80 KB per thread in the backward). These
#: compile without spilling for the forward and for every backward schedule (triton 3.6 and 3.7).
FLOAT32_LINEAR = _configs([(128, 64, 32, 8, 2), (64, 64, 32, 4, 2), (32, 128, 32, 4, 2), (64, 64, 16, 8, 2)], _TILE)
FLOAT32_LINEAR_BACKWARD = _configs(
    [(64, 64, 16, 8, 1), (16, 128, 16, 4, 2), (32, 64, 16, 4, 2), (64, 32, 16, 4, 2)], _TILE
)
#: (BLOCK_V vocab chunk, warps, stages) for the row-wise from-logits kernels.
HOPPER_ROW = _configs([(2048, 4, 2), (4096, 8, 2), (8192, 8, 2)], _ROW)

INTERPRET_LINEAR = _configs([(16, 16, 16, 1, 1)], _TILE)
INTERPRET_ROW = _configs([(32, 1, 1)], _ROW)


def linear(backward: bool = False) -> list[triton.Config]:
    """Configs of the fused linear kernels for the current mode: both dtype lists on a GPU."""
    if INTERPRET:
        return INTERPRET_LINEAR
    return HOPPER_LINEAR_BACKWARD + FLOAT32_LINEAR_BACKWARD if backward else HOPPER_LINEAR + FLOAT32_LINEAR


def for_float32(config: triton.Config) -> bool:
    """Whether ``config`` is one of the float32 inputs' configs."""
    return any(config is c for c in FLOAT32_LINEAR + FLOAT32_LINEAR_BACKWARD)


def by_dtype(configs, named_args, **kwargs) -> list[triton.Config]:
    """Autotuner pruning: the configs of the weight's dtype (float32, or 16-bit). The autotuning
    key holds the arguments' dtypes, so each dtype is tuned once."""
    want = named_args["weight_ptr"].dtype == torch.float32
    return [c for c in configs if for_float32(c) == want]


def row() -> list[triton.Config]:
    """Configs of the from-logits kernels for the current mode."""
    return INTERPRET_ROW if INTERPRET else HOPPER_ROW
