"""The engine's options are defined once (options.EngineOptions): the strategy, train.py's build and the planner take
the same defaults, the same checks and the same resolution rules from it, whatever conf/storage says."""

from __future__ import annotations

from dataclasses import fields

import pytest
import yaml

from megatrain_lightning import MegatrainStrategy, build
from megatrain_lightning.errors import UserError
from megatrain_lightning.options import EngineOptions, resolve_stream
from planner.check import CONF, compose, engine_options, workload
from planner.errors import PlanError
from planner.plan import place
from planner.hardware import Hardware
from megatrain_lightning.config import Config
from planner.workload import Workload

OVERRIDES = [[], ["storage=nvme"], ["storage.checkpoint_interval=2", "storage.stream=copy", "storage.compile=false"],
             ["storage=nvme", "storage.nvme_dir=[/tmp/a,/tmp/b]", "storage.ram_budget_GiB=3",
              "storage.offload_checkpoints=disk", "storage.device_state_GiB=0", "storage.step_cache_GiB=1.5",
              "storage.chunk_tokens=4096", "storage.prefetch_depth=3", "storage.replicate_nodes=true"]]


@pytest.mark.parametrize("overrides", OVERRIDES, ids=lambda o: " ".join(o) or "defaults")
def test_the_strategy_build_and_planner_take_the_same_options(overrides):
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    planner_side = engine_options(cfg)
    strategy = build.strategy(OmegaConf.create(cfg).storage)
    assert strategy.options == planner_side
    wl = workload(cfg)
    for f in fields(EngineOptions):
        if f.name != "nvme_dir":  # the drives are the hardware's, for the planner
            assert getattr(wl, f.name) == getattr(planner_side, f.name), f.name


def test_one_default_for_each_option():
    """The strategy's, the planner's Workload's and conf/storage's defaults are EngineOptions'."""
    defaults = EngineOptions()
    assert MegatrainStrategy().options == defaults
    wl = Workload(Config.from_name("tiny"), seq_len=16, micro_batch=1)
    assert all(getattr(wl, f.name) == getattr(defaults, f.name) for f in fields(EngineOptions) if f.name != "nvme_dir")
    ram = yaml.safe_load((CONF / "storage" / "ram.yaml").read_text())
    nvme = yaml.safe_load((CONF / "storage" / "nvme.yaml").read_text())
    conf = {("storage" if k == "kind" else k) for k in {**ram, **nvme} if k != "defaults"}
    assert conf == set(EngineOptions.names())  # every option has a conf/ field, and nothing else is there
    assert EngineOptions.from_conf(ram) == defaults  # conf/storage/ram.yaml says what the defaults are


@pytest.mark.parametrize("option,value,detail", [
    ("chunk_tokens", 0, "must be an integer >= 1 (or None: from free device memory), got 0"),
    ("keep_activations", -1, "must be an integer >= 0 (or None: as many blocks as the GPU has room for), got -1"),
    ("keep_activations", 1.5, "must be an integer >= 0 (or None: as many blocks as the GPU has room for), got 1.5"),
    ("device_state_GiB", -1, "must be >= 0 (or None: auto), got -1"),
    ("stream", "fp8", "must be one of ('auto', 'copy', 'master'), got 'fp8'"),
    ("offload_checkpoints", "ssd", "must be true, false, 'disk' or null (on for CUDA), got 'ssd'"),
])
def test_a_bad_option_is_named_alike_everywhere(option, value, detail):
    with pytest.raises(UserError) as strategy_error:
        MegatrainStrategy(**{option: value})
    assert str(strategy_error.value) == f"{option} {detail}"
    with pytest.raises(PlanError) as planner_error:
        engine_options(compose([f"storage.{option}={value}"]))
    assert str(planner_error.value) == f"storage.{option}: {detail}"
    with pytest.raises(UserError, match="is not an engine option"):
        MegatrainStrategy(options=EngineOptions()).options.with_values(chunk_tokenz=1)


@pytest.mark.parametrize("storage,stream,fp32", [("ram", "auto", False), ("ram", "copy", False),
                                                 ("nvme", "auto", False), ("nvme", "master", True),
                                                 ("ram", "master", False)])
def test_the_planner_resolves_the_stream_as_the_engine_does(storage, stream, fp32):
    hw = Hardware.from_dict(compose(["hardware=h200"])["hardware"])
    wl = Workload(Config.from_name("tiny"), seq_len=16, micro_batch=1, storage=storage, stream=stream,
                  precision="32-true" if fp32 else "bf16-mixed")
    assert place(hw, wl).stream == resolve_stream(storage, stream, fp32)
