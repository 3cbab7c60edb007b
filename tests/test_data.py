"""Fine-tuning data: token files (memory-mapped), JSON lines through a tokenizer.json, packing, prompt masking,
and errors that name the missing file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatrain_lightning.config import Config
from megatrain_lightning.data import IGNORE, JsonlDataModule, TokensDataModule
from megatrain_lightning.models.lm import CausalLM


@pytest.fixture
def tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "what is two plus two four the sky blue why because light scatters".split()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, tok


@pytest.mark.parametrize("suffix,dtype", [(".bin", "uint16"), (".bin", "uint32"), (".npy", None)])
def test_token_files_pack_into_overlapping_windows(tmp_path, suffix, dtype):
    tokens = np.arange(1000, dtype=np.uint32 if dtype == "uint32" else np.uint16) % 250
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    dm = TokensDataModule(path, dtype=dtype, seq_len=16, micro_batch=4, val_fraction=0.1, vocab_size=256)
    dm.setup()
    assert len(dm.train) == (900 - 1) // 16 and len(dm.val) == (100 - 1) // 16
    assert torch.equal(dm.train[2], torch.from_numpy(tokens[32:49].astype(np.int64)))  # [T+1], shares a token
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    covered = torch.cat([dm.train[i][:-1] for i in range(len(dm.train))])  # every token predicted once
    assert torch.equal(covered, torch.from_numpy(tokens[:len(dm.train) * 16].astype(np.int64)))


def test_token_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="token file not found: .*missing.bin"):
        TokensDataModule(tmp_path / "missing.bin", dtype="uint16", seq_len=8).setup()
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a whole number of uint16 tokens"):
        TokensDataModule(tmp_path / "odd.bin", dtype="uint16", seq_len=1).setup()
    with pytest.raises(ValueError, match="data.dtype must be one of"):
        TokensDataModule(tmp_path / "odd.bin", dtype="int8", seq_len=1).setup()
    np.save(tmp_path / "big.npy", np.full(100, 300, dtype=np.uint16))
    with pytest.raises(ValueError, match="token id 300 .* outside the model's vocabulary \\(256\\)"):
        TokensDataModule(tmp_path / "big.npy", seq_len=8, vocab_size=256).setup()


def test_jsonl_prompt_is_masked_out_of_the_loss(tmp_path, tokenizer):
    path, tok = tokenizer
    records = [{"prompt": "what is two plus two", "response": "four"},
               {"prompt": "why the sky blue", "response": "because light scatters"}] * 8
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dm = JsonlDataModule(tmp_path / "chat.jsonl", path, prompt_field="prompt", response_field="response",
                         eos_token="<eos>", seq_len=8, micro_batch=2, val_fraction=0.0, vocab_size=256)
    dm.setup()
    stream = [t for r in records for t in tok.encode(r["prompt"]).ids + tok.encode(r["response"]).ids + [1]]
    trained = {t for r in records for t in tok.encode(r["response"]).ids + [1]}
    item = dm.train[0]
    assert torch.equal(item["input_ids"], torch.tensor(stream[:8]))
    labels = item["labels"]
    for pos, (target, label) in enumerate(zip(stream[1:9], labels.tolist())):
        assert label == (target if label != IGNORE else IGNORE)
    # positions whose target is a prompt token are ignored; response tokens and <eos> are trained
    assert labels.tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, stream[5], stream[6], IGNORE, IGNORE]
    assert all(t in trained for t in labels.tolist() if t != IGNORE)

    # the loss is the mean over the unmasked targets only
    config = Config.from_name("tiny")
    torch.manual_seed(0)
    lm = CausalLM(config)
    lm.configure_model()
    batch = {k: v.unsqueeze(0) for k, v in item.items()}
    logits = lm.model.logits(lm.model(batch["input_ids"]))[0]
    keep = labels != IGNORE
    want = F.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(lm.loss(batch), want)


def test_jsonl_text_field_and_errors(tmp_path, tokenizer):
    path, _ = tokenizer
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "the sky blue"}\n\n{"text": "two plus two four"}\n')
    dm = JsonlDataModule(data, path, seq_len=3, micro_batch=1, val_fraction=0.0, eos_token="<eos>")
    dm.setup()
    assert len(dm.train) == (3 + 1 + 4 + 1 - 1) // 3 and isinstance(dm.train[0], torch.Tensor)

    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.json"):
        JsonlDataModule(data, tmp_path / "nope.json", seq_len=3).setup()
    with pytest.raises(FileNotFoundError, match="data file not found: .*absent.jsonl"):
        JsonlDataModule(tmp_path / "absent.jsonl", path, seq_len=3).setup()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no text field 'text'"):
        JsonlDataModule(tmp_path / "bad.jsonl", path, seq_len=3).setup()
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        JsonlDataModule(tmp_path / "broken.jsonl", path, seq_len=3).setup()
    with pytest.raises(ValueError, match="eos_token '</s>' is not in"):
        JsonlDataModule(data, path, seq_len=3, eos_token="</s>").setup()
