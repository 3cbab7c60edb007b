"""Block inputs spilled to files on the drives (offload_checkpoints="disk", or the CUDA default when RAM is short
under storage=nvme): they come back exactly, so training equals keeping them in memory bit for bit, RAM holds only
the tiles, and a failing drive is named."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from megatrain_lightning import MegatrainStrategy, schedule as S
from megatrain_lightning.errors import UserError
from tests.helpers import make_batches, make_model, megatrain_run, nvme_budget_GiB


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    # tiny's block input (2 x 16 x 64 fp32 = 8 KiB) in 1 KiB pieces: several per input, over both drives, through
    # fewer tiles than pieces
    monkeypatch.setattr(S, "BLOCK_INPUT_PIECE", 1024)
    monkeypatch.setattr(S, "BLOCK_INPUT_TILES", 3)


@pytest.mark.parametrize("k,chunk_tokens,on_disk", [(1, None, 0), (2, 16, 0), (1, 16, 4)])
def test_block_inputs_in_files_equal_keeping_them_bit_for_bit(k, chunk_tokens, on_disk, tmp_path):
    """`on_disk`: trunk layers whose state is in files too (the SSD-first tier whole). Clipping and accumulation 2;
    `chunk_tokens` 16: the batch sweep runs one sequence at a time."""
    model = make_model("tiny")
    batches = make_batches(model.config, 8)
    common = dict(checkpoint_interval=k, chunk_tokens=chunk_tokens)
    want = megatrain_run(model, batches, 4, 2, 1.0, record_grads=False, **common)
    dirs = [tmp_path / "d0", tmp_path / "d1"]
    got = megatrain_run(model, batches, 4, 2, 1.0, record_grads=False, storage="nvme", nvme_dir=dirs,
                        ram_budget_GiB=nvme_budget_GiB(model, on_disk), offload_checkpoints="disk", **common)
    assert got[0] == want[0]
    for name, w in want[2].items():
        assert torch.equal(got[2][name], w), name
    files = got[3].engine.host_checkpoints.files
    n_inputs = model.config.n_layer // k
    assert files.bytes_written == files.bytes_read == 8 * n_inputs * 2 * 16 * 64 * 4  # 8 micro-batches, fp32
    assert [p.stat().st_size for p in files.paths] == [n_inputs * 4 * 1024] * 2  # 8 pieces an input, striped
    assert files.nbytes == 3 * 1024  # RAM: the tiles
    # logged per optimizer step: two micro-batches' inputs out and back
    per_step = 2 * n_inputs * 2 * 16 * 64 * 4 / 1e9
    for rates in got[3].nvme_log:
        assert rates["block_inputs_written_GB"] == pytest.approx(per_step)
        assert rates["block_inputs_read_GB"] == pytest.approx(per_step)
    assert len(got[3].nvme_log) == 4


def test_a_vanished_block_input_file_stops_the_run_naming_it(tmp_path):
    class Vanish(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            files = trainer.strategy.engine.host_checkpoints.files
            files.flush()
            files.paths[1].unlink()

    model = make_model("tiny")
    with pytest.raises(OSError, match=r"the state file .*block_inputs\.bin of storage=nvme vanished during the run"):
        megatrain_run(model, make_batches(model.config, 4), 2, 1, 1.0, record_grads=False, callbacks=[Vanish()],
                      storage="nvme", nvme_dir=[tmp_path / "d0", tmp_path / "d1"], offload_checkpoints="disk")


@pytest.mark.parametrize("kwargs,match", [
    (dict(offload_checkpoints="disk"), r"offload_checkpoints 'disk' writes the block inputs under nvme_dir: it "
                                       r"needs storage='nvme'"),
    (dict(storage="nvme", offload_checkpoints="ssd"), r"offload_checkpoints must be true, false, 'disk' or null "
                                                      r"\(on for CUDA\), got 'ssd'"),
])
def test_bad_offload_checkpoints_is_named(kwargs, match):
    with pytest.raises(UserError, match=match):
        MegatrainStrategy(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("offload", ["disk", None])
def test_cuda_block_inputs_in_files_equal_pinned_host_memory(offload, tmp_path, monkeypatch):
    """On the GPU the pieces cross D2H / H2D through pinned tiles. None (the default) under storage=nvme: RAM "has
    no room" (the margin is set past any machine's RAM), so the block inputs go to the drives, not the device."""
    from megatrain_lightning.engine.block_inputs import HostCheckpoints
    model = make_model("tiny")
    batches = make_batches(model.config, 6)
    common = dict(device="cuda", checkpoint_interval=2, chunk_tokens=16, compile=False)
    want = megatrain_run(model, batches, 3, 2, 1.0, record_grads=False, offload_checkpoints=True, **common)
    monkeypatch.setattr(HostCheckpoints, "RAM_MARGIN", 2**60)
    got = megatrain_run(model, batches, 3, 2, 1.0, record_grads=False, storage="nvme", nvme_dir=[tmp_path / "d0"],
                        offload_checkpoints=offload, **common)
    assert got[0] == want[0]
    for name, w in want[2].items():
        assert torch.equal(got[2][name], w), name
    host = got[3].engine.host_checkpoints
    assert host.on_disk and host.files.bytes_read == host.files.bytes_written > 0


def test_no_spill_files_unless_block_inputs_go_to_the_drives(tmp_path):
    """storage=nvme alone (on the CPU the block inputs stay where the device is): no block-input directory, file or
    thread is made on the drives."""
    model = make_model("tiny")
    got = megatrain_run(model, make_batches(model.config, 2), 2, 1, 1.0, record_grads=False, storage="nvme",
                        nvme_dir=[tmp_path / "d0"], ram_budget_GiB=nvme_budget_GiB(model, 2))
    assert got[3].engine.host_checkpoints is None
    assert not list((tmp_path / "d0").glob("megatrain-inputs-*"))
