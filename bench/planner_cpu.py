"""The planner against the engine on this machine's CPU: a probe model's measured step (batch start to batch end:
forward, backward and the host update, which a CPU device runs within the step) beside the step the planner
predicts from a profile calibrated here. A benchmark, not a test: wall-clock times on a shared 2-core VM vary by
±20% from run to run.   python bench/planner_cpu.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning.config import Config
from megatrain_lightning.models.lm import CausalLM
from planner.calibrate import calibrate
from planner.plan import plan
from planner.workload import Workload


class StepSpans(L.Callback):
    def __init__(self) -> None:
        self.spans: list[list[float]] = []

    def on_train_batch_start(self, *args) -> None:
        self.spans.append([time.perf_counter()])

    def on_train_batch_end(self, *args) -> None:
        self.spans[-1].append(time.perf_counter())


def main() -> None:
    config = Config("probe", vocab_size=256, n_layer=4, hidden_size=256, n_head=4, n_kv_head=2,
                    intermediate_size=704, max_seq_len=512)
    T, B, steps = 128, 8, 10
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (B, T + 1), generator=g) for _ in range(steps)]
    spans = StepSpans()
    trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", precision="32-true", max_steps=steps,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[spans])
    trainer.fit(CausalLM(config, warmup_steps=1, max_steps=steps), train_dataloaders=DataLoader(batches, batch_size=None))
    measured = statistics.median(b - a for a, b in spans.spans[1:])  # steps 2-10
    with tempfile.TemporaryDirectory() as d:
        hw = calibrate(d, quick=True, width=config, seq_len=T, cpu=True)
    predicted = plan(hw, Workload(config, seq_len=T, micro_batch=B, precision="32-true")).step_time_s
    print(f"probe model, {B} x {T} tokens, fp32, CPU: measured {measured:.3f} s, planner {predicted:.3f} s "
          f"({predicted / measured - 1:+.0%})")


if __name__ == "__main__":
    main()
