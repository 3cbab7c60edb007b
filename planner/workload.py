"""What one training step asks of the machine: FLOPs, bytes moved and bytes held, per layer and per tier.

Every figure follows this project's engine and model (`megatrain_lightning/engine/streaming.py`, `model.py`, `lm.py`);
the activation and logits coefficients were measured from what autograd saves (tests re-measure them).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatrain_lightning.config import Config
from megatrain_lightning.options import EngineOptions, OptionError
from megatrain_lightning import schedule as S
from planner import activations, adapters
from planner.errors import PlanError

PRECISIONS = {"bf16-mixed": 2, "32-true": 4}  # Lightning precision -> bytes of the compute dtype
_ENGINE = EngineOptions()  # the engine's defaults
STATE_BYTES = S.RAM_STATE_BYTES  # fp32 master + Adam m + Adam v + gradient buffer, per parameter
GiB = 2**30


@dataclass(frozen=True)
class Workload:
    model: Config
    seq_len: int
    micro_batch: int
    accumulate: int = 1
    precision: str = "bf16-mixed"
    # the engine's options (megatrain_lightning/options.py: their meaning, defaults and checks; `Workload.of`)
    checkpoint_interval: int = _ENGINE.checkpoint_interval
    prefetch_depth: int = _ENGINE.prefetch_depth
    storage: str = _ENGINE.storage
    stream: str = _ENGINE.stream  # resolved by the planner (placement): "copy" or "master"
    ram_budget_GiB: float | None = _ENGINE.ram_budget_GiB
    nvme_layers: tuple[int, ...] = ()  # the file-backed layers, set by the planner when it places layers on the SSD
    clip: bool = True  # gradient clipping: host updates wait for the whole backward (else they start as it goes)
    # block inputs: True in host memory, "disk" in files on the drives (block_input_files.py), False on the GPU;
    # None: host memory while RAM has room, else (storage=nvme) the drives (resolved by the planner)
    offload_checkpoints: bool | str | None = _ENGINE.offload_checkpoints
    loss_chunk_tokens: int | None = 4096  # the head + loss run over this many tokens at a time (lm.py)
    # GPU memory for the state of the first units, updated on the GPU (device_state.py); None: the engine's auto,
    # 40% of the GPU memory free once the engine is built. `kept` (unit indices, the resident unit as n_layers) is
    # what the planner resolves it to.
    device_state_GiB: float | None = _ENGINE.device_state_GiB
    kept: tuple[int, ...] = ()
    # The batch sweep (engine.py): a layer runs the micro-batch in chunks of whole sequences; None: the engine's auto
    # rule (schedule.chunk_sequences, from free GPU memory). `chunk_cap` (sequences) is what the planner resolves it
    # to, before the micro-batch bounds it (0: unresolved, the whole micro-batch).
    chunk_tokens: int | None = _ENGINE.chunk_tokens
    chunk_cap: int = 0
    # the last blocks keep their forward's activations for backward (engine/kept_graphs.py); None: the engine's auto
    # (as many as fit beside the step's peak, schedule.blocks_to_keep). `kept_blocks`: what the planner resolves.
    keep_activations: int | None = _ENGINE.keep_activations
    kept_blocks: int = 0
    # long context (one sequence per chunk and still too big): tokens of a layer's token-wise half (norm, MLP) run
    # at a time under activation checkpointing (model.Block.token_chunk); resolved by the planner, None: whole
    token_chunk: int | None = None
    # accumulation: GPU memory for the weights and fp32 gradient sums that units whose state is on the host keep for a
    # step (device_state.StepCache); None: the engine's auto (40% of what is free once the kept state is built).
    # `cached`: the units resolved.
    step_cache_GiB: float | None = _ENGINE.step_cache_GiB
    cached: tuple[int, ...] = ()
    # blocks through torch.compile (storage.compile); None: the engine's default, resolved by the planner: on for a
    # GPU (this project's model and transformers objects alike), off on the CPU. Unresolved counts as eager.
    compile: bool | None = _ENGINE.compile
    # data parallel (trainer.devices x trainer.num_nodes ranks, `nodes` machines): each unit's state is owned by one
    # rank (schedule.assign_units), its owner loads it and broadcasts it, its gradients are reduced to the owner; the
    # timeline is rank 0's, the host work of its node's ranks on its node's CPU, the micro-batch per rank
    ranks: int = 1
    nodes: int = 1
    # several nodes: every node holds the whole state, dealt among its ranks; only each unit's gradient crosses the
    # network (storage.replicate_nodes)
    replicate_nodes: bool = _ENGINE.replicate_nodes
    # LoRA (conf/lora, models/lora.py): adapters of this rank on the linear layers of the decoder layers named in
    # `lora_targets` ("all-linear": all), the base frozen in the compute dtype; 0: every parameter trains
    lora_r: int = 0
    lora_targets: tuple[str, ...] | str = "all-linear"

    @classmethod
    def of(cls, model: Config, options: EngineOptions, **rest) -> Workload:
        """The step of `model` under the engine's `options` (already checked), with `rest` (batch, trainer)."""
        engine = {k: v for k, v in options.as_dict().items() if k != "nvme_dir"}  # drives: the hardware's
        return cls(model, **engine, **rest)

    def __post_init__(self) -> None:
        checks = [("data.seq_len", self.seq_len, 1), ("data.micro_batch", self.micro_batch, 1),
                  ("trainer.accumulate_grad_batches", self.accumulate, 1), ("trainer.devices", self.ranks, 1),
                  ("trainer.num_nodes", self.nodes, 1)]
        for name, v, lo in checks:
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise PlanError(name, f"must be an integer >= {lo}, got {v!r}")
        if self.seq_len > self.model.max_seq_len:
            raise PlanError("data.seq_len", f"{self.seq_len} exceeds {self.model.name}'s max_seq_len "
                                            f"{self.model.max_seq_len}")
        if self.model.sliding_window and self.seq_len > self.model.sliding_window:
            raise PlanError("data.seq_len", f"{self.seq_len} exceeds {self.model.name}'s sliding window "
                                            f"{self.model.sliding_window} (attention here is full causal)")
        if self.precision not in PRECISIONS:
            raise PlanError("trainer.precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        # the engine's options: checked once, where they are made (options.EngineOptions)
        try:
            EngineOptions(**{k: getattr(self, k) for k in EngineOptions.names() if k != "nvme_dir"})
        except OptionError as e:
            raise PlanError(e.conf_field, e.detail) from None
        if self.ranks > 1 and self.n_layers < self.ranks:
            raise PlanError("trainer.devices", f"{self.ranks} ranks share {self.model.name}'s {self.n_layers} layers: "
                                               f"use at most {self.n_layers}")

    # ---- shape ----
    @property
    def cb(self) -> int:
        """Bytes per element of the compute dtype."""
        return PRECISIONS[self.precision]

    @property
    def n_layers(self) -> int:
        return self.model.n_layer

    @property
    def plan(self) -> S.Plan:
        return S.Plan(self.n_layers, self.checkpoint_interval, kept=self.kept_blocks)

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def step_tokens(self) -> int:
        """Over every rank."""
        return self.micro_tokens * self.accumulate * self.ranks

    # ---- ranks ----
    @property
    def replicated(self) -> bool:
        return self.replicate_nodes and self.nodes > 1

    @property
    def owners(self) -> tuple[int, ...]:
        """Each unit's owning rank (the resident unit last), as the engine deals them (replicated: on node 0)."""
        c = self.model
        return tuple(S.assign_units([c.layer_params] * self.n_layers + [c.embedding_params],
                                    self.ranks_per_node if self.replicated else self.ranks))

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nodes

    def owner(self, unit: int) -> int:
        return self.owners[unit] if self.ranks > 1 else 0

    def on_this_node(self, unit: int) -> bool:
        """Whether rank 0's node holds the unit's state (its host does its host work)."""
        return self.owner(unit) < self.ranks_per_node

    @property
    def n_nvme_layers(self) -> int:
        return len(self.nvme_layers)

    @property
    def node_nvme_layers(self) -> list[int]:
        """The file-backed layers of rank 0's node (its drives hold them)."""
        return [i for i in self.nvme_layers if self.on_this_node(i)]

    @property
    def node_params(self) -> tuple[int, int]:
        """(trunk layers, resident: 0 or 1) whose state rank 0's node holds."""
        layers = sum(self.on_this_node(i) for i in range(self.n_layers))
        return layers, int(self.on_this_node(self.n_layers))

    @property
    def chunk_sequences(self) -> int:
        """Sequences a layer runs at a time (the sweep's chunk)."""
        return min(self.micro_batch, self.chunk_cap) if self.chunk_cap else self.micro_batch

    @property
    def n_chunks(self) -> int:
        return -(-self.micro_batch // self.chunk_sequences)

    @property
    def chunk_tokens_resolved(self) -> int:
        return self.chunk_sequences * self.seq_len

    # ---- what trains: a LoRA run's adapters only, its base frozen (no gradient, no optimizer, held in cb bytes) ----
    @property
    def adapter_params(self) -> int:
        """One decoder layer's LoRA parameters (planner/adapters.py)."""
        return adapters.params(self.model, self.lora_r, self.lora_targets)

    @property
    def adapter_bytes_per_token(self) -> int:
        """Device memory one forward pass of a layer's adapters moves per token (planner/adapters.py)."""
        return adapters.bytes_per_token(self.model, self.lora_r, self.lora_targets, self.cb, bool(self.compile))

    def trainable(self, unit: int) -> int:
        """Parameters of a unit (a trunk layer, or the resident unit: index n_layers) with gradient and Adam state."""
        if self.lora_r:
            return 0 if unit == self.n_layers else self.adapter_params
        return self.model.embedding_params if unit == self.n_layers else self.model.layer_params

    def frozen(self, unit: int) -> int:
        """Parameters of a unit held in the compute dtype alone (a LoRA run's base)."""
        if not self.lora_r:
            return 0
        return self.model.embedding_params if unit == self.n_layers else self.model.layer_params

    @property
    def layer_trainable(self) -> int:
        return self.trainable(0)

    @property
    def layer_frozen(self) -> int:
        return self.frozen(0)

    @property
    def layer_numel(self) -> int:
        """A trunk layer's parameters in its streamed copy (its slot on the device)."""
        return self.layer_trainable + self.layer_frozen

    def unit_ram_bytes(self, unit: int) -> int:
        """A unit's host state in RAM: [master | m | v | grad] of its trainable parameters, its frozen ones in the
        compute dtype, and with stream="copy" (or storage=nvme) the compute-dtype copy of the trainable ones."""
        copy = self.cb if self.resolved_stream == "copy" else 0  # the placement asks once the stream is resolved
        return (STATE_BYTES + copy) * self.trainable(unit) + self.cb * self.frozen(unit)

    def unit_device_state_bytes(self, unit: int) -> int:
        """GPU bytes of a unit whose state the device keeps (device_state.DeviceStates)."""
        return S.DEVICE_STATE_BYTES * self.trainable(unit) + self.cb * self.frozen(unit)

    # ---- FLOPs per token, forward (backward costs twice, block recompute once more) ----
    @property
    def layer_matmul_flops(self) -> int:
        """2 FLOPs per weight per token over the q, k, v, o, gate, up and down projections."""
        c = self.model
        weights = c.attn_params - (c.n_head + 2 * c.n_kv_head) * c.head_dim * c.qkv_bias + c.active_mlp_params  # top-k
        return 2 * (weights + self.adapter_params)

    @property
    def routed_expert_flops(self) -> int:
        """The part of layer_matmul_flops in a mixture's routed experts (top-k of them per token; the mean over
        layers), which run as grouped GEMMs (Hardware.experts_efficiency)."""
        c = self.model
        return 2 * c.n_moe_layers * c.experts_per_token * 3 * c.hidden_size * c.moe_intermediate_size // c.n_layer

    @property
    def backward_matmul_passes(self) -> float:
        """A layer's backward matmul FLOPs over its forward's: 2 (input and weight gradients); a frozen base needs
        only its input gradient (the adapters, a small share, still both)."""
        if not self.lora_r:
            return 2.0
        share = self.adapter_params / (self.layer_matmul_flops / 2)
        return 1.0 + share

    def attention_flops(self, seq_len: int | None = None) -> float:
        """QK^T and AV of causal attention per token, the mean layer: token t meets t keys, so (T + 1) / 2 on average,
        and min(t, W) in a layer of local attention (Config.local_share of them); 2 FLOPs per MAC (latent attention:
        q.k over head_size, the values over v_head_size)."""
        T = self.seq_len if seq_len is None else seq_len
        c = self.model
        v = (c.v_head_size or c.head_dim) if c.kv_lora_rank else c.head_dim
        keys = (T + 1) / 2
        if c.local_share:
            W = c.local_window
            local = keys if T <= W else (W * (W + 1) / 2 + (T - W) * W) / T
            keys = (1 - c.local_share) * keys + c.local_share * local
        return 2 * c.n_head * (c.head_dim + v) * keys

    @property
    def head_flops(self) -> int:
        return 2 * self.model.vocab_size * self.model.hidden_size

    @property
    def model_flops_per_step(self) -> float:
        """The comparison metric: 6 * N * tokens (no attention, no recompute); N counts the active parameters of a
        mixture of experts (its router's top-k experts, balanced routing assumed)."""
        return 6 * self.model.active_params * self.step_tokens

    # ---- device bytes ----
    @property
    def block_memory_share(self) -> float:
        """What a block holds, relative to the eager count (act_ and transient_bytes_per_token): less when compiled
        (schedule.COMPILED_BLOCK_MEMORY_SHARE, measured on the H200)."""
        return S.COMPILED_BLOCK_MEMORY_SHARE if self.compile else 1.0

    @property
    def kept_layer_bytes(self) -> float:
        """What a layer that keeps its forward's graph holds until its backward (schedule.KEPT_BLOCK_MEMORY_SHARE)."""
        return self.act_bytes_per_token * self.micro_tokens * (S.KEPT_BLOCK_MEMORY_SHARE if self.compile else 1.0)

    # what a layer pass keeps and holds per token (planner/activations.py)
    @property
    def act_bytes_per_token(self) -> int:
        """What autograd keeps for one block's backward, per token."""
        return activations.saved(self.model, self.cb, self.seq_len, self.token_chunk)

    @property
    def scores_bytes_per_token(self) -> int:
        """Eager attention's saved probabilities, per token (0 for fused attention)."""
        return activations.scores(self.model, self.cb, self.seq_len)

    @property
    def transient_bytes_per_token(self) -> int:
        """Working set of one layer pass beyond its inputs, per token."""
        return activations.transient(self.model, self.cb, self.seq_len, self.token_chunk)

    @property
    def head_bytes(self) -> int:
        """Peak device bytes of the head + loss beyond its input. One pass (loss_chunk_tokens=None): autograd's
        cross-entropy over all logits holds the saved fp32 log-softmax, its incoming gradient and the gradient it
        produces, 3 x 4 bytes per vocabulary entry and token. Chunked (lm.py -> loss.py): one chunk's fp32 logits
        turned into probabilities plus their compute-dtype copy, the fp32 weight gradient and one chunk's
        compute-dtype part of it, and the hidden-state gradient."""
        c, cb, V = self.model, self.cb, self.model.vocab_size
        if self.loss_chunk_tokens is None:
            return 12 * V * self.micro_tokens
        weight_grad = (4 + cb) * V * c.hidden_size if self.trainable(self.n_layers) else 0  # a frozen head: none
        return (4 + cb) * V * self.logits_tokens + weight_grad + cb * self.micro_tokens * c.hidden_size

    @property
    def logits_tokens(self) -> int:
        """Tokens whose logits exist at once: one chunk of the loss."""
        return min(self.micro_tokens, self.loss_chunk_tokens or self.micro_tokens)

    @property
    def checkpoint_bytes(self) -> int:
        """One kept block input [B, T, D] in the compute dtype."""
        return self.micro_tokens * self.model.hidden_size * self.cb

    @property
    def slot_bytes(self) -> int:
        """One device weight buffer: the streamed layer, plus its cast when the fp32 master streams."""
        # sized for the largest layer (a mixture's dense first layers are smaller; the other per-layer figures
        # take the mean layer, so totals stay exact)
        numel = self.model.max_layer_params + self.adapter_params
        if self.resolved_stream == "master" and self.cb != 4:  # the fp32 master of the trainable part, then its cast
            return numel * self.cb + 4 * self.layer_trainable
        return numel * self.cb

    @property
    def n_slots(self) -> int:
        """The pass's weight slots, and one for each kept layer (held from its forward to its backward)."""
        return S.slots_needed(self.checkpoint_interval, self.prefetch_depth) + self.plan.kept_layers

    @property
    def resident_bytes(self) -> int:
        """Embedding, final norm and head as a compute-dtype copy on the device."""
        return self.model.embedding_params * self.cb

    @property
    def kept_params(self) -> int:
        """Trainable parameters whose state the device (rank 0's GPU: each keeps units it owns) keeps and updates."""
        return sum(self.trainable(i) for i in self.kept if self.owner(i) == 0)

    @property
    def kept_bytes(self) -> int:
        return sum(self.unit_device_state_bytes(i) for i in self.kept if self.owner(i) == 0)

    def cache_unit_bytes(self, unit: int) -> int:
        """Device bytes of one step-cached unit (device_state.StepCache.unit_bytes): its fp32 gradient sum, and a
        trunk layer's compute-dtype weights."""
        if unit == self.n_layers:
            return S.DEVICE_GRAD_BYTES * self.trainable(unit)
        return S.DEVICE_GRAD_BYTES * self.layer_trainable + self.cb * self.layer_numel

    @property
    def cached_bytes(self) -> int:
        return sum(self.cache_unit_bytes(i) for i in self.cached)

    @property
    def sweep_sum_bytes(self) -> int:
        """Chunked: a block's fp32 weight-gradient sums over the chunks, on the device during its backward."""
        return 4 * self.checkpoint_interval * self.layer_trainable if self.n_chunks > 1 else 0

    # ---- transfer bytes per layer ----
    @property
    def resolved_stream(self) -> str:
        if self.stream == "auto":
            raise ValueError("resolve storage.stream before asking for transfer sizes")  # the planner does
        return "master" if self.cb == 4 else self.stream  # in fp32 the master is the streamed copy

    @property
    def load_bytes(self) -> int:
        """A layer's H2D: its trainable part (the fp32 master, or its copy) and its frozen part (compute dtype)."""
        trainable = 4 if self.resolved_stream == "master" else self.cb
        return self.layer_trainable * trainable + self.layer_frozen * self.cb

    @property
    def copy_bytes(self) -> int:
        """A layer's compute-dtype copy (a file-backed layer's read; a broadcast between ranks)."""
        return self.layer_numel * self.cb

    @property
    def grad_bytes(self) -> int:
        """A layer's gradients of a later micro-batch (compute dtype, into the staging ring)."""
        return self.layer_trainable * self.cb

    @property
    def landing_grad_bytes(self) -> int:
        """A layer's gradients of a step's first micro-batch: cast to fp32 on the device, DMA'd into the buffer."""
        return self.layer_trainable * 4
