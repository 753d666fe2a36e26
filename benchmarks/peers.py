"""Benchmark problems and one adapter per implementation, all run through the same harness.

An adapter turns a :class:`Problem` into a :class:`Prepared` step (forward + backward of the NCA
loss from hidden states, returning ``(loss, dhidden, dweight)``) or into a string: the reason it
cannot run here. Layout changes a peer needs (Liger's chosen-then-rejected halves) are done once in
``prepare``, outside the measured step, and undone by ``Prepared.to_canonical`` afterwards.

Nothing in the package imports this module; the peers are the optional ``bench`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import nca_kernels
from nca_kernels import reference
from nca_kernels.backends import unavailable_reason

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: B prompts x K responses x T positions, the first
    ``prompt_frac`` of every sequence prompt (ignored), hidden size H, vocab V."""

    name: str
    B: int
    K: int
    T: int
    H: int
    V: int
    dtype: str = "fp32"
    prompt_frac: float = 0.5
    loss_type: str = "nca"
    alpha: float = 1.0
    beta: float = 0.1
    floor: bool = False  # also time "the three matmuls" on this case
    logits: str = "random"  # or "peaked": trained-looking logits (see :func:`peaked`)

    @property
    def S(self) -> int:
        return self.B * self.K

    @property
    def prompt_len(self) -> int:
        return int(self.T * self.prompt_frac)

    @property
    def tokens(self) -> int:
        """Response tokens N: the only positions that cost work in a fused kernel."""
        return self.S * (self.T - self.prompt_len)

    def label(self) -> str:
        return (f"{self.name}: B={self.B} K={self.K} T={self.T} (N={self.tokens} response) "
                f"H={self.H} V={self.V} {self.dtype}" + (f" {self.logits} logits" if self.logits != "random" else ""))

    @property
    def reference_flops(self) -> int:
        """float64 work of the naive reference: logits, dH and dW over all S*T positions."""
        return 6 * self.S * self.T * self.H * self.V

    def reduced(self, max_flops: float) -> Case:
        """The same case with fewer prompts, then shorter sequences, so that its reference fits."""
        case = self
        while case.reference_flops > max_flops and case.B > 1:
            case = dataclasses.replace(case, B=case.B // 2)
        while case.reference_flops > max_flops and case.T > 8:
            case = dataclasses.replace(case, T=case.T // 2)
        return dataclasses.replace(case, name=case.name + " (reduced)") if case != self else case


@dataclass
class Problem:
    hidden: torch.Tensor  # (S, T, H), leaf with requires_grad
    weight: torch.Tensor  # (V, H), leaf with requires_grad
    labels: torch.Tensor  # (S, T) int64, IGNORE on prompt positions
    rewards: torch.Tensor  # (B, K) float32
    ref_logps: torch.Tensor  # (B, K) float32
    beta: float
    alpha: float
    loss_type: str
    peaked: bool = False  # trained-looking logits (gradient filtering is only measured on these)

    @property
    def loss_kwargs(self) -> dict:
        return {"beta": self.beta, "alpha": self.alpha, "loss_type": self.loss_type}

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden, self.weight


def peaked(hidden, weight, labels, zipf=1.5):
    """Trained-looking logits: a Zipf prior ``-zipf * log(v + 1)`` over the vocabulary (weight
    column 0 against hidden feature 1.0) plus a spike of about +8 on each label (hidden rows
    pulled towards their label's weight row). The softmax has a head of about a hundred tokens
    above 2**-12 and a tail holding a few percent of the mass (at the headline case;
    ``benchmarks/triton_tune.py`` reports it), unlike random weights' flat softmax that filtering
    would skip entirely. Returns new ``(hidden, weight)``."""
    v = weight.shape[0]
    weight, hidden = weight.clone(), hidden.clone()
    prior = -zipf * torch.log1p(torch.arange(v, device=weight.device, dtype=torch.float32))
    weight[:, 0] = prior.to(weight.dtype)
    rows = weight[labels.clamp(min=0)].float()
    rows[..., 0] = 0
    hidden = (rows * (8.0 / rows.pow(2).sum(-1, keepdim=True)) + 0.1 * hidden.float()).to(hidden.dtype)
    hidden[..., 0] = 1.0
    return hidden, weight


def make_problem(case: Case, device: torch.device, seed: int = 0) -> Problem:
    """Random inputs for ``case``; weights scaled so logits are O(1). The reference log-probs are
    the policy's own plus noise, so that the model rewards ``beta*(logp - ref)`` are O(1) and every
    sequence gets a non-saturated gradient (the error check then means something)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(case.S, case.T, case.H, generator=g, device=device, dtype=dtype)
    weight = torch.randn(case.V, case.H, generator=g, device=device, dtype=dtype).div_(case.H ** 0.5)
    labels = torch.randint(0, case.V, (case.S, case.T), generator=g, device=device)
    labels[:, : case.prompt_len] = IGNORE
    if case.logits == "peaked":
        hidden, weight = peaked(hidden, weight, labels)
    elif case.logits != "random":
        raise ValueError(f"logits must be 'random' or 'peaked', got {case.logits!r}")
    rewards = torch.randn(case.B, case.K, generator=g, device=device)
    with torch.no_grad():
        logps = nca_kernels.sequence_logprobs(hidden, weight, labels, backend="torch").float().view(case.B, case.K)
    noise = torch.randn(case.B, case.K, generator=g, device=device) / case.beta
    return Problem(hidden.requires_grad_(), weight.requires_grad_(), labels, rewards, logps + noise,
                   case.beta, case.alpha, case.loss_type, peaked=case.logits == "peaked")


# ----------------------------------------------------------------------------------------------
# Prepared steps


@dataclass
class Prepared:
    step: Callable[[], tuple]  # () -> (loss, dhidden, dweight) in the adapter's own layout
    leaves: tuple = ()  # tensors whose .grad the step fills (cleared by the harness after use)
    to_canonical: Callable = lambda dh, dw: (dh, dw)  # noqa: E731  back to the problem's layout
    solves: Problem | None = None  # the problem whose float64 reference applies (None: the given one)
    has_grads: bool = True  # False for the matmul floor
    compiled: bool = False  # uses torch.compile (memory is then metered eagerly on CPU)
    note: str = ""


def backward_step(leaves, loss_fn, **kwargs) -> Prepared:
    """The one step every adapter runs: clear grads, loss, backward, return loss and grads."""
    def step():
        for x in leaves:
            x.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), leaves[0].grad, leaves[1].grad

    return Prepared(step, tuple(leaves), **kwargs)


@dataclass
class Options:
    compile_peers: bool = True  # let Liger / CCE use torch.compile as they do by default


def _module(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # not installed, or broken against this torch
        return None, f"{name} not importable ({type(exc).__name__}: {exc}); pip install -e .[bench]"


def _eager_if(flag: bool):
    """Run torch.compile'd functions eagerly when ``flag`` (compile off, or under the CPU meter)."""
    return torch.compiler.set_stance("force_eager") if flag else contextlib.nullcontext()


# --- naive PyTorch (the official code / TRL's default: logits, float32 log_softmax, gather) ----

def naive(problem: Problem, device: torch.device, opts: Options) -> Prepared | str:
    p = problem
    return backward_step(p.leaves(), lambda: reference.fused_nca_loss(
        p.hidden, p.weight, p.labels, p.rewards, p.ref_logps, **p.loss_kwargs))


# --- ours ---------------------------------------------------------------------------------------

#: ``filter_eps`` of the filtered row: DESIGN.md's ~2**-12.
FILTER_EPS = 2.0**-12


def ours(backend: str, recompute: bool, filter_eps: float = 0.0):
    def adapter(problem: Problem, device: torch.device, opts: Options) -> Prepared | str:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            return reason
        if filter_eps and not problem.peaked:
            return "gradient filtering is measured on trained-looking logits only (run.py --logits peaked)"
        p = problem
        prepared = backward_step(p.leaves(), lambda: nca_kernels.fused_nca_loss(
            p.hidden, p.weight, p.labels, p.rewards, p.ref_logps, **p.loss_kwargs,
            recompute=recompute, backend=backend))
        if not filter_eps:
            return prepared
        unfiltered = prepared.step

        def step():  # the option is read in forward and backward: hold it over the whole step
            with nca_kernels.config.triton_options(filter_eps=filter_eps):
                return unfiltered()

        return dataclasses.replace(prepared, step=step, note=f"filter_eps={filter_eps:g} (fused backward)")

    return adapter


# --- Liger-Kernel: LigerFusedLinearDPOLoss(loss_type="nca_pair") ----------------------------------

def liger(problem: Problem, device: torch.device, opts: Options) -> Prepared | str:
    """K=2 layout: all chosen sequences, then all rejected ones. Liger takes no precomputed reference
    log-probs (only a reference model), so it solves the problem with ref_logps = 0. For K != 2
    the S sequences are regrouped as S/2 pairs: the same tokens and work, a pairwise loss."""
    mod, reason = _module("liger_kernel.chunked_loss")
    if mod is None:
        return reason
    p = problem
    S = p.hidden.shape[0]
    if S % 2:
        return f"needs an even number of sequences for chosen/rejected pairs, got S={S}"
    rewards = p.rewards.reshape(S // 2, 2)
    # With ref_logps = 0 the model reward is beta * logp (hundreds of nats): a beta that keeps it O(1)
    # leaves no sequence with a saturated (zero) gradient, so the error check covers them all.
    beta = 1.0 / (float((p.labels != IGNORE).sum(1).float().mean().clamp(min=1)) * math.log(p.weight.shape[0]))
    pair = Problem(p.hidden, p.weight, p.labels, rewards, torch.zeros_like(rewards), beta, 0.0, "nca_pair")
    chosen = rewards.argmax(-1)
    base = torch.arange(S // 2, device=rewards.device) * 2
    perm = torch.cat([base + chosen, base + 1 - chosen])
    hidden = p.hidden.detach()[perm].requires_grad_()
    labels = p.labels[perm]
    loss_mod = mod.LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=beta, use_ref_model=False,
                                           loss_type="nca_pair", compiled=opts.compile_peers)

    def to_canonical(dh, dw):
        out = torch.empty_like(dh)
        out[perm] = dh
        return out, dw

    note = "ref_logps=0 (takes no precomputed reference), beta=1/(response tokens x ln V)"
    if p.rewards.shape[1] != 2:
        note += f"; K={p.rewards.shape[1]} regrouped as S/2 pairs"
    return backward_step((hidden, p.weight), lambda: loss_mod(p.weight, hidden, labels)[0],
                         to_canonical=to_canonical, solves=pair, compiled=opts.compile_peers, note=note)


# --- peers that give per-token log-probs; our nca_loss on top --------------------------------------

def _with_our_loss(problem: Problem, token_logps: Callable[[torch.Tensor], torch.Tensor]):
    """Loss callable: per-sequence sums of ``token_logps(mask)`` (S, T) into our ``nca_loss``."""
    p = problem

    def loss_fn():
        mask = p.labels != IGNORE
        logps = token_logps(mask).float().sum(-1).view(p.rewards.shape)
        return nca_kernels.nca_loss(logps, p.ref_logps, p.rewards, **p.loss_kwargs)

    return loss_fn


def trl(problem: Problem, device: torch.device, opts: Options) -> Prepared | str:
    """TRL's ChunkedLogProbFunction (the kernel behind its fused LM head) on the response tokens
    only, as TRL does on GPU, scattered back to (S, T)."""
    mod, reason = _module("trl.kernels")
    if mod is None:
        return reason
    p = problem
    utils, reason = _module("trl.trainer.utils")  # its backward imports this module too
    if utils is None:
        return reason
    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)  # the vocab tile TRL's trainers use

    def token_logps(mask):
        lp = mod.ChunkedLogProbFunction.apply(p.hidden[mask], p.weight, None, p.labels[mask], 1.0, chunk,
                                              None, 1.0, ())[0]
        return lp.new_zeros(mask.shape).masked_scatter(mask, lp)

    return backward_step(p.leaves(), _with_our_loss(p, token_logps))


def cce(impl: str, filter_eps="high"):
    """Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")``; ``impl`` "cce" is its
    Triton kernel (GPU), "torch_compile" its compiled-PyTorch path (any device)."""

    def adapter(problem: Problem, device: torch.device, opts: Options) -> Prepared | str:
        mod, reason = _module("cut_cross_entropy")
        if mod is None:
            return reason
        if impl == "cce" and device.type != "cuda":
            return "CCE's Triton kernel needs a CUDA device (the torch_compile path runs instead)"
        p = problem
        eager = impl == "torch_compile" and not opts.compile_peers

        def token_logps(mask):
            with _eager_if(eager):
                return -mod.linear_cross_entropy(p.hidden, p.weight, p.labels, ignore_index=IGNORE,
                                                 reduction="none", filter_eps=filter_eps, impl=impl)

        note = "" if impl == "torch_compile" else f"filter_eps={filter_eps!r}"
        return backward_step(p.leaves(), _with_our_loss(p, token_logps),
                             compiled=impl == "torch_compile" and not eager, note=note)

    return adapter


# --- the floor: the three matmuls the response tokens need -----------------------------------------

def three_matmuls(problem: Problem, device: torch.device, opts: Options) -> Prepared | str:
    """logits = h @ W^T, dH = dlogits @ W, dW = dlogits^T @ h for the N response rows (gathered,
    and a dlogits of the working dtype made, outside the timed step)."""
    p = problem
    h = p.hidden.detach()[p.labels != IGNORE]
    w = p.weight.detach()
    dlogits = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

    def step():
        logits = h @ w.t()
        dh = dlogits @ w
        dw = dlogits.t() @ h
        del logits  # made, never read: no softmax pass in the floor
        return None, dh, dw

    return Prepared(step, has_grads=False, note="floor: 3 matmuls, no softmax")


def implementations(device: torch.device) -> dict[str, Callable]:
    """Every implementation the harness knows, in table order ("naive" first: the ratio base)."""
    impls = {"naive": naive}
    for backend in ("torch", "triton", "cuda"):
        impls[f"ours[{backend},recompute]"] = ours(backend, True)
        impls[f"ours[{backend},group]"] = ours(backend, False)
    impls["ours[triton,recompute,filter]"] = ours("triton", True, FILTER_EPS)
    impls["liger[nca_pair]"] = liger
    impls["trl[chunked_logprob]"] = trl
    if device.type == "cuda":
        impls["cce"] = cce("cce")
        impls["cce[no-filter]"] = cce("cce", filter_eps=None)
    impls["cce[torch_compile]"] = cce("torch_compile")
    return impls


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["nca_kernels"] = nca_kernels.__version__
    return out
