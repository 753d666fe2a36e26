"""Shared fixtures: fresh random batches in the package's layout, and the backends to test."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on a CPU-only machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nca_kernels.backends import unavailable_reason  # noqa: E402

IGNORE = -100


def device_backends(device: str) -> list[str]:
    """Backends usable on ``device`` here ("triton" on CPU only under TRITON_INTERPRET=1)."""
    return [b for b in ("torch", "triton", "cuda") if unavailable_reason(b, torch.device(device)) is None]


@dataclass
class Batch:
    hidden: torch.Tensor  # (B*K, T, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    labels: torch.Tensor  # (B*K, T)
    rewards: torch.Tensor  # (B, K)
    ref_logps: torch.Tensor  # (B, K)

    def leaves(self):
        return [x for x in (self.hidden, self.weight, self.bias) if x is not None]

    def cast(self, dtype, requires_grad=True) -> Batch:
        def c(x):
            return None if x is None else x.detach().to(dtype).requires_grad_(requires_grad)

        return Batch(c(self.hidden), c(self.weight), c(self.bias), self.labels, self.rewards, self.ref_logps)

    def response_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, targets)``: the rows of the flattened ``(S*T,)`` tokens that are response tokens
        and their labels, as the backends' passes take them."""
        labels = self.labels.reshape(-1)
        index = (labels != IGNORE).nonzero().squeeze(1)
        return index, labels[index]


def make_batch(b=2, k=4, t=9, h=16, v=37, *, bias=False, dtype=torch.float64, device="cpu", scale=1.0,
               empty_seq=None, ties=False, seed=None) -> Batch:
    """Random batch: the first ~third of every sequence is prompt (ignore_index), the rest response.

    ``empty_seq``: index of a sequence with no response tokens. ``ties``: rewards with a tied max.
    ``scale`` multiplies hidden so logits reach large magnitudes.
    """
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    s = b * k
    hidden = torch.randn(s, t, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias_t = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (s, t), generator=g)
    prompt = torch.randint(1, max(2, t // 2), (s,), generator=g)
    labels[torch.arange(t)[None, :] < prompt[:, None]] = IGNORE
    if empty_seq is not None:
        labels[empty_seq] = IGNORE
    rewards = torch.randn(b, k, generator=g, dtype=torch.float64)
    if ties:
        rewards[:, 1] = rewards[:, 0] = rewards.amax(-1) + 1.0
        rewards = rewards.round(decimals=3)
    ref_logps = -torch.rand(b, k, generator=g, dtype=torch.float64) * 5 * t
    out = Batch(hidden, weight, bias_t, labels, rewards, ref_logps)
    dev = torch.device(device)
    out = Batch(*(None if x is None else x.to(dev) for x in (hidden, weight, bias_t, labels, rewards, ref_logps)))
    return out.cast(dtype)


@pytest.fixture
def small_tiles():
    """Tiny chunk budgets so that every chunking loop runs several times on small shapes."""
    from nca_kernels import chunk_bytes

    with chunk_bytes(tile=4 * 8 * 5, group=8 * 37 * 8):
        yield
