"""The file-backed tier: trunk layers whose state does not fit the RAM budget keep all of it in one file each.

A unit's file holds (byte offsets):

    [0, 4*S)              [master | adam m | adam v], fp32 (S = Layout.state_numel; the master of M =
                          Layout.master_numel elements)
    [4*S, 4*T)            the gradient, fp32, while the step still needs it (clipping, accumulation; T = tile_numel)
    [align(4*T), +cb*N)   the compute-dtype copy the forward and the backward stream (N = Layout.numel): its first M
                          elements cast from the master, the rest frozen parameters kept there alone

so nothing of such a layer stays in RAM between its uses: RAM holds a bounded window of reused tiles, whatever the
depth (`nbytes`): optimizer tiles (a piece being updated, one read ahead, one written behind), pinned copy tiles for
the weight loads, pinned gradient tiles for the gradients shipped from the device. The optimizer works on pieces of a
layer (`pieces`: whole tensors, NVME_PIECE elements or more), so its tiles are a piece's, not a layer's.

Several directories (`storage.nvme_dir` as a list, one per drive) stripe the layers round-robin; each directory has
its own reader and writer thread, so the drives work at once. Writes are flushed (fdatasync) and the pages dropped
from the OS cache, so the RAM budget holds and the measured bandwidth is the disk's, not the page cache's. A full
disk or a vanished or truncated file raises an OSError naming the path; the step that met it does not complete.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from megatrain_lightning import schedule as S
from megatrain_lightning.storage import ownership
from megatrain_lightning.storage.host_memory import pinned_empty
from megatrain_lightning.storage.state_files import DriveError, read_file as _read_file, write_file as _write_file


ALIGN = 4096  # the copy region starts on a page (and O_DIRECT-sized) boundary
CAST_PIECE = 16 * 2**20  # elements of master cast into the copy per write request (32 MiB in bf16)


@dataclass
class IOStats:
    """Bytes moved and seconds spent by the reader and writer threads per directory, and how long the callers
    waited for them."""

    read_bytes: dict[str, int] = field(default_factory=dict)
    read_s: dict[str, float] = field(default_factory=dict)
    write_bytes: dict[str, int] = field(default_factory=dict)
    write_s: dict[str, float] = field(default_factory=dict)
    direct_bytes: int = 0  # of all of those, moved through O_DIRECT (state_files.py)
    wait_s: float = 0.0

    def add(self, kind: str, where: str, nbytes: int, seconds: float, direct: bool = False) -> None:
        b, s = getattr(self, f"{kind}_bytes"), getattr(self, f"{kind}_s")
        b[where] = b.get(where, 0) + nbytes
        s[where] = s.get(where, 0.0) + seconds
        self.direct_bytes += nbytes if direct else 0

    def rates(self) -> dict[str, float]:
        """Achieved GB/s per drive (each directory's bytes over its thread's busy seconds) and in all (the sum of
        the drives'), and the callers' wait."""
        out = {"nvme_read_GBps": 0.0, "nvme_write_GBps": 0.0}
        for kind in ("read", "write"):
            b, s = getattr(self, f"{kind}_bytes"), getattr(self, f"{kind}_s")
            for k, where in enumerate(sorted(b)):
                rate = b[where] / s[where] / 1e9 if s[where] else 0.0
                out[f"nvme{k}_{kind}_GBps"] = rate
                out[f"nvme_{kind}_GBps"] += rate
        out["nvme_wait_s"] = self.wait_s
        moved = sum(self.total_bytes)
        out["nvme_direct_share"] = self.direct_bytes / moved if moved else 0.0
        return out

    @property
    def total_bytes(self) -> tuple[int, int]:
        return sum(self.read_bytes.values()), sum(self.write_bytes.values())


@dataclass(frozen=True)
class _Shape:
    numel: int  # parameters (master, copy)
    state: int  # fp32 elements of [master | m | v]
    tile: int  # fp32 elements of [master | m | v | grad]

    @property
    def trainable(self) -> int:
        return self.tile - self.state

    @property
    def master(self) -> int:
        return self.state - 2 * self.trainable

    @property
    def copy_offset(self) -> int:
        return -(-self.tile * 4 // ALIGN) * ALIGN


def pieces(sizes: Sequence[int], at_least: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) element ranges of a layer's trainable parameters (tensors of `sizes`, in layout order) that its
    update reads, updates and writes at a time: consecutive whole tensors, closed once they reach `at_least`
    elements (None: schedule.NVME_PIECE; a tensor bigger than that is a piece of its own)."""
    at_least = S.NVME_PIECE if at_least is None else at_least
    out, lo, hi = [], 0, 0
    for n in sizes:
        if hi > lo and hi - lo + n > at_least:
            out.append((lo, hi))
            lo = hi
        hi += n
    if hi > lo:
        out.append((lo, hi))
    return out


def working_dirs(owner: object, roots: Sequence[Path], prefix: str, what: str) -> list[Path]:
    """A private working directory in each of `roots` (two runs sharing nvme_dir never touch each other's files),
    removed with `owner`; those a killed run left (SIGKILL skips cleanup) are removed first."""
    out = []
    for root in roots:
        ownership.remove_dead(root, f"{prefix}*", what)
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        ownership.mark(d)
        weakref.finalize(owner, shutil.rmtree, str(d), True)  # the files die with the run
        out.append(d)
    return out


class TilePool:
    """Reused buffers of one kind; `get` blocks while all are in use (the bound on the tier's RAM)."""

    def __init__(self, n: int, numel: int, dtype: torch.dtype, pin: bool) -> None:
        self._q: queue.Queue[Tensor] = queue.Queue()
        for _ in range(n):
            self._q.put(pinned_empty(numel, dtype, pin) if numel else torch.empty(0, dtype=dtype))
        self.nbytes = n * numel * (torch.finfo(dtype).bits // 8)

    def get(self) -> Tensor:
        return self._q.get()

    def put(self, t: Tensor) -> None:
        self._q.put(t)


class NvmeTier:
    def __init__(self, directories: str | Path | Sequence[str | Path], shapes: dict[int, tuple[int, int, int]],
                 copy_dtype: torch.dtype, pin: bool = False, max_piece: int | None = None,
                 buffers: int = S.NVME_BUFFERS, copy_buffers: int = S.NVME_COPY_BUFFERS,
                 grad_buffers: int = S.NVME_GRAD_BUFFERS) -> None:
        """`shapes`: unit index -> (parameters, fp32 elements of [master | m | v], of [master | m | v | grad]) of
        each file-backed unit; `copy_dtype`: the streamed copy's dtype; `pin`: page-lock the copy and gradient
        tiles (CUDA DMA); `max_piece`: the largest piece (`pieces`) an update reads (None: a whole layer's
        trainable parameters)."""
        if not shapes:
            raise ValueError("NvmeTier needs at least one unit")
        roots = [Path(d) for d in ([directories] if isinstance(directories, (str, Path)) else directories)]
        if not roots:
            raise ValueError("storage.nvme_dir names no directory")
        self.shapes = {i: _Shape(*s) for i, s in shapes.items()}
        self.copy_dtype, self._cb = copy_dtype, torch.finfo(copy_dtype).bits // 8
        order = sorted(shapes)
        where = {i: k % len(roots) for k, i in enumerate(order)}  # striped round-robin in layer order
        for k, root in enumerate(roots):
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DriveError(e.errno, f"cannot create storage.nvme_dir {root}: {e.strerror}") from e
            need = sum(self._file_bytes(i) for i in order if where[i] == k)
            free = shutil.disk_usage(root).free
            if need > free:
                raise DriveError(errno.ENOSPC, f"storage.nvme_dir {root} has {free / 1e9:.3g} GB free; the "
                                 f"file-backed layers striped onto it need {need / 1e9:.3g} GB")
        self.dirs = working_dirs(self, roots, "megatrain-", "the NVMe state")
        self.dir = self.dirs[0]
        self._where = where
        self._readers = [ThreadPoolExecutor(1, thread_name_prefix=f"megatrain-nvme{k}-read") for k in range(len(roots))]
        self._writers = [ThreadPoolExecutor(1, thread_name_prefix=f"megatrain-nvme{k}-write") for k in range(len(roots))]
        self._release = ThreadPoolExecutor(1, thread_name_prefix="megatrain-nvme-release")
        # one per writer thread, aligned for O_DIRECT
        self._cast_scratch = [pinned_empty(CAST_PIECE, copy_dtype, False) for _ in roots]
        piece = max(s.trainable for s in self.shapes.values()) if max_piece is None else max_piece
        self.n_buffers = buffers
        self._tiles = TilePool(buffers, 4 * piece, torch.float32, False)  # [master | m | v | grad] of a piece
        self._copies = TilePool(copy_buffers, max(s.numel for s in self.shapes.values()), copy_dtype, pin)
        self._grads = TilePool(grad_buffers, max(s.tile - s.state for s in self.shapes.values()), torch.float32, pin)
        self._writes: dict[int, Future] = {}  # each unit's last write (reads of the unit wait for it)
        self._lock = threading.Lock()
        self.stats = IOStats()
        for i in order:  # full size now (zeros): a disk that cannot hold the files fails here, not mid-step
            self._create(i)

    # ---- sizes ----
    def _file_bytes(self, i: int) -> int:
        s = self.shapes[i]
        return s.copy_offset + s.numel * self._cb

    @property
    def nbytes(self) -> int:
        """RAM of the window (every tile, in a pool or in flight), whatever the number of file-backed units."""
        return self._tiles.nbytes + self._copies.nbytes + self._grads.nbytes + \
            sum(t.nbytes for t in self._cast_scratch)

    def path(self, index: int) -> Path:
        return self.dirs[self._where[index]] / f"unit_{index:05d}.bin"

    def _create(self, i: int) -> None:
        path = self.path(i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, self._file_bytes(i))  # reserves the blocks: ENOSPC now, not later
        except OSError as e:
            raise DriveError(e.errno, f"cannot reserve {self._file_bytes(i) / 1e9:.3g} GB for {path}: "
                             f"{e.strerror}") from e
        finally:
            os.close(fd)

    # ---- background I/O ----
    def _after_writes(self, index: int) -> None:
        pending = self._writes.get(index)
        if pending is not None:
            pending.result()  # the unit's last write must land before any part of it is read back

    def _submit(self, pool: list[ThreadPoolExecutor], index: int, fn, *args) -> Future:
        return pool[self._where[index]].submit(fn, *args)

    def _regions(self, index: int, lo: int, hi: int) -> list[int]:
        """Byte offsets in a unit's file of the master, m, v and gradient of trainable elements [lo, hi)."""
        s = self.shapes[index]
        return [4 * (part + lo) for part in (0, s.master, s.master + s.trainable, s.master + 2 * s.trainable)]

    def read(self, index: int, lo: int, hi: int) -> Future:
        """Starts reading the master, m, v and gradient of a unit's trainable elements [lo, hi) (a piece) into a
        free optimizer tile as [master | m | v | grad], each hi - lo long; the future's result is the tile. Blocks
        while every tile is in use."""
        tile = self._waited(self._tiles.get)
        pending = self._writes.get(index)
        n = hi - lo

        def run() -> Tensor:
            try:
                if pending is not None:
                    pending.result()
                for k, offset in enumerate(self._regions(index, lo, hi)):
                    self._io("read", _read_file, index, tile[k * n:(k + 1) * n], offset)
                return tile
            except BaseException:
                self._tiles.put(tile)
                raise
        return self._submit(self._readers, index, run)

    def write(self, index: int, lo: int, hi: int, tile: Tensor) -> Future:
        """Writes an updated piece's master, m and v from its tile, and the master cast into the compute-dtype copy,
        behind the caller; the tile returns to the pool when all are on the disk."""
        n = hi - lo

        def run() -> None:
            try:
                for k, offset in enumerate(self._regions(index, lo, hi)[:3]):
                    self._io("write", _write_file, index, tile[k * n:(k + 1) * n], offset)
                self._write_copy(index, tile[:n], lo)
            finally:
                self._tiles.put(tile)
        return self._track(index, self._submit(self._writers, index, run))

    def take(self, future: Future) -> Tensor:
        """The tile of a `read` (or `read_copy`), waiting for it (the wait is counted in the stats)."""
        return self._waited(future.result)

    def release(self, tile: Tensor) -> None:
        """Returns an optimizer tile that was read but will not be written (an update that failed midway)."""
        self._tiles.put(tile)

    # the streamed copy
    def read_copy(self, index: int, after: Future | None = None) -> Future:
        """Starts reading a unit's compute-dtype copy into a free pinned copy tile, once `after` (the unit's
        pending update) is done; the future's result is the tile. Blocks while every copy tile is in use."""
        tile = self._waited(self._copies.get)
        s = self.shapes[index]

        out: Future = Future()

        def run() -> None:
            try:
                if after is not None:
                    after.result()  # done by now: raises the update's error
                self._after_writes(index)
                self._io("read", _read_file, index, tile[:s.numel], s.copy_offset)
                out.set_result(tile)
            except BaseException as e:
                self._copies.put(tile)
                out.set_exception(e)

        # queued on the drive's reader only once the update is done: a reader never blocks on the optimizer (whose
        # own reads queue behind it on the same thread)
        if after is None:
            self._submit(self._readers, index, run)
        else:
            after.add_done_callback(lambda _: self._submit(self._readers, index, run))
        return out

    def release_copy(self, tile: Tensor, done: torch.cuda.Event | None = None) -> None:
        """Returns a copy tile once `done` (the device's copy out of it) has happened."""
        if done is None:
            self._copies.put(tile)
        else:
            self._release.submit(lambda: (done.synchronize(), self._copies.put(tile)))

    # the gradient
    def grad_tile(self) -> Tensor:
        """A free pinned fp32 tile for one unit's gradient (blocks while all are in use)."""
        return self._waited(self._grads.get)

    def write_grad(self, index: int, tile: Tensor) -> Future:
        """Writes a unit's gradient from the start of `tile` (a whole one of `grad_tile`) behind the caller; the tile
        returns to the pool afterwards."""
        s = self.shapes[index]

        def run() -> None:
            try:
                self._io("write", _write_file, index, tile[:s.tile - s.state], s.state * 4)
            finally:
                self._grads.put(tile)
        return self._track(index, self._submit(self._writers, index, run))

    def add_grad(self, index: int, add) -> Future:
        """A later micro-batch's gradients: reads the unit's gradient into a gradient tile, calls `add(grad)` (on
        the calling thread) and writes the sum behind."""
        tile = self.grad_tile()
        s = self.shapes[index]
        grad = tile[:s.tile - s.state]
        try:
            self._after_writes(index)
            self._io("read", _read_file, index, grad, s.state * 4)
            add(grad)  # the gradient at the tile's start
        except BaseException:
            self._grads.put(tile)
            raise
        return self.write_grad(index, tile)

    def _write_copy(self, index: int, master: Tensor, start: int = 0) -> None:
        """Casts fp32 `master` (the unit's elements from `start`) in pieces into the writer's scratch and writes
        them into the copy region."""
        s, scratch = self.shapes[index], self._cast_scratch[self._where[index]]
        for lo in range(0, master.numel(), CAST_PIECE):
            piece = scratch[:min(CAST_PIECE, master.numel() - lo)]
            piece.copy_(master[lo:lo + piece.numel()])
            self._io("write", _write_file, index, piece, s.copy_offset + (start + lo) * self._cb)

    def _track(self, index: int, future: Future) -> Future:
        with self._lock:
            self._writes[index] = future
        return future

    def _waited(self, fn):
        start = time.perf_counter()
        out = fn()
        self.stats.wait_s += time.perf_counter() - start
        return out

    def _io(self, kind: str, io, index: int, t: Tensor, offset: int) -> None:
        """Moves `t` between it and a unit's file at byte `offset`, adding the bytes and seconds to the stats."""
        start = time.perf_counter()
        direct = io(self.path(index), t, offset)
        with self._lock:
            self.stats.add(kind, str(self.dirs[self._where[index]]), t.nbytes, time.perf_counter() - start, direct)

    def flush(self) -> None:
        """Waits for every write behind; raises the first write error."""
        for index, future in list(self._writes.items()):
            future.result()
            with self._lock:
                if self._writes.get(index) is future:
                    del self._writes[index]

    def reset_stats(self) -> IOStats:
        stats, self.stats = self.stats, IOStats()
        return stats

    # ---- synchronous access (setup, checkpoints, imports) ----
    def load(self, index: int) -> Tensor:
        """A unit's state as a fresh [master | m | v] tensor."""
        self.flush()
        out = torch.empty(self.shapes[index].state, dtype=torch.float32)
        _read_file(self.path(index), out)
        return out

    def load_grad(self, index: int) -> Tensor:
        """A unit's gradient as a fresh fp32 tensor."""
        self.flush()
        s = self.shapes[index]
        out = torch.empty(s.tile - s.state, dtype=torch.float32)
        _read_file(self.path(index), out, s.state * 4)
        return out

    def store(self, index: int, state: Tensor) -> None:
        """Writes a unit's [master | m | v] from `state` and its streamed copy from the master."""
        self.flush()
        _write_file(self.path(index), state)
        self._write_copy(index, state[:self.shapes[index].master])

    def load_copy(self, index: int, start: int, numel: int) -> Tensor:
        """`numel` elements of a unit's compute-dtype copy from element `start`."""
        self.flush()
        out = torch.empty(numel, dtype=self.copy_dtype)
        _read_file(self.path(index), out, self.shapes[index].copy_offset + start * self._cb)
        return out

    def store_copy(self, index: int, start: int, values: Tensor) -> None:
        """Writes compute-dtype `values` into a unit's copy from element `start` (frozen parameters kept there
        alone)."""
        self.flush()
        _write_file(self.path(index), values.to(self.copy_dtype).contiguous(),
                    self.shapes[index].copy_offset + start * self._cb)

    def load_master(self, index: int, offset: int, numel: int) -> Tensor:
        """`numel` fp32 elements of a unit's master from element `offset` (one tensor, for a state dict)."""
        self.flush()
        out = torch.empty(numel, dtype=torch.float32)
        _read_file(self.path(index), out, offset * 4)
        return out

    def store_master(self, index: int, offset: int, values: Tensor) -> None:
        """Writes fp32 `values` into a unit's master at element `offset` (imports write tensor by tensor) and
        into its streamed copy."""
        self.flush()
        _write_file(self.path(index), values, offset * 4)
        _write_file(self.path(index), values.to(self.copy_dtype), self.shapes[index].copy_offset + offset * self._cb)
