"""Ahead-of-time compile of every Triton kernel of the package for Hopper (sm_90), no GPU needed.

``python -m nca_kernels.compile_check`` compiles each kernel with every config its autotuner may
pick (see :func:`jobs` for the dtypes), in a fresh cache so that ptxas runs for each, and prints
one line per compile with its shared memory, registers and spilled bytes (from ptxas' own report),
its matrix instructions (:func:`matrix_unit`) and its widest load; it exits non-zero if any compile
fails. Run it without ``TRITON_INTERPRET`` (the interpreter swaps the configs and kernels for Python).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
import time
import traceback

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
_INPUT = ("hidden_ptr", "weight_ptr", "bias_ptr", "logits_ptr", "out_ptr")
_INDEX = ("index_ptr", "target_ptr", "pos_ptr")
_STATS = ("lse_ptr", "grad_ptr", "part_ptr", "tgt_ptr", "db_ptr")
#: Integers the JIT sees divisible by 16 at typical LM-head sizes (H, V, row strides; the matmul
#: schedule's logit tiles are whole 128-column blocks): compiled with that hint, as the JIT
#: specialises them, so that loads vectorise as they will on the GPU. A ``"+odd"`` dtype compiles
#: without it: the from-logits kernels on rows of any length and alignment (an odd vocabulary).
_ALIGNED = ("H", "V", "stride_h", "stride_w", "stride_dh", "stride", "out_stride")


def _arg_type(name: str, dtype: str) -> str:
    """Triton signature type of a kernel argument, by the package's naming convention. ``dtype`` is
    the inputs' (``"bf16"``), or theirs and a float32 dW buffer's (``"bf16+fp32dw"``), or theirs
    in unaligned rows (``"bf16+odd"``)."""
    inputs, _, extra = dtype.partition("+")
    if name == "dw_ptr":
        return "*" + (extra.removesuffix("dw") if extra.endswith("dw") else inputs)
    if name in _INPUT:
        return "*" + inputs
    if name == "dh_ptr":  # float32 scratch, or the float32 dhidden itself
        return "*fp32"
    if name in _INDEX:
        return "*i64"
    if name in _STATS:
        return "*fp32"
    return "fp32" if name == "filter_eps" else "i32"


def _linear_flags(dtype: str) -> dict:
    from .backends.triton.linear_forward import dot_options

    inputs = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype.partition("+")[0]]
    return dict(HAS_BIAS=True, NEED_H=True, NEED_W=True, NEED_B=True, SCATTER_DH=dtype == "fp32",
                **dot_options(inputs))


def _forward_flags(dtype: str) -> dict:
    return {k: v for k, v in _linear_flags(dtype).items() if k in ("HAS_BIAS", "UPCAST", "PRECISION")}


def kernels():
    """(autotuned kernel, flags(dtype) -> constexprs) for every Triton kernel of the package."""
    from .backends.triton.linear_backward import SCHEDULES, linear_backward_kernel
    from .backends.triton.linear_forward import linear_forward_kernel
    from .backends.triton.logits import _backward, logits_forward_kernel

    backward = [(linear_backward_kernel, lambda d, s=s: {**_linear_flags(d), "SCHEDULE": s}) for s in SCHEDULES]
    return [
        (linear_forward_kernel, _forward_flags),
        *backward,
        (logits_forward_kernel, lambda d: {}),
        (_backward, lambda d: {"OUT_ALIGNED": True}),
    ]


def compile_one(kernel, config: triton.Config, dtype: str, flags: dict):
    """Compile ``kernel`` (an autotuned JIT function) for sm_90 with one config and input dtype."""
    fn = kernel.fn
    constexprs = {**flags, **config.kwargs}
    signature = {name: "constexpr" if name in constexprs else _arg_type(name, dtype) for name in fn.arg_names}
    ints = () if dtype.endswith("+odd") else _ALIGNED
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if name not in constexprs and (signature[name].startswith("*") or name in ints)}
    src = ASTSource(fn, signature, constexprs, aligned)
    return triton.compile(src, target=TARGET, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def jobs():
    """Every (kernel, config, dtype, flags) the autotuner may run. The float32 configs of the linear
    kernels in fp32; every other config in bf16, and the first 16-bit one also in fp16, in fp32 (the
    kernels without float32 configs), for the kernels that write dW in bf16 with a float32 dW, and for
    the from-logits kernels (those with a row ``stride``) in bf16 and fp32 on unaligned rows."""
    from .backends.triton.tuning import for_float32

    for kernel, flags in kernels():
        names = kernel.fn.arg_names
        own_float32 = any(map(for_float32, kernel.configs))
        every = ("bf16", "fp16") + ((), ("fp32",))[not own_float32] + ((), ("bf16+fp32dw",))["dw_ptr" in names]
        every += ((), ("bf16+odd", "fp32+odd"))["stride" in names]
        first = next(c for c in kernel.configs if not for_float32(c))
        for config in kernel.configs:
            dtypes = ("fp32",) if for_float32(config) else every if config is first else ("bf16",)
            for dtype in dtypes:
                yield kernel, config, dtype, flags(dtype)


def ptxas_usage(log: str) -> list[tuple[int, int]]:
    """(registers per thread, spill stores + loads in bytes) of each function in a ptxas ``-v`` report."""
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.findall(r"Used (\d+) registers", log)
    if not registers or len(registers) != len(spills):
        raise ValueError(f"no register and spill count per function in the ptxas report: {log!r}")
    return [(int(r), int(stores) + int(loads)) for r, (stores, loads) in zip(registers, spills)]


def matrix_unit(ptx: str) -> str:
    """What ``tl.dot`` became: Hopper's warpgroup MMA (``wgmma``), the older warp MMA (``mma``, half
    the tensor-core rate on sm_90), or neither (``fma``: CUDA cores, as for IEEE float32)."""
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"


def widest_load(ptx: str) -> int:
    """Bytes of the widest global-memory load per thread (``ld.global``, or ``cp.async`` to shared)."""
    plain = re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx)
    loads = [int(vector or 1) * int(bits) // 8 for vector, bits in plain]
    loads += [int(size, 16) for size in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?, 0x(\w+)", ptx)]
    return max(loads, default=0)


def compile_and_report(kernel, config: triton.Config, dtype: str, flags: dict):
    """:func:`compile_one`, and the registers and spilled bytes that ptxas reports for it. Needs a
    cache without this kernel (ptxas does not run on a hit): :func:`main` uses a fresh one."""
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = compile_one(kernel, config, dtype, flags)
    (usage,) = ptxas_usage(log.getvalue())
    return compiled, *usage


def main() -> int:
    from .backends.triton import tuning

    if tuning.INTERPRET:
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiled kernels)")
        return 2
    failures = 0
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope():
        knobs.cache.dir = cache
        for kernel, config, dtype, flags in jobs():
            start = time.perf_counter()
            label = " ".join(str(x) for x in (kernel.fn.__name__, flags.get("SCHEDULE", ""), dtype, config) if x)
            try:
                compiled, registers, spilled = compile_and_report(kernel, config, dtype, flags)
            except Exception:  # report every failure, then exit non-zero
                failures += 1
                print(f"FAIL {label}\n{traceback.format_exc()}", flush=True)
                continue
            print(f"ok   {label} shared={compiled.metadata.shared}B registers={registers} spilled={spilled}B "
                  f"dot={matrix_unit(compiled.asm['ptx'])} load={widest_load(compiled.asm['ptx'])}B "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    print(f"compile_check: {failures} failure(s) for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
