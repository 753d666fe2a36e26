"""The Triton backend against the float64 reference: on CPU under ``TRITON_INTERPRET=1``
(small shapes whose V and H are not block multiples), and on CUDA (``-m gpu``: bf16, fp16,
bigger shapes). The interpreter is chosen when kernels are decorated, so the variable must be
set before the kernels are imported: conftest.py sets it on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from nca_kernels import (
    chunk_bytes,
    config,
    fused_nca_loss,
    reference,
    sequence_logprobs,
    sequence_logprobs_from_logits,
)
from nca_kernels.backends import get_backend, unavailable_reason
from nca_kernels.losses import LOSS_TYPES

from .conftest import IGNORE, make_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if unavailable_reason("triton", torch.device(DEVICE)) is not None:
    pytest.skip(unavailable_reason("triton", torch.device(DEVICE)), allow_module_level=True)

from nca_kernels.backends.triton import logits as triton_logits  # noqa: E402
from nca_kernels.backends.triton import tuning  # noqa: E402
from nca_kernels.backends.triton.linear_backward import linear_backward_kernel  # noqa: E402
from nca_kernels.backends.triton.linear_forward import dot_options, linear_forward_kernel  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def grads(out, leaves, seed=0):
    """Gradients of ``sum(c * out)`` for fixed random weights c (float64 on CPU)."""
    c = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, leaves, c.to(out.device, out.dtype))


def assert_close(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), rtol=rtol, atol=atol)


def run_logprobs(batch, dtype, backend="triton", **kw):
    b = batch.cast(dtype)
    out = sequence_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, backend=backend, **kw)
    return (out, *grads(out, b.leaves()))


def ref_logprobs(batch, **kw):
    out = reference.sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=batch.bias, **kw)
    return (out, *grads(out, batch.leaves()))


# --- CPU (interpreter) and GPU: float32 against the float64 reference ------------------------------

# every backward schedule: cuBLAS tiles (the default), the fused kernel with atomics, and its
# deterministic split passes
SCHEDULES = {"matmul": {}, "fused": {"backward": "fused"}, "deterministic": {"deterministic": True}}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("bias,average", [(False, False), (True, True)])
def test_logprobs_and_grads_match_reference(bias, average, schedule):
    batch = make_batch(b=2, k=2, t=9, h=21, v=37, bias=bias, empty_seq=1, device=DEVICE, seed=1)
    with config.triton_options(**SCHEDULES[schedule]):
        got = run_logprobs(batch, torch.float32, average=average)
    want = ref_logprobs(batch, average=average)
    assert got[0].dtype == torch.float32
    assert got[1][1].abs().max() == 0  # the empty response sequence gets no hidden gradient
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_large_logits_stay_finite_and_exact():
    batch = make_batch(b=1, k=2, t=8, h=16, v=53, scale=3e3, device=DEVICE, seed=2)
    got = run_logprobs(batch, torch.float32)
    want = ref_logprobs(batch)
    assert want[0].abs().max() > 1e3  # the logits really are large
    assert all(torch.isfinite(x).all() for x in got)
    assert_close(got, want, rtol=1e-5, atol=2e-2)


def test_no_response_tokens_gives_zeros():
    batch = make_batch(b=1, k=2, t=5, h=16, v=37, device=DEVICE, seed=3)
    batch.labels[:] = IGNORE
    out, dh, dw = run_logprobs(batch, torch.float32)
    assert out.abs().max() == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_fused_loss_every_type(loss_type, recompute, small_tiles):
    k = 2 if loss_type in ("dpo", "nca_pair") else 3
    batch = make_batch(b=2, k=k, t=7, h=18, v=37, bias=True, ties=True, device=DEVICE, seed=4)
    kw = dict(beta=0.5, alpha=0.7, loss_type=loss_type)
    b = batch.cast(torch.float32)
    loss = fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, bias=b.bias, recompute=recompute,
                          backend="triton", **kw)
    want = reference.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps,
                                     bias=batch.bias, **kw)
    assert_close((loss, *torch.autograd.grad(loss, b.leaves())),
                 (want, *torch.autograd.grad(want, batch.leaves())), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v,average", [(45, False), (45, True), (7, False)])
def test_from_logits_matches_reference(v, average):
    """Large logits, a vocabulary smaller than one block, and -inf entries (masked vocabulary)."""
    batch = make_batch(b=2, k=2, t=6, v=v, empty_seq=0, device=DEVICE, seed=5)
    logits = (batch.hidden @ batch.weight.t() * 30).detach()
    logits[..., 1] = float("-inf")
    batch.labels[batch.labels == 1] = 0
    x = logits.float().requires_grad_()
    got = sequence_logprobs_from_logits(x, batch.labels, average=average, backend="triton")
    ref = logits.clone().requires_grad_()
    want = reference.sequence_logprobs_from_logits(ref, batch.labels, average=average)
    assert_close((got, *grads(got, [x])), (want, *grads(want, [ref])), rtol=1e-5, atol=1e-5)


def test_logits_backward_in_place_equals_out_of_place():
    be = get_backend("triton", torch.device(DEVICE))
    batch = make_batch(b=1, k=2, t=6, v=45, device=DEVICE, seed=6)
    logits2d = (batch.hidden @ batch.weight.t()).float().reshape(-1, 45)
    index, targets = batch.response_rows()
    lse, tgt = be.logits_forward(logits2d, index, targets)
    torch.testing.assert_close(tgt, logits2d[index, targets], rtol=0, atol=0)
    g = torch.randn(index.numel(), device=DEVICE)
    fresh = be.logits_backward(logits2d, index, targets, lse, g, False)
    buf = logits2d.clone()
    same = be.logits_backward(buf, index, targets, lse, g, True)
    assert same.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(same, fresh, rtol=0, atol=0)
    outside = torch.ones(logits2d.shape[0], dtype=torch.bool, device=DEVICE)
    outside[index] = False
    assert fresh[outside].abs().max() == 0 and fresh[index].abs().max() > 0
    want = g[:, None] * (torch.nn.functional.one_hot(targets, 45) - torch.softmax(logits2d[index], -1))
    torch.testing.assert_close(fresh[index], want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on -inf, masked after
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_tile_of_minus_inf_logits(schedule):
    """A -inf bias over whole vocabulary tiles (banned tokens) ahead of the others: their logsumexp
    is -inf, not NaN, in the from-logits kernel that reduces each tile of the matmul schedule, and
    the fused kernels' running max stays -inf over them (shifted by 0, not by -inf); and a row
    entirely -inf gives -inf."""
    batch = make_batch(b=1, k=2, t=9, h=16, v=70, bias=True, device=DEVICE, seed=12).cast(torch.float32)
    bias = batch.bias.detach().clone()
    bias[:40] = float("-inf")
    labels = batch.labels.clamp(min=40).masked_fill(batch.labels == IGNORE, IGNORE)
    # matmul schedule: 8-row by 20-column tiles, the first two all -inf
    with chunk_bytes(tile=2 * 8 * (4 + 4) * 16), config.triton_options(**SCHEDULES[schedule]):
        got = sequence_logprobs(batch.hidden, batch.weight, labels, bias=bias, backend="triton")
        got_grads = grads(got, [batch.hidden, batch.weight])
    want = reference.sequence_logprobs(batch.hidden, batch.weight, labels, bias=bias)
    assert_close([got, *got_grads], [want, *grads(want, [batch.hidden, batch.weight])], rtol=1e-4, atol=1e-5)
    row = torch.full((1, 70), float("-inf"), device=DEVICE)
    lse, _ = get_backend("triton", torch.device(DEVICE)).logits_forward(row, None, torch.zeros(1, dtype=torch.int64,
                                                                                                   device=DEVICE))
    assert lse.item() == float("-inf")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_logits_far_below_the_exp_range(schedule):
    """Every logit near -300 (log-probs do not change under a shift): the online logsumexps must
    start their running max at -inf, not 0, or every exp underflows and lse is -inf."""
    batch = make_batch(b=1, k=2, t=8, h=16, v=37, bias=True, device=DEVICE, seed=21)
    batch.bias = (batch.bias.detach() - 300.0).requires_grad_()
    with config.triton_options(**SCHEDULES[schedule]):
        got = run_logprobs(batch, torch.float32)
    assert all(torch.isfinite(x).all() for x in got)
    assert_close(got, ref_logprobs(batch), rtol=1e-4, atol=1e-3)


def test_fused_forward_split_stores_only_its_own_targets():
    """Vocabulary split 0 launched alone: target logits at or past its end keep their NaN sentinel
    (the interpreter runs splits in order and would hide two splits writing one target)."""
    g = torch.Generator().manual_seed(22)
    n, v, h, v_per_split = 40, 37, 16, 16
    hidden = torch.randn(n, h, generator=g).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE)
    index = torch.arange(n, device=DEVICE)
    targets = index % v
    part = torch.full((1, n), float("nan"), device=DEVICE)
    tgt = torch.full((n,), float("nan"), device=DEVICE)
    linear_forward_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1)](
        hidden, weight, None, index, targets, part, tgt, n, v, h, v_per_split,
        hidden.stride(0), weight.stride(0), HAS_BIAS=False, **dot_options(torch.float32))
    logits = hidden.double().cpu() @ weight.double().cpu().t()
    mine = (targets < v_per_split).cpu()
    tgt, part = tgt.cpu().double(), part.cpu().double()
    assert tgt[~mine].isnan().all()
    torch.testing.assert_close(tgt[mine], logits[torch.arange(n), targets.cpu()][mine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part[0], torch.logsumexp(logits[:, :v_per_split], 1), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_filter_keeps_tiles_whose_largest_gradient_equals_eps():
    """Token 0 (bias 1000, zero weight row) takes all the probability: with g = 0.5 every gradient
    entry is exactly +-0.5 or 0, and filter_eps = 0.5 (it skips tiles whose entries are all below
    it) skips nothing."""
    batch = make_batch(b=1, k=2, t=8, h=16, v=37, bias=True, device=DEVICE, seed=23).cast(torch.float32)
    with torch.no_grad():
        batch.bias[0] = 1000.0
        batch.weight[0] = 0.0
    labels = batch.labels.clamp(min=1).masked_fill(batch.labels == IGNORE, IGNORE)

    def run(eps):
        with config.triton_options(backward="fused", filter_eps=eps):
            out = sequence_logprobs(batch.hidden, batch.weight, labels, bias=batch.bias, backend="triton")
            return torch.autograd.grad(out, batch.leaves(), torch.full_like(out, 0.5))

    exact, filtered = run(0.0), run(0.5)
    assert exact[0].abs().max() > 0 and exact[1].abs().max() > 0
    assert_close(filtered, exact, rtol=1e-6, atol=1e-6)


def test_fused_token_count_a_multiple_of_the_token_tile():
    """256 response tokens, a multiple of every BLOCK_N: exactly cdiv(N, BLOCK_N) token tiles."""
    batch = make_batch(b=1, k=2, t=130, h=16, v=37, bias=True, device=DEVICE, seed=25)
    batch.labels = torch.randint(0, 37, (2, 130), generator=torch.Generator().manual_seed(25)).to(DEVICE)
    batch.labels[:, :2] = IGNORE
    with config.triton_options(backward="fused"):
        got = run_logprobs(batch, torch.float32)
    assert_close(got, ref_logprobs(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["fused", "deterministic"])
def test_fused_column_major_weight(schedule):
    """A column-major weight (a tied embedding's transpose): the fused kernels read a contiguous copy."""
    batch = make_batch(b=1, k=2, t=8, h=16, v=37, bias=True, device=DEVICE, seed=28)
    b = batch.cast(torch.float32)
    weight = b.weight.detach().t().contiguous().t().requires_grad_()
    assert weight.stride(-1) != 1
    with config.triton_options(**SCHEDULES[schedule]):
        out = sequence_logprobs(b.hidden, weight, b.labels, bias=b.bias, backend="triton")
        got = (out, *grads(out, [b.hidden, weight, b.bias]))
    assert_close(got, ref_logprobs(batch), rtol=1e-5, atol=1e-5)


def _logits_case(seed):
    """(backend, batch, index, targets) for the from-logits passes on (12, 45) logits."""
    batch = make_batch(b=1, k=2, t=6, v=45, device=DEVICE, seed=seed)
    return get_backend("triton", torch.device(DEVICE)), batch, *batch.response_rows()


def test_logits_backward_of_a_row_strided_view():
    """Logits viewed from a padded (12, 64) buffer: the fresh gradient is written with its own stride."""
    be, batch, index, targets = _logits_case(26)
    padded = torch.zeros(12, 64, device=DEVICE)
    padded[:, :45] = (batch.hidden @ batch.weight.t()).float().reshape(-1, 45)
    logits2d = padded[:, :45]
    lse, _ = be.logits_forward(logits2d, index, targets)
    g = torch.randn(index.numel(), generator=torch.Generator().manual_seed(26)).to(DEVICE)
    got = be.logits_backward(logits2d, index, targets, lse, g, False)
    want = torch.zeros(12, 45, dtype=torch.float64)
    x = logits2d[index].double().cpu()
    onehot = torch.nn.functional.one_hot(targets.cpu(), 45)
    want[index.cpu()] = g.double().cpu()[:, None] * (onehot - torch.softmax(x, -1))
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)


def test_logits_backward_in_place_on_a_column_strided_view():
    """In place on a transposed buffer (stride(-1) != 1, which the kernels cannot write): the
    logits themselves are still overwritten with the gradient."""
    be, batch, index, targets = _logits_case(27)
    logits2d = (batch.hidden @ batch.weight.t()).float().reshape(-1, 45).t().contiguous().t()
    assert logits2d.stride(-1) != 1
    lse, _ = be.logits_forward(logits2d, index, targets)
    g = torch.randn(index.numel(), generator=torch.Generator().manual_seed(27)).to(DEVICE)
    fresh = be.logits_backward(logits2d, index, targets, lse, g, False)
    same = be.logits_backward(logits2d, index, targets, lse, g, True)
    assert same.data_ptr() == logits2d.data_ptr()
    torch.testing.assert_close(logits2d, fresh, rtol=1e-5, atol=1e-6)


@triton.jit
def _split_kernel(row_ptr, out_ptr, V, VEC: tl.constexpr):
    head, body = triton_logits.row_split(row_ptr, V, VEC)
    tl.store(out_ptr, head)
    tl.store(out_ptr + 1, body)
    tl.store(out_ptr + 2, row_ptr.to(tl.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_split_starts_the_vectors_on_a_16_byte_boundary(dtype):
    """What the GPU's 16-byte vector loads rely on (the interpreter runs them one element at a time, so
    a wrong split would pass the value tests): from every row alignment, ``row + head`` is 16-byte
    aligned (or the row is all head), the body is whole vectors and fewer than a vector remains."""
    vec = 16 // dtype.itemsize
    flat = torch.zeros(64, dtype=dtype, device=DEVICE)
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    for offset in range(vec):
        for v in (1, vec - 1, vec, vec + 1, 3 * vec + 2, 40):
            _split_kernel[(1,)](flat[offset:], out, v, VEC=vec)
            head, body, address = out.tolist()
            assert address == flat[offset:].data_ptr()
            assert 0 <= head < vec and body % vec == 0 and 0 <= v - head - body < vec, (offset, v, head, body)
            assert (address + head * dtype.itemsize) % 16 == 0 or head == v, (offset, v, head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_logits_kernels_at_every_row_alignment(dtype):
    """Rows starting at every offset from a 16-byte boundary (odd vocabularies, a view into a larger
    buffer, row strides that are not vector multiples): forward, and backward out of place and in place,
    against float64, with the target in a row's unaligned head, its vectors and its tail."""
    be = get_backend("triton", torch.device(DEVICE))
    vec = 16 // dtype.itemsize
    gen = torch.Generator().manual_seed(31)
    for v, stride in [(45, 45), (45, 53), (3, 3), (2 * vec + 3, 2 * vec + 3), (64, 67), (37, 40)]:
        for offset in (0, 1, vec - 1):
            rows = 5
            flat = (torch.randn(offset + rows * stride + 8, generator=gen) * 4).to(dtype).to(DEVICE)
            logits2d = flat[offset:offset + rows * stride].view(rows, stride)[:, :v]
            index = torch.tensor([0, 2, 3, 4], device=DEVICE)
            targets = torch.tensor([0, v - 1, min(v - 1, vec), v // 2], device=DEVICE)
            g = torch.randn(4, generator=gen).to(DEVICE)
            x = logits2d.double().cpu()
            lse, tgt = be.logits_forward(logits2d, index, targets)
            torch.testing.assert_close(lse.double().cpu(), torch.logsumexp(x[index.cpu()], -1), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(tgt.double().cpu(), x[index.cpu(), targets.cpu()], rtol=0, atol=0)
            want = torch.zeros(rows, v, dtype=torch.float64)
            onehot = torch.nn.functional.one_hot(targets.cpu(), v)
            want[index.cpu()] = g.double().cpu()[:, None] * (onehot - torch.softmax(x[index.cpu()], -1))
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            fresh = be.logits_backward(logits2d, index, targets, lse, g, False)
            torch.testing.assert_close(fresh.double().cpu(), want, **tol)
            before = flat.clone()
            same = be.logits_backward(logits2d, index, targets, lse, g, True)
            assert same.data_ptr() == logits2d.data_ptr()
            torch.testing.assert_close(same, fresh, rtol=0, atol=0)
            outside = torch.ones_like(flat, dtype=torch.bool)
            outside[offset:offset + rows * stride].view(rows, stride)[:, :v] = False
            assert torch.equal(flat[outside], before[outside])  # padding columns and neighbours untouched


def test_stores_vectorise_only_where_out_rows_align_with_the_logits_rows():
    buf = torch.zeros(8, 48)
    a = buf[:, :45]
    assert triton_logits.same_alignment(a, a)
    assert triton_logits.same_alignment(a, torch.empty(8, 48)[:, :45])
    assert not triton_logits.same_alignment(a, torch.empty(8, 45))  # the rows drift apart
    assert not triton_logits.same_alignment(buf[:, 1:46], torch.empty(8, 48)[:, :45])  # one element off
    assert triton_logits.same_alignment(buf[:, 4:48], torch.empty(8, 48)[:, :44])  # 16 bytes off


def test_fused_backward_returns_grads_in_the_weight_dtype():
    """Even with dW accumulated in float32 (and dH in a float32 scratch)."""
    be, h = get_backend("triton", torch.device(DEVICE)), 16
    batch = make_batch(b=1, k=2, t=8, h=h, v=37, bias=True, device=DEVICE, seed=29).cast(torch.float16, False)
    index, targets = batch.response_rows()
    hidden2d = batch.hidden.reshape(-1, h)
    with config.triton_options(backward="fused"), config.weight_grad_accumulation("float32"):
        lse, _ = be.linear_forward(hidden2d, batch.weight, batch.bias, index, targets)
        dh, dw, db = be.linear_backward(hidden2d, batch.weight, batch.bias, index, targets, lse,
                                        torch.ones_like(lse), (True, True, True))
    assert dh.dtype == dw.dtype == db.dtype == torch.float16


@pytest.mark.parametrize("schedule", ["fused", "deterministic"])
def test_fused_16bit_hidden_grad_rounds_once(schedule):
    """fp16 dH sums its vocabulary tiles (32 under the interpreter) in float32 and rounds once (seeds
    24-33 there: at most 1.6x the error of rounding the exact dH; rounding per tile: 3x or more)."""
    batch = make_batch(b=1, k=2, t=8, h=16, v=512, device=DEVICE, seed=24)
    with config.triton_options(**SCHEDULES[schedule]):
        got = run_logprobs(batch, torch.float16)[1].double()
    want = ref_logprobs(batch.cast(torch.float16).cast(torch.float64))[1]
    once = (want.half().double() - want).norm()
    assert (got - want).norm() < 2.2 * once, ((got - want).norm() / once).item()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on -inf / overflow, masked after
def test_fused_backward_ignores_rows_past_the_tokens():
    """Rows past the last token of a fused tile hold the bias as logits: with a large bias their
    exp overflows, and the zero gradient they carry must not turn it into NaN."""
    batch = make_batch(b=1, k=2, t=7, h=16, v=37, bias=True, device=DEVICE, seed=13).cast(torch.float32)
    bias = (batch.bias.detach() * 0 + 100.0).requires_grad_()
    with config.triton_options(backward="fused"):
        got = sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=bias, backend="triton")
        got_grads = grads(got, [batch.hidden, batch.weight, bias])
    want = reference.sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=bias)
    assert_close([got, *got_grads], [want, *grads(want, [batch.hidden, batch.weight, bias])], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", ["fused", "deterministic"])
def test_fused_16bit_weight_grad_summed_in_its_dtype(dtype, schedule):
    """dW of 16-bit weights summed over several token tiles in the weight's dtype: the deterministic
    schedule's read-modify-write adds in float32 and rounds once (the interpreter's bf16 + bf16 gave
    1e36 here, and on a GPU it would round twice); the fused schedule's atomics add in the weight's
    dtype. Against the float64 reference on the same rounded inputs (the torch backend: 0.2% in
    bf16; the interpreter truncates toward zero)."""
    if schedule == "fused" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter has no bf16 atomics")
    batch = make_batch(b=2, k=4, t=9, h=20, v=37, bias=True, device=DEVICE, seed=14)
    assert (batch.labels != IGNORE).sum() > 2 * 16  # more token tiles than one
    with config.triton_options(scratch_bytes=4 * 20 * 24, **SCHEDULES[schedule]):  # dH in chunks too
        got = run_logprobs(batch, dtype)
    want = ref_logprobs(batch.cast(dtype).cast(torch.float64))  # the same rounded inputs
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2, atol=5e-2)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2  # the interpreter truncates to bf16: 1.3e-2 here
    for g, w in zip(got[1:], want[1:]):
        assert torch.isfinite(g).all()
        assert ((g.double() - w).norm() / w.norm()).item() < tol


def _force_config(monkeypatch, kernel, config):
    monkeypatch.setattr(kernel, "configs", [config])  # one config: the autotuner runs it untimed


# The autotuner runs only the fastest config of a list on a GPU, and the interpreter a small one of
# its own: force each config in turn, on sizes its blocks do not divide (H and V multiples of 16,
# as compile_check compiles them). fp16 stands for 16 bits: the interpreter has no bf16 atomics.
@pytest.mark.parametrize("dtype, index", [
    pytest.param(dtype, i, id=f"{str(dtype)[6:]}-{i}")
    for dtype, backward in [(torch.float32, tuning.FLOAT32_LINEAR_BACKWARD),
                            (torch.float16, tuning.HOPPER_LINEAR_BACKWARD)]
    for i in range(len(backward))])
def test_every_fused_config_is_exact(monkeypatch, dtype, index):
    forward, backward = ((tuning.FLOAT32_LINEAR, tuning.FLOAT32_LINEAR_BACKWARD) if dtype == torch.float32
                         else (tuning.HOPPER_LINEAR, tuning.HOPPER_LINEAR_BACKWARD))
    _force_config(monkeypatch, linear_forward_kernel, forward[index % len(forward)])
    _force_config(monkeypatch, linear_backward_kernel, backward[index])
    batch = make_batch(b=2, k=2, t=40, h=80, v=1040, bias=True, empty_seq=1, device=DEVICE, seed=15)
    for schedule in ("fused", "deterministic"):  # the matmul schedule runs no fused kernel
        with config.triton_options(**SCHEDULES[schedule]):
            got = run_logprobs(batch, dtype)
        if dtype == torch.float32:
            assert_close(got, ref_logprobs(batch), rtol=1e-4, atol=1e-4)
            continue
        want = ref_logprobs(batch.cast(dtype).cast(torch.float64))  # the same rounded inputs
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2, atol=2e-2)
        for g, w in zip(got[1:], want[1:]):
            assert ((g.double() - w).norm() / w.norm()).item() < 1e-2


@pytest.mark.parametrize("index", range(len(tuning.HOPPER_ROW)))
def test_every_from_logits_config_is_exact(monkeypatch, index):
    """The from-logits kernels with each row config forced: from logits (out of place), and reducing
    the matmul schedule's logit tiles (in place)."""
    for kernel in (triton_logits.logits_forward_kernel, triton_logits._backward, triton_logits._backward_in_place):
        _force_config(monkeypatch, kernel, tuning.HOPPER_ROW[index])
    batch = make_batch(b=2, k=2, t=40, h=80, v=5008, bias=True, empty_seq=1, device=DEVICE, seed=16)
    assert_close(run_logprobs(batch, torch.float32), ref_logprobs(batch), rtol=1e-4, atol=1e-4)
    logits = (batch.hidden @ batch.weight.t() + batch.bias).detach()
    x, ref = logits.float().requires_grad_(), logits.double().requires_grad_()
    got = sequence_logprobs_from_logits(x, batch.labels, backend="triton")
    want = reference.sequence_logprobs_from_logits(ref, batch.labels)
    assert_close((got, *grads(got, [x])), (want, *grads(want, [ref])), rtol=1e-5, atol=1e-5)


def test_filtering_skips_small_tiles_but_keeps_bias_grad():
    batch = make_batch(b=1, k=2, t=8, h=16, v=37, bias=True, device=DEVICE, seed=8)
    exact = run_logprobs(batch, torch.float32)
    with config.triton_options(filter_eps=0.5):  # every |gradient| entry is below |c| * 1 < 0.5 here
        b = batch.cast(torch.float32)
        out = sequence_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, backend="triton")
        c = torch.full(out.shape, 0.25, dtype=out.dtype, device=DEVICE)
        dh, dw, db = torch.autograd.grad(out, b.leaves(), c)
        _, dw0, db0 = torch.autograd.grad(
            sequence_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, backend="torch"), b.leaves(), c)
    torch.testing.assert_close(out, exact[0])
    assert dh.abs().max() == 0 and dw.abs().max() == 0 and dw0.abs().max() > 0
    torch.testing.assert_close(db, db0, rtol=1e-5, atol=1e-6)


def test_float64_runs_on_the_torch_backend_exactly():
    batch = make_batch(b=1, k=2, t=6, h=8, v=11, bias=True, device=DEVICE, seed=9)
    got = run_logprobs(batch, torch.float64)
    want = run_logprobs(batch, torch.float64, backend="torch")
    assert_close(got, want, rtol=0, atol=0)
    b = batch.cast(torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: sequence_logprobs(h, w, b.labels, backend="triton"), (b.hidden, b.weight))


def test_available_needs_cuda_or_the_interpreter(monkeypatch):
    be = get_backend("triton", torch.device(DEVICE))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in be.available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert be.available(torch.device("cpu")) is None


# --- GPU only: 16-bit inputs and bigger shapes against the float32 torch backend -------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"backward": "fused"}, {"deterministic": True}],
                         ids=["matmul", "fused", "deterministic"])
def test_gpu_16bit_matches_torch_backend(dtype, options):
    batch = make_batch(b=2, k=4, t=300, h=520, v=5003, bias=True, dtype=torch.float32, device="cuda", seed=10)
    with config.triton_options(scratch_bytes=4 * 520 * 333, **options):  # several dH chunks
        got = run_logprobs(batch, dtype)
    with chunk_bytes(tile=1 << 26):
        want = run_logprobs(batch, dtype, backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-2)
    for g, w in zip(got[1:], want[1:]):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_deterministic_grads_are_bitwise_repeatable():
    """dH and dW repeat bit for bit (the per-sequence sum of log-probs uses CUDA's index_add_)."""
    batch = make_batch(b=2, k=2, t=200, h=256, v=3001, device="cuda", dtype=torch.bfloat16, seed=11)
    with config.triton_options(deterministic=True):
        first, second = run_logprobs(batch, torch.bfloat16), run_logprobs(batch, torch.bfloat16)
    torch.testing.assert_close(first[0], second[0])
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpu_float32_matches_reference_on_a_bigger_shape(schedule):
    batch = make_batch(b=2, k=2, t=128, h=300, v=4099, bias=True, device="cuda", seed=12)
    with config.triton_options(**SCHEDULES[schedule]):
        assert_close(run_logprobs(batch, torch.float32), ref_logprobs(batch), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_autotuner_picks_from_the_weight_dtype_configs():
    """Same H and V in bf16, then float32: each dtype is tuned on its own list."""
    batch = make_batch(b=1, k=2, t=64, h=136, v=1031, device="cuda", seed=14)
    for dtype, forward, backward in [(torch.bfloat16, tuning.HOPPER_LINEAR, tuning.HOPPER_LINEAR_BACKWARD),
                                     (torch.float32, tuning.FLOAT32_LINEAR, tuning.FLOAT32_LINEAR_BACKWARD)]:
        with config.triton_options(backward="fused"):
            run_logprobs(batch, dtype)
        assert linear_forward_kernel.best_config in forward
        assert linear_backward_kernel.best_config in backward
        assert set(linear_forward_kernel.configs_timings) == set(forward)  # all timed, no other
        assert set(linear_backward_kernel.configs_timings) == set(backward)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_from_logits(dtype):
    batch = make_batch(b=2, k=2, t=64, h=64, v=32003, device="cuda", seed=13)
    logits = (batch.hidden @ batch.weight.t()).detach()
    x = logits.to(dtype).requires_grad_()
    got = sequence_logprobs_from_logits(x, batch.labels, backend="triton")
    ref = x.detach().double().requires_grad_()
    want = reference.sequence_logprobs_from_logits(ref, batch.labels)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close((got, *grads(got, [x])), (want, *grads(want, [ref])), rtol=tol, atol=tol)


def test_fused_kernels_read_a_strided_bias():
    """The fused kernels take no bias stride: a strided bias view is made contiguous first."""
    batch = make_batch(b=1, k=2, t=9, h=16, v=37, bias=True, device=DEVICE).cast(torch.float32)
    strided = torch.stack([batch.bias.detach(), torch.full_like(batch.bias, 1e3)], 1).reshape(-1)[::2]
    strided.requires_grad_()
    expected = reference.sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=batch.bias)
    with config.triton_options(deterministic=True):
        got = sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=strided, backend="triton")
    assert_close([got, *grads(got, [strided])], [expected, *grads(expected, [batch.bias])], rtol=1e-4, atol=1e-4)
