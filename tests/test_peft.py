"""A Hugging Face `peft` model in a LightningModule under the megatrain strategy: built in `__init__` (LoRA on every
linear layer of llama, qwen3 and two mixtures, LoRA with dropout, DoRA, IA3, LoHa, VeRA, prompt tuning, LoRA on a
mixture's fused experts) it trains like Lightning's default strategy; built in `configure_model` (on the meta device, initialized layer by
layer) its adapters start as peft starts them (B = 0: the adapted model is its base model), not drawn like the base
model's Linear weights, DoRA's magnitudes the base weights' row norms (imported ones too); adapters whose
initialization needs more, and prefix tuning, are refused by name (issue #28)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning.errors import UserError
from tests.helpers import loader, rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


FAMILIES = {  # transformers' config class, what this family adds
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                          decoder_sparse_step=1, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _lora_model(seed: int = 0, **lora):
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float()
    return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora))


def _adapted(family: str, adapter) -> torch.nn.Module:
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**CONFIG, **extra)).float()
    model = peft.get_peft_model(base, adapter)
    with torch.no_grad():  # adapters that change the output from the first step (peft starts LoRA's B at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


class LoRAModule(L.LightningModule):
    def __init__(self, model=None, **lora) -> None:
        super().__init__()
        self.lora, self.losses = lora, []
        if model is not None:
            self.model = model

    def configure_model(self) -> None:
        if not hasattr(self, "model"):
            self.model = _lora_model(**self.lora)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _fit(module, strategy, batches):
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=len(batches), precision="32-true",
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader(batches))
    return trainer


ADAPTERS = {  # a LoRA on every linear layer (the router and, in transformers 5, the fused experts of a mixture too:
    # peft wraps those parameters, re-registering each on every forward), with dropout, DoRA, IA3
    "lora-all-linear": lambda: peft.LoraConfig(r=4, target_modules="all-linear"),
    "lora-dropout": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "dora": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "lora-experts": lambda: peft.LoraConfig(r=4, target_modules=["q_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "prompt-tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}
CASES = [("llama", "lora-all-linear"), ("llama", "lora-dropout"), ("llama", "dora"), ("llama", "ia3"),
         ("qwen3", "lora-all-linear"), ("qwen3", "lora-dropout"), ("qwen3_moe", "lora-all-linear"),
         ("qwen3_moe", "lora-experts"), ("mixtral", "lora-all-linear"), ("llama", "loha"), ("llama", "vera"),
         ("llama", "prompt-tuning")]


@pytest.mark.parametrize("family,adapter", CASES)
def test_adapted_model_built_in_init_trains_like_the_default_strategy(family, adapter):
    """Losses and every trainable weight after 5 AdamW steps (clip 1.0) equal the default strategy's (fp32, 1e-5);
    dropout draws the same masks. Before the fix, a mixture's LoRA on all linear layers failed in the backward:
    peft re-registers a wrapped parameter in place on every forward, which invalidated the layer's other saved
    parameters (views of one buffer sharing one version counter)."""
    _trains_like_the_default_strategy(family, adapter)


@pytest.mark.parametrize("family,adapter", [("llama", "lora-dropout"), ("qwen3_moe", "lora-all-linear")])
def test_adapted_model_keeping_activations_trains_like_the_default_strategy(family, adapter):
    """The last of the 2 layers keeps its forward's graph (keep_activations=1): dropout's masks are the forward's own,
    and peft's in-place re-registration happens once per layer and step."""
    trainer = _trains_like_the_default_strategy(family, adapter, keep_activations=1)
    engine = trainer.strategy.engine
    assert engine.kept.blocks == 1 and len(engine._slots) == engine.n_slots + 1


def _trains_like_the_default_strategy(family: str, adapter: str, **strategy):
    model = _adapted(family, ADAPTERS[adapter]())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(5)]
    torch.manual_seed(5)
    want = LoRAModule(copy.deepcopy(model))
    _fit(want, "auto", batches)
    torch.manual_seed(5)
    got = LoRAModule(copy.deepcopy(model))
    trainer = _fit(got, MegatrainStrategy(**strategy), batches)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-5, atol=0)
    masters = trainer.strategy.store.named("master")
    start = dict(model.named_parameters())
    trained = {n: p for n, p in want.model.named_parameters() if p.requires_grad}
    assert trained and len(trained) < len(start)
    for name, p in trained.items():
        assert rel_err(p.detach(), start[name].detach()) > 1e-3, f"{name} did not train"
        assert rel_err(masters["model." + name], p.detach()) < 1e-5, name
    return trainer


def test_lora_built_in_configure_model_starts_as_its_base_model():
    """Before the fix the model's `_init_weights` drew lora_B like any Linear: the first loss was neither the base
    model's nor anything peft would give."""
    from megatrain_lightning import model_store

    fresh = LoRAModule()
    with torch.device("meta"):
        fresh.configure_model()
    built = model_store.build(fresh, torch.float32, pin=False, storage="ram", stream="auto", ram_budget_GiB=None,
                              nvme_dir="unused", init_from=None)
    masters = built.store.named("master")
    b = [v for k, v in masters.items() if "lora_B" in k]
    a = [v for k, v in masters.items() if "lora_A" in k]
    assert len(a) == len(b) == 4
    assert all(torch.count_nonzero(v) == 0 for v in b)
    bound = 1 / CONFIG["hidden_size"] ** 0.5  # kaiming-uniform with a = sqrt(5), as nn.Linear and peft draw A
    assert all(0 < v.abs().max() <= bound and v.std() > bound / 3 for v in a)


@pytest.mark.parametrize("imported", [False, True])
def test_dora_built_in_configure_model_starts_as_its_base_model(imported, tmp_path):
    """DoRA's magnitudes are the base weights' row norms (LoRA's B zero), whether the base is initialized there or
    imported afterwards (init_from): the first loss is the base model's. Before: refused by name."""
    from megatrain_lightning import model_store

    torch.manual_seed(7)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float()
    base.save_pretrained(tmp_path / "hf")
    fresh = LoRAModule(use_dora=True)
    with torch.device("meta"):
        fresh.configure_model()
    built = model_store.build(fresh, torch.float32, pin=False, storage="ram", stream="auto", ram_budget_GiB=None,
                              nvme_dir="unused", init_from=tmp_path / "hf" if imported else None)
    masters = built.store.named("master")
    magnitudes = {k: v for k, v in masters.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 4
    for name, m in magnitudes.items():
        weight = masters[name.replace("lora_magnitude_vector.default.weight", "base_layer.weight")]
        torch.testing.assert_close(m, torch.linalg.norm(weight, dim=1), rtol=1e-6, atol=0)
        if imported:  # the checkpoint's weight, not the one initialized before the import
            plain = name[len("model.base_model.model."):].replace("lora_magnitude_vector.default.weight", "weight")
            assert torch.equal(weight, base.get_parameter(plain).detach())
    assert all(torch.count_nonzero(v) == 0 for k, v in masters.items() if "lora_B" in k)
    if imported:  # trains from there: the first loss is the imported base model's
        got = LoRAModule(use_dora=True)
        batch = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
        _fit(got, MegatrainStrategy(init_from=tmp_path / "hf"), [batch])
        with torch.no_grad():
            want = base(input_ids=batch, labels=batch).loss.item()
        assert got.losses[0] == pytest.approx(want, rel=1e-5)


def test_an_initialization_that_needs_more_than_the_base_is_refused_in_configure_model():
    trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError, match=r"a peft model built in configure_model \(on the meta device\) with "
                                        r"init_lora_weights='pissa'"):
        trainer.fit(LoRAModule(init_lora_weights="pissa"),
                    train_dataloaders=loader([torch.zeros(1, 17, dtype=torch.long)]))


def test_save_pretrained_after_fit_writes_the_trained_adapter(tmp_path):
    """`model.save_pretrained(DIR)` after fit writes the adapter as trained (peft reads the module's state dict, which
    holds the store's fp32 masters), and `PeftModel.from_pretrained` on the base model loads it to the same logits."""
    model = _lora_model()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(3)]
    module = LoRAModule(copy.deepcopy(model))
    trainer = _fit(module, MegatrainStrategy(), batches)
    module.model.save_pretrained(tmp_path / "adapter")
    masters = trainer.strategy.store.named("master")
    base = _lora_model().get_base_model()  # the same base weights (seed 0), adapters dropped
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), masters["model." + name]), name
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(masters["model." + name])
        tokens = batches[0][:, :-1]
        want = reference.eval()(input_ids=tokens).logits
        torch.testing.assert_close(loaded(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-6)
        merged = loaded.merge_and_unload()  # the adapters folded into the base weights: a plain transformers model
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_resumed_lora_run_equals_the_straight_run(tmp_path):
    """6 steps with a checkpoint after the 4th (ModelCheckpoint); a new module and trainer resume from it: the losses
    of steps 5-6 and every weight (adapters trained, base frozen) and Adam moment equal the straight run's, bit for
    bit. (No dropout: Lightning restores no RNG state, under any strategy.)"""
    model = _adapted("qwen3", peft.LoraConfig(r=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(2)]

    def fit(ckpt_path=None, callbacks=()):
        torch.manual_seed(5)
        module = LoRAModule(copy.deepcopy(model))
        trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", devices=1, max_steps=6,
                            precision="32-true", gradient_clip_val=1.0, logger=False, callbacks=list(callbacks),
                            enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader(batches), ckpt_path=ckpt_path)
        return trainer, module.losses

    straight, straight_losses = fit(callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1)])
    resumed, resumed_losses = fit(ckpt_path=tmp_path / "epoch=1-step=4.ckpt")
    assert resumed.global_step == 6
    assert resumed_losses == straight_losses[4:]
    for which in ("master", "exp_avg", "exp_avg_sq"):
        want, got = straight.strategy.store.named(which), resumed.strategy.store.named(which)
        assert want.keys() == got.keys() and (which == "master" or len(want) < len(straight.strategy.store.index))
        for name in want:
            assert torch.equal(got[name], want[name]), (which, name)


def test_lora_on_a_bf16_base_trains_like_the_default_strategy_and_holds_the_base_in_bf16():
    """The way a large model is fine-tuned: the base loaded in bf16, peft's adapters in fp32, bf16-mixed. Losses and
    adapters as under the default strategy, and the store (measured) holds 16 bytes a trainable parameter and 2 a
    frozen one: the base has no fp32 master."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(5)]

    def fit(strategy):
        module = LoRAModule(copy.deepcopy(model))
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=5, precision="bf16-mixed",
                            gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader(batches))
        return module, trainer

    want, _ = fit("auto")
    got, trainer = fit(MegatrainStrategy())
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-5, atol=0)
    store = trainer.strategy.store
    masters = store.named("master")
    for name, p in want.model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and rel_err(masters["model." + name], p.detach()) < 1e-5, name
        else:
            assert masters["model." + name].dtype == torch.bfloat16 and torch.equal(masters["model." + name], p), name
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert store.nbytes == 16 * n_trainable + 2 * n_frozen


def test_prefix_tuning_is_refused_by_name():
    """Its key/value prefixes reach every layer through the KV cache, which streamed layers do not have (the error
    before: a mask of the wrong size, deep in attention)."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float()
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError, match=r"peft PREFIX_TUNING: gives every decoder layer a key/value prefix"):
        trainer.fit(LoRAModule(model), train_dataloaders=loader([torch.zeros(1, 17, dtype=torch.long)]))
