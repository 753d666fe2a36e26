"""Chunk budgets: how many bytes of logits may exist at once.

``tile_bytes``: one float32 logit tile of the chunked PyTorch backend (its minimal-memory
linear passes and its from-logits row chunks) and of the matmul-tiled backward that the Triton
backend uses by default (a tile's logits with its operand rows). None (the default) means 1 MiB on
CPU, where small tiles stay in cache, and 48 MiB on CUDA, where tiles are large enough for
efficient matmuls and the backward stays within 64 MiB of scratch.

``group_bytes``: one chunk of the group-chunked fast path (``recompute=False``): the logits of
whole prompt groups (in the input dtype), held from forward to gradient, with their matmul operand
rows. A group larger than this is split into token sub-chunks whose logits are recomputed, which
costs a fourth matmul. None (the default) packs groups into a chunk up to 192 MiB on CPU (4
responses x 256 tokens at V=32000 in float32 take 129 MiB) and 1 GiB on CUDA (4 x 512 tokens at
V=128256 in bf16: 0.5 GiB), and holds one larger group whole up to 1 GiB on both (on CPU, 2 x 256
tokens at V=128256 in float32 take 265 MB: recomputing them cost 1.55x the matmuls, against 1.03x).

Both can be set from the environment (``NCA_KERNELS_TILE_BYTES``, ``NCA_KERNELS_GROUP_BYTES``),
globally with :func:`set_chunk_bytes`, or for a block with :func:`chunk_bytes`.
"""

from __future__ import annotations

import contextlib
import os

tile_bytes: int | None = None
_DEFAULT_TILE_BYTES = {"cpu": 1 << 20, "cuda": 48 << 20}
group_bytes: int | None = None
_DEFAULT_GROUP_BYTES = {"cpu": (192 << 20, 1 << 30), "cuda": (1 << 30, 1 << 30)}  # (pack, cap)


def tile_budget(device) -> int:
    """The tile byte budget in force for ``device``."""
    if tile_bytes is not None:
        return tile_bytes
    return _DEFAULT_TILE_BYTES.get(device.type, _DEFAULT_TILE_BYTES["cpu"])


def group_budget(device) -> tuple[int, int]:
    """``(pack, cap)`` group-chunk bytes in force for ``device``: prompt groups join a chunk while
    it stays within ``pack``; one group is held whole up to ``cap``. A set budget is both."""
    if group_bytes is not None:
        return group_bytes, group_bytes
    return _DEFAULT_GROUP_BYTES.get(device.type, _DEFAULT_GROUP_BYTES["cpu"])


def set_chunk_bytes(*, tile: int | None = None, group: int | None = None) -> None:
    """Set the byte budgets globally (None keeps the current value)."""
    global tile_bytes, group_bytes
    for name, value in (("tile", tile), ("group", group)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int number of bytes, got {value!r}")
    tile_bytes = tile if tile is not None else tile_bytes
    group_bytes = group if group is not None else group_bytes


@contextlib.contextmanager
def chunk_bytes(*, tile: int | None = None, group: int | None = None):
    """Context manager form of :func:`set_chunk_bytes`; restores the previous budgets."""
    global tile_bytes, group_bytes
    saved = (tile_bytes, group_bytes)
    set_chunk_bytes(tile=tile, group=group)
    try:
        yield
    finally:
        tile_bytes, group_bytes = saved


# Triton backend options (nca_kernels.backends.triton).
#
# ``filter_eps``: the fused backward skips a (tokens x vocab) tile whose every logit-gradient entry
# is below it in magnitude (0 turns filtering off, the default). Measured error of 2**-12 on
# Zipf-like logits whose entries below it hold 6% of the mass: dH 4%, dW 0.7% (relative norm),
# for a 2.3x faster forward + backward (benchmarks/results/triton_h100.json).
# ``deterministic``: split backward passes without atomics (one over token tiles writes dH, one over
# vocabulary tiles writes dW and db), bitwise reproducible, slower. (The per-sequence sums use
# ``index_add_``, whose CUDA atomics may change the last bits of the log-probs between runs unless
# ``torch.use_deterministic_algorithms(True)``.) ``scratch_bytes``: the float32
# dH accumulator of the backward for 16-bit inputs covers at most this many bytes of token rows.
# ``backward``: the schedule of both linear passes. ``"matmul"`` (default): (tokens x vocab) tiles
# from cuBLAS, reduced by the from-logits kernels, and dH, dW from cuBLAS (scratch: one tile
# budget); ``"fused"``: the fused Triton forward and backward above, which never write a tile
# (the only ones that filter or are deterministic; either option also selects them, except for
# capped logits (``softcap``), which always take the matmul schedule).
# Environment: ``NCA_KERNELS_FILTER_EPS``, ``NCA_KERNELS_DETERMINISTIC`` (1/0),
# ``NCA_KERNELS_SCRATCH_BYTES``, ``NCA_KERNELS_TRITON_BACKWARD``; or :func:`set_triton_options` /
# :func:`triton_options`.

filter_eps: float = 0.0
deterministic: bool = False
scratch_bytes: int = 32 << 20
backward: str = "matmul"
_BACKWARDS = ("matmul", "fused")


def set_triton_options(*, filter_eps: float | None = None, deterministic: bool | None = None,
                       scratch_bytes: int | None = None, backward: str | None = None) -> None:
    """Set the Triton backend options globally (None keeps the current value)."""
    if filter_eps is not None and (isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float))
                                   or not 0 <= filter_eps < 1):
        raise ValueError(f"filter_eps must be a float in [0, 1), got {filter_eps!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if scratch_bytes is not None and (isinstance(scratch_bytes, bool) or not isinstance(scratch_bytes, int)
                                      or scratch_bytes <= 0):
        raise ValueError(f"scratch_bytes must be a positive int number of bytes, got {scratch_bytes!r}")
    if backward is not None and backward not in _BACKWARDS:
        raise ValueError(f"backward must be one of {_BACKWARDS}, got {backward!r}")
    values = {"filter_eps": filter_eps, "deterministic": deterministic, "scratch_bytes": scratch_bytes,
              "backward": backward}
    globals().update({name: value for name, value in values.items() if value is not None})


@contextlib.contextmanager
def triton_options(*, filter_eps: float | None = None, deterministic: bool | None = None,
                   scratch_bytes: int | None = None, backward: str | None = None):
    """Context manager form of :func:`set_triton_options`; restores the previous options."""
    saved = {name: globals()[name] for name in ("filter_eps", "deterministic", "scratch_bytes", "backward")}
    set_triton_options(filter_eps=filter_eps, deterministic=deterministic, scratch_bytes=scratch_bytes,
                       backward=backward)
    try:
        yield
    finally:
        set_triton_options(**saved)


# Weight-gradient accumulation for 16-bit weights, wherever dW is summed chunk by chunk: the triton
# and cuda backends' linear passes (token chunks, or the fused kernels' token tiles) and the
# group-chunked fast mode (prompt-group chunks) on any backend. The torch backend's recompute passes
# always sum in float32. ``"weight"`` (the default): each chunk's product is added to dW in the
# weight's dtype, no extra memory, one rounding per chunk. ``"float32"``: dW is summed in a float32
# buffer (4*V*H bytes beside the gradient) and rounded once. On a CPU model of the headline case's
# 11 bf16 token chunks, dW's error was about 2.5x naive's with "weight" (docs/benchmarks.md). In
# float32 mode a chunk's product is added unrounded where the matmul can write float32 from 16-bit
# operands (cuBLAS in recent torch, probed by ``backends.torch_chunked.wide_addmm``), else after one
# rounding to the weight's dtype.
# Environment: ``NCA_KERNELS_WEIGHT_GRAD_ACCUM``; or :func:`set_weight_grad_accum` /
# :func:`weight_grad_accumulation`.

weight_grad_accum: str = "weight"
_ACCUMS = ("weight", "float32")


def set_weight_grad_accum(mode: str) -> None:
    """Set the dW accumulation mode globally: ``"weight"`` or ``"float32"``."""
    global weight_grad_accum
    if mode not in _ACCUMS:
        raise ValueError(f"weight_grad_accum must be one of {_ACCUMS}, got {mode!r}")
    weight_grad_accum = mode


@contextlib.contextmanager
def weight_grad_accumulation(mode: str):
    """Context manager form of :func:`set_weight_grad_accum`; restores the previous mode."""
    saved = weight_grad_accum
    set_weight_grad_accum(mode)
    try:
        yield
    finally:
        set_weight_grad_accum(saved)


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("expected 1 or 0")
    return text == "1"


def _from_environment() -> None:
    """Apply the ``NCA_KERNELS_*`` variables through the setters above (surrounding spaces ignored, an
    empty value taken as unset); a bad value raises a ValueError that names the variable."""
    for name, parse, apply in (
        ("NCA_KERNELS_TILE_BYTES", int, lambda v: set_chunk_bytes(tile=v)),
        ("NCA_KERNELS_GROUP_BYTES", int, lambda v: set_chunk_bytes(group=v)),
        ("NCA_KERNELS_FILTER_EPS", float, lambda v: set_triton_options(filter_eps=v)),
        ("NCA_KERNELS_DETERMINISTIC", _flag, lambda v: set_triton_options(deterministic=v)),
        ("NCA_KERNELS_SCRATCH_BYTES", int, lambda v: set_triton_options(scratch_bytes=v)),
        ("NCA_KERNELS_TRITON_BACKWARD", str, lambda v: set_triton_options(backward=v)),
        ("NCA_KERNELS_WEIGHT_GRAD_ACCUM", str, set_weight_grad_accum),
    ):
        text = os.environ.get(name, "").strip()
        if text:
            try:
                apply(parse(text))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"environment variable {name}={os.environ[name]!r}: {exc}") from None


_from_environment()
