"""Preemption: SIGTERM (a scheduler's notice) or SIGINT (Ctrl+C) finishes the optimizer step in progress, saves a
checkpoint, and exits with the status of a process ended by that signal (128 + its number: 143, 130), which
schedulers read as interrupted.

Lightning's own SIGTERM handling raises after the next micro-batch (mid-accumulation, whose gradients a checkpoint
does not hold) and exits 0, with no checkpoint; SIGINT ends the run where it is. A second Ctrl+C ends it at once.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class SaveOnSignal(pl.Callback):
    """`dirpath`: where the checkpoint goes (default: the ModelCheckpoint's directory, else the run's root)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str | Path | None = None) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.received: int | None = None
        self._step_at_start = 0
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signum
        log.warning(f"received {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                    "(signal again to stop at once)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's own SIGTERM handler (registered when fit starts), which this one replaces for the fit;
        # Lightning restores the handlers it found when fit ends
        self.received = None
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: signals cannot be handled here
            log.warning("SaveOnSignal: fit does not run on the main thread; signals are not handled")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self._step_at_start:
            return  # mid-accumulation: the step is not finished
        received = self.received is not None
        if trainer.world_size > 1:  # the save is collective: every rank saves after the step any rank got it in
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        dirpath = self.dirpath
        if dirpath is None:
            callback = trainer.checkpoint_callback
            dirpath = Path(callback.dirpath) if callback is not None and callback.dirpath else \
                Path(trainer.default_root_dir) / "checkpoints"
        path = dirpath / f"interrupted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        signum = self.received or signal.SIGTERM  # another rank's signal
        name = signal.Signals(signum).name
        log.warning(f"{name}: saved {path} after step {trainer.global_step}; resume with ckpt_path={dirpath} "
                    f"(train.py: resume={dirpath})")
        raise SystemExit(128 + signum)
