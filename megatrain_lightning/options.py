"""The strategy's options, checked when the Trainer is built: a bad value fails with one line naming it, not
minutes into a run."""

from __future__ import annotations

from megatrain_lightning.errors import UserError
from megatrain_lightning.storage.store import STREAMS as STORE_STREAMS

STORAGES = ("ram", "nvme")
STREAMS = ("auto", *STORE_STREAMS)


def check(*, checkpoint_interval, prefetch_depth, storage, stream, ram_budget_GiB, compile, offload_checkpoints,
          device_state_GiB, chunk_tokens, step_cache_GiB, replicate_nodes=False) -> None:
    if not isinstance(checkpoint_interval, int) or checkpoint_interval < 1:
        raise UserError(f"checkpoint_interval must be an integer >= 1, got {checkpoint_interval!r}")
    if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise UserError(f"prefetch_depth must be an integer >= 1, got {prefetch_depth!r}")
    if storage not in STORAGES:
        raise UserError(f"storage must be one of {STORAGES}, got {storage!r}")
    if stream not in STREAMS:
        raise UserError(f"stream must be one of {STREAMS}, got {stream!r}")
    for name, value in (("device_state_GiB", device_state_GiB), ("step_cache_GiB", step_cache_GiB)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise UserError(f"{name} must be >= 0 (or None: auto), got {value!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise UserError(f"chunk_tokens must be an integer >= 1 (or None: from free device memory), "
                        f"got {chunk_tokens!r}")
    if ram_budget_GiB is not None and not ram_budget_GiB > 0:
        raise UserError(f"ram_budget_GiB must be > 0 (or None: all available RAM), got {ram_budget_GiB!r}")
    if not isinstance(replicate_nodes, bool):
        raise UserError(f"replicate_nodes must be true or false, got {replicate_nodes!r}")
    if compile is not None and not isinstance(compile, bool):
        raise UserError(f"compile must be true, false or null (on for CUDA), got {compile!r}")
    if offload_checkpoints is not None and not isinstance(offload_checkpoints, bool) \
            and offload_checkpoints != "disk":
        raise UserError(f"offload_checkpoints must be true, false, 'disk' or null (on for CUDA), "
                        f"got {offload_checkpoints!r}")
    if offload_checkpoints == "disk" and storage != "nvme":
        raise UserError("offload_checkpoints='disk' writes the block inputs under nvme_dir: it needs "
                        "storage='nvme'")
