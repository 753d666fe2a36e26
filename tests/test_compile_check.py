"""Every Triton kernel compiles for sm_90 with every config the autotuner may pick (no GPU needed),
within the H100's shared memory, and the float32 configs without spilling registers."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")
import torch  # noqa: E402

from nca_kernels import compile_check  # noqa: E402
from nca_kernels.backends.triton import tuning  # noqa: E402
from nca_kernels.compile_check import matrix_unit, ptxas_usage, widest_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Shared memory one block may use on sm_90 (227 KiB): a config above it can never launch.
SM90_SHARED = 227 * 1024
LINE = re.compile(r"ok   (?P<kernel>\w+) (?P<schedule>tiles |tokens |vocab )?(?P<dtype>\S+) (?P<config>.*) "
                  r"shared=(?P<shared>\d+)B registers=(?P<registers>\d+) spilled=(?P<spilled>\d+)B dot=(?P<dot>\w+) "
                  r"load=(?P<load>\d+)B")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nca_kernels.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1] == "compile_check: 0 failure(s) for sm_90"
    return [m.groupdict() for m in map(LINE.match, proc.stdout.splitlines()) if m]


def test_compile_check_passes_for_sm90(report):
    # every config once, and the first 16-bit config again in its extra dtypes (see jobs())
    forward = len(tuning.HOPPER_LINEAR + tuning.FLOAT32_LINEAR) + 1  # fp16
    backward = 3 * (len(tuning.HOPPER_LINEAR_BACKWARD + tuning.FLOAT32_LINEAR_BACKWARD) + 2)  # fp16, fp32 dW
    from_logits = 2 * (len(tuning.HOPPER_ROW) + 4)  # fp16, fp32, unaligned bf16 and fp32 rows
    assert len(report) == forward + backward + from_logits
    assert {r["dtype"] for r in report} == {"bf16", "fp16", "fp32", "bf16+fp32dw", "bf16+odd", "fp32+odd"}
    assert {r["kernel"] for r in report if r["dtype"].endswith("+odd")} == {"logits_forward_kernel",
                                                                           "logits_backward_kernel"}
    assert all(0 < int(r["registers"]) <= 255 for r in report)


def test_every_kernel_is_compiled_in_every_input_dtype(report):
    dtypes = defaultdict(set)
    for r in report:
        dtypes[r["kernel"], r["schedule"]].add(r["dtype"])
    assert len(dtypes) == 6  # forward, three backward schedules, two from-logits kernels
    assert all({"bf16", "fp16", "fp32"} <= d for d in dtypes.values()), dict(dtypes)
    assert all("bf16+fp32dw" in d for (kernel, _), d in dtypes.items() if kernel == "linear_backward_kernel")


def test_every_config_fits_in_sm90_shared_memory(report):
    over = [r for r in report if int(r["shared"]) > SM90_SHARED]
    assert not over, over


def test_float32_configs_do_not_spill(report):
    float32 = [r for r in report if r["dtype"] == "fp32" and r["kernel"].startswith("linear")]
    per_kernel = len(tuning.FLOAT32_LINEAR)
    assert len(float32) == per_kernel + 3 * len(tuning.FLOAT32_LINEAR_BACKWARD)
    spilling = [r for r in float32 if int(r["spilled"])]
    assert not spilling, spilling


def test_every_kernel_and_dtype_has_a_config_without_spills(report):
    best = defaultdict(lambda: float("inf"))
    for r in report:
        key = (r["kernel"], r["schedule"], r["dtype"])
        best[key] = min(best[key], int(r["spilled"]))
    first_only = {k for k in best if k[2] != "bf16"}  # compiled with one config: the list's first
    assert not [k for k, v in best.items() if v and k not in first_only], dict(best)


def test_16bit_products_run_on_hoppers_warpgroup_mma(report):
    """Every tl.dot of the fused kernels in 16 bits is a wgmma (mma.sync runs at half its rate on
    sm_90); float32 (IEEE) runs on the CUDA cores; the from-logits kernels have no product."""
    linear = [r for r in report if r["kernel"].startswith("linear")]
    assert {r["dot"] for r in linear if r["dtype"] != "fp32"} == {"wgmma"}
    assert {r["dot"] for r in linear if r["dtype"] == "fp32"} == {"fma"}
    assert {r["dot"] for r in report if r["kernel"].startswith("logits")} == {"fma"}


def test_every_kernel_loads_16_bytes_at_a_time(report):
    """With V and the row strides multiples of 16 (as on the GPU: the matmul schedule's logit tiles
    are whole 128-column blocks), every kernel's widest global load is 128 bits; the from-logits
    kernels' also on rows of any length and alignment (``+odd``: before they split each row at its
    first 16-byte boundary, these loaded one element at a time, their widest load the 8-byte index)."""
    assert {r["load"] for r in report} == {"16"}


def test_widest_load_reads_vector_and_async_copies():
    assert widest_load("ld.global.b16 {%rs1}, [%rd1];\n@%p ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd2];") == 16
    assert widest_load("ld.global.nc.v2.f32 {%f1, %f2}, [%rd1];") == 8
    assert widest_load("cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;") == 16
    assert widest_load("st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};") == 0


def test_matrix_unit_names_what_the_product_became():
    assert matrix_unit("wgmma.fence.sync.aligned;\nwgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "wgmma"
    assert matrix_unit("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert matrix_unit("fma.rn.f32 %f3, %f1, %f2, %f3;") == "fma"


def test_main_reports_each_compile_in_a_fresh_cache(monkeypatch, capsys):
    """main() on stand-in compiles: one line with every field, in a fresh cache removed afterwards,
    and a failing compile reported and counted."""
    from triton import knobs

    caches = []

    def fake_compile(kernel, config, dtype, flags):
        caches.append(knobs.cache.dir)
        assert os.path.isdir(knobs.cache.dir) and not os.listdir(knobs.cache.dir)
        ptx = "mma.sync.aligned.m16n8k16;\nld.global.v2.b32 {%r1, %r2}, [%rd1];"
        return SimpleNamespace(metadata=SimpleNamespace(shared=1024), asm={"ptx": ptx}), 77, 123

    kernel = SimpleNamespace(fn=SimpleNamespace(__name__="some_kernel"))
    default_cache = knobs.cache.dir
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(compile_check, "jobs", lambda: [(kernel, "CONFIG", "bf16", {"SCHEDULE": "tiles"})])
    monkeypatch.setattr(compile_check, "compile_and_report", fake_compile)
    assert compile_check.main() == 0
    line, last = capsys.readouterr().out.splitlines()
    fields = LINE.match(line).groupdict()
    assert (fields["kernel"], fields["schedule"], fields["dtype"], fields["config"]) == (
        "some_kernel", "tiles ", "bf16", "CONFIG")
    assert (fields["shared"], fields["registers"], fields["spilled"], fields["dot"], fields["load"]) == (
        "1024", "77", "123", "mma", "8")
    assert last == "compile_check: 0 failure(s) for sm_90"
    assert caches[0] != default_cache and not os.path.exists(caches[0]) and knobs.cache.dir == default_cache

    def failing_compile(*args):
        raise RuntimeError("ptxas fell over")

    monkeypatch.setattr(compile_check, "compile_and_report", failing_compile)
    assert compile_check.main() == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL some_kernel tiles bf16 CONFIG") and "ptxas fell over" in out
    assert out.splitlines()[-1] == "compile_check: 1 failure(s) for sm_90"


def test_compile_check_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "nca_kernels.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward", [False, True])
def test_autotuner_tries_the_configs_of_the_weight_dtype(dtype, backward):
    sixteen = tuning.HOPPER_LINEAR_BACKWARD if backward else tuning.HOPPER_LINEAR
    float32 = tuning.FLOAT32_LINEAR_BACKWARD if backward else tuning.FLOAT32_LINEAR
    weight = torch.empty(3, 2, dtype=dtype)
    pruned = tuning.by_dtype(sixteen + float32, {"weight_ptr": weight, "hidden_ptr": weight}, SCHEDULE="tiles")
    assert pruned == (float32 if dtype == torch.float32 else sixteen)


def test_triton_autotuner_calls_the_pruning_with_the_launch_arguments():
    """Through Triton's own autotuner (its pruning hook is what the kernels rely on)."""
    import triton

    @triton.jit
    def kernel(weight_ptr, H):
        pass

    tuner = triton.autotune(configs=tuning.HOPPER_LINEAR + tuning.FLOAT32_LINEAR, key=["H"],
                            prune_configs_by={"early_config_prune": tuning.by_dtype})(kernel)
    for dtype, want in [(torch.float32, tuning.FLOAT32_LINEAR), (torch.bfloat16, tuning.HOPPER_LINEAR)]:
        tuner.nargs = {"weight_ptr": torch.empty(2, dtype=dtype), "H": 16}
        assert tuner.prune_configs({}) == want


@pytest.mark.parametrize("module, kernel", [("linear_forward", "linear_forward_kernel"),
                                            ("linear_backward", "linear_backward_kernel")])
def test_the_fused_kernels_autotune_with_the_dtype_pruning(module, kernel):
    tuner = getattr(importlib.import_module(f"nca_kernels.backends.triton.{module}"), kernel)
    assert tuner.early_config_prune is tuning.by_dtype


def test_ptxas_report_is_read_or_refused():
    log = ("ptxas info    : Function properties for k\n    48 bytes stack frame, 40 bytes spill stores, "
           "44 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\n")
    assert ptxas_usage(log) == [(255, 84)]
    assert ptxas_usage(log + log.replace("255", "40").replace("44 bytes", "0 bytes")) == [(255, 84), (40, 40)]
    unpaired = log + "ptxas info    : Used 64 registers\n"
    for bad in ("ptxas info    : 11 bytes gmem\n", log.split("ptxas info    : Used")[0], unpaired):
        with pytest.raises(ValueError, match="no register and spill count"):
            ptxas_usage(bad)



def test_from_logits_backward_stores_vectors_only_where_out_rows_align():
    """On unaligned rows the backward's loads are 16-byte vectors either way (its split follows the
    logits rows); its stores only when the output rows sit as the logits rows do (``OUT_ALIGNED``:
    in place, say), else one element at a time, which is still correct. (Compiled in a process
    without the interpreter, as the report is.)"""
    script = ("import re; from nca_kernels import compile_check as cc; "
              "from nca_kernels.backends.triton.logits import _backward; "
              "from nca_kernels.backends.triton.tuning import HOPPER_ROW\n"
              "for aligned in (True, False):\n"
              "    ptx = cc.compile_one(_backward, HOPPER_ROW[0], 'bf16+odd', {'OUT_ALIGNED': aligned}).asm['ptx']\n"
              "    print(aligned, cc.widest_load(ptx), bool(re.search(r'st\\.global(\\.\\w+)*\\.v4', ptx)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "16", "True", "False", "16", "False"]
