"""Durable state: storage=nvme equals storage=ram bit for bit; a resumed run equals a straight one bit for bit;
a save killed midway leaves the previous checkpoint usable; damaged or foreign checkpoints fail clearly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning import schedule as S
from megatrain_lightning.config import Config
from tests import resume_run
from tests.helpers import kept_budget_GiB, make_model, nvme_budget_GiB
from tests.resume_run import TOTAL_STEPS

ROOT = Path(__file__).resolve().parents[1]


NVME = dict(storage="nvme", ram_budget_GiB=nvme_budget_GiB(make_model("tiny"), 3))  # 3 of tiny's 4 layers on disk
# the "device" (the CPU here) keeps and updates the state of the embedding/head and the first 2 layers
KEPT = dict(device_state_GiB=kept_budget_GiB(Config.from_name("tiny"), 2))
# every trunk layer's state (master, moments, gradient, streamed copy) in files, striped over three directories
DISK = dict(storage="nvme", ram_budget_GiB=nvme_budget_GiB(make_model("tiny"), 4), drives=3)
MODES = {"ram": {}, "nvme": NVME, "disk": DISK, "kept": KEPT}


def _result(out: Path) -> tuple[list[float], dict[str, torch.Tensor], int]:
    meta = json.loads((out / "losses.json").read_text())
    return meta["losses"], load_file(out / "state.safetensors"), meta["global_step"]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _subprocess(args: dict, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.resume_run", json.dumps(args)], cwd=ROOT, env=env, **popen)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(resume_run.token_file(tmp_path_factory.mktemp("data") / "tokens.npy"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict[str, tuple]:
    """Six steps without interruption, once per storage mode."""
    out = {}
    for name, kw in MODES.items():
        d = tmp_path_factory.mktemp(f"straight-{name}")
        resume_run.run(data, str(d), TOTAL_STEPS, **kw)
        out[name] = _result(d)
    return out


@pytest.mark.parametrize("mode", ["nvme", "disk"])
def test_nvme_equals_ram_bit_for_bit(straight, mode):
    """Accumulation 2 and clipping 1.0 over six steps: some layers on disk, or every one (striped over 3 drives)."""
    losses_ram, state_ram, _ = straight["ram"]
    losses_nvme, state_nvme, _ = straight[mode]
    assert losses_nvme == losses_ram and len(losses_ram) == TOTAL_STEPS * resume_run.ACCUMULATE
    _assert_same_state(state_nvme, state_ram)
    assert state_ram["exp_avg/model.model.layers.0.mlp.up_proj.weight"].abs().sum() > 0  # the moments moved


def test_nvme_bf16_equals_ram(data, tmp_path):
    results = []
    for name, kw in (("ram", {}), ("nvme", NVME)):
        resume_run.run(data, str(tmp_path / name), 3, precision="bf16-mixed", **kw)
        results.append(_result(tmp_path / name))
    assert results[0][0] == results[1][0]
    _assert_same_state(results[0][1], results[1][1])


def test_nvme_budget_too_small_is_an_error(data, tmp_path):
    with pytest.raises(ValueError, match=r"storage.ram_budget_GiB: 1e-06 GiB cannot hold even the state that stays "
                                         r"in RAM"):
        resume_run.run(data, str(tmp_path), 1, storage="nvme", ram_budget_GiB=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_in_a_new_process_is_exact(mode, data, straight, tmp_path):
    """3 steps + checkpoint, then a new process resumes and runs 3 more: the same losses, weights and moments as
    6 steps straight (data order, LR schedule and Adam step counts included; the checkpoint falls mid-epoch).
    kept: the checkpoint is written from state updated on the device, and the resumed run copies it back in."""
    kw = MODES[mode]
    ckpt_dir = tmp_path / "ckpt"
    want_losses, want_state, _ = straight[mode]
    # saving does not disturb training: six steps with a checkpoint after the third equal six without
    resume_run.run(data, str(tmp_path / "first"), TOTAL_STEPS, ckpt_dir=str(ckpt_dir), save_every=3, **kw)
    first_losses, first_state, _ = _result(tmp_path / "first")
    assert first_losses == want_losses
    _assert_same_state(first_state, want_state)
    assert ckpt.resolve(ckpt_dir).name == "epoch=1-step=6.ckpt"  # the directory's newest complete checkpoint
    saved = ckpt_dir / "epoch=0-step=3.ckpt"
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        [ckpt.MANIFEST, ckpt.META, ckpt.MODEL_CONFIG] + [ckpt.unit_file(i) for i in range(5)])

    args = dict(data=data, out_dir=str(tmp_path / "second"), max_steps=TOTAL_STEPS, resume=str(saved), **kw)
    assert _subprocess(args).wait(timeout=300) == 0
    losses, state, step = _result(tmp_path / "second")
    assert step == TOTAL_STEPS
    assert first_losses[:3 * resume_run.ACCUMULATE] + losses == want_losses
    _assert_same_state(state, want_state)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(data, straight, tmp_path):
    """A process killed while writing its second checkpoint: the first stays complete, the partial write is never
    taken for a checkpoint, and resuming from the directory continues exactly."""
    ckpt_dir, marker = tmp_path / "ckpt", tmp_path / "writing"
    script = f"""
import time
from pathlib import Path
from megatrain_lightning.checkpointing import directories as checkpoint
from tests import resume_run
real, calls = checkpoint.write_safetensors, []
def slow(path, *a, **k):  # the second save stops after two unit files, as if the machine died there
    calls.append(path)
    if len(calls) == 7:
        Path({str(marker)!r}).touch()
        time.sleep(600)
    return real(path, *a, **k)
checkpoint.write_safetensors = slow
resume_run.run({data!r}, {str(tmp_path / 'killed')!r}, 4, ckpt_dir={str(ckpt_dir)!r}, save_every=2)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the training process ended before its second save"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    partial = [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1 and not ckpt.is_complete(partial[0])  # the interrupted save, never renamed
    assert ckpt.resolve(ckpt_dir).name == "epoch=0-step=2.ckpt"

    resume_run.run(data, str(tmp_path / "resumed"), TOTAL_STEPS, resume=str(ckpt_dir), ckpt_dir=str(ckpt_dir),
                   save_every=2)
    losses, state, step = _result(tmp_path / "resumed")
    want_losses, want_state, _ = straight["ram"]
    assert step == TOTAL_STEPS and losses == want_losses[2 * resume_run.ACCUMULATE:]
    _assert_same_state(state, want_state)
    # the resumed run's first save removed the partial one of the killed process (and only that)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [f"epoch={e}-step={s}.ckpt" for e, s in
                                                          ((0, 2), (0, 4), (1, 6))]


def test_leftovers_of_dead_runs_are_removed_only_when_ours_and_dead(tmp_path):
    """A SIGKILLed storage=nvme run leaves its private state directory: the next run on the same nvme_dir removes it,
    but not a live run's, nor a directory it did not create."""
    from megatrain_lightning.storage import ownership
    from megatrain_lightning.storage.nvme import NvmeTier

    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("megatrain-dead", dead.pid), ("megatrain-alive", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / ownership.OWNER).write_text(f"{__import__('socket').gethostname()} {pid}")
    (tmp_path / "megatrain-unmarked").mkdir()
    tier = NvmeTier(tmp_path, {0: (8, 24, 32)}, torch.float32)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "megatrain-dead" not in left and {"megatrain-alive", "megatrain-unmarked", tier.dir.name} <= set(left)


def test_a_second_run_on_the_same_checkpoint_directory_is_refused(data, tmp_path):
    from megatrain_lightning.errors import UserError
    from megatrain_lightning.storage.ownership import DirectoryLock

    held = DirectoryLock(tmp_path / "ckpt", "checkpoints")  # another run's, as far as the next one can tell
    with pytest.raises(UserError, match=rf"another run \(host and pid: \S+ {os.getpid()}\) is writing checkpoints "
                                           rf"to {tmp_path / 'ckpt'}"):
        resume_run.run(data, str(tmp_path / "run"), 2, ckpt_dir=str(tmp_path / "ckpt"), save_every=2)
    held.release()
    resume_run.run(data, str(tmp_path / "run"), 2, ckpt_dir=str(tmp_path / "ckpt"), save_every=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=2.ckpt"]  # no lock file left


def test_sigterm_mid_accumulation_finishes_the_step_saves_and_exits_143(data, straight, tmp_path):
    """SIGTERM during the first micro-batch of step 2 (of 2 per step): the step finishes, a checkpoint of step 2 is
    written, the process exits 143 (128 + SIGTERM); resuming from the directory equals the straight run."""
    ckpt_dir = tmp_path / "ckpt"
    args = dict(data=data, out_dir=str(tmp_path / "first"), max_steps=TOTAL_STEPS, ckpt_dir=str(ckpt_dir),
                signal_at_batch=2)
    proc = _subprocess(args, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: saved" in err and "after step 2" in err
    assert [p.name for p in ckpt.candidates(ckpt_dir)] == ["interrupted-step=2.ckpt"]
    resume_run.run(data, str(tmp_path / "second"), TOTAL_STEPS, resume=str(ckpt_dir))
    want_losses, want_state, _ = straight["ram"]
    losses, state, step = _result(tmp_path / "second")
    assert step == TOTAL_STEPS and losses == want_losses[2 * resume_run.ACCUMULATE:]
    _assert_same_state(state, want_state)


# ---- errors that name the problem ----
@pytest.fixture(scope="module")
def saved(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("saved")
    resume_run.run(data, str(d / "run"), 2, ckpt_dir=str(d / "ckpt"), save_every=2)
    return ckpt.resolve(d / "ckpt")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resume(data: str, path: Path, tmp_path: Path, **kw) -> None:
    resume_run.run(data, str(tmp_path / "out"), 3, resume=str(path), **kw)


def test_truncated_shard_is_named(saved, data, tmp_path):
    bad = _copy(saved, tmp_path / "bad.ckpt")
    unit = bad / ckpt.unit_file(2)
    unit.write_bytes(unit.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match=f"truncated or corrupted safetensors file .*{unit.name}"):
        _resume(data, bad, tmp_path)


def test_corrupted_header_is_named(saved, data, tmp_path):
    bad = _copy(saved, tmp_path / "bad.ckpt")
    unit = bad / ckpt.unit_file(1)
    raw = bytearray(unit.read_bytes())
    raw[8:20] = b"\x00garbage!!\xff\xfe"
    unit.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=f"corrupted safetensors file .*{unit.name}"):
        _resume(data, bad, tmp_path)


def test_missing_file_is_named(saved, data, tmp_path):
    bad = _copy(saved, tmp_path / "bad.ckpt")
    (bad / ckpt.unit_file(3)).unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint file missing: .*{ckpt.unit_file(3)}"):
        _resume(data, bad, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        _resume(data, tmp_path / "nowhere", tmp_path)


def test_checkpoint_of_another_shape_lists_the_tensors(saved, tmp_path):
    import lightning as L

    from megatrain_lightning import MegatrainStrategy
    from tests.helpers import RecordingLM, lm_kwargs, loader, make_batches

    config = Config.from_name("tiny", intermediate_size=128)
    trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ckpt.CheckpointError, match=r"another model shape(.|\n)*mlp.up_proj.weight: checkpoint "
                                                   r"\(176, 64\) vs model \(128, 64\)"):
        trainer.fit(RecordingLM(config, **lm_kwargs(3)), train_dataloaders=loader(make_batches(config, 4)),
                    ckpt_path=saved)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(saved, data, tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    good = _copy(saved, ckpt_dir / saved.name)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    writes = []

    def full(f, data):
        writes.append(1)
        if len(writes) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    monkeypatch.setattr(ckpt, "_write", full)
    with pytest.raises(OSError, match="disk filled up while saving checkpoint .*earlier checkpoints are intact"):
        resume_run.run(data, str(tmp_path / "run"), 4, ckpt_dir=str(ckpt_dir), save_every=2)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [saved.name]  # no partial directory left behind
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match="not enough disk space for checkpoint"):
        resume_run.run(data, str(tmp_path / "run2"), 2, ckpt_dir=str(tmp_path / "c2"), save_every=2)


def test_overwriting_a_checkpoint_replaces_it_whole(saved, tmp_path):
    """`last.ckpt`-style names are rewritten: the new directory replaces the old only once it is complete."""
    from megatrain_lightning.storage.store import HostStore, Layout

    store = HostStore([Layout([("w", (3, 2))]), Layout([("b", (2,))])], ["layers.0.", ""], torch.float32, pin=False)
    target = tmp_path / "last.ckpt"
    for value in (1.0, 2.0):
        store.units[0].master.fill_(value)
        ckpt.save(target, store, {"global_step": int(value)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(load_file(target / ckpt.unit_file(0))["layers.0.w"], torch.full((3, 2), 2.0))


# ---- checkpoints of earlier versions ----
STORED = ROOT / "tests" / "data" / "checkpoint-v2"
STORED_MODEL = dict(n_layer=2, hidden_size=16, n_head=2, n_kv_head=1, intermediate_size=32)


def test_a_checkpoint_written_by_an_earlier_version_resumes_exactly(data, tmp_path):
    """tests/data/checkpoint-v2/step2 was written at commit 11e1685 (checkpoint format version 2), before the
    package was restructured: resume_run with STORED_MODEL, saved at step 2 of a 4-step run whose losses and final
    state are stored beside it. Today's code resumes it to the same last two steps and the same state."""
    from tests.helpers import assert_adam_state_close, lm_kwargs

    resume_run.run(data, str(tmp_path / "out"), 4, resume=str(STORED / "step2"), model=STORED_MODEL)
    losses, state, step = _result(tmp_path / "out")
    want = json.loads((STORED / "straight_losses.json").read_text())["losses"]
    assert step == 4 and len(losses) == 2 * resume_run.ACCUMULATE
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want[2 * resume_run.ACCUMULATE:]), rtol=1e-5, atol=0)
    assert_adam_state_close(state, load_file(STORED / "straight_state.safetensors"), 1e-5, lm_kwargs(1)["lr"])
