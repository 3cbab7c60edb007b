"""From a machine and a run to an answer: where the state goes, each tier's peak, the step time, the
bottleneck and what to change."""

from __future__ import annotations

import math

from dataclasses import dataclass, field, replace

from megatrain_lightning import schedule as S
from megatrain_lightning.config import EAGER_ATTENTION_TYPES
from megatrain_lightning.options import OptionError
from megatrain_lightning import options as _options
from planner.errors import PlanError
from planner.hardware import Hardware
from planner.simulate import simulate
from planner.timeline import Timeline
from planner.workload import GiB, Workload

COMPUTE_BOUND = 0.9  # "compute-bound": the GPU computes for at least this share of the step


@dataclass(frozen=True)
class Tier:
    name: str
    need_bytes: int
    capacity_bytes: int
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.capacity_bytes

    @property
    def short_bytes(self) -> int:
        return max(0, self.need_bytes - self.capacity_bytes)


@dataclass
class Answer:
    hw: Hardware
    wl: Workload  # with storage placement resolved
    timeline: Timeline
    tiers: list[Tier]
    busy_s: dict[str, float]
    advice: list[str] = field(default_factory=list)
    asked: Workload | None = None  # the workload as given, before placement (what alternatives re-place from)

    @property
    def fits(self) -> bool:
        return all(t.fits for t in self.tiers)

    @property
    def step_time_s(self) -> float:
        return self.timeline.step_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.wl.step_tokens / self.step_time_s

    @property
    def model_tflops(self) -> float:
        return self.wl.model_flops_per_step / self.step_time_s / 1e12

    @property
    def bottleneck(self) -> tuple[str, float]:
        lane = max(self.busy_s, key=self.busy_s.get)
        return lane, self.busy_s[lane] / self.step_time_s

    @property
    def compute_share(self) -> float:
        return self.busy_s[S.COMPUTE] / self.step_time_s


def usable_ram_bytes(hw: Hardware) -> int:
    return int((hw.host_ram_GiB - hw.host_reserved_GiB) * GiB)


def place(hw: Hardware, wl: Workload) -> Workload:
    """Resolves storage.stream=auto, the units whose state the GPU keeps and, for storage=nvme, how many layers keep
    their state on the SSD."""
    if wl.nodes > 1 and hw.network_GBps is None:
        raise PlanError("hardware.network_GBps", f"trainer.num_nodes={wl.nodes} needs the network's bandwidth between "
                                                 "nodes (GB/s per node, e.g. 50 for 400 Gb/s InfiniBand)")
    c = wl.model
    if hw.unified and c.attn_implementation == "flex_attention" and c.transformers_type in EAGER_ATTENTION_TYPES:
        raise PlanError("model.attn_implementation", f"flex_attention: transformers runs {c.transformers_type}'s "
                                                     "attention sinks through flex attention on CUDA only, and this "
                                                     "hardware has no GPU; leave it unset (eager there)")
    return _keep_activations(hw, _offload_when_room(hw, _sweep_chunk(hw, _keep_grads(hw, _place_state(
        hw, _compile(hw, wl))))))


def _keep_activations(hw: Hardware, wl: Workload) -> Workload:
    """The engine's rule (engine/kept_graphs.py): the last blocks keep their activations, as many as fit beside the
    step's peak without them (schedule.blocks_to_keep); none while the sweep cuts the batch, on the CPU, or with
    several ranks unless asked."""
    n_blocks = len(wl.plan.blocks)
    if wl.n_chunks > 1:
        return wl
    if wl.keep_activations is not None:
        return replace(wl, kept_blocks=min(wl.keep_activations, n_blocks))
    if hw.unified or wl.ranks > 1:
        return wl
    k = wl.checkpoint_interval
    per_block = k * (wl.kept_layer_bytes + wl.slot_bytes)
    return replace(wl, kept_blocks=S.blocks_to_keep(n_blocks, hw.hbm_GiB * GiB, device_peak(hw, wl), per_block))


def _compile(hw: Hardware, wl: Workload) -> Workload:
    """The engine's default (strategy: torch.compile on for a CUDA device, this project's model and transformers
    models alike, except where attention materializes its scores)."""
    if wl.compile is not None:
        return wl
    return replace(wl, compile=not hw.unified and not wl.model.eager_attention)


def _gpu_free_bytes(hw: Hardware, wl: Workload) -> float:
    """GPU memory left by the resident copy, the weight slots, the CUDA context and the kept state."""
    return max(0.0, hw.hbm_GiB * GiB - hw.gpu_reserved_GiB * GiB - wl.resident_bytes - wl.n_slots * wl.slot_bytes
               - wl.kept_bytes - wl.cached_bytes)


def _keep_grads(hw: Hardware, wl: Workload) -> Workload:
    """The engine's rule (strategy._keep_step_cache): with accumulation, units whose weights and fp32 gradient sums
    stay on the GPU for the step, within step_cache_GiB (auto: 40% of what the kept state leaves)."""
    if hw.unified or wl.accumulate < 2:
        return replace(wl, cached=())
    budget = wl.step_cache_GiB
    if budget is None:
        budget = S.AUTO_DEVICE_SHARE * _gpu_free_bytes(hw, replace(wl, cached=())) / GiB
    need = [wl.cache_unit_bytes(i) for i in range(wl.n_layers + 1)]
    return replace(wl, cached=tuple(S.device_units(need, budget * GiB, skip=set(wl.kept))))


def _sweep_chunk(hw: Hardware, wl: Workload) -> Workload:
    """The engine's rule (engine._chunks): sequences per chunk from storage.chunk_tokens, or from the GPU memory
    free at the first forward; resolved as a cap that data.micro_batch then bounds."""
    free = float("inf") if hw.unified else _gpu_free_bytes(hw, wl)
    per_token = wl.model.hidden_size * wl.cb
    k = wl.checkpoint_interval
    cap = S.chunk_sequences(2**31, wl.seq_len, wl.chunk_tokens, per_token, free, k, wl.scores_bytes_per_token)
    tokens = S.token_chunk(wl.seq_len, wl.chunk_tokens, per_token, free, k) if cap == 1 else None
    return replace(wl, chunk_cap=cap, token_chunk=tokens)


def _keep_on_device(hw: Hardware, wl: Workload) -> Workload:
    """The engine's rule (strategy._keep_device_states): units in forward order within device_state_GiB (auto: 40%
    of the GPU memory left by the resident copy, the weight slots and the CUDA context); never a file-backed layer
    (its state is in its file), and only on a separate device."""
    if hw.unified:
        return replace(wl, kept=())
    budget = wl.device_state_GiB
    if budget is None:
        free = hw.hbm_GiB * GiB - hw.gpu_reserved_GiB * GiB - wl.resident_bytes - wl.n_slots * wl.slot_bytes
        budget = S.AUTO_DEVICE_SHARE * max(free, 0) / GiB
    sizes = [wl.unit_device_state_bytes(i) for i in range(wl.n_layers + 1)]
    kept = set()
    for r in range(wl.ranks):  # each rank's GPU keeps units it owns (placement.device_states)
        others = {i for i in range(wl.n_layers + 1) if wl.owner(i) != r}
        kept |= set(S.device_units(sizes, budget * GiB, skip=set(wl.nvme_layers) | others))
    return replace(wl, kept=tuple(sorted(kept)))


def _offload_when_room(hw: Hardware, wl: Workload) -> Workload:
    """offload_checkpoints=None, the engine's rule: block inputs go to host memory while the RAM left has room for
    them, else to the drives under storage=nvme, else they stay on the GPU (never offloaded with no separate
    device); a transformers model's layer inputs alike (layer_calls.py)."""
    if wl.offload_checkpoints is not None:
        return wl
    on = replace(wl, offload_checkpoints=True)
    if hw.unified:
        return replace(wl, offload_checkpoints=False)
    if ram_need(hw, on) <= usable_ram_bytes(hw):
        return on
    return replace(wl, offload_checkpoints="disk" if wl.storage == "nvme" else False)


def _place_state(hw: Hardware, wl: Workload) -> Workload:
    try:
        wl = replace(wl, stream=_options.resolve_stream(wl.storage, wl.stream, fp32=wl.cb == 4))  # the engine's rule
    except OptionError as e:
        raise PlanError(e.conf_field, e.detail) from None
    if wl.storage == "nvme":
        # the engine's rule (placement.nvme_units): a layer in RAM holds its fp32 tile and streamed copy, a
        # file-backed one nothing (its file has it all); the tier's window comes on top of the budget
        # (block inputs: where _offload_when_room may send them, to the drives, their staging tiles are reserved)
        everything_on_disk = replace(wl, nvme_layers=tuple(range(wl.n_layers)),
                                     offload_checkpoints="disk" if wl.offload_checkpoints in (None, "disk")
                                     else bool(wl.offload_checkpoints))
        others = sum(v for k, v in everything_on_disk.host_bytes().items()
                     if k not in ("state", "stream_copy", "frozen"))
        budget = (int(wl.ram_budget_GiB * GiB) if wl.ram_budget_GiB is not None
                  else usable_ram_bytes(hw) - others - (device_peak(hw, wl) if hw.unified else 0))
        layer_ram = [wl.unit_ram_bytes(i) for i in range(wl.n_layers)]
        fixed = wl.unit_ram_bytes(wl.n_layers)
        share = budget / wl.ranks_per_node  # several ranks: the node's budget in equal shares
        problem = S.nvme_floor_problem(S.nvme_floor(fixed), share, wl.ram_budget_GiB, wl.ranks_per_node)
        if problem and wl.ram_budget_GiB is not None:  # an automatic budget that short: RAM is, which the tiers say
            raise PlanError("storage.ram_budget_GiB", problem)
        # each rank's first own layers to files (one rank: the first layers)
        return _keep_on_device(hw, replace(wl, nvme_layers=tuple(S.nvme_layers_of_ranks(layer_ram, fixed, share,
                                                                                         wl.owners))))
    return _keep_on_device(hw, wl)


def device_peak(hw: Hardware, wl: Workload) -> int:
    """Peak device bytes of one micro-batch (memory does not grow with accumulation)."""
    w = wl if wl.stream != "auto" else replace(wl, stream="copy")
    return simulate(hw, replace(w, accumulate=1)).gpu_peak_bytes + int(hw.gpu_reserved_GiB * GiB)


def ram_need(hw: Hardware, wl: Workload, timeline: Timeline | None = None) -> int:
    need = sum(wl.host_bytes().values())
    if hw.unified:  # the "device" is this RAM
        need += timeline.gpu_peak_bytes if timeline else device_peak(hw, wl)
    return need


def plan(hw: Hardware, wl: Workload, advise: bool = True) -> Answer:
    asked, wl = wl, place(hw, wl)
    t = simulate(hw, wl)
    ram = Tier("RAM", ram_need(hw, wl, t), usable_ram_bytes(hw),
               f"{hw.host_ram_GiB:g} GiB less {hw.host_reserved_GiB:g} reserved")
    tiers = []
    if not hw.unified:
        tiers.append(Tier("GPU", t.gpu_peak_bytes + int(hw.gpu_reserved_GiB * GiB), int(hw.hbm_GiB * GiB),
                          f"incl. {hw.gpu_reserved_GiB:g} GiB context/allocator"))
        tiers.append(Tier("pinned host", wl.pinned_bytes(), ram.capacity_bytes, "part of RAM"))
    tiers.append(ram)
    if wl.storage == "nvme":
        tiers.append(Tier("NVMe", wl.nvme_bytes, int(hw.nvme_capacity_TB * 1e12),
                          f"{wl.n_nvme_layers} of {wl.n_layers} layers"))
    busy = {lane: t.busy_s(lane) for lane in S.LANES if not (hw.unified and lane in (S.H2D, S.D2H))}
    answer = Answer(hw, wl, t, tiers, busy, asked=asked)
    if advise:
        answer.advice = advice(answer)
    return answer


# ---- what to change ----
def _smaller_budget(hw: Hardware, wl: Workload, ram: Tier) -> str:
    """storage=nvme short of RAM: the largest storage.ram_budget_GiB with which RAM holds the run (more layers on the
    SSD; found by bisection: RAM's need falls as layers leave it), or what RAM needs with every layer there."""
    def budget(n: int) -> float:  # holds exactly the layers left in RAM with n on the SSD
        return math.ceil((wl.unit_ram_bytes(wl.n_layers) + (wl.n_layers - n) * wl.unit_ram_bytes(0)) / GiB * 10) / 10

    def with_budget(n: int) -> Answer:
        return plan(hw, replace(wl, ram_budget_GiB=budget(n)), advise=False)

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
        alt = (f"storage=nvme (puts {nv.n_nvme_layers} of {wl.n_layers} layers' state, {nv.nvme_bytes / 1e12:.2f} TB, "
               "on the SSD)" if nv_ram <= ram.capacity_bytes else
               f"not storage=nvme: even with every layer's state on the SSD RAM needs {nv_ram / GiB:,.0f} GiB")
        out.append(f"RAM: the state needs {ram.need_bytes / GiB:,.0f} GiB of {ram.capacity_bytes / GiB:,.0f} usable; "
                   f"use a host with >= {(ram.need_bytes / GiB + hw.host_reserved_GiB) * 1.02:,.0f} GiB RAM; {alt}")
    if wl.storage == "nvme" and wl.n_nvme_layers:
        full = ram_need(hw, replace(wl, storage="ram", nvme_layers=(), offload_checkpoints=True))
        out.append(f"NVMe: {wl.n_nvme_layers} of {wl.n_layers} layers keep all their state on the SSD "
                   f"({wl.nvme_bytes / 1e12:.2f} TB); >= {(full / GiB + hw.host_reserved_GiB) * 1.02:,.0f} GiB of RAM "
                   "would keep everything in RAM")
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
        auto = _keep_on_device(hw, replace(wl, device_state_GiB=None))
        t = simulate(hw, auto).step_time_s
        if len(auto.kept) > len(wl.kept) and t < 0.95 * a.step_time_s:
            layers = len([i for i in auto.kept if i < wl.n_layers])
            out.append(f"device state: storage.device_state_GiB=null (auto: {auto.kept_bytes / GiB:.0f} GiB of GPU "
                       f"memory for the state of {layers} of {wl.n_layers} layers"
                       f"{' and the embedding/head' if wl.n_layers in auto.kept else ''}, updated on the GPU) "
                       f"predicts {t:.2f} s per step: those updates no longer wait for the host")
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


def check_replicated(hw: Hardware, asked: Workload) -> tuple[float, float] | None:
    """(RAM a node, step seconds) with storage.replicate_nodes=true, if it fits."""
    alt = plan(hw, replace(asked, replicate_nodes=True), advise=False)
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
    h = wl.host_bytes()
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
