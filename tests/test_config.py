"""Presets against hand-derived and published sizes; every YAML in conf/ composes and builds."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from megatrain_lightning import build
from megatrain_lightning.config import PRESETS, Config
from megatrain_lightning.errors import UserError
from megatrain_lightning.models.llama import Llama
from planner.check import check

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_llama100b_by_hand():
    c = Config.from_name("llama100b")
    h, kv, mlp, vocab = 10240, 8 * 128, 28672, 128256
    layer = h * h + 2 * h * kv + h * h + 3 * h * mlp + 2 * h
    assert c.layer_params == layer
    assert c.n_params == 88 * layer + 2 * vocab * h + h
    assert 99e9 < c.n_params < 101e9


@pytest.mark.parametrize("name,published", [
    ("llama-3.2-1b", 1.236e9),  # tied
    ("llama-3-8b", 8.030e9),
    ("llama-3-70b", 70.55e9),
    ("llama-3.1-405b", 405.9e9),
    ("mistral-large-123b", 122.6e9),
    ("qwen2-0.5b", 0.494e9),
])
def test_presets_match_published_sizes(name, published):
    assert Config.from_name(name).n_params == pytest.approx(published, rel=5e-3)


@pytest.mark.parametrize("name,total,active,embedding_counted", [
    ("mixtral-8x22b", 141e9, 39e9, True),  # Mistral AI: "141B parameters, 39B active"
    ("qwen3-235b-a22b", 235e9, 22e9, True),  # Qwen: "235B in total and 22B activated"
    ("gpt-oss-120b", 116.83e9, 5.13e9, False),  # OpenAI's model card: 5.13B active, the embedding table not counted
])
def test_mixture_of_experts_presets_match_published_sizes(name, total, active, embedding_counted):
    c = Config.from_name(name)
    assert c.n_params == pytest.approx(total, rel=0.01)
    counted = c.active_params - (0 if embedding_counted else c.vocab_size * c.hidden_size)
    assert counted == pytest.approx(active, rel=0.01)
    # by hand for Mixtral: 56 layers of attention (2 x 6144^2 + 2 x 6144 x 1024) and 8 experts of 3 x 6144 x 16384
    if name == "mixtral-8x22b":
        attn, expert = 2 * 6144 ** 2 + 2 * 6144 * 1024, 3 * 6144 * 16384
        assert c.layer_params == attn + 8 * expert + 6144 * 8 + 2 * 6144
        assert c.n_layer * (c.layer_params - 6 * expert) + c.embedding_params == c.active_params


def test_dense_first_layers_shared_experts_and_latent_attention_by_hand():
    """GLM-4.5-Air and DeepSeek-V3, layer by layer from their config.json (sources in config.py)."""
    g = Config.from_name("glm-4.5-air")
    attn = 2 * 4096 * 96 * 128 + 2 * 4096 * 8 * 128 + (96 + 2 * 8) * 128  # q and o, k and v, the q/k/v biases
    expert = 3 * 4096 * 1408
    dense = attn + 3 * 4096 * 10944 + 2 * 4096  # layer 0
    moe = attn + (128 + 1) * expert + 4096 * 128 + 2 * 4096  # 128 routed + 1 shared, the router
    assert g.n_params == dense + 45 * moe + 2 * 151552 * 4096 + 4096
    assert g.n_params == pytest.approx(106e9, rel=0.01)  # Z.ai: "106 billion total parameters"
    active = g.active_params - 2 * 151552 * 4096 - 4096  # without the embedding, the head and the final norm
    assert active == dense + 45 * (attn + 9 * expert + 4096 * 128 + 2 * 4096)
    # Z.ai: "12 billion active": 12.18B here. Published active counts are whole billions, so "within 1%" cannot be
    # judged past their rounding: the count rounds to the published figure
    assert round(active / 1e9) == 12
    assert g.max_layer_params == moe and g.layer_params == (dense + 45 * moe) // 46

    d = Config.from_name("deepseek-v3")
    H = 128
    attn = (7168 * 1536 + 1536 + 1536 * H * 192  # q through its rank-1536 latent (and its norm), heads of 128 + 64
            + 7168 * (512 + 64) + 512 + 512 * H * (128 + 128)  # kv latent + shared rotary key, norm, k (no rope) and v
            + H * 128 * 7168)  # o
    expert = 3 * 7168 * 2048
    dense = attn + 3 * 7168 * 18432 + 2 * 7168  # layers 0-2
    moe = attn + (256 + 1) * expert + 7168 * 256 + 2 * 7168
    assert d.attn_params == attn
    assert d.n_params == 3 * dense + 58 * moe + 2 * 129280 * 7168 + 7168
    assert d.n_params == pytest.approx(671e9, rel=0.01)  # DeepSeek: "671B total parameters" (MTP module apart)
    # DeepSeek: "37B activated for each token": 36.63B without the embedding table (its lookup is no matmul; 37.55B
    # with it), which rounds to the published whole billions
    assert round((d.active_params - 129280 * 7168) / 1e9) == 37


def test_a_mixture_of_experts_preset_is_not_a_llama():
    with pytest.raises(ValueError, match="gpt-oss-120b is a gpt_oss shape: it trains as the transformers model"):
        Llama(Config.from_name("gpt-oss-120b", n_layer=1, vocab_size=16))
    with pytest.raises(ValueError, match="x is a mixture of experts: Llama has dense MLPs"):
        Llama(replace(Config.from_name("gpt-oss-120b", n_layer=1, vocab_size=16), name="x", transformers_type=None))
    with pytest.raises(ValueError, match="needs 1 <= experts_per_token <= n_experts"):
        Config(n_experts=4, experts_per_token=5, moe_intermediate_size=8)
    with pytest.raises(ValueError, match="n_shared_experts and n_dense_layers describe a mixture of experts"):
        Config(n_dense_layers=1)
    with pytest.raises(ValueError, match=r"n_dense_layers must be in \[0, n_layer\), got 2"):
        Config(n_layer=2, n_experts=4, experts_per_token=2, moe_intermediate_size=8, n_dense_layers=2)
    with pytest.raises(ValueError, match="latent attention needs 0 < qk_rope_head_dim < head_size"):
        Config(kv_lora_rank=8, qk_rope_head_dim=0)
    with pytest.raises(ValueError, match="deepseek-v3 is a deepseek_v3 shape"):
        Llama(Config.from_name("deepseek-v3", n_layer=4, vocab_size=16))
    with pytest.raises(ValueError, match="has latent attention: Llama's is grouped-query"):
        Llama(Config(n_layer=1, kv_lora_rank=8, qk_rope_head_dim=4, hidden_size=64, n_head=4))


def test_untied_3b_is_the_peer_shape():
    assert Config.from_name("llama-3.2-3b", tie_embeddings=False).n_params == 3_606_752_256


def test_bad_config_values():
    with pytest.raises(ValueError, match="not divisible"):
        Config(hidden_size=64, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be >= 1"):
        Config(n_layer=0)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group,option", sorted(
    (p.parent.name, p.stem) for p in CONF.glob("*/*.yaml")))
def test_every_yaml_composes_and_builds(group, option, tmp_path):
    cfg = _compose([f"{group}={option}"])
    if cfg.model.name == "hf":  # its shape comes from a checkpoint directory (tests/test_hf.py)
        with pytest.raises(ValueError, match="model=hf needs model.path"):
            build.model_config(cfg.model)
        return
    config = build.model_config(cfg.model)
    assert config.name == cfg.model.name in PRESETS
    answer = check(cfg, advise=False)  # the planner reads every group too (hardware presets included)
    assert answer.wl.model.n_params == config.n_params and answer.step_time_s > 0
    strategy = build.strategy(cfg.storage)
    assert strategy.options.storage == cfg.storage.kind
    lm = build.lightning_module(cfg, config)
    if config.transformers_type:  # the mixture presets train as the transformers model, from its config.json
        assert type(lm).__name__ == "HFCausalLM" and lm.hparams["hf_config"]["model_type"] == config.transformers_type
    if cfg.data.kind != "bytes":  # file-backed data names the file it needs
        with pytest.raises(ValueError, match=f"data={cfg.data.kind} needs data.path"):
            build.datamodule(cfg.data, config, cfg.seed)
    elif config.vocab_size >= 256 and cfg.data.seq_len <= config.max_seq_len:
        build.datamodule(cfg.data, config, cfg.seed)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        return  # composed and validated above; a GPU Trainer cannot be built on this machine
    trainer = build.trainer(cfg, tmp_path)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_model_field_override_and_unknown_field():
    cfg = _compose(["model=llama-3.2-3b", "+model.tie_embeddings=false"])
    assert build.model_config(cfg.model).n_params == 3_606_752_256
    with pytest.raises(ValueError, match="unknown model field"):
        build.model_config(_compose(["+model.n_layers=3"]).model)


def test_train_py_saves_and_a_new_process_resumes(tmp_path):
    """The Hydra entry point end to end: checkpoints of a composed config load in a new process (weights_only)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    common = ["trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.seq_len=32", "data.micro_batch=2",
              "+trainer.enable_progress_bar=false"]
    first = subprocess.run([sys.executable, "train.py", *common, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/a"],
                           cwd=root, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt" / "manifest.json").is_file()
    second = subprocess.run([sys.executable, "train.py", *common, "trainer.max_steps=8", f"hydra.run.dir={tmp_path}/b",
                             f"resume={tmp_path}/a/checkpoints"], cwd=root, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "epoch=0-step=2.ckpt, the last intact checkpoint" in second.stdout + second.stderr
    # saved at steps 4, 6 and 8: the newest keep_checkpoints=2 stay
    saved = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert saved == ["epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"], saved
    assert (tmp_path / "b" / "checkpoints" / "epoch=0-step=8.ckpt" / "manifest.json").is_file()


def test_progress_bar_total_counts_micro_batches():
    """train.py's bar: 6 steps of 2 micro-batches are 12 batches, not Lightning's 6 (its bar showed 12/? and 25/4);
    an epoch shorter than that bounds it."""
    from types import SimpleNamespace

    bar = build._Bar()
    bar._trainer = SimpleNamespace(num_training_batches=12500, max_steps=6, global_step=0, accumulate_grad_batches=2)
    assert bar.total_train_batches == 12
    bar._trainer.num_training_batches, bar._trainer.global_step = 5, 2
    assert bar.total_train_batches == 5


def test_run_directories_started_in_one_second_differ():
    from planner.check import compose_run

    dirs = {compose_run([])[1] for _ in range(3)}
    assert len(dirs) == 3 and all(d.parent.name == "runs" for d in dirs)


@pytest.mark.parametrize("flag,present", [("true", True), ("false", False)])
def test_save_on_signal_is_configurable(flag, present, tmp_path):
    from megatrain_lightning import SaveOnSignal

    trainer = build.trainer(_compose([f"save_on_signal={flag}"]), tmp_path)
    assert any(isinstance(c, SaveOnSignal) for c in trainer.callbacks) == present


@pytest.mark.parametrize("config_cls,model_cls,extra,rel", [
    ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), 0.0),
    ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                   head_dim=32), 0.0),
    ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1), 0.0),
    ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                 n_shared_experts=1, first_k_dense_replace=1, attention_bias=True,
                                                 head_dim=32, n_group=1, topk_group=1), 0.0),
    ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0), 0.0),
    # Gemma's pre/post feed-forward norms and gpt-oss's expert biases and attention sinks are not counted: 0.4% and
    # 1.2% of these tiny shapes, 0.04% of gpt-oss-120b (below)
    ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16), 0.005),
    ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                               sliding_window=8), 0.015),
])
def test_a_config_json_that_trains_as_the_transformers_model_gives_the_planner_its_size(config_cls, model_cls, extra,
                                                                                       rel):
    """model=hf on a checkpoint directory of a family that trains as the transformers model: the planner's shape
    counts the parameters transformers builds from that config.json (exactly, but where said)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    hf = getattr(transformers, config_cls)(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, **extra)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(hf)
    c = Config.from_hf(hf.to_dict(), name="x")
    experts = extra.get("num_local_experts") or extra.get("num_experts") or extra.get("n_routed_experts") or 0
    assert c.transformers_type == hf.model_type and c.n_experts == experts
    assert c.n_params == pytest.approx(sum(p.numel() for p in model.parameters()), rel=rel, abs=0)
    with pytest.raises(ValueError, match="trains as the transformers model"):
        Llama(c)


def test_gpt_oss_config_json_matches_the_preset():
    """transformers' GptOssConfig defaults are gpt-oss-120b's: the shape read from them is the preset's."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("no GptOssConfig")
    c = Config.from_hf(transformers.GptOssConfig().to_dict())
    preset = Config.from_name("gpt-oss-120b")
    assert c.n_params == preset.n_params and c.active_params == preset.active_params
    assert (c.local_window, c.local_share) == (preset.local_window, preset.local_share) == (128, 0.5)
    with pytest.raises(ValueError, match="local_share must be in \\[0, 1\\] with a local_window >= 1"):
        replace(preset, local_window=None)


def test_a_mixture_without_a_transformers_family_is_refused_by_name():
    cfg = _compose(["model=glm-4.5-air", "+model.transformers_type=null"])
    config = build.model_config(cfg.model)
    with pytest.raises(UserError, match="model=glm-4.5-air: a mixture of experts with no transformers_type"):
        build.lightning_module(cfg, config)
    cfg = _compose(["model=llama-3.2-1b", "+model.transformers_type=phi3"])  # no preset config.json for that family
    with pytest.raises(UserError, match="model=llama-3.2-1b: no transformers config is known for transformers_type "
                                        "'phi3'"):
        build.lightning_module(cfg, build.model_config(cfg.model))
