"""Nothing the user owns is ever removed or overwritten: `hf export` writes only into a new (or empty) directory or
over an earlier export of its own, a checkpoint save only replaces a megatrain checkpoint. Each case puts real
files of the user's where the tool writes and checks they survive byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning import hf
from tests.helpers import loader, make_batches

transformers = pytest.importorskip("transformers")
from tests.test_hf import _hf_model, _imported  # noqa: E402  (needs transformers)

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _tokenizer(d: Path) -> None:
    """A byte-level BPE tokenizer.json (256 ids: the tiny model's vocabulary) and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the sky is blue"], trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "tokenizer_class":
                                                         "PreTrainedTokenizerFast", "chat_template": "{{ x }}"}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A user's Hugging Face model folder (weights, tokenizer, chat template, notes) and a checkpoint of a run
    imported from it: returns the folder holding both (`model/`, `run/checkpoints/step.ckpt`)."""
    d = tmp_path_factory.mktemp("user")
    _hf_model("llama", d / "model")
    _tokenizer(d / "model")
    (d / "model" / "README.md").write_text("my notes on this model\n")
    lm, strategy, trainer = _imported(d / "model")
    trainer.fit(lm, train_dataloaders=loader(make_batches(lm.config, 2)))
    trainer.save_checkpoint(d / "run" / "checkpoints" / "step.ckpt")
    return d


def _export(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatrain_lightning.hf", "export", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_export_refuses_the_models_own_folder_and_it_survives(trained):
    before = _snapshot(trained)
    for extra in ([], ["--overwrite"]):
        proc = _export(str(trained / "run"), str(trained / "model"), *extra)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr
        assert proc.stderr.startswith(f"error: {trained / 'model'}: ")
    assert "is not empty" in _export(str(trained / "run"), str(trained / "model")).stderr
    assert "holds files an export did not write (README.md, config.json, generation_config.json, " in proc.stderr
    assert _snapshot(trained) == before


@pytest.mark.parametrize("out", [".", "..", "run", "run/checkpoints/step.ckpt"])
def test_export_never_replaces_the_current_directory_or_the_checkpoint(trained, out):
    before = _snapshot(trained)
    source = "../run/checkpoints" if out == ".." else "run/checkpoints"
    proc = _export(source, out, "--overwrite", cwd=trained / "model" if out == ".." else trained)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    if out in (".", ".."):
        assert "is the current directory or holds it" in proc.stderr
    else:
        assert "holds the checkpoint" in proc.stderr
    assert _snapshot(trained) == before


def test_export_copies_the_tokenizer_says_the_dtype_and_replaces_only_its_own_export(trained, tmp_path):
    out = tmp_path / "exported"
    proc = _export(str(trained / "run"), str(out))  # a run directory: its newest checkpoint
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    # the tiny model was saved in float32: its own dtype, said
    assert f"wrote {out} in float32 (the imported model's dtype) from the checkpoint " in proc.stdout
    assert f"tokenizer files from {trained / 'model'}" in proc.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (trained / "model" / name).read_bytes()
    generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
    assert generate("the sky", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("the sky")

    # an earlier export is replaced with --overwrite (and only with it), as a whole
    (out / "model-00001-of-00001.safetensors").write_bytes(b"stale")
    assert _export(str(trained / "run"), str(out), "--dtype", "bfloat16").returncode == 2
    proc = _export(str(trained / "run"), str(out), "--dtype", "bfloat16", "--overwrite")
    assert proc.returncode == 0 and "in bfloat16 (--dtype)" in proc.stdout, proc.stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16

    # ... but not once the user put a folder under an exported file's name, or a file of theirs there
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").mkdir()
    (out / "tokenizer.json" / "draft.txt").write_text("mine")
    proc = _export(str(trained / "run"), str(out), "--overwrite")
    assert proc.returncode == 2 and "holds files an export did not write (tokenizer.json)" in proc.stderr
    assert (out / "tokenizer.json" / "draft.txt").read_text() == "mine"
    shutil.rmtree(out / "tokenizer.json")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    proc = _export(str(trained / "run"), str(out), "--overwrite")
    assert proc.returncode == 2 and "holds files an export did not write (notes.txt)" in proc.stderr
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_export_of_a_missing_or_empty_source_is_one_line(trained, tmp_path):
    for source, message in ((tmp_path / "runs" / "nope" / "checkpoints", "checkpoint not found: "),
                            (trained / "model", "holds no complete checkpoint")):
        proc = _export(str(source), str(tmp_path / "out"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    proc = _export(str(trained / "run"), str(tmp_path / "out"), "--tokenizer", str(tmp_path))
    assert proc.returncode == 2 and "--tokenizer: " in proc.stderr and "holds no tokenizer.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_save_never_replaces_a_folder_or_file_of_the_users(trained, tmp_path):
    """Lightning's default strategy writes a file there and never deletes a directory: ours refuses, names the
    path, and changes nothing; it still replaces its own checkpoint and an empty directory."""
    lm, strategy, trainer = _imported(trained / "model")
    trainer.fit(lm, train_dataloaders=loader(make_batches(lm.config, 2)))
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    (userdir / "thesis.txt").write_text("four years of work")
    (tmp_path / "model.ckpt").write_bytes(b"a checkpoint of another program")
    before = _snapshot(tmp_path)
    for target in (userdir, tmp_path / "model.ckpt"):
        with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {target} not saved: {target} exists and is "
                                                       "not a megatrain checkpoint"):
            trainer.save_checkpoint(target)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "userdir"]  # no temporary left

    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty directory, then our own checkpoint there
        trainer.save_checkpoint(tmp_path / "empty")
        assert ckpt.is_complete(tmp_path / "empty")
    # our checkpoint with a file of the user's put into it: refused, the file kept
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="holds files a save did not write"):
        trainer.save_checkpoint(tmp_path / "empty")
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"
