"""Naive implementations with materialised logits: the float64 reference of every test and the
"naive PyTorch" peer of the benchmarks (the official code's and TRL's way). Dtype-preserving:
call with float64 tensors for a reference."""

from __future__ import annotations

import torch

from .losses import loss_terms


def sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, average=False, softcap=None):
    """``(S,)`` log-probs through ``(S, T, V)`` logits (capped to ``softcap * tanh(logits / softcap)``
    when given) and a float32 (or float64) log-softmax."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return sequence_logprobs_from_logits(cap(logits, softcap), labels, ignore_index=ignore_index, average=average)


def cap(logits, softcap=None):
    """``softcap * tanh(logits / softcap)``; ``logits`` themselves when softcap is None."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def sequence_logprobs_from_logits(logits, labels, *, ignore_index=-100, average=False):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    mask = labels != ignore_index
    picked = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    out = torch.where(mask, picked, 0.0).sum(-1)  # not a product: token 0 may be banned (-inf)
    return out / mask.sum(-1).clamp(min=1) if average else out


def nca_loss(policy_logps, ref_logps, rewards, *, beta, alpha, loss_type="nca"):
    return loss_terms(policy_logps, ref_logps, rewards, beta, alpha, loss_type)[0].mean()


def fused_nca_loss(hidden, weight, labels, rewards, ref_logps, *, beta, alpha, loss_type="nca", bias=None,
                   ignore_index=-100, average=False, softcap=None):
    logps = sequence_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, average=average,
                              softcap=softcap)
    return nca_loss(logps.view(rewards.shape), ref_logps, rewards, beta=beta, alpha=alpha, loss_type=loss_type)
