"""Train a Llama-family model with the megatrain strategy: `python train.py model=llama-3.2-1b trainer=gpu`.

Arguments are Hydra overrides of `conf/` (the same as `python -m planner.check`). Exit status: 0 done, 1 the
planner says the run cannot fit, 2 bad input (one line naming the field or file), 3 training diverged (the step
named), 128 + N stopped by signal N after saving a checkpoint.
"""

from __future__ import annotations

import logging
import sys
import time

from planner.check import check, compose_run, groups, presets
from planner.errors import PlanError
from planner.report import text

log = logging.getLogger("train")


def usage() -> str:
    lines = ["usage: python train.py [GROUP=PRESET ...] [FIELD=VALUE ...]", "",
             "Arguments are Hydra overrides of conf/ (python -m planner.check takes the same). Groups and presets:"]
    lines += [f"  {group}={'|'.join(presets(group))}" for group in groups()]
    lines += ["Fields: any of conf/config.yaml and the chosen presets, e.g. trainer.max_steps=10 data.seq_len=512;",
              "a model field a preset leaves out: +model.FIELD=VALUE. resume=DIR continues a run.",
              "Docs: README.md and docs/ (architecture, storage, checkpoints, performance, planner).",
              "Exit status: 0 done, 1 cannot fit, 2 bad input, 3 diverged, 4 storage fault, 128+N stopped by signal N."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before training started (SaveOnSignal handles it during training)
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    try:
        cfg, run_dir = compose_run(argv)
        answer = check(cfg) if cfg["preflight"] else None  # before anything is allocated (preflight=false skips)
    except (PlanError, FileNotFoundError) as e:
        return _bad_input(e)
    if answer is not None and not answer.fits:
        print(text(answer, tokens=answer.wl.step_tokens * cfg["trainer"]["max_steps"]), file=sys.stderr)
        print("\nstopped before training: the run cannot fit (preflight=false overrides)", file=sys.stderr)
        return 1

    from omegaconf import OmegaConf

    from megatrain_lightning import build
    from megatrain_lightning.errors import UserError
    from megatrain_lightning.storage.state_files import DriveError

    cfg = OmegaConf.create(cfg)
    try:
        build.check(cfg)  # every field and file, before a run directory exists
        build.new_run_dir(run_dir)
        build.logging_to(run_dir)
        if answer is not None:
            log.info(f"planner: fits; predicted {answer.step_time_s:.3g} s/step on {answer.hw.name}, bottleneck "
                     f"{answer.bottleneck[0]}")
        import lightning as L

        L.seed_everything(cfg.seed, verbose=False)
        config = build.model_config(cfg.model)
        data = build.datamodule(cfg.data, config, cfg.seed)
        module = build.lightning_module(cfg, config)
        trainer = build.trainer(cfg, run_dir)
        start = time.perf_counter()
        # resume=DIR: a checkpoint directory, or a run's checkpoints/ (the last intact checkpoint in it)
        trainer.fit(module, datamodule=data, ckpt_path=cfg.resume)
    except (UserError, FileNotFoundError) as e:
        return _bad_input(e)
    except FloatingPointError as e:  # diverged: the message names the step; the last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 3
    except DriveError as e:  # storage=nvme: a drive failed mid-run; the message names the file
        print(f"error: {e.strerror or e}. The run stopped; its last checkpoint is intact (resume from it)",
              file=sys.stderr)
        return 4
    if trainer.is_global_zero:  # one summary for all ranks
        log.info(build.summary(trainer, run_dir, time.perf_counter() - start, answer))
    return 0


def _bad_input(e: BaseException) -> int:
    print(f"error: {str(e).strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
