"""LoRA's options (conf/lora): the fields train.py, the planner and `hf export` read, each with its one default and
its one check. Torch-free, like options.py (the planner imports it); models/lora.py applies them to a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from megatrain_lightning.errors import UserError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoRA:
    """conf/lora (models/lora.py applies it): LoRA adapters on a frozen base; `r` 0 trains the whole model."""

    r: int = 0  # the adapters' rank
    alpha: float = 16.0  # their output is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input
    target_modules: Any = ALL_LINEAR  # "all-linear": every nn.Linear inside the decoder layers; or a list of names

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "LoRA":
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"lora: unknown field(s) {unknown}; the fields are {sorted(cls.__dataclass_fields__)}")
        lora = cls(**values)
        if not isinstance(lora.r, int) or lora.r < 0:
            raise UserError(f"lora.r: must be a non-negative integer (0: no adapters), got {lora.r!r}")
        if not 0 <= lora.dropout < 1:
            raise UserError(f"lora.dropout: must be in [0, 1), got {lora.dropout!r}")
        if not (lora.target_modules == ALL_LINEAR or (isinstance(lora.target_modules, (list, tuple))
                                                     and lora.target_modules)):
            raise UserError(f"lora.target_modules: must be {ALL_LINEAR!r} or a list of module names, got "
                            f"{lora.target_modules!r}")
        return lora

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def as_dict(self) -> dict[str, Any]:
        """Plain values (hyperparameters go into checkpoints)."""
        out = asdict(self)
        if isinstance(out["target_modules"], (list, tuple)):
            out["target_modules"] = list(out["target_modules"])
        return out
