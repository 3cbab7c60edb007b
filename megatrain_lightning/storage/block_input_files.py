"""Block inputs kept for backward in files on the file-backed tier's drives, for batches whose layer-boundary states
neither host RAM nor device memory holds (`offload_checkpoints="disk"`, or the CUDA default when RAM is short under
storage=nvme).

Each block input is cut into pieces of schedule.BLOCK_INPUT_PIECE bytes, striped over the `nvme_dir` directories
(a writer and a reader thread each, so the drives work at once) through a pool of schedule.BLOCK_INPUT_TILES pinned
host tiles: RAM holds those tiles whatever the batch. Forward hands an input over as it is produced and goes on;
the device keeps it until its pieces are in their files, at most schedule.BLOCK_INPUTS_IN_FLIGHT inputs at a time
(`put` then waits for the oldest). Backward asks for a block's input one block ahead (`fetch`) and waits for it
when it starts the block (`take`). Runs on the CPU too (the "device" is then the host, the copies plain ones).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from megatrain_lightning import schedule as S
from megatrain_lightning.storage.nvme import TilePool, working_dirs
from megatrain_lightning.storage.state_files import DriveError, read_file, write_file


class BlockInputFiles:
    def __init__(self, roots: Sequence[str | Path], device: torch.device, piece_bytes: int | None = None,
                 tiles: int | None = None) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        for r in roots:
            try:
                Path(r).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OSError(e.errno, f"cannot create storage.nvme_dir {r}: {e.strerror}") from e
        self.dirs = working_dirs(self, [Path(r) for r in roots], "megatrain-inputs-", "the spilled block inputs")
        self.paths = [d / "block_inputs.bin" for d in self.dirs]
        self.piece_bytes = piece_bytes or S.BLOCK_INPUT_PIECE
        self.n_tiles = tiles or S.BLOCK_INPUT_TILES
        self._tiles: TilePool | None = None  # made at the first begin (the dtype is the block input's)
        self._writers = [ThreadPoolExecutor(1, thread_name_prefix=f"megatrain-inputs{k}-write")
                         for k in range(len(self.dirs))]
        self._readers = [ThreadPoolExecutor(1, thread_name_prefix=f"megatrain-inputs{k}-read")
                         for k in range(len(self.dirs))]
        # hands pieces to the drives in order (copies out of / into the device, tile by tile)
        self._feeder = ThreadPoolExecutor(1, thread_name_prefix="megatrain-inputs-feed")
        self._reserved = [0] * len(self.dirs)  # bytes each file is reserved for
        self._pending: list[Future] = []  # inputs of this forward still on their way to the drives
        self.saved: list[tuple[Future, torch.Size]] = []
        self.bytes_written = self.bytes_read = 0
        self._counted = (0, 0)  # the totals at the last take_counts
        self._lock = threading.Lock()
        self._dtype: torch.dtype | None = None
        if self.cuda:
            self._d2h, self._h2d = torch.cuda.Stream(device), torch.cuda.Stream(device)

    @property
    def nbytes(self) -> int:
        """RAM this holds: its tiles."""
        return self._tiles.nbytes if self._tiles is not None else 0

    def _slots(self, numel: int, element_size: int) -> int:
        return math.ceil(numel * element_size / self.piece_bytes)  # pieces per block input

    def begin(self, x: Tensor, n_inputs: int) -> None:
        """Before a training forward that keeps `n_inputs` block inputs shaped like `x`: files reserved for them
        (a drive too small is named now, not mid-step)."""
        self.flush()
        self.saved = []
        if self._tiles is None or self._dtype != x.dtype:
            numel = self.piece_bytes // x.element_size()
            self._tiles, self._dtype = TilePool(self.n_tiles, numel, x.dtype, self.cuda), x.dtype
        pieces = n_inputs * self._slots(x.numel(), x.element_size())
        for k, path in enumerate(self.paths):
            need = math.ceil((pieces - k) / len(self.paths)) * self.piece_bytes if pieces > k else 0
            if need > self._reserved[k]:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.posix_fallocate(fd, 0, need)
                except OSError as e:
                    raise DriveError(e.errno, f"cannot reserve {need / 1e9:.2f} GB for the block inputs in {path}: "
                                     f"{e.strerror}") from None
                finally:
                    os.close(fd)
                self._reserved[k] = need

    def _where(self, b: int, p: int, per_input: int) -> tuple[int, int]:
        """(directory, byte offset in its file) of piece p of block input b."""
        g = b * per_input + p
        return g % len(self.paths), (g // len(self.paths)) * self.piece_bytes

    def put(self, x: Tensor) -> None:
        """Hands block input len(saved) over to the drives (the device keeps `x` until it is written)."""
        b, flat = len(self.saved), x.detach().reshape(-1)
        per_input = self._slots(flat.numel(), flat.element_size())
        produced = None
        if self.cuda:
            produced = torch.cuda.Event()
            produced.record(torch.cuda.current_stream(self.device))
        done = self._feeder.submit(self._write_out, b, flat, per_input, produced)
        self.saved.append((done, x.shape))
        self._pending.append(done)
        if len(self._pending) > S.BLOCK_INPUTS_IN_FLIGHT:
            self._pending.pop(0).result()

    def _write_out(self, b: int, flat: Tensor, per_input: int, produced) -> None:
        writes = []
        step = self.piece_bytes // flat.element_size()
        if produced is not None:
            self._d2h.wait_event(produced)
        for p in range(per_input):
            part = flat[p * step:(p + 1) * step]
            tile = self._tiles.get()
            if self.cuda:
                with torch.cuda.stream(self._d2h):
                    tile[:part.numel()].copy_(part, non_blocking=True)
                self._d2h.synchronize()
            else:
                tile[:part.numel()].copy_(part)
            k, offset = self._where(b, p, per_input)
            writes.append(self._writers[k].submit(self._write_piece, k, tile, part.numel(), offset))
        for w in writes:  # the input's device memory is released once this returns (the job holds `flat`)
            w.result()

    def _write_piece(self, k: int, tile: Tensor, numel: int, offset: int) -> None:
        try:
            write_file(self.paths[k], tile[:numel], offset)
            with self._lock:
                self.bytes_written += tile[:numel].nbytes
        finally:
            self._tiles.put(tile)

    def fetch(self, b: int) -> Future:
        """Starts bringing block input b back to the device; `take` waits for it."""
        written, shape = self.saved[b]
        x = torch.empty(shape, dtype=self._dtype, device=self.device)
        allocated = None
        if self.cuda:
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(self.device))
        return self._feeder.submit(self._read_in, b, x, written, allocated)

    def _read_in(self, b: int, x: Tensor, written: Future, allocated) -> Tensor:
        written.result()  # raises the write's error, if any
        flat = x.view(-1)
        step = self.piece_bytes // flat.element_size()
        per_input = self._slots(flat.numel(), flat.element_size())
        if allocated is not None:
            self._h2d.wait_event(allocated)  # x's memory may have been in use by compute until it was allocated
        reads = []
        for p in range(per_input):
            part = flat[p * step:(p + 1) * step]
            tile = self._tiles.get()
            k, offset = self._where(b, p, per_input)
            reads.append(self._readers[k].submit(self._read_piece, k, tile, part, offset))
        for r in reads:
            r.result()
        return x

    def _read_piece(self, k: int, tile: Tensor, part: Tensor, offset: int) -> None:
        try:
            read_file(self.paths[k], tile[:part.numel()], offset)
            if self.cuda:
                with torch.cuda.stream(self._h2d):
                    part.copy_(tile[:part.numel()], non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._h2d)
                done.synchronize()  # the tile goes back to the pool only once the device has its piece
            else:
                part.copy_(tile[:part.numel()])
            with self._lock:
                self.bytes_read += part.nbytes
        finally:
            self._tiles.put(tile)

    def take(self, fetched: Future) -> Tensor:
        """The block input of a `fetch`, once it is on the device (its copies have completed)."""
        return fetched.result()  # its copies completed (synchronized) before the future did: no stream to record

    def take_counts(self) -> dict[str, float]:
        """GB written and read back since the last call (the strategy logs them per step)."""
        with self._lock:
            out = {"block_inputs_written_GB": (self.bytes_written - self._counted[0]) / 1e9,
                   "block_inputs_read_GB": (self.bytes_read - self._counted[1]) / 1e9}
            self._counted = (self.bytes_written, self.bytes_read)
        return out

    def flush(self) -> None:
        """Waits for the inputs still being written (raises a drive's error)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

