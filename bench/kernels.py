"""Measures the pieces a step is made of, on this box, to choose the engine's defaults and check the planner's
hardware figures: host AdamW per layer (main thread vs a worker thread), and one block's forward and backward
eager vs compiled. One JSON line per measurement on stdout.

  python bench/kernels.py --model llama-3.2-3b --micro-batch 32 --seq-len 1024

`--processes 2,4`: also the node's AdamW rate with that many processes updating at once, each its share of the
layers on its share of the cores (the ranks of one node; the planner takes the node's rate as one process's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
from torch.optim.adam import adam

from megatrain_lightning.config import Config
from megatrain_lightning.models.llama import Block, rope_tables


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _adamw_pass(numels: list[int]):
    """One pass of the fused CPU AdamW, unit by unit over per-layer flat fp32 [master | m | v | grad] buffers, as the
    host optimizer runs it."""
    units = []
    for n in numels:
        tile = torch.full((4 * n,), 1e-3)  # memory-bound: the values do not change the time
        units.append(tile.split(n))
    steps = [torch.zeros(()) for _ in units]

    def one_pass() -> None:
        for (p, m, v, g), s in zip(units, steps):
            adam([p], [g], [m], [v], [], [s], fused=True, decoupled_weight_decay=True,
                                  amsgrad=False, beta1=0.9, beta2=0.95, lr=1e-4, weight_decay=0.1, eps=1e-8,
                                  maximize=False)
    return one_pass


def _timed_passes(numels: list[int], repeats: int, threads: int, barrier=None) -> list[float]:
    """Seconds of each of `repeats` AdamW passes after a warm-up, on `threads` threads; with a `barrier`, every
    process starts each pass at once, as the ranks' updates run."""
    torch.set_num_threads(threads)
    one_pass = _adamw_pass(numels)
    one_pass()  # warm-up
    times = []
    for _ in range(repeats):
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return times


def _adamw_rank(numels: list[int], repeats: int, threads: int, barrier, out) -> None:
    out.put(_timed_passes(numels, repeats, threads, barrier))


def adamw_processes_rate(numels: list[int], repeats: int, n: int) -> tuple[float, int]:
    """The node's Gparam/s with `n` processes updating at once, each its 1/n of the units on its share of the cores
    (as Lightning's launcher sets them), as the ranks of one node do; and the threads each had."""
    import multiprocessing as mp
    import os
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    procs = [ctx.Process(target=_adamw_rank, args=(numels[r::n], repeats, threads, barrier, out)) for r in range(n)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    per_repeat = [max(times[k] for times in results) for k in range(repeats)]  # the node is done when all are
    return sum(numels) / statistics.median(per_repeat) / 1e9, threads


def adamw_rate(numels: list[int], repeats: int, worker: bool) -> float:
    """Gparam/s of the fused CPU AdamW run unit by unit over per-layer flat fp32 buffers, as the host optimizer does
    (on the main thread, or on a worker thread as the engine runs it)."""
    threads, times = torch.get_num_threads(), []
    run = lambda: times.extend(_timed_passes(numels, repeats, threads))  # noqa: E731
    if worker:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    else:
        run()
    return sum(numels) / statistics.median(times) / 1e9


def block_setup(config: Config, tokens: tuple[int, int], compile_: bool):
    """One bf16 block on CUDA (compiled or not), an input, its rotary tables and an output gradient."""
    dev = torch.device("cuda")
    block = Block(config).to(dev, torch.bfloat16)
    fn = torch.compile(block) if compile_ else block
    B, T = tokens
    x = torch.randn(B, T, config.hidden_size, device=dev, dtype=torch.bfloat16)
    cos, sin = rope_tables(config, T, dev)
    return block, fn, x, cos, sin, torch.randn_like(x)


def block_times(config: Config, tokens: tuple[int, int], compile_: bool) -> tuple[float, float]:
    """Median seconds of one block's forward (no grad) and recompute + backward, bf16 autocast, on CUDA."""
    block, fn, x, cos, sin, g = block_setup(config, tokens, compile_)

    def fwd() -> None:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            fn(x, cos, sin)

    def bwd() -> None:
        xi = x.detach().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(xi, cos, sin)
        torch.autograd.grad(out, [xi, *block.parameters()], g)

    return cuda_time(fwd), cuda_time(bwd)


def cuda_time(f, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of f() on the current CUDA stream."""
    for _ in range(warmup):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def block_peak_bytes(config: Config, tokens: tuple[int, int], compile_: bool) -> int:
    """Device bytes one block's recompute + backward adds over its input, output gradient and weights (what the
    planner's activation and transient coefficients stand for)."""
    block, fn, x, cos, sin, g = block_setup(config, tokens, compile_)
    xi = x.detach().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):  # warm-up (compilation) outside the measured window
        torch.autograd.grad(fn(xi, cos, sin), [xi, *block.parameters()], g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", torch.bfloat16):
        grads = torch.autograd.grad(fn(xi, cos, sin), [xi, *block.parameters()], g)
    del grads
    return torch.cuda.max_memory_allocated() - base


def attention_times(config: Config, tokens: tuple[int, int]) -> tuple[float, float]:
    """Median seconds of causal SDPA alone (the model's call, GQA) forward, and forward + backward, bf16."""
    dev = torch.device("cuda")
    B, T = tokens
    hd = config.head_dim
    q = torch.randn(B, config.n_head, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, config.n_kv_head, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    gqa = config.n_head != config.n_kv_head

    def fwd() -> None:
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def both() -> None:
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        torch.autograd.grad(y, [q, k, v], torch.ones_like(y))

    return cuda_time(fwd, 2, 5), cuda_time(both, 2, 5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-3b")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-adamw", action="store_true")
    ap.add_argument("--processes", default="", help="also the node's AdamW rate with N processes at once (2,4)")
    ap.add_argument("--skip-block", action="store_true")
    ap.add_argument("--attention", action="store_true", help="also causal SDPA alone, and one block's peak memory")
    a = ap.parse_args()
    longest = max(a.seq_len, Config.from_name(a.model).max_seq_len)  # long context: the rotary tables reach it
    config = Config.from_name(a.model, tie_embeddings=False, max_seq_len=longest)
    if not a.skip_adamw:
        numels = [config.layer_params] * config.n_layer + [config.embedding_params]
        for worker in (False, True):
            emit(what="adamw", worker=worker, threads=torch.get_num_threads(), n_params=sum(numels),
                 Gparams=round(adamw_rate(numels, a.repeats, worker), 3))
        for n in (int(x) for x in a.processes.split(",") if x):
            rate, threads = adamw_processes_rate(numels, a.repeats, n)
            emit(what="adamw", processes=n, threads=threads, n_params=sum(numels), Gparams=round(rate, 3))
    tokens = (a.micro_batch, a.seq_len)
    if torch.cuda.is_available() and a.attention:
        # causal: QK^T and AV over (T + 1) / 2 keys a token on average, 2 FLOPs a MAC (the planner's attention_flops);
        # the backward's five matmuls are 2.5 times the forward's two
        flops = 2 * 2 * config.n_head * config.head_dim * (a.seq_len + 1) / 2 * a.micro_batch * a.seq_len
        f, fb = attention_times(config, tokens)
        emit(what="attention", seq_len=a.seq_len, micro_batch=a.micro_batch, fwd_ms=round(f * 1e3, 2),
             fwd_bwd_ms=round(fb * 1e3, 2), fwd_TFLOPs=round(flops / f / 1e12, 1),
             bwd_TFLOPs_at_2p5x=round(2.5 * flops / (fb - f) / 1e12, 1))
        for compile_ in (False, True):
            n = block_peak_bytes(config, tokens, compile_)
            emit(what="block_memory", compiled=compile_, seq_len=a.seq_len, micro_batch=a.micro_batch,
                 peak_GiB=round(n / 2**30, 3),
                 per_token_over_input=round(n / (a.micro_batch * a.seq_len * config.hidden_size * 2), 2))
    if torch.cuda.is_available() and not a.skip_block:
        flops = 2 * config.layer_params * a.micro_batch * a.seq_len
        for compile_ in (False, True):
            try:
                f, b = block_times(config, (a.micro_batch, a.seq_len), compile_)
                emit(what="block", compiled=compile_, fwd_ms=round(f * 1e3, 2), rec_bwd_ms=round(b * 1e3, 2),
                     fwd_TFLOPs=round(flops / f / 1e12, 1), rec_bwd_TFLOPs=round(3 * flops / b / 1e12, 1))
            except Exception as e:  # compile needs a working toolchain; report and go on
                emit(what="block", compiled=compile_, error=repr(e)[:300])


if __name__ == "__main__":
    main()
