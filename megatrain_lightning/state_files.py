"""Whole-buffer reads and writes of the file-backed tier's state files, with the errors a failing drive gives."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from torch import Tensor


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


def read_file(path: Path, out: Tensor, offset: int = 0) -> None:
    view, want = _bytes(out), out.nbytes
    fd = _open(path, os.O_RDONLY)
    try:
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise DriveError(errno.EIO, f"the state file {path} is truncated: it ends {want - got} bytes short "
                                 "of what the run wrote there")
            got += n
        os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_file(path: Path, data: Tensor, offset: int = 0) -> None:
    view, want = _bytes(data), data.nbytes
    fd = _open(path, os.O_WRONLY)  # never O_CREAT: a file that vanished is an error, not a fresh start
    try:
        done = 0
        while done < want:
            done += os.pwritev(fd, [view[done:]], offset + done)
        os.fdatasync(fd)  # on the disk, so the pages can leave the cache (and a full disk shows up here)
        os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DriveError(errno.ENOSPC, f"the disk of storage.nvme_dir is full while writing {path}") from e
        raise
    finally:
        os.close(fd)
