"""Backend registry.

Every backend is a module exposing the same four passes. Shapes: ``hidden2d (M, H)``,
``weight (V, H)``, ``bias (V,)`` or None, ``logits2d (M, V)``; ``index (N,)`` int64 selects the
response rows (None: every row) and ``targets (N,)`` int64 their labels, all in ``[0, V)``.
Statistics come back in the accumulation dtype (float32, float64 for float64 inputs).

- ``linear_forward(hidden2d, weight, bias, index, targets, softcap=None) -> (lse, target_logit)``,
  each ``(N,)``; with ``softcap`` the logits are ``softcap * tanh(logits / softcap)``.
- ``linear_backward(hidden2d, weight, bias, index, targets, lse, grad_tok, needs, softcap=None)
  -> (dhidden2d, dweight, dbias)``: the gradients of ``sum_n grad_tok[n] * logp[n]`` where
  ``logp = target_logit - lse``, i.e. logit gradients ``grad_tok * (onehot - softmax)`` (times the
  cap's slope with softcap); input dtypes; None where ``needs`` (three bools) says it is not
  wanted; rows outside index are zero.
- ``logits_forward(logits2d, index, targets) -> (lse, target_logit)``.
- ``logits_backward(logits2d, index, targets, lse, grad_tok, inplace) -> dlogits2d``: the logits
  gradient in the logits dtype, zero outside index; with ``inplace`` it overwrites logits2d.

A backend module may also define ``available(device) -> str | None`` (None when usable, else the
reason) used by ``"auto"`` and by the error raised when a backend is asked for but unusable, and
``logits_exp_(logits2d, targets) -> (lse, target_logit, shift)``, which leaves float32/float64
logits as ``exp(logits - shift)`` so that the group-chunked path needs one exp pass, not two (worth
it where exp is compute bound, on CPU; on GPU it would add a write pass over the buffer).
"""

from __future__ import annotations

import importlib

import torch

_MODULES = {
    "torch": "nca_kernels.backends.torch_chunked",
    "triton": "nca_kernels.backends.triton",
    "cuda": "nca_kernels.backends.cuda",
}
#: Preference order for ``backend="auto"`` per device type.
_AUTO = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # the module itself or a dependency (triton) is missing
        return exc


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a human-readable reason."""
    module = _load(name)
    if isinstance(module, ImportError):
        return f"backend {name!r} could not be imported: {module}"
    check = getattr(module, "available", None)
    return check(device) if check is not None else None


def get_backend(name: str, device: torch.device):
    """Return the backend module for ``name`` ("auto" picks the best usable one for device)."""
    if name == "auto":
        for candidate in _AUTO.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device) is None:
                return _load(candidate)
        return _load("torch")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(reason)
    return _load(name)
