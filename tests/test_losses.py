"""The (B, K) loss math: soft labels, the K=2 special cases, gradients and metrics."""

import pytest
import torch
import torch.nn.functional as F

import nca_kernels as nk
from nca_kernels.losses import loss_sum_and_grad, loss_terms, per_prompt_loss, preference_metrics, soft_labels

f64 = torch.float64


def _pair(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(b, 2, generator=g, dtype=f64) * 20 - 50
    ref = torch.randn(b, 2, generator=g, dtype=f64) * 20 - 50
    rewards = torch.randn(b, 2, generator=g, dtype=f64)
    return policy, ref, rewards


def _chosen_rejected(x, rewards):
    chosen = rewards.argmax(-1, keepdim=True)
    return x.gather(-1, chosen).squeeze(-1), x.gather(-1, 1 - chosen).squeeze(-1)


@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_dpo_equals_sigmoid_dpo(beta):
    policy, ref, rewards = _pair()
    pc, pr = _chosen_rejected(policy, rewards)
    rc, rr = _chosen_rejected(ref, rewards)
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    for alpha in (0.0, 0.5):  # the alias fixes alpha = 0 whatever is passed
        got = nk.nca_loss(policy, ref, rewards, beta=beta, alpha=alpha, loss_type="dpo")
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got = nk.nca_loss(policy, ref, rewards, beta=beta, alpha=0.0, loss_type="infonca")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_nca_pair_equals_trl_formula(beta):
    policy, ref, rewards = _pair(seed=1)
    pc, pr = _chosen_rejected(policy, rewards)
    rc, rr = _chosen_rejected(ref, rewards)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    expected = (-F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)).mean()
    got = nk.nca_loss(policy, ref, rewards, beta=beta, alpha=0.0, loss_type="nca_pair")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got = nk.nca_loss(policy, ref, rewards, beta=beta, alpha=0.0, loss_type="nca")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_soft_labels_limits():
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, -1.0]], dtype=f64)
    torch.testing.assert_close(soft_labels(rewards, 0.0), torch.tensor([[0, 0.5, 0.5, 0], [1.0, 0, 0, 0]], dtype=f64))
    # alpha -> 0+ converges to the alpha = 0 definition, ties included
    torch.testing.assert_close(soft_labels(rewards, 1e-3), soft_labels(rewards, 0.0), atol=1e-12, rtol=0)
    # large alpha: uniform
    torch.testing.assert_close(soft_labels(rewards, 1e6), torch.full((2, 4), 0.25, dtype=f64), atol=1e-5, rtol=0)
    torch.testing.assert_close(soft_labels(rewards, 1.0), torch.softmax(rewards, -1))


def _explicit_losses(policy, ref, rewards, beta, alpha):
    """The paper's formulas written out with explicit loops over prompts and responses."""
    b, k = policy.shape
    info, nca = 0.0, 0.0
    for i in range(b):
        r = [beta * (policy[i, j] - ref[i, j]) for j in range(k)]
        if alpha > 0:
            w = [torch.exp(rewards[i, j] / alpha) for j in range(k)]
        else:
            w = [torch.tensor(1.0 if rewards[i, j] == rewards[i].max() else 0.0, dtype=f64) for j in range(k)]
        p = [wj / sum(w) for wj in w]
        z = torch.log(sum(torch.exp(rj) for rj in r))
        info = info - sum(p[j] * (r[j] - z) for j in range(k))
        sig = torch.sigmoid
        nca = nca - sum(p[j] * torch.log(sig(r[j])) + torch.log(sig(-r[j])) / k for j in range(k))
    return info / b, nca / b


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("alpha", [0.0, 1e-2, 1.0])
def test_losses_match_explicit_formulas(k, alpha):
    g = torch.Generator().manual_seed(k)
    policy = torch.randn(3, k, generator=g, dtype=f64) * 10 - 30
    ref = torch.randn(3, k, generator=g, dtype=f64) * 10 - 30
    rewards = torch.randn(3, k, generator=g, dtype=f64).round(decimals=1)
    rewards[0, 1] = rewards[0, 0] = rewards[0].max() + 1  # a tie at the top
    info, nca = _explicit_losses(policy, ref, rewards, 0.3, alpha)
    got_info = nk.nca_loss(policy, ref, rewards, beta=0.3, alpha=alpha, loss_type="infonca")
    got_nca = nk.nca_loss(policy, ref, rewards, beta=0.3, alpha=alpha, loss_type="nca")
    torch.testing.assert_close(got_info, info, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_nca, nca, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss_type", ["infonca", "nca", "dpo", "nca_pair"])
def test_nca_loss_gradcheck(loss_type):
    k = 2 if loss_type in ("dpo", "nca_pair") else 4
    policy = (torch.randn(3, k, dtype=f64) * 5).requires_grad_()
    ref, rewards = torch.randn(3, k, dtype=f64) * 5, torch.randn(3, k, dtype=f64)
    assert torch.autograd.gradcheck(
        lambda x: nk.nca_loss(x, ref, rewards, beta=0.7, alpha=0.5, loss_type=loss_type), (policy,)
    )


def test_extreme_model_rewards_stay_finite():
    policy = torch.tensor([[1e4, -1e4, 0.0, 5e3]], dtype=torch.float32, requires_grad=True)
    ref, rewards = torch.zeros(1, 4), torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    for loss_type in ("infonca", "nca"):
        loss = nk.nca_loss(policy, ref, rewards, beta=1.0, alpha=0.1, loss_type=loss_type)
        (grad,) = torch.autograd.grad(loss, policy)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_metrics():
    policy = torch.tensor([[-10.0, -12.0, -11.0], [-5.0, -4.0, -6.0]])
    model_rewards = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.5, -0.2]])
    rewards = torch.tensor([[3.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    m = preference_metrics(policy, model_rewards, rewards)
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["margin"].item() == pytest.approx(((0.3 - 0.15) + (0.1 - 0.15)) / 2)
    torch.testing.assert_close(m["chosen_logps"], torch.tensor([-10.0, -5.0]))


def test_low_precision_policy_computed_in_float32():
    """A bf16/fp16 policy_logps is promoted: ref_logps and rewards are never rounded to its dtype,
    and large log-probs do not overflow."""
    rewards = torch.tensor([[1.0, 0.0]])
    ref = torch.tensor([[-300.75, -299.25]])
    policy = torch.tensor([[-300.0, -300.0]])  # exact in bf16
    expected = nk.nca_loss(policy, ref, rewards, beta=0.1, alpha=0.0, loss_type="dpo")
    got = nk.nca_loss(policy.bfloat16(), ref, rewards, beta=0.1, alpha=0.0, loss_type="dpo")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    big = nk.nca_loss(torch.tensor([[-65000.0, -65000.0]]).half(), torch.tensor([[-70000.0, -69000.0]]), rewards,
                      beta=0.1, alpha=0.0, loss_type="dpo")
    assert torch.isfinite(big)


def test_soft_labels_of_extreme_rewards_stay_finite():
    for rewards, alpha in ((torch.tensor([[5.0, 4.0]]), 1e-38), (torch.tensor([[1e36, 0.0]]), 1e-3)):
        torch.testing.assert_close(soft_labels(rewards, alpha), torch.tensor([[1.0, 0.0]]))


def test_metrics_ties_and_negative_rewards():
    """Accuracy is strict (a tie, as at step 0, is wrong) and compares with the best other response
    even when every model reward is negative."""
    rewards = torch.tensor([[3.0, 2.0, 1.0]])
    tied = preference_metrics(torch.zeros(1, 3), torch.zeros(1, 3), rewards)
    assert tied["accuracy"].item() == 0.0 and tied["margin"].item() == 0.0
    m = preference_metrics(torch.zeros(1, 3), torch.tensor([[-1.0, -2.0, -3.0]]), rewards, per_prompt=True)
    torch.testing.assert_close(m["accuracy"], torch.tensor([1.0]))
    torch.testing.assert_close(m["margin"], torch.tensor([1.5]))
    wrong = preference_metrics(torch.zeros(1, 3), torch.tensor([[-2.0, -1.0, -3.0]]), rewards)
    assert wrong["accuracy"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["dpo", "nca_pair"])
def test_pair_aliases_ignore_alpha(loss_type):
    g = torch.Generator().manual_seed(3)
    policy, ref, rewards = (torch.randn(4, 2, generator=g, dtype=f64) for _ in range(3))
    at_zero = nk.nca_loss(policy, ref, rewards, beta=0.5, alpha=0.0, loss_type=loss_type)
    torch.testing.assert_close(nk.nca_loss(policy, ref, rewards, beta=0.5, alpha=0.7, loss_type=loss_type), at_zero,
                               rtol=0, atol=0)


def test_per_prompt_loss_rejects_an_unknown_base():
    """A base loss other than "infonca" or "nca" raises instead of returning nothing."""
    r = torch.zeros(2, 3, dtype=f64)
    with pytest.raises(ValueError, match="unknown base loss 'ipo'"):
        per_prompt_loss(r, soft_labels(r, 1.0), "ipo")


@pytest.mark.parametrize("loss_type", ["infonca", "nca"])
def test_loss_sum_and_grad_matches_autograd(loss_type):
    """The group path's chunk step: ``scale`` times the summed per-prompt losses, their gradient on
    policy_logps and the model rewards, equal to autograd through ``loss_terms`` in float64, and the
    caller's tensor left as it was (no gradient flag set on it)."""
    g = torch.Generator().manual_seed(4)
    policy, ref, rewards = (torch.randn(3, 4, generator=g, dtype=f64) * 5 for _ in range(3))
    total, grad, model_rewards = loss_sum_and_grad(policy, ref, rewards, 0.7, 0.5, loss_type, 0.25)
    assert not policy.requires_grad
    leaf = policy.clone().requires_grad_()
    losses, want_rewards = loss_terms(leaf, ref, rewards, 0.7, 0.5, loss_type)
    want = losses.sum() * 0.25
    torch.testing.assert_close(total, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(want, leaf)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model_rewards, want_rewards.detach(), rtol=0, atol=0)
    assert not (total.requires_grad or grad.requires_grad or model_rewards.requires_grad)
