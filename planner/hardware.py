"""A machine as data: the GPU, the host and the SSD, with units in every field name.

Presets live in `conf/hardware/*.yaml` (each value says where it comes from); `hardware=auto` detects this
machine's capacities without importing torch and takes rates from the preset of the detected GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, fields
from typing import Any

from planner.errors import PlanError


@dataclass(frozen=True)
class Hardware:
    name: str
    gpu: str  # what the GPU is, in words
    unified: bool  # no separate device: the "GPU" is the host CPU (copies run on the compute thread)
    hbm_GiB: float  # device memory
    gpu_reserved_GiB: float  # CUDA context and allocator slack, outside torch's allocated bytes
    bf16_TFLOPS: float  # sustained dense bf16 matmul
    fp32_TFLOPS: float  # sustained dense fp32 matmul (32-true runs)
    block_efficiency: float  # fraction of the matmul rate a Llama block sustains (norms, rope, attention, ...)
    layer_overhead_ms: float  # fixed cost of one layer pass (launches, Python), whatever its size
    h2d_GBps: float  # pinned host -> device
    d2h_GBps: float  # pinned device -> host
    duplex_GBps: float  # both directions at once, total
    host_ram_GiB: float
    host_reserved_GiB: float  # OS, libraries, CUDA host state: RAM the training state cannot use
    host_mem_GBps: float  # host memcpy
    cpu_adamw_Gparams: float  # global-norm clip + fused AdamW over the fp32 store, parameters per second
    gpu_adamw_Gparams: float  # fused AdamW on the GPU over the state it keeps (device_state_GiB), parameters per second
    cpu_cast_Gparams: float  # fp32 master -> streamed compute-dtype copy
    cpu_grad_copy_Gparams: float  # first micro-batch: shipped gradient copied into the fp32 buffer
    cpu_grad_add_Gparams: float  # later micro-batches: shipped gradient added into the fp32 buffer
    nvme_read_GBps: float  # one drive, sustained large reads
    nvme_write_GBps: float  # one drive, sustained large writes (beyond any SLC cache)
    nvme_drives: int  # drives the file-backed tier stripes its layers over (storage.nvme_dir as a list, one each)
    nvme_capacity_TB: float  # free space for the file-backed tier, all drives together (10^12 bytes)
    # causal attention (SDPA) sustained, forward and backward (its five matmuls: 2.5x the forward's FLOPs); null:
    # the block's rate (matmul rate x block_efficiency). Matters at long context, where attention is most FLOPs.
    attention_fwd_TFLOPS: float | None = None
    attention_bwd_TFLOPS: float | None = None
    # block_efficiency of blocks run eagerly (storage.compile=false); null: the same
    eager_block_efficiency: float | None = None
    # the share of the matmul rate a mixture's routed experts sustain (transformers' grouped_mm experts: the routing,
    # the sort, gather and scatter of the tokens and the grouped GEMMs together); null: the block's rate
    experts_efficiency: float | None = None
    # several ranks (trainer.devices > 1): what one GPU moves to and from the others in a broadcast or a reduction
    # (NCCL's bus bandwidth); null: no peer link, through PCIe at h2d_GBps
    nvlink_GBps: float | None = None
    # several machines (trainer.num_nodes > 1): what one node's network moves to and from the others
    network_GBps: float | None = None
    # device memory bandwidth, sustained: the memory-bound kernels LoRA's adapters add (their skinny matmuls, the
    # scaling and the sum over [tokens, out]); null: those are not timed
    hbm_GBps: float | None = None
    # several ranks on a node: [ranks, Gparam/s] pairs, the node's fused AdamW rate (all its processes together) with
    # that many updating at once ([[2, 3.13], [4, 2.92]]): they share its memory bandwidth; a count between two
    # entries takes the lower one's, more than the largest that one's; null: one process's rate, cpu_adamw_Gparams
    cpu_adamw_node_Gparams_by_ranks: list | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:  # optional
                continue
            if f.type in ("float", float, "float | None") and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise PlanError(f"hardware.{f.name}", f"must be a number, got {v!r}")
            if f.name.endswith(("_GiB", "_TB", "_GBps", "_TFLOPS", "_Gparams")) and v <= 0 \
                    and f.name not in ("gpu_reserved_GiB", "host_reserved_GiB"):
                raise PlanError(f"hardware.{f.name}", f"must be > 0, got {v}")
            if f.name in ("gpu_reserved_GiB", "host_reserved_GiB", "layer_overhead_ms") and v < 0:
                raise PlanError(f"hardware.{f.name}", f"must be >= 0, got {v}")
        if not isinstance(self.nvme_drives, int) or isinstance(self.nvme_drives, bool) or self.nvme_drives < 1:
            raise PlanError("hardware.nvme_drives", f"must be a whole number >= 1, got {self.nvme_drives!r}")
        for name in ("block_efficiency", "eager_block_efficiency", "experts_efficiency"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise PlanError(f"hardware.{name}", f"must be in (0, 1], got {v}")
        table = self.cpu_adamw_node_Gparams_by_ranks
        if table is not None and not (isinstance(table, (list, tuple)) and all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int)
                and not isinstance(pair[0], bool) and pair[0] >= 2 and isinstance(pair[1], (int, float))
                and not isinstance(pair[1], bool) and pair[1] > 0 for pair in table)):
            raise PlanError("hardware.cpu_adamw_node_Gparams_by_ranks",
                            f"must be [ranks >= 2, Gparam/s > 0] pairs ([[2, 3.1]]), got {table!r}")
        if self.duplex_GBps < max(self.h2d_GBps, self.d2h_GBps):
            raise PlanError("hardware.duplex_GBps", f"{self.duplex_GBps} is below one direction's bandwidth "
                            f"(h2d {self.h2d_GBps}, d2h {self.d2h_GBps})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"hardware.{unknown[0]}", f"unknown field; known: {', '.join(sorted(known))}")
        optional = {f.name for f in fields(cls) if f.default is None}
        missing = sorted(k for k in known - optional if d.get(k) is None)
        if missing:
            raise PlanError(f"hardware.{missing[0]}", "missing (set it, or use hardware=auto to detect it)")
        return cls(**d)

    @property
    def nvme_array_read_GBps(self) -> float:
        """Reads of the striped tier: every drive at once (each has its own reader thread)."""
        return self.nvme_read_GBps * self.nvme_drives

    @property
    def nvme_array_write_GBps(self) -> float:
        return self.nvme_write_GBps * self.nvme_drives

    def node_adamw_Gparams(self, ranks_per_node: int) -> float:
        """The host AdamW rate of a node whose `ranks_per_node` ranks update at once (all of them together)."""
        known = [(n, rate) for n, rate in self.cpu_adamw_node_Gparams_by_ranks or () if n <= ranks_per_node]
        return max(known)[1] if ranks_per_node > 1 and known else self.cpu_adamw_Gparams

    def matmul_TFLOPS(self, compute_bytes: int) -> float:
        return self.bf16_TFLOPS if compute_bytes == 2 else self.fp32_TFLOPS


# ---- hardware=auto: this machine's capacities, rates from the preset of its GPU ----
GPU_PRESETS = [  # (substring of nvidia-smi's name, preset); first match wins
    ("GH200", "gh200"), ("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"),
    ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"), ("L40S", "l40s"),
    ("4090", "rtx-4090"), ("3090", "rtx-3090"), ("A6000", "rtx-a6000"),
]


def detect_gpu() -> tuple[str, float] | None:
    """(name, memory GiB) of GPU 0 from nvidia-smi, or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        return None
    name, mib = (s.strip() for s in lines[0].rsplit(",", 1))
    return name, float(mib) / 1024


def preset_for_gpu(name: str | None) -> str:
    if name is None:
        return "cpu"
    return next((preset for key, preset in GPU_PRESETS if key.lower() in name.lower()), "h100-sxm")


def host_ram_GiB() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def disk_free_TB(path: str) -> float:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free / 1e12
