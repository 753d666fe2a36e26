"""Model plumbing shared by the reference pass and the trainer: backbone hidden states, LM head."""

from __future__ import annotations

import importlib.util
import inspect

import torch

from .. import reference


def attn_implementation() -> str:
    """``flash_attention_2`` when flash-attn is installed and a GPU is present, else ``sdpa``."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _base(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _sharded(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is only this process's shard: a DTensor (FSDP2), a DeepSpeed ZeRO-3
    placeholder (``ds_shape``), or FSDP1's flattened or emptied view of it (not 2-D)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            return True
    return hasattr(weight, "ds_shape") or weight.dim() != 2


def _adapted(head) -> bool:
    """Whether ``head`` is a PEFT tuner layer (LoRA, ...) with active, unmerged adapters: its output is
    then not ``x @ head.weight.T + bias``."""
    if not hasattr(head, "base_layer"):
        return False
    return not (getattr(head, "merged", False) or getattr(head, "disable_adapters", False))


def check_lm_head(model):
    """The output embedding of ``model`` if the fused loss can use its weight as the LM head, else a
    ValueError that says why: adapters on it, or a sharded weight."""
    base = _base(model)
    name = type(base).__name__
    head = base.get_output_embeddings()
    if _adapted(head):
        raise ValueError(f"{name}'s LM head carries active PEFT adapters, which the fused loss (reading the head's "
                         "weight) would miss: leave lm_head out of target_modules (modules_to_save is fine) or merge "
                         "the adapters")
    if _sharded(head.weight):
        raise ValueError(f"{name}'s LM-head weight is sharded after the forward (FSDP or DeepSpeed ZeRO-3): the fused "
                         "loss needs the whole (V, H) weight; leave the LM head in the root module under FSDP2 (or "
                         "FSDP1 without use_orig_params), or train data-parallel")
    return head


#: Models whose ``logits_scaling`` multiplies the logits; Granite's and MiniCPM3's divide them.
LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})
#: Config fields holding a final logit softcap: Gemma 2/3 (and others), RecurrentGemma.
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")


def logit_multiplier(model) -> float:
    """The constant a model multiplies its logits by after the LM head: Cohere's ``logit_scale``,
    Falcon-H1's ``lm_head_multiplier``, one over Granite's and MiniCPM3's ``logits_scaling``
    (HyperCLOVA X multiplies by its own); 1 for most models."""
    cfg = _base(model).config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0) * float(getattr(cfg, "lm_head_multiplier", None) or 1.0)
    scaling = float(getattr(cfg, "logits_scaling", None) or 1.0)
    return scale * scaling if getattr(cfg, "model_type", None) in LOGITS_SCALING_MULTIPLIES else scale / scaling


def head_operands(model, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """``(hidden, weight, bias, softcap)``: the model's logits are ``hidden @ weight.T + bias``, capped
    to ``softcap * tanh(logits / softcap)`` when softcap is not None (:data:`SOFTCAP_FIELDS`). The
    LM-head weight ``(V, H)`` and bias (or None) come in hidden's dtype (tied embeddings share the
    weight), the model's constant logit multiplier folded into hidden and bias."""
    head = check_lm_head(model)
    bias = getattr(head, "bias", None)
    weight, bias = head.weight.to(hidden.dtype), (None if bias is None else bias.to(hidden.dtype))
    scale = logit_multiplier(model)
    if scale != 1.0:
        hidden, bias = hidden * scale, (None if bias is None else bias * scale)
    cfg = _base(model).config
    softcap = next((getattr(cfg, f) for f in SOFTCAP_FIELDS if getattr(cfg, f, None)), None)
    return hidden, weight, bias, (float(softcap) if softcap else None)


def _one_logit_kwargs(model) -> dict:
    params = inspect.signature(_base(model).forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    raise ValueError(f"{type(_base(model)).__name__}.forward has no logits_to_keep: it would build the full logits")


def _decoder(model):
    """The decoder stack whose output is the last hidden state (``get_decoder()``), or None."""
    base = _base(model)
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):  # no decoder, or no rule to find it
        return None
    if decoder is base or decoder is base.get_output_embeddings():  # ModernBERT's names its head the decoder
        return None
    return decoder if isinstance(decoder, torch.nn.Module) else None


def _fsdp1(model) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def last_hidden(model, unwrapped, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states ``(S, T, H)`` of a batch and the model's own logits at its last position
    ``(S, V)``. Position ``t`` predicts ``batch["labels"][:, t + 1]``: the loss takes the labels
    with ``shift=True``, so the hidden states are never sliced or copied.

    ``model`` may be wrapped (DDP, accelerate): it is called as a whole so that gradients are
    synchronised, asking for the logits of one position only, never the full ``(S, T, V)`` logits.
    The hidden states are the decoder's output, taken by a forward hook on ``unwrapped``'s decoder
    (the bare model): not asking for every layer's hidden states keeps mixed precision's float32
    copy of the outputs away from them. A model without a separate decoder returns them instead, and
    so does FSDP1, whose backward starts from hooks on the root's outputs.
    """
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                  **_one_logit_kwargs(unwrapped))
    decoder = _decoder(unwrapped)
    if decoder is None or _fsdp1(model):
        out = model(**kwargs, output_hidden_states=True)
        return out.hidden_states[-1], out.logits[:, -1]
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        out = model(**kwargs)
    finally:
        handle.remove()
    return captured[-1], out.logits[:, -1]


@torch.no_grad()
def check_head_output(model, hidden, last_logits, weight, bias, softcap) -> None:
    """Raise a ValueError unless the model's last-position logits ``(S, V)`` are
    ``hidden[:, -1] @ weight.T + bias`` (capped by softcap), from the operands of
    :func:`head_operands`, to 2% of the largest logit where any of them is 16-bit (its rounding
    passes), else 0.3% (TF32 matmuls pass): an adapted or otherwise transformed head does not. The
    fused loss assumes exactly that head; a model that transforms its logits after it in a way no
    config names would otherwise train on a wrong loss. The product is formed in the weight's dtype:
    no copy of the weight."""
    name = type(_base(model)).__name__
    if hidden.shape[-1] != weight.shape[1] or last_logits.shape[-1] != weight.shape[0]:
        raise ValueError(f"{name}'s LM-head weight {tuple(weight.shape)} does not map its last hidden state (width "
                         f"{hidden.shape[-1]}) to its logits (width {last_logits.shape[-1]}): the model transforms "
                         "its hidden states before the head or its logits after it, which the fused loss does not "
                         "model")
    want = last_logits.float()
    got = (hidden[:, -1] @ weight.t()).float()
    if bias is not None:
        got += bias.float()
    got = reference.cap(got, softcap)
    err, top = float((got - want).abs().max()), float(want.abs().max())
    wide = all(x.element_size() >= 4 for x in (hidden, weight, last_logits))
    if err > (0.003 if wide else 0.02) * top + 1e-4:
        raise ValueError(f"{name}'s logits are not its last hidden state times the LM-head weight (plus bias): they "
                         f"differ by up to {err:.3g} (largest logit {top:.3g}); the model transforms its logits after "
                         "the head, which the fused loss does not model")
