"""Times training steps of a preset with the megatrain strategy and reports step time, model TFLOPS,
peak device memory and host bytes per parameter. One JSON line per run on stdout (and --out). A mixture preset
(gpt-oss-120b, qwen3-235b-a22b, ...) runs as the transformers model of its exact layer shape.

  python bench/step.py --model llama-3.2-3b --untied --micro-batch 8 --accumulate 4 --seq-len 1024 --steps 5

With --devices N (data parallel, one process a GPU: Lightning's launcher starts the others by re-running this
command) the batch is per rank, tokens count every rank's, and rank 0 prints the line with every rank's host RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning.config import Config
from megatrain_lightning.options import DEFAULT_NVME_DIR
from megatrain_lightning.models.lm import CausalLM


class RandomTokens(Dataset):
    def __init__(self, vocab: int, seq_len: int, n: int) -> None:
        self.vocab, self.seq_len, self.n = vocab, seq_len, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.seq_len + 1,), generator=torch.Generator().manual_seed(i))


class StepTimer(L.Callback):
    """Time at the end of each optimizer step. The device is synchronized only after the steps in `sync_at`
    (global step counts): a synchronize after every step would also wait for work a step leaves to overlap the
    next one (write-through of device-kept state), which is not what training does. Time a window of steps
    between two synchronized ones: its mean is the throughput."""

    def __init__(self, sync_at: set[int] | None = None, start: int = 1) -> None:
        """`start`: the step whose end opens the window (the steps before it are the warm-up)."""
        self.times: list[float] = []
        self.sync_at, self.start = sync_at, start
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.global_step < self.start:
            return
        if torch.cuda.is_available() and (self.sync_at is None or trainer.global_step in self.sync_at):
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class PeakMemory(L.Callback):
    """Records the CUDA allocator's history over one step (torch.cuda.memory._record_memory_history) and names what
    is live at that step's peak of allocated bytes: sizes summed by the first frame inside this project."""

    def __init__(self, step: int = 1, top: int = 12) -> None:
        self.step, self.top = step, top
        self.report: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != self.step:
            return
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, top = live_at_peak([e for trace in snap["device_traces"] for e in trace], self.top)
        self.report = {"before_step_GiB": round(self._base / 2**30, 3),
                       "step_peak_over_start_GiB": round(peak / 2**30, 3),
                       "live_at_peak": top}


class OpProfile(L.Callback):
    """torch.profiler over one step (batch `step`, after the warm-up): the device time of the top operators, to say
    what a layer's compute is made of (attention, experts, routing) where the engine's trace gives only spans."""

    def __init__(self, step: int, top: int = 25) -> None:
        self.step, self.top = step, top
        self.report: list[dict] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != self.step:
            return
        torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        ops = sorted(self._prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        self.report = [{"op": e.key[:80], "calls": e.count, "device_ms": round(e.device_time_total / 1e3, 2)}
                       for e in ops[:self.top] if e.device_time_total > 0]


def live_at_peak(events: list[dict], top: int) -> tuple[int, dict[str, float]]:
    """The peak of allocated bytes over an allocator trace (relative to its start) and the GiB live then, summed by
    the first frame inside this project."""
    level, peak, at = 0, 0, -1
    for k, e in enumerate(events):
        level += e["size"] if e["action"] == "alloc" else -e["size"] if e["action"] == "free_completed" else 0
        if level > peak:
            peak, at = level, k
    live: dict[int, dict] = {}
    for e in events[:at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, int] = {}
    for e in live.values():
        frame = next((f for f in e.get("frames", []) if "megatrain_lightning" in f["filename"]), None)
        key = f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}" if frame else "outside the project"
        groups[key] = groups.get(key, 0) + e["size"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return peak, {k: round(v / 2**30, 3) for k, v in ranked}


class PlainHFCausalLM:
    """--plain: HFCausalLM with the transformers model's own activation checkpointing (one decoder layer at a time,
    non-reentrant), as plain single-GPU training of a large model runs."""

    def __new__(cls, *args, **kwargs):
        from megatrain_lightning.hf.model import HFCausalLM

        class Plain(HFCausalLM):
            def configure_model(self) -> None:
                super().configure_model()
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        return Plain(*args, **kwargs)


def with_implementations(lm, experts: str | None, attention: str | None):
    """`lm.configure_model` that also sets the transformers model's experts and attention implementations (--experts,
    --attention)."""
    build = lm.configure_model

    def configure_model() -> None:
        build()
        if experts:
            lm.model.set_experts_implementation(experts)
        if attention:
            lm.model.set_attn_implementation(attention)
    return configure_model


class Plain:
    """What the report reads of the megatrain strategy, for a --plain run (no host store, no engine)."""

    def __init__(self, trainer) -> None:
        from types import SimpleNamespace

        params = list(trainer.lightning_module.parameters())
        self.store = SimpleNamespace(nbytes=0, stream=None, units=[SimpleNamespace(
            on_disk=False, layout=SimpleNamespace(numel=sum(p.numel() for p in params),
                                                  trainable=sum(p.numel() for p in params if p.requires_grad)))])
        self.engine = SimpleNamespace(device_states=None, step_cache=None, host_checkpoints=None,
                                      sweep=SimpleNamespace(chunk_of={}), kept=SimpleNamespace(blocks=None))
        self.nvme_log = []


class FrozenLM(CausalLM):
    """CausalLM whose parameters matching a pattern are frozen once built (before the strategy takes them)."""

    def __init__(self, pattern: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pattern = re.compile(pattern)

    def configure_model(self) -> None:
        super().configure_model()
        for name, p in self.named_parameters():
            if self.pattern.search(name):
                p.requires_grad_(False)


def traced(path: Path) -> dict:
    """From a traced step: how long the compute stream was busy (the union of its spans; the trace runs on until the
    step's host updates end, behind the next forward), each lane's kind of work likewise, and how many times each
    layer's weights came in and each unit's gradients went out."""
    trace = json.loads(path.read_text())

    def union(events) -> float:  # seconds covered by the spans (overlaps counted once)
        busy, reach = 0.0, 0.0
        for start, end in sorted((e["start"], e["end"]) for e in events):
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return busy

    busy = union(e for e in trace["events"] if e["lane"] == "compute")
    kinds = sorted({(e["lane"], e["kind"]) for e in trace["events"]})
    by_kind = {f"{lane}/{kind}": round(union(e for e in trace["events"] if (e["lane"], e["kind"]) == (lane, kind)), 4)
               for lane, kind in kinds}
    def per_layer(lane: str, kind: str) -> list[int]:  # the distinct counts over layers (units): [1] = once each
        return sorted(set(Counter(e["layer"] for e in trace["events"]
                                  if e["lane"] == lane and e["kind"] == kind and e["layer"] >= 0).values()))

    return dict(traced_step_s=round(trace["step_time_s"], 4), compute_busy_s=round(busy, 4), busy_by_kind_s=by_kind,
                loads_per_layer=per_layer("h2d", "load"), grads_out_per_unit=per_layer("d2h", "grad"))


def predicted(a, config: Config) -> dict:
    """The planner's answer for the same run (same conf/ tree train.py composes)."""
    from planner.check import check, compose

    overrides = [f"model={a.model}", f"hardware={a.plan}", "trainer=gpu", f"trainer.precision={a.precision}",
                 f"trainer.devices={a.devices}",
                 f"data.seq_len={a.seq_len}", f"data.micro_batch={a.micro_batch}",
                 f"trainer.accumulate_grad_batches={a.accumulate}", "trainer.gradient_clip_val=1.0",
                 f"+model.n_layer={config.n_layer}", f"+model.tie_embeddings={str(config.tie_embeddings).lower()}",
                 f"+model.max_seq_len={config.max_seq_len}",
                 f"storage={a.storage}", f"storage.checkpoint_interval={a.checkpoint_interval}",
                 f"storage.prefetch_depth={a.prefetch_depth}", f"storage.stream={a.stream}",
                 f"storage.device_state_GiB={'null' if a.device_state_GiB is None else a.device_state_GiB}",
                 f"storage.chunk_tokens={'null' if a.chunk_tokens is None else a.chunk_tokens}",
                 f"storage.step_cache_GiB={'null' if a.step_cache_GiB is None else a.step_cache_GiB}",
                 f"storage.offload_checkpoints={'null' if a.offload_checkpoints == 'auto' else a.offload_checkpoints}"]
    if a.ram_budget_GiB is not None:
        overrides.append(f"storage.ram_budget_GiB={a.ram_budget_GiB}")
    if a.keep_activations is not None:
        overrides.append(f"storage.keep_activations={a.keep_activations}")
    if a.compile != "auto":
        overrides += [f"storage.compile={'true' if a.compile == 'true' else 'false'}"]
    if a.attention:
        overrides.append(f"++model.attn_implementation={a.attention}")  # in the preset or not
    ans = check(compose(overrides))
    return dict(planner_step_s=round(ans.step_time_s, 4), planner_kept_blocks=ans.wl.kept_blocks, planner_compute_share=round(ans.compute_share, 4),
                planner_gpu_GiB=round(ans.timeline.gpu_peak_bytes / 2**30, 2), planner_fits=ans.fits,
                planner_chunk_sequences=ans.wl.chunk_sequences)


def block_inputs(host) -> dict | None:
    """Where the last forward's block inputs waited, and the bytes spilled to the drives over the run."""
    if host is None or not host.active:
        return {"where": "device"}
    if not host.on_disk:
        return {"where": "host"}
    return {"where": "disk", "GB_written": round(host.files.bytes_written / 1e9, 2),
            "GB_read": round(host.files.bytes_read / 1e9, 2)}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


OFFLOAD = {"auto": None, "true": True, "false": False, "disk": "disk"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n-layer", type=int, default=None, help="truncate depth (same layer shape)")
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--devices", type=int, default=1, help="ranks (GPUs, or CPU processes), data parallel")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per rank")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--checkpoint-interval", type=int, default=1)
    ap.add_argument("--prefetch-depth", type=int, default=2)
    ap.add_argument("--stream", default="auto", choices=["auto", "copy", "master"])
    ap.add_argument("--storage", default="ram", choices=["ram", "nvme"])
    ap.add_argument("--ram-budget-GiB", type=float, default=None, help="storage=nvme: RAM for per-layer fp32 state")
    ap.add_argument("--nvme-dir", default=DEFAULT_NVME_DIR)
    ap.add_argument("--device-state-GiB", type=float, default=None, help="GPU memory for kept state (default: auto)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="the batch sweep's chunk (default: auto)")
    ap.add_argument("--step-cache-GiB", type=float, default=None,
                    help="with --accumulate > 1: GPU memory for weights and gradient sums kept for a step (default: auto)")
    ap.add_argument("--offload-checkpoints", default="auto", choices=["auto", "true", "false", "disk"],
                    help="where block inputs wait for backward (default: the engine's auto)")
    ap.add_argument("--plan", default=None, metavar="PRESET",
                    help="also report the planner's prediction for this run on conf/hardware/PRESET.yaml")
    ap.add_argument("--freeze", default=None, metavar="REGEX",
                    help="requires_grad=False for parameters whose name matches (e.g. a LoRA-style frozen base)")
    ap.add_argument("--as-transformers", action="store_true",
                    help="a Llama-family preset as the transformers model of its config.json (the path a user's "
                         "transformers model takes), against its native run")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="LoRA of rank R (alpha 2R) on every linear layer of the decoder layers, the base frozen in "
                         "the compute dtype (conf/lora, models/lora.py)")
    ap.add_argument("--plain", action="store_true",
                    help="the same LightningModule under Lightning's default single-device strategy: everything on "
                         "the GPU, AdamW there, activation checkpointing per decoder layer (transformers models)")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="blocks through torch.compile (auto: the engine's default, on for CUDA)")
    ap.add_argument("--keep-activations", type=int, default=None, metavar="N",
                    help="the last N blocks keep their activations (default: the engine's auto; 0: recompute all)")
    ap.add_argument("--experts", default=None, metavar="IMPL",
                    help="a transformers mixture's experts implementation (set_experts_implementation: eager, "
                         "grouped_mm, batched_mm, ...); default: transformers' choice (grouped_mm where it dispatches)")
    ap.add_argument("--attention", default=None, metavar="IMPL",
                    help="a transformers model's attention implementation (set_attn_implementation: eager, sdpa, "
                         "flex_attention, ...); default: the project's (Config.attention: transformers' choice, "
                         "flex_attention for gpt-oss on CUDA)")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--memory-peak", action="store_true",
                    help="CUDA: name what is live at the second step's peak of allocated memory")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: the device time of the top operators over the first measured step (torch.profiler)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    overrides = {"tie_embeddings": False} if a.untied else {}
    if a.n_layer:
        overrides["n_layer"] = a.n_layer
    if a.seq_len > Config.from_name(a.model).max_seq_len:  # long context: the rotary tables reach the sequence
        overrides["max_seq_len"] = a.seq_len
    config = Config.from_name(a.model, **overrides)
    accel = "gpu" if torch.cuda.is_available() else "cpu"
    strategy = "auto" if a.plain else MegatrainStrategy(checkpoint_interval=a.checkpoint_interval, prefetch_depth=a.prefetch_depth, stream=a.stream,
                                 storage=a.storage, ram_budget_GiB=a.ram_budget_GiB, nvme_dir=a.nvme_dir,
                                 device_state_GiB=a.device_state_GiB, chunk_tokens=a.chunk_tokens,
                                 step_cache_GiB=a.step_cache_GiB, trace_dir=a.trace_dir, trace_step=2,
                                 offload_checkpoints=OFFLOAD[a.offload_checkpoints],
                                 compile={"auto": None, "true": True, "false": False}[a.compile],
                                 keep_activations=a.keep_activations)
    # warm-up: step 1 (compiles, and measures a block for keep_activations' auto) and step 2 (the first to keep
    # activations: their memory is allocated then); the window is steps 3 .. steps + 2
    warm = 2
    timer = StepTimer(sync_at={warm, a.steps + warm}, start=warm)
    peak = PeakMemory(step=a.accumulate) if a.memory_peak and torch.cuda.is_available() else None
    ops = OpProfile(step=warm * a.accumulate) if a.profile and torch.cuda.is_available() else None
    trainer = L.Trainer(strategy=strategy, accelerator=accel, devices=a.devices, precision=a.precision,
                        max_steps=a.steps + warm, accumulate_grad_batches=a.accumulate, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer] + [c for c in (peak, ops) if c])
    data = DataLoader(RandomTokens(config.vocab_size, a.seq_len,
                                   (a.steps + warm) * a.accumulate * a.micro_batch * a.devices),
                      batch_size=a.micro_batch)  # no workers: a fork would copy-on-write the store
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hp = dict(lr=1e-4, warmup_steps=1, max_steps=a.steps + warm, lora=dict(r=a.lora, alpha=2 * a.lora))
    if config.transformers_type or a.as_transformers:  # the transformers model of the preset's layer shape
        from megatrain_lightning.hf.model import HFCausalLM, config_json

        lm = (PlainHFCausalLM if a.plain else HFCausalLM)(
            config, config_json(config) if config.transformers_type else config.to_hf("float32"), **hp)
        if a.experts or a.attention:
            lm.configure_model = with_implementations(lm, a.experts, a.attention)
    else:
        lm = FrozenLM(a.freeze, config, **hp) if a.freeze else CausalLM(config, **hp)
    trainer.fit(lm, train_dataloaders=data)
    wall = time.perf_counter() - t0
    tokens = a.micro_batch * a.accumulate * a.seq_len * a.devices  # every rank's
    if a.plain:
        strategy = Plain(trainer)
    mine = (rss_bytes(), strategy.store.nbytes)
    per_rank = [mine]
    if dist.is_initialized():  # every rank's host memory (the store is split between them)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
    rss, stores = [r for r, _ in per_rank], [b for _, b in per_rank]
    if not trainer.is_global_zero:
        return
    step = statistics.fmean(timer.times)  # the window between two synchronizations: its mean is the throughput
    result = dict(model=a.model, as_transformers=bool(config.transformers_type or a.as_transformers),
                  n_layer=config.n_layer, untied=a.untied, n_params=config.n_params,
                  device=torch.cuda.get_device_name() if accel == "gpu" else "cpu", precision=a.precision,
                  devices=a.devices, micro_batch=a.micro_batch, accumulate=a.accumulate, seq_len=a.seq_len, tokens_per_step=tokens,
                  checkpoint_interval=a.checkpoint_interval, prefetch_depth=a.prefetch_depth,
                  step_times_s=[round(t, 4) for t in timer.times], step_time_s=round(step, 4),
                  tokens_per_s=round(tokens / step, 1), model_tflops=round(6 * config.active_params * tokens / step / 1e12, 1),
                  peak_gpu_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if accel == "gpu" else None,
                  host_rss_GiB=round(rss[0] / 2**30, 2), host_rss_per_rank_GiB=[round(r / 2**30, 2) for r in rss],
                  host_peak_rss_GiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  host_bytes_per_param=round(sum(rss) / config.n_params, 2),
                  store_bytes_per_param=round(sum(stores) / config.n_params, 2), stream=strategy.store.stream,
                  wall_s=round(wall, 1), storage=a.storage, device_units=len(strategy.engine.device_states.units)
                  if strategy.engine.device_states else 0,
                  nvme_layers=sum(u.on_disk for u in strategy.store.units), freeze=a.freeze,
                  frozen_params=sum(u.layout.numel - u.layout.trainable for u in strategy.store.units),
                  lora=a.lora, plain=a.plain, compile=a.compile,
                  experts=getattr(getattr(getattr(lm, "model", None), "config", None),
                                  "_experts_implementation_internal", None),
                  attention=getattr(getattr(getattr(lm, "model", None), "config", None), "_attn_implementation", None),
                  nvme_per_step=[{k: round(v, 3) for k, v in r.items()} for r in strategy.nvme_log],
                  chunk_sequences=next(iter(strategy.engine.sweep.chunk_of.values()), None),
                  step_cached_units=len(strategy.engine.step_cache.units) if strategy.engine.step_cache else 0,
                  block_inputs=block_inputs(strategy.engine.host_checkpoints),
                  kept_blocks=strategy.engine.kept.blocks)
    if peak is not None:
        result["memory_peak"] = peak.report
    if ops is not None:
        result["op_profile"] = ops.report
    if a.trace_dir:
        result.update(traced(Path(a.trace_dir) / "step2.json"))
        result["compute_share"] = round(result["compute_busy_s"] / step, 4)  # of the measured step
    if a.plan:
        result.update(predicted(a, config))
    line = json.dumps(result)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
