"""Every backend against the naive float64 reference: values, gradients, edge cases.

Runs each usable backend on the CPU ("triton" under TRITON_INTERPRET=1) and, with a GPU, on CUDA.
"""

import pytest
import torch

import nca_kernels as nk
from nca_kernels import reference as ref

from .conftest import IGNORE, device_backends, make_batch

f64 = torch.float64
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
CASES = [(dev, be) for dev in DEVICES for be in device_backends(dev)]
# float64 end to end where a backend computes in float64; the others are checked in float32
F64_BACKENDS = {"torch"}


def _dtype(backend):
    return f64 if backend in F64_BACKENDS else torch.float32


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == f64 else dict(rtol=2e-4, atol=2e-4)


def _grads(out, leaves):
    return torch.autograd.grad(out, leaves, allow_unused=True)


def _check_against_reference(batch, fn, ref_fn, dtype, tol32=None):
    """Run ``fn`` on ``batch`` in ``dtype`` and ``ref_fn`` in float64; compare value and gradients.
    ``tol32``: for float32, each gradient's largest error relative to its largest reference entry
    instead of elementwise closeness."""
    tol = _tol(dtype)
    got_b, ref_b = batch.cast(dtype), batch.cast(f64)
    got = fn(got_b)
    expected = ref_fn(ref_b)
    torch.testing.assert_close(got.to(f64), expected, **tol)
    w = torch.randn_like(expected)  # a random cotangent exercises every output
    got_grads = _grads((got * w.to(got.dtype)).sum(), got_b.leaves())
    for g, e in zip(got_grads, _grads((expected * w).sum(), ref_b.leaves())):
        if tol32 is not None and dtype != f64:
            assert (g.to(f64) - e).abs().max() <= tol32 * e.abs().max()
        else:
            torch.testing.assert_close(g.to(f64), e, **tol)


def _check_fused_loss(batch, backend, recompute, tol32=None, **kw):
    """``fused_nca_loss`` with ``backend`` against the float64 reference (loss options ``kw``)."""

    def fn(b):
        return nk.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, bias=b.bias,
                                 recompute=recompute, backend=backend, **kw)

    def ref_fn(b):
        return ref.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, bias=b.bias, **kw)

    _check_against_reference(batch, fn, ref_fn, _dtype(backend), tol32)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_sequence_logprobs(device, backend, average, bias, small_tiles):
    batch = make_batch(b=2, k=3, t=11, h=13, v=53, bias=bias, device=device, empty_seq=4)
    kw = dict(average=average)

    def fn(b):
        return nk.sequence_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, backend=backend, **kw)

    def ref_fn(b):
        return ref.sequence_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, **kw)

    _check_against_reference(batch, fn, ref_fn, _dtype(backend))
    out = fn(batch.cast(_dtype(backend)))
    assert out[4].item() == 0.0  # the empty response


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_from_logits(device, backend, average, small_tiles):
    """Values and gradients against float64; backward leaves the caller's logits as they were."""
    batch = make_batch(b=2, k=2, t=10, h=8, v=61, device=device, empty_seq=1)
    logits = (batch.hidden @ batch.weight.t()).detach().mul(3).to(_dtype(backend)).requires_grad_()
    before = logits.detach().clone()
    got = nk.sequence_logprobs_from_logits(logits, batch.labels, average=average, backend=backend)
    ref_logits = logits.detach().to(f64).requires_grad_()
    expected = ref.sequence_logprobs_from_logits(ref_logits, batch.labels, average=average)
    tol = _tol(_dtype(backend))
    torch.testing.assert_close(got.to(f64), expected, **tol)
    w = torch.randn_like(expected)
    (g,) = torch.autograd.grad((got * w.to(got.dtype)).sum(), logits)
    (e,) = torch.autograd.grad((expected * w).sum(), ref_logits)
    torch.testing.assert_close(g.to(f64), e, **tol)
    assert got[1].item() == 0.0
    torch.testing.assert_close(logits.detach(), before, rtol=0, atol=0)

def _from_logits_case(device, backend, seed):
    """(labels, logits of the backend's dtype, their float64 gradient for fixed random weights)."""
    batch = make_batch(b=2, k=2, t=10, h=8, v=61, device=device, empty_seq=1, seed=seed)
    logits = (batch.hidden @ batch.weight.t()).detach().mul(3).to(_dtype(backend))
    x = logits.to(f64).requires_grad_()
    expected = ref.sequence_logprobs_from_logits(x, batch.labels)
    w = torch.randn_like(expected)
    return batch.labels, logits, w, torch.autograd.grad((expected * w).sum(), x)[0]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "padded rows", "slice along T"])
def test_from_logits_inplace_backward(device, backend, layout):
    """``inplace_backward=True``: the float64 reference's gradient, written into the logits' own
    storage (a view into a padded buffer too, whose padding stays untouched); logits sliced along T
    cannot be viewed as one matrix, so a copy becomes the gradient and the caller's logits stay."""
    labels, logits, w, expected = _from_logits_case(device, backend, 13)
    s, t, v = logits.shape
    base = torch.full((s, t + (layout == "slice along T"), v + 3 * (layout == "padded rows")), 7.0,
                      dtype=logits.dtype, device=device)
    base[:, :t, :v] = logits
    leaf = base.requires_grad_()
    x = leaf[:, :t, :v]
    before = base.detach().clone()
    got = nk.sequence_logprobs_from_logits(x, labels, inplace_backward=True, backend=backend)
    (g,) = torch.autograd.grad((got * w.to(got.dtype)).sum(), leaf)
    torch.testing.assert_close(g[:, :t, :v].to(f64), expected, **_tol(_dtype(backend)))
    if layout == "slice along T":
        torch.testing.assert_close(base.detach(), before, rtol=0, atol=0)
    else:
        torch.testing.assert_close(base.detach()[:, :, :v], g[:, :t, :v], rtol=0, atol=0)
        torch.testing.assert_close(base.detach()[:, :, v:], before[:, :, v:], rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_from_logits_inplace_backward_refuses_a_later_use_of_the_logits(device, backend):
    """Logits that another op saved for its backward (tanh keeps its output) and a second backward
    would read the overwritten values: autograd raises instead of computing a wrong gradient, also
    when the kernels write them (the pass bumps their version)."""
    labels, logits, w, _ = _from_logits_case(device, backend, 14)
    pre = logits.clone().requires_grad_()
    capped = torch.tanh(pre)
    out = nk.sequence_logprobs_from_logits(capped, labels, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), pre)
    x = logits.clone().requires_grad_()
    out = nk.sequence_logprobs_from_logits(x * 1, labels, inplace_backward=True, backend=backend)
    torch.autograd.grad(out.sum(), x, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), x)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize(
    "loss_type,k,alpha",
    [("nca", 2, 0.0), ("nca", 3, 1e-2), ("nca", 4, 1.0), ("nca", 8, 1e-2), ("infonca", 2, 1.0),
     ("infonca", 4, 0.0), ("infonca", 8, 1e-2), ("dpo", 2, 0.0), ("nca_pair", 2, 0.0)],
)
def test_fused_nca_loss(device, backend, recompute, loss_type, k, alpha, small_tiles):
    batch = make_batch(b=2, k=k, t=7, h=12, v=37, bias=k == 4, device=device, ties=alpha == 0.0, empty_seq=1)
    _check_fused_loss(batch, backend, recompute, beta=0.1, alpha=alpha, loss_type=loss_type, average=k == 3)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("recompute", [True, False])
def test_ignore_index_past_the_vocabulary_and_a_banned_token(device, backend, recompute, small_tiles):
    """A custom ignore_index >= V marks the prompts, and token 0 is banned (-inf bias): every
    backend and the reference read only the response labels."""
    batch = make_batch(b=2, k=2, t=8, h=8, v=29, bias=True, device=device, empty_seq=1)
    batch.bias.detach()[0] = float("-inf")
    batch.labels = torch.where(batch.labels == IGNORE, 29 + 7, batch.labels.clamp(min=1))
    _check_fused_loss(batch, backend, recompute, beta=0.2, alpha=0.3, loss_type="infonca", ignore_index=29 + 7)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("recompute", [True, False])
def test_extreme_logits(device, backend, recompute, small_tiles):
    """Logits of magnitude ~1e4: exact log-softmax, finite gradients, no NaN."""
    batch = make_batch(b=2, k=2, t=6, h=8, v=41, device=device, scale=3e3)
    dtype = _dtype(backend)
    logits_mag = (batch.hidden @ batch.weight.t()).abs().max().item()
    assert logits_mag > 5e3
    kw = dict(beta=0.01, alpha=0.5, loss_type="nca")
    b = batch.cast(dtype)
    loss, metrics = nk.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, recompute=recompute,
                                      backend=backend, return_metrics=True, **kw)
    grads = torch.autograd.grad(loss, b.leaves())
    r = batch.cast(f64)
    expected = ref.sequence_logprobs(r.hidden, r.weight, r.labels).view(2, 2)
    torch.testing.assert_close(metrics["policy_logps"].to(f64), expected, rtol=1e-5, atol=0.05)
    assert all(torch.isfinite(g).all() for g in grads) and torch.isfinite(loss)


@pytest.mark.parametrize("device,backend", CASES)
def test_all_ignored_batch(device, backend):
    batch = make_batch(b=1, k=2, t=5, h=8, v=17, device=device)
    labels = torch.full_like(batch.labels, -100)
    b = batch.cast(_dtype(backend))
    loss = nk.fused_nca_loss(b.hidden, b.weight, labels, b.rewards, b.ref_logps, beta=0.1, alpha=0.1, backend=backend)
    gh, gw = torch.autograd.grad(loss, (b.hidden, b.weight))
    assert torch.isfinite(loss) and gh.abs().max() == 0 and gw.abs().max() == 0


@pytest.mark.parametrize("device,backend", CASES)
def test_metrics_are_consistent(device, backend):
    batch = make_batch(b=3, k=4, t=8, h=8, v=29, device=device).cast(_dtype(backend))
    kw = dict(beta=0.2, alpha=0.1, backend=backend)
    args = (batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps)
    loss1, m1 = nk.fused_nca_loss(*args, recompute=True, return_metrics=True, **kw)
    loss2, m2 = nk.fused_nca_loss(*args, recompute=False, return_metrics=True, **kw)
    torch.testing.assert_close(loss1, loss2)
    for key in ("policy_logps", "model_rewards", "accuracy", "margin", "chosen_logps"):
        torch.testing.assert_close(m1[key], m2[key])
        assert not m1[key].requires_grad
    logps = nk.sequence_logprobs(batch.hidden, batch.weight, batch.labels, backend=backend).view(3, 4)
    torch.testing.assert_close(m1["policy_logps"], logps)
    torch.testing.assert_close(m1["model_rewards"], 0.2 * (logps - batch.ref_logps.to(logps.dtype)))


def test_module_matches_function():
    batch = make_batch(b=2, k=2, t=6, h=8, v=23)
    module = nk.FusedNCALoss(beta=0.3, alpha=0.0, loss_type="nca_pair", backend="torch")
    args = (batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps)
    expected = nk.fused_nca_loss(*args, beta=0.3, alpha=0.0, loss_type="nca_pair", backend="torch")
    torch.testing.assert_close(module(*args), expected)
    assert "nca_pair" in repr(module)


@pytest.mark.parametrize("recompute,group", [(True, None), (False, None), (False, 1 << 30)])
@pytest.mark.parametrize("loss_type", ["infonca", "nca"])
def test_gradcheck_fused_nca_loss(recompute, group, loss_type, small_tiles):
    """``group=1 << 30``: whole prompt groups in one buffer, which turns from forward statistics into
    the gradient (``logits_exp_``); otherwise sub-chunks that are recomputed."""
    batch = make_batch(b=2, k=3, t=5, h=6, v=19, bias=True, empty_seq=2)
    with nk.chunk_bytes(group=group):
        assert torch.autograd.gradcheck(
            lambda h, w, bias: nk.fused_nca_loss(h, w, batch.labels, batch.rewards, batch.ref_logps, beta=0.5,
                                                 alpha=0.2, loss_type=loss_type, bias=bias, recompute=recompute,
                                                 backend="torch"),
            tuple(batch.leaves()),
        )


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("scale", [1.0, 3e3])
def test_group_buffer_kept(device, backend, scale):
    """``recompute=False`` at the default budgets: each prompt group's logits buffer serves forward
    and gradient (on CPU through ``logits_exp_``); against float64, also with logits ~1e4. There a
    float32 logit carries up to 5e-4 of rounding, so small gradient entries hold only to a few 1e-3
    of themselves (11% of random batches broke the elementwise 2e-4 tolerance); gradients are
    checked against their largest entry instead: at most 1.7e-4 in 700 batches, asserted 1e-3."""
    batch = make_batch(b=3, k=4, t=9, h=12, v=37, bias=True, device=device, empty_seq=1, scale=scale)
    tol32 = None if scale == 1.0 else 1e-3
    _check_fused_loss(batch, backend, False, tol32, beta=0.1, alpha=0.1, loss_type="nca")


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("trained", ["hidden", "weight", "bias"])
def test_gradient_of_one_input_alone(recompute, trained, small_tiles):
    """Only one of hidden, weight and bias requires grad (a frozen LM head, say): the loss and that
    input's gradient equal the float64 reference's."""
    batch = make_batch(b=2, k=2, t=7, h=8, v=23, bias=True, seed=9)
    got, want = batch.cast(f64, requires_grad=False), batch.cast(f64, requires_grad=False)
    kw = dict(beta=0.2, alpha=0.3, loss_type="nca")
    for b in (got, want):
        getattr(b, trained).requires_grad_()
    loss = nk.fused_nca_loss(got.hidden, got.weight, got.labels, got.rewards, got.ref_logps, bias=got.bias,
                             recompute=recompute, backend="torch", **kw)
    expected = ref.fused_nca_loss(want.hidden, want.weight, want.labels, want.rewards, want.ref_logps,
                                  bias=want.bias, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_grads(loss, getattr(got, trained)), _grads(expected, getattr(want, trained)),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["dpo", "nca_pair"])
def test_gradcheck_pair_losses(loss_type, small_tiles):
    batch = make_batch(b=2, k=2, t=5, h=6, v=19)
    for recompute in (True, False):
        assert torch.autograd.gradcheck(
            lambda h, w: nk.fused_nca_loss(h, w, batch.labels, batch.rewards, batch.ref_logps, beta=0.5,
                                           alpha=0.0, loss_type=loss_type, recompute=recompute, backend="torch"),
            tuple(batch.leaves()),
        )


def test_gradcheck_sequence_logprobs(small_tiles):
    batch = make_batch(b=1, k=3, t=6, h=5, v=23, bias=True, empty_seq=0)
    for average in (False, True):
        assert torch.autograd.gradcheck(
            lambda h, w, bias: nk.sequence_logprobs(h, w, batch.labels, bias=bias, average=average, backend="torch"),
            tuple(batch.leaves()),
        )


def test_gradcheck_from_logits(small_tiles):
    batch = make_batch(b=1, k=3, t=6, h=5, v=23, empty_seq=1)
    logits = (batch.hidden @ batch.weight.t()).detach().requires_grad_()
    for average in (False, True):
        assert torch.autograd.gradcheck(
            lambda x: nk.sequence_logprobs_from_logits(x, batch.labels, average=average, backend="torch"), (logits,)
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("recompute", [True, False])
def test_low_precision_against_float64(dtype, recompute):
    """bf16/fp16 inputs: accumulation in float32, gradients in the input dtype.

    Stated tolerance: log-probs within 2% relative (the logits themselves are rounded to the input
    dtype, as in any bf16 LM head), gradients within 3% of the largest reference entry.
    """
    batch = make_batch(b=2, k=4, t=24, h=64, v=300, bias=True)
    kw = dict(beta=0.1, alpha=0.1, loss_type="nca")
    b = batch.cast(dtype)
    loss, m = nk.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, bias=b.bias,
                                recompute=recompute, backend="torch", return_metrics=True, **kw)
    assert m["policy_logps"].dtype == torch.float32 and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, b.leaves())
    assert [g.dtype for g in grads] == [dtype] * 3
    r = batch.cast(f64)
    expected_logps = ref.sequence_logprobs(r.hidden, r.weight, r.labels, bias=r.bias).view(2, 4)
    torch.testing.assert_close(m["policy_logps"].to(f64), expected_logps, rtol=2e-2, atol=0.5)
    expected = torch.autograd.grad(
        ref.fused_nca_loss(r.hidden, r.weight, r.labels, r.rewards, r.ref_logps, bias=r.bias, **kw), r.leaves()
    )
    for g, e in zip(grads, expected):
        assert (g.to(f64) - e).abs().max() <= 3e-2 * e.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logits,softcap", [("peaked", None), ("flat", None), ("flat", 3.0)])
def test_16bit_modes_agree_within_naive_error(dtype, logits, softcap, small_tiles):
    """16-bit inputs: each mode reads the same rounded logits for the target and the logsumexp, so
    the two give equal log-probs (uncapped), within naive's error against float64 on the same
    inputs, on trained-looking logits (the label's probability near 0.9) and on flat random ones."""
    g = torch.Generator().manual_seed(5)
    s, t, h, v = 4, 16, 32, 300
    weight = torch.randn(v, h, generator=g, dtype=f64) / h**0.5 * 3
    labels = torch.randint(0, v, (s, t), generator=g)
    hidden = torch.randn(s, t, h, generator=g, dtype=f64)
    if logits == "peaked":
        hidden += 18 * weight[labels] / weight[labels].square().sum(-1, keepdim=True)
    hl, wl = hidden.to(dtype), weight.to(dtype)
    exact = torch.log_softmax(ref.cap(hl.double() @ wl.double().t(), softcap), -1)
    assert (exact.exp().gather(-1, labels[..., None]).mean() > 0.8) == (logits == "peaked")
    want = exact.gather(-1, labels[..., None]).squeeze(-1).sum(-1)
    naive = ref.sequence_logprobs(hl, wl, labels, softcap=softcap)
    zeros = torch.zeros(s // 2, 2, dtype=f64)
    modes = [nk.fused_nca_loss(hl.requires_grad_(), wl, labels, zeros, zeros, beta=0.1, alpha=0.1, softcap=softcap,
                               recompute=r, backend="torch", return_metrics=True)[1]["policy_logps"].reshape(-1)
             for r in (True, False)]
    if softcap is None:  # the group buffer is capped in its dtype, the recompute tiles in float32
        torch.testing.assert_close(modes[0], modes[1], rtol=1e-6, atol=1e-5)
    for got in modes:
        assert (got.double() - want).abs().max() <= 1.1 * (naive.double() - want).abs().max() + 1e-5


@pytest.mark.parametrize("recompute", [True, False])
def test_chunking_does_not_change_results(recompute):
    batch = make_batch(b=3, k=2, t=9, h=10, v=101, bias=True, dtype=torch.float32)
    args = (batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps)
    kw = dict(beta=0.1, alpha=0.1, bias=batch.bias, recompute=recompute, backend="torch")
    results = []
    for tile, group in ((1 << 20, 1 << 30), (4 * 7 * 10, 4 * 101 * 5), (4, 4)):
        with nk.chunk_bytes(tile=tile, group=group):
            loss = nk.fused_nca_loss(*args, **kw)
            results.append((loss, *torch.autograd.grad(loss, batch.leaves())))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_long_response_sum_is_accurate(recompute):
    """Two responses of 20000-40000 tokens in float32: per-sequence sums accumulate in float64, so
    each log-prob (about -1e5) is within a few float32 roundings of the float64 value; a serial
    float32 sum over the tokens was off by 0.07 to 0.8 (dozens of roundings)."""
    batch = make_batch(b=1, k=2, t=40001, h=8, v=50, dtype=torch.float32)
    r = batch.cast(f64)
    expected = ref.sequence_logprobs(r.hidden, r.weight, r.labels)
    _, metrics = nk.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps,
                                   beta=0.1, alpha=0.1, recompute=recompute, backend="torch", return_metrics=True)
    got = metrics["policy_logps"].reshape(-1).to(f64)
    assert expected.abs().min() > 5e4
    torch.testing.assert_close(got, expected, rtol=4 * 2.0**-24, atol=0)


GROUP_ROW = (37 + 2 * 12) * 8  # bytes of one response token's row in test_group_pack_and_cap


@pytest.mark.parametrize("pack,cap,calls", [(1, 1 << 20, 3), (1, 1, 2 * 36), (24 * GROUP_ROW, 24 * GROUP_ROW, 2)])
def test_group_pack_and_cap(monkeypatch, pack, cap, calls):
    """The default group budget packs prompts up to ``pack`` bytes but holds one larger group whole
    up to ``cap`` (one logits matmul per prompt, no recompute); past ``cap`` it recomputes
    sub-chunks (two matmuls a token here). A chunk fills up to its budget exactly: two prompts of
    12 response tokens fit 24 rows. Results match either way."""
    from nca_kernels import config
    from nca_kernels.backends import rowchunk

    batch = make_batch(b=3, k=2, t=9, h=12, v=37, bias=True)
    batch.labels[:, :3] = IGNORE  # every response 6 tokens long: 12 a prompt, 36 in all
    args = (batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps)
    kw = dict(beta=0.1, alpha=0.1, bias=batch.bias, recompute=False, backend="torch")
    expected = ref.fused_nca_loss(*args, beta=0.1, alpha=0.1, bias=batch.bias)
    made = []
    make = rowchunk.logits_chunk
    monkeypatch.setattr(rowchunk, "logits_chunk", lambda *a: made.append(1) or make(*a))
    monkeypatch.setattr(config, "group_bytes", None)
    monkeypatch.setattr(config, "_DEFAULT_GROUP_BYTES", {"cpu": (pack, cap)})
    loss = nk.fused_nca_loss(*args, **kw)
    assert (batch.labels != IGNORE).sum() == 36 and len(made) == calls
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("schedule", ["group", "recompute", "fused"])
def test_weight_grad_float32_accumulation(device, backend, schedule):
    """bf16 dW summed over many chunks: in the weight's dtype (the default) every chunk adds a
    rounding, several times naive's error here; ``weight_grad_accum="float32"`` sums in float32 and
    rounds once, back near naive's error. The torch backend's recompute passes always sum in float32,
    so there the two modes agree exactly."""
    from nca_kernels import config

    if schedule == "fused" and backend != "triton":
        pytest.skip("the fused Triton backward is the triton backend's")
    batch = make_batch(b=2, k=4, t=120, h=32, v=256, device=device)
    kw = dict(beta=0.1, alpha=0.1)
    r = batch.cast(f64)
    expected = torch.autograd.grad(ref.fused_nca_loss(r.hidden, r.weight, r.labels, r.rewards, r.ref_logps, **kw),
                                   r.weight)[0]
    b = batch.cast(torch.bfloat16)

    def dw_error(fn):
        got = torch.autograd.grad(fn(), b.weight)[0]
        assert got.dtype == torch.bfloat16
        return float((got.to(f64) - expected).norm() / expected.norm())  # relative RMS: steadier than max

    naive = dw_error(lambda: ref.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, **kw))
    errors = {}
    # The Triton interpreter rounds float32 -> bf16 toward zero (GPUs round to nearest), which about
    # doubles the rounding of its bf16 logit gradients; and it has no bf16 atomics, so there the
    # fused kernel runs with a float32 dW only.
    interpreted = backend == "triton" and device == "cpu"
    modes = ("float32",) if interpreted and schedule == "fused" else ("weight", "float32")
    for mode in modes:
        options = dict(backward="fused") if schedule == "fused" else {}
        with nk.chunk_bytes(tile=2 * 16 * 32 * 8, group=16 * 256 * 2), config.weight_grad_accumulation(mode), \
                config.triton_options(**options):  # 16-token chunks: dozens of dW roundings
            errors[mode] = dw_error(lambda: nk.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps,
                                                              recompute=schedule != "group", backend=backend, **kw))
    if backend == "torch" and schedule == "recompute":
        assert errors["float32"] == errors["weight"] <= 1.5 * naive
        return
    # Measured (float32 / naive, weight / float32): torch group, 100 seeds: <= 1.23, >= 1.41;
    # interpreted triton, 25 seeds each: recompute <= 1.72, >= 1.25; group <= 1.71, >= 1.38.
    assert errors["float32"] <= (2.5 if interpreted else 2) * naive, (errors, naive)
    if len(modes) == 2:
        assert errors["weight"] >= (1.05 if interpreted else 1.2) * errors["float32"], errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_addmm_into_float32(device, dtype):
    """16-bit products added into a float32 accumulator (dH always, dW in float32 mode): unrounded
    where the matmul takes ``out_dtype=float32`` (the probe says so), else rounded once to ``dtype``."""
    from nca_kernels.backends.torch_chunked import addmm_, wide_addmm

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((64, 300), (300, 48)))
    start = torch.randn(64, 48, generator=g).to(device)
    product = a.to(f64) @ b.to(f64)
    once = (product.to(dtype).to(f64) - product).abs().max()  # one rounding of the product
    out = start.clone()
    addmm_(out, a, b)
    err = (out.to(f64) - start.to(f64) - product).abs().max()
    if wide_addmm(torch.device(device), dtype):
        assert err <= 0.01 * once, (err, once)
    else:
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert err <= unit * 1.01 * product.abs().max() + 1e-5, (err, once)


@pytest.mark.parametrize("recompute", [True, False])
def test_under_torch_compile(recompute):
    """A step compiled with ``torch.compile`` gives the eager loss and gradients (the loss breaks the
    graph: its input checks read values and the response-token gather has a data-dependent size)."""
    batch = make_batch(b=2, k=2, t=12, h=16, v=70).cast(torch.float32)
    kw = dict(beta=0.1, alpha=0.5, recompute=recompute, backend="torch")

    def step(hidden, weight):
        return nk.fused_nca_loss(hidden * 1.5, weight, batch.labels, batch.rewards, batch.ref_logps, **kw)

    leaves = (batch.hidden, batch.weight)
    eager = step(*leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(compiled, leaves), _grads(eager, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

def test_from_logits_inplace_backward_under_torch_compile():
    """The logits made inside a compiled step (an intermediate of its graph) are overwritten with
    their gradient in backward: the eager gradients."""
    batch = make_batch(b=2, k=2, t=12, h=16, v=70).cast(torch.float32)

    def step(hidden, weight, inplace):
        logits = (hidden * 1.5) @ weight.t()
        return nk.sequence_logprobs_from_logits(logits, batch.labels, inplace_backward=inplace, backend="torch")

    leaves = (batch.hidden, batch.weight)
    eager = step(*leaves, False)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")(*leaves, True)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(compiled.sum(), leaves), _grads(eager.sum(), leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_without_grad_mode(monkeypatch):
    """Under ``torch.no_grad`` (evaluation) the group mode, which forms gradients in its forward,
    is not run: the forward alone gives the same loss and metrics."""
    from nca_kernels import ops

    batch = make_batch(b=2, k=3, t=10, h=8, v=40)
    args = (batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps)
    kw = dict(beta=0.2, alpha=0.1, recompute=False, backend="torch", return_metrics=True)
    want, want_metrics = nk.fused_nca_loss(*args, **kw)
    calls = []
    apply = ops.GroupedNCALoss.apply
    monkeypatch.setattr(ops.GroupedNCALoss, "apply", lambda *a: calls.append(1) or apply(*a))
    with torch.no_grad():
        got, metrics = nk.fused_nca_loss(*args, **kw)
    assert not calls
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["model_rewards"], want_metrics["model_rewards"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("ignore_index", [IGNORE, 40 + 7])
def test_shift_predicts_the_next_label(recompute, ignore_index):
    """``shift=True`` takes labels as the inputs (Hugging Face style): the same as slicing
    ``hidden[:, :-1]`` against ``labels[:, 1:]`` by hand, without copying the hidden states; the last
    position, which predicts nothing, is marked with the ignore_index given (here also one past V)."""
    batch = make_batch(b=2, k=3, t=11, h=8, v=40)
    labels = torch.where(batch.labels == IGNORE, ignore_index, batch.labels)
    kw = dict(beta=0.2, alpha=0.1, ignore_index=ignore_index, backend="torch")
    got = nk.fused_nca_loss(batch.hidden, batch.weight, labels, batch.rewards, batch.ref_logps, shift=True,
                            recompute=recompute, **kw)
    want = nk.fused_nca_loss(batch.hidden[:, :-1], batch.weight, labels[:, 1:], batch.rewards,
                             batch.ref_logps, recompute=recompute, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(got, batch.leaves()), _grads(want, batch.leaves())):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    logits = batch.hidden @ batch.weight.t()
    torch.testing.assert_close(
        nk.sequence_logprobs_from_logits(logits, labels, shift=True, ignore_index=ignore_index),
        ref.sequence_logprobs_from_logits(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index),
        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("recompute", [True, False])
def test_softcap(device, backend, recompute, small_tiles):
    """Logits capped to ``c * tanh(logits / c)`` (Gemma 2), well inside the cap's bend: values and
    gradients against the float64 reference, every backend and mode, on tiles and sub-chunks."""
    batch = make_batch(b=2, k=3, t=9, h=8, v=41, bias=True, device=device, empty_seq=1, scale=4.0)
    assert (batch.hidden @ batch.weight.t()).abs().max() > 3 * 2.0
    _check_fused_loss(batch, backend, recompute, beta=0.3, alpha=0.2, loss_type="nca", softcap=2.0)


@pytest.mark.parametrize("recompute,group", [(True, None), (False, None), (False, 1 << 30)])
def test_gradcheck_softcap(recompute, group, small_tiles):
    """``group=1 << 30``: the kept group buffer, which with a cap skips the one-exp shortcut."""
    batch = make_batch(b=2, k=2, t=5, h=6, v=19, bias=True, scale=3.0)
    with nk.chunk_bytes(group=group):
        assert torch.autograd.gradcheck(
            lambda h, w, bias: nk.fused_nca_loss(h, w, batch.labels, batch.rewards, batch.ref_logps, beta=0.5,
                                                 alpha=0.2, bias=bias, softcap=1.5, recompute=recompute,
                                                 backend="torch"),
            tuple(batch.leaves()),
        )


@pytest.mark.skipif("triton" not in device_backends("cpu"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("options", [{"backward": "fused"}, {"deterministic": True}, {"filter_eps": 0.5}])
@pytest.mark.parametrize("recompute", [True, False])
def test_softcap_takes_the_matmul_schedule_whatever_the_options(options, recompute):
    """The fused kernels do not cap logits: with softcap the Triton options leave the matmul schedule
    in place, in training and under no_grad alike (evaluation falls back to the recompute forward)."""
    from nca_kernels import config

    batch = make_batch(b=1, k=2, t=6, h=8, v=17, device="cpu").cast(torch.float32)

    def run(**opts):
        with config.triton_options(**opts):
            loss = nk.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps,
                                     beta=0.5, alpha=0.2, softcap=2.0, recompute=recompute, backend="triton")
            with torch.no_grad():
                evaluated = nk.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards,
                                              batch.ref_logps, beta=0.5, alpha=0.2, softcap=2.0, backend="triton")
            return loss, evaluated, *torch.autograd.grad(loss, batch.leaves())  # backward reads the options too

    for got, want in zip(run(**options), run()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("recompute", [True, False])
def test_autocast_runs_in_its_dtype(device, backend, recompute):
    """Under autocast, float32 hidden, weight and bias are cast to its dtype (as the LM head's own
    matmul would be) and the gradients flow back through the cast: the loss and gradients equal
    those of the same step with the casts written out, also with backward inside autocast."""
    batch = make_batch(b=2, k=2, t=10, h=16, v=70, bias=True, device=device).cast(torch.float32)
    kw = dict(beta=0.5, alpha=0.5, recompute=recompute, backend=backend)
    low = torch.bfloat16 if device == "cpu" else torch.float16

    def step(cast):
        h, w, bias = (cast(x) for x in batch.leaves())
        return nk.fused_nca_loss(h, w, batch.labels, batch.rewards, batch.ref_logps, bias=bias, **kw)

    expected = torch.autograd.grad(step(lambda x: x.to(low)), batch.leaves())
    with torch.autocast(device, dtype=low):
        loss = step(lambda x: x)
        got = torch.autograd.grad(loss, batch.leaves())
    assert loss.dtype == torch.float32
    for g, e, x in zip(got, expected, batch.leaves()):
        assert g.dtype == x.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("recompute", [True, False])
def test_second_order_gradients_refused(recompute):
    """The passes are first-order: ``create_graph=True`` raises instead of giving a gradient whose own
    gradient would be silently wrong."""
    batch = make_batch(b=1, k=2, t=6, h=8, v=20)
    loss = nk.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps, beta=0.5,
                             alpha=0.5, recompute=recompute, backend="torch")
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, batch.hidden, create_graph=True)


@pytest.mark.parametrize("recompute", [True, False])
def test_rewards_and_ref_logps_are_constants(recompute):
    """No gradient reaches rewards or ref_logps, in either mode."""
    batch = make_batch(b=2, k=2, t=6, h=8, v=20)
    rewards, ref_logps = batch.rewards.clone().requires_grad_(), batch.ref_logps.clone().requires_grad_()
    loss = nk.fused_nca_loss(batch.hidden, batch.weight, batch.labels, rewards, ref_logps, beta=0.5, alpha=0.5,
                             recompute=recompute, backend="torch")
    loss.backward()
    assert rewards.grad is None and ref_logps.grad is None and batch.hidden.grad is not None


def test_auto_backend_takes_the_first_usable_one(monkeypatch):
    """``"auto"`` runs the first usable backend of the device type's preference list: the torch backend
    on CPU and on a device type without a list, passing over one that cannot run (cuda for CPU)."""
    from nca_kernels import backends
    from nca_kernels.backends import torch_chunked

    cpu = torch.device("cpu")
    assert backends.get_backend("auto", cpu) is torch_chunked
    assert backends.get_backend("auto", torch.device("meta")) is torch_chunked
    monkeypatch.setitem(backends._AUTO, "cpu", ("cuda", "torch"))
    assert backends.get_backend("auto", cpu) is torch_chunked


def test_backend_that_cannot_be_imported_is_unavailable(monkeypatch):
    """A backend whose module (or a dependency) fails to import is reported unavailable, with the
    import error, and asking for it by name raises."""
    from nca_kernels import backends

    monkeypatch.setitem(backends._MODULES, "missing", "nca_kernels.backends.no_such_module")
    cpu = torch.device("cpu")
    assert "could not be imported: No module named" in backends.unavailable_reason("missing", cpu)
    with pytest.raises(RuntimeError, match="backend 'missing' could not be imported"):
        backends.get_backend("missing", cpu)


@pytest.mark.parametrize("device,backend", CASES)
def test_index_none_covers_every_row(device, backend):
    """The backend protocol's linear passes take ``index=None`` for every row."""
    from nca_kernels.backends import get_backend

    be = get_backend(backend, torch.device(device))
    batch = make_batch(b=1, k=2, t=4, h=16, v=37, bias=True, dtype=torch.float32, device=device, seed=7)
    h2d, w, bias = (x.detach() for x in (batch.hidden.reshape(-1, 16), batch.weight, batch.bias))
    targets = torch.randint(0, 37, (h2d.shape[0],), device=device)
    everything = torch.arange(h2d.shape[0], device=device)
    lse, tgt = be.linear_forward(h2d, w, bias, None, targets)
    for got, want in zip((lse, tgt), be.linear_forward(h2d, w, bias, everything, targets)):
        torch.testing.assert_close(got, want)
    g = torch.randn_like(lse)
    for got, want in zip(be.linear_backward(h2d, w, bias, None, targets, lse, g, (True, True, True)),
                         be.linear_backward(h2d, w, bias, everything, targets, lse, g, (True, True, True))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_matmul_tile_passes_in_float64(softcap):
    """The (tokens x vocab) tile passes that the GPU backends run by default (``rowchunk``), here on
    the torch backend's from-logits passes in float64: several token chunks and vocabulary tiles
    whose edges cut through the labels, against the torch backend's own passes."""
    from nca_kernels.backends import rowchunk
    from nca_kernels.backends import torch_chunked as be

    batch = make_batch(b=2, k=2, t=9, h=8, v=37, bias=True, seed=8)
    h2d, w, bias = (x.detach() for x in (batch.hidden.reshape(-1, 8), batch.weight, batch.bias))
    index, targets = batch.response_rows()
    with nk.chunk_bytes(tile=2 * 5 * (8 + 8) * 8):  # 5-token chunks by 16-column tiles
        assert rowchunk.tile_shape(index.numel(), w) == (5, 16)
        got = rowchunk.linear_forward(be, h2d, w, bias, index, targets, softcap)
        want = be.linear_forward(h2d, w, bias, index, targets, softcap)
        g = torch.randn_like(want[0])
        got += rowchunk.linear_backward(be, h2d, w, bias, index, targets, want[0], g, (True, True, True), softcap)
        want += be.linear_backward(h2d, w, bias, index, targets, want[0], g, (True, True, True), softcap)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_buffers_start_every_row_on_16_bytes(monkeypatch, device, backend, dtype):
    """An odd vocabulary (37, as one resized for added tokens): on a GPU the logits buffers that
    cuBLAS writes and the from-logits passes read, in the group path and in the tile passes (whose
    last tile is 5 columns wide on CPU), start every row on a 16-byte boundary, their row stride
    rounded up; on the CPU, whose BLAS takes any leading dimension, they are not padded. The loss is
    the float64 reference's either way."""
    from nca_kernels.backends import get_backend, rowchunk

    be = get_backend(backend, torch.device(device))
    seen = []

    def spy(name):
        original = getattr(be, name)

        def run(logits2d, *args):
            seen.append((name, logits2d.shape[1], logits2d.stride(0), logits2d.data_ptr() % 16))
            return original(logits2d, *args)

        monkeypatch.setattr(be, name, run)

    for name in ("logits_forward", "logits_exp_", "logits_backward"):
        if hasattr(be, name):
            spy(name)
    batch = make_batch(b=2, k=2, t=9, h=8, v=37, bias=True, device=device, seed=9)
    b = batch.cast(dtype)
    kw = dict(beta=0.1, alpha=0.1, bias=b.bias)
    loss = nk.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, recompute=False, backend=backend,
                             **kw)
    want = ref.fused_nca_loss(*(x.to(dtype).double() for x in (batch.hidden, batch.weight)), batch.labels,
                              batch.rewards, batch.ref_logps, **{**kw, "bias": batch.bias.to(dtype).double()})
    torch.testing.assert_close(loss.double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)
    group = len(seen)
    h2d, w, bias = (x.detach() for x in (b.hidden.reshape(-1, 8), b.weight, b.bias))
    index, targets = batch.response_rows()
    with nk.chunk_bytes(tile=1280):  # on CPU 10-token chunks by 16 (float32) or 32 (bf16) columns, then 5
        cols = rowchunk.tile_shape(index.numel(), w)[1]
        lse, _ = rowchunk.linear_forward(be, h2d, w, bias, index, targets)
        rowchunk.linear_backward(be, h2d, w, bias, index, targets, lse, torch.ones_like(lse), (True, True, True))
    assert group and {s[1] for s in seen[:group]} == {37}
    assert 37 % cols % 2 and {s[1] for s in seen[group:]} == {cols, 37 % cols}
    if device == "cpu":
        assert all(stride == width for _, width, stride, _ in seen), seen
    else:
        assert all(stride * dtype.itemsize % 16 == 0 and address == 0 for *_, stride, address in seen), seen


def test_row_stride_pads_to_16_bytes_off_the_cpu():
    from nca_kernels.backends.rowchunk import aligned_rows, row_stride

    assert [row_stride(37, torch.bfloat16, d) for d in ("cuda", "meta", "cpu")] == [40, 40, 37]
    assert [row_stride(c, torch.float32, "cuda") for c in (1, 4, 5, 128256, 128257)] == [4, 4, 8, 128256, 128260]
    assert row_stride(37, f64, torch.device("cuda", 1)) == 38
    buf = aligned_rows(3, 37, torch.bfloat16, "meta")
    assert buf.shape == (3, 37) and buf.stride() == (40, 1)
    assert aligned_rows(3, 37, torch.bfloat16, "cpu").is_contiguous()


def test_torch_logits_backward_in_place_zeroes_rows_outside_index():
    from nca_kernels.backends import torch_chunked as be

    logits = torch.randn(7, 11, dtype=f64)
    index = torch.tensor([1, 4, 5])
    targets = torch.tensor([0, 10, 3])
    lse, _ = be.logits_forward(logits, index, targets)
    g = torch.randn(3, dtype=f64)
    fresh = be.logits_backward(logits, index, targets, lse, g, False)
    buf = logits.clone()
    assert be.logits_backward(buf, index, targets, lse, g, True).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, fresh, rtol=0, atol=0)
    assert buf[[0, 2, 3, 6]].abs().max() == 0 and buf[index].abs().min() > 0


def test_module_passes_its_options():
    """Every option the module holds reaches fused_nca_loss (a custom ignore_index past V included),
    and ``return_metrics`` reaches it from the call."""
    batch = make_batch(b=2, k=3, t=7, h=8, v=23, bias=True)
    labels = torch.where(batch.labels == IGNORE, 23 + 7, batch.labels)
    kw = dict(beta=0.3, alpha=0.2, loss_type="nca", ignore_index=23 + 7, average=True, shift=True, softcap=2.0,
              recompute=False, backend="torch")
    module = nk.FusedNCALoss(**kw)
    args = (batch.hidden, batch.weight, labels, batch.rewards, batch.ref_logps)
    got = module(*args, bias=batch.bias)
    expected = nk.fused_nca_loss(*args, bias=batch.bias, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(got, batch.leaves()), torch.autograd.grad(expected, batch.leaves())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = nk.fused_nca_loss(*args, bias=batch.bias, beta=0.3, alpha=0.2, ignore_index=23 + 7, backend="torch")
    assert not torch.allclose(got, plain)
    loss, metrics = module(*args, bias=batch.bias, return_metrics=True)
    want_loss, want = nk.fused_nca_loss(*args, bias=batch.bias, return_metrics=True, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for key, value in want.items():
        torch.testing.assert_close(metrics[key], value, rtol=0, atol=0)


def test_module_defaults():
    """``FusedNCALoss()`` holds fused_nca_loss's defaults for every option the two share, and
    beta = alpha = 0.01."""
    import inspect

    module = nk.FusedNCALoss()
    params = inspect.signature(nk.fused_nca_loss).parameters
    for name in ("loss_type", "ignore_index", "average", "shift", "softcap", "recompute", "backend"):
        assert getattr(module, name) == params[name].default, name
    assert (module.beta, module.alpha) == (0.01, 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_takes_the_log_softmax_in_float32(dtype):
    """The naive reference reads 16-bit logits as given but takes their log-softmax in float32 (as
    the official code does): float32 log-probs, equal to float64's on the same rounded logits."""
    batch = make_batch(b=1, k=2, t=12, h=16, v=300, seed=6)
    logits = (batch.hidden @ batch.weight.t()).detach().mul(3).to(dtype)
    got = ref.sequence_logprobs_from_logits(logits, batch.labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.to(f64), ref.sequence_logprobs_from_logits(logits.to(f64), batch.labels),
                               rtol=1e-6, atol=1e-4)


def test_autocast_leaves_float64_alone():
    batch = make_batch(b=1, k=2, t=6, h=8, v=19, bias=True)
    expected = nk.sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=batch.bias, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nk.sequence_logprobs(batch.hidden, batch.weight, batch.labels, bias=batch.bias, backend="torch")
    assert got.dtype == f64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _tile_pass_inputs(t, dtype):
    """(hidden2d, weight, bias, index, targets, g) of a 16-bit batch with H=16, V=64, for rowchunk."""
    batch = make_batch(b=2, k=4, t=t, h=16, v=64, bias=True, dtype=dtype, seed=0)
    h2d, w, bias = (x.detach() for x in (batch.hidden.reshape(-1, 16), batch.weight, batch.bias))
    index, targets = batch.response_rows()
    g = torch.randn(index.numel(), generator=torch.Generator().manual_seed(0))
    return h2d, w, bias, index, targets, g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_tile_bias_grad_summed_in_float32(dtype):
    """``db`` of the tile passes (``rowchunk``) sums its token chunks in float32 and rounds once: 16-bit
    inputs in 8-token chunks give the very ``db`` of one tile holding every token."""
    from nca_kernels.backends import rowchunk
    from nca_kernels.backends import torch_chunked as be

    h2d, w, bias, index, targets, g = _tile_pass_inputs(128, dtype)
    lse, _ = rowchunk.linear_forward(be, h2d, w, bias, index, targets)
    assert rowchunk.tile_shape(index.numel(), w) == (index.numel(), 64)  # the default budget: one tile
    whole = rowchunk.linear_backward(be, h2d, w, bias, index, targets, lse, g, (False, False, True))[2]
    with nk.chunk_bytes(tile=2 * 8 * (2 + 4 + 2) * 16):  # 8-token chunks
        assert rowchunk.tile_shape(index.numel(), w) == (8, 64)
        chunked = rowchunk.linear_backward(be, h2d, w, bias, index, targets, lse, g, (False, False, True))[2]
    assert chunked.dtype == dtype
    assert (chunked.float() - whole.float()).abs().max() <= torch.finfo(dtype).eps / 2 * whole.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_chunk_bias_grad_summed_in_float32(dtype):
    """``chunk_grads_`` adds each 16-bit chunk's ``db`` to the float32 accumulator unrounded: 8-row
    chunks give the ``db`` of one chunk holding every row, up to float32 summation order."""
    from nca_kernels.backends import rowchunk
    from nca_kernels.backends import torch_chunked as be

    h2d, w, bias, index, targets, g = _tile_pass_inputs(64, dtype)
    dbias = {}
    for rows in (index.numel(), 8):
        dbias[rows] = torch.zeros(64)
        for r0 in range(0, index.numel(), rows):
            s = slice(r0, r0 + rows)
            buf = rowchunk.logits_chunk(h2d, w, bias, index[s])
            lse, _, shift = rowchunk.chunk_stats_(be, buf, targets[s], True)
            rowchunk.chunk_grads_(be, buf, h2d, w, index[s], targets[s], lse, shift, g[s], None, None, dbias[rows])
    whole, chunked = dbias[index.numel()], dbias[8]
    assert (chunked - whole).abs().max() <= 1e-5 * whole.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_mode_bias_grad_summed_in_float32(dtype):
    """``recompute=False`` with 16-bit inputs sums the chunks' bias gradients in float32 and rounds
    once: one-row chunks (about a hundred) give the bias gradient of one chunk holding every row
    within one rounding, and both are near the float64 reference's."""
    batch = make_batch(b=4, k=2, t=24, h=16, v=64, bias=True, seed=0)
    kw = dict(beta=0.1, alpha=0.1)
    r = batch.cast(f64)
    expected = _grads(ref.fused_nca_loss(r.hidden, r.weight, r.labels, r.rewards, r.ref_logps, bias=r.bias, **kw),
                      r.bias)[0]
    b = batch.cast(dtype)
    dbias = []
    for group in (1, 1 << 30):
        with nk.chunk_bytes(group=group):
            loss = nk.fused_nca_loss(b.hidden, b.weight, b.labels, b.rewards, b.ref_logps, bias=b.bias,
                                     recompute=False, backend="torch", **kw)
            dbias.append(_grads(loss, b.bias)[0].to(f64))
    chunked, whole = dbias
    assert (chunked - whole).abs().max() <= torch.finfo(dtype).eps * whole.abs().max()
    assert (whole - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_torch_logits_backward_out_of_place_leaves_the_logits_alone():
    from nca_kernels.backends import torch_chunked as be

    logits = torch.randn(7, 11, dtype=f64)
    targets = torch.tensor([0, 10, 3, 3, 5, 1, 9])
    lse, _ = be.logits_forward(logits, None, targets)
    g = torch.randn(7, dtype=f64)
    saved = logits.clone()
    fresh = be.logits_backward(logits, None, targets, lse, g, False)
    torch.testing.assert_close(logits, saved, rtol=0, atol=0)
    assert fresh.data_ptr() != logits.data_ptr()
    torch.testing.assert_close(fresh, be.logits_backward(saved, None, targets, lse, g, True), rtol=0, atol=0)
