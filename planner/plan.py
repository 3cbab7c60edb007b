"""From a machine and a run to an answer: where the state goes (the engine's rules for its defaults), each tier's
peak, the step time and the bottleneck. What to change is advice.py's."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megatrain_lightning import schedule as S
from megatrain_lightning.options import OptionError
from megatrain_lightning import options as _options
from planner.errors import PlanError
from planner import host_tiers
from planner.hardware import Hardware
from planner.simulate import simulate
from planner.timeline import Timeline
from planner.workload import GiB, Workload

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
    """Resolves a transformers model's attention and compile for the hardware, storage.stream=auto, the units whose
    state the GPU keeps and, for storage=nvme, how many layers keep their state on the SSD."""
    if wl.nodes > 1 and hw.network_GBps is None:
        raise PlanError("hardware.network_GBps", f"trainer.num_nodes={wl.nodes} needs the network's bandwidth between "
                                                 "nodes (GB/s per node, e.g. 50 for 400 Gb/s InfiniBand)")
    return _keep_activations(hw, _offload_when_room(hw, _sweep_chunk(hw, _keep_grads(hw, _place_state(
        hw, _compile(hw, _attention(hw, wl)))))))


def _attention(hw: Hardware, wl: Workload) -> Workload:
    """The attention train.py builds a transformers model with on this hardware (Config.attention: gpt-oss through
    flex_attention on a GPU, eager without one)."""
    c = wl.model
    try:
        attention = c.attention(cuda=not hw.unified)
    except ValueError as e:  # as HFCausalLM refuses it
        raise PlanError("model.attn_implementation", f"{e}, and this hardware has no GPU; leave it unset (eager "
                                                     "there)") from None
    return replace(wl, model=replace(c, attn_implementation=attention))


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


def keep_on_device(hw: Hardware, wl: Workload) -> Workload:
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
        others = sum(v for k, v in host_tiers.host_bytes(everything_on_disk).items()
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
        return keep_on_device(hw, replace(wl, nvme_layers=tuple(S.nvme_layers_of_ranks(layer_ram, fixed, share,
                                                                                         wl.owners))))
    return keep_on_device(hw, wl)


def device_peak(hw: Hardware, wl: Workload) -> int:
    """Peak device bytes of one micro-batch (memory does not grow with accumulation)."""
    w = wl if wl.stream != "auto" else replace(wl, stream="copy")
    return simulate(hw, replace(w, accumulate=1)).gpu_peak_bytes + int(hw.gpu_reserved_GiB * GiB)


def ram_need(hw: Hardware, wl: Workload, timeline: Timeline | None = None) -> int:
    need = sum(host_tiers.host_bytes(wl).values())
    if hw.unified:  # the "device" is this RAM
        need += timeline.gpu_peak_bytes if timeline else device_peak(hw, wl)
    return need


def plan(hw: Hardware, wl: Workload) -> Answer:
    """Places the run (`place`), simulates a step and sizes each tier; what to change is advice.py's."""
    asked, wl = wl, place(hw, wl)
    t = simulate(hw, wl)
    ram = Tier("RAM", ram_need(hw, wl, t), usable_ram_bytes(hw),
               f"{hw.host_ram_GiB:g} GiB less {hw.host_reserved_GiB:g} reserved")
    tiers = []
    if not hw.unified:
        tiers.append(Tier("GPU", t.gpu_peak_bytes + int(hw.gpu_reserved_GiB * GiB), int(hw.hbm_GiB * GiB),
                          f"incl. {hw.gpu_reserved_GiB:g} GiB context/allocator"))
        tiers.append(Tier("pinned host", host_tiers.pinned_bytes(wl), ram.capacity_bytes, "part of RAM"))
    tiers.append(ram)
    if wl.storage == "nvme":
        tiers.append(Tier("NVMe", host_tiers.nvme_bytes(wl), int(hw.nvme_capacity_TB * 1e12),
                          f"{wl.n_nvme_layers} of {wl.n_layers} layers"))
    busy = {lane: t.busy_s(lane) for lane in S.LANES if not (hw.unified and lane in (S.H2D, S.D2H))}
    return Answer(hw, wl, t, tiers, busy, asked=asked)
