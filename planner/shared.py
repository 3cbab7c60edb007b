"""The engine's torch-free vocabulary: the model presets (`config.py`), the per-layer schedule (`schedule.py`) and the
engine's options (`options.py`, with `errors.py` they raise), loaded without running `megatrain_lightning/__init__.py`.

Importing the package registers the Lightning strategy, which imports torch and lightning (seconds); a check
must answer in well under two seconds, so the planner loads these two pure modules from their files, under
their own names: a later `import megatrain_lightning` in the same process reuses them.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def _load(name: str) -> ModuleType:
    full = f"megatrain_lightning.{name}"
    if full not in sys.modules:
        package = importlib.util.find_spec("megatrain_lightning")  # locates the package without importing it
        if package is None or not package.submodule_search_locations:
            raise ImportError("the planner needs the megatrain_lightning package next to it")
        path = f"{list(package.submodule_search_locations)[0]}/{name}.py"
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


errors = _load("errors")  # before options.py, which imports it
config = _load("config")
schedule = _load("schedule")
options = _load("options")
Config = config.Config
EngineOptions, OptionError = options.EngineOptions, options.OptionError
