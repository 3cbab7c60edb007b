"""A discrete-event timeline of one training step of the engine, layer by layer.

Each lane (schedule.LANES) runs its spans in the order the engine issues them, like a CUDA stream; a span
starts when its lane is free and its inputs exist. The main thread's own waits (the gradient staging ring,
`grads.wait`, the optimizer and cast it runs itself) hold back everything it issues after them. Overlap
and stalls are what this produces, not inputs; memory per tier comes from the same spans.
"""

from __future__ import annotations

from megatrain_lightning import schedule as S
from planner import host_tiers
from planner.hardware import Hardware
from planner.timeline import Span, Timeline
from planner.workload import Workload

RESIDENT_LAYER = -1  # layer index of spans of the resident part (embedding, head, loss, optimizer, cast)


class _Sim:
    def __init__(self, hw: Hardware, wl: Workload) -> None:
        self.hw, self.wl = hw, wl
        self.t = Timeline()
        self.free = {lane: 0.0 for lane in S.LANES}
        self.host = 0.0  # the main thread: nothing it issues starts before this
        self.slots = [0.0] * wl.n_slots  # when each weight slot's last reader finished (the engine's free stack)
        # without a separate device the copies are plain copies on the main thread, in line with compute
        self.lane_of = {S.H2D: S.COMPUTE, S.D2H: S.COMPUTE} if hw.unified else {}
        self.updated: dict = {}  # when each unit's (the previous step's) host update is done: "embed", i, "head"
        self.landed: list[tuple[int, int, float]] = []  # (layer, params, time) of the last micro-batch's gradients
        self.cache_loaded: set[int] = set()  # step-cached layers whose weights this step has loaded
        # the node's host updates run on one CPU lane at the node's rate (its ranks share its memory bandwidth)
        self.adamw_Gparams = hw.node_adamw_Gparams(wl.ranks_per_node)
        # the file-backed tier (nvme.py): when each tile of its window is free again (reads take them in order),
        # when each layer's state and copy (the previous step's update) and gradient are on the disk
        # (each rank's tier has its own window; a node's ranks share its drives)
        self.file_backed = set(wl.nvme_layers)
        self.copy_tiles = {r: [0.0] * (S.NVME_COPY_BUFFERS - 1) for r in range(wl.ranks)}
        self.opt_tiles = {r: [0.0] * S.NVME_BUFFERS for r in range(wl.ranks)}
        self.written: dict[int, float] = {}
        self.grad_written: dict[int, float] = {}
        self.queued: list = []  # the previous step's updates not yet emitted (`pump`)

    # ---- primitives ----
    def span(self, lane: str, kind: str, layer: int, dur: float, after: float = 0.0, nbytes: int = 0,
             issued: bool = True) -> Span:
        lane = self.lane_of.get(lane, lane)
        start = max(self.free.setdefault(lane, 0.0), after, self.host if issued else 0.0)
        s = Span(lane, kind, layer, start, start + dur, nbytes)
        self.free[lane] = s.end
        self.t.spans.append(s)
        if self.hw.unified and lane == S.COMPUTE:
            self.host = s.end  # synchronous on the main thread
        return s

    def alloc(self, start: float, end: float | None, nbytes: int) -> None:
        self.t.gpu_mem.append((start, nbytes))
        if end is not None:
            self.t.gpu_mem.append((end, -nbytes))

    def transfer_s(self, lane: str, nbytes: int, at: float) -> float:
        """`lane`: H2D or D2H of rank 0's link, or of another rank's ("h2d@1", `link`)."""
        hw = self.hw
        if hw.unified:
            return nbytes / (hw.host_mem_GBps * 1e9)
        base, at_rank = lane.partition("@")[0], lane.partition("@")[2]
        rate = hw.h2d_GBps if base == S.H2D else hw.d2h_GBps
        other = (S.D2H if base == S.H2D else S.H2D) + (f"@{at_rank}" if at_rank else "")
        if self.free.get(other, 0.0) > at:  # both directions busy: they share the duplex cap
            rate = min(rate, hw.duplex_GBps / 2)
        return nbytes / (rate * 1e9)

    def link(self, lane: str, unit: int) -> str:
        """The H2D or D2H lane of the unit's owner: rank 0's own, or another rank's link (several ranks)."""
        r = self.wl.owner(unit)
        return lane if r == 0 else f"{lane}@{r}"

    def collective_s(self, nbytes: int) -> float:
        """A broadcast or reduction of `nbytes` among the ranks: NVLink (else PCIe), the network across nodes."""
        hw = self.hw
        rate = hw.nvlink_GBps or hw.h2d_GBps
        if self.wl.nodes > 1 and not self.wl.replicated:  # replicated nodes: within the node
            rate = min(rate, hw.network_GBps)
        return nbytes / (rate * 1e9)

    def across_nodes(self, unit: int, nbytes: int, after: float) -> float:
        """Replicated nodes: the unit's gradient (fp32) summed across the nodes by its owners, a ring all-reduce over
        the node's network (which every unit's takes in turn); rank 0 waits for its own units'."""
        wl = self.wl
        if not wl.replicated:
            return after
        ring = 2 * (wl.nodes - 1) / wl.nodes * nbytes
        end = self.span(S.NETWORK, S.REDUCE, unit, ring / (self.hw.network_GBps * 1e9), after=after,
                        nbytes=int(ring)).end
        return end if wl.owner(unit) == 0 else after  # (the resident unit's index -1 is the owners' last)

    def collective(self, kind: str, layer: int, nbytes: int, after: float) -> float:
        """Rank 0's part in one collective (every rank takes part in each); returns its end (0: one rank)."""
        if self.wl.ranks == 1:
            return after
        return self.span(S.COLLECTIVE, kind, layer, self.collective_s(nbytes), after=after, nbytes=nbytes).end

    # ---- compute costs ----
    def layer_s(self, passes: int) -> float:
        """One block over one micro-batch, chunk by chunk: forward (passes=1) or backward (passes=2). Attention's
        backward is five matmuls against the forward's two (FlashAttention): 2.5 times its forward FLOPs."""
        wl, hw = self.wl, self.hw
        scale = wl.micro_tokens * (1 if passes == 1 else wl.backward_matmul_passes)
        experts = wl.routed_expert_flops * scale if hw.experts_efficiency else 0  # grouped GEMMs, their own rate
        flops = wl.layer_matmul_flops * scale - experts
        if passes == 2 and wl.token_chunk:  # each checkpointed piece's MLP runs forward once more in backward
            flops += 2 * wl.model.active_mlp_params * wl.micro_tokens
        eager = not wl.compile and hw.eager_block_efficiency is not None
        rate = hw.matmul_TFLOPS(wl.cb) * 1e12 * (hw.eager_block_efficiency if eager else hw.block_efficiency)
        experts_s = experts / (hw.matmul_TFLOPS(wl.cb) * 1e12 * hw.experts_efficiency) if experts else 0.0
        # attention that materializes its scores: memory-bound passes over [heads, T + 1] a token, each way
        scores_s = S.EAGER_SCORES_TRAFFIC * wl.scores_bytes_per_token * wl.micro_tokens / (hw.hbm_GBps * 1e9) \
            if hw.hbm_GBps else 0.0
        attn = hw.attention_fwd_TFLOPS if passes == 1 else hw.attention_bwd_TFLOPS
        attn_s = wl.attention_flops() * wl.micro_tokens * (1 if passes == 1 else 2.5) / (
            attn * 1e12 if attn and wl.cb == 2 else rate)
        # LoRA's adapters: memory-bound, their backward moves about twice their forward's bytes
        adapter_s = wl.adapter_bytes_per_token * wl.micro_tokens * passes / (hw.hbm_GBps * 1e9) if hw.hbm_GBps else 0.0
        return flops / rate + experts_s + scores_s + attn_s + adapter_s \
            + wl.n_chunks * passes * hw.layer_overhead_ms / 1e3

    def head_s(self) -> float:
        """Head forward + backward with the loss: 3 passes of its matmul (chunked: all in forward, loss.py); 2 when
        the head is frozen (no weight gradient)."""
        wl, hw = self.wl, self.hw
        rate = hw.matmul_TFLOPS(wl.cb) * 1e12 * hw.block_efficiency
        passes = 3 if wl.trainable(wl.n_layers) else 2
        return passes * wl.head_flops * wl.micro_tokens / rate + passes * hw.layer_overhead_ms / 1e3

    # ---- the step ----
    def micro_batch(self, first: bool, last: bool, acc_ends: list[float]) -> None:
        wl, hw = self.wl, self.hw
        p, c = wl.plan, wl.model
        tok = wl.chunk_tokens_resolved  # activations exist for one chunk of the sweep at a time
        block = wl.block_memory_share  # compiled blocks hold less than the eager count
        out_bytes = wl.checkpoint_bytes if wl.n_chunks > 1 else 0  # chunked: the layer's output, filled in pieces
        slots = self.slots
        embed = self.span(S.COMPUTE, S.RESIDENT, RESIDENT_LAYER, hw.layer_overhead_ms / 1e3,
                          after=self.updated.get("embed", 0.0))
        x_ready = embed.end
        ckpt_alloc: dict[int, float] = {}
        spill = wl.offload_checkpoints == "disk"
        written: list[float] = []  # spilled block inputs: when each is in its files
        kept_from: dict[int, float] = {}  # kept layers: when their activations (and their slot) were taken
        for i in p.forward_loads():
            self.pump(i + S.NVME_BUFFERS)  # the host's updates run a few layers ahead of the loads that wait on them
            kept = i >= p.first_kept_layer
            if spill and i % p.k == 0 and not kept:  # the input goes to the drives; forward waits for the oldest still going
                if len(written) >= S.BLOCK_INPUTS_IN_FLIGHT:
                    self.host = max(self.host, written[-S.BLOCK_INPUTS_IN_FLIGHT])
                nbytes = wl.checkpoint_bytes
                w = self.span(S.NVME_WRITE, S.CHECKPOINT, i, self.disk_s(S.NVME_WRITE, nbytes), after=x_ready,
                              nbytes=nbytes, issued=False)
                written.append(w.end)
                self.alloc(x_ready, w.end, nbytes)
            free_at = max(slots.pop(), self.updated.get(i, 0.0))  # the engine waits for the layer's update
            fwd = self.span(S.COMPUTE, S.FORWARD, i, self.layer_s(1), after=max(self.load(i, free_at), x_ready))
            x_ready = fwd.end
            if first:
                self.write_through(i, fwd.end)
            if i % p.k == 0:
                ckpt_alloc[i // p.k] = fwd.start
            self.alloc(fwd.start, fwd.end, wl.transient_bytes_per_token * tok * block + out_bytes)
            if kept:
                kept_from[i] = fwd.start
            else:
                slots.append(fwd.end)
        self.pump(None)
        head = self.span(S.COMPUTE, S.RESIDENT, RESIDENT_LAYER, self.head_s(),
                         after=max(x_ready, self.updated.get("head", 0.0)))
        self.alloc(head.start, head.end, wl.head_bytes)
        head_grad = c.vocab_size * c.hidden_size * wl.cb if wl.trainable(wl.n_layers) else 0  # a frozen head: none
        self.alloc(head.end, None, head_grad)  # freed once the resident gradients shipped (below)
        g_ready = head.end

        ship = 0
        issued = head.end  # spilled: each block's input is read back once the block after it starts
        for b, (s0, e0) in reversed(list(enumerate(p.blocks))):
            kept = b >= p.n_checkpoints  # its activations and weights are still there: no load, no recompute
            read_end = 0.0
            if spill and not kept:
                nbytes = wl.checkpoint_bytes
                read = self.span(S.NVME_READ, S.CHECKPOINT, s0, self.disk_s(S.NVME_READ, nbytes), after=issued,
                                 nbytes=nbytes, issued=False)
                read_end = read.end
                self.alloc(read.start, None, nbytes)
            elif wl.offload_checkpoints and not self.hw.unified and not kept:  # fetched from host memory a block ahead
                self.alloc(issued, None, wl.checkpoint_bytes)
            held = [(j, kept_from[j]) for j in range(s0, e0)] if kept else []  # (layer, activations since)
            for j in range(s0, e0) if not kept else ():
                rec = self.span(S.COMPUTE, S.RECOMPUTE, j, self.layer_s(1),
                                after=max(self.load(j, slots.pop()), read_end))
                held.append((j, rec.start))
            if not kept:
                issued = held[0][1]
                # chunked: the block's fp32 weight-gradient sums and its input's gradient, until the block is done
                self.alloc(held[0][1], None, wl.sweep_sum_bytes + out_bytes)
            for j, since in reversed(held):
                bwd = self.span(S.COMPUTE, S.BACKWARD, j, self.layer_s(2), after=g_ready)
                g_ready = bwd.end
                self.alloc(since, bwd.end, wl.kept_layer_bytes if kept else wl.act_bytes_per_token * tok * block)
                self.alloc(bwd.start, bwd.end, wl.transient_bytes_per_token * tok * block)
                slots.append(bwd.end)
                if j in wl.cached and not last:  # summed on the device (every rank's own); reduced at the last
                    continue
                if wl.ranks > 1:  # summed into its owner's GPU in fp32; the compute stream waits for it
                    g_ready = self.across_nodes(j, 4 * wl.layer_trainable,
                                                self.collective(S.REDUCE, j, 4 * wl.layer_trainable, bwd.end))
                    if j not in wl.cached:  # a flat fp32 copy (a cached sum is reduced in place)
                        self.alloc(bwd.start, g_ready, 4 * wl.layer_trainable)
                if j in wl.kept:  # its gradient stays on the device, in fp32
                    continue
                if not wl.on_this_node(j):  # another node's host takes it
                    continue
                if ship >= S.STAGING_RING:  # the staging buffer is reused: wait for the host to consume it
                    self.host = max(self.host, acc_ends[-S.STAGING_RING])
                landing = first or j in wl.cached  # fp32 straight into the host buffer (a device sum, or the first)
                nbytes = wl.landing_grad_bytes if landing else wl.grad_bytes
                lane = self.link(S.D2H, j)
                grad = self.span(lane, S.GRAD, j, self.transfer_s(lane, nbytes, g_ready), after=g_ready,
                                 nbytes=nbytes)
                acc_ends.append(self.accumulate(j, wl.layer_trainable, grad.end, landing))
                self.landed.append((j, wl.layer_trainable, acc_ends[-1]))
                ship += 1
                self.alloc(bwd.start, grad.end, wl.grad_bytes)  # the layer's weight gradients until shipped
            if kept:
                continue
            self.alloc(g_ready, None, -(wl.sweep_sum_bytes + out_bytes))
            if spill or (wl.offload_checkpoints and not self.hw.unified):
                self.alloc(g_ready, None, -wl.checkpoint_bytes)
            elif not wl.offload_checkpoints or self.hw.unified:  # else it waits in host memory
                self.alloc(ckpt_alloc[b], g_ready, wl.checkpoint_bytes)
        embed_bwd = self.span(S.COMPUTE, S.RESIDENT, RESIDENT_LAYER, hw.layer_overhead_ms / 1e3, after=g_ready)
        emb_grad = 0 if c.tie_embeddings or not wl.trainable(wl.n_layers) else c.vocab_size * c.hidden_size * wl.cb
        self.alloc(embed_bwd.start, None, emb_grad)
        # post_backward: ship the resident gradients (unless they stay on the device), then wait until every
        # gradient sits in fp32
        resident_kept = wl.n_layers in wl.cached
        shipped = embed_bwd.end if resident_kept and not last else \
            self.across_nodes(RESIDENT_LAYER, 4 * wl.trainable(wl.n_layers),
                              self.collective(S.REDUCE, RESIDENT_LAYER, 4 * wl.trainable(wl.n_layers), embed_bwd.end))
        if wl.n_layers not in wl.kept and (last or not resident_kept) and wl.on_this_node(wl.n_layers):
            landing = first or resident_kept
            nbytes = wl.trainable(wl.n_layers) * (4 if landing else wl.cb)
            lane = self.link(S.D2H, wl.n_layers)
            shipped = self.span(lane, S.GRAD, RESIDENT_LAYER, self.transfer_s(lane, nbytes, shipped),
                                after=shipped, nbytes=nbytes).end
            acc_ends.append(self.accumulate(RESIDENT_LAYER, wl.trainable(wl.n_layers), shipped, landing))
            self.landed.append((RESIDENT_LAYER, wl.trainable(wl.n_layers), acc_ends[-1]))
        self.alloc(shipped, None, -(head_grad + emb_grad))
        if not first or self.wl.clip:  # the main thread waits for the gradients
            self.host = max(self.host, shipped, *acc_ends)

    def load(self, i: int, free_at: float) -> float:
        """When layer i's weights are in their slot: H2D, or (kept on the device) a cast of the device master."""
        wl = self.wl
        if i in wl.kept:  # cast from its owner's device master; several ranks: broadcast from there
            return self.collective(S.BROADCAST, i, wl.copy_bytes, free_at)
        if i in self.cache_loaded:  # in the step cache since its first load this step
            return free_at
        if i in wl.cached:
            self.cache_loaded.add(i)
        if not self.on_disk(i):
            lane = self.link(S.H2D, i)
            end = self.span(lane, S.LOAD, i, self.transfer_s(lane, wl.load_bytes, free_at), after=free_at,
                            nbytes=wl.load_bytes).end
            return self.collective(S.BROADCAST, i, wl.copy_bytes, end)
        # file-backed: its owner reads its copy from the drives into a pinned tile (once the last update wrote it),
        # then H2D over its link (several ranks: and broadcasts it)
        nbytes, tiles = wl.copy_bytes, self.copy_tiles[wl.owner(i)]
        read = self.span(self.drive(S.NVME_READ, i), S.LOAD, i, nbytes / (self.hw.nvme_array_read_GBps * 1e9),
                         after=max(tiles.pop(0), self.written.get(i, 0.0)), nbytes=nbytes, issued=False)
        at = max(free_at, read.end)
        lane = self.link(S.H2D, i)
        end = self.span(lane, S.LOAD, i, self.transfer_s(lane, nbytes, at), after=at, nbytes=nbytes).end
        tiles.append(end)
        return self.collective(S.BROADCAST, i, nbytes, end)

    def drive(self, lane: str, unit: int) -> str:
        """The NVMe lane of the unit's owner's node: rank 0's node's drives (shared by its ranks), or another node's."""
        node = self.wl.owner(unit) // self.wl.ranks_per_node
        return lane if node == 0 else f"{lane}@node{node}"

    def on_disk(self, i: int) -> bool:
        return i in self.file_backed

    def disk_s(self, lane: str, nbytes: int) -> float:
        hw = self.hw
        return nbytes / ((hw.nvme_array_read_GBps if lane == S.NVME_READ else hw.nvme_array_write_GBps) * 1e9)

    def disk_update(self, i: int, after: float = 0.0) -> float:
        """A file-backed layer's host update: its [master | m | v | grad] read into an optimizer tile, AdamW (and
        the cast into the copy, on the writer), [master | m | v] and the copy written behind; returns the AdamW's
        end (what the engine's wait for the update sees; the next read of the copy waits for the write)."""
        lp, cb = self.wl.layer_trainable, self.wl.cb
        nbytes = S.DISK_STATE_BYTES * lp
        tiles = self.opt_tiles[self.wl.owner(i)]
        read = self.span(S.NVME_READ, S.OPTIMIZER, i, self.disk_s(S.NVME_READ, nbytes),
                         after=max(tiles.pop(0), self.grad_written.get(i, 0.0), after), nbytes=nbytes,
                         issued=False)
        opt = self.span(S.CPU, S.OPTIMIZER, i, lp / (self.adamw_Gparams * 1e9), after=read.end, issued=False)
        nbytes = (S.DISK_STATE_BYTES - 4 + cb) * lp
        write = self.span(S.NVME_WRITE, S.OPTIMIZER, i, self.disk_s(S.NVME_WRITE, nbytes), after=opt.end,
                          nbytes=nbytes, issued=False)
        tiles.append(write.end)
        self.written[i] = write.end
        return opt.end

    def pump(self, upto: int | None) -> None:
        """Emits the queued updates of units before layer `upto` (None: all), in their order: the engine's host
        thread and the drives' readers interleave them with the forward's reads, which this keeps."""
        while self.queued and (upto is None or self.queued[0][0] < upto):
            self.queued.pop(0)[1]()

    def write_through(self, i: int, after: float) -> None:
        """The previous step's write-through of the kept state, paced by the engine into the D2H lane's idle time:
        modelled as an equal piece behind each forward layer."""
        wl = self.wl
        if not wl.kept:
            return
        nbytes = S.WRITE_THROUGH_BYTES * wl.kept_params // wl.n_layers
        self.span(S.D2H, S.STATE, i, self.transfer_s(S.D2H, nbytes, after), after=after, nbytes=nbytes, issued=False)

    def device_update(self) -> None:
        """The kept units' fused AdamW on the device after backward: reads p, g, m, v and writes p, m, v (fp32)."""
        wl, hw = self.wl, self.hw
        if wl.kept:
            self.span(S.COMPUTE, S.OPTIMIZER, RESIDENT_LAYER, wl.kept_params / (hw.gpu_adamw_Gparams * 1e9))

    def accumulate(self, layer: int, n_params: int, after: float, first: bool) -> float:
        disk = self.on_disk(layer)
        if first:  # landed in fp32 by DMA: no host work (a file-backed layer's then goes to its file)
            if disk:
                self.grad_written[layer] = self.span(S.NVME_WRITE, S.GRAD, layer, self.disk_s(S.NVME_WRITE, 4 * n_params),
                                                     after=after, nbytes=4 * n_params, issued=False).end
            return after
        if disk:  # read back from its file, added, written again
            after = self.span(S.NVME_READ, S.ACCUMULATE, layer, self.disk_s(S.NVME_READ, 4 * n_params), after=after,
                              nbytes=4 * n_params, issued=False).end
        end = self.span(S.CPU, S.ACCUMULATE, layer, n_params / (self.hw.cpu_grad_add_Gparams * 1e9), after=after,
                        issued=False).end
        if disk:
            self.grad_written[layer] = self.span(S.NVME_WRITE, S.GRAD, layer, self.disk_s(S.NVME_WRITE, 4 * n_params),
                                                 after=end, nbytes=4 * n_params, issued=False).end
        return end

    def update_s(self, n_params: int) -> float:
        """One unit's host update: fused AdamW (clip inside the kernel), plus the cast when a copy streams."""
        hw = self.hw
        cast = n_params / (hw.cpu_cast_Gparams * 1e9) if self.wl.resolved_stream == "copy" else 0.0
        return n_params / (self.adamw_Gparams * 1e9) + cast

    def previous_updates(self) -> None:
        """Deferred updates (clipping): the previous step's, in forward order, run from the step's start behind
        its forward (steady state: each step is preceded by one like it)."""
        wl = self.wl
        kept = wl.kept
        half = wl.trainable(wl.n_layers) // 2
        if wl.n_layers not in kept:
            # another node's host updates it meanwhile, as this one would
            t = self.span(S.CPU, S.OPTIMIZER, RESIDENT_LAYER, self.update_s(half), issued=False).end \
                if wl.on_this_node(wl.n_layers) else self.update_s(half)
            lane = self.link(S.H2D, wl.n_layers)
            t = self.span(lane, S.LOAD, RESIDENT_LAYER, self.transfer_s(lane, half * wl.cb, t), after=t,
                          nbytes=half * wl.cb, issued=False).end
            self.updated["embed"] = self.collective(S.BROADCAST, RESIDENT_LAYER, half * wl.cb, t)
        def update(i: int) -> None:
            if self.on_disk(i):
                self.updated[i] = self.disk_update(i)
            else:
                self.updated[i] = self.span(S.CPU, S.OPTIMIZER, i, self.update_s(wl.layer_trainable),
                                            issued=False).end

        def head() -> None:
            self.updated["head"] = self.span(S.CPU, S.OPTIMIZER, RESIDENT_LAYER, self.update_s(half),
                                             issued=False).end
        self.queued = [(i, lambda i=i: update(i)) for i in range(wl.n_layers) if i not in kept and wl.on_this_node(i)]
        if wl.n_layers not in kept and wl.on_this_node(wl.n_layers):
            self.queued.append((wl.n_layers, head))

    def overlapped_updates(self) -> None:
        """After the last micro-batch: per-unit norms for clipping as gradients land; without clipping each unit's
        update follows its landing (eager) and the step ends when the embedding's is done (the next forward needs
        it first); with clipping the updates belong to the next step's forward (`previous_updates`)."""
        hw = self.hw
        for layer, n, t in self.landed:
            if self.wl.clip:
                self.span(S.CPU, S.OPTIMIZER, layer, n * 4 / (hw.host_mem_GBps * 1e9), after=t, issued=False)
            elif self.on_disk(layer):
                self.disk_update(layer, after=t)
            else:
                self.span(S.CPU, S.OPTIMIZER, layer, self.update_s(n), after=t, issued=False)
        self.host = max(self.host, self.free[S.CPU])

    def optimizer(self) -> None:
        """Global-norm clip and AdamW on the host after the last backward, then the cast of the masters into the
        streamed copies; file-backed layers read their state ahead and write it behind."""
        wl, hw = self.wl, self.hw
        opt_s = lambda n: n / (self.adamw_Gparams * 1e9)  # noqa: E731
        ram_params = host_tiers.ram_params(wl)
        self.host = self.span(S.CPU, S.OPTIMIZER, RESIDENT_LAYER, opt_s(ram_params)).end
        for i in wl.node_nvme_layers:  # file-backed: read ahead, updated, written behind
            self.disk_update(i, after=self.host)
        self.host = max(self.host, self.free[S.CPU])
        if wl.resolved_stream == "copy":
            self.host = self.span(S.CPU, S.CAST, RESIDENT_LAYER, ram_params / (hw.cpu_cast_Gparams * 1e9)).end
        nbytes = wl.resident_bytes
        self.span(S.H2D, S.LOAD, RESIDENT_LAYER, self.transfer_s(S.H2D, nbytes, self.host), nbytes=nbytes)


def simulate(hw: Hardware, wl: Workload) -> Timeline:
    sim = _Sim(hw, wl)
    sim.t.gpu_base_bytes = wl.resident_bytes + wl.n_slots * wl.slot_bytes + wl.kept_bytes + wl.cached_bytes
    overlapped = not hw.unified  # the engine's HostAdam on a separate device (on the CPU it runs after backward)
    if overlapped and wl.clip:
        sim.previous_updates()
    acc_ends: list[float] = []
    for m in range(wl.accumulate):
        if m == wl.accumulate - 1:
            sim.landed = []
        sim.micro_batch(first=m == 0, last=m == wl.accumulate - 1, acc_ends=acc_ends)
    if overlapped:
        sim.device_update()
        sim.overlapped_updates()
    else:
        sim.optimizer()
    return sim.t
