"""Peak bytes of live tensors during a call, counted from the tensors themselves (any device,
independent of the allocator): a TorchDispatchMode sees every tensor an op creates, counts its
storage once, and a finalizer on the storage subtracts it when the storage dies.

    with LiveBytes() as live:
        step()
    live.peak, live.now   # bytes (storages first seen during the call: parameters and inputs
                          # count from their first use inside it, e.g. a transpose of a weight)

On a CPU this is the number a CUDA ``max_memory_allocated`` would give without the caching
allocator's rounding; RSS, by contrast, also moves with glibc's heap thresholds (measured here:
the same step's RSS peak varied by 50 MiB between runs).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _freed(self, nbytes: int) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    nbytes = storage.nbytes()
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._freed, nbytes)
        return out
