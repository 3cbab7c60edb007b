"""A long run against plain training: the same transformers model, initial weights, data and data order, trained
under megatrain and under Lightning's default single-device strategy; per-step training losses and periodic
validation losses into one JSON-lines file, and a plot of both curves.

    python bench/convergence.py --out runs/convergence.jsonl            # on the GPU box (bench/gpu_session.sh)
    python bench/convergence.py --plot docs/convergence.png runs/convergence.jsonl

The text: every Python source file of this interpreter's standard library (sorted by path, so the same Python
version gives the same corpus), tokenized with a byte-level BPE trained on it here with `tokenizers` (the
model's vocabulary is the tokenizer's). Validation: the corpus's last `--val-fraction` of tokens.
The initial weights: one transformers model built in memory from `--seed`, saved as a Hugging Face checkpoint;
megatrain imports it (`init_from`), the plain run loads it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


WORK_MARKER = ".convergence-work"


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def build_tokens(work: Path, vocab: int, max_mb: float | None) -> tuple[Path, Path, int, int]:
    """(tokenizer.json, tokens.npy, vocabulary size, corpus bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    for p in corpus_files():
        text = p.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode())
        if max_mb is not None and size > max_mb * 1e6:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)  # between documents, as the packed data modules put it
    tokenizer_path, tokens_path = work / "tokenizer.json", work / "tokens.npy"
    tok.save(str(tokenizer_path))
    np.save(tokens_path, np.asarray(ids, dtype=np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32))
    return tokenizer_path, tokens_path, tok.get_vocab_size(), size


class Recorder:
    """Per-step training loss and each validation's loss, as JSON lines."""

    def __new__(cls, run: str, out):
        import lightning as L

        class _Recorder(L.Callback):
            def __init__(self) -> None:
                self.train: list[float] = []
                self.val: list[tuple[int, float]] = []
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
                self.train.append(loss)
                out.write(json.dumps(dict(run=run, step=trainer.global_step, loss=round(loss, 5))) + "\n")

            def on_validation_end(self, trainer, pl_module) -> None:
                if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
                    return
                v = float(trainer.callback_metrics["val_loss"])
                self.val.append((trainer.global_step, v))
                out.write(json.dumps(dict(run=run, step=trainer.global_step, val_loss=round(v, 5))) + "\n")
                print(f"[{run}] step {trainer.global_step}: val {v:.4f}, train {self.train[-1]:.4f} "
                      f"({time.perf_counter() - self.t0:.0f} s)", flush=True)

        return _Recorder()


def train(run: str, a, config, hf_config: dict, ckpt: Path, tokens_path: Path, out) -> dict:
    import lightning as L
    import torch

    from megatrain_lightning import MegatrainStrategy
    from megatrain_lightning.data.tokens import TokensDataModule
    from megatrain_lightning.hf.model import HFCausalLM

    class FromCheckpoint(HFCausalLM):
        """The plain run: the saved initial weights loaded into the model built in memory."""

        def configure_model(self) -> None:
            if self.model is None:
                from safetensors.torch import load_file

                super().configure_model()
                state = {}
                for f in sorted(ckpt.glob("*.safetensors")):
                    state.update(load_file(f))
                missing, unexpected = self.model.load_state_dict(state, strict=False)
                if unexpected or [m for m in missing if m != "lm_head.weight"]:
                    raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")

    hp = dict(lr=a.lr, warmup_steps=a.warmup, max_steps=a.steps, min_lr_ratio=0.1, weight_decay=0.1)
    megatrain = run == "megatrain"
    lm = (HFCausalLM if megatrain else FromCheckpoint)(config, hf_config, **hp)
    data = TokensDataModule(tokens_path, seq_len=a.seq_len, micro_batch=a.micro_batch,
                            val_fraction=a.val_fraction, seed=a.seed, vocab_size=config.vocab_size)
    rec = Recorder(run, out)
    cuda = torch.cuda.is_available()
    trainer = L.Trainer(strategy=MegatrainStrategy(init_from=ckpt) if megatrain else "auto",
                        accelerator="gpu" if cuda else "cpu", devices=1,
                        precision="bf16-mixed" if cuda else "32-true", max_steps=a.steps, gradient_clip_val=1.0,
                        val_check_interval=a.val_every, limit_val_batches=a.val_batches, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    t0 = time.perf_counter()
    trainer.fit(lm, datamodule=data)
    wall = time.perf_counter() - t0
    last = rec.train[-100:]
    summary = dict(run=run, summary=True, steps=len(rec.train), first_loss=rec.train[0],
                   last100_mean=statistics.fmean(last), final_val=rec.val[-1][1] if rec.val else None,
                   wall_s=round(wall, 1), peak_gpu_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2)
                   if cuda else None)
    out.write(json.dumps(summary) + "\n")
    out.flush()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return summary


def plot(png: Path, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    meta = next(r for r in rows if r.get("meta"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, color in (("plain", "tab:blue"), ("megatrain", "tab:orange")):
        train = [(r["step"], r["loss"]) for r in rows if r.get("run") == run and "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("run") == run and "val_loss" in r]
        if not train:
            continue
        label = {"plain": "Lightning default strategy", "megatrain": "megatrain"}[run]
        ax.plot(*zip(*train), color=color, lw=0.8, alpha=0.7, label=f"{label}: training")
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=4, label=f"{label}: validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"{meta['model']} as {meta['transformers']}, {meta['tokens_per_step']} tokens/step, "
                 f"{meta['precision']}, {meta['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b", help="a Llama-family preset, trained as its transformers model")
    ap.add_argument("--n-layer", type=int, default=None, help="truncate depth (a quick check)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=16384, help="the BPE's vocabulary (the model's)")
    ap.add_argument("--corpus-mb", type=float, default=None, help="cap the corpus (a quick check)")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="plain,megatrain")
    ap.add_argument("--work", default="/tmp/convergence", help="tokenizer, tokens and the initial checkpoint")
    ap.add_argument("--out", default="runs/convergence.jsonl")
    ap.add_argument("--plot", nargs=2, metavar=("PNG", "JSONL"), help="only draw the curves of a finished run")
    a = ap.parse_args()
    if a.plot:
        return plot(Path(a.plot[0]), Path(a.plot[1]))

    import torch

    from megatrain_lightning.config import Config
    from megatrain_lightning.hf.model import build_model

    work, out_path = Path(a.work), Path(a.out)
    # only what this script wrote is replaced: a --work it made before (its marker inside), never another folder or
    # an existing results file
    if out_path.exists():
        sys.exit(f"error: --out {out_path} exists; name another file (or remove it)")
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        sys.exit(f"error: --work {work} holds files this script did not write; name an empty or new folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("bench/convergence.py: tokenizer, tokens and initial checkpoint\n")
    t0 = time.perf_counter()
    tokenizer, tokens_path, vocab, size = build_tokens(work, a.vocab, a.corpus_mb)
    n_tokens = len(np.load(tokens_path, mmap_mode="r"))
    print(f"corpus: {len(corpus_files())} files, {size / 1e6:.1f} MB -> {n_tokens} tokens of a {vocab}-token BPE "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    overrides = dict(vocab_size=vocab) | (dict(n_layer=a.n_layer) if a.n_layer else {})
    config = Config.from_name(a.model, **overrides)
    hf_config = config.to_hf("float32")
    torch.manual_seed(a.seed)
    ckpt = work / "init"
    build_model(hf_config).float().save_pretrained(ckpt)  # the one initial model both runs start from
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as out:
        cuda = torch.cuda.is_available()
        out.write(json.dumps(dict(meta=True, model=a.model, transformers=hf_config["architectures"][0]
                                  if "architectures" in hf_config else hf_config["model_type"],
                                  n_params=config.n_params, vocab=vocab, corpus_bytes=size, tokens=n_tokens,
                                  tokens_per_step=a.seq_len * a.micro_batch, steps=a.steps, lr=a.lr,
                                  precision="bf16-mixed" if cuda else "32-true",
                                  device=torch.cuda.get_device_name() if cuda else "cpu",
                                  python=sys.version.split()[0])) + "\n")
        results = [train(run, a, config, hf_config, ckpt, tokens_path, out) for run in a.runs.split(",")]
    for r in results:
        print(json.dumps(r), flush=True)
    if len(results) == 2:
        p, m = results
        print(json.dumps(dict(last100_rel=(m["last100_mean"] - p["last100_mean"]) / p["last100_mean"],
                              final_val_rel=(m["final_val"] - p["final_val"]) / p["final_val"]
                              if p["final_val"] else None)), flush=True)


if __name__ == "__main__":
    main()
