"""What to change: from a planned step (plan.Answer) to advice, each line naming the option and what it would give,
found by planning the alternatives (a smaller RAM budget, another batch or checkpoint interval, kept state, more
tokens per step until the GPU is the bottleneck)."""

from __future__ import annotations

import math
from dataclasses import replace

from megatrain_lightning import schedule as S
from megatrain_lightning.config import FLEX_ATTENTION_TYPES
from planner.errors import PlanError
from planner import host_tiers
from planner.hardware import Hardware
from planner.plan import Answer, Tier, device_peak, keep_on_device, place, plan, ram_need
from planner.simulate import simulate
from planner.workload import GiB, Workload

COMPUTE_BOUND = 0.9  # "compute-bound": the GPU computes for at least this share of the step


def advise(a: Answer) -> Answer:
    """`a` with its advice filled in."""
    a.advice = advice(a)
    return a


def _smaller_budget(hw: Hardware, wl: Workload, ram: Tier) -> str:
    """storage=nvme short of RAM: the largest storage.ram_budget_GiB with which RAM holds the run (more layers on the
    SSD; found by bisection: RAM's need falls as layers leave it), or what RAM needs with every layer there."""
    def budget(n: int) -> float:  # holds exactly the layers left in RAM with n on the SSD
        return math.ceil((wl.unit_ram_bytes(wl.n_layers) + (wl.n_layers - n) * wl.unit_ram_bytes(0)) / GiB * 10) / 10

    def with_budget(n: int) -> Answer:
        return plan(hw, replace(wl, ram_budget_GiB=budget(n)))

    def ram_holds(answer: Answer) -> bool:
        return next(t for t in answer.tiers if t.name == "RAM").fits

    lo, hi = wl.n_nvme_layers + 1, wl.n_layers
    if lo > hi or not ram_holds(with_budget(hi)):
        return (f"RAM: even with every layer on the SSD, the embedding/head, the window and the block inputs need "
                f"{ram_need(hw, replace(wl, nvme_layers=tuple(range(wl.n_layers)))) / GiB:,.0f} GiB of "
                f"{ram.capacity_bytes / GiB:,.0f} usable")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ram_holds(with_budget(mid)) else (mid + 1, hi)
    answer = with_budget(lo)
    then = f"fits ({answer.step_time_s:.3g} s/step)" if answer.fits else f"RAM holds it ({_short_tiers(answer)})"
    return (f"RAM: short by {(ram.need_bytes - ram.capacity_bytes) / GiB:.1f} GiB with {wl.n_nvme_layers} layers on "
            f"the SSD; storage.ram_budget_GiB={budget(lo):g} puts {answer.wl.n_nvme_layers} there and {then}")


def _short_tiers(answer: Answer) -> str:
    return "; ".join(f"{t.name} short" for t in answer.tiers if not t.fits) or "fits"


def advice(a: Answer) -> list[str]:
    hw, wl = a.hw, a.wl
    out: list[str] = []
    by_name = {t.name: t for t in a.tiers}
    ram = by_name["RAM"]
    if wl.storage == "ram" and not ram.fits and wl.ranks > 1:
        out.append(f"RAM: this node's share of the state needs {ram.need_bytes / GiB:,.0f} GiB of "
                   f"{ram.capacity_bytes / GiB:,.0f} usable; more nodes (trainer.num_nodes) split it further, "
                   "or storage=nvme puts layers' state on the SSD")
    elif wl.storage == "ram" and not ram.fits:
        nv = place(hw, replace(wl, storage="nvme", stream="copy"))
        nv_ram = ram_need(hw, nv)
        alt = (f"storage=nvme (puts {nv.n_nvme_layers} of {wl.n_layers} layers' state, "
               f"{host_tiers.nvme_bytes(nv) / 1e12:.2f} TB, on the SSD)" if nv_ram <= ram.capacity_bytes else
               f"not storage=nvme: even with every layer's state on the SSD RAM needs {nv_ram / GiB:,.0f} GiB")
        out.append(f"RAM: the state needs {ram.need_bytes / GiB:,.0f} GiB of {ram.capacity_bytes / GiB:,.0f} usable; "
                   f"use a host with >= {(ram.need_bytes / GiB + hw.host_reserved_GiB) * 1.02:,.0f} GiB RAM; {alt}")
    if wl.storage == "nvme" and wl.n_nvme_layers:
        full = ram_need(hw, replace(wl, storage="ram", nvme_layers=(), offload_checkpoints=True))
        out.append(f"NVMe: {wl.n_nvme_layers} of {wl.n_layers} layers keep all their state on the SSD "
                   f"({host_tiers.nvme_bytes(wl) / 1e12:.2f} TB); >= {(full / GiB + hw.host_reserved_GiB) * 1.02:,.0f} "
                   "GiB of RAM would keep everything in RAM")
        if not ram.fits:
            out.append(_smaller_budget(hw, wl, ram))
    if "NVMe" in by_name and not by_name["NVMe"].fits:
        out.append(f"NVMe: needs {by_name['NVMe'].need_bytes / 1e12:.2f} TB of free SSD, has "
                   f"{hw.nvme_capacity_TB:g} TB")
    if wl.resolved_stream == "master" and wl.cb == 2 and not wl.lora_r:  # LoRA: the base streams in bf16 anyway
        out.append("stream: the fp32 master streams (4 bytes per parameter over PCIe instead of 2, the device casts; "
                   "the host's update is then AdamW alone); storage.stream=copy keeps a bf16 copy in RAM instead")
    if "GPU" in by_name and not by_name["GPU"].fits:
        asked = a.asked or wl  # alternatives are placed afresh: the batch and K move the chunk and the offload
        mb = _largest(lambda m: _gpu_fits(hw, place(hw, replace(asked, micro_batch=m))), wl.micro_batch - 1)
        if mb:
            fix = (f"data.micro_batch={mb} fits (raise trainer.accumulate_grad_batches to keep the tokens per "
                   "step)")
        elif _gpu_fits(hw, replace(wl, micro_batch=1, seq_len=min(wl.seq_len, 128), token_chunk=None)):
            fix = "even micro-batch 1 does not fit: shorten data.seq_len"
        else:  # what does not depend on the batch: weights in their slots, a layer's gradients, the resident copy
            slots = wl.n_slots * wl.slot_bytes / GiB
            k1 = replace(asked, checkpoint_interval=1)
            mb1 = _largest(lambda m: _gpu_fits(hw, place(hw, replace(k1, micro_batch=m))), wl.micro_batch) \
                if wl.checkpoint_interval > 1 else 0
            fix = (f"no batch fits: the largest layer ({wl.model.max_layer_params / 1e9:.3g}B parameters) takes "
                   f"{slots:.1f} GiB in its {wl.n_slots} weight slots before any activation"
                   + (", with its gradients on top; " if wl.layer_trainable else "; ") + (f"storage.checkpoint_interval=1 (fewer slots) fits data.micro_batch={mb1}" if mb1 else
                              "streaming below a whole layer (expert by expert) is not supported" if wl.model.n_experts
                              else "a GPU with more memory"))
        out.append(f"GPU: {by_name['GPU'].need_bytes / GiB:.1f} GiB needed of {hw.hbm_GiB:g}; {fix}")
    if "GPU" in by_name and by_name["GPU"].fits:
        asked = a.asked or wl
        # more layers a block: more slots and a block's activations (monotone): bisected
        k = _largest(lambda k: _gpu_fits(hw, place(hw, replace(asked, checkpoint_interval=k))), wl.n_layers)
        if k and k != wl.checkpoint_interval:
            out.append(f"checkpoint interval: up to storage.checkpoint_interval={k} fits the GPU "
                       f"(now {wl.checkpoint_interval})")
    ckpt = wl.plan.n_checkpoints * wl.checkpoint_bytes
    if not hw.unified and not wl.offload_checkpoints:
        out.append(f"block inputs: {ckpt / GiB:.1f} GiB stay on the GPU (storage.offload_checkpoints=false, or auto "
                   "and RAM has no room for them): GPU memory grows with depth")
    if wl.offload_checkpoints == "disk":
        read, write = (ckpt / (r * 1e9) for r in (hw.nvme_array_read_GBps, hw.nvme_array_write_GBps))
        out.append(f"block inputs: {ckpt / GiB:.1f} GiB a micro-batch go to the drives and back (RAM has no room "
                   f"for them, or storage.offload_checkpoints=disk): {write:.1f} s of writing and {read:.1f} s of "
                   "reading, behind compute")
        if wl.ram_budget_GiB is None:
            room = _budget_for_block_inputs(hw, wl, ckpt, a.step_time_s)
            if room is not None:
                out.append(f"block inputs: storage.ram_budget_GiB={room[0]:g} keeps them in RAM (more layers on the "
                           f"SSD instead): {room[1]:.3g} s a step")
    if not hw.unified and wl.storage == "ram" and wl.device_state_GiB is not None:
        auto = keep_on_device(hw, replace(wl, device_state_GiB=None))
        t = simulate(hw, auto).step_time_s
        if len(auto.kept) > len(wl.kept) and t < 0.95 * a.step_time_s:
            layers = len([i for i in auto.kept if i < wl.n_layers])
            out.append(f"device state: storage.device_state_GiB=null (auto: {auto.kept_bytes / GiB:.0f} GiB of GPU "
                       f"memory for the state of {layers} of {wl.n_layers} layers"
                       f"{' and the embedding/head' if wl.n_layers in auto.kept else ''}, updated on the GPU) "
                       f"predicts {t:.2f} s per step: those updates no longer wait for the host")
    if not hw.unified and wl.model.eager_attention:
        out.append(_fused_attention(a))
    if wl.model.n_experts:
        out.append(f"experts: FLOPs count {wl.model.experts_per_token} of {wl.model.n_experts} experts per token with "
                   "balanced routing; the engine streams every expert, and a skewed router lengthens the GPU's part "
                   "by its imbalance (the busiest expert's share over the mean)")
    lane, share = a.bottleneck
    if lane != S.COMPUTE:
        mb, acc = _compute_bound(hw, wl)
        if mb:
            out.append(f"compute-bound (GPU busy >= {COMPUTE_BOUND:.0%}) from data.micro_batch={mb} with "
                       f"trainer.accumulate_grad_batches={acc} ({mb * wl.seq_len * acc:,} tokens per step)")
        else:
            out.append(f"no micro-batch that fits makes the step compute-bound: {lane_words(lane)} limits it")
    if lane == S.CPU:
        opt = a.timeline.busy_s(S.CPU, S.OPTIMIZER)
        out.append(f"CPU: the host optimizer takes {opt:.2f} s of the {a.step_time_s:.2f} s step "
                   f"({hw.node_adamw_Gparams(wl.ranks_per_node):g} Gparam/s); more tokens per step amortize it")
    if lane in (S.NVME_READ, S.NVME_WRITE):
        out.append(f"SSD: {lane_words(lane)} is busy {share:.0%} of the step; a faster SSD or more RAM "
                   "(fewer layers on it) shortens the step")
    if lane in (S.COLLECTIVE, S.NETWORK):
        out.append(f"ranks: {lane_words(lane)} {'are' if lane == S.COLLECTIVE else 'is'} busy {share:.0%} of the "
                   "step; a larger micro-batch per rank carries the same bytes per layer over more tokens")
        if lane == S.COLLECTIVE and wl.nodes > 1 and not wl.replicate_nodes:
            rep = check_replicated(hw, a.asked or wl)
            if rep is not None:
                out.append(f"storage.replicate_nodes=true: every node holds the whole state ({rep[0] / GiB:,.0f} GiB "
                           f"of RAM a node) and only gradients cross the network: {rep[1]:.2f} s a step")
    return out


def _fused_attention(a: Answer) -> str:
    """A transformers model on eager attention on a GPU (chosen: train.py builds it fused there): the same run with
    the fused implementation of its family (flex_attention for gpt-oss's sinks, else SDPA), planned."""
    asked = a.asked or a.wl
    fused = "flex_attention" if asked.model.transformers_type in FLEX_ATTENTION_TYPES else "sdpa"
    alt = plan(a.hw, replace(asked, model=replace(asked.model, attn_implementation=fused)))
    gpu = next(t for t in alt.tiers if t.name == "GPU")
    then = f"{alt.step_time_s:.3g} s per step, {gpu.need_bytes / GiB:.1f} GiB GPU" if alt.fits else \
        f"does not fit either ({_short_tiers(alt)})"
    return (f"attention: eager (model.attn_implementation=eager) materializes [heads, T, T + 1] scores "
            f"({a.wl.scores_bytes_per_token * a.wl.seq_len / GiB:.2f} GiB a sequence, each layer) and leaves the "
            f"layers uncompiled; model.attn_implementation={fused} runs it fused and compiled: {then}")


def check_replicated(hw: Hardware, asked: Workload) -> tuple[float, float] | None:
    """(RAM a node, step seconds) with storage.replicate_nodes=true, if it fits."""
    alt = plan(hw, replace(asked, replicate_nodes=True))
    ram = next(t for t in alt.tiers if t.name == "RAM")
    return (ram.need_bytes, alt.step_time_s) if alt.fits else None


def lane_words(lane: str) -> str:
    return {S.COMPUTE: "GPU compute", S.H2D: "the host-to-device link", S.D2H: "the device-to-host link",
            S.CPU: "the host CPU (optimizer, casts, gradient accumulation)", S.NVME_READ: "SSD reads",
            S.NVME_WRITE: "SSD writes",
            S.COLLECTIVE: "the GPU-to-GPU broadcasts and reductions (NVLink, or the network between nodes)",
            S.NETWORK: "the network between nodes (each layer's gradient summed across the replicas)"}[lane]


def _gpu_fits(hw: Hardware, wl: Workload) -> bool:
    return hw.unified or device_peak(hw, wl) <= hw.hbm_GiB * GiB


def _largest(ok, hi: int) -> int:
    """Largest m in [1, hi] with ok(m) (ok is monotone: true up to some point), 0 if none."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _budget_for_block_inputs(hw: Hardware, wl: Workload, ckpt: int, step_s: float) -> tuple[float, float] | None:
    """storage=nvme with the auto budget fills RAM with layers before the block inputs ask for it (they are placed at
    the first forward), so they go to the drives: the budget, in whole GiB, that leaves them room in RAM and its
    step time, if one does and the step is shorter by 2% or more."""
    h = host_tiers.host_bytes(wl)
    budget = int((h["state"] + h.get("stream_copy", 0) - ckpt) // GiB)
    if budget <= 0:
        return None
    try:
        alt = place(hw, replace(wl, ram_budget_GiB=float(budget), offload_checkpoints=None))
    except PlanError:
        return None
    if alt.offload_checkpoints is not True:
        return None
    t = simulate(hw, alt).step_time_s
    return (float(budget), t) if t < 0.98 * step_s else None


def _compute_bound(hw: Hardware, wl: Workload) -> tuple[int, int]:
    """(micro-batch, accumulation) with the fewest tokens per step at which the GPU computes for at least
    COMPUTE_BOUND of the step while its memory fits: the micro-batch first (powers of two, then bisected),
    else more accumulation; (0, 0) if neither gets there."""
    def share(w: Workload) -> float:
        t = simulate(hw, w)
        return t.busy_s(S.COMPUTE) / t.step_time_s

    m = 1
    while m <= 4096 and _gpu_fits(hw, replace(wl, micro_batch=m, accumulate=1)):
        if share(replace(wl, micro_batch=m)) >= COMPUTE_BOUND:
            lo, hi = m // 2 + 1, m
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if share(replace(wl, micro_batch=mid)) >= COMPUTE_BOUND else (mid + 1, hi)
            return hi, wl.accumulate
        m *= 2
    # accumulation adds whole micro-batches to a step whose optimizer cost is fixed: extrapolate from two
    t1, t2 = simulate(hw, replace(wl, accumulate=1)), simulate(hw, replace(wl, accumulate=2))
    c1, d = t1.busy_s(S.COMPUTE), t2.step_time_s - t1.step_time_s
    if d <= 1e-9 * t1.step_time_s:  # a micro-batch more costs nothing yet (e.g. the SSD bounds the step)
        return wl.micro_batch, int(-(-t1.step_time_s // (c1 * COMPUTE_BOUND)) + 1)
    if c1 / d < COMPUTE_BOUND * 1.0001:
        return 0, 0
    a = max(1, -(-(COMPUTE_BOUND * (t1.step_time_s - d)) // (c1 - COMPUTE_BOUND * d)))
    return wl.micro_batch, int(a)
