"""The README's CPU commands run as written on this checkout: every `python -m planner.check` line, and the quick
start's `python train.py` (CI installs the package first, as the quick start's first command does)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commented(prefix: str) -> list[tuple[str, str]]:
    """(command, its comment) for the lines of the README's bash blocks that start with `prefix` (continuation lines
    joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = " ".join(b.replace("\\\n", " ") for b in blocks).replace("\n", " \n ").split(" \n ")
    out = []
    for line in (x.strip() for x in lines if x.strip().startswith(prefix)):
        command, _, comment = line.partition(" #")
        out.append((command.strip(), comment.strip()))
    return out


def _commands(prefix: str) -> list[str]:
    return [command for command, _ in _commented(prefix)]


PLANNER = _commands("python -m planner.check")


def test_the_readme_has_the_commands_this_file_runs():
    assert len(PLANNER) >= 3 and all(says for _, says in _commented("python -m planner.check")) and any(c.split("&&")[-1].strip() == "python train.py" for c in _commands("pip install"))


@pytest.mark.parametrize("command", PLANNER)
def test_planner_commands_run_as_written(command, tmp_path):
    args = shlex.split(command)[1:]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: the answer is "does not fit"
    assert "Traceback" not in proc.stderr and re.search(r'FITS|DOES NOT FIT|"fits"', proc.stdout)


@pytest.mark.parametrize("command,says", [c for c in _commented("python -m planner.check") if c[1]])
def test_planner_commands_print_what_the_readme_says(command, says):
    """"# FITS, 54 s a step" after a command: its verdict, and its step time within 10%."""
    args = shlex.split(command)[1:]
    proc = subprocess.run([sys.executable, *args, "--json"] if "--json" not in args else [sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    answer = __import__("json").loads(proc.stdout)
    assert answer["fits"] == says.startswith("FITS"), (says, proc.stdout[:2000])
    step = re.search(r"([\d.]+) s a step", says)
    if step:
        assert answer["step_time_s"] == pytest.approx(float(step.group(1)), rel=0.1)


def test_quick_start_train_py_runs_as_written(tmp_path):
    """`python train.py` as the quick start runs it (its runs/ directory goes to a temporary copy's place)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "checkpoints" / "last.ckpt" / "manifest.json").is_file()
    assert "done: 400 steps" in proc.stderr and "Traceback" not in proc.stderr


def test_calibrate_runs_as_written(tmp_path):
    """The README's calibrate line, in a directory with a conf/hardware/ of its own: a preset the planner reads."""
    (command,) = _commands("python -m planner.calibrate")
    (tmp_path / "conf" / "hardware").mkdir(parents=True)
    proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    from planner.hardware import Hardware

    preset = yaml.safe_load((tmp_path / "conf" / "hardware" / "local.yaml").read_text())
    hw = Hardware.from_dict(preset)
    assert hw.host_ram_GiB > 0 and "wrote conf/hardware/local.yaml" in proc.stderr
    assert hw.hbm_GBps == hw.host_mem_GBps > 0  # on the CPU the device's memory is the host's
