"""Measures this machine and writes a hardware preset: `python -m planner.calibrate --out conf/hardware/local.yaml`.

GPU (when present): matmul rates, pinned copies each way and both at once, and how fast a Llama block runs
against the matmul rate. Host: clip + fused AdamW, the casts and gradient adds the engine does, memcpy, and
disk write/read on a path. Without a GPU the "device" is the CPU: the preset is `unified`, and the block and
matmul rates are the CPU's. The one planner module that imports torch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import threading
import time
from typing import Callable

import torch

from megatrain_lightning.config import Config
from megatrain_lightning.models.llama import Block, rope_tables
from planner.hardware import Hardware, host_ram_GiB


def _best(fn: Callable[[], None], reps: int = 5, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `reps` timed runs after one warm-up (seconds)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_TFLOPS(device: torch.device, dtype: torch.dtype, n: int, sync) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best(lambda: a @ b, sync=sync) / 1e12


def block_fit(device: torch.device, dtype: torch.dtype, width: Config, tokens: tuple[int, int], seq_len: int,
              matmul: float, sync) -> tuple[float, float]:
    """(block_efficiency, layer_overhead_ms): a Llama block's forward + backward timed at two token counts,
    t = 3 * FLOPs / (matmul * efficiency) + 3 * overhead, solved for both."""
    from planner.workload import Workload

    block = Block(width).to(device=device, dtype=dtype)
    cos, sin = rope_tables(width, seq_len, device=device)
    wl = Workload(width, seq_len=seq_len, micro_batch=1)
    times, flops = [], []
    for n in tokens:
        x = torch.randn(n // seq_len, seq_len, width.hidden_size, device=device, dtype=dtype, requires_grad=True)

        def step() -> None:
            block(x, cos, sin).sum().backward()

        times.append(_best(step, sync=sync))
        flops.append(3 * (wl.layer_matmul_flops + wl.attention_flops()) * n)
    # two equations t_i = flops_i / (matmul * e) + 3 * o
    slope = (times[1] - times[0]) / (flops[1] - flops[0])  # seconds per FLOP
    efficiency = min(1.0, 1 / (slope * matmul * 1e12))
    overhead_s = max(0.0, (times[1] - flops[1] * slope) / 3)
    return round(efficiency, 3), round(overhead_s * 1e3, 4)


def host_rates(n_params: int) -> dict[str, float]:
    """Clip + fused AdamW, the cast and the gradient copy/add, run the way the engine runs them: over a
    layer-like set of views into one [master | m | v | grad] tile; the accumulation on one worker thread."""
    tile = torch.randn(4 * n_params)
    master, m, v, grad = tile.split(n_params)
    m.zero_(), v.zero_()
    sizes = [n_params // 8] * 7 + [n_params - 7 * (n_params // 8)]  # ~ the tensors of a layer
    params = list(master.split(sizes))
    for p, g in zip(params, grad.split(sizes)):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def adamw() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    stream = torch.empty(n_params, dtype=torch.bfloat16)
    staged = torch.randn(n_params).bfloat16()
    out: dict[str, float] = {}

    def on_worker(fn: Callable[[], None]) -> float:
        result = []
        t = threading.Thread(target=lambda: result.append(_best(fn)))
        t.start()
        t.join()
        return result[0]

    out["cpu_adamw_Gparams"] = n_params / _best(adamw) / 1e9
    out["cpu_cast_Gparams"] = n_params / _best(lambda: stream.copy_(master)) / 1e9
    out["cpu_grad_copy_Gparams"] = n_params / on_worker(lambda: grad.copy_(staged)) / 1e9
    out["cpu_grad_add_Gparams"] = n_params / on_worker(lambda: grad.add_(staged)) / 1e9
    dst = torch.empty_like(master)
    out["host_mem_GBps"] = 2 * master.nbytes / _best(lambda: dst.copy_(master)) / 1e9  # read + write
    return {k: round(v, 2) for k, v in out.items()}


def disk_rates(path: str, mib: int) -> dict[str, float]:
    """Sequential write (fsync'd) and read (page cache dropped for the file) of `mib` MiB at `path`."""
    os.makedirs(path, exist_ok=True)
    f = os.path.join(path, ".megatrain_calibrate")
    block = os.urandom(1 << 20)
    try:
        t = time.perf_counter()
        with open(f, "wb") as fh:
            for _ in range(mib):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        write = mib * 2**20 / (time.perf_counter() - t) / 1e9
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        while os.read(fd, 1 << 24):
            pass
        read = mib * 2**20 / (time.perf_counter() - t) / 1e9
        os.close(fd)
    finally:
        if os.path.exists(f):
            os.remove(f)
    return {"nvme_read_GBps": round(read, 2), "nvme_write_GBps": round(write, 2), "nvme_drives": 1,
            "nvme_capacity_TB": round(shutil.disk_usage(path).free / 1e12, 3)}  # one drive: the one under `path`


def link_rates(device: torch.device, nbytes: int) -> dict[str, float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev, dev2 = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8, device=device)
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)
    sync = torch.cuda.synchronize
    h2d = nbytes / _best(lambda: dev.copy_(host, non_blocking=True), sync=sync) / 1e9
    d2h = nbytes / _best(lambda: host.copy_(dev, non_blocking=True), sync=sync) / 1e9

    def both() -> None:
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)

    duplex = 2 * nbytes / _best(both, sync=sync) / 1e9
    return {"h2d_GBps": round(h2d, 1), "d2h_GBps": round(d2h, 1), "duplex_GBps": round(max(duplex, h2d, d2h), 1)}


def device_memory_GBps(device: torch.device, nbytes: int) -> float:
    """A device-to-device copy, bytes read and written per second (what LoRA's memory-bound kernels move)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    return round(2 * x.nbytes / _best(lambda: y.copy_(x), sync=torch.cuda.synchronize) / 1e9, 1)


def gpu_adamw_Gparams(device: torch.device, n_params: int) -> float:
    """The fused AdamW kernel over device-kept state (fp32 master, m, v, gradient), with a clip scale."""
    p, g, m, v = (torch.rand(n_params, device=device) for _ in range(4))
    step, scale = torch.zeros((), device=device), torch.ones((), device=device)

    def update() -> None:
        torch.optim.adam.adam([p], [g], [m], [v], [], [step], fused=True, decoupled_weight_decay=True,
                              amsgrad=False, beta1=0.9, beta2=0.95, lr=1e-4, weight_decay=0.1, eps=1e-8,
                              maximize=False, grad_scale=scale, found_inf=None)
    return round(n_params / _best(update, sync=torch.cuda.synchronize) / 1e9, 1)


def calibrate(disk_path: str = ".", disk_mib: int = 1024, quick: bool = False, width: Config | None = None,
              seq_len: int | None = None, cpu: bool = False, say=lambda what: None) -> Hardware:
    """Measures this machine. `quick`: smaller problems (a few seconds on 2 cores; what the tests use).
    `width`/`seq_len`: the block shape to fit the block efficiency on (default: an 8B-wide block on a GPU).
    `cpu`: profile the CPU as the device even where a GPU exists. `say`: called with each stage's name."""
    cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hw: dict = dict(host_ram_GiB=round(host_ram_GiB(), 1))
    if cuda:
        props = torch.cuda.get_device_properties(device)
        hw.update(name="local", gpu=props.name, unified=False, hbm_GiB=round(props.total_memory / 2**30, 1),
                  gpu_reserved_GiB=1.0, host_reserved_GiB=6.0)
        say("matrix products (bf16, fp32)")
        hw["bf16_TFLOPS"] = round(matmul_TFLOPS(device, torch.bfloat16, 8192, sync), 1)
        hw["fp32_TFLOPS"] = round(matmul_TFLOPS(device, torch.float32, 8192, sync), 1)
        say("host <-> GPU copies")
        hw.update(link_rates(device, 1 << 30))
        say("AdamW on the GPU, device memory")
        hw["gpu_adamw_Gparams"] = gpu_adamw_Gparams(device, 1 << 28)
        hw["hbm_GBps"] = device_memory_GBps(device, 1 << 30)
        width = width or Config.from_name("llama-3-8b", n_layer=1)
        seq_len = seq_len or 1024
        tokens = (2 * seq_len, 16 * seq_len)
        dtype = torch.bfloat16
    else:
        hw.update(name="local", gpu=f"none: the CPU is the device ({platform.processor() or platform.machine()}, "
                                    f"{os.cpu_count()} cores)", unified=True, gpu_reserved_GiB=0.0, host_reserved_GiB=2.0)
        n = 1024
        say("matrix products (fp32, bf16)")
        hw["fp32_TFLOPS"] = round(matmul_TFLOPS(device, torch.float32, n, sync), 4)
        hw["bf16_TFLOPS"] = round(matmul_TFLOPS(device, torch.bfloat16, n, sync), 4)
        width = width or Config(hidden_size=256, n_head=4, n_kv_head=2, intermediate_size=704)
        seq_len = seq_len or 128
        tokens = (seq_len, 8 * seq_len)
        dtype = torch.float32
    matmul = hw["bf16_TFLOPS"] if dtype == torch.bfloat16 else hw["fp32_TFLOPS"]
    say("a transformer block at two batch sizes")
    hw["block_efficiency"], hw["layer_overhead_ms"] = block_fit(device, dtype, width, tokens, seq_len, matmul, sync)
    hw["eager_block_efficiency"] = hw["block_efficiency"]  # the block runs eagerly here; compiled it would do better
    say("host memory copies and AdamW")
    hw.update(host_rates(4_000_000 if quick else 50_000_000))
    if not cuda:
        hw["gpu_adamw_Gparams"] = hw["cpu_adamw_Gparams"]  # unused: nothing is kept on a device that is the host
        hw["hbm_GiB"] = hw["host_ram_GiB"]
        hw["h2d_GBps"] = hw["d2h_GBps"] = hw["duplex_GBps"] = hw["hbm_GBps"] = hw["host_mem_GBps"]
    say(f"disk reads and writes under {disk_path}")
    hw.update(disk_rates(disk_path, 64 if quick else disk_mib))
    return Hardware.from_dict(hw)


def to_yaml(hw: Hardware) -> str:
    lines = [f"# Measured by `python -m planner.calibrate` on {platform.node()}, "
             f"{datetime.date.today().isoformat()} (torch {torch.__version__})."]
    for k, v in hw.__dict__.items():
        lines.append(f"{k}: " + ("null" if v is None else str(v).lower() if isinstance(v, bool)
                                 else f'"{v}"' if isinstance(v, str) else str(v)))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m planner.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="conf/hardware/local.yaml", help="preset file to write")
    ap.add_argument("--disk-path", default=".", help="where the file-backed tier would live (storage.nvme_dir)")
    ap.add_argument("--disk-mib", type=int, default=1024, help="size of the disk test file")
    ap.add_argument("--quick", action="store_true", help="small problems: seconds, less exact")
    a = ap.parse_args()
    start = time.perf_counter()
    hw = calibrate(a.disk_path, a.disk_mib, a.quick,
                   say=lambda what: print(f"[{time.perf_counter() - start:5.1f} s] measuring {what}", file=sys.stderr))
    name = os.path.splitext(os.path.basename(a.out))[0]
    text = to_yaml(hw).replace('name: "local"', f'name: {name}')
    with open(a.out, "w") as f:
        f.write(text)
    print(text, end="")
    print(f"wrote {a.out} in {time.perf_counter() - start:.0f} s; from conf/hardware/ it is hardware={name}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
