"""InfoNCA / NCA loss math on (B, K) tensors: the one place the formulas live.

Every entry point (the composed autograd path, the group-chunked fused path, the trainer's
metrics) calls into this module, so the losses are written exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: loss_type -> (base loss, forced alpha or None).  The K=2 aliases fix alpha to 0.
LOSS_TYPES = {
    "infonca": ("infonca", None),
    "nca": ("nca", None),
    "dpo": ("infonca", 0.0),
    "nca_pair": ("nca", 0.0),
}


def resolve_loss_type(loss_type: str, alpha: float) -> tuple[str, float]:
    """Map a public ``loss_type`` to ``(base, alpha)``; the K=2 aliases use ``alpha = 0``."""
    base, forced_alpha = LOSS_TYPES[loss_type]
    return base, (alpha if forced_alpha is None else forced_alpha)


def soft_labels(rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """Target distribution ``softmax(rewards / alpha)`` over the K responses, ``(B, K)``.

    ``alpha == 0`` is the limit alpha -> 0+: uniform over the responses sharing the maximal
    reward (one-hot when the maximum is unique).
    """
    if alpha > 0:  # shifted first: finite rewards over a tiny alpha stay finite
        return torch.softmax((rewards - rewards.amax(dim=-1, keepdim=True)) / alpha, dim=-1)
    top = (rewards == rewards.amax(dim=-1, keepdim=True)).to(rewards.dtype)
    return top / top.sum(dim=-1, keepdim=True)


def per_prompt_loss(model_rewards: torch.Tensor, targets: torch.Tensor, base: str) -> torch.Tensor:
    """Per-prompt loss ``(B,)`` from model rewards ``r`` and soft labels ``p``, both ``(B, K)``.

    InfoNCA: ``-sum_i p_i log_softmax(r)_i``.
    NCA:     ``-sum_i p_i log sigmoid(r_i) - (1/K) sum_i log sigmoid(-r_i)``.
    """
    if base == "infonca":
        return -(targets * torch.log_softmax(model_rewards, dim=-1)).sum(dim=-1)
    if base == "nca":
        return -(targets * F.logsigmoid(model_rewards)).sum(dim=-1) - F.logsigmoid(
            -model_rewards
        ).mean(dim=-1)
    raise ValueError(f"unknown base loss {base!r}")


def loss_terms(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    alpha: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt losses ``(B,)`` and model rewards ``(B, K)``; differentiable in policy_logps only.

    Computed in float32, or float64 when policy_logps is (gradcheck), whatever the dtypes of the
    inputs, which are assumed validated (see :mod:`nca_kernels.validation`).
    """
    base, alpha = resolve_loss_type(loss_type, alpha)
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    model_rewards = beta * (policy_logps.to(dtype) - ref_logps.detach().to(dtype))
    targets = soft_labels(rewards.detach().to(dtype), alpha)
    return per_prompt_loss(model_rewards, targets, base), model_rewards


def loss_sum_and_grad(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    alpha: float,
    loss_type: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scale * sum(per-prompt loss)``, its gradient ``g`` on policy_logps, and model rewards.

    Used by the group-chunked path, which needs each chunk's ``g`` (shape ``(b, K)``) as soon as
    its log-probs are known. ``scale`` is ``1 / B_total`` so that chunks add up to the mean.
    """
    with torch.enable_grad():
        logps = policy_logps.detach().requires_grad_(True)
        losses, model_rewards = loss_terms(logps, ref_logps, rewards, beta, alpha, loss_type)
        total = losses.sum() * scale
        (grad,) = torch.autograd.grad(total, logps)
    return total.detach(), grad, model_rewards.detach()


@torch.no_grad()
def preference_metrics(
    policy_logps: torch.Tensor, model_rewards: torch.Tensor, rewards: torch.Tensor, per_prompt: bool = False
) -> dict[str, torch.Tensor]:
    """Detached metrics as the official code logs them, from ``(B, K)`` tensors; ``accuracy`` and
    ``margin`` are means over prompts, or ``(B,)`` per prompt with ``per_prompt``.

    ``accuracy``: fraction of prompts whose top-reward response has a model reward above every other
    response's (strictly: ties, as at the start of training, count as wrong).
    ``margin``: model reward of the top-reward response minus the mean of the other responses'.
    ``chosen_logps``: policy log-prob of the top-reward response, ``(B,)``.
    """
    top = rewards.argmax(dim=-1, keepdim=True)
    chosen_reward = model_rewards.gather(-1, top).squeeze(-1)
    k = model_rewards.shape[-1]
    others = (model_rewards.sum(-1) - chosen_reward) / (k - 1)
    best_other = model_rewards.scatter(-1, top, float("-inf")).amax(dim=-1)
    accuracy, margin = (chosen_reward > best_other).float(), chosen_reward - others
    return {
        "policy_logps": policy_logps.detach(),
        "model_rewards": model_rewards.detach(),
        "accuracy": accuracy if per_prompt else accuracy.mean(),
        "margin": margin if per_prompt else margin.mean(),
        "chosen_logps": policy_logps.detach().gather(-1, top).squeeze(-1),
    }
