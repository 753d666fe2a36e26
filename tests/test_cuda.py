"""CUDA backend: the kernels compile for sm_90 (nvcc, no GPU needed), the backend explains how to
build itself when unusable, and on a GPU its passes match the float64 reference."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import nca_kernels
from nca_kernels import reference
from nca_kernels.backends import cuda, torch_chunked, unavailable_reason

from .conftest import make_batch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
HAS_CUDA = torch.cuda.is_available()


def gpu(test):
    """Marks a test ``gpu`` and skips it without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    candidate = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


# ----------------------------------------------------------------------------- compile (CPU)


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_kernels_compile_for_sm90_without_warnings(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    cmd = [nvcc, "-c", "-arch=sm_90", "-O3", "-std=c++17", "-Werror", "all-warnings", "-Xptxas", "-v",
           "-Xcompiler", "-Wall,-Wextra,-Werror", str(CSRC / source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in log.lower(), log
    check = pytest.importorskip("nca_kernels.compile_check", reason="it reads ptxas' report; needs triton")
    usage = check.ptxas_usage(log)  # every template instance: bf16, fp16, fp32
    assert len(usage) == log.count("Compiling entry function") >= 3
    assert all(spilled == 0 for _, spilled in usage), log


def test_there_are_kernels_to_compile():
    assert sorted(p.name for p in CSRC.glob("*.cu")), "csrc/ holds no .cu kernels"


# ----------------------------------------------------------------------------- python side (CPU)


def test_reasons_name_the_problem_and_the_build(monkeypatch):
    """CPU tensors are refused before any build is tried; on a CUDA device an unbuilt extension's
    reason says how to build it (a CPU torch here: no extension can exist)."""
    built = []
    monkeypatch.setattr(cuda, "_extension", lambda: built.append(1) or "unbuilt")
    want = "backend 'cuda' needs tensors on a CUDA device, got device cpu"
    assert unavailable_reason("cuda", torch.device("cpu")) == want
    assert not built and unavailable_reason("cuda", torch.device("cuda")) == "unbuilt"
    monkeypatch.undo()
    if torch.version.cuda is None:
        reason = unavailable_reason("cuda", torch.device("cuda"))
        assert "CPU build" in reason and "pip install -e . --no-build-isolation" in reason


def test_backend_cuda_on_cpu_raises_runtime_error():
    b = make_batch(dtype=torch.float32, seed=0)
    expected = "backend 'cuda' needs tensors on a CUDA device"
    with pytest.raises(RuntimeError, match=expected):
        nca_kernels.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, beta=0.1, alpha=0.5,
                                   backend="cuda", recompute=False)
    with pytest.raises(RuntimeError, match=expected):
        nca_kernels.sequence_logprobs_from_logits(b.hidden @ b.weight.t(), b.labels, backend="cuda")


def test_float64_stays_on_the_torch_passes():
    """float64 never reaches the kernels (they have no fp64 variant): same numbers as the torch backend."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64)
    index, targets = torch.tensor([1, 4, 5]), torch.tensor([0, 10, 3])
    lse, tgt = cuda.logits_forward(logits, index, targets)
    ref_lse, ref_tgt = torch_chunked.logits_forward(logits, index, targets)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    torch.testing.assert_close(tgt, ref_tgt, rtol=0, atol=0)
    grad = torch.rand(3, generator=g, dtype=torch.float64)
    out = cuda.logits_backward(logits.clone(), index, targets, lse, grad, True)
    torch.testing.assert_close(out, torch_chunked.logits_backward(logits, index, targets, lse, grad, False))


def test_in_place_on_column_strided_logits_stays_on_the_torch_passes(monkeypatch):
    """The kernels write rows of unit stride: in place on a transposed buffer (``inplace_backward``
    on such logits) the torch passes overwrite the logits themselves, without the extension."""
    monkeypatch.setattr(cuda, "_extension", lambda: pytest.fail("the kernels were called"))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 6, generator=g).t()
    index, targets = torch.tensor([1, 4, 5]), torch.tensor([0, 10, 3])
    lse, _ = torch_chunked.logits_forward(logits, index, targets)
    grad = torch.rand(3, generator=g)
    want = torch_chunked.logits_backward(logits, index, targets, lse, grad, False)
    out = cuda.logits_backward(logits, index, targets, lse, grad, True)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(logits, want)


# ----------------------------------------------------------------------------- equivalence (GPU)

TOL = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (1e-2, 1e-7), torch.float16: (2e-3, 1e-7)}


def _logits(rows, v, dtype, scale=4.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(rows, v, generator=g, device="cuda") * scale).to(dtype)


def _selection(rows, v, subset, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    index = torch.randperm(rows, generator=g, device="cuda")[: rows // 2].sort().values if subset else None
    n = rows if index is None else index.numel()
    return index, torch.randint(0, v, (n,), generator=g, device="cuda")


def _ref_stats(logits, index, targets):
    x = logits.double() if index is None else logits.double()[index]
    return torch.logsumexp(x, 1), x.gather(1, targets[:, None]).squeeze(1)


def _ref_grad(logits, index, targets, lse, grad):
    """float64 ``grad * (onehot - softmax)`` on the selected rows, zero elsewhere."""
    x = logits.double() if index is None else logits.double()[index]
    rows = -torch.exp(x - lse.double()[:, None]) * grad.double()[:, None]
    rows.scatter_add_(1, targets[:, None], grad.double()[:, None])
    out = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    out[slice(None) if index is None else index] = rows
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [37, 1024, 32003])
@pytest.mark.parametrize("subset", [False, True])
@gpu
def test_logits_forward(dtype, v, subset):
    logits = _logits(24, v, dtype)
    index, targets = _selection(24, v, subset)
    lse, tgt = cuda.logits_forward(logits, index, targets)
    assert lse.dtype == tgt.dtype == torch.float32
    ref_lse, ref_tgt = _ref_stats(logits, index, targets)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(tgt.double(), ref_tgt, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [37, 1024, 32003])
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@gpu
def test_logits_backward(dtype, v, subset, inplace):
    logits = _logits(24, v, dtype)
    index, targets = _selection(24, v, subset)
    lse = _ref_stats(logits, index, targets)[0].float()
    grad = torch.randn(lse.numel(), device="cuda")
    ref = _ref_grad(logits, index, targets, lse, grad)
    before = logits.clone()
    out = cuda.logits_backward(logits, index, targets, lse, grad, inplace)
    assert out.dtype == dtype and out.shape == logits.shape
    assert (out.data_ptr() == logits.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(logits, before)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    if subset:  # rows outside the selection are exactly zero
        keep = torch.zeros(24, dtype=torch.bool, device="cuda")
        keep[index] = True
        assert not out[~keep].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@gpu
def test_misaligned_and_strided_rows(dtype, inplace):
    """Row starts off the 16-byte grid (column slice of a wider buffer), out of place: different skews."""
    wide = _logits(16, 1031, dtype)
    logits = wide[:, 3:1030]  # row stride 1031, base 3 elements in
    index, targets = _selection(16, logits.shape[1], True)
    lse, tgt = cuda.logits_forward(logits, index, targets)
    ref_lse, ref_tgt = _ref_stats(logits, index, targets)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(tgt.double(), ref_tgt, rtol=0, atol=0)
    grad = torch.randn(index.numel(), device="cuda")
    ref = _ref_grad(logits, index, targets, lse, grad)
    out = cuda.logits_backward(logits, index, targets, lse, grad, inplace)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    if inplace:  # the columns around the view are untouched
        assert torch.equal(wide[:, :3], _logits(16, 1031, dtype)[:, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@gpu
def test_extreme_logits_stay_finite(dtype):
    v = 4099
    logits = _logits(6, v, torch.float32, scale=1e4)
    logits[1] = -1e30  # a constant row
    logits[2] = -3e38
    logits[2, 17] = 3e38  # one huge logit, the rest at the other end of the range
    logits[3, ::2] = float("-inf")  # masked vocabulary
    logits = logits.to(dtype)
    targets = torch.tensor([5, 0, 17, 1, 4098, 2], device="cuda")
    lse, tgt = cuda.logits_forward(logits, None, targets)
    assert torch.isfinite(lse).all() and torch.isfinite(tgt).all()
    ref_lse, _ = _ref_stats(logits, None, targets)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    grad = torch.randn(6, device="cuda")
    out = cuda.logits_backward(logits, None, targets, lse, grad, False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _ref_grad(logits, None, targets, lse, grad),
                               rtol=TOL[dtype][0], atol=TOL[dtype][1])


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("average", [False, True])
@gpu
def test_sequence_logprobs_from_logits(dtype, average):
    b = make_batch(b=2, k=3, t=17, h=32, v=32003, device="cuda", seed=3)
    logits = (b.hidden.detach() @ b.weight.detach().t() * 3).to(dtype).requires_grad_(True)
    out = nca_kernels.sequence_logprobs_from_logits(logits, b.labels, average=average, backend="cuda")
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference.sequence_logprobs_from_logits(ref_logits, b.labels, average=average)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    w = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    assert _rel_err(logits.grad, ref_logits.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@gpu
def test_fused_nca_loss_matches_reference(dtype, recompute, bias):
    b = make_batch(b=3, k=4, t=33, h=64, v=1001, bias=bias, device="cuda", seed=7)
    ref_b = b.cast(torch.float64)
    kw = dict(beta=0.1, alpha=0.5, loss_type="nca")
    ref = reference.fused_nca_loss(ref_b.hidden, ref_b.weight, ref_b.labels, ref_b.rewards, ref_b.ref_logps,
                                   bias=ref_b.bias, **kw)
    ref_grads = torch.autograd.grad(ref, ref_b.leaves())
    run = b.cast(dtype)
    # a budget of ~40 rows: several prompt groups per run, and groups split into recomputed sub-chunks
    with nca_kernels.chunk_bytes(group=40 * 1001 * run.weight.element_size()):
        loss = nca_kernels.fused_nca_loss(run.hidden, run.weight, run.labels, run.rewards, run.ref_logps,
                                          bias=run.bias, recompute=recompute, backend="cuda", **kw)
        grads = torch.autograd.grad(loss, run.leaves())
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        assert _rel_err(got, want) < tol
