"""Will this model train on this machine, how fast, and what limits it?

    python -m planner.check model=llama100b hardware=h200 storage=nvme hardware.host_ram_GiB=1536 \\
        data.seq_len=4096 data.micro_batch=8 [--json] [--plot step.png] [--tokens 1e9]

Takes the same Hydra overrides as train.py (it composes the same `conf/` tree). Exit status: 0 it fits,
1 it does not, 2 bad input (the message names the field).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from planner.errors import PlanError
from planner.hardware import Hardware, detect_gpu, disk_free_TB, host_ram_GiB, preset_for_gpu
from planner.advice import advise as with_advice
from planner.plan import Answer, plan
from planner.report import as_dict, plot, text
from megatrain_lightning.config import Config
from megatrain_lightning.lora_options import LoRA
from megatrain_lightning.errors import UserError
from megatrain_lightning.options import EngineOptions, OptionError
from planner.workload import Workload

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str], with_hydra: bool = False) -> Any:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a caller's own Hydra context: the same conf/ tree
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
        else:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
        if not with_hydra:
            return OmegaConf.to_container(cfg, resolve=True)
        run_dir = str(cfg.hydra.run.dir)  # of Hydra's own settings, the one train.py uses
        out = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
        return {**out, "hydra": {"run": {"dir": run_dir}}}
    except (HydraException, OmegaConfBaseException) as e:
        raise _explained(overrides, str(e)) from None


def presets(group: str) -> list[str]:
    """The presets of a conf/ group (`model`, `hardware`, ...)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONF.iterdir() if p.is_dir())


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _explained(overrides: list[str], message: str) -> PlanError:
    """Hydra's error as one line naming the field, with the close matches of a misspelt preset or key."""
    first = message.splitlines()[0]
    missing = re.search(r"Could not find '([\w-]+)/([^']+)'", first)
    if missing and missing.group(1) in groups():
        group, name = missing.groups()
        return PlanError(group, f"no preset {name!r}{_did_you_mean(name, presets(group))} (the presets: "
                                f"{', '.join(presets(group))})")
    unknown = re.search(r"Could not override '([\w.]+)'", first)
    if unknown:
        key = unknown.group(1)
        parent, _, leaf = key.rpartition(".")
        try:  # the fields there, as the chosen presets make them (a model takes any Config field)
            node = compose([o for o in overrides if o.partition("=")[0] in groups()])
            for part in parent.split(".") if parent else ():
                node = node[part]
            known = sorted(node) if isinstance(node, dict) else []
        except (PlanError, KeyError, TypeError):
            known = []
        if parent == "model":
            known = Config.field_names()
        return PlanError(key, f"no such field{_did_you_mean(leaf, known)} (a new field is added with +{key}=...)")
    field = next((o.split("=")[0] for o in overrides if o.split("=")[0].lstrip("+~") in message), "overrides")
    return PlanError(field, first)


# characters that Hydra's override grammar does not take unquoted in a value, but that paths and tokens contain
# (a checkpoint's `epoch=0-step=20.ckpt`, an eos token `<|end_of_text|>`)
_NEEDS_QUOTES = set("=<>|")


def quote_values(overrides: list[str]) -> list[str]:
    """`key=value` overrides with such a value quoted, so they can be written as the project prints them."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and _NEEDS_QUOTES & set(value) and value[:1] not in "'\"[{":
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(key + eq + value)
    return out


def gpu_defaults(overrides: list[str]) -> list[str]:
    """A GPU hardware preset with no trainer settings plans the run a GPU makes (trainer=gpu: bf16-mixed), not the
    CPU-capable default trainer (32-true), which train.py would pick only on a machine without a GPU."""
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("hardware=")), "auto")
    if preset not in ("auto", "cpu") and not any(o.lstrip("+~").startswith("trainer") for o in overrides):
        return [*overrides, "trainer=gpu"]
    return overrides


def compose_run(overrides: list[str]) -> tuple[dict[str, Any], Path]:
    """train.py's config (plain containers) and its run directory (`hydra.run.dir`, not created)."""
    cfg = compose(quote_values(overrides), with_hydra=True)
    return cfg, Path(cfg.pop("hydra")["run"]["dir"])


def hardware(cfg: dict[str, Any]) -> Hardware:
    hw = dict(cfg["hardware"])
    if hw.get("name") == "auto":
        gpu = detect_gpu()
        preset = preset_for_gpu(gpu[0] if gpu else None)
        base = compose([f"hardware={preset}"])["hardware"]
        base["name"] = f"auto: {preset}"
        if gpu:
            base["gpu"], base["hbm_GiB"] = gpu[0], round(gpu[1], 1)
        base["host_ram_GiB"] = round(host_ram_GiB(), 1)
        dirs = engine_options(cfg).nvme_dir
        base["nvme_drives"] = len(dirs)  # one directory per drive
        if cfg["storage"]["kind"] == "nvme":
            for d in dirs:
                _check_nvme_dir(d)
        base["nvme_capacity_TB"] = sum(disk_free_TB(d) for d in dirs)
        base.update({k: v for k, v in hw.items() if v is not None and k != "name"})
        hw = base
    return Hardware.from_dict(hw)


def _check_nvme_dir(d: str) -> None:
    """A directory the file tier can use: on a real filesystem, writable, with some room (where it does not exist
    yet: the nearest existing folder above it)."""
    where = d
    while where and not os.path.exists(where):
        where = os.path.dirname(where)
    where = where or "."
    usage, flags = shutil.disk_usage(where), os.statvfs(where).f_flag
    if usage.total == 0:
        raise PlanError("storage.nvme_dir", f"{d} is not on a disk (the filesystem of {where} has size 0)")
    if flags & os.ST_RDONLY or not os.access(where, os.W_OK):
        raise PlanError("storage.nvme_dir", f"{d} is not writable ({where} is read-only)")
    if usage.free < 1 << 20:
        raise PlanError("storage.nvme_dir", f"{d} has {usage.free / 1e3:.3g} kB free on its filesystem "
                                            f"({usage.total / 1e6:.3g} MB): no room for the file-backed state")


def engine_options(cfg: dict[str, Any]) -> EngineOptions:
    """conf/storage as the engine's options: the strategy's defaults and checks (options.py)."""
    try:
        return EngineOptions.from_conf(cfg["storage"])
    except OptionError as e:
        raise PlanError(e.conf_field, e.detail) from None


def workload(cfg: dict[str, Any]) -> Workload:
    try:
        model = Config.from_dict(cfg["model"])
    except ValueError as e:
        raise PlanError("model", str(e)) from None
    try:
        lora = LoRA.from_dict(cfg.get("lora"))
    except UserError as e:
        field, _, detail = str(e).partition(": ")
        raise PlanError(field, detail) from None
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    tr, data = cfg["trainer"], cfg["data"]
    return Workload.of(model, engine_options(cfg), lora_r=lora.r, lora_targets=targets,
                       seq_len=data["seq_len"], micro_batch=data["micro_batch"],
                       accumulate=tr.get("accumulate_grad_batches", 1), precision=tr.get("precision", "bf16-mixed"),
                       clip=bool(tr.get("gradient_clip_val")), ranks=tr.get("devices", 1) * tr.get("num_nodes", 1),
                       nodes=tr.get("num_nodes", 1))


def check(cfg: dict[str, Any], advise: bool = True) -> Answer:
    """The answer for a composed config (a plain dict, or anything OmegaConf.to_container accepts)."""
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(cfg, resolve=True)
    answer = plan(hardware(cfg), workload(cfg))
    return with_advice(answer) if advise else answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.check", description=__doc__.split("\n\n")[0],
                                 epilog="other arguments: Hydra overrides of conf/ (model=..., hardware=..., ...)")
    ap.add_argument("--json", action="store_true", help="print the answer as JSON")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the step's timeline and memory")
    ap.add_argument("--tokens", type=float, default=1e9, help="token budget to time (default 1e9)")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        ap.error(f"unknown option {bad[0]}")
    try:
        if args.tokens <= 0:
            raise PlanError("--tokens", f"must be > 0, got {args.tokens:g}")
        answer = check(compose(gpu_defaults(overrides)))
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(as_dict(answer, args.tokens), indent=1) if args.json else text(answer, args.tokens))
    if args.plot:
        plot(answer, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if answer.fits else 1


if __name__ == "__main__":
    sys.exit(main())
