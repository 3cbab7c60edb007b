"""train.py's one error path: every mistake a user can make in its arguments or files ends with exit status 2 and
one line naming the field or file (no traceback); values with '=', '<' or '|' are taken as written."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the entry point, run in this process)


@pytest.fixture
def files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the sky is blue"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "broken.jsonl").write_text('{"text": "the sky"}\n{"text": "is blue"\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    np.save(tmp_path / "negative.npy", np.array([1, 2, -3] * 400, dtype=np.int32))
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "not_a_dir").write_text("a file where a directory should be")
    (tmp_path / "chat.jsonl").write_text('{"text": "the sky"}\n')
    (tmp_path / "template.json").write_text('{"chat_template": "{{ messages[0].content }}"}')
    np.save(tmp_path / "few.npy", np.arange(734, dtype=np.uint16) % 256)
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    (tmp_path / "big").mkdir()
    big.save(str(tmp_path / "big" / "tokenizer.json"))
    (tmp_path / "hf").mkdir()  # a Hugging Face model's config (no weights needed to be refused)
    from megatrain_lightning.config import Config
    (tmp_path / "hf" / "config.json").write_text(__import__("json").dumps(Config.from_name("tiny").to_hf()))
    return tmp_path


def _cases(d: Path) -> list[tuple[list[str], str]]:
    tok = f"data.tokenizer={d}/tokenizer.json"
    return [
        (["data.micro_batch=0"], r"data\.micro_batch: must be an integer >= 1, got 0"),
        (["trainer.precision=16-mixed"], r"trainer\.precision: must be .*bf16-mixed.*32-true.*got '16-mixed'"),
        (["model=hf"], r"model\.path: required"),
        (["model=nonexistent"], r"^error: model: .*nonexistent"),
        (["trainer.no_such_field=1"], r"trainer\.no_such_field"),
        (["optim.lr=-1"], r"optim\.lr: must be > 0, got -1"),
        (["optim.betas=[0.9]"], r"optim\.betas: must be two numbers"),
        (["trainer.val_check_interval=0"], r"trainer\.val_check_interval: must be an integer >= 1, got 0"),
        (["trainer.max_steps=0"], r"trainer\.max_steps: must be an integer >= 1, got 0"),
        (["trainer.gradient_clip_val=-1"], r"trainer\.gradient_clip_val: must be >= 0"),
        (["keep_checkpoints=0"], r"keep_checkpoints: must be an integer >= 1 \(or -1: all\)"),
        ([f"resume={d}/runs/x/checkpoints/epoch=0-step=20.ckpt"], r"resume: .*epoch=0-step=20\.ckpt does not exist"),
        (["data=tokens", f"data.path={d}/missing.npy"], r"data\.path: .*missing\.npy does not exist"),
        (["data=jsonl", f"data.path={d}/broken.jsonl"], r"data\.tokenizer: required"),
        (["data=jsonl", f"data.path={d}/broken.jsonl", tok], r"broken\.jsonl:2: not valid JSON"),
        (["data=jsonl", f"data.path={d}/latin1.jsonl", tok], r"latin1\.jsonl:1: not UTF-8 text"),
        (["data=jsonl", f"data.path={d}/broken.jsonl", tok, "data.eos_token=<|end_of_text|>"],
         r"data\.eos_token '<\|end_of_text\|>' is not in"),
        (["data=tokens", f"data.path={d}/negative.npy"], r"token id -3 in the data is outside the model's vocabulary"),
        (["data=tokens", f"data.path={d}/empty.bin"], r"0 tokens are too few for one window"),
        (["data.seq_len=100000"], r"data\.seq_len:? 100000 exceeds .*max_seq_len"),
        (["storage=nvme", f"storage.nvme_dir={d}/not_a_dir/sub"], r"storage\.nvme_dir: .*not_a_dir/sub is not a "
                                                                   r"writable directory"),
        (["storage=nvme", "storage.ram_budget_GiB=0.0001"], r"storage\.ram_budget_GiB: 0\.0001 GiB cannot hold"),
        (["trainer=gpu", "preflight=false"], r"trainer\.accelerator: gpu asked for, but no CUDA GPU is visible"),
        (["data=chat", f"data.path={d}/broken.jsonl", tok, f"data.chat_template={d}/missing.json"],
         r"data\.chat_template: .*missing\.json does not exist"),
        (["data=chat", f"data.path={d}/chat.jsonl", tok], r"data\.chat_template: .*tokenizer_config\.json does not "
                                                           r"exist"),
        (["data=chat", f"data.path={d}/chat.jsonl", tok, f"data.chat_template={d}/template.json"],
         r"chat\.jsonl:1: a chat record needs 'messages'"),
        (["trainer.max_step=10"], r"^error: trainer\.max_step: no such field; did you mean max_steps\?"),
        (["model=llama3-8b"], r"^error: model: no preset 'llama3-8b'; did you mean llama-3-8b .*\(the presets: .*tiny"),
        (["model.n_layr=2"], r"^error: model\.n_layr: no such field; did you mean n_layer"),
        (["model=hf", f"model.path={d}/hf"], r"^error: data: model=hf needs text tokenized with the model's tokenizer"),
        ([f"data.path={d}/empty.bin"], r"^error: data\.path: .*empty\.bin is empty"),
        (["data=tokens", f"data.path={d}/few.npy", "data.seq_len=16"],
         r"^error: 8 tokens \(the validation split of 734: data\.val_fraction=0\.01; raise it, or 0: no validation\)"),
        (["data=jsonl", f"data.path={d}/broken.jsonl", f"data.tokenizer={d}/big/tokenizer.json"],
         r"^error: data\.tokenizer: .*big/tokenizer\.json has 300 tokens, more than the model's vocabulary of 256"),
    ]


@pytest.fixture
def restore_logging():
    """train.main configures logging for its run; put pytest's back afterwards."""
    names = ("", "lightning", "lightning.pytorch", "lightning.fabric")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in names}
    yield
    for n, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level


def test_bad_input_exits_2_with_one_line_naming_it(files, capsys, restore_logging):
    import re

    import torch

    if torch.cuda.is_available():
        pytest.skip("the trainer=gpu case needs a machine without a GPU")
    run = files / "run"
    for args, pattern in _cases(files):
        code = train.main([*args, f"hydra.run.dir={run}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, err)
        errors = [line for line in err if line.startswith("error: ")]
        assert len(errors) == 1 and re.search(pattern, errors[0]), (args, err)
        assert not any("Traceback" in line for line in err), (args, err)


def test_a_config_mistake_leaves_no_run_directory_and_exits_2_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "data.micro_batch=0", f"hydra.run.dir={tmp_path}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.micro_batch: must be an integer >= 1, got 0"
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_exits_3_with_the_step_named(tmp_path, capsys, restore_logging):
    code = train.main(["optim.lr=1e6", "optim.warmup_steps=0", "trainer.max_steps=40", "trainer.val_check_interval=40",
                       f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 3 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith("error: training diverged at step ")


def test_a_drive_failing_mid_run_exits_4_with_the_file_named(tmp_path, capsys, restore_logging, monkeypatch):
    import errno

    from megatrain_lightning.storage import nvme
    from megatrain_lightning.storage.state_files import DriveError

    def full(self, index, tile):
        raise DriveError(errno.ENOSPC, f"the disk of storage.nvme_dir is full while writing {self.path(index)}")
    monkeypatch.setattr(nvme.NvmeTier, "write_grad", full)  # the first gradient a file-backed layer ships
    code = train.main(["storage=nvme", "storage.ram_budget_GiB=0.001", f"storage.nvme_dir={tmp_path}/nvme",
                       "trainer.max_steps=3", f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 4 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert re.match(r"error: the disk of storage\.nvme_dir is full while writing .*unit_0000\d\.bin\. The run "
                    r"stopped", errors[0]), errors[0]



def test_train_py_on_two_ranks_reports_once(tmp_path):
    """`trainer.devices=2`: Lightning starts the second rank from the same command line (Hydra's run directory
    kept); both train the default tiny model, the summary comes once, with the loss averaged over the ranks."""
    proc = subprocess.run([sys.executable, "train.py", "trainer.devices=2", "trainer.max_steps=4",
                           "trainer.val_check_interval=4", f"hydra.run.dir={tmp_path}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("done: 4 steps in") == 1
    assert (tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt" / "manifest.json").is_file()


def test_help_prints_the_groups_and_presets():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: python train.py") and "model=deepseek-v3|" in proc.stdout
    assert "storage=nvme|ram" in proc.stdout and "docs/" in proc.stdout


def test_a_run_directory_holding_a_run_is_refused_and_the_summary_counts_this_runs_steps(tmp_path, capsys,
                                                                                           restore_logging):
    common = ["data.seq_len=16", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    assert train.main([*common, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/a"]) == 0
    assert "done: 2 steps in " in capsys.readouterr().err
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert train.main([*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path}/a"]) == 2
    err = capsys.readouterr().err
    assert f"error: hydra.run.dir: {tmp_path}/a already holds a run's checkpoints; give each run its own" in err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before

    # resumed: the 2 steps this run made, not the 4 the checkpoint's count reaches
    assert train.main([*common, "trainer.max_steps=4", f"resume={tmp_path}/a", f"hydra.run.dir={tmp_path}/b"]) == 0
    err = capsys.readouterr().err
    assert "done: 2 steps (steps 3-4, resumed at 2) in " in err
    measured = float(re.search(r"\n([\d.e-]+) s/step end to end", err).group(1))
    seconds = float(re.search(r"in ([\d.e+-]+) s; run directory", err).group(1))
    assert measured == pytest.approx(seconds / 2, rel=0.05, abs=1e-3)
    # resumed at max_steps: nothing to train, said
    assert train.main([*common, "trainer.max_steps=4", f"resume={tmp_path}/b", f"hydra.run.dir={tmp_path}/c"]) == 0
    assert ("nothing to train: the checkpoint is at step 4, trainer.max_steps is 4; to go on, raise it (e.g. "
            "trainer.max_steps=8)") in capsys.readouterr().err
    # resumed with another model: both named, at once (an older checkpoint of that run would not help)
    code = train.main([*common, "trainer.max_steps=6", "+model.n_layer=2", f"resume={tmp_path}/b",
                       f"hydra.run.dir={tmp_path}/d"])
    err = capsys.readouterr().err
    assert code == 2 and "next older checkpoint" not in err
    assert re.match(r"error: checkpoint .*step=4\.ckpt is of another model shape: it holds tiny \(4 layers, hidden "
                    r"64\) in 5 units, this run trains tiny \(2 layers, hidden 64\) in 3; first differences: ",
                    _one_error(err))


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_storage_faults_exit_4_and_bad_directories_2_each_one_line(tmp_path, capsys, restore_logging, monkeypatch):
    import errno
    import os
    import shutil
    from collections import namedtuple

    import planner.check
    from megatrain_lightning.checkpointing import directories as ckpt
    from megatrain_lightning.storage import nvme
    from megatrain_lightning.storage import state_files

    usage = namedtuple("usage", "total used free")
    nvme_args = ["storage=nvme", "storage.ram_budget_GiB=0.001", f"storage.nvme_dir={tmp_path}/nvme",
                 "trainer.max_steps=2", "data.seq_len=16"]
    # a 300 kB filesystem, as the pre-flight sees it: named, exit 2
    monkeypatch.setattr(planner.check.shutil, "disk_usage", lambda p: usage(300_000, 0, 300_000))
    assert train.main([*nvme_args, f"hydra.run.dir={tmp_path}/r1"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert line.startswith(f"error: storage.nvme_dir: {tmp_path}/nvme has 300 kB free on its filesystem"), line
    monkeypatch.undo()
    assert train.main(["storage=nvme", "storage.nvme_dir=/proc/x", f"hydra.run.dir={tmp_path}/r2"]) == 2
    assert _one_error(capsys.readouterr().err) == ("error: storage.nvme_dir: /proc/x is not on a disk (the "
                                                   "filesystem of /proc has size 0)")

    # a 3 MB one without the pre-flight: the file tier's own check, exit 4
    real = shutil.disk_usage
    monkeypatch.setattr(nvme.shutil, "disk_usage", lambda p: usage(3_000_000, 0, 3_000) if str(p).startswith(
        str(tmp_path)) else real(p))
    assert train.main([*nvme_args, "preflight=false", f"hydra.run.dir={tmp_path}/r3"]) == 4
    assert re.match(r"error: storage\.nvme_dir .*/nvme has 3e-06 GB free; the file-backed layers striped onto it "
                    r"need [\d.]+ GB\. The run stopped", _one_error(capsys.readouterr().err))
    monkeypatch.undo()

    # its directory turned read-only mid-run: the file named, exit 4
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).startswith(str(tmp_path / "nvme")) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a)

    import lightning as L

    class RemountAfterStep1(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            monkeypatch.setattr(state_files.os, "open", read_only)
    from megatrain_lightning import build
    real_trainer = build.trainer
    monkeypatch.setattr(build, "trainer", lambda cfg, out: _with(real_trainer(cfg, out), RemountAfterStep1()))
    assert train.main([*nvme_args, f"hydra.run.dir={tmp_path}/r4"]) == 4
    line = _one_error(capsys.readouterr().err)
    assert re.match(r"error: cannot open the state file .*/unit_0000\d\.bin of storage=nvme: Read-only file system",
                    line), line
    monkeypatch.undo()

    # the disk fills during a checkpoint save: exit 4, earlier checkpoints intact
    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "_write", full)
    assert train.main(["trainer.max_steps=2", "trainer.val_check_interval=2", "data.seq_len=16",
                       f"hydra.run.dir={tmp_path}/r5"]) == 4
    assert "error: the disk filled up while saving checkpoint " in _one_error(capsys.readouterr().err)


def _with(trainer, callback):
    trainer.callbacks.append(callback)
    return trainer


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, restore_logging):
    from megatrain_lightning import build

    def interrupted(cfg):
        raise KeyboardInterrupt  # what Ctrl+C raises while the run is still being built
    monkeypatch.setattr(build, "datamodule", lambda *a: interrupted(a))
    assert train.main([f"hydra.run.dir={tmp_path}/run"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted before training started; nothing was saved"
    assert "Traceback" not in err


def test_a_second_run_into_a_running_runs_directory_is_one_line(tmp_path, capsys, restore_logging):
    """The first run holds its checkpoint directory's lock while it trains: the second is refused before it starts."""
    from megatrain_lightning.storage.ownership import DirectoryLock

    held = DirectoryLock(tmp_path / "run" / "checkpoints", "checkpoints")
    assert train.main(["trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"]) == 2
    assert _one_error(capsys.readouterr().err).startswith(f"error: hydra.run.dir: {tmp_path}/run already holds a run")
    held.release()
