"""Block inputs kept for backward outside device memory, so device memory does not grow with depth (the engine's
`offload_checkpoints`): in page-locked host memory (CUDA only), or in files on the drives (block_input_files.py)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from megatrain_lightning import schedule as S
from megatrain_lightning.storage.block_input_files import BlockInputFiles
from megatrain_lightning.engine.lanes import Lanes
from megatrain_lightning.storage.store import available_ram_bytes, pinned_empty

log = logging.getLogger(__name__)


class HostCheckpoints:
    """Block inputs kept outside device memory (memory flat in depth). In host memory, each goes out on the D2H stream
    as forward produces it and comes back on the H2D stream one block ahead of backward. `auto`: in host memory only
    while the RAM the OS still has leaves RAM_MARGIN beside them; else in files under `spill_dirs` where there are
    some (storage=nvme), else they stay on the device. `spill_dirs` and not `auto`: always in files
    (offload_checkpoints="disk"). The files, their directories and threads exist only once first needed."""

    RAM_MARGIN = 4 * 2**30

    def __init__(self, lanes: Lanes, plan: S.Plan, auto: bool, spill_dirs: tuple = ()) -> None:
        self.lanes, self.plan, self.auto, self.spill_dirs = lanes, plan, auto, spill_dirs
        self.files: BlockInputFiles | None = None  # made at the first spill
        self._host: Tensor | None = None  # [n_checkpoints * numel] pinned, reused while the size fits
        self.saved: list[tuple[Tensor, torch.Size, torch.dtype, torch.cuda.Event]] = []
        self.active = False  # the last training forward's block inputs are here
        self.on_disk = False  # ... and in files
        self._warned = False

    def begin(self, x: Tensor) -> bool:
        """Before a training forward: whether its block inputs leave the device."""
        n = self.plan.n_checkpoints * x.numel()
        self.active, self.on_disk = True, False
        if self.spill_dirs and not self.auto:
            return self._to_files(x)
        if self._host is None or self._host.numel() < n or self._host.dtype != x.dtype:
            self._host = None  # unregister and free the old buffer before page-locking the new one
            need = n * x.element_size()
            if self.auto and need > available_ram_bytes() - self.RAM_MARGIN:
                if self.spill_dirs:
                    return self._to_files(x, f"offload_checkpoints: the block inputs ({need / 2**30:.1f} GiB) go to "
                                             "the drives of storage.nvme_dir: host RAM has no room for them")
                if not self._warned:
                    log.warning(f"offload_checkpoints: the block inputs ({need / 2**30:.1f} GiB) stay on the device: "
                                "host RAM has no room for them (offload_checkpoints=true insists)")
                    self._warned = True
                self.active = False
                return False
            self._host = pinned_empty(n, x.dtype, pin=True)
        self.saved = []
        return True

    def _to_files(self, x: Tensor, why: str | None = None) -> bool:
        if why and not self._warned:
            log.info(why)
            self._warned = True
        if self.files is None:
            self.files = BlockInputFiles(self.spill_dirs, self.lanes.device)
        self.files.begin(x, self.plan.n_checkpoints)
        self.on_disk = True
        return True

    def put(self, x: Tensor) -> None:
        if self.on_disk:
            return self.files.put(x)
        lanes = self.lanes
        host = self._host[len(self.saved) * x.numel():(len(self.saved) + 1) * x.numel()]
        lanes.d2h.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(lanes.d2h), lanes.span(len(self.saved) * self.plan.k, S.D2H, S.CHECKPOINT, x.nbytes,
                                                       lanes.d2h):
            host.copy_(x.reshape(-1), non_blocking=True)
            x.record_stream(lanes.d2h)
        done = torch.cuda.Event()
        done.record(lanes.d2h)
        self.saved.append((host, x.shape, x.dtype, done))

    def fetch(self, b: int):
        """Starts bringing checkpoint b back; `take` waits for it."""
        if self.on_disk:
            return self.files.fetch(b)
        lanes = self.lanes
        host, shape, dtype, sent = self.saved[b]
        x = torch.empty(shape, dtype=dtype, device=lanes.device)
        lanes.h2d.wait_stream(torch.cuda.current_stream())  # x's memory may have been used by compute until now
        lanes.h2d.wait_event(sent)
        with torch.cuda.stream(lanes.h2d), lanes.span(b * self.plan.k, S.H2D, S.CHECKPOINT, x.nbytes, lanes.h2d):
            x.view(-1).copy_(host, non_blocking=True)
        # no x.record_stream(h2d): the compute stream waits for `ready` before it touches x, so whatever it does
        # with x's memory once x is freed comes after the copy; recording the stream would hold the block back
        # from reuse until the H2D stream's queued weight loads have run too
        ready = torch.cuda.Event()
        ready.record(lanes.h2d)
        return x, ready

    def take(self, fetched) -> Tensor:
        """The block input of a `fetch`, ready for the current stream."""
        if self.on_disk:
            return self.files.take(fetched)
        x, ready = fetched
        torch.cuda.current_stream().wait_event(ready)
        return x
