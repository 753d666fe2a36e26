"""Peak memory stays at the floor: the gradients plus one bounded chunk, never the logits."""

import pytest
import torch

import nca_kernels as nk
from benchmarks.memory import peak_bytes
from nca_kernels import reference as ref

from .conftest import make_batch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch():
    # 4 x 128 positions, half prompt: 256 response tokens; float32 logits would be 4 MiB
    return make_batch(b=2, k=2, t=128, h=32, v=4096, dtype=torch.float32, seed=0)


def _fwd_bwd(batch, **kw):
    def run():
        loss = nk.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps,
                                 beta=0.1, alpha=0.1, backend="torch", **kw)
        torch.autograd.grad(loss, (batch.hidden, batch.weight))

    return run


def _grad_bytes(batch):
    return (batch.hidden.numel() + batch.weight.numel()) * 4


def test_meter_sees_naive_logits(batch):
    def naive():
        loss = ref.fused_nca_loss(batch.hidden, batch.weight, batch.labels, batch.rewards, batch.ref_logps,
                                  beta=0.1, alpha=0.1)
        torch.autograd.grad(loss, (batch.hidden, batch.weight))

    logits_bytes = batch.labels.numel() * batch.weight.shape[0] * 4
    assert peak_bytes(naive, CPU) >= 2 * logits_bytes


@pytest.mark.parametrize("tile", [64 << 10, 256 << 10])
def test_recompute_peak_is_gradients_plus_one_tile(batch, tile):
    with nk.chunk_bytes(tile=tile):
        peak = peak_bytes(_fwd_bwd(batch, recompute=True), CPU)
    # a tile, its token rows and O(tokens) statistics: measured 1.5 tiles and 95 KiB
    assert _grad_bytes(batch) <= peak <= _grad_bytes(batch) + 1.8 * tile + (128 << 10)


@pytest.mark.parametrize("group", [512 << 10, 2 << 20])
def test_grouped_peak_is_gradients_plus_one_chunk(batch, group):
    with nk.chunk_bytes(group=group):
        peak = peak_bytes(_fwd_bwd(batch, recompute=False), CPU)
    assert _grad_bytes(batch) <= peak <= _grad_bytes(batch) + 1.2 * group + (64 << 10)  # measured 1.0 group


def test_grouped_peak_at_the_default_budget(batch, monkeypatch):
    """At the default budget (a chunk may reach 192 MiB, one group 1 GiB) the group path's buffer holds
    the largest chunk it has, here the logits of every response token, not as many rows as the budget."""
    from nca_kernels import config

    monkeypatch.setattr(config, "group_bytes", None)
    peak = peak_bytes(_fwd_bwd(batch, recompute=False), CPU)
    logits = int((batch.labels != -100).sum()) * batch.weight.shape[0] * 4
    assert _grad_bytes(batch) + logits <= peak <= _grad_bytes(batch) + 1.2 * logits + (64 << 10)


def test_wide_hidden_rows_are_counted():
    """H=512 beside V=1024: the token rows (gathered hidden, dH) weigh as much as the logits, and
    both budgets count them. Recompute: one tile of logits and two of token rows (measured 3.2
    tiles); group: a chunk's logits and its rows within the budget (measured 0.8)."""
    batch = make_batch(b=2, k=2, t=128, h=512, v=1024, dtype=torch.float32, seed=3)
    with nk.chunk_bytes(tile=64 << 10):
        peak = peak_bytes(_fwd_bwd(batch, recompute=True), CPU)
    assert _grad_bytes(batch) <= peak <= _grad_bytes(batch) + 3.6 * (64 << 10) + (128 << 10)
    with nk.chunk_bytes(group=512 << 10):
        peak = peak_bytes(_fwd_bwd(batch, recompute=False), CPU)
    assert _grad_bytes(batch) <= peak <= _grad_bytes(batch) + 1.1 * (512 << 10) + (64 << 10)


def test_from_logits_never_copies_the_logits():
    batch = make_batch(b=2, k=2, t=64, h=8, v=4096, dtype=torch.bfloat16, seed=1)
    logits = (batch.hidden @ batch.weight.t()).detach().requires_grad_()

    def run():
        out = nk.sequence_logprobs_from_logits(logits, batch.labels, backend="torch")
        torch.autograd.grad(out.sum(), logits)

    with nk.chunk_bytes(tile=64 << 10):
        peak = peak_bytes(run, CPU)
    grad_bytes = logits.numel() * logits.element_size()
    assert peak <= grad_bytes + 4 * (64 << 10) + (64 << 10)


def test_from_logits_inplace_backward_allocates_no_gradient():
    """``inplace_backward=True``: backward writes the gradient into the logits, so its peak is one
    chunk; out of place it is the logits-sized gradient plus one chunk."""
    batch = make_batch(b=2, k=2, t=64, h=8, v=4096, dtype=torch.float32, seed=3)
    logits = (batch.hidden @ batch.weight.t()).detach()
    peaks = {}
    for inplace in (False, True):
        x = logits.clone().requires_grad_()

        def run():
            out = nk.sequence_logprobs_from_logits(x, batch.labels, inplace_backward=inplace, backend="torch")
            torch.autograd.grad(out.sum(), x)

        with nk.chunk_bytes(tile=64 << 10):
            peaks[inplace] = peak_bytes(run, CPU)
    size = logits.numel() * logits.element_size()  # 1 MiB
    assert size <= peaks[False] <= size + 4 * (64 << 10) + (64 << 10)
    assert peaks[True] <= 4 * (64 << 10) + (64 << 10)


@pytest.mark.parametrize("tile", [256 << 10, 1 << 20, 4 << 20])
def test_tile_passes_stay_within_the_tile_budget(tile):
    """The GPU backends' (tokens x vocab) tile passes (``rowchunk``, here with the torch backend's
    from-logits passes, float32): beyond dH and dW, one tile and its token rows as ``tile_shape``
    counts them, never more than the budget."""
    from nca_kernels.backends import rowchunk, torch_chunked

    batch = make_batch(b=2, k=2, t=512, h=64, v=8000, dtype=torch.float32, seed=2)
    hidden, weight = batch.hidden.detach().reshape(-1, 64), batch.weight.detach()
    index, targets = batch.response_rows()
    with nk.chunk_bytes(tile=tile):
        lse, _ = rowchunk.linear_forward(torch_chunked, hidden, weight, None, index, targets)
        grad = torch.randn(index.numel())
        peak = peak_bytes(lambda: rowchunk.linear_backward(torch_chunked, hidden, weight, None, index, targets,
                                                           lse, grad, (True, True, False)), CPU)
    grads = (hidden.numel() + weight.numel()) * 4
    assert grads <= peak <= grads + 1.05 * tile + (16 << 10)


def test_rounded_products_are_added_in_bounded_blocks():
    """Where a 16-bit product must be rounded before it joins a float32 accumulator (no unrounded
    addmm here), it is formed in row blocks of at most a quarter of the tile budget."""
    from nca_kernels.backends.torch_chunked import addmm_

    out = torch.zeros(2048, 512)
    a, b = torch.randn(2048, 64).bfloat16(), torch.randn(64, 512).bfloat16()
    with nk.chunk_bytes(tile=1 << 20):
        peak = peak_bytes(lambda: addmm_(out, a, b), CPU)
    assert peak <= (1 << 20) // 4  # the whole product would be 2 MiB
    torch.testing.assert_close(out, (a @ b).float())


@pytest.mark.parametrize("wide", [False, True])
def test_tile_shape_counts_the_product_row_only_where_it_exists(monkeypatch, wide):
    """At the headline shape (V=128256, H=4096, bf16, 48 MiB): a token row costs its hidden row, its
    float32 dH row and, unless the matmul adds into float32 unrounded, a bf16 dH product row."""
    from nca_kernels.backends import rowchunk

    monkeypatch.setattr(rowchunk, "wide_addmm", lambda device, dtype: wide)
    weight = torch.empty(128256, 4096, dtype=torch.bfloat16, device="meta")
    with nk.chunk_bytes(tile=48 << 20):
        rows, cols = rowchunk.tile_shape(8192, weight)
    row = (2 + 4 + (0 if wide else 2)) * 4096
    assert rowchunk.tile_row_bytes(4096, torch.bfloat16, weight.device) == row
    assert rows * cols * 2 + rows * row <= 48 << 20
    assert (rows, cols) == ((1024, 12288) if wide else (768, 16384))


@pytest.mark.parametrize("h, v, budget, want", [
    (3584, 152064, 48 << 20, (877, 14336)),  # Qwen2-7B: 14359 columns before alignment
    (5120, 152064, 48 << 20, (614, 20480)),  # 20506 before
    (16, 1000, 1000, (3, 96)),  # under 128 columns: whole 16 bytes, as the budget gives (102 before padding)
    (64, 1000, 1500, (1, 384)),  # one row: columns rounded down to whole blocks
    (64, 1000, 64 << 20, (1024, 1000)),  # the whole vocabulary
])
def test_tile_columns_are_aligned_when_the_vocabulary_is_split(monkeypatch, h, v, budget, want):
    """A vocabulary split into tiles gets tiles of whole 128-column blocks; a tile and its rows'
    padding to 16 bytes (a weight on the meta device stands for a GPU's) fit the budget."""
    from nca_kernels.backends import rowchunk

    monkeypatch.setattr(rowchunk, "wide_addmm", lambda device, dtype: False)
    weight = torch.empty(v, h, dtype=torch.bfloat16, device="meta")
    with nk.chunk_bytes(tile=budget):
        rows, cols = rowchunk.tile_shape(8192, weight)
    assert (rows, cols) == want
    padded = rowchunk.row_stride(cols, torch.bfloat16, weight.device)
    assert rows * padded * 2 + rows * rowchunk.tile_row_bytes(h, torch.bfloat16, weight.device) <= budget


def test_tile_rows_never_exceed_the_tokens(monkeypatch):
    """Fewer tokens than the budget's rows: a tile holds only those tokens, and their logits take the
    rest of the budget (here the whole vocabulary)."""
    from nca_kernels.backends import rowchunk

    monkeypatch.setattr(rowchunk, "wide_addmm", lambda device, dtype: False)
    weight = torch.empty(128256, 4096, dtype=torch.bfloat16, device="meta")
    with nk.chunk_bytes(tile=48 << 20):  # 8192 tokens: 768 x 16384 (above)
        assert rowchunk.tile_shape(100, weight) == (100, 128256)


def test_group_rows_count_the_hidden_and_dh_rows():
    """A group-chunk row costs its logits, its gathered hidden row and its dH row."""
    from nca_kernels.backends import rowchunk

    weight = torch.empty(1024, 512, dtype=torch.float32, device="meta")
    with nk.chunk_bytes(group=512 << 10):
        assert rowchunk.rows_per_chunk(weight) == (64, 64)  # (1024 + 2 * 512) * 4 bytes a row


def test_default_budgets(monkeypatch):
    """With no budget set: tiles of 1 MiB on CPU and 48 MiB on CUDA; group chunks packed up to 192 MiB
    on CPU and 1 GiB on CUDA, one group held whole up to 1 GiB; another device type takes the CPU's.
    A set group budget is both the pack and the cap."""
    from nca_kernels import config

    monkeypatch.setattr(config, "tile_bytes", None)
    monkeypatch.setattr(config, "group_bytes", None)
    budgets = {kind: (config.tile_budget(torch.device(kind)), config.group_budget(torch.device(kind)))
               for kind in ("cpu", "cuda", "meta")}
    cpu = (1 << 20, (192 << 20, 1 << 30))
    assert budgets == {"cpu": cpu, "cuda": (48 << 20, (1 << 30, 1 << 30)), "meta": cpu}
    with nk.chunk_bytes(tile=4096, group=8192):
        assert (config.tile_budget(CPU), config.group_budget(torch.device("cuda"))) == (4096, (8192, 8192))
