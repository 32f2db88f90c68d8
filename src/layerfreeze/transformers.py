"""A Hugging Face ``Trainer`` callback that runs a layerfreeze schedule.

The Trainer builds its optimizer from the parameters that require grad when
training starts, so a parameter frozen then and unfrozen later by a callback
is in no param group and never trains, silently. :class:`LayerFreezeCallback`
avoids that in two steps:

1. When the Trainer is created (``on_init_end``), every parameter the schedule
   may ever make trainable is made trainable, through the freeze road, so the
   Trainer's own optimizer holds it in its usual groups (its weight-decay rule,
   its learning rate) and its LR scheduler covers it from the start.
   Checkpoints then have the same param groups at every point of the
   schedule, so ``trainer.train(resume_from_checkpoint=...)`` just works.
2. When training starts (``on_train_begin``), a :class:`layerfreeze.Freezer` is
   made on the Trainer's model, optimizer and LR scheduler and the schedule is
   applied; then at every epoch start and every step.

Parameters that still belong to no group (the callback was added after the
Trainer was made, or a rule with ``lr_decay`` asks for its own lr) are added by
the Freezer as new groups (weight decay ``args.weight_decay``); parameters a
rule trains at an ``lr_decay`` lr that the Trainer's groups already hold are
moved into groups of their own that keep the weight decay of the group they
came from. The Trainer's LR scheduler (built on accelerate's optimizer
wrapper) is extended for every new group.

On resume, the frozen set is re-derived from the Trainer's epoch and step,
which is exact for every rule except the data-dependent ``adaptive_freeze``.
Under several processes the Trainer's DDP wrapper is not visible to callbacks:
step 1 makes DDP register every parameter the schedule trains, so pass
``ddp_find_unused_parameters=True`` in the ``TrainingArguments`` for freezes
later on; the callback checks that ranks agree on the frozen set.

Import this module explicitly (``from layerfreeze.transformers import
LayerFreezeCallback``); ``import layerfreeze`` never imports transformers.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from .errors import ArgumentTypeError
from .freezer import Freezer
from .optim import optimizer_param_ids
from .schedule import Schedule

__all__ = ["LayerFreezeCallback"]


class LayerFreezeCallback(TrainerCallback):  # type: ignore[misc]
    """Apply a :class:`layerfreeze.Schedule` during ``transformers.Trainer`` training.

    Args:
        schedule: the schedule (epochs are the Trainer's epochs counted from
            0, steps its ``global_step``, i.e. optimizer updates).
        **freezer_kwargs: passed to :class:`layerfreeze.Freezer` (``guard``,
            ``release_state``, ``unfreeze_lr``, ...).

    Attributes:
        freezer: the Freezer, once training has started.
        transitions: every transition made, in order.

    Raises:
        ArgumentTypeError: ``schedule`` is not a Schedule (also a ``TypeError``).

    Example:
        >>> import layerfreeze as lf
        >>> from layerfreeze.transformers import LayerFreezeCallback
        >>> cb = LayerFreezeCallback(lf.Schedule().freeze("bert", until_epoch=1))
        >>> # Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """

    def __init__(self, schedule: Schedule, **freezer_kwargs: Any) -> None:
        if not isinstance(schedule, Schedule):
            raise ArgumentTypeError(f"schedule must be a layerfreeze Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.freezer_kwargs = freezer_kwargs
        self.freezer: Freezer | None = None
        self.transitions: list[Any] = []

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        self.schedule.unfreeze_ahead(model)

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
        if self.freezer is not None:
            self.freezer.close()
        # accelerate wraps both; the Freezer works on the torch objects inside
        groups_before = len(optimizer.param_groups) if optimizer is not None else 0
        held = optimizer_param_ids(optimizer) if optimizer is not None else set()
        self.freezer = Freezer(
            model,
            optimizer,
            self.schedule,
            lr_scheduler=lr_scheduler if optimizer is not None else None,
            **self.freezer_kwargs,
        )
        if optimizer is not None:
            for group in optimizer.param_groups[groups_before:]:
                # groups moved out of the Trainer's own keep their weight decay;
                # groups of parameters the Trainer left out get the Trainer's
                if not any(id(p) in held for p in group["params"]):
                    group["weight_decay"] = args.weight_decay
        self._attach_rank_check(model)
        self._apply(state, epoch=True)

    def _attach_rank_check(self, model: Any) -> None:
        import torch.distributed as dist

        if self.freezer is None or self.freezer.distributed is not None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # the Trainer's DDP wrapper is not visible here: check ranks only
            self.freezer.attach_distributed(model, ranks_only=True)

    def _apply(self, state: Any, *, epoch: bool) -> None:
        if self.freezer is None:
            return
        if epoch:
            self.transitions += self.freezer.set_epoch(int(math.floor((state.epoch or 0) + 1e-6)))
        self.transitions += self.freezer.set_step(int(state.global_step))

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(state, epoch=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(state, epoch=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.freezer is not None:
            self.freezer.close()
