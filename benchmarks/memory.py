"""Peak memory of a call, measured the same way for every implementation (DESIGN.md section 5).

CPU: a TorchDispatchMode tracks every tensor storage created while it is active (weakref
finalizers on ``untyped_storage()``) and records the peak of their live bytes; a storage counts
when an op returns it without having received it, so storages that existed before are ignored.
Deterministic. CUDA: ``max_memory_allocated`` above the bytes allocated before the call.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StoragePeak(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key, nbytes=nbytes):
            self.live -= nbytes
            self._seen.discard(key)

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {x.untyped_storage()._cdata for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        out = func(*args, **kwargs)
        for x in tree_leaves(out):  # a storage an op returns but did not receive is new
            if isinstance(x, torch.Tensor) and x.untyped_storage()._cdata not in inputs:
                self._track(x.untyped_storage())
        return out


def peak_bytes(fn, device: torch.device) -> int:
    """Peak extra bytes allocated while ``fn()`` runs (its result is dropped before returning)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with StoragePeak() as mode:
        fn()
    return mode.peak
