"""Run by ``torchrun --standalone --nproc_per_node 2 -m tests.trainer.fsdp_worker MODE``: the trainer's loss on a
tiny Llama sharded over its decoder layers and its root (which holds the tied embedding / LM head).

- ``fsdp2``: ``fully_shard``. FSDP2 keeps the root's parameters gathered from its forward to its
  backward, so the loss and one SGD step equal an unsharded copy's.
- ``fsdp1``: ``FullyShardedDataParallel``; the same.
- ``fsdp1-orig``: FSDP1 with ``use_orig_params=True``, which reshards the root's original
  parameters after the forward: the loss refuses the sharded LM head with a ValueError.

Fails with an AssertionError otherwise.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from .common import char_tokenizer, reward_rows, tiny_llama
from .test_trainer_loss import batch_of, make_trainer


def shard(model, mode: str):
    """``model`` sharded over its decoder layers and root; returns the module to call."""
    layer = type(model.model.layers[0])
    if mode == "fsdp2":
        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model)
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer}), device_id=torch.device("cpu"),
                                    use_orig_params=mode == "fsdp1-orig")


def full_params(module, mode: str) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole, by its name in the unwrapped model."""
    if mode == "fsdp2":
        return {n: p.full_tensor() for n, p in module.named_parameters()}
    with FullyShardedDataParallel.summon_full_params(module):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in module.named_parameters()}


def sgd_step(params) -> None:
    with torch.no_grad():
        for p in params:
            p.sub_(p.grad)


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(Path(tmp), tiny_llama(len(char_tokenizer())), reward_rows(4))
            model, batch = trainer.model, batch_of(trainer)
            torch.manual_seed(1)  # the same step away from the reference on every rank
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            whole = copy.deepcopy(model)
            want = trainer.compute_loss(whole, batch)
            want.backward()
            sgd_step(whole.parameters())
            sharded = shard(model, mode)
            if mode == "fsdp1-orig":
                try:
                    trainer.compute_loss(sharded, batch)
                except ValueError as exc:
                    assert "sharded" in str(exc), exc
                    return
                raise AssertionError("a sharded LM head was not refused")
            got = trainer.compute_loss(sharded, batch)
            got.backward()  # every rank saw the whole batch: the averaged gradients are the batch's
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            sgd_step(sharded.parameters())
            after = full_params(sharded, mode)
            for name, p in whole.named_parameters():
                torch.testing.assert_close(after[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
