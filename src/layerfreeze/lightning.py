"""A Lightning 2.x callback that runs a layerfreeze schedule.

:class:`LayerFreeze` translates Lightning's events into the freeze road:

* ``setup`` (before ``configure_optimizers`` and before a DDP strategy wraps
  the model): every parameter the schedule may ever make trainable is made
  trainable, so an optimizer built from ``filter(requires_grad)`` holds it,
  LR schedulers cover it from the start, and checkpoints have the same param
  groups at every point of the schedule.
* ``on_train_start``: a :class:`layerfreeze.Freezer` is made on the
  LightningModule, the first optimizer Lightning built and its torch LR
  schedulers; under ``strategy="ddp"`` the Freezer attaches its
  :class:`~layerfreeze.distributed.DistributedSync` to Lightning's DDP wrapper
  (:meth:`~layerfreeze.Freezer.attach_distributed`), so the reducer follows each change
  and ranks are checked to agree. A state restored from a checkpoint is loaded
  then, and the schedule applied.
* ``on_train_epoch_start`` / ``on_train_batch_start``: the schedule is applied
  at ``trainer.current_epoch`` / ``trainer.global_step``.
* ``state_dict`` / ``load_state_dict``: the Freezer's state travels in
  Lightning checkpoints, so ``trainer.fit(..., ckpt_path=...)`` in the middle
  of a schedule continues it.

Import this module explicitly (``from layerfreeze.lightning import
LayerFreeze``); ``import layerfreeze`` never imports Lightning.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from .errors import ArgumentTypeError
from .freezer import Freezer
from .lrsched import same_optimizer, unwrap_scheduler
from .schedule import Schedule

__all__ = ["LayerFreeze"]


class LayerFreeze(pl.Callback):  # type: ignore[misc]
    """Apply a :class:`layerfreeze.Schedule` during Lightning training.

    Args:
        schedule: the schedule; epochs are ``trainer.current_epoch`` (from 0),
            steps ``trainer.global_step`` (optimizer steps).
        **freezer_kwargs: passed to :class:`layerfreeze.Freezer` (``guard``,
            ``release_state``, ``unfreeze_lr``, ...).

    Attributes:
        freezer: the Freezer, once training has started.
        transitions: every transition made in this process, in order.

    Raises:
        ArgumentTypeError: ``schedule`` is not a Schedule (also a ``TypeError``).

    Example:
        >>> import layerfreeze as lf
        >>> from layerfreeze.lightning import LayerFreeze
        >>> cb = LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=2))
        >>> # lightning.Trainer(callbacks=[cb], max_epochs=5).fit(module, data)
    """

    def __init__(self, schedule: Schedule, **freezer_kwargs: Any) -> None:
        if not isinstance(schedule, Schedule):
            raise ArgumentTypeError(f"schedule must be a layerfreeze Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.freezer_kwargs = freezer_kwargs
        self.freezer: Freezer | None = None
        self.transitions: list[Any] = []
        self._restored: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.schedule.unfreeze_ahead(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        schedulers = [
            cfg.scheduler
            for cfg in getattr(trainer, "lr_scheduler_configs", [])
            if same_optimizer(getattr(unwrap_scheduler(cfg.scheduler), "optimizer", None), optimizer)
        ]
        self.freezer = Freezer(pl_module, optimizer, self.schedule, lr_scheduler=schedulers or None, **self.freezer_kwargs)
        self.freezer.attach_distributed(trainer.strategy.model)
        if self._restored is not None:
            self.freezer.load_state_dict(self._restored)
            self._restored = None
        self.transitions += self.freezer.set_step(trainer.global_step)
        self.transitions += self.freezer.set_epoch(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.freezer is not None:
            # the step first, so that epoch transitions carry the right step
            self.transitions += self.freezer.set_step(trainer.global_step)
            self.transitions += self.freezer.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.freezer is not None:
            self.transitions += self.freezer.set_step(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # keep the Freezer's state for a checkpoint saved after fit()
        if self.freezer is not None:
            self._restored = self.freezer.state_dict()
        self._detach()

    def _detach(self) -> None:
        if self.freezer is not None:
            self.freezer.close()
            self.freezer = None

    def state_dict(self) -> dict[str, Any]:
        """The Freezer's state (frozen set, schedule position, added groups)."""
        if self.freezer is not None:
            return {"freezer": self.freezer.state_dict()}
        return {"freezer": self._restored} if self._restored is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state until the Freezer exists (``on_train_start``)."""
        self._restored = state_dict.get("freezer")
