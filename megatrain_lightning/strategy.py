"""The Lightning Strategy: `Trainer(strategy="megatrain")`.

It takes an ordinary LightningModule whose repeated blocks sit in a `Trunk`, moves every parameter's
training state into the host store (layer by layer: the model is never materialized whole), attaches the
streaming engine to the trunk, keeps the rest of the model (embedding, final norm, head) resident on the
device as a compute-dtype copy, and runs the user's Adam/AdamW on the host.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Generator, Mapping

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from megatrain_lightning.hf import adapters
from megatrain_lightning import model_store
from megatrain_lightning.options import EngineOptions
from megatrain_lightning import placement
from megatrain_lightning import schedule as S
from megatrain_lightning.models import surgery
from megatrain_lightning.engine.streaming import StreamingEngine
from megatrain_lightning.errors import UserError
from megatrain_lightning.engine.layer_calls import LayerCalls
from megatrain_lightning.models.llama import Trunk
from megatrain_lightning.engine.host_adam import HostAdam, bind_grads, bind_optimizer
from megatrain_lightning.storage.ownership import DirectoryLock
from megatrain_lightning.engine.resident import EMBEDDING, REST, ResidentCopy
from megatrain_lightning.storage.store import HostStore
from megatrain_lightning.checkpointing.lightning_hooks import StoreCheckpoints
from megatrain_lightning.parallel.data_parallel import DataParallelBase
from megatrain_lightning.engine.trace import StepTracer

log = logging.getLogger(__name__)

PRECISIONS = ("bf16-mixed", "32-true")


class MegatrainStrategy(DataParallelBase):
    strategy_name = "megatrain"

    def __init__(
        self,
        options: EngineOptions | None = None,
        *,
        init_from: str | Path | None = None,
        device: _DEVICE | None = None,
        trace_dir: str | Path | None = None,
        trace_step: int = 2,
        **kwargs: Any,
    ) -> None:
        """`options`, or its fields as keywords (`MegatrainStrategy(storage="nvme", device_state_GiB=0)`): the
        engine's options (options.EngineOptions: each field's default and meaning), checked here so that a bad value
        fails when the Trainer is built, not minutes into a run. `init_from`: a Hugging Face checkpoint directory the
        weights come from. Other keywords are Lightning's."""
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in EngineOptions.names()}
        self.options = (options or EngineOptions()).with_values(**given)
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", 0)
        super().__init__(**kwargs)
        self._root_device = device if device is not None else torch.device("cpu")
        self._device_given = device is not None
        self.num_nodes = 1  # Lightning's connector fills in its choice, and that of parallel_devices
        self.init_from = Path(init_from) if init_from is not None else None  # a Hugging Face checkpoint directory
        self.nvme_log: list[dict[str, float]] = []  # storage=nvme: achieved disk rates, one entry per step
        self.tracer = StepTracer(trace_dir, trace_step)  # one step's timeline, when trace_dir is given
        self.store: HostStore | None = None
        self.engine: StreamingEngine | None = None
        self.resident: ResidentCopy | None = None  # the embedding/head's device copy (set up with the store)
        self._param_names: dict[int, str] = {}  # id(parameter as the module holds it) -> store name
        self._aliases: dict[str, str] = {}  # tied parameter name -> the name the store keeps
        self._grad_pairs: list[tuple[Tensor, Tensor]] = []
        self._trunk_prefix = ""
        self.updater: HostAdam | None = None  # the overlapped host optimizer (set up for fitting)
        self.checkpoints: StoreCheckpoints | None = None  # Lightning's checkpoint hooks over the store
        self._locks: list[DirectoryLock] = []  # checkpoint directories this fit writes to

    @property
    def compute_dtype(self) -> torch.dtype:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed":
            return torch.bfloat16
        if type(plugin) is Precision:
            return torch.float32
        raise UserError(f"the megatrain strategy supports precision {' or '.join(map(repr, PRECISIONS))}; "
                        f"got {getattr(plugin, 'precision', type(plugin).__name__)!r}")

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # modules built in `configure_model` land on the meta device; `setup` materializes them layer by layer
        with torch.device("meta"):
            yield

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        if self.engine is None:
            self._build()
        if trainer.state.fn == TrainerFn.FITTING:
            if not self.lightning_module.automatic_optimization:
                raise UserError("the megatrain strategy supports automatic optimization only")
            self._lock_checkpoint_dirs(trainer)
            self.setup_optimizers(trainer)
            if len(self.optimizers) != 1:
                raise UserError(f"the megatrain strategy supports one optimizer, got {len(self.optimizers)}")
            self._grad_pairs = bind_optimizer(self.optimizers[0], self.store, self._param_names)
            step = self.updater = self.optimizers[0].step  # a HostAdam
            self.engine.attach_updater(self.updater, trace_of=lambda: self.tracer.host_trace(self.engine))
            self.engine.after_forward = self._after_trunk_forward
            self._keep_device_states()
            self._keep_step_cache(trainer.accumulate_grad_batches)
            # Lightning clips by norm by multiplying every .grad before optimizer.step; the host step instead takes
            # the coefficient and applies it inside the fused kernel (and, overlapped, per unit when it updates it)
            plugin = self.precision_plugin
            plugin.clip_grad_by_norm = lambda optimizer, clip_val: self._check_norm(step.clip_by_norm(clip_val))
            plugin.clip_grad_by_value = lambda optimizer, clip_val: step.clip_by_value(clip_val)
        self.setup_precision_plugin()

    def _lock_checkpoint_dirs(self, trainer: pl.Trainer) -> None:
        """Two runs saving into one directory would replace each other's checkpoints: the second is refused (rank 0
        holds the lock for all ranks of a run)."""
        if not self.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath and not any(lock.path.parent == Path(dirpath) for lock in self._locks):
                self._locks.append(DirectoryLock(Path(dirpath), "checkpoints"))

    # ---- building the store and the engine ----
    def _build(self) -> None:
        module = self.lightning_module
        device, dtype = self.root_device, self.compute_dtype
        opts = self.options
        built = model_store.build(module, dtype, pin=device.type == "cuda", storage=opts.storage, stream=opts.stream,
                                  ram_budget_GiB=opts.ram_budget_GiB, nvme_dir=[Path(d) for d in opts.nvme_dir],
                                  init_from=self.init_from, world=self.world_size, rank=self.global_rank,
                                  device=device, ranks_per_node=self.num_processes,
                                  replicate_nodes=opts.replicate_nodes)
        store, trunk, refs = built.store, built.trunk, built.refs
        self._trunk_prefix = built.prefix + "."
        self._aliases.update(built.aliases)
        self._param_names.update(built.param_names)
        # every rank must run the same collectives in the same order: the options that shape them, and the model
        self.agree(store.ranks, dict(opts.agreed(), precision=str(dtype), model=hashlib.sha1(
            repr([u.layout.signature for u in store.units]).encode()).hexdigest()[:16]))
        self.resident = ResidentCopy(store, refs, dtype, device)
        self._param_names.update(self.resident.names)
        self.store = store
        self.checkpoints = StoreCheckpoints(store, self._param_names, self._aliases, self.flush, self.init_from)
        hook = functools.partial(StoreCheckpoints.state_dict_hook, self.checkpoints)  # a plain callable: torch marks it
        for m in module.modules():  # module.state_dict() then holds the trained weights (the store's masters)
            m.register_state_dict_post_hook(hook)
        cuda, layer_list = device.type == "cuda", isinstance(trunk, adapters.LayerList)
        eager_attention = adapters.eager_attention_heads(module) if layer_list else 0
        if cuda and eager_attention:  # (a model the user built: train.py builds the fused one on CUDA)
            log.info(adapters.fused_attention_hint(module))
        self.engine = StreamingEngine(store, list(trunk), device, opts.checkpoint_interval, opts.prefetch_depth,
                                      # not where attention materializes its scores (gpt-oss's sinks): compiled,
                                      # a chunk of gpt-oss-120b's layer ran out of memory where eager it ran
                                      compile=(cuda and not eager_attention) if opts.compile is None
                                      else opts.compile,
                                      offload_checkpoints=opts.offload_checkpoints, chunk_tokens=opts.chunk_tokens,
                                      per_sample_extras=trunk.per_sample_extras,
                                      block_input_dirs=opts.nvme_dir if opts.storage == "nvme" else (),
                                      same_computation=adapters.CACHE_ONLY_ATTRIBUTES if layer_list else (),
                                      keep_activations=opts.keep_activations)
        trunk.engine = self.engine
        if layer_list:  # the model's own forward calls each layer
            trunk.calls = LayerCalls(self.engine)
            self.engine.sweep.eager_attention_heads = eager_attention
        self.model_to_device()

    @override
    def model_to_device(self) -> None:
        # everything but the trunk (buffers, metric states); the trunk's blocks stay on the meta device
        if self.engine is None:
            return
        surgery.move_except(self.lightning_module, self.root_device, lambda m: isinstance(m, Trunk))

    def _keep_device_states(self) -> None:
        """The units whose state the device keeps (their AdamW then runs there), handed to the engine and the
        updater; none while a hook can read or change gradients (those of kept units are only on the device)."""
        states = self.engine.device_states
        if states is None:
            states = placement.device_states(self.store, self.root_device, self.options.device_state_GiB,
                                             hooks=self._gradient_hooks())
            if states is None:
                return
            self.engine.attach_device_states(states)
        self.updater.attach_device(states)

    def _keep_step_cache(self, accumulate: int) -> None:
        if self.engine.step_cache is None:
            kept = self.engine.device_states.units if self.engine.device_states is not None else set()
            self.engine.step_cache = placement.step_cache(self.store, self.root_device, self.options.step_cache_GiB,
                                                          accumulate, kept)

    # ---- the training step ----
    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        # A non-finite loss stops the run before its gradients can reach an update (eager updates start during
        # backward). The check synchronizes once per micro-batch, after the forward: the backward's first loads
        # are issued after it.
        # With several ranks they all stop: a rank going on would wait forever for the stopped one's collectives.
        finite = bool(torch.isfinite(closure_loss.detach()).item())
        if self.store.ranks.any(not finite):
            self._diverged(f"the loss is {closure_loss.item()}" if not finite else "the loss of another rank is not finite")

    def _check_norm(self, total: Tensor) -> Tensor:
        """The global gradient norm, computed for clipping: logged, and checked before any update uses it."""
        if not torch.isfinite(total):
            self._diverged(f"the gradient norm is {total.item()}")
        self.lightning_module.log("grad_norm", total.to(self.root_device), on_step=True, on_epoch=False)
        return total

    def _diverged(self, what: str) -> None:
        trainer = self.lightning_module.trainer
        raise FloatingPointError(f"training diverged at step {trainer.global_step}: {what}. The run stopped before this step's update; the last checkpoint is intact "
                                 "(lower the learning rate, or check the data of this batch)")

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        self.engine.grads.ship(len(self.store.units) - 1, self.resident.take_grads())
        # Gradients of a micro-batch that is not the step's last keep landing behind the next forward. On the
        # last one, hooks and clipping (deferred updates) read them: wait. Eager updates are already queued.
        if self.engine.grads.final and not self.updater.eager:
            self.engine.grads.wait()
        self.engine.grads.fresh = False
        bind_grads(self._grad_pairs)

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        trainer = self.lightning_module.trainer  # fitting: setup made the updater
        self.updater.begin_step(eager=self._eager_updates(),
                                need_norms=bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm == "norm")
        self.engine.grads.final = True
        try:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            self.engine.grads.final = False
        self.engine.grads.fresh = True
        if self.engine.step_cache is not None:
            self.engine.step_cache.invalidate()  # the update changes the weights
        self.resident.updated(self.engine.device_states)
        if self.engine.device.type == "cpu":
            # the "device" is the host: overlapping would only split the same cores between the update and the
            # next forward (the planner's unified model: the update runs after backward)
            self.flush()
        host = self.engine.host_checkpoints
        if self.store.nvme is not None or (host is not None and host.on_disk):
            self._log_nvme()
        return out

    def _eager_updates(self) -> bool:
        """Updates may start during backward only when nothing between backward and optimizer.step can read or
        change gradients: no clipping and no hook there."""
        return not self.lightning_module.trainer.gradient_clip_val and not self._gradient_hooks()

    def _gradient_hooks(self) -> bool:
        """Whether user code may see gradients between backward and the update."""
        module, trainer = self.lightning_module, self.lightning_module.trainer
        if any(is_overridden(h, module, pl.LightningModule)
               for h in ("on_before_optimizer_step", "configure_gradient_clipping", "optimizer_step")):
            return True
        return any(is_overridden("on_before_optimizer_step", cb, pl.Callback) for cb in trainer.callbacks)

    def _refresh_resident(self, part: int) -> None:
        self.resident.refresh(part, self.updater, self.engine.device_states)

    def _after_trunk_forward(self) -> None:
        self._refresh_resident(REST)
        if not self.updater.pending:
            self.tracer.updates_done(self.engine, self._trace_meta)

    def flush(self) -> None:
        """Waits for every queued update and refreshes the device copies: the store is then the model's state."""
        if self.updater is None or self.engine is None:
            return
        self.engine.grads.wait()
        self.updater.wait_all()
        if self.engine.device_states is not None:
            self.engine.device_states.sync()
        self._refresh_resident(EMBEDDING)
        self._refresh_resident(REST)
        self.tracer.updates_done(self.engine, self._trace_meta)

    def _log_nvme(self) -> None:
        """Achieved disk rates of the step just done (writes behind may finish during the next step), and the block
        inputs' traffic when they go to the drives."""
        rates = self.store.nvme.reset_stats().rates() if self.store.nvme is not None else {}
        files = self.engine.host_checkpoints.files if self.engine.host_checkpoints is not None else None
        if files is not None and self.engine.host_checkpoints.on_disk:
            rates.update(files.take_counts())
        self.nvme_log.append(rates)
        trainer = self.lightning_module.trainer
        for logger in trainer.loggers:
            logger.log_metrics(rates, step=trainer.global_step)
        if (len(self.nvme_log) <= 3 or trainer.global_step % 50 == 0) and "nvme_read_GBps" in rates:
            log.info(f"step {trainer.global_step}: NVMe read {rates['nvme_read_GBps']:.2f} GB/s, write "
                     f"{rates['nvme_write_GBps']:.2f} GB/s, optimizer waited {rates['nvme_wait_s']:.3f} s")

    def _publish_weights(self) -> None:
        """After an update: cast masters into the streamed copies and refresh the resident device copy."""
        trace = self.engine.trace
        start = time.perf_counter()
        for unit in self.store.units:
            unit.refresh_stream()
        if trace is not None:
            trace.add_host(-1, S.CPU, S.CAST, start, time.perf_counter(), self.store.n_params * 4)
        self.resident.publish()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self.lightning_module.trainer
        step_start = batch_idx % trainer.accumulate_grad_batches == 0
        self.tracer.batch_start(self.engine, self.root_device, trainer.global_step, step_start,
                                overlapped=self.updater is not None, meta=self._trace_meta)
        if self.updater is not None:
            self._refresh_resident(EMBEDDING)

    @override
    def on_train_end(self) -> None:
        self.flush()
        self.tracer.finish(self.engine, self._trace_meta)

    @override
    def on_validation_start(self) -> None:
        self.flush()

    @override
    def on_test_start(self) -> None:
        self.flush()

    @override
    def on_predict_start(self) -> None:
        self.flush()

    def _trace_meta(self) -> dict:
        return dict(device=str(self.root_device), compute_dtype=str(self.compute_dtype),
                    n_layers=self.engine.plan.n_layers, checkpoint_interval=self.options.checkpoint_interval,
                    prefetch_depth=self.options.prefetch_depth, n_params=self.store.n_params, stream=self.store.stream,
                    device_units=sorted(self.engine.device_states.units) if self.engine.device_states else [])

    @override
    def teardown(self) -> None:
        # the trunk stays on meta and the state in the store: nothing to move back to the CPU
        self.flush()
        for lock in self._locks:
            lock.release()
        self._locks = []
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # ---- checkpoints: Lightning's hooks, through the store (checkpointing/lightning_hooks.py) ----
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.checkpoints.module_state(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.checkpoints.optimizer_state(optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("the megatrain strategy writes checkpoint directories itself; storage_options is not "
                            "supported")
        self.checkpoints.save(checkpoint, filepath, self._model_config())

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        return self.checkpoints.load(checkpoint_path, self._model_config())

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self.checkpoints.check_restorable()
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=False)
        self.engine.load_buffers()  # the blocks' buffers, as the checkpoint had them
        if self.engine.step_cache is not None:
            self.engine.step_cache.invalidate()
        self._publish_weights()
        if self.engine.device_states is not None:
            self.engine.device_states.load()

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self.checkpoints.restore_optimizers(self.optimizers, checkpoint["optimizer_states"])

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the store exists only after setup

    def _model_config(self) -> dict | None:
        config = self.lightning_module.hparams.get("model_config")
        return dict(config) if config else None

