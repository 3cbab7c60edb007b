"""megatrain-lightning: full-precision training of models far larger than GPU memory on one GPU.

Importing the package registers `Trainer(strategy="megatrain")`.
"""

from lightning.pytorch.strategies import StrategyRegistry

from megatrain_lightning import config, schedule  # bound here too when the planner loaded them first
from megatrain_lightning.config import Config
from megatrain_lightning.models.llama import Llama, Trunk
from megatrain_lightning.checkpointing.preemption import SaveOnSignal
from megatrain_lightning.strategy import MegatrainStrategy

MegatrainStrategy.register_strategies(StrategyRegistry)

__all__ = ["Config", "Llama", "MegatrainStrategy", "SaveOnSignal", "Trunk"]
