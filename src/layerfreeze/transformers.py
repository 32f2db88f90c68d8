"""A Hugging Face ``Trainer`` callback that runs a layerfreeze schedule.

The Trainer builds its optimizer from the parameters that require grad when
training starts, so a parameter frozen then and unfrozen later by a callback
is in no param group and never trains, silently. :class:`LayerFreezeCallback`
translates the Trainer's events into the calls of a
:class:`~layerfreeze.driver.Driver`:

1. When the Trainer is created (``on_init_end``), every parameter the schedule
   may train at the base lr is made trainable, through the freeze road, so the
   Trainer's own optimizer holds it in its usual groups (its weight-decay rule,
   its learning rate) and its LR scheduler covers it from the start.
2. Right after the Trainer has built its optimizer (its ``create_optimizer``
   is followed for that, on the Trainer that called ``on_init_end``), and so
   before it builds its LR scheduler and before
   ``train(resume_from_checkpoint=...)`` loads the saved optimizer state, a
   :class:`layerfreeze.Freezer` is made on the Trainer's model and optimizer:
   every param group the schedule needs (``lr_decay``, ``unfreeze_lr``)
   exists when the saved groups are matched, and the LR scheduler, made
   after, covers every group.
3. When training starts (``on_train_begin``) and then at every step and epoch
   start, the schedule is applied, the step first; the metrics of every
   evaluation (``on_evaluate``) go to the schedule's metric-driven rules
   (``unfreeze_on_plateau``, see :meth:`layerfreeze.Freezer.report`).

Parameters that belong to no group of the Trainer's are added by the Freezer
as new groups with weight decay ``args.weight_decay``; parameters it trains
at another lr than their group's are moved into groups of their own that keep
the weight decay of the group they came from. A callback added with
``trainer.add_callback`` after the Trainer was made gets no ``on_init_end``:
its Freezer is made at ``on_train_begin``, with the Trainer's LR scheduler,
and a resume whose schedule needs groups of its own is then not possible.

The Freezer's state (frozen set, schedule position, warm-ups, adaptive
statistics) is saved as ``layerfreeze.pt`` next to the optimizer in every
checkpoint the Trainer writes, and loaded with it on
``train(resume_from_checkpoint=...)``; without that file the frozen set is
re-derived from the Trainer's epoch and step.
Under several processes the Trainer's DDP wrapper is not visible to callbacks:
step 1 makes DDP register every parameter the schedule trains, so pass
``ddp_find_unused_parameters=True`` in the ``TrainingArguments`` for freezes
later on; the callback checks that ranks agree on the frozen set.

Import this module explicitly (``from layerfreeze.transformers import
LayerFreezeCallback``); ``import layerfreeze`` never imports transformers.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

import torch
from transformers import TrainerCallback

from .driver import Driver, wrap_after, wrap_before
from .freezer import Freezer
from .schedule import Schedule

__all__ = ["LayerFreezeCallback"]

#: the Freezer's state in a Trainer checkpoint folder
STATE_FILE = "layerfreeze.pt"


class LayerFreezeCallback(TrainerCallback):  # type: ignore[misc]
    """Apply a :class:`layerfreeze.Schedule` during ``transformers.Trainer`` training.

    Args:
        schedule: the schedule (epochs are the Trainer's epochs counted from
            0, steps its ``global_step``, i.e. optimizer updates).
        **freezer_kwargs: passed to :class:`layerfreeze.Freezer` (``guard``,
            ``release_state``, ``unfreeze_lr``, ``cache`` to skip the frozen
            prefix's forward, ...).

    Raises:
        ArgumentTypeError: ``schedule`` is not a Schedule (also a ``TypeError``).

    Example:
        >>> import layerfreeze as lf
        >>> from layerfreeze.transformers import LayerFreezeCallback
        >>> cb = LayerFreezeCallback(lf.Schedule().freeze("bert", until_epoch=1))
        >>> # Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """

    def __init__(self, schedule: Schedule, **freezer_kwargs: Any) -> None:
        self.driver = Driver(schedule, freezer_kwargs)
        self.schedule = schedule
        self.freezer_kwargs = freezer_kwargs
        self._early = False

    @property
    def freezer(self) -> Freezer | None:
        """The Freezer, once the Trainer has built its optimizer (closed after training)."""
        return self.driver.freezer or self.driver.last

    @property
    def transitions(self) -> list[Any]:
        """Every transition made, in order."""
        return self.driver.transitions

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        self.driver.before_optimizer(model)
        trainer = _calling_trainer(self)
        if trainer is None:
            return
        ref = weakref.ref(trainer)

        def built(optimizer: Any) -> None:
            owner = ref()
            if owner is not None and optimizer is not None:
                self.driver.start(owner.model, optimizer, weight_decay=owner.args.weight_decay)
                self._early = True

        wrap_after(trainer, "create_optimizer", built)

        def saved(output_dir: str) -> None:
            owner = ref()
            if owner is not None and owner.args.should_save and self.driver.freezer is not None:
                torch.save(self.driver.state_dict(), os.path.join(output_dir, STATE_FILE))

        def loading(checkpoint: str | None) -> None:
            path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
            if path is not None and os.path.exists(path):
                self.driver.load_state_dict(torch.load(path, weights_only=True))

        wrap_after(trainer, "_save_optimizer_and_scheduler", lambda out, *a, **k: saved(*a, **k), with_args=True)
        wrap_before(trainer, "_load_optimizer_and_scheduler", loading)

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self._early or self.driver.freezer is None:
            self.driver.start(model, optimizer, lr_scheduler, weight_decay=args.weight_decay)
        self.driver.attach(model, ranks_only=True)
        self._advance(state, epoch=True)

    def _advance(self, state: Any, *, epoch: bool) -> None:
        self.driver.advance(
            epoch=int(math.floor((state.epoch or 0) + 1e-6)) if epoch else None,
            step=int(state.global_step),
        )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._advance(state, epoch=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._advance(state, epoch=False)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self.driver.report(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.stop()
        self._early = False


def _calling_trainer(callback: Any) -> Any:
    """The ``transformers.Trainer`` whose ``__init__`` is calling ``on_init_end``
    on ``callback`` (callbacks are not given the Trainer), or None."""
    import sys

    from transformers import Trainer

    frame: Any = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in getattr(owner.callback_handler, "callbacks", []):
            return owner
        frame = frame.f_back
    return None
