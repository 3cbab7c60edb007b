"""train.py's LoRA (conf/lora, models/lora.py): a Hugging Face Llama imported into the frozen base, adapters on
every linear layer of the decoder layers, trained; `hf export` writes the adapter in peft's format (what
`PeftModel.from_pretrained` loads onto the original model) or, with --merge, the merged model; the three give the
trained model's logits. The adapters start as peft starts them (B = 0) whether the base comes from a checkpoint
or from a random start, and a bf16 base is held in bf16 (issue #28)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train
from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.errors import UserError
from megatrain_lightning.hf.cli import main as hf_main
from megatrain_lightning.models.lm import CausalLM
from megatrain_lightning.lora_options import LoRA
from tests.test_cli import restore_logging  # noqa: F401  (a fixture: train.main sets up its own logging)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture
def hf_llama(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float()
    model.save_pretrained(tmp_path / "hf")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 128, 4000).astype(np.int64))
    return tmp_path / "hf", tmp_path / "tokens.npy"


def _train(tmp_path, hf, tokens, *more, steps=4):
    model = ["model=hf", f"model.path={hf}"] if hf is not None else ["model=tiny"]
    args = [*model, "data=tokens", f"data.path={tokens}", "data.seq_len=32",
            "data.micro_batch=2", "lora=default", "lora.r=4", "optim.lr=1e-2", "optim.warmup_steps=0",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
            f"hydra.run.dir={tmp_path}/run", *more]
    assert train.main(args) == 0
    return ckpt.resolve(tmp_path / "run" / "checkpoints")


def test_train_export_and_merge_give_the_trained_model(hf_llama, tmp_path):
    hf, tokens = hf_llama
    saved = _train(tmp_path, hf, tokens)
    masters = ckpt.read_masters(saved)
    original = transformers.LlamaForCausalLM.from_pretrained(hf).eval()
    plain = dict(original.named_parameters())
    adapters = {k: v for k, v in masters.items() if ".lora_" in k}
    assert len(adapters) == 2 * 7 * CONFIG["num_hidden_layers"]  # A and B on q, k, v, o, gate, up, down
    assert any(torch.count_nonzero(v) for k, v in adapters.items() if "lora_B" in k)  # trained from zero
    for name, value in masters.items():  # the base: the checkpoint's, untouched (frozen)
        if ".lora_" not in name:
            assert torch.equal(value, plain[name[len("model."):].replace(".base_layer", "")]), name

    lm = CausalLM.load_from_checkpoint(saved).eval()  # the trained model, as megatrain built it
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = lm.logits(lm.final_hidden(x).flatten(0, 1)).view(2, 16, -1)
        assert hf_main(["export", str(saved), str(tmp_path / "adapter")]) == 0
        files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
        assert files == [".megatrain-export.json", "adapter_config.json", "adapter_model.safetensors",
                         "generation_config.json"]  # and the imported model's generation settings
        loaded = peft.PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)

        assert hf_main(["export", str(saved), str(tmp_path / "merged"), "--merge", "--dtype", "float32"]) == 0
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


def test_adapters_start_as_peft_starts_them_whether_the_base_is_imported_or_random(hf_llama, tmp_path):
    """lora_B zero and lora_A drawn (not the empty memory a meta tensor leaves, not the base's init): the first loss
    is the base model's. With the imported base and with a random one (model=tiny)."""
    hf, tokens = hf_llama
    for name, base in (("imported", hf), ("random", None)):
        saved = _train(tmp_path / name, base, tokens, "optim.lr=1e-9", steps=1)  # one step moves <= lr
        masters = ckpt.read_masters(saved)
        a = [v for k, v in masters.items() if "lora_A" in k]
        b = [v for k, v in masters.items() if "lora_B" in k]
        assert a and len(a) == len(b), name
        assert all(v.abs().max() <= 1.01e-9 for v in b), name  # started at zero
        assert all(v.isfinite().all() and 0 < v.abs().max() <= 1 / v.shape[1] ** 0.5 for v in a), name


def test_a_bf16_run_holds_the_base_in_bf16(hf_llama, tmp_path):
    hf, tokens = hf_llama
    saved = _train(tmp_path, hf, tokens, "trainer.precision=bf16-mixed", steps=2)
    masters = ckpt.read_masters(saved)
    assert {v.dtype for k, v in masters.items() if ".lora_" in k} == {torch.float32}
    assert {v.dtype for k, v in masters.items() if ".lora_" not in k} == {torch.bfloat16}


@pytest.mark.parametrize("values,message", [
    (dict(r=-1), r"lora\.r: must be a non-negative integer"),
    (dict(r=4, dropout=1.5), r"lora\.dropout: must be in \[0, 1\)"),
    (dict(r=4, target_modules="attention"), r"lora\.target_modules: must be 'all-linear' or a list"),
    (dict(r=4, rank=8), r"lora: unknown field\(s\) \['rank'\]"),
])
def test_bad_lora_fields_are_named(values, message):
    with pytest.raises(UserError, match=message):
        LoRA.from_dict(values)


def test_unknown_target_module_is_named(hf_llama, tmp_path, capsys):
    hf, tokens = hf_llama
    args = ["model=hf", f"model.path={hf}", "data=tokens", f"data.path={tokens}", "data.seq_len=32", "lora=default",
            "lora.target_modules=[q_proj,attn]", f"hydra.run.dir={tmp_path}/run"]
    assert train.main(args) == 2
    assert "lora.target_modules: ['attn'] are not linear layers of the decoder layers" in capsys.readouterr().err


def test_merge_of_a_run_without_lora_is_refused(hf_llama, tmp_path, capsys):
    hf, tokens = hf_llama
    saved = _train(tmp_path, hf, tokens, "lora.r=0", steps=1)  # r 0: the whole model trains
    assert hf_main(["export", str(saved), str(tmp_path / "out"), "--merge"]) == 2
    assert "is not of a LoRA run (lora.r is 0): there is nothing to merge" in capsys.readouterr().err
    assert json.loads((saved / ckpt.MODEL_CONFIG).read_text())["name"] == "hf"


@pytest.mark.parametrize("preset,targets", [("llama-3.2-3b", "all-linear"), ("llama-3.2-3b", ["q_proj", "v_proj"]),
                                            ("qwen3-235b-a22b", "all-linear")])
def test_the_planner_counts_the_adapters_peft_makes(preset, targets):
    """planner/workload.py's adapter count against peft's on the model (meta device), per decoder layer: what the
    host state, the transfers and the optimizer of a LoRA run are sized by."""
    from megatrain_lightning.config import Config
    from megatrain_lightning.hf.model import build_model, config_json
    from megatrain_lightning.models.lora import add_lora
    from planner.workload import Workload

    config = Config.from_name(preset, n_layer=2)
    hf_config = config_json(config) if config.transformers_type else config.to_hf("float32")
    with torch.device("meta"):
        model = build_model(hf_config)
    add_lora(model, model.get_submodule("model.layers"), LoRA(r=8, target_modules=targets), torch.bfloat16)
    made = sum(p.numel() for p in model.model.layers[1].parameters() if p.requires_grad)
    wl = Workload(config, seq_len=128, micro_batch=1, lora_r=8,
                  lora_targets=targets if isinstance(targets, str) else tuple(targets))
    assert wl.adapter_params == made


def test_a_mixture_trains_exports_and_merges_as_its_transformers_model(tmp_path):
    """model=hf on a qwen3_moe checkpoint with lora=default: the transformers model itself with adapters on its
    linear layers (attention; its experts are fused parameters, its router no nn.Linear, in transformers 5); the
    adapter and the merged export give the trained model's logits."""
    from megatrain_lightning.hf.model import HFCausalLM

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**{**CONFIG, "intermediate_size": 96}, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, decoder_sparse_step=1, head_dim=16)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(tmp_path / "hf")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 128, 4000).astype(np.int64))
    saved = _train(tmp_path, tmp_path / "hf", tmp_path / "tokens.npy", steps=3)
    assert {k.split(".")[-4] for k in ckpt.read_masters(saved) if "lora_A" in k} == {"q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"}
    lm = HFCausalLM.load_from_checkpoint(saved).eval()
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = lm.logits(lm.final_hidden(x).flatten(0, 1)).view(2, 16, -1)
        assert hf_main(["export", str(saved), str(tmp_path / "adapter")]) == 0
        original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        loaded = peft.PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
        assert hf_main(["export", str(saved), str(tmp_path / "merged"), "--merge", "--dtype", "float32"]) == 0
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
