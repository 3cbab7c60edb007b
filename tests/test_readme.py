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


def _commands(prefix: str) -> list[str]:
    """Lines of the README's bash blocks that start with `prefix` (continuation lines joined; comments cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = " ".join(b.replace("\\\n", " ") for b in blocks).replace("\n", " \n ").split(" \n ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip().startswith(prefix)]


PLANNER = _commands("python -m planner.check")


def test_the_readme_has_the_commands_this_file_runs():
    assert len(PLANNER) >= 3 and any(c.split("&&")[-1].strip() == "python train.py" for c in _commands("pip install"))


@pytest.mark.parametrize("command", PLANNER)
def test_planner_commands_run_as_written(command, tmp_path):
    args = shlex.split(command)[1:]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: the answer is "does not fit"
    assert "Traceback" not in proc.stderr and ("FITS" in proc.stdout or '"fits"' in proc.stdout)


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
    assert Hardware.from_dict(preset).host_ram_GiB > 0 and "wrote conf/hardware/local.yaml" in proc.stderr
