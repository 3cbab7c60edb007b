"""The file-backed tier: layers whose fp32 state does not fit the RAM budget keep it in one file each.

A file holds the unit's flat [master | adam m | adam v] (12 bytes per trainable parameter, 4 per frozen one). Their gradients and their
streamed compute-dtype copy stay in RAM (the forward and the gradient clipping need them there). The host
optimizer reads a layer's state ahead of need into one of a few reused RAM tiles, updates it, and writes it
behind on a second thread while the next layer is read and updated.

Writes are flushed (fdatasync) and the pages dropped from the OS cache, so the RAM budget holds and the
measured bandwidth is the disk's, not the page cache's.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from megatrain_lightning import ownership, schedule as S


@dataclass
class IOStats:
    """Bytes moved and seconds spent by the reader and writer threads, and how long the optimizer waited."""

    read_bytes: int = 0
    read_s: float = 0.0
    write_bytes: int = 0
    write_s: float = 0.0
    wait_s: float = 0.0

    def rates(self) -> dict[str, float]:
        return {"nvme_read_GBps": self.read_bytes / self.read_s / 1e9 if self.read_s else 0.0,
                "nvme_write_GBps": self.write_bytes / self.write_s / 1e9 if self.write_s else 0.0,
                "nvme_wait_s": self.wait_s}


class NvmeTier:
    def __init__(self, directory: str | Path, numels: dict[int, int], buffers: int = S.NVME_BUFFERS) -> None:
        """`numels`: unit index -> fp32 elements of each file-backed unit's [master | m | v]."""
        if not numels:
            raise ValueError("NvmeTier needs at least one unit")
        root = Path(directory)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create storage.nvme_dir {root}: {e.strerror}") from e
        need = sum(numels.values()) * 4
        free = shutil.disk_usage(root).free
        if need > free:
            raise OSError(errno.ENOSPC, f"storage.nvme_dir {root} has {free / 1e9:.1f} GB free; the file-backed "
                          f"layers need {need / 1e9:.1f} GB")
        ownership.remove_dead(root, "megatrain-*", "the NVMe state")  # of a killed run (SIGKILL skips cleanup)
        # a private working directory: two runs sharing nvme_dir never touch each other's state
        self.dir = Path(tempfile.mkdtemp(prefix="megatrain-", dir=root))
        ownership.mark(self.dir)
        self.numels = dict(numels)
        max_numel = max(numels.values())
        self.n_buffers, self._tile_bytes = buffers, max_numel * 4
        self._tiles: queue.Queue[Tensor] = queue.Queue()
        for _ in range(buffers):
            self._tiles.put(torch.empty(max_numel, dtype=torch.float32))
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="megatrain-nvme-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="megatrain-nvme-write")
        self._writes: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.stats = IOStats()
        weakref.finalize(self, shutil.rmtree, str(self.dir), True)  # the files die with the run

    @property
    def nbytes(self) -> int:
        """RAM of the tiles (in the pool or in flight)."""
        return self.n_buffers * self._tile_bytes

    def path(self, index: int) -> Path:
        return self.dir / f"unit_{index:05d}.bin"

    # ---- whole-unit I/O on the background threads ----
    def read(self, index: int) -> Future:
        """Starts reading a unit's state into a free tile; the future's result is the tile
        ([master | m | v], fp32). Blocks while every tile is in use."""
        start = time.perf_counter()
        tile = self._tiles.get()
        self.stats.wait_s += time.perf_counter() - start
        pending = self._writes.get(index)
        return self._reader.submit(self._read, index, tile, pending)

    def write(self, index: int, tile: Tensor) -> Future:
        """Writes a tile back behind the caller; the tile returns to the pool when the write is done."""
        future = self._writer.submit(self._write, index, tile)
        self._writes[index] = future
        return future

    def take(self, future: Future) -> Tensor:
        """The tile of a `read`, waiting for it (the wait is counted in the stats)."""
        start = time.perf_counter()
        tile = future.result()
        self.stats.wait_s += time.perf_counter() - start
        return tile

    def release(self, tile: Tensor) -> None:
        """Returns a tile that was read but will not be written (an optimizer step that failed midway)."""
        self._tiles.put(tile)

    def flush(self) -> None:
        """Waits for every write behind; raises the first write error."""
        for index, future in list(self._writes.items()):
            future.result()
            self._writes.pop(index, None)

    def reset_stats(self) -> IOStats:
        stats, self.stats = self.stats, IOStats()
        return stats

    def _read(self, index: int, tile: Tensor, pending: Future | None) -> Tensor:
        try:
            if pending is not None:
                pending.result()  # the last write of this unit must land before it is read back
            self._timed("read", _read_file, index, tile)
            return tile
        except BaseException:
            self._tiles.put(tile)
            raise

    def _write(self, index: int, tile: Tensor) -> None:
        try:
            self._timed("write", _write_file, index, tile)
        finally:
            self._tiles.put(tile)

    def _timed(self, kind: str, io, index: int, tile: Tensor) -> None:
        """Moves a unit's state between its file and `tile`, adding the bytes and seconds to the stats."""
        n = self.numels[index]
        start = time.perf_counter()
        io(self.path(index), tile[:n])
        with self._lock:
            setattr(self.stats, f"{kind}_bytes", getattr(self.stats, f"{kind}_bytes") + n * 4)
            setattr(self.stats, f"{kind}_s", getattr(self.stats, f"{kind}_s") + time.perf_counter() - start)

    # ---- synchronous access (setup, checkpoints, imports) ----
    def load(self, index: int) -> Tensor:
        """A unit's state as a fresh [master | m | v] tensor."""
        self.flush()
        out = torch.empty(self.numels[index], dtype=torch.float32)
        _read_file(self.path(index), out)
        return out

    def store(self, index: int, state: Tensor) -> None:
        """Writes (or creates) a unit's file from a [master | m | v] tensor."""
        self.flush()
        _write_file(self.path(index), state)

    def load_master(self, index: int, offset: int, numel: int) -> Tensor:
        """`numel` fp32 elements of a unit's master from element `offset` (one tensor, for a state dict)."""
        self.flush()
        out = torch.empty(numel, dtype=torch.float32)
        _read_file(self.path(index), out, offset * 4)
        return out

    def store_master(self, index: int, offset: int, values: Tensor) -> None:
        """Writes fp32 `values` into a unit's master at element `offset` (imports write tensor by tensor)."""
        self.flush()
        _write_file(self.path(index), values, offset * 4)


def _bytes(t: Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def _read_file(path: Path, out: Tensor, offset: int = 0) -> None:
    view, want = _bytes(out), out.nbytes
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise OSError(errno.EIO, f"{path} is truncated: {got} of {want} bytes")
            got += n
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _write_file(path: Path, data: Tensor, offset: int = 0) -> None:
    view, want = _bytes(data), data.nbytes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        done = 0
        while done < want:
            done += os.pwritev(fd, [view[done:]], offset + done)
        os.fdatasync(fd)  # on the disk, so the pages can leave the cache (and a full disk shows up here)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"the disk of storage.nvme_dir is full while writing {path}") from e
        raise
    finally:
        os.close(fd)
