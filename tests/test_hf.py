"""Hugging Face checkpoints in and out, checked against `transformers` itself (a test-only dependency)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from megatrain_lightning import MegatrainStrategy, hf
from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.config import Config
from megatrain_lightning.models.lm import CausalLM
from tests.helpers import lm_kwargs, loader, make_batches

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=4096,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    # head_dim 32 where hidden / heads is 16, an RMSNorm on each head's q and k
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
}


def _hf_model(variant: str, path):
    config_cls, model_cls, extra = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval()
    model.save_pretrained(path, max_shard_size="60KB")  # several shards and an index
    return model


def _imported(path, **strategy_kwargs):
    """Our model initialized from a Hugging Face directory through the strategy (store, engine, streaming)."""
    config = Config.from_dict({"name": "hf", "path": str(path)})
    lm = CausalLM(config, **lm_kwargs(4))
    strategy = MegatrainStrategy(init_from=path, **strategy_kwargs)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return lm, strategy, trainer


def _logits(lm: CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.logits(lm.model(tokens))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers_logits(variant, tmp_path):
    ref = _hf_model(variant, tmp_path / "hf")
    assert len(hf.shards(tmp_path / "hf")) > 2
    lm, strategy, trainer = _imported(tmp_path / "hf")
    trainer.validate(lm, dataloaders=loader(make_batches(lm.config, 1)), verbose=False)  # builds the store
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    want = ref(tokens).logits
    got = _logits(lm, tokens)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("storage", ["ram", "nvme"])
def test_export_loads_in_transformers_and_round_trips(storage, tmp_path, capsys):
    ref = _hf_model("llama", tmp_path / "hf")
    original = {}
    for f in hf.shards(tmp_path / "hf"):
        original.update(load_file(f))
    kw = dict(storage="nvme", ram_budget_GiB=0.0011, nvme_dir=tmp_path / "nvme") if storage == "nvme" else {}

    # import -> checkpoint -> export, untrained: the identity
    lm, strategy, trainer = _imported(tmp_path / "hf", **kw)
    trainer.validate(lm, dataloaders=loader(make_batches(lm.config, 1)), verbose=False)
    if storage == "nvme":
        assert sum(u.on_disk for u in strategy.store.units) == 3
    trainer.save_checkpoint(tmp_path / "imported.ckpt")
    assert hf.main(["export", str(tmp_path / "imported.ckpt"), str(tmp_path / "out"), "--dtype", "float32",
                    "--max-shard-GB", "0.0001"]) == 0
    assert f"from the checkpoint {tmp_path / 'imported.ckpt'}" in capsys.readouterr().out  # names what it exported
    exported = {}
    for f in hf.shards(tmp_path / "out"):
        exported.update(load_file(f))
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k

    # train two steps, export, load with transformers: its logits equal ours
    batches = make_batches(lm.config, 2)
    trainer.fit(lm, train_dataloaders=loader(batches))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    hf.export(tmp_path / "trained.ckpt", tmp_path / "trained", dtype="float32")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    ours = _logits(lm, tokens)
    theirs = loaded(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())
    assert (theirs - ref(tokens).logits).abs().max().item() > 1e-3  # training changed the model


def test_import_errors_name_the_problem(tmp_path):
    _hf_model("llama", tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="Hugging Face config not found"):
        Config.from_dict({"name": "hf", "path": str(tmp_path / "nowhere")})
    index = json.loads((tmp_path / "hf" / hf.INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]

    # a truncated shard is named
    shard = tmp_path / "hf" / first
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-64])
    with pytest.raises(ckpt.CheckpointError, match=f"truncated or corrupted safetensors file .*{first}"):
        _imported_build(tmp_path / "hf")
    shard.write_bytes(raw)

    # a model of another shape: every mismatched tensor is listed
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    lm = CausalLM(Config.from_hf({**config, "intermediate_size": 128}), **lm_kwargs(2))
    with pytest.raises(ckpt.CheckpointError, match=r"does not match the model(.|\n)*layers.2.mlp.down_proj.weight: "
                                                   r"checkpoint \(64, 176\) vs model \(64, 128\)"):
        _imported_build(tmp_path / "hf", lm)

    # a missing shard is named
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {first}"):
        _imported_build(tmp_path / "hf")


def _imported_build(path, lm=None):
    lm2, strategy, trainer = _imported(path)
    trainer.validate(lm or lm2, dataloaders=loader(make_batches(lm2.config, 1)), verbose=False)


def test_config_round_trip_through_hf_form():
    for name in ("llama-3.2-1b", "qwen2-0.5b", "llama-3-8b"):
        c = Config.from_name(name)
        back = Config.from_hf(c.to_hf(), name=name)
        assert back == Config.from_name(name, hf_type=back.hf_type), name
    for kind in ("mistral", "qwen3"):  # the architecture, the window and the head width come back
        c = Config(name="x", hidden_size=64, n_head=4, n_kv_head=2, head_size=32, qk_norm=kind == "qwen3",
                   sliding_window=128, max_seq_len=512, hf_type=kind)
        assert Config.from_hf(c.to_hf(), name="x") == c, kind


@pytest.mark.parametrize("variant", ["mistral", "qwen3", "qwen2-tied"])
def test_export_keeps_the_architecture(variant, tmp_path):
    """Import -> export, untrained: the same class loads, with the same weights and the same config fields."""
    ref = _hf_model(variant, tmp_path / "hf")
    lm, strategy, trainer = _imported(tmp_path / "hf")
    trainer.validate(lm, dataloaders=loader(make_batches(lm.config, 1)), verbose=False)
    trainer.save_checkpoint(tmp_path / "imported.ckpt")
    hf.export(tmp_path / "imported.ckpt", tmp_path / "out", dtype="float32")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded) is type(ref)
    for key in ("head_dim", "sliding_window", "max_position_embeddings", "tie_word_embeddings", "num_key_value_heads"):
        if getattr(ref.config, key, None) is not None:  # (Qwen2's config leaves head_dim to be derived)
            assert getattr(loaded.config, key, None) == getattr(ref.config, key), key
    want = ref.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_sliding_window_is_kept_and_longer_sequences_refused(tmp_path):
    """Mistral with a 32-token window (max_position_embeddings 512): up to 32 tokens full causal attention is the
    window's (logits equal transformers'); a longer sequence is refused, and the window is exported as it was."""
    config = transformers.MistralConfig(**{**TINY, "sliding_window": 32, "tie_word_embeddings": False})
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM(config).float().eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = Config.from_dict({"name": "hf", "path": str(tmp_path / "hf")})
    assert ours.max_seq_len == 512 and ours.sliding_window == 32 and ours.hf_type == "mistral"
    lm, strategy, trainer = _imported(tmp_path / "hf")
    trainer.validate(lm, dataloaders=loader(make_batches(lm.config, 1)), verbose=False)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    want = ref(tokens).logits
    assert (_logits(lm, tokens) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    with pytest.raises(ValueError, match="sequence length 33 exceeds the model's sliding window 32"):
        _logits(lm, torch.zeros(1, 33, dtype=torch.long))
    assert ours.to_hf()["sliding_window"] == 32 and ours.to_hf()["architectures"] == ["MistralForCausalLM"]


def test_an_unsupported_transformers_architecture_is_refused_by_name():
    """GPT-2 keeps its blocks elsewhere (`transformer.h`): named, with the architectures that stream."""
    from megatrain_lightning.errors import UserError

    class HoldsGPT2(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2,
                                                                             vocab_size=256))

        def training_step(self, batch, batch_idx):
            return self.model(batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError) as e:
        trainer.fit(HoldsGPT2(), train_dataloaders=loader(make_batches(Config.from_name("tiny"), 1)))
    assert str(e.value).startswith("GPT2LMHeadModel (model_type 'gpt2') cannot be streamed: supported transformers "
                                   "architectures are deepseek_v3, gemma3_text, glm4_moe, gpt_oss, llama, ")


def test_with_several_ranks_each_reads_only_the_tensors_of_its_own_units(tmp_path, monkeypatch):
    """Each rank's store takes its units from the checkpoint, and reads no other rank's tensor (nor opens a shard
    holding only those); together the ranks hold the whole checkpoint."""
    from megatrain_lightning import model_store
    hf_model = _hf_model("llama", tmp_path / "hf")
    want = {k: v.float() for k, v in hf_model.state_dict().items() if "rotary" not in k}
    from megatrain_lightning.hf import load as hf_load
    read: list[str] = []
    real_open = hf_load.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(hf_load, "safe_open", Recording)
    config = Config.from_dict({"name": "hf", "path": str(tmp_path / "hf")})
    got: dict[str, torch.Tensor] = {}
    for rank in range(2):
        read.clear()
        lm = CausalLM(config, **lm_kwargs(4))
        with torch.device("meta"):
            lm.configure_model()
        built = model_store.build(lm, torch.float32, pin=False, storage="ram", stream="auto", ram_budget_GiB=None,
                                  nvme_dir=tmp_path / "nvme", init_from=tmp_path / "hf", world=2, rank=rank)
        store = built.store
        mine = {name[len("model."):] for name, (i, _) in store.index.items() if store.ranks.owns(i)}
        assert set(read) == mine and 0 < len(mine) < len(want)
        for name in mine:
            got[name] = store.master_of("model." + name)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
