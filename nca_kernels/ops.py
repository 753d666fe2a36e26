"""Autograd functions: pick a backend, run the two passes (autocast off, first-order only).

Two exact strategies (DESIGN.md section 4):

- minimal memory (``recompute=True``): :class:`LinearLogprobs` keeps O(tokens) statistics
  (per-token logsumexp) and the backend recomputes logits in backward; the loss composes on top
  through ordinary autograd on the tiny ``(B, K)`` tensor.
- group chunks (``recompute=False``): :class:`GroupedNCALoss` walks chunks of whole prompt groups;
  each chunk's loss gradient is known right after its forward, so its logits buffer turns in place
  into ``g * (onehot - softmax)`` and ``dH``, ``dW`` follow at once. Backward only scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import losses
from .backends import get_backend, rowchunk
from .backends.torch_chunked import accum_dtype, cast, weight_grad_buffer


def autocast_inputs(hidden, weight, bias):
    """Under autocast for hidden's device, hidden, weight and bias cast to its dtype (differentiably),
    as the LM head's own matmul would be; float64, non-tensors and devices without autocast (left to
    validation) as they are."""
    if not isinstance(hidden, torch.Tensor):
        return hidden, weight, bias
    kind = hidden.device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(kind)

    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 else x

    return cast(hidden), cast(weight), cast(bias)


def _no_autocast(fn):
    """Run an autograd pass with autocast off (on the CPU and its tensors' device): its inputs are
    already in their compute dtype, and forward and backward must recompute the very same tiles."""

    @functools.wraps(fn)
    def run(*args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast("cpu", enabled=False), torch.autocast(device, enabled=False):
            return fn(*args)

    return run


def _first_order(backward):
    """Refuse ``create_graph=True``: the passes form gradients that autograd cannot differentiate
    again (the group path's would silently give zero second-order terms; the recompute path's failed
    with an in-place error)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("nca_kernels computes first-order gradients only: backward with create_graph=True "
                               "(second-order gradients) is not supported")
        return backward(ctx, *grads)

    return run


@dataclass
class Tokens:
    """Response positions of a ``(S, T)`` label tensor, flattened row-major."""

    index: torch.Tensor  # (N,) int64 rows of the flattened (S*T) positions
    targets: torch.Tensor  # (N,) int64 labels at those rows
    seq: torch.Tensor  # (N,) int64 sequence of each token
    scale: torch.Tensor  # (N,) 1, or 1/len(sequence) with average=True
    num_seqs: int

    @classmethod
    def from_labels(cls, labels: torch.Tensor, ignore_index: int, average: bool, dtype) -> Tokens:
        s, t = labels.shape
        flat = labels.reshape(-1)
        index = (flat != ignore_index).nonzero().squeeze(1)
        seq = torch.div(index, t, rounding_mode="floor")
        scale = torch.ones(index.numel(), dtype=dtype, device=labels.device)
        if average:
            counts = torch.bincount(seq, minlength=s).to(dtype)
            scale = scale / counts[seq]
        return cls(index, flat[index], seq, scale, s)

    def reduce(self, token_values: torch.Tensor, span: slice = slice(None)) -> torch.Tensor:
        """Per-sequence (scaled) sums ``(S,)`` of per-token values ``(N,)`` (or of the tokens in
        ``span``), accumulated in float64: a serial float32 sum over a long response would collect
        one rounding of the running total per token."""
        out = torch.zeros(self.num_seqs, dtype=torch.float64, device=token_values.device)
        out.index_add_(0, self.seq[span], (token_values * self.scale[span]).to(torch.float64))
        return out.to(token_values.dtype)

    def spread(self, grad_seq: torch.Tensor) -> torch.Tensor:
        """Per-token gradient ``(N,)`` from a per-sequence gradient ``(S,)``."""
        return grad_seq.to(self.scale.dtype)[self.seq] * self.scale


class LinearLogprobs(torch.autograd.Function):
    """``(S,)`` sequence log-probs from hidden ``(S, T, H)`` and weight ``(V, H)`` (logits capped by
    ``softcap`` when given); minimal memory."""

    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, bias, labels, ignore_index, average, backend, softcap):
        be = get_backend(backend, hidden.device)
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        tokens = Tokens.from_labels(labels, ignore_index, average, accum_dtype(hidden.dtype))
        lse, tgt = be.linear_forward(hidden2d, weight, bias, tokens.index, tokens.targets, softcap=softcap)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.tokens, ctx.backend, ctx.softcap = tokens, be, softcap
        return tokens.reduce(tgt - lse)

    @staticmethod
    @_first_order
    @_no_autocast
    def backward(ctx, grad_seq):
        hidden, weight, bias, lse = ctx.saved_tensors
        tokens = ctx.tokens
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = ctx.backend.linear_backward(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.index, tokens.targets,
            lse, tokens.spread(grad_seq), needs, softcap=ctx.softcap,
        )
        dh = None if dh is None else dh.view_as(hidden)
        return dh, dw, db, None, None, None, None, None


class LogitsLogprobs(torch.autograd.Function):
    """``(S,)`` sequence log-probs from logits ``(S, T, V)``; never copies the whole logits. With
    ``inplace``, backward overwrites the logits with their gradient (where they are one strided
    ``(S*T, V)`` matrix; otherwise their copy, the gradient)."""

    @staticmethod
    @_no_autocast
    def forward(ctx, logits, labels, ignore_index, average, inplace, backend):
        be = get_backend(backend, logits.device)
        tokens = Tokens.from_labels(labels, ignore_index, average, accum_dtype(logits.dtype))
        lse, tgt = be.logits_forward(logits.reshape(-1, logits.shape[-1]), tokens.index, tokens.targets)
        ctx.save_for_backward(logits, lse)
        ctx.tokens, ctx.backend, ctx.inplace = tokens, be, inplace
        return tokens.reduce(tgt - lse)

    @staticmethod
    @_first_order
    @_no_autocast
    def backward(ctx, grad_seq):
        logits, lse = ctx.saved_tensors
        tokens = ctx.tokens
        logits2d = logits.reshape(-1, logits.shape[-1])
        dlogits = ctx.backend.logits_backward(logits2d, tokens.index, tokens.targets, lse, tokens.spread(grad_seq),
                                              ctx.inplace)
        if ctx.inplace:  # a kernel's writes bypass autograd: a later use of the old values must fail
            torch.autograd.graph.increment_version(logits2d)
        return dlogits.view_as(logits), None, None, None, None, None


def _prompt_chunks(tokens: Tokens, k: int, b: int, budget: int):
    """Split prompts into consecutive chunks of at most ``budget`` response tokens, or one prompt.

    Yields ``(p0, p1, t0, t1)``: prompts ``[p0, p1)`` own response tokens ``[t0, t1)``.
    """
    prompt = torch.div(tokens.seq, k, rounding_mode="floor")
    bounds = torch.searchsorted(prompt, torch.arange(b + 1, device=prompt.device)).tolist()
    p0 = 0
    while p0 < b:
        p1 = p0 + 1
        while p1 < b and bounds[p1 + 1] - bounds[p0] <= budget:
            p1 += 1
        yield p0, p1, bounds[p0], bounds[p1]
        p0 = p1


class GroupedNCALoss(torch.autograd.Function):
    """Fused NCA/InfoNCA loss by chunks of whole prompt groups: all gradients in forward.

    Returns ``(loss, policy_logps (B, K), model_rewards (B, K))``; only ``loss`` is differentiable.
    A chunk whose logits exceed the group byte budget's cap (one prompt group too large) is split
    into row sub-chunks that are recomputed once the group's gradient is known.
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, bias, labels, rewards, ref_logps, beta, alpha, loss_type,
                ignore_index, average, backend, softcap):
        be = get_backend(backend, hidden.device)
        b, k = rewards.shape
        acc = accum_dtype(hidden.dtype)
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        tokens = Tokens.from_labels(labels, ignore_index, average, acc)
        needs = ctx.needs_input_grad
        dhidden = torch.zeros_like(hidden2d) if needs[0] else None
        dweight = weight_grad_buffer(weight) if needs[1] else None
        dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None and needs[2] else None
        policy = torch.zeros(b, k, dtype=acc, device=hidden.device)
        model_rewards = torch.zeros(b, k, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        pack, rows = rowchunk.rows_per_chunk(weight)
        chunks = list(_prompt_chunks(tokens, k, b, pack))
        width = min(rows, max(t1 - t0 for *_, t0, t1 in chunks))
        work = rowchunk.aligned_rows(width, weight.shape[0], hidden.dtype, hidden.device)  # reused

        for p0, p1, t0, t1 in chunks:
            subs = [slice(s0, min(t1, s0 + rows)) for s0 in range(t0, t1, rows)]
            keep = len(subs) == 1  # one sub-chunk holds the group: its buffer serves the gradient
            lse = torch.empty(t1 - t0, dtype=acc, device=hidden.device)
            tgt, shift = torch.empty_like(lse), None
            for s in subs:  # forward statistics
                buf = rowchunk.logits_chunk(hidden2d, weight, bias, tokens.index[s], work, softcap)
                local = slice(s.start - t0, s.stop - t0)
                lse[local], tgt[local], shift = rowchunk.chunk_stats_(be, buf, tokens.targets[s], keep, softcap)
            chunk_policy = tokens.reduce(tgt - lse, slice(t0, t1)).view(b, k)[p0:p1]
            part, g, rew = losses.loss_sum_and_grad(
                chunk_policy, ref_logps[p0:p1], rewards[p0:p1], beta, alpha, loss_type, 1.0 / b
            )
            policy[p0:p1], model_rewards[p0:p1], total = chunk_policy, rew, total + part
            grad_tok = g.reshape(-1)[tokens.seq[t0:t1] - p0 * k] * tokens.scale[t0:t1]
            for s in subs:  # gradients from the kept buffer, or from recomputed sub-chunks
                if not keep:
                    buf = rowchunk.logits_chunk(hidden2d, weight, bias, tokens.index[s], work, softcap)
                local = slice(s.start - t0, s.stop - t0)
                rowchunk.chunk_grads_(be, buf, hidden2d, weight, tokens.index[s], tokens.targets[s], lse[local],
                                      shift, grad_tok[local], dhidden, dweight, dbias, softcap)
        ctx.save_for_backward(
            None if dhidden is None else dhidden.view_as(hidden),
            cast(dweight, weight.dtype), cast(dbias, weight.dtype),
        )
        ctx.mark_non_differentiable(policy, model_rewards)
        return total, policy, model_rewards

    @staticmethod
    @_first_order
    @_no_autocast
    def backward(ctx, grad_loss, _grad_policy, _grad_rewards):
        grads = ctx.saved_tensors
        if not bool(grad_loss == 1):  # the usual ``loss.backward()`` needs no extra copy
            grads = [None if x is None else x * grad_loss.to(x.dtype) for x in grads]
        return (*grads, None, None, None, None, None, None, None, None, None, None)
