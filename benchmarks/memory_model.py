"""The memory model of one VGF step (docs/gpu.md "Memory model"), checked against measured peaks on a tiny model.

``PeakMemory`` measures the peak of the tensors allocated inside a block (live bytes over time, every op's outputs
counted once per storage and released when the storage dies), on the CPU; on CUDA it reads the allocator's peak.
tracemalloc cannot see torch's allocations, so this is the CPU's measure here (and the tests' memory checks).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak``: the most bytes of tensors allocated inside the block that
    were alive at once (CPU tensors; on ``device='cuda'`` the CUDA allocator's peak above the block's start)."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device, self.live, self.peak, self._seen = torch.device(device), 0, 0, {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        return super().__enter__()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return None
        return super().__exit__(*exc)

    def _free(self, key, nbytes):
        self._seen.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen[key] = weakref.finalize(storage, self._free, key, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out
