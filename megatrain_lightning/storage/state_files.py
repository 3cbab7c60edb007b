"""Whole-buffer reads and writes of the file-backed tier's state files, with the errors a failing drive gives.

A request whose buffer address, file offset and length are all multiples of ALIGN goes through O_DIRECT: straight
between the drive and the buffer, no copy through the page cache and no cache to flush or drop afterwards (the
tier's buffers start on such a boundary: host_memory.pinned_empty; the shapes of real models make most requests
aligned). Others, and every request on a filesystem that refuses O_DIRECT (tmpfs), are buffered: flushed with
fdatasync and dropped from the page cache, so the RAM budget holds either way.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from megatrain_lightning.storage.host_memory import ALIGN_BYTES as ALIGN

_no_direct: set[str] = set()  # directories whose filesystem refused O_DIRECT
_lock = threading.Lock()


class DriveError(OSError):
    """A drive of the file-backed tier failed during the run (full, a file vanished or truncated): the message names
    the file. Not a FileNotFoundError, so the entry point tells it from a bad input path."""


def _bytes(t: Tensor) -> memoryview:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise DriveError(errno.ENOENT, f"the state file {path} of storage=nvme vanished during the run "
                         "(deleted, or its drive unmounted)") from None
    except OSError as e:
        if e.errno == errno.EINVAL:  # O_DIRECT refused: the caller falls back to buffered I/O
            raise
        raise DriveError(e.errno, f"cannot open the state file {path} of storage=nvme: {e.strerror}") from None


def _direct_fd(path: Path, flags: int, t: Tensor, offset: int) -> int | None:
    """A file descriptor opened with O_DIRECT when the request qualifies and the filesystem takes it, else None."""
    if not hasattr(os, "O_DIRECT") or t.data_ptr() % ALIGN or offset % ALIGN or t.nbytes % ALIGN or not t.nbytes:
        return None
    where = str(path.parent)
    if where in _no_direct:
        return None
    try:
        return _open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        with _lock:
            _no_direct.add(where)  # e.g. tmpfs: buffered from now on
        return None


def _open_for(path: Path, flags: int, t: Tensor, offset: int) -> tuple[int, bool]:
    """A file descriptor for moving `t` at `offset`, and whether it is O_DIRECT."""
    fd = _direct_fd(path, flags, t, offset)
    return (fd, True) if fd is not None else (_open(path, flags), False)


def read_file(path: Path, out: Tensor, offset: int = 0) -> bool:
    """Fills `out` from the file at byte `offset`; returns whether the read went through O_DIRECT."""
    view, want = _bytes(out), out.nbytes
    fd, direct = _open_for(path, os.O_RDONLY, out, offset)
    try:
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [view[got:]], offset + got)
            except OSError as e:
                raise DriveError(e.errno, f"reading the state file {path} of storage=nvme failed: {e.strerror}") \
                    from e
            if n == 0:
                raise DriveError(errno.EIO, f"the state file {path} is truncated: it ends {want - got} bytes short "
                                 "of what the run wrote there")
            got += n
        if not direct:
            os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return direct


def write_file(path: Path, data: Tensor, offset: int = 0) -> bool:
    """Writes `data` into the file at byte `offset` (never creating it: a file that vanished is an error, not a
    fresh start); returns whether the write went through O_DIRECT."""
    view, want = _bytes(data), data.nbytes
    fd, direct = _open_for(path, os.O_WRONLY, data, offset)
    try:
        done = 0
        while done < want:
            done += os.pwritev(fd, [view[done:]], offset + done)
        if not direct:
            os.fdatasync(fd)  # on the disk, so the pages can leave the cache (and a full disk shows up here)
            os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DriveError(errno.ENOSPC, f"the disk of storage.nvme_dir is full while writing {path}") from e
        if isinstance(e, DriveError):
            raise
        raise DriveError(e.errno, f"writing the state file {path} of storage=nvme failed: {e.strerror}") from e
    finally:
        os.close(fd)
    return direct
