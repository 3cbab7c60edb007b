"""Host buffers for transfers: page-locked for CUDA DMA, aligned for O_DIRECT file I/O."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

ALIGN_BYTES = 4096  # O_DIRECT's alignment of buffer addresses, file offsets and lengths (state_files.py)


def pinned_empty(numel: int, dtype: torch.dtype, pin: bool) -> Tensor:
    """A host buffer of exactly `numel` elements starting on a 4 KiB boundary (what O_DIRECT file I/O needs:
    state_files.py), page-locked when `pin` (PyTorch's pinned allocator would round the request up to a power of
    two: up to 2x the RAM)."""
    if not numel:
        return torch.empty(0, dtype=dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(numel + ALIGN_BYTES // size, dtype=dtype)
    skip = (-raw.data_ptr() % ALIGN_BYTES) // size  # CPU allocations are 64-byte aligned: a whole element count
    t = raw[skip:skip + numel]
    if pin:
        register(t)
    return t


def register(t: Tensor) -> weakref.finalize:
    """Page-locks `t`'s memory for asynchronous DMA until `t`'s storage is freed (or the returned finalizer is
    called)."""
    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.nbytes
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}): the OS refused to page-lock "
                           "host memory for transfers (check `ulimit -l` and free RAM)")
    return weakref.finalize(t.untyped_storage(), cudart.cudaHostUnregister, ptr)
