"""megatrain-lightning: full-precision training of models far larger than GPU memory on one GPU.

Importing the package registers `Trainer(strategy="megatrain")`, and imports neither torch nor lightning: the
planner imports the torch-free modules (`config`, `schedule`, `options`, `errors`) like any others and answers in
well under two seconds. The public names load on first use; the strategy's name is entered in Lightning's
registry as soon as Lightning's strategies exist (now, if they are already imported).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_PUBLIC = {  # name -> module that defines it
    "Config": "megatrain_lightning.config",
    "Llama": "megatrain_lightning.models.llama",
    "Trunk": "megatrain_lightning.models.llama",
    "SaveOnSignal": "megatrain_lightning.checkpointing.preemption",
    "MegatrainStrategy": "megatrain_lightning.strategy",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'megatrain_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def _megatrain_strategy(**kwargs):
    """What Lightning calls for `strategy="megatrain"`; the strategy module (torch, lightning) loads here."""
    from megatrain_lightning.strategy import MegatrainStrategy

    return MegatrainStrategy(**kwargs)


def _register(registry) -> None:
    # The class itself cannot be imported while Lightning's strategies are still loading; a factory can be registered.
    registry.register("megatrain", _megatrain_strategy, override=True,
                      description="Layer-streaming single-GPU training with host-resident fp32 state")


_STRATEGIES = "lightning.pytorch.strategies"


class _RegisterOnLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds nothing itself: when Lightning's strategies module is first imported, it runs that module's own
    loader and then registers the strategy in the registry the module just made."""

    def __init__(self) -> None:
        self._loader = None

    def find_spec(self, fullname, path, target=None):
        if fullname != _STRATEGIES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # the module's own loader from here on
        _register(module.StrategyRegistry)


if _STRATEGIES in sys.modules:
    _register(sys.modules[_STRATEGIES].StrategyRegistry)
elif not any(isinstance(f, _RegisterOnLoad) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnLoad())
