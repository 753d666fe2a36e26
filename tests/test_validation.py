"""Bad input raises ValueError/TypeError naming the argument, before any computation."""

import math

import pytest
import torch

import nca_kernels as nk
from nca_kernels import validation

from .conftest import make_batch


@pytest.fixture
def batch():
    return make_batch(b=2, k=2, t=5, h=4, v=11, dtype=torch.float32, seed=0)


def _call(batch, **over):
    args = dict(hidden=batch.hidden, weight=batch.weight, labels=batch.labels, rewards=batch.rewards,
                ref_logps=batch.ref_logps, beta=0.1, alpha=0.1, loss_type="nca", backend="torch")
    args.update(over)
    h, w, y, r, ref = (args.pop(k) for k in ("hidden", "weight", "labels", "rewards", "ref_logps"))
    return nk.fused_nca_loss(h, w, y, r, ref, **args)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (lambda b: dict(hidden=b.hidden[0]), ValueError, "hidden must be"),
        (lambda b: dict(weight=b.weight[:, :3]), ValueError, "weight must be"),
        (lambda b: dict(weight=b.weight.double()), TypeError, "weight dtype"),
        (lambda b: dict(hidden=b.hidden.long()), TypeError, "hidden must be a floating"),
        (lambda b: dict(hidden=b.hidden.tolist()), TypeError, "hidden must be a torch.Tensor"),
        (lambda b: dict(bias=torch.zeros(10)), ValueError, "bias must be"),
        (lambda b: dict(bias=torch.zeros(11, dtype=torch.float64)), TypeError, "bias dtype"),
        (lambda b: dict(labels=b.labels[:, :4]), ValueError, "labels has shape"),
        (lambda b: dict(labels=b.labels.int()), TypeError, "labels must be int64"),
        (lambda b: dict(labels=torch.where(b.labels == -100, b.labels, 11)), ValueError, "outside \\[0, 11\\)"),
        (lambda b: dict(labels=torch.where(b.labels == -100, b.labels, -1)), ValueError, "labels contains -1"),
        (lambda b: dict(rewards=b.rewards[:1], ref_logps=b.ref_logps[:1]), ValueError, "S=4"),
        (lambda b: dict(rewards=b.rewards.reshape(4)), ValueError, "rewards must be"),
        (lambda b: dict(ref_logps=b.ref_logps[:, :1]), ValueError, "ref_logps has shape"),
        (lambda b: dict(rewards=b.rewards.masked_fill(torch.eye(2, dtype=torch.bool), math.nan)), ValueError,
         "rewards contains non-finite"),
        (lambda b: dict(ref_logps=b.ref_logps.masked_fill(torch.eye(2, dtype=torch.bool), -math.inf)), ValueError,
         "ref_logps contains non-finite"),
        (lambda b: dict(beta=0.0), ValueError, "beta must be > 0"),
        (lambda b: dict(beta=-1.0), ValueError, "beta must be > 0"),
        (lambda b: dict(beta=math.nan), ValueError, "beta must be finite"),
        (lambda b: dict(beta="0.1"), TypeError, "beta must be a float"),
        (lambda b: dict(alpha=-0.1), ValueError, "alpha must be >= 0"),
        (lambda b: dict(loss_type="ipo"), ValueError, "loss_type must be one of"),
        (lambda b: dict(backend="tpu"), ValueError, "backend must be one of"),
        (lambda b: dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (lambda b: dict(softcap=0.0), ValueError, "softcap must be a finite float > 0"),
        (lambda b: dict(softcap=math.inf), ValueError, "softcap must be a finite float > 0"),
        (lambda b: dict(softcap="30"), TypeError, "softcap must be a float or None"),
        (lambda b: dict(ignore_index=True), TypeError, "ignore_index must be an int"),
        (lambda b: dict(bias=[0.0] * 11), TypeError, "bias must be a torch.Tensor"),
        (lambda b: dict(bias=torch.zeros(11, device="meta")), ValueError, "bias is on meta"),
        (lambda b: dict(rewards=b.rewards.long()), TypeError, "rewards must be a floating"),
        (lambda b: dict(rewards=b.rewards.to("meta")), ValueError, "rewards is on meta"),
        (lambda b: dict(softcap=-1.0), ValueError, "softcap must be a finite float > 0"),
        (lambda b: dict(loss_type=["nca"]), ValueError, "loss_type must be one of"),
        (lambda b: dict(alpha=math.nan), ValueError, "alpha must be finite"),
        (lambda b: dict(alpha=math.inf), ValueError, "alpha must be finite"),
        (lambda b: dict(average="no"), TypeError, "average must be a bool"),
        (lambda b: dict(shift=1), TypeError, "shift must be a bool"),
        (lambda b: dict(recompute=None), TypeError, "recompute must be a bool"),
        (lambda b: dict(return_metrics="yes"), TypeError, "return_metrics must be a bool"),
        (lambda b: dict(hidden=b.hidden[:, :, :0], weight=b.weight[:, :0]), ValueError, "with H > 0"),
        (lambda b: dict(weight=b.weight[:0]), ValueError, "weight must be \\(V > 0"),
        (lambda b: dict(hidden=b.hidden[:0], labels=b.labels[:0], rewards=b.rewards[:0], ref_logps=b.ref_logps[:0]),
         ValueError, "at least one prompt"),
    ],
)
def test_fused_nca_loss_rejects(batch, over, exc, match):
    with pytest.raises(exc, match=match):
        _call(batch, **over(batch))


@pytest.mark.parametrize("position", [1, -1])
def test_shift_checks_every_label_it_reads(batch, position):
    labels = batch.labels.clone()
    labels[:, position] = 10**6
    with pytest.raises(ValueError, match="labels contains 1000000, outside"):  # the bad label, not the first one
        _call(batch, labels=labels, shift=True)


def test_numbers_read_as_floats(batch):
    """Any real number (a Fraction here) is read as the Python float it equals, by fused_nca_loss and
    by nca_loss."""
    from fractions import Fraction

    torch.testing.assert_close(_call(batch, beta=Fraction(1, 10), alpha=Fraction(1, 10)), _call(batch), rtol=0, atol=0)
    args = (batch.ref_logps + 1.0, batch.ref_logps, batch.rewards)
    torch.testing.assert_close(nk.nca_loss(*args, beta=Fraction(1, 10), alpha=Fraction(1, 2)),
                               nk.nca_loss(*args, beta=0.1, alpha=0.5), rtol=0, atol=0)


def test_numpy_scalars_accepted(batch):
    """NumPy scalars (as configs often carry them) are read as the Python numbers they hold."""
    np = pytest.importorskip("numpy")
    expected = _call(batch)
    got = _call(batch, beta=np.float32(0.1), alpha=np.float64(0.1), ignore_index=np.int64(-100),
                softcap=None, average=np.bool_(False), recompute=np.bool_(True))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_shift_reads_no_label_at_the_first_position(batch):
    """With shift=True the first label is never predicted, so it is not checked either."""
    labels = batch.labels.clone()
    labels[:, 0] = 10**6
    with pytest.raises(ValueError, match="outside"):
        _call(batch, labels=labels)
    _call(batch, labels=labels, shift=True)


@pytest.mark.parametrize(
    "name,value,match",
    [("NCA_KERNELS_TILE_BYTES", "1M", "invalid literal"), ("NCA_KERNELS_GROUP_BYTES", "-1", "positive int"),
     ("NCA_KERNELS_DETERMINISTIC", "true", "expected 1 or 0"), ("NCA_KERNELS_FILTER_EPS", "abc", "could not convert"),
     ("NCA_KERNELS_TRITON_BACKWARD", "Matmul", "backward must be one of"),
     ("NCA_KERNELS_WEIGHT_GRAD_ACCUM", "fp32", "weight_grad_accum must be one of")],
)
def test_bad_environment_variable_named(monkeypatch, name, value, match):
    from nca_kernels import config

    for option in ("tile_bytes", "group_bytes", "filter_eps", "deterministic", "backward", "weight_grad_accum"):
        monkeypatch.setattr(config, option, getattr(config, option))  # restored after the test
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"environment variable {name}='{value}': .*{match}"):
        config._from_environment()


def test_empty_environment_variables_are_unset(monkeypatch):
    from nca_kernels import config

    for option in ("tile_bytes", "deterministic", "backward"):
        monkeypatch.setattr(config, option, getattr(config, option))
    for name in ("NCA_KERNELS_TILE_BYTES", "NCA_KERNELS_DETERMINISTIC", "NCA_KERNELS_TRITON_BACKWARD"):
        monkeypatch.setenv(name, " ")
    config._from_environment()
    monkeypatch.setenv("NCA_KERNELS_DETERMINISTIC", " 1 ")
    config._from_environment()
    assert config.deterministic is True


def test_environment_variables_applied(monkeypatch):
    from nca_kernels import config

    for option in ("tile_bytes", "deterministic", "weight_grad_accum"):
        monkeypatch.setattr(config, option, getattr(config, option))
    monkeypatch.setenv("NCA_KERNELS_TILE_BYTES", "4096")
    monkeypatch.setenv("NCA_KERNELS_DETERMINISTIC", "1")
    monkeypatch.setenv("NCA_KERNELS_WEIGHT_GRAD_ACCUM", "float32")
    config._from_environment()
    assert (config.tile_bytes, config.deterministic, config.weight_grad_accum) == (4096, True, "float32")
    tile = config.tile_bytes
    for name, value in (("NCA_KERNELS_TILE_BYTES", ""), ("NCA_KERNELS_DETERMINISTIC", "0"),
                        ("NCA_KERNELS_GROUP_BYTES", "8192"), ("NCA_KERNELS_SCRATCH_BYTES", "4096"),
                        ("NCA_KERNELS_FILTER_EPS", "0.25")):
        monkeypatch.setenv(name, value)
    for option in ("group_bytes", "scratch_bytes", "filter_eps"):
        monkeypatch.setattr(config, option, getattr(config, option))
    config._from_environment()
    assert (config.tile_bytes, config.deterministic, config.group_bytes) == (tile, False, 8192)
    assert (config.scratch_bytes, config.filter_eps) == (4096, 0.25)


def test_context_managers_restore_the_options():
    from nca_kernels import config

    saved = (config.tile_bytes, config.group_bytes, config.filter_eps, config.deterministic, config.backward,
             config.scratch_bytes, config.weight_grad_accum)
    with nk.chunk_bytes(tile=4096, group=8192):
        assert (config.tile_bytes, config.group_bytes) == (4096, 8192)
    with config.triton_options(filter_eps=0.5, deterministic=True, backward="fused", scratch_bytes=1024):
        assert (config.filter_eps, config.deterministic, config.backward, config.scratch_bytes) == (0.5, True,
                                                                                                    "fused", 1024)
    with config.weight_grad_accumulation("float32"):
        assert config.weight_grad_accum == "float32"
    assert (config.tile_bytes, config.group_bytes, config.filter_eps, config.deterministic, config.backward,
            config.scratch_bytes, config.weight_grad_accum) == saved


def test_pair_aliases_need_k2():
    batch = make_batch(b=1, k=4, t=5, h=4, v=11, dtype=torch.float32, seed=0)
    for loss_type in ("dpo", "nca_pair"):
        with pytest.raises(ValueError, match="needs K=2"):
            _call(batch, loss_type=loss_type)


def test_single_response_rejected():
    batch = make_batch(b=4, k=1, t=5, h=4, v=11, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="K >= 2"):
        _call(batch)


def test_device_mismatch_named():
    batch = make_batch(b=1, k=2, t=5, h=4, v=11, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="weight is on meta"):
        _call(batch, weight=torch.empty(11, 4, device="meta"))
    with pytest.raises(ValueError, match="labels is on cpu but hidden is on meta"):  # a device without autocast
        _call(batch, hidden=batch.hidden.to("meta"), weight=batch.weight.to("meta"))
    with pytest.raises(ValueError, match="rewards is on cpu but policy_logps is on meta"):
        nk.nca_loss(torch.zeros(1, 2, device="meta"), batch.ref_logps, batch.rewards, beta=0.1, alpha=0.1)


def test_other_entry_points_validate(batch):
    with pytest.raises(ValueError, match="labels has shape"):
        nk.sequence_logprobs(batch.hidden, batch.weight, batch.labels[:1], backend="torch")
    with pytest.raises(ValueError, match="logits must be"):
        nk.sequence_logprobs_from_logits(batch.hidden[0], batch.labels, backend="torch")
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 3), batch.labels.clamp(min=0) + 3, backend="torch")
    with pytest.raises(ValueError, match="policy_logps has shape"):
        nk.nca_loss(torch.zeros(2, 3), batch.ref_logps, batch.rewards, beta=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        nk.sequence_logprobs(batch.hidden, batch.weight, batch.labels, backend="Torch")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        nk.FusedNCALoss(loss_type="sigmoid")
    with pytest.raises(TypeError, match="recompute must be a bool"):
        nk.FusedNCALoss(recompute="False")
    with pytest.raises(TypeError, match="average must be a bool"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 3), batch.labels, average=0, backend="torch")
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 3), batch.labels, inplace_backward="yes", backend="torch")
    with pytest.raises(ValueError, match="with V > 0"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 0), batch.labels, backend="torch")
    with pytest.raises(ValueError, match="logits must be"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 2, 11), batch.labels, backend="torch")
    with pytest.raises(TypeError, match="logits must be a floating"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 3, dtype=torch.int64), batch.labels, backend="torch")
    with pytest.raises(ValueError, match="labels is on meta"):
        nk.sequence_logprobs_from_logits(torch.zeros(4, 5, 3), batch.labels.to("meta"), backend="torch")
    for bad, match in ((dict(filter_eps=1.0), "filter_eps must be"), (dict(scratch_bytes=0), "scratch_bytes must"),
                       (dict(deterministic=1), "deterministic must be a bool")):
        with pytest.raises((TypeError, ValueError), match=match):
            nk.config.set_triton_options(**bad)
    with pytest.raises(ValueError, match="tile must be a positive"):
        nk.set_chunk_bytes(tile=0)
    with pytest.raises(ValueError, match="tile must be a positive"):
        nk.set_chunk_bytes(tile=True)
    with pytest.raises(TypeError, match="policy_logps must be a floating"):
        nk.nca_loss(torch.zeros(2, 2, dtype=torch.int64), batch.ref_logps, batch.rewards, beta=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="weight_grad_accum must be one of"):
        nk.config.set_weight_grad_accum("bf16")
    assert nk.config.weight_grad_accum == "weight"  # unchanged by the refused value


@pytest.mark.parametrize("entry", ["sequence_logprobs", "from_logits", "recompute", "group"])
def test_unavailable_backend_explains(batch, entry):
    """A backend asked for by name is the one run: "cuda" for CPU tensors raises, on every entry point."""
    calls = {
        "sequence_logprobs": lambda: nk.sequence_logprobs(batch.hidden, batch.weight, batch.labels, backend="cuda"),
        "from_logits": lambda: nk.sequence_logprobs_from_logits(batch.hidden @ batch.weight.t(), batch.labels,
                                                                backend="cuda"),
        "recompute": lambda: _call(batch, backend="cuda", recompute=True),
        "group": lambda: _call(batch, backend="cuda", recompute=False),
    }
    with pytest.raises(RuntimeError, match="backend 'cuda' needs tensors on a CUDA device"):
        calls[entry]()


def test_checks_return_python_values():
    """An int ignore_index (NumPy's too) comes back as a Python int and NumPy bool flags as Python bools,
    so that no NumPy scalar reaches the label comparisons or the options a module keeps."""
    np = pytest.importorskip("numpy")
    labels = torch.tensor([[-100, 3, 4]])
    for ignore_index in (-100, np.int64(-100)):
        got = validation.check_labels(labels, (1, 3), 5, ignore_index, "logits[:, :, 0]")
        assert type(got) is int and got == -100
    flags = validation.check_flags(average=np.bool_(True), shift=False, recompute=np.bool_(False))
    assert flags == (True, False, False) and all(type(x) is bool for x in flags)
