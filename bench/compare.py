"""megatrain against the peers on this box: the same model, initial weights, batch and sequence length, each
system in its own process, runs alternating between systems, warm-up steps excluded.

  python bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --seq-len 1024 --rounds 2

Systems: `megatrain` (this project), `fsdp` (Lightning FSDPStrategy(cpu_offload=True), fused CPU AdamW,
activation checkpointing per block) and `deepspeed` (Lightning "deepspeed_stage_3_offload" with DeepSpeedCPUAdam
and checkpointing per block; only when `deepspeed` imports). Every system trains the same CausalLM (chunked
head + loss), AdamW(lr, betas, weight decay groups) with the same warm-up + cosine schedule and the same
gradient clipping. Initial weights are drawn per parameter from a generator seeded by the parameter's name, so
every system starts from the same numbers however it builds the model.

Prints one JSON line per run, then a table: step time, model TFLOPS (6 N tokens / step time), peak GPU memory,
host RSS, host bytes per parameter, and each system's ratio to megatrain; the planner's prediction (hardware
preset --planner-hardware) stands beside the megatrain rows.

Scaling: `--devices 1,2,4` runs every system at each number of GPUs (data parallel, the same batch per GPU) in the
same rounds, and adds each one's scaling efficiency (tokens/s on N GPUs / (N x tokens/s on 1)):

  python bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --devices 1,2,4 --systems megatrain,fsdp \
      --device-state-GiB 0 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("megatrain", "fsdp", "deepspeed")


# ---------------------------------------------------------------- one run (a child process)
def seeded_init(name: str, t, device) -> None:
    """The same initial value for parameter `name` in every system: N(0, 0.02) for matrices, ones for norm
    weights, zeros for biases, drawn on `device` from a generator seeded by the name."""
    import torch
    with torch.no_grad():
        if name.endswith("bias"):
            t.zero_()
        elif t.dim() < 2:
            t.fill_(1.0)
        else:
            g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
            t.copy_(torch.empty(t.shape, device=device).normal_(0.0, 0.02, generator=g))


def build_lm(a, config, system: str):
    import torch
    from megatrain_lightning.models.lm import CausalLM
    from megatrain_lightning.models.llama import Llama

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def name_resets(model) -> None:
        """Gives each module that owns parameters a reset_parameters drawing them by full name (the megatrain
        strategy materializes and resets the model one module at a time)."""
        for mod_name, m in model.named_modules():
            own = list(m.named_parameters(recurse=False))
            if own:
                prefix = f"{mod_name}." if mod_name else ""
                m.reset_parameters = (lambda m=m, prefix=prefix: [seeded_init(prefix + n, p, dev)
                                                                  for n, p in m.named_parameters()])

    class BenchLM(CausalLM):
        def configure_model(self) -> None:
            if self.model is None:
                self.model = Llama(self.config)  # megatrain: on the meta device
                name_resets(self.model)
                for i, block in enumerate(self.model.model.layers):  # the strategy resets whole blocks
                    prefix = f"model.layers.{i}."
                    block.reset_parameters = (lambda b=block, prefix=prefix: [seeded_init(prefix + n, p, dev)
                                                                              for n, p in b.named_parameters()])

        def configure_optimizers(self):
            conf = super().configure_optimizers()
            opt = conf["optimizer"]
            if system == "deepspeed":  # ZeRO-Offload needs its own CPU Adam; same groups and schedule
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in opt.param_groups]
                ds = DeepSpeedCPUAdam(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), adamw_mode=True)
                sched = conf["lr_scheduler"]["scheduler"]
                conf["optimizer"] = ds
                conf["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(ds, sched.lr_lambdas[0])
            else:
                for g in opt.param_groups:  # fused CPU AdamW, as the megatrain strategy runs
                    g["fused"], g["foreach"] = True, False
            return conf

    class FsdpLM(BenchLM):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if gradient_clip_val:  # Lightning's FSDP precision plugin refuses norm clipping: FSDP's own method
                self.trainer.model.clip_grad_norm_(gradient_clip_val)

    kwargs = dict(lr=1e-4, warmup_steps=1, max_steps=a.warmup + a.steps)
    if system == "megatrain":
        return BenchLM(config, **kwargs)
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    for n, p in model.named_parameters():
        seeded_init(n, p, dev)
    if system == "deepspeed":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
    return (FsdpLM if system == "fsdp" else BenchLM)(config, model=model, **kwargs)


def run_one(a) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from bench.step import RandomTokens, StepTimer, rss_bytes
    from megatrain_lightning import MegatrainStrategy
    from megatrain_lightning.config import Config
    from megatrain_lightning.models.llama import Block

    system = a.worker
    overrides = {"tie_embeddings": False} if a.untied else {}
    if a.n_layer:
        overrides["n_layer"] = a.n_layer
    config = Config.from_name(a.model, **overrides)
    if system == "megatrain":
        strategy = MegatrainStrategy(trace_dir=a.trace_dir, trace_step=a.warmup + 1,
                                     prefetch_depth=a.prefetch_depth, checkpoint_interval=a.checkpoint_interval,
                                     device_state_GiB=a.device_state_GiB)
    elif system == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        strategy = FSDPStrategy(cpu_offload=True, auto_wrap_policy={Block}, activation_checkpointing_policy={Block},
                                use_orig_params=True, state_dict_type="sharded")
    else:
        strategy = "deepspeed_stage_3_offload"
    timer = StepTimer(sync_at={a.warmup, a.warmup + a.steps})  # the timed window's edges
    callbacks = [timer]
    profile = {}
    if system == "megatrain" and a.profile:
        callbacks.append(ComputeBusy(a.warmup + a.steps, profile))  # after the timed steps
    trainer = L.Trainer(strategy=strategy, accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=a.devices,
                        precision="bf16-mixed", max_steps=a.warmup + a.steps + (PROFILED_STEPS + 1 if a.profile else 0),
                        gradient_clip_val=a.clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=callbacks)
    n = (a.warmup + a.steps + PROFILED_STEPS + 2) * a.micro_batch * a.devices
    data = DataLoader(RandomTokens(config.vocab_size, a.seq_len, n), batch_size=a.micro_batch)
    t0 = time.perf_counter()
    trainer.fit(build_lm(a, config, system), train_dataloaders=data)
    times = timer.times[a.warmup - 1:a.warmup - 1 + a.steps]  # timer.times[0] is step 2 (step 1 has no start)
    tokens = a.micro_batch * a.seq_len * a.devices  # every rank's
    step = statistics.fmean(times)  # the window between two synchronizations: its mean is the throughput
    rss = [rss_bytes()]
    if torch.distributed.is_initialized():  # each rank's host memory
        rss = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rss, rss_bytes())
    if not trainer.is_global_zero:
        return {}
    return dict(system=system, model=a.model, n_layer=config.n_layer, n_params=config.n_params,
                devices=a.devices, micro_batch=a.micro_batch, seq_len=a.seq_len, tokens_per_step=tokens, clip=a.clip,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, step_times_s=[round(t, 4) for t in times], step_time_s=round(step, 4),
                tokens_per_s=round(tokens / step, 1),
                model_tflops=round(6 * config.n_params * tokens / step / 1e12, 1),
                peak_gpu_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
                host_rss_GiB=round(rss[0] / 2**30, 2), host_rss_per_rank_GiB=[round(r / 2**30, 2) for r in rss],
                host_bytes_per_param=round(sum(rss) / config.n_params, 2),
                wall_s=round(time.perf_counter() - t0, 1), **profile, **kept_units(trainer.strategy))


def kept_units(strategy) -> dict:
    """megatrain: the units whose state the GPU kept (device_state_GiB)."""
    engine = getattr(strategy, "engine", None)
    if engine is None:  # a peer
        return {}
    states = engine.device_states
    return dict(device_state_GiB=round(states.nbytes / 2**30, 2) if states else 0.0,
                device_units=len(states.units) if states else 0)


PROFILED_STEPS = 3  # synchronized only at the window's edges, like the timed steps


class ComputeBusy(L.Callback):
    """Profiles PROFILED_STEPS whole steps (batch start to batch start) and reports how much of them the compute
    stream spent running kernels (the union of its kernel intervals over the window's wall time)."""

    def __init__(self, step: int, out: dict) -> None:
        self.step, self.out, self.prof, self.t0 = step, out, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch
        if trainer.global_step == self.step and self.prof is None:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif (trainer.global_step == self.step + PROFILED_STEPS and self.prof is not None
              and "compute_busy" not in self.out):
            torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / PROFILED_STEPS
            self.prof.__exit__(None, None, None)
            path = Path(os.environ.get("OUT", "/tmp")) / "megatrain_step_profile.json"
            self.prof.export_chrome_trace(str(path))
            self.out.update(_busy_from_trace(path, wall))


def _busy_from_trace(path: Path, wall: float) -> dict:
    events = json.loads(path.read_text())["traceEvents"]
    by_stream: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            by_stream.setdefault(e["args"].get("stream", 0), []).append((e["ts"], e["ts"] + e["dur"]))

    def union(iv: list[tuple[float, float]]) -> float:
        total, end = 0.0, float("-inf")
        for s, t in sorted(iv):
            if t > end:
                total += t - max(s, end)
                end = t
        return total

    busy = {s: union(iv) / 1e6 for s, iv in by_stream.items()}
    compute = max(busy, key=busy.get)
    busy = {s: b / PROFILED_STEPS for s, b in busy.items()}
    return dict(profiled_step_s=round(wall, 4), compute_busy_s=round(busy[compute], 4),
                compute_busy=round(busy[compute] / wall, 3),
                other_streams_busy_s={str(s): round(b, 4) for s, b in busy.items() if s != compute})


# ---------------------------------------------------------------- the parent: alternate, collect, compare
def planner_prediction(a, devices: int) -> dict | None:
    over = [f"model={a.model}", f"data.micro_batch={a.micro_batch}", f"data.seq_len={a.seq_len}",
            f"hardware={a.planner_hardware}", "trainer=gpu", f"storage.prefetch_depth={a.prefetch_depth}",
            f"storage.checkpoint_interval={a.checkpoint_interval}", f"trainer.devices={devices}"]
    if a.untied:
        over.append("+model.tie_embeddings=false")
    if a.n_layer:
        over.append(f"+model.n_layer={a.n_layer}")
    if a.clip:
        over.append(f"trainer.gradient_clip_val={a.clip}")
    over.append(f"storage.device_state_GiB={'null' if a.device_state_GiB is None else a.device_state_GiB}")
    r = subprocess.run([sys.executable, "-m", "planner.check", *over, "--json"], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode not in (0, 1):
        print(r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(r.stdout)


def deepspeed_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True)
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.2-3b")
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--devices", default="1",
                    help="ranks (GPUs), data parallel, the batch per rank; a list (1,2,4) runs each count")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed (compilation, allocator, caches)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val (0: none)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--prefetch-depth", type=int, default=2)
    ap.add_argument("--checkpoint-interval", type=int, default=1)
    ap.add_argument("--device-state-GiB", type=float, default=None,
                    help="megatrain: GPU memory for the state of the first units (default: the strategy's auto)")
    ap.add_argument("--planner-hardware", default="h200")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    ap.add_argument("--profile", action="store_true", help="megatrain: measure compute-stream busy time")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--out", default=None, help="append each run's JSON line here")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        counts = [int(n) for n in a.devices.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--devices: GPU counts >= 1, comma-separated (1,2,4), got {a.devices!r}")
    if a.worker:
        a.devices = counts[0]  # the parent passes one count
        a.clip = a.clip or None
        result = run_one(a)
        if result:  # rank 0's
            print("RESULT " + json.dumps(result), flush=True)
        return

    systems = [s for s in a.systems.split(",") if s]
    if "deepspeed" in systems and not deepspeed_available():
        print("deepspeed does not import here: skipping it", file=sys.stderr)
        systems.remove("deepspeed")
    runs: list[dict] = []
    for r in range(a.rounds):
        order = systems[r % len(systems):] + systems[:r % len(systems)]  # alternate who goes first
        for system, devices in ((s, n) for n in counts for s in order):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--devices", str(devices), "--worker", system]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if not lines:
                    raise RuntimeError(p.stderr[-3000:])
                result = json.loads(lines[-1][7:]) | {"round": r}
            except Exception as e:  # a peer that fails or runs out of memory is a result too
                result = {"system": system, "devices": devices, "round": r, "error": str(e)[-1500:]}
            print(json.dumps(result), flush=True)
            runs.append(result)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    plans = {n: planner_prediction(a, n) for n in counts} if "megatrain" in systems else {}
    print_table(runs, plans)


def print_table(runs: list[dict], plans: dict[int, dict | None]) -> None:
    """Every run, its ratio to megatrain's median at the same GPU count; then each system's median per count and,
    with several counts, its scaling efficiency against its own median on the fewest GPUs."""
    ok = [r for r in runs if "error" not in r]

    def median(system: str, devices: int, key: str) -> float | None:
        values = [r[key] for r in ok if r["system"] == system and r.get("devices", 1) == devices]
        return statistics.median(values) if values else None

    print(f"\n{'system':<10} {'GPUs':>4} {'round':>5} {'step s':>8} {'TFLOPS':>7} {'x mt':>6} {'GPU GiB':>8} "
          f"{'RSS GiB':>8} {'B/param':>8}  planner")
    for r in runs:
        n = r.get("devices", 1)
        if "error" in r:
            print(f"{r['system']:<10} {n:>4} {r['round']:>5}  failed: "
                  f"{r['error'].splitlines()[-1][:80] if r['error'] else ''}")
            continue
        ref = median("megatrain", n, "model_tflops")
        ratio = f"{r['model_tflops'] / ref:.2f}" if ref else "-"
        plan, pl = plans.get(n), ""
        if r["system"] == "megatrain" and plan:
            pl = (f"{plan['step_time_s']:.2f} s, {plan['model_tflops']:.0f} TFLOPS, "
                  f"GPU {plan['gpu_allocated_peak_bytes'] / 2**30:.1f} GiB")
        print(f"{r['system']:<10} {n:>4} {r['round']:>5} {r['step_time_s']:>8.3f} {r['model_tflops']:>7.1f} "
              f"{ratio:>6} {r['peak_gpu_GiB'] or 0:>8.1f} {r['host_rss_GiB']:>8.1f} {r['host_bytes_per_param']:>8.1f}"
              f"  {pl}")
    counts = sorted({r.get("devices", 1) for r in ok})
    for system in dict.fromkeys(r["system"] for r in ok):
        base = next(((n, median(system, n, "tokens_per_s")) for n in counts if median(system, n, "tokens_per_s")),
                    None)
        for n in counts:
            tf, ref = median(system, n, "model_tflops"), median("megatrain", n, "model_tflops")
            if tf is None:
                continue
            line = f"median {system} on {n} GPU{'s' if n > 1 else ''}: {tf:.1f} model TFLOPS"
            if ref and system != "megatrain":
                line += f" (megatrain is {ref / tf:.2f}x)"
            if base and n != base[0]:
                line += f"; scaling efficiency {median(system, n, 'tokens_per_s') * base[0] / (n * base[1]):.2f}" \
                        f" against {base[0]}"
            print(line)


if __name__ == "__main__":
    main()
