"""The SSD-first tier (storage=nvme with every trunk layer in files): exact, bounded in RAM whatever the depth, and
loud when a drive fails. Bit-for-bit equality with accumulation, clipping and resume is in test_checkpoint.py
(modes "nvme" and "disk")."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from megatrain_lightning.storage import nvme
from megatrain_lightning import schedule as S
from tests.helpers import make_batches, make_model, megatrain_run, nvme_budget_GiB

ROOT = Path(__file__).resolve().parents[1]


def _all_on_disk(model, dirs) -> dict:
    return dict(storage="nvme", ram_budget_GiB=nvme_budget_GiB(model, model.config.n_layer), nvme_dir=dirs)


def test_pieces_group_whole_tensors():
    assert nvme.pieces([4, 4, 10, 1, 1], at_least=8) == [(0, 8), (8, 18), (18, 20)]
    assert nvme.pieces([3], at_least=8) == [(0, 3)] and nvme.pieces([], at_least=8) == []


@pytest.mark.parametrize("clip,piece", [(None, None), (1.0, None), (1.0, 5000)])
def test_every_layer_on_disk_equals_ram_bit_for_bit(clip, piece, tmp_path, monkeypatch):
    """Without clipping each layer's update starts as its gradient lands (read from its file, written back behind
    the backward); with it, updates run in forward order behind the next step's forward. Both equal storage=ram
    exactly, and the layers' files are spread over the directories. `piece`: the update reads, updates and writes
    a layer a few tensors at a time (tiny's layers are one piece by default)."""
    if piece is not None:
        monkeypatch.setattr(S, "NVME_PIECE", piece)
        assert len(nvme.pieces([e.numel() for e in make_model("tiny").model.layers[0].parameters()])) > 3
    model = make_model("tiny")
    batches = make_batches(model.config, 8)
    want = megatrain_run(model, batches, 4, 2, clip, record_grads=False)
    dirs = [tmp_path / f"drive{k}" for k in range(3)]
    got = megatrain_run(model, batches, 4, 2, clip, record_grads=False, **_all_on_disk(model, dirs))
    assert got[0] == want[0]
    for name, w in want[2].items():
        assert torch.equal(got[2][name], w), name
    store = got[3].store
    assert all(u.on_disk for u in store.units[:-1]) and store.units[0].tile is None  # nothing of theirs in RAM
    assert [len(list(d.glob("megatrain-*/unit_*.bin"))) for d in dirs] == [2, 1, 1]  # layers 0..3 round-robin
    assert got[3].updater.eager_steps == (4 if clip is None else 0)


# Every tensor a multiple of 1024 elements, as in real models (hidden 1024): the tier's requests are aligned
ALIGNED = dict(n_layer=2, hidden_size=1024, n_head=8, n_kv_head=4, intermediate_size=2048)


@pytest.mark.parametrize("refuse", [False, True])
def test_aligned_requests_go_through_o_direct(refuse, tmp_path, monkeypatch):
    """Aligned buffers, offsets and lengths read and write their files with O_DIRECT (no page-cache copy), others
    buffered; a filesystem that refuses O_DIRECT (`refuse`: EINVAL, as tmpfs) gets buffered I/O. Either way the
    run equals storage=ram bit for bit."""
    from megatrain_lightning.storage import state_files
    monkeypatch.setattr(state_files, "_no_direct", set())
    if refuse:
        real = os.open

        def no_direct(path, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(path, flags, *args)
        monkeypatch.setattr(state_files.os, "open", no_direct)
    model = make_model("tiny", **ALIGNED)
    batches = make_batches(model.config, 3)
    want = megatrain_run(model, batches, 3, 1, 1.0, record_grads=False)
    got = megatrain_run(model, batches, 3, 1, 1.0, record_grads=False, **_all_on_disk(model, [tmp_path / "d0"]))
    assert got[0] == want[0]
    for name, w in want[2].items():
        assert torch.equal(got[2][name], w), name
    shares = [r["nvme_direct_share"] for r in got[3].nvme_log]
    if refuse:
        assert shares == [0.0] * len(shares)
    else:  # the state, gradients and copies of both layers: every request but none
        assert min(shares) > 0.99, shares


_RSS_SCRIPT = """
import json, sys, threading, time, gc
import torch
import lightning as L
from tests.helpers import RecordingLM, lm_kwargs, loader, make_batches, make_model, nvme_budget_GiB
from megatrain_lightning import MegatrainStrategy

n_layer, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
shape = dict(n_layer=n_layer, hidden_size=512, n_head=8, n_kv_head=8, intermediate_size=1536)
model = make_model("tiny", **shape)
budget = nvme_budget_GiB(model, n_layer) if mode == "disk" else None
config, batches = model.config, make_batches(model.config, 2)
del model
gc.collect()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

torch.manual_seed(0)
lm = RecordingLM(config, **lm_kwargs(2))  # built on the meta device: the strategy materializes layer by layer
kw = dict(storage="nvme", ram_budget_GiB=budget, nvme_dir=out + "/nvme") if mode == "disk" else {}
strategy = MegatrainStrategy(**kw)
trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=2, gradient_clip_val=1.0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0)
base = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
trainer.fit(lm, train_dataloaders=loader(batches))
running[0] = False
thread.join()
store = strategy.store
window = store.nvme.nbytes if store.nvme else 0
resident = store.units[-1].tile.nbytes
layer = store.units[0].layout.tile_numel * 4
print(json.dumps(dict(grown=peak[0] - base, window=window, resident=resident, layer=layer)))
"""


def _grown(n_layer: int, mode: str, tmp_path: Path) -> dict:
    # glibc's malloc serves allocations below its (growing) mmap threshold, up to 32 MiB, from heaps that keep
    # freed memory in the RSS; this model's layers are ~14 MB, a real model's are GBs and always mmap'd (and given
    # back on free): a fixed 1 MiB threshold makes the small model measure as a big one would
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n_layer), str(tmp_path), mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ram_stays_within_the_window_whatever_the_depth(tmp_path):
    """Measured RSS during fit minus the process's before it: with every layer in files it is the tier's window, the
    embedding/head state and the run's own working memory, the same at 4 layers and at 16 (12 layers more of state
    in RAM would be 12 x 16 bytes per parameter: ~650 MB here)."""
    shallow, deep = _grown(4, "disk", tmp_path / "a"), _grown(16, "disk", tmp_path / "b")
    assert shallow["window"] == deep["window"]  # the placement rule's window: a few layer-sized tiles
    assert abs(deep["grown"] - shallow["grown"]) < deep["layer"], (shallow, deep)
    assert deep["grown"] < deep["window"] + deep["resident"] + 200e6, deep
    # the same 16 layers in RAM: the measurement sees state when it is there (16 layers' tiles against a window of
    # ~6 layers' worth: ~10 layers more; 6 leaves room for the allocator's noise)
    ram = _grown(16, "ram", tmp_path / "c")
    assert ram["grown"] > deep["grown"] + 6 * deep["layer"], (ram, deep)


class _Break(L.Callback):
    """After the first step: does something to a file-backed layer's file or drive."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != 1 or self.how == "done":
            return
        tier = trainer.strategy.store.nvme
        tier.flush()
        path = tier.path(1)
        if self.how == "vanish":
            path.unlink()
        elif self.how == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        elif self.how == "full":
            def full(fd, buffers, offset):  # the drives are out of space from now on
                raise OSError(errno.ENOSPC, "No space left on device")
            nvme.os.pwritev = full  # the test's monkeypatch puts the real one back
        self.how = "done"


@pytest.mark.parametrize("how,match", [
    ("vanish", r"the state file .*unit_00001\.bin of storage=nvme vanished during the run"),
    ("truncate", r"the state file .*unit_00001\.bin is truncated"),
    ("full", r"the disk of storage\.nvme_dir is full while writing .*unit_0000\d\.bin"),
])
def test_a_failing_drive_stops_the_run_naming_the_file(how, match, tmp_path, monkeypatch):
    monkeypatch.setattr(nvme.os, "pwritev", os.pwritev)  # restored after the test, whatever _Break does
    model = make_model("tiny")
    lm_batches = make_batches(model.config, 6)
    with pytest.raises(OSError, match=match):
        megatrain_run(model, lm_batches, 3, 1, 1.0, record_grads=False, callbacks=[_Break(how)],
                      **_all_on_disk(model, [tmp_path / "d0", tmp_path / "d1"]))


def test_a_drive_too_small_is_refused_before_training(tmp_path, monkeypatch):
    """The files are sized in full before the first step: a drive that cannot hold its share is named then."""
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nvme.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match=r"storage\.nvme_dir .*d0 has 1e-06 GB free; the file-backed layers striped "
                                      r"onto it need"):
        nvme.NvmeTier([tmp_path / "d0"], {0: (100, 300, 400)}, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("clip,accumulate", [(1.0, 2), (None, 1)])
def test_cuda_every_layer_on_disk_equals_ram(clip, accumulate, tmp_path):
    """On a GPU the copies come from pinned tiles of the window (released once their H2D ran) and the gradients
    land in pinned tiles before their files: the same numbers as storage=ram on the same GPU, with the same state
    kept on the device (the embedding/head: file-backed layers are never kept there)."""
    model = make_model("tiny")
    batches = make_batches(model.config, 4 * accumulate)
    kw = dict(precision="bf16-mixed", lr=1e-3, device="cuda", record_grads=False)
    want = megatrain_run(model, batches, 4, accumulate, clip, **kw, device_state_GiB=1e-3)
    got = megatrain_run(model, batches, 4, accumulate, clip, **kw, device_state_GiB=1e-3,
                        **_all_on_disk(model, [tmp_path / "d0", tmp_path / "d1"]))
    assert sorted(got[3].engine.device_states.units) == sorted(want[3].engine.device_states.units) == [4]
    assert got[0] == want[0]
    for name, w in want[2].items():
        assert torch.equal(got[2][name], w), name
