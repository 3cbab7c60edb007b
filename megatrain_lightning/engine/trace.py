"""Per-step event recording: (layer, lane, kind, bytes, start, end) for every transfer and compute span.

Device spans are timed with CUDA events on the stream that runs them (no synchronization inside the
step); host spans with perf_counter. Both clocks start at the same instant, taken after one synchronize
when the trace begins.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


class Trace:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._device: list[tuple[int, str, str, int, object, object]] = []
        self.records: list[dict] = []
        if self.cuda:
            torch.cuda.synchronize(device)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
        self._t0 = time.perf_counter()

    @contextmanager
    def device_span(self, layer: int, lane: str, kind: str, nbytes: int = 0,
                    stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        if not self.cuda:
            with self.host_span(layer, lane, kind, nbytes):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._device.append((layer, lane, kind, nbytes, start, end))

    def mark(self) -> object:
        """A point on the current stream (the host clock on the CPU) that a later `since` closes a span from."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def since(self, mark: object, layer: int, lane: str, kind: str) -> None:
        """Records the span from `mark` to now on the current stream."""
        if not self.cuda:
            self.add_host(layer, lane, kind, mark, time.perf_counter())
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._device.append((layer, lane, kind, 0, mark, end))

    @contextmanager
    def host_span(self, layer: int, lane: str, kind: str, nbytes: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.add_host(layer, lane, kind, start, time.perf_counter(), nbytes)

    def add_host(self, layer: int, lane: str, kind: str, start: float, end: float, nbytes: int = 0) -> None:
        """Records a host span given perf_counter() readings."""
        with self._lock:
            self.records.append(dict(layer=layer, lane=lane, kind=kind, bytes=nbytes,
                                     start=start - self._t0, end=end - self._t0))

    def finish(self) -> list[dict]:
        """Resolves device events (synchronizes) and returns all records sorted by start time."""
        if self.cuda:
            torch.cuda.synchronize()
            for layer, lane, kind, nbytes, start, end in self._device:
                self.records.append(dict(layer=layer, lane=lane, kind=kind, bytes=nbytes,
                                         start=self._base.elapsed_time(start) / 1e3,
                                         end=self._base.elapsed_time(end) / 1e3))
            self._device.clear()
        self.records.sort(key=lambda r: r["start"])
        return self.records

    def save(self, path: str | Path, **meta: object) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        events = self.finish()
        step = max((r["end"] for r in events), default=0.0)
        path.write_text(json.dumps({"meta": meta, "step_time_s": step, "events": events}, indent=1))
        return path


class StepTracer:
    """Records optimizer step `step` of an engine into `directory`/step{step}.json (nothing when `directory` is
    None). The step's host updates may run behind the next step's forward (clipping defers them): once its device
    work is over the trace keeps recording those only (`behind`), and is saved when they are done."""

    def __init__(self, directory: str | Path | None, step: int) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.step = step
        self.behind: Trace | None = None

    def host_trace(self, engine) -> Trace | None:
        """Where host spans go now: the traced step's, or its updates running behind."""
        return engine.trace or self.behind

    def batch_start(self, engine, device: torch.device, global_step: int, step_start: bool, overlapped: bool,
                    meta) -> None:
        if engine.trace is not None and step_start and global_step > self.step:
            self.behind, engine.trace = engine.trace, None
            if not overlapped:
                self.save(engine, meta)
        if self.directory is not None and engine.trace is None and global_step == self.step and step_start:
            engine.trace = Trace(device)

    def updates_done(self, engine, meta) -> None:
        """The traced step's host updates are all done: saved if they were what it waited for."""
        if self.behind is not None:
            self.save(engine, meta)

    def finish(self, engine, meta) -> None:
        if engine.trace is not None or self.behind is not None:
            self.save(engine, meta)

    def save(self, engine, meta) -> None:
        trace = self.behind or engine.trace
        self.behind = engine.trace = None
        trace.save(self.directory / f"step{self.step}.json", **meta())
