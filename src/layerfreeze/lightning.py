"""A Lightning 2.x callback that runs a layerfreeze schedule.

:class:`LayerFreeze` translates Lightning's events into the calls of a
:class:`~layerfreeze.driver.Driver`:

* ``setup`` (before ``configure_optimizers``): every parameter the schedule
  may train at the base lr is made trainable, so an optimizer built from
  ``filter(requires_grad)`` holds it and LR schedulers cover it from the start.
* ``on_fit_start`` (after ``configure_optimizers`` and the DDP wrap, before
  Lightning loads a checkpoint's optimizer state): a
  :class:`layerfreeze.Freezer` is made on the LightningModule, the first
  optimizer and its torch LR schedulers, so every param group the schedule
  needs (``lr_decay``, ``unfreeze_lr``) exists when ``fit(ckpt_path=...)``
  matches the saved groups; it follows Lightning's DDP wrapper.
* ``on_train_start`` / ``on_train_epoch_start`` / ``on_train_batch_start``:
  the schedule is applied at ``trainer.global_step`` and then at
  ``trainer.current_epoch`` (restored by then on resume).
* ``on_validation_end``: ``trainer.callback_metrics`` go to the schedule's
  metric-driven rules (``unfreeze_on_plateau``, see :meth:`layerfreeze.Freezer.report`).
* ``state_dict`` / ``load_state_dict``: the Freezer's state travels in
  Lightning checkpoints.

Import this module explicitly (``from layerfreeze.lightning import
LayerFreeze``); ``import layerfreeze`` never imports Lightning.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from .driver import Driver
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
            ``release_state``, ``unfreeze_lr``, ``cache`` to skip the frozen
            prefix's forward, ...).

    Raises:
        ArgumentTypeError: ``schedule`` is not a Schedule (also a ``TypeError``).

    Example:
        >>> import layerfreeze as lf
        >>> from layerfreeze.lightning import LayerFreeze
        >>> cb = LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=2))
        >>> # lightning.Trainer(callbacks=[cb], max_epochs=5).fit(module, data)
    """

    def __init__(self, schedule: Schedule, **freezer_kwargs: Any) -> None:
        self.driver = Driver(schedule, freezer_kwargs)
        self.schedule = schedule
        self.freezer_kwargs = freezer_kwargs

    @property
    def freezer(self) -> Freezer | None:
        """The Freezer, while fitting."""
        return self.driver.freezer

    @property
    def transitions(self) -> list[Any]:
        """Every transition made in this process, in order."""
        return self.driver.transitions

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.driver.before_optimizer(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        schedulers = [
            cfg.scheduler
            for cfg in getattr(trainer, "lr_scheduler_configs", [])
            if same_optimizer(getattr(unwrap_scheduler(cfg.scheduler), "optimizer", None), optimizer)
        ]
        self.driver.start(pl_module, optimizer, schedulers)
        self.driver.attach(trainer.strategy.model)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.advance(epoch=trainer.current_epoch, step=trainer.global_step)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.advance(epoch=trainer.current_epoch, step=trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.driver.advance(step=trainer.global_step)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.driver.report(dict(trainer.callback_metrics))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # keep the Freezer's state for a checkpoint saved after fit()
        self.driver.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.driver.close()

    def state_dict(self) -> dict[str, Any]:
        """The Freezer's state (frozen set, schedule position, added groups)."""
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint's state (kept until the Freezer exists)."""
        self.driver.load_state_dict(state_dict)
