"""``GraftCallback``: filter grafting in a Lightning Trainer (``pip install graft[lightning]``).

    trainer = lightning.Trainer(max_epochs=30, callbacks=[graft.lightning.GraftCallback()])

Run the script under ``graft-run --nproc_per_node=N SCRIPT.py``: each network is then a Trainer
of its own (with ``--data-parallel G``, its own DDP over G processes, ``devices=G``), and the
callback grafts at the end of each training epoch, after that epoch's validation (the paper
evaluates before grafting), never after the last epoch (of ``max_epochs``, or the one in which
``max_steps`` runs out). Its state goes into Lightning's
checkpoints, and a run resumed from one (``ckpt_path=...``) grafts as an uninterrupted one
would, including a graft its checkpoint was written before.
"""

from __future__ import annotations

import lightning.pytorch as pl

from . import rules
from .grafter import Grafter


class GraftCallback(pl.Callback):
    """Grafting settings as ``graft.Grafter`` takes them: a ``rules.GraftSpec`` or its keywords
    (``criterion``, ``partner``, ``every_steps``, ``A``, ``c``, ``rule="papa"``...), and
    ``timeout``, ``exchange``, ``data_parallel``."""

    def __init__(self, spec: rules.GraftSpec | None = None, *, timeout: float = 300.0, exchange: str = "auto",
                 data_parallel: int | None = None, **settings):
        super().__init__()
        self.spec = spec if spec is not None else rules.GraftSpec.make(**settings)  # a bad setting fails here
        self.options = {"timeout": timeout, "exchange": exchange}
        if data_parallel is not None:
            self.options["data_parallel"] = data_parallel
        self.grafter: Grafter | None = None
        self._loaded: dict | None = None
        self._step = 0  # trainer.global_step at the last step() call: optimizer steps, not batches

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.grafter is None:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            self.grafter = Grafter(self.spec, epochs=epochs, **self.options)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        if self._loaded is not None:  # a resumed run: the graft its checkpoint may owe
            self.grafter.load_state_dict(self._loaded)
            self._loaded = None
            self.grafter.resume(pl_module, epoch=trainer.current_epoch - 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Per optimizer step (global_step), not per batch: with accumulate_grad_batches=k a batch
        # may end without a step.
        if self.spec.per_step and trainer.global_step > self._step:
            self._step = trainer.global_step
            self.grafter.step(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.spec.per_step:
            # A run bounded by max_steps ends with this epoch when the steps are used up (a partial
            # epoch; max_epochs is then -1 and the Grafter knows no length).
            last = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
            self.grafter.graft(pl_module, epoch=trainer.current_epoch, last=last)

    def state_dict(self) -> dict:
        return self.grafter.state_dict() if self.grafter is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = dict(state_dict) or None
