"""Train a Llama-family model with the megatrain strategy: `python train.py model=llama-3.2-1b trainer=gpu`."""

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import megatrain_lightning  # noqa: F401  (registers the "megatrain" strategy)
from megatrain_lightning import build


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed)
    config = build.model_config(cfg.model)
    data = build.datamodule(cfg.data, config, cfg.seed)
    module = build.lightning_module(cfg, config)
    trainer = build.trainer(cfg, HydraConfig.get().runtime.output_dir)
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
