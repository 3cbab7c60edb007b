"""Train a Llama-family model with the megatrain strategy: `python train.py model=llama-3.2-1b trainer=gpu`."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from planner.check import check
from planner.report import text

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if cfg.preflight:  # ask the planner before allocating anything (preflight=false skips this)
        answer = check(cfg)
        if not answer.fits:
            raise SystemExit(text(answer, tokens=answer.wl.step_tokens * cfg.trainer.max_steps)
                             + "\n\nstopped before training: the run cannot fit (preflight=false overrides)")
        log.info(f"planner: fits; predicted {answer.step_time_s:.3g} s/step on {answer.hw.name}, bottleneck "
                 f"{answer.bottleneck[0]}")

    import lightning as L

    import megatrain_lightning  # noqa: F401  (registers the "megatrain" strategy)
    from megatrain_lightning import build

    L.seed_everything(cfg.seed)
    config = build.model_config(cfg.model)
    data = build.datamodule(cfg.data, config, cfg.seed)
    module = build.lightning_module(cfg, config)
    trainer = build.trainer(cfg, HydraConfig.get().runtime.output_dir)
    # resume=DIR: a checkpoint directory, or a run's checkpoints/ (the last complete checkpoint in it)
    trainer.fit(module, datamodule=data, ckpt_path=cfg.resume)


if __name__ == "__main__":
    main()
