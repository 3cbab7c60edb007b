"""`python -m megatrain_lightning.hf export CHECKPOINT OUT`: exit status 0 written, 2 bad input (one line naming the
path or argument)."""

from __future__ import annotations

import argparse
import sys

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.errors import UserError
from megatrain_lightning.hf.export import DTYPES, default_dtype, export, imported_from


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatrain_lightning.hf",
                                 description="Hugging Face checkpoints out of megatrain checkpoints")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a megatrain checkpoint directory -> a Hugging Face checkpoint directory")
    ex.add_argument("checkpoint", help="a checkpoint directory, a directory of them (the newest intact one) or a "
                                       "run directory (its checkpoints/)")
    ex.add_argument("out_dir", help="a new (or empty) directory")
    ex.add_argument("--dtype", choices=sorted(DTYPES),
                    help="default: the imported model's dtype (its config.json), else bfloat16; float32 writes the "
                         "trained fp32 weights exactly")
    ex.add_argument("--tokenizer", metavar="DIR", help="copy the tokenizer files of DIR (default: those beside the "
                                                      "Hugging Face checkpoint the run was imported from)")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir (never anything "
                                                             "else)")
    ex.add_argument("--merge", action="store_true", help="a LoRA run: the whole model with the adapters folded into "
                                                         "its weights (default: the adapter alone, peft's format)")
    ex.add_argument("--max-shard-GB", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        if args.max_shard_GB <= 0:
            raise UserError(f"--max-shard-GB: must be > 0, got {args.max_shard_GB:g}")
        source = ckpt.resolve(args.checkpoint)
        dtype, why = (args.dtype, "--dtype") if args.dtype else default_dtype(source, args.merge)
        out = export(source, args.out_dir, dtype, args.max_shard_GB, overwrite=args.overwrite,
                     tokenizer=args.tokenizer, merge=args.merge)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {dtype} ({why}) from the checkpoint {source}")
    origin = args.tokenizer or imported_from(source)
    print(f"tokenizer files from {origin}" if origin else
          "no tokenizer files copied (the run was not imported from a Hugging Face checkpoint): --tokenizer DIR "
          "adds them")
    return 0
