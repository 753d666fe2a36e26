"""Public functions: validate arguments, then hand over to :mod:`nca_kernels.ops`."""

from __future__ import annotations

import torch

from . import losses, ops, validation


def _shifted(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    """With ``shift``, the labels that positions ``t`` predict when ``labels`` are the input tokens
    (masked): ``labels[:, t + 1]``, and ``ignore_index`` at the last position. A new ``(S, T)``
    label tensor, so the hidden states or logits are never sliced or copied."""
    if not shift:
        return labels
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def _head_inputs(hidden, weight, labels, *, bias, ignore_index, average, shift, softcap, backend):
    """The LM-head arguments checked and normalised, shared by the entry points that take them:
    ``(hidden, weight, bias, labels, ignore_index, average, softcap)`` with the autocast cast applied
    and the labels shifted when asked."""
    hidden, weight, bias = ops.autocast_inputs(hidden, weight, bias)
    validation.check_backend(backend)
    average, shift = validation.check_flags(average=average, shift=shift)
    softcap = validation.check_softcap(softcap)
    ignore_index = validation.check_hidden_inputs(hidden, weight, labels, bias, ignore_index, shift)
    return hidden, weight, bias, _shifted(labels, ignore_index, shift), ignore_index, average, softcap


def sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, average=False, shift=False,
                      softcap=None, backend="auto"):
    """Per-sequence log-probs ``(S,)`` straight from the LM head, never holding the logits.

    hidden ``(S, T, H)``, weight ``(V, H)``, bias ``(V,)`` or None, all one float dtype (under
    autocast they are cast to its dtype first, as the LM head's own matmul would be);
    labels ``(S, T)`` int64 where ``hidden[s, t]`` predicts ``labels[s, t]`` and ``ignore_index``
    marks prompt and padding; with ``shift=True`` it predicts ``labels[s, t + 1]`` instead (labels
    as a causal LM's inputs, Hugging Face style). ``softcap`` caps the logits to
    ``softcap * tanh(logits / softcap)`` (Gemma 2's final softcapping). Returns float32 (float64 for
    float64 inputs); a sequence with no response tokens gets 0. ``average=True`` divides by the
    number of response tokens.
    """
    hidden, weight, bias, labels, ignore_index, average, softcap = _head_inputs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, average=average, shift=shift, softcap=softcap,
        backend=backend)
    return ops.LinearLogprobs.apply(hidden, weight, bias, labels, ignore_index, average, backend, softcap)


def sequence_logprobs_from_logits(logits, labels, *, ignore_index=-100, average=False, shift=False,
                                  inplace_backward=False, backend="auto"):
    """Per-sequence log-probs ``(S,)`` from logits ``(S, T, V)`` (any float dtype), read in chunks;
    ``shift`` as in :func:`sequence_logprobs`.

    ``inplace_backward=True``: backward writes the logits gradient into ``logits`` itself, so no
    second logits-sized buffer is allocated; afterwards ``logits`` holds their gradient, and
    autograd refuses any later use of their values (an op that saved them for its own backward, a
    second backward). Logits that are not one strided ``(S*T, V)`` matrix (a slice along T) are
    copied by each pass, and backward's copy becomes the gradient: nothing is saved then.
    """
    validation.check_backend(backend)
    average, shift, inplace_backward = validation.check_flags(average=average, shift=shift,
                                                              inplace_backward=inplace_backward)
    ignore_index = validation.check_logits_inputs(logits, labels, ignore_index, shift)
    labels = _shifted(labels, ignore_index, shift)
    return ops.LogitsLogprobs.apply(logits, labels, ignore_index, average, inplace_backward, backend)


def nca_loss(policy_logps, ref_logps, rewards, *, beta, alpha, loss_type="nca"):
    """Mean over prompts of the InfoNCA/NCA loss; all inputs ``(B, K)``; differentiable in
    policy_logps (rewards and ref_logps are constants); computed in float32 at least."""
    beta, alpha = validation.check_loss_params(beta, alpha, loss_type)
    validation.check_policy_logps(policy_logps, rewards)
    validation.check_group_tensors(rewards, ref_logps, None, loss_type, "policy_logps", policy_logps)
    per_prompt, _ = losses.loss_terms(policy_logps, ref_logps, rewards, beta, alpha, loss_type)
    return per_prompt.mean()


def fused_nca_loss(hidden, weight, labels, rewards, ref_logps, *, beta, alpha, loss_type="nca", bias=None,
                   ignore_index=-100, average=False, shift=False, softcap=None, recompute=True, backend="auto",
                   return_metrics=False):
    """InfoNCA/NCA loss (mean over prompts) from last hidden states and the LM-head weight.

    hidden ``(B*K, T, H)`` with the K responses of each prompt contiguous, weight ``(V, H)``,
    labels ``(B*K, T)`` (``shift``, ``softcap`` and autocast as in :func:`sequence_logprobs`),
    rewards and ref_logps ``(B, K)`` (constants: no gradient flows to them).
    ``recompute=True`` keeps only O(tokens)
    floats between passes and recomputes logits in backward; ``recompute=False`` walks chunks of
    whole prompt groups and forms every gradient in forward (no recompute, one chunk of logits
    held). Without grad mode (``torch.no_grad()``, evaluation) both compute the forward alone, the
    one matmul of the recompute path. With ``return_metrics=True`` returns ``(loss, metrics)``,
    metrics being detached (see :func:`nca_kernels.losses.preference_metrics`).
    """
    beta, alpha = validation.check_loss_params(beta, alpha, loss_type)
    recompute, return_metrics = validation.check_flags(recompute=recompute, return_metrics=return_metrics)
    hidden, weight, bias, labels, ignore_index, average, softcap = _head_inputs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, average=average, shift=shift, softcap=softcap,
        backend=backend)
    b, k = validation.check_group_tensors(rewards, ref_logps, hidden.shape[0], loss_type, "hidden", hidden)
    if recompute or not torch.is_grad_enabled():  # the group path forms gradients in its forward
        logps = ops.LinearLogprobs.apply(hidden, weight, bias, labels, ignore_index, average, backend,
                                         softcap).view(b, k)
        per_prompt, model_rewards = losses.loss_terms(logps, ref_logps, rewards, beta, alpha, loss_type)
        loss = per_prompt.mean()
    else:
        loss, logps, model_rewards = ops.GroupedNCALoss.apply(
            hidden, weight, bias, labels, rewards, ref_logps, beta, alpha, loss_type,
            ignore_index, average, backend, softcap,
        )
    if not return_metrics:
        return loss
    return loss, losses.preference_metrics(logps, model_rewards, rewards)


class FusedNCALoss(torch.nn.Module):
    """Module form of :func:`fused_nca_loss`: holds beta, alpha, loss_type and the options."""

    def __init__(self, beta: float = 0.01, alpha: float = 0.01, loss_type: str = "nca", *, ignore_index: int = -100,
                 average: bool = False, shift: bool = False, softcap: float | None = None, recompute: bool = True,
                 backend: str = "auto"):
        super().__init__()
        beta, alpha = validation.check_loss_params(beta, alpha, loss_type)
        softcap = validation.check_softcap(softcap)
        validation.check_backend(backend)
        average, shift, recompute = validation.check_flags(average=average, shift=shift, recompute=recompute)
        self.beta, self.alpha, self.loss_type = beta, alpha, loss_type
        self.ignore_index, self.average, self.shift, self.softcap = ignore_index, average, shift, softcap
        self.recompute, self.backend = recompute, backend

    def forward(self, hidden, weight, labels, rewards, ref_logps, bias=None, return_metrics=False):
        return fused_nca_loss(
            hidden, weight, labels, rewards, ref_logps, beta=self.beta, alpha=self.alpha,
            loss_type=self.loss_type, bias=bias, ignore_index=self.ignore_index, average=self.average,
            shift=self.shift, softcap=self.softcap, recompute=self.recompute, backend=self.backend,
            return_metrics=return_metrics,
        )

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, alpha={self.alpha}, loss_type={self.loss_type!r}, "
                f"shift={self.shift}, recompute={self.recompute}, backend={self.backend!r}")
