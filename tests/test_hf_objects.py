"""A LightningModule holding a transformers causal LM trains with strategy="megatrain" exactly as under Lightning's
default strategy: losses and weights after 5 AdamW steps with clipping and accumulation (32-true, CPU)."""

import copy

import lightning as L
import pytest
import torch

from megatrain_lightning import MegatrainStrategy
from tests.helpers import assert_trains_like, loader, rel_err
from tests.test_parity import tol

transformers = pytest.importorskip("transformers")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=48, decoder_sparse_step=1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=48,
                                                                shared_expert_intermediate_size=64)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=8,
                                                                  query_pre_attn_scalar=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                          sliding_window=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1)),
}
STEPS, ACCUMULATE = 5, 2
# the engine's templates (one compiled graph each under compile=True) for the 3 layers: layers that differ only in
# layer_idx (and gemma3's per-layer activation, a functools.partial of the same function) share one;
# deepseek_v3's dense first layer and gpt_oss's local/full layers differ truly
TEMPLATES = {"deepseek_v3": 2, "gpt_oss": 2}


class HFModule(L.LightningModule):
    def __init__(self, family: str) -> None:
        super().__init__()
        config_cls, model_cls, extra = FAMILIES[family]
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**{**TINY, **extra})
        self.model = getattr(transformers, model_cls)(config).float()
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1, fused=True)


def _fit(family: str, strategy, accelerator: str = "cpu"):
    module = HFModule(family)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(STEPS * ACCUMULATE)]
    trainer = L.Trainer(strategy=strategy, accelerator=accelerator, devices=1, max_steps=STEPS, precision="32-true",
                        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader(batches))
    return module, trainer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_model_trains_like_the_default_strategy(family):
    if not hasattr(transformers, FAMILIES[family][1]):
        pytest.skip(f"transformers {transformers.__version__} has no {FAMILIES[family][1]}")
    want, _ = _fit(family, "auto")
    got, trainer = _fit(family, MegatrainStrategy())
    for a, b in zip(got.losses, want.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got.losses, want.losses)
    masters = trainer.strategy.store.named("master")
    for name, p in want.named_parameters():
        # tol: 1e-5, and 1e-3 for qkv-bias models' k_proj.bias, whose gradient is rounding noise that Adam turns into
        # whole steps (test_parity.NOISE_TOL)
        assert rel_err(masters[trainer.strategy._aliases.get(name, name)], p.detach()) < tol(name), name
    assert all(p.is_meta for p in got.model.base_model.layers.parameters())  # the layers live in the store
    assert len({id(t) for t in trainer.strategy.engine.templates}) == TEMPLATES.get(family, 1)
    # gpt-oss's eager attention materializes its scores: the sweep's chunk rule counts them
    eager = got.model.config._attn_implementation == "eager"
    assert trainer.strategy.engine.sweep.eager_attention_heads == (TINY["num_attention_heads"] if eager else 0)


@pytest.mark.parametrize("mode", ["kept", "nvme", "eager", "inputs_on_disk", "keep_activations", "keep_all"])
def test_transformers_model_in_every_update_mode(mode, tmp_path):
    """State kept on the device, layers in files, updates during backward (no clipping), the layers' inputs kept for
    backward in files (offload_checkpoints="disk"), and the last layer's activations kept instead of recomputed
    (with the others' inputs in files), or every layer's, with a transformers model."""
    kwargs = dict(kept=dict(device_state_GiB=1e-3), nvme=dict(storage="nvme", ram_budget_GiB=1.2e-3,
                                                              nvme_dir=str(tmp_path)), eager={},
                  inputs_on_disk=dict(storage="nvme", nvme_dir=str(tmp_path), offload_checkpoints="disk"),
                  keep_activations=dict(storage="nvme", nvme_dir=str(tmp_path), offload_checkpoints="disk",
                                        keep_activations=1),
                  keep_all=dict(keep_activations=5))[mode]
    clip = None if mode == "eager" else 1.0

    def fit(strategy):
        module = HFModule("llama")
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(STEPS * ACCUMULATE)]
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=STEPS, precision="32-true",
                            accumulate_grad_batches=ACCUMULATE, gradient_clip_val=clip, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader(batches))
        return module, trainer

    want, _ = fit("auto")
    got, trainer = fit(MegatrainStrategy(**kwargs))
    if mode == "kept":
        assert trainer.strategy.engine.device_states is not None
    if mode == "nvme":
        assert trainer.strategy.store.nvme is not None
    kept = dict(keep_activations=1, keep_all=3).get(mode, 0)  # of the 3 layers
    engine = trainer.strategy.engine
    assert engine.kept.blocks == kept and len(engine._slots) == engine.n_slots + kept
    if mode in ("inputs_on_disk", "keep_activations"):  # every recomputed layer's input went out and came back
        host = engine.host_checkpoints
        layer_input = 4 * 24 * TINY["hidden_size"] * 4  # [4, 24, hidden] fp32, for each of 3 layers and 10 passes
        assert host.on_disk and host.files.bytes_written == host.files.bytes_read == (3 - kept) * 10 * layer_input
    assert_trains_like(got, want, trainer)


def test_checkpoint_interval_above_1_is_named():
    from megatrain_lightning.errors import UserError

    trainer = L.Trainer(strategy=MegatrainStrategy(checkpoint_interval=2), accelerator="cpu", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(UserError, match="checkpoint_interval: a model that calls its layers itself .* must be 1, "
                                        "got 2"):
        trainer.fit(HFModule("llama"), train_dataloaders=loader([torch.randint(0, 128, (2, 16))]))


def test_chunks_and_per_layer_masks():
    """Qwen2 passes each layer the mask of its attention type; chunked in 2-sequence pieces it still trains like the
    default strategy (weights to the rounding of another summation order)."""
    want, _ = _fit("qwen2", "auto")
    got, trainer = _fit("qwen2", MegatrainStrategy(chunk_tokens=48))
    assert trainer.strategy.engine.sweep.chunk_of[(4, 24, torch.float32)] == 2
    for a, b in zip(got.losses, want.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got.losses, want.losses)
    masters = trainer.strategy.store.named("master")
    for name, p in want.named_parameters():
        if name in masters:
            assert rel_err(masters[name], p.detach()) < max(tol(name), 5e-5), name


class LateHFModule(HFModule):
    """The model is built in configure_model: on the meta device under strategy="megatrain", which initializes it
    layer by layer (the model's own _init_weights); `weights`, when given, are loaded after that (the same starting
    point for a model built in memory)."""

    def __init__(self, family: str, weights: dict | None = None) -> None:
        L.LightningModule.__init__(self)
        self.family, self.weights, self.model, self.losses = family, weights, None, []

    def configure_model(self):
        if self.model is None:
            config_cls, model_cls, extra = FAMILIES[self.family]
            config = getattr(transformers, config_cls)(**{**TINY, **extra})
            self.model = getattr(transformers, model_cls)(config).float()
            if self.weights is not None:
                self.model.load_state_dict(self.weights, strict=False)


class _FirstMasters(L.Callback):
    def on_train_start(self, trainer, pl_module):
        store = trainer.strategy.store
        self.weights = {name: t.clone() for name, t in store.named("master").items()}
        self.aliases = dict(trainer.strategy._aliases)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma3_text", "deepseek_v3"])
def test_a_transformers_model_built_on_the_meta_device_trains(family):
    """Built in configure_model (meta), initialized layer by layer as the model's own initialization does (normal
    weights of initializer_range, norms at their init, rotary tables computed, a router's bias set): it then trains
    exactly as the same weights do in a model built in memory under Lightning's default strategy."""
    if not hasattr(transformers, FAMILIES[family][1]):
        pytest.skip(f"transformers {transformers.__version__} has no {FAMILIES[family][1]}")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(STEPS * ACCUMULATE)]

    def fit(module, strategy, callbacks=()):
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=STEPS, precision="32-true",
                            accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=list(callbacks))
        trainer.fit(module, train_dataloaders=loader(batches))
        return trainer

    first = _FirstMasters()
    got = LateHFModule(family)
    trainer = fit(got, MegatrainStrategy(), [first])
    q = first.weights["model.model.layers.0.self_attn.q_proj.weight" if family != "deepseek_v3"
                      else "model.model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    std = got.model.config.initializer_range
    assert abs(q.std().item() - std) < 0.15 * std  # the model's init, not zeros or torch's kaiming default
    norm = next(v for k, v in first.weights.items() if k.endswith("layers.1.input_layernorm.weight"))
    assert torch.equal(norm, torch.full_like(norm, norm[0].item())) and norm[0].item() in (0.0, 1.0)
    # the same weights in a model built in memory, under the default strategy
    weights = {k.removeprefix("model."): v for k, v in first.weights.items()}
    for alias, name in first.aliases.items():
        weights[alias.removeprefix("model.")] = first.weights[name]
    want = LateHFModule(family, weights)
    want.configure_model()
    fit(want, "auto")
    for a, b in zip(got.losses, want.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got.losses, want.losses)
    masters = trainer.strategy.store.named("master")
    for name, p in want.named_parameters():
        assert rel_err(masters[trainer.strategy._aliases.get(name, name)], p.detach()) < tol(name), name
    rotary = {n: b for n, b in got.model.named_buffers() if "inv_freq" in n}
    assert rotary and all(torch.equal(b.cpu(), dict(want.model.named_buffers())[n].cpu()) for n, b in rotary.items())


@CUDA
@pytest.mark.parametrize("family,offload", [("llama", None), ("qwen3_moe", None), ("llama", False),
                                            ("qwen3_moe", False)])
def test_cuda_transformers_model_trains_like_the_default_strategy(family, offload):
    """The default (offload_checkpoints=None, RAM has room): the layers' inputs wait for backward in pinned host
    memory (layer_calls.py); False keeps them on the device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    want, _ = _fit(family, "auto", accelerator="gpu")
    got, trainer = _fit(family, MegatrainStrategy(device="cuda", device_state_GiB=0, offload_checkpoints=offload),
                        accelerator="gpu")
    host = trainer.strategy.engine.host_checkpoints
    assert (host is not None and host.active and not host.on_disk) == (offload is None)
    for a, b in zip(got.losses, want.losses, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (got.losses, want.losses)


def test_a_transformers_model_resumes_exactly(tmp_path):
    """Checkpoints of a transformers model object: a run of 4 steps saves after step 2; a new module and Trainer
    resumed from it end with the same weights and Adam moments, bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from megatrain_lightning.data import ResumableLoader

    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 128, (24,), generator=g) for _ in range(4 * ACCUMULATE * 4)]

    def fit(ckpt_path=None, save_dir=None):
        module = HFModule("qwen3")
        callbacks = [ModelCheckpoint(dirpath=save_dir, every_n_train_steps=2, save_top_k=-1)] if save_dir else []
        trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", devices=1, max_steps=4,
                            precision="32-true", accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0,
                            logger=False, enable_checkpointing=bool(save_dir), callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=ResumableLoader(sequences, 4, seed=5, shuffle=True),
                    ckpt_path=ckpt_path)
        return module, trainer

    straight, reference = fit(save_dir=tmp_path / "ckpt")
    resumed, trainer = fit(ckpt_path=next((tmp_path / "ckpt").glob("*step=2*")))
    assert resumed.losses == straight.losses[-len(resumed.losses):] and len(resumed.losses) == 2 * ACCUMULATE
    for part in ("master", "exp_avg", "exp_avg_sq"):
        want = reference.strategy.store.named(part)
        for name, t in trainer.strategy.store.named(part).items():
            assert torch.equal(t, want[name]), (part, name)


def test_save_pretrained_after_fit_writes_the_trained_weights(tmp_path):
    """The model's own save_pretrained reads state_dict(), which holds the store's fp32 masters: transformers loads
    the trained model back."""
    got, trainer = _fit("llama", MegatrainStrategy())
    got.model.save_pretrained(tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    masters = trainer.strategy.store.named("master")
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), masters["model." + name]), name


class _Validated(HFModule):
    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("val_loss", loss)
        return loss


@pytest.mark.parametrize("precision,tolerance", [("32-true", 1e-5), ("bf16-mixed", 2e-2)])
def test_validation_and_bf16_with_a_transformers_model(precision, tolerance):
    """Validation runs the layers without autograd (the no-grad path of a layer call); bf16-mixed runs them under
    autocast, the recompute too: both against Lightning's default strategy."""
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(4)]
    val = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(2)]

    def run(strategy):
        module = _Validated("qwen3")
        # (Lightning's own bf16-mixed refuses to clip for a fused AdamW: the reference runs unclipped there)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, precision=precision,
                            gradient_clip_val=1.0 if precision == "32-true" else None, logger=False,
                            enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=2, val_check_interval=4)
        trainer.fit(module, train_dataloaders=loader(train), val_dataloaders=loader(val))
        return module.losses, trainer.callback_metrics["val_loss"].item()

    (want, want_val), (got, got_val) = run("auto"), run(MegatrainStrategy())
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= tolerance * abs(b), (got, want)
    assert abs(got_val - want_val) <= tolerance * abs(want_val), (got_val, want_val)


def test_layers_share_a_template_only_where_they_compute_alike():
    """Gemma 3 with 7 layers: five sliding-window layers, a full-attention one, a sliding one. The layers differ in
    layer_idx and in a per-layer activation object, which do not change what they compute, and in their attention,
    which does: two templates, and training as under the default strategy (a window of 4 in 16 tokens matters)."""
    config = transformers.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 7}, head_dim=16, sliding_window=4,
                                           query_pre_attn_scalar=16)
    assert config.layer_types.count("full_attention") == 1
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).float()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(3)]
    runs = {}
    for name, strategy in (("auto", "auto"), ("megatrain", MegatrainStrategy())):
        module = HFModule("gemma3_text")
        module.model = copy.deepcopy(model)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, precision="32-true",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader(batches))
        runs[name] = (module.losses, trainer)
    assert len({id(t) for t in runs["megatrain"][1].strategy.engine.templates}) == 2
    torch.testing.assert_close(torch.tensor(runs["megatrain"][0]), torch.tensor(runs["auto"][0]), rtol=1e-5, atol=0)


class _EvaluatesBeforeBackward(HFModule):
    """A training step that also runs the model without autograd after its loss (a metric, say), between the
    training forward and its backward."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():
            self.model(input_ids=batch)
        return loss


def test_a_pass_without_autograd_between_forward_and_backward_leaves_the_kept_layers_alone(tmp_path):
    """The last layer keeps its graph and the others' inputs go to files: a no-grad pass of the model in between
    neither takes their slots nor changes what backward finds. Trains like the default strategy."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(STEPS * ACCUMULATE)]

    def fit(strategy):
        module = _EvaluatesBeforeBackward("llama")
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=STEPS, precision="32-true",
                            accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader(batches))
        return module, trainer

    want, _ = fit("auto")
    got, trainer = fit(MegatrainStrategy(keep_activations=1, storage="nvme", nvme_dir=str(tmp_path),
                                         offload_checkpoints="disk"))
    assert trainer.strategy.engine.kept.blocks == 1 and trainer.strategy.engine.host_checkpoints.on_disk
    assert_trains_like(got, want, trainer)


def test_a_traced_step_of_a_transformers_model_has_every_layer_and_the_head(tmp_path):
    """trace_dir: a transformers model's step (its own forward calls the layers) records each layer's forward,
    recompute and backward, and the head and loss between forward and backward (the resident unit, layer -1), as
    megatrain's own Llama's does (the planner's comparison reads the compute lane's spans)."""
    import json

    from megatrain_lightning import schedule as S

    _fit("llama", MegatrainStrategy(trace_dir=str(tmp_path), trace_step=2))
    events = json.loads((tmp_path / "step2.json").read_text())["events"]
    for kind in (S.FORWARD, S.RECOMPUTE, S.BACKWARD):
        layers = [e["layer"] for e in events if e["lane"] == S.COMPUTE and e["kind"] == kind]
        assert sorted(layers) == sorted(list(range(3)) * ACCUMULATE), kind
    resident = [e for e in events if e["lane"] == S.COMPUTE and e["kind"] == S.RESIDENT]
    assert [e["layer"] for e in resident] == [-1] * ACCUMULATE and all(e["end"] > e["start"] for e in resident)
    forward_ends = sorted(e["end"] for e in events if e["kind"] == S.FORWARD and e["layer"] == 2)
    assert all(r["start"] >= f for r, f in zip(sorted(resident, key=lambda e: e["start"]), forward_ends))


def test_flex_attention_layer_calls_ask_for_its_main_kernel(monkeypatch):
    """Every layer call through flex attention passes FORCE_USE_FLEX_ATTENTION on to flex_attention (transformers
    hands a layer's kernel_options to it): inductor's decoding kernel, which it would pick for the no-autograd forward
    of short sequences, gave a compiled gpt-oss layer wrong outputs on CUDA (engine/layer_calls.py)."""
    from transformers.integrations import flex_attention as hf_flex

    seen = []
    real = hf_flex.compile_friendly_flex_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return real(*args, **kwargs)

    class Validated(HFModule):
        def validation_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", spy)
    module = Validated("llama")
    module.model.set_attn_implementation("flex_attention")
    batch = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    L.Trainer(strategy=MegatrainStrategy(compile=False), accelerator="cpu", devices=1, precision="32-true",
              logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).validate(module, dataloaders=loader([batch]), verbose=False)
    assert len(seen) == module.model.config.num_hidden_layers
    assert all(options == {"FORCE_USE_FLEX_ATTENTION": True} for options in seen), seen


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_masks_follow_their_sequences_through_the_batch_sweep(compiled):
    """A transformers model on flex_attention gets one BlockMask for the whole batch (a row per sequence: its padding);
    where the batch sweep cuts the batch, each chunk's layers get the rows of its own sequences (not the first
    sequences'): the validation loss of a padded batch in chunks of one sequence equals the model's own forward, its
    layers eager or compiled."""
    class Padded(HFModule):
        def validation_step(self, batch, batch_idx):
            mask = torch.ones_like(batch)
            for row, pad in enumerate((0, 5, 9, 14)):  # each sequence its own left padding
                mask[row, :pad] = 0
            labels = batch.masked_fill(mask == 0, -100)
            loss = self.model(input_ids=batch, attention_mask=mask, labels=labels).loss
            self.log("val_loss", loss)
            return loss

    def validate(strategy):
        module = Padded("llama")
        module.model.set_attn_implementation("flex_attention")
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, precision="32-true", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        out = trainer.validate(module, dataloaders=loader([batch]), verbose=False)
        return out[0]["val_loss"], trainer

    batch = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    want, _ = validate("auto")
    got, trainer = validate(MegatrainStrategy(chunk_tokens=24, compile=compiled))  # chunks of one sequence
    assert trainer.strategy.engine.sweep.chunk_of[(4, 24, torch.float32)] == 1
    assert got == pytest.approx(want, rel=1e-5)
