"""The reference pass: per-response log-probs under the frozen initial policy, computed once.

Forward only, under ``no_grad``, through :func:`nca_kernels.sequence_logprobs` on the backbone's
last hidden states, so the full logits are never built here either.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader

from ..api import sequence_logprobs
from .data import TOKENIZED_COLUMNS
from .modeling import check_head_output, head_operands, last_hidden


@torch.no_grad()
def compute_logps(model, dataset, collator, *, batch_size: int, average: bool = False, backend: str = "auto",
                  accelerator=None, disable_adapters: bool = False,
                  forward_context=contextlib.nullcontext) -> torch.Tensor:
    """``(N, K)`` float32 log-probs of every response of a tokenised dataset under ``model``.

    With an ``accelerator`` the rows are shared between processes and gathered back in order.
    ``disable_adapters`` runs a PEFT model with its adapters off (the base model as reference).
    ``forward_context`` wraps the forward and the log-probs (the trainer's mixed-precision autocast).
    """
    loader = DataLoader(dataset.select_columns(list(TOKENIZED_COLUMNS)), batch_size=batch_size,
                        collate_fn=collator)
    if accelerator is not None:
        loader = accelerator.prepare(loader)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with model.disable_adapter() if disable_adapters else contextlib.nullcontext():
        for i, batch in enumerate(loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            with forward_context():  # the head too, in the precision of the training loss
                hidden, last_logits = last_hidden(model, model, batch)
                hidden, weight, bias, softcap = head_operands(model, hidden)
                if i == 0:
                    check_head_output(model, hidden, last_logits, weight, bias, softcap)
                logps = sequence_logprobs(hidden, weight, batch["labels"], bias=bias, average=average, shift=True,
                                          softcap=softcap, backend=backend)
            logps = logps.float().view(batch["rewards"].shape)
            if accelerator is not None:
                logps = accelerator.gather_for_metrics(logps)
            out.append(logps.cpu())
    model.train(was_training)
    return torch.cat(out)


def add_reference_logps(dataset, model, collator, **kwargs):
    """The dataset with a ``ref_logps`` column (K floats per row) from :func:`compute_logps`."""
    logps = compute_logps(model, dataset, collator, **kwargs)
    if logps.shape[0] != len(dataset):
        raise RuntimeError(f"reference pass returned {logps.shape[0]} rows for a dataset of {len(dataset)}")
    if "ref_logps" in dataset.column_names:
        dataset = dataset.remove_columns("ref_logps")
    return dataset.add_column("ref_logps", logps.tolist())
