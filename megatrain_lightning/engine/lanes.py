"""Where the engine's work runs, handed to its helpers (gradient shipping, block inputs) instead of the engine:
the device, its two copy streams (CUDA), the one host thread, and the step's trace."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

from megatrain_lightning import schedule as S
from megatrain_lightning.engine.trace import Trace


class Lanes:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        # weights copy in on h2d, gradients and block inputs copy out on d2h; the caller's stream computes
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        # One host thread does all host work of a step in order: gradients landing or being added, norms, and the
        # optimizer's per-unit updates (optim.HostAdam). It runs PyTorch's intra-op threads like the main thread.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="megatrain-host", initializer=torch.set_num_threads,
                                         initargs=(torch.get_num_threads(),))
        self.trace: Trace | None = None  # the step being traced (trace.StepTracer sets it)

    def span(self, layer: int, lane: str, kind: str, nbytes: int = 0, stream=None):
        """Times a piece of device work of `layer` on `lane` (a no-op untraced)."""
        if self.trace is None:
            return nullcontext()
        return self.trace.device_span(layer, lane, kind, nbytes, stream)

    def host_span(self, layer: int, kind: str, nbytes: int = 0):
        """Times a piece of the host thread's work (a no-op untraced)."""
        if self.trace is None:
            return nullcontext()
        return self.trace.host_span(layer, S.CPU, kind, nbytes)
