"""model=hf on a checkpoint of a family megatrain's Llama does not have (every mixture of experts, Phi-3, Gemma 3
text; hf_lm.HFCausalLM: the transformers model itself): import through transformers' own layout rules
(transformers 5 fuses each layer's experts on load), training equal to Lightning's default strategy on the same
module, export under the model's own architecture and layout, re-import the identity."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatrain_lightning import MegatrainStrategy, hf
from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.config import Config
from megatrain_lightning.errors import UserError
from megatrain_lightning.engine.streaming import _functional
from megatrain_lightning.hf import adapters
from megatrain_lightning.hf.model import HFCausalLM, config_json
from tests.helpers import assert_adam_state_close, lm_kwargs, loader
from tests.test_cli import restore_logging  # noqa: F401  (a fixture: train.main sets up its own logging)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
# config.TRANSFORMERS_HF_TYPES, each as transformers names it
FAMILIES = {
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                          decoder_sparse_step=1, head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                                             q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                             n_group=1, topk_group=1, rope_scaling=None)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                       n_shared_experts=1, first_k_dense_replace=1, head_dim=16, n_group=1,
                                       topk_group=1)),
}
STEPS, ACCUMULATE = 3, 2


def _checkpoint(family: str, path, **overrides) -> None:
    name, extra = FAMILIES[family]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    torch.manual_seed(0)
    config = getattr(transformers, name)(**{**TINY, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a router's trained bias (a buffer): not what init gives
            b.copy_(torch.randn(b.shape))
    model.save_pretrained(path)


def _module(path, model=None, **config) -> HFCausalLM:
    config = Config.from_dict({"name": "hf", "path": str(path), **config})
    return HFCausalLM(config, json.loads((path / "config.json").read_text()), model=model, loss_chunk_tokens=16,
                      **lm_kwargs(STEPS))


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item() * trainer.accumulate_grad_batches)  # Lightning divided it


def _fit(module, strategy, batches, accelerator="cpu"):
    losses = _Losses()
    trainer = L.Trainer(strategy=strategy, accelerator=accelerator, devices=1, max_steps=STEPS, precision="32-true",
                        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, logger=False, callbacks=[losses],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader(batches))
    return trainer, losses.losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_imports_trains_and_exports_as_the_transformers_model(family, tmp_path):
    src, out = tmp_path / "src", tmp_path / "exported"
    _checkpoint(family, src)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(STEPS * ACCUMULATE)]

    # import: the first loss is transformers' own on the checkpoint's weights
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        first = reference(input_ids=batches[0], labels=batches[0]).loss.item()
    want_module = _module(src, model=reference)
    _, want = _fit(want_module, "auto", batches)
    trainer, got = _fit(_module(src), MegatrainStrategy(init_from=src), batches)
    assert got[0] == pytest.approx(first, rel=1e-5)
    for a, b in zip(got, want, strict=True):  # training: equal to the default strategy's
        assert a == pytest.approx(b, rel=1e-5), (got, want)
    masters = trainer.strategy.store.named("master")
    trained = {trainer.strategy._aliases.get(f"model.{k}", f"model.{k}"): p.detach()
               for k, p in want_module.model.named_parameters()}
    assert set(trained) == set(masters)
    # 1e-5; the embedding's gradient (a scatter-add over the batch's tokens) sums in another order under the engine:
    # 1.07e-5 seen for DeepSeek-V3, and one element of a row first used in the last step 1.5e-4 off (helpers)
    for name, value in trained.items():
        tol = 2e-5 if name.endswith("embed_tokens.weight") else 1e-5
        assert_adam_state_close({name: masters[name]}, {name: value}, tol, lm_kwargs(STEPS)["lr"])

    # export: the model's own class and checkpoint layout (transformers' names), the trained weights
    trainer.save_checkpoint(tmp_path / "ckpt")
    hf.export(tmp_path / "ckpt", out, dtype="float32")
    exported = load_file(next(out.glob("*.safetensors")))
    assert set(exported) == set(load_file(src / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["architectures"] == \
        json.loads((src / "config.json").read_text())["architectures"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(loaded) is type(reference)
    params, buffers = dict(loaded.named_parameters(remove_duplicate=False)), dict(reference.named_buffers())
    for name, value in loaded.state_dict().items():
        full = trainer.strategy._aliases.get(f"model.{name}", f"model.{name}")
        if name in params:
            assert torch.equal(value, masters[full]), name
        else:  # a persistent buffer (DeepSeek-V3's router bias): the checkpoint's value, which training keeps
            assert torch.equal(value, buffers[name]), name

    # re-import: the identity (validate builds the store without a training step)
    strategy = MegatrainStrategy(init_from=out)
    L.Trainer(strategy=strategy, accelerator="cpu", devices=1, precision="32-true", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).validate(
        _module(out), dataloaders=loader(batches[:1]), verbose=False)
    again = strategy.store.named("master")
    for name, b in strategy.lightning_module.model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(b.cpu(), reference.get_buffer(name)), name
    assert set(again) == set(masters)
    for name, value in again.items():
        assert torch.equal(value, masters[name]), name


def test_gpt_oss_attention_is_flex_on_cuda_eager_on_the_cpu_unless_chosen_and_a_refused_one_is_named(tmp_path):
    """gpt-oss (no SDPA path: its attention sinks) trains through flex_attention on CUDA and transformers' eager
    attention on the CPU, unless model.attn_implementation chooses one; other families keep transformers' choice. One
    that transformers or this device refuses is named."""
    src = tmp_path / "src"
    _checkpoint("gpt_oss", src)
    module = _module(src)
    assert module.config.attention(cuda=True) == "flex_attention" and module.config.attention(cuda=False) == "eager"
    assert module.config.eager_attention  # unresolved: the CPU's (the planner resolves it for its hardware)
    chosen = _module(src, attn_implementation="eager").config
    assert chosen.attention(cuda=True) == chosen.attention(cuda=False) == "eager"
    other = Config.from_dict({"name": "hf", "path": str(src), "transformers_type": "mixtral"})
    assert other.attention(cuda=True) is other.attention(cuda=False) is None and not other.eager_attention
    module.configure_model()  # no trainer: not CUDA
    assert module.model.config._attn_implementation == "eager"
    with pytest.raises(UserError, match=r"^model\.attn_implementation=flex_attention: transformers runs gpt_oss's "
                                        r"attention sinks through flex attention on CUDA only, and this run is on "
                                        r"the CPU; leave it unset \(eager there\)$"):
        _module(src, attn_implementation="flex_attention").configure_model()
    with pytest.raises(UserError, match=r"^model\.attn_implementation='sdpa': transformers refuses it for gpt_oss: "):
        _module(src, attn_implementation="sdpa").configure_model()
    with pytest.raises(ValueError, match=r"^attn_implementation='eager': only a model that trains as the "
                                         r"transformers model \(transformers_type\) chooses its attention; "
                                         r"megatrain's Llama runs SDPA$"):
        Config.from_name("llama-3.2-1b", attn_implementation="eager")


def test_a_model_on_eager_attention_is_told_what_runs_it_fused(tmp_path):
    """A model the user built on transformers' eager attention (gpt-oss's default) gets, on CUDA, a line naming the
    fused implementation for its family: flex_attention for gpt-oss's sinks, sdpa for the others; none when fused."""
    for family in ("gpt_oss", "phi3"):
        _checkpoint(family, tmp_path / family)
    gpt_oss, phi3 = _module(tmp_path / "gpt_oss"), _module(tmp_path / "phi3")
    gpt_oss.configure_model()  # no trainer: the CPU's attention, eager
    phi3.configure_model()
    assert adapters.fused_attention_hint(phi3) is None  # transformers' SDPA
    phi3.model.set_attn_implementation("eager")
    assert adapters.fused_attention_hint(gpt_oss) == (
        "gpt_oss: its attention runs transformers' eager implementation (scores materialized, layers uncompiled); "
        "model.attn_implementation=flex_attention (train.py), or model.set_attn_implementation('flex_attention') on "
        "the model before fit, runs it fused and compiled")
    assert adapters.fused_attention_hint(phi3).startswith("phi3: its attention runs transformers' eager ")
    assert "model.attn_implementation=sdpa (train.py), or model.set_attn_implementation('sdpa')" in \
        adapters.fused_attention_hint(phi3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_gpt_oss_trains_through_flex_attention_like_eager(tmp_path):
    """On CUDA gpt-oss trains through flex attention by default (its sinks fused, from the kernel's log-sum-exp).
    Training under the megatrain strategy (its layers compiled, the default, and not; the batch sweep in chunks of one
    sequence), under the default strategy through flex attention, and megatrain through eager attention (chosen) all
    equal the default strategy's through eager attention (the same math; the path CPU tests prove) within 1e-4.
    This caught inductor's flex decoding kernel (short queries, no autograd: the engine's forward pass) giving a
    compiled layer's attention up to 23% off (engine/layer_calls.py, FLEX_KERNEL_OPTIONS); every run's losses are in
    the message, to tell which path differs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    src = tmp_path / "src"
    _checkpoint("gpt_oss", src)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(STEPS * ACCUMULATE)]
    runs = {}
    for attention in ("eager", "flex_attention"):
        reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                                      attn_implementation=attention)
        _, runs[f"default strategy, {attention}"] = _fit(_module(src, model=reference), "auto", batches,
                                                         accelerator="gpu")
    for name, strategy in [("megatrain (defaults)", MegatrainStrategy(init_from=src)),
                           ("megatrain, uncompiled", MegatrainStrategy(init_from=src, compile=False)),
                           # each chunk gets its rows of the BlockMask (CPU-tested in inference only)
                           ("megatrain, chunks of one sequence", MegatrainStrategy(init_from=src, chunk_tokens=17))]:
        trainer, runs[name] = _fit(_module(src), strategy, batches, accelerator="gpu")
        assert trainer.lightning_module.model.config._attn_implementation == "flex_attention"
        assert trainer.strategy.engine.sweep.eager_attention_heads == 0  # nothing materialized
    _, runs["megatrain, eager"] = _fit(_module(src, attn_implementation="eager"), MegatrainStrategy(init_from=src),
                                       batches, accelerator="gpu")
    want = runs["default strategy, eager"]
    off = {name: max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)) for name, got in runs.items()}
    assert max(off.values()) <= 1e-4, (off, runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])  # gpt-oss: the test above
def test_cuda_family_trains_like_the_default_strategy(family, tmp_path):
    """Each family as the transformers model on CUDA under the strategy's defaults (its layers compiled, transformers'
    attention): losses equal the default strategy's on the same checkpoint within 1e-4 (fp32, TF32 off), as on the CPU
    (where the layers run eagerly): a compiled path can differ where the eager one does not (flex attention did)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    src = tmp_path / "src"
    _checkpoint(family, src)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(STEPS * ACCUMULATE)]
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    _, want = _fit(_module(src, model=reference), "auto", batches, accelerator="gpu")
    trainer, got = _fit(_module(src), MegatrainStrategy(init_from=src), batches, accelerator="gpu")
    assert trainer.strategy.engine._call is not _functional  # compiled: the CUDA default
    off = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
    assert off <= 1e-4, (off, got, want)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_import_into_files_trains_like_ram(family, tmp_path):
    """storage=nvme with a RAM budget that puts every layer's state in its file: the import writes the converted
    layers (and the router biases) straight into the files, and training equals the same import into RAM."""
    src = tmp_path / "src"
    _checkpoint(family, src)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(STEPS * ACCUMULATE)]
    _, want = _fit(_module(src), MegatrainStrategy(init_from=src), batches)
    trainer, got = _fit(_module(src), MegatrainStrategy(init_from=src, storage="nvme", ram_budget_GiB=3e-4,
                                                        nvme_dir=str(tmp_path / "nvme")), batches)
    store = trainer.strategy.store
    assert all(u.on_disk for u in store.units[:-1])
    assert got == want


def test_a_checkpoint_already_in_the_modules_layout_imports_too(tmp_path):
    """A Mixtral checkpoint written with the module's own (fused) names, as `safetensors.save_file(model.state_dict())`
    would: the layout rules leave such names alone, and the import gives transformers' own loss."""
    from safetensors.torch import save_file

    src, fused = tmp_path / "src", tmp_path / "fused"
    _checkpoint("mixtral", src)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fused.mkdir()
    (fused / "config.json").write_text((src / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, fused / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(fused / "model.safetensors"))
    batch = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = reference(input_ids=batch, labels=batch).loss.item()
    _, got = _fit(_module(fused), MegatrainStrategy(init_from=fused), [batch] * (STEPS * ACCUMULATE))
    assert got[0] == pytest.approx(first, rel=1e-5)


@pytest.mark.parametrize("family,key,value,message", [
    ("mixtral", "output_router_logits", True, "config.json sets output_router_logits=true"),
    ("gemma3_text", "final_logit_softcapping", 30.0, "config.json sets final_logit_softcapping"),
])
def test_a_loss_train_py_does_not_compute_is_refused_by_name(family, key, value, message, tmp_path):
    """transformers would add an auxiliary router loss / soft-cap the logits: refused, never silently different."""
    _checkpoint(family, tmp_path)
    hf_config = {**json.loads((tmp_path / "config.json").read_text()), key: value}
    with pytest.raises(UserError, match=message):
        HFCausalLM(Config.from_dict({"name": "hf", "path": str(tmp_path)}), hf_config)


TINY_PRESET = ["+model.n_layer=2", "+model.hidden_size=64", "+model.n_head=4", "+model.n_kv_head=2",
               "+model.moe_intermediate_size=96", "+model.intermediate_size=96", "+model.vocab_size=256"]


@pytest.mark.parametrize("source", ["checkpoint", "preset"])
def test_train_py_trains_and_exports_a_mixtral(source, tmp_path, restore_logging):
    """The Hydra entry point: model=hf on a Mixtral directory, or the mixtral-8x22b preset's layout at a tiny width
    (a random start), trains the transformers model (byte-level data needs 256 tokens), and its checkpoint exports
    as a Mixtral that transformers loads."""
    import train

    if source == "checkpoint":  # its data: token ids (model=hf refuses bytes as ids of its vocabulary)
        _checkpoint("mixtral", tmp_path / "src", vocab_size=256)
        np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 256, 4000, dtype=np.int32))
        model = ["model=hf", f"model.path={tmp_path / 'src'}", "data=tokens", f"data.path={tmp_path / 'ids.npy'}",
                 "data.val_fraction=0.1"]
    else:
        model = ["model=mixtral-8x22b", *TINY_PRESET]
    code = train.main([*model, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                       "data.seq_len=16", "data.micro_batch=2", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0
    hf.export(tmp_path / "run" / "checkpoints", tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert loaded.config.num_hidden_layers == {"checkpoint": TINY["num_hidden_layers"], "preset": 2}[source]
    masters = ckpt.read_masters(ckpt.resolve(tmp_path / "run" / "checkpoints"))
    # export's default dtype: the imported model's own (this checkpoint was saved in float32), else bfloat16
    dtype = {"checkpoint": torch.float32, "preset": torch.bfloat16}[source]
    for name, p in loaded.named_parameters():
        assert torch.equal(p, masters[f"model.{name}"].to(dtype)), name
    evaluated = HFCausalLM.load_from_checkpoint(tmp_path / "run" / "checkpoints")  # for evaluation, on the CPU
    assert type(evaluated.model).__name__ == "MixtralForCausalLM"
    assert all(torch.equal(evaluated.get_parameter(k), v) for k, v in masters.items())


@pytest.mark.parametrize("preset", ["mixtral-8x22b", "qwen3-235b-a22b", "gpt-oss-120b", "glm-4.5-air",
                                    "deepseek-v3"])
def test_a_mixture_preset_builds_the_parameters_it_counts(preset):
    """The preset's transformers config.json (hf_lm.config_json) builds exactly the parameters the planner counts
    (gpt-oss: its expert biases and attention sinks aside, 0.03% here); two layers, a small vocabulary."""
    config = Config.from_name(preset, n_layer=4, vocab_size=1024)
    hf_config = config_json(config)
    if not hasattr(transformers, transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES.get(
            hf_config["model_type"], "")):
        pytest.skip(f"transformers {transformers.__version__} has no {hf_config['model_type']}")
    kind = hf_config.pop("model_type")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(kind, **hf_config))
    n = sum(p.numel() for p in model.parameters())
    assert config.n_params == pytest.approx(n, rel=4e-4 if kind == "gpt_oss" else 0, abs=0)
