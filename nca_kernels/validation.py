"""Argument checks shared by every entry point: fail early, name the argument and the shapes."""

from __future__ import annotations

import math
import numbers

import torch

from .losses import LOSS_TYPES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton", "cuda")


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")


def _number(name: str, x, kind: type = numbers.Real, what: str = "a float"):
    """``x`` as a Python float (int for ``numbers.Integral``): any real number but a bool, NumPy's included."""
    if isinstance(x, bool) or not isinstance(x, kind):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    return int(x) if kind is numbers.Integral else float(x)


def check_flags(**flags) -> tuple[bool, ...]:
    """Each flag as a Python bool, in the order given: a bool or a NumPy bool only (a string such as
    ``"no"`` would otherwise read as True)."""
    out = []
    for name, x in flags.items():
        if not (isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"))):
            raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
        out.append(bool(x))
    return tuple(out)


def _same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_labels(labels, shape: tuple[int, ...], vocab: int, ignore_index, like: str, shift: bool = False) -> int:
    """labels: int64 ``shape``; every entry that is read (all but the first position with ``shift``)
    in ``[0, vocab)`` or equal to ignore_index. Returns ignore_index as an int."""
    _tensor("labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(shape)} to match {like}")
    ignore_index = _number("ignore_index", ignore_index, numbers.Integral, "an int")
    read = labels[:, 1:] if shift else labels
    valid = read != ignore_index
    if valid.any():
        bad = valid & ((read < 0) | (read >= vocab))
        if bad.any():
            v = read[bad][0].item()
            raise ValueError(f"labels contains {v}, outside [0, {vocab}) and not ignore_index={ignore_index}")
    return ignore_index


def check_softcap(softcap) -> float | None:
    """softcap: None, or a finite float > 0 (logits become ``softcap * tanh(logits / softcap)``);
    returned as a float."""
    if softcap is None:
        return None
    softcap = _number("softcap", softcap, what="a float or None")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap}")
    return softcap


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_hidden_inputs(hidden, weight, labels, bias, ignore_index, shift: bool = False) -> int:
    """hidden ``(S, T, H)`` with H > 0, weight ``(V, H)``, bias ``(V,)`` or None, labels ``(S, T)``
    (see :func:`check_labels`). Returns ignore_index as an int."""
    _tensor("hidden", hidden)
    _tensor("weight", weight)
    _float("hidden", hidden)
    _float("weight", weight)
    if hidden.dim() != 3 or hidden.shape[2] == 0:
        raise ValueError(f"hidden must be (S, T, H) with H > 0, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be (V > 0, H={hidden.shape[2]}), got shape {tuple(weight.shape)} "
            f"for hidden of shape {tuple(hidden.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        _tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be (V={weight.shape[0]},), got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    _same_device("hidden", hidden, weight=weight, bias=bias, labels=_tensor("labels", labels))
    return check_labels(labels, hidden.shape[:2], weight.shape[0], ignore_index, "hidden[:, :, 0]", shift)


def check_logits_inputs(logits, labels, ignore_index, shift: bool = False) -> int:
    """logits ``(S, T, V)`` floating, labels ``(S, T)``. Returns ignore_index as an int."""
    _tensor("logits", logits)
    _float("logits", logits)
    if logits.dim() != 3 or logits.shape[2] == 0:
        raise ValueError(f"logits must be (S, T, V) with V > 0, got shape {tuple(logits.shape)}")
    _same_device("logits", logits, labels=_tensor("labels", labels))
    return check_labels(labels, logits.shape[:2], logits.shape[2], ignore_index, "logits[:, :, 0]", shift)


def check_loss_params(beta, alpha, loss_type) -> tuple[float, float]:
    """beta > 0 and alpha >= 0, finite real numbers; returns them as floats."""
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    beta, alpha = _number("beta", beta), _number("alpha", alpha)
    for name, value in (("beta", beta), ("alpha", alpha)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return beta, alpha


def check_policy_logps(policy_logps, rewards) -> None:
    """policy_logps: a floating tensor of rewards' shape ``(B, K)``."""
    _tensor("policy_logps", policy_logps)
    _float("policy_logps", policy_logps)
    _tensor("rewards", rewards)
    if policy_logps.shape != rewards.shape:
        raise ValueError(
            f"policy_logps has shape {tuple(policy_logps.shape)} but rewards has shape {tuple(rewards.shape)}"
        )


def check_group_tensors(rewards, ref_logps, num_sequences: int | None, loss_type: str, like_name: str,
                        like: torch.Tensor) -> tuple[int, int]:
    """rewards and ref_logps ``(B, K)``, finite, on the device of ``like`` (named ``like_name`` in
    errors); ``B*K == num_sequences`` if given.

    Returns ``(B, K)``.
    """
    for name, x in (("rewards", rewards), ("ref_logps", ref_logps)):
        _tensor(name, x)
        _float(name, x)
        if x.dim() != 2:
            raise ValueError(f"{name} must be (B, K), got shape {tuple(x.shape)}")
    _same_device(like_name, like, rewards=rewards, ref_logps=ref_logps)
    if rewards.shape != ref_logps.shape:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)} but ref_logps has shape {tuple(ref_logps.shape)}"
        )
    b, k = rewards.shape
    if b == 0:
        raise ValueError(f"rewards must have at least one prompt, got shape {tuple(rewards.shape)}")
    if k < 2:
        raise ValueError(f"rewards must have K >= 2 responses per prompt, got shape {tuple(rewards.shape)}")
    if loss_type in ("dpo", "nca_pair") and k != 2:
        raise ValueError(f"loss_type={loss_type!r} needs K=2 responses per prompt, got K={k}")
    if num_sequences is not None and b * k != num_sequences:
        raise ValueError(
            f"rewards has shape {(b, k)}: B*K={b * k} must equal the number of sequences S={num_sequences}"
        )
    for name, x in (("rewards", rewards), ("ref_logps", ref_logps)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains non-finite values")
    return b, k
