"""The engine's options in one place: each field's one default, its unit in its name, its one check.

Torch-free (the planner imports it without torch): the strategy (`MegatrainStrategy(**fields)` or
`MegatrainStrategy(EngineOptions(...))`), train.py's build and the planner's workload (both from conf/storage through
`from_conf`), the ranks' agreement check and bench/ all take it from here. A bad value fails when the options are
made, with one line naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from megatrain_lightning.errors import UserError

STORAGES = ("ram", "nvme")
# copy: a pinned compute-dtype copy of each layer streams (2 bytes/param more RAM, half the PCIe bytes in bf16);
# master: the fp32 master streams and the device casts it; auto: master, except under storage=nvme (copy)
STREAMS = ("auto", "copy", "master")
DEFAULT_NVME_DIR = "nvme_state"
# what every rank of a run must share: it shapes the order of the collectives (strategy's agreement check)
AGREED = ("checkpoint_interval", "prefetch_depth", "storage", "stream", "ram_budget_GiB", "compile",
          "offload_checkpoints", "replicate_nodes", "keep_activations")


class OptionError(UserError):
    """A bad option value: `field` names it, `detail` says what it must be."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field, self.detail = field, detail

    @property
    def conf_field(self) -> str:
        """The field as conf/ names it (conf/storage: `kind` is the storage)."""
        return f"storage.{'kind' if self.field == 'storage' else self.field}"


@dataclass(frozen=True)
class EngineOptions:
    checkpoint_interval: int = 1
    """K: forward keeps the hidden state entering every K-th layer; backward recomputes K layers at a time."""
    prefetch_depth: int = 2
    """Layer weight buffers streaming ahead of compute (2: double buffering)."""
    storage: str = "ram"
    """"ram": all training state in host RAM; "nvme": layers that do not fit `ram_budget_GiB` keep theirs in files."""
    stream: str = "auto"
    """How weights reach the device (STREAMS)."""
    ram_budget_GiB: float | None = None
    """storage="nvme": RAM for the layers kept in RAM and the embedding/head (the node's); None: all the RAM left."""
    nvme_dir: tuple[str, ...] = (DEFAULT_NVME_DIR,)
    """storage="nvme": one directory per drive (a single path is taken as one); the layers stripe over them."""
    compile: bool | None = None
    """Blocks through torch.compile; None: on for a CUDA device (this project's model and transformers models alike,
    except those whose attention materializes its scores: gpt-oss), off on the CPU."""
    offload_checkpoints: bool | str | None = None
    """Block inputs: True in pinned host memory, "disk" in files under nvme_dir, False on the device; None: host
    memory while RAM has room (else the drives under storage="nvme"), on a CUDA device."""
    device_state_GiB: float | None = None
    """GPU memory for the whole state of the first units, updated on the GPU; None: schedule.AUTO_DEVICE_SHARE of what is free."""
    chunk_tokens: int | None = None
    """The batch sweep: tokens (whole sequences) a layer runs at a time; None: what half of the free GPU holds."""
    keep_activations: int | None = None
    """The last this many blocks keep their forward's activations for backward instead of recomputing it (each holds
    its saved tensors and its weight slots until its backward); None: as many as the GPU has room for beside the first
    step's peak (measured then; none on the CPU, with several ranks, or while the batch sweep cuts the batch)."""
    step_cache_GiB: float | None = None
    """With accumulation: GPU memory for weights and fp32 gradient sums kept for a step; None: schedule.AUTO_DEVICE_SHARE."""
    replicate_nodes: bool = False
    """Several nodes: every node holds the whole state (only gradients cross the network)."""

    def __post_init__(self) -> None:
        dirs = self.nvme_dir
        object.__setattr__(self, "nvme_dir", (str(dirs),) if isinstance(dirs, (str, bytes)) or hasattr(dirs, "__fspath__")
                           else tuple(str(d) for d in dirs))
        self._check()

    def _check(self) -> None:
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not whole(self.checkpoint_interval) or self.checkpoint_interval < 1:
            raise OptionError("checkpoint_interval", f"must be an integer >= 1, got {self.checkpoint_interval!r}")
        if not whole(self.prefetch_depth) or self.prefetch_depth < 1:
            raise OptionError("prefetch_depth", f"must be an integer >= 1, got {self.prefetch_depth!r}")
        if self.storage not in STORAGES:
            raise OptionError("storage", f"must be one of {STORAGES}, got {self.storage!r}")
        if self.stream not in STREAMS:
            raise OptionError("stream", f"must be one of {STREAMS}, got {self.stream!r}")
        for name in ("device_state_GiB", "step_cache_GiB"):
            value = getattr(self, name)
            if value is not None and (not number(value) or not value >= 0):
                raise OptionError(name, f"must be >= 0 (or None: auto), got {value!r}")
        if self.chunk_tokens is not None and (not whole(self.chunk_tokens) or self.chunk_tokens < 1):
            raise OptionError("chunk_tokens", f"must be an integer >= 1 (or None: from free device memory), "
                                              f"got {self.chunk_tokens!r}")
        if self.keep_activations is not None and (not whole(self.keep_activations) or self.keep_activations < 0):
            raise OptionError("keep_activations", f"must be an integer >= 0 (or None: as many blocks as the GPU has "
                                                  f"room for), got {self.keep_activations!r}")
        if self.ram_budget_GiB is not None and (not number(self.ram_budget_GiB) or not self.ram_budget_GiB > 0):
            raise OptionError("ram_budget_GiB", f"must be > 0 (or None: all available RAM), got {self.ram_budget_GiB!r}")
        if not self.nvme_dir or len(set(self.nvme_dir)) < len(self.nvme_dir):
            raise OptionError("nvme_dir", f"must name one directory, or one per drive, each once; got {list(self.nvme_dir)}")
        if not isinstance(self.replicate_nodes, bool):
            raise OptionError("replicate_nodes", f"must be true or false, got {self.replicate_nodes!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise OptionError("compile", f"must be true, false or null (on for CUDA), got {self.compile!r}")
        if self.offload_checkpoints is not None and not isinstance(self.offload_checkpoints, bool) \
                and self.offload_checkpoints != "disk":
            raise OptionError("offload_checkpoints", f"must be true, false, 'disk' or null (on for CUDA), "
                                                     f"got {self.offload_checkpoints!r}")
        if self.offload_checkpoints == "disk" and self.storage != "nvme":
            raise OptionError("offload_checkpoints", "'disk' writes the block inputs under nvme_dir: it needs "
                                                     "storage='nvme'")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_conf(cls, storage: Mapping[str, Any]) -> EngineOptions:
        """From conf/storage (its `kind` is `storage`); a field missing there keeps its default."""
        given = {("storage" if k == "kind" else k): v for k, v in storage.items()}
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise OptionError(unknown[0], f"is not an engine option (they are: {', '.join(cls.names())})")
        return cls(**given)

    def with_values(self, **values: Any) -> EngineOptions:
        """These options with some fields changed (and checked)."""
        unknown = sorted(set(values) - set(self.names()))
        if unknown:
            raise OptionError(unknown[0], f"is not an engine option (they are: {', '.join(self.names())})")
        return replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def agreed(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in AGREED}


def resolve_stream(storage: str, stream: str, fp32: bool) -> str:
    """What streams to the device, "copy" or "master" (the engine's placement and the planner both ask here).
    stream="auto": with every layer in RAM the fp32 master streams and the device casts it (the host's per-layer
    update is then only AdamW, which is what bounds an overlapped step; PCIe has room for the doubled bytes, and RAM
    saves the copy). storage="nvme" streams the compute-dtype copy (the masters of file-backed layers are on disk);
    in fp32 the copy is the master itself."""
    if storage == "nvme":
        if stream == "master" and not fp32:
            raise OptionError("stream", "'master' cannot stream under storage='nvme', which streams the compute-dtype "
                                        "copy kept in RAM; use stream='copy' or 'auto'")
        return "copy"
    return "master" if stream == "auto" else stream
