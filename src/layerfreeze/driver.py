"""What every trainer callback does, in one place.

A trainer callback has to do the same six things whatever the framework:

1. before the framework builds its optimizer, make trainable every parameter
   the schedule may train at the base lr, so that an optimizer built from the
   trainable parameters holds it (:meth:`Driver.before_optimizer`);
2. once the optimizer exists and *before* the framework loads a checkpoint's
   optimizer state, make the :class:`~layerfreeze.Freezer`, so that every
   param group the schedule needs (``lr_decay``, ``unfreeze_lr``) exists when
   the saved groups are matched (:meth:`Driver.start`);
3. follow the framework's DDP wrapper (:meth:`Driver.attach`);
4. apply the schedule, the step first and then the epoch, so that an epoch
   transition carries the right step (:meth:`Driver.advance`);
5. hand evaluation metrics to metric-driven rules (:meth:`Driver.report`);
6. carry the Freezer's state in the framework's checkpoints
   (:meth:`Driver.state_dict` / :meth:`Driver.load_state_dict`), whether the
   framework restores it before or after the Freezer exists.

:mod:`layerfreeze.lightning` and :mod:`layerfreeze.transformers` only
translate their framework's events into these calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core import Transition
from .errors import ArgumentTypeError
from .freezer import Freezer
from .optim import optimizer_param_ids
from .schedule import Schedule

__all__ = ["Driver"]


class Driver:
    """Runs a :class:`~layerfreeze.Schedule` for a trainer callback.

    Args:
        schedule: the schedule.
        freezer_kwargs: passed to :class:`~layerfreeze.Freezer` (``guard``,
            ``release_state``, ``unfreeze_lr``, ``cache`` to skip the frozen
            prefix's forward, ...).

    Attributes:
        freezer: the Freezer between :meth:`start` and :meth:`stop`.
        last: the Freezer of the last run, closed, after :meth:`stop`.
        transitions: every transition made, in order.

    Raises:
        ArgumentTypeError: ``schedule`` is not a Schedule (also a ``TypeError``).

    Example:
        >>> import torch, layerfreeze as lf
        >>> from layerfreeze.driver import Driver
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> d = Driver(lf.Schedule().freeze("[0]", until_epoch=1), {})
        >>> _ = d.before_optimizer(net)
        >>> _ = d.start(net, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> [t.action for t in d.advance(epoch=0, step=0) + d.advance(epoch=1, step=4)]
        ['freeze', 'unfreeze']
    """

    def __init__(self, schedule: Schedule, freezer_kwargs: dict[str, Any]) -> None:
        if not isinstance(schedule, Schedule):
            raise ArgumentTypeError(f"schedule must be a layerfreeze Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.freezer_kwargs = dict(freezer_kwargs)
        self.freezer: Freezer | None = None
        #: the Freezer of the last run, closed, after :meth:`stop`
        self.last: Freezer | None = None
        self.transitions: list[Transition] = []
        self._restored: dict[str, Any] | None = None

    def before_optimizer(self, model: Any) -> list[str]:
        """Make trainable what the schedule may train at the base lr (see
        :meth:`layerfreeze.Schedule.unfreeze_ahead`); returns those names."""
        return self.schedule.unfreeze_ahead(model)

    def start(
        self,
        model: Any,
        optimizer: Any,
        lr_schedulers: Any = None,
        *,
        weight_decay: float | None = None,
    ) -> Freezer:
        """Make the Freezer (a previous one is closed) and load a state kept
        by :meth:`load_state_dict`.

        Args:
            model: the model (a DDP wrapper is looked through).
            optimizer: the framework's optimizer (wrappers looked through).
            lr_schedulers: LR schedulers made before this call.
            weight_decay: for groups of parameters the optimizer did not hold
                (the framework's default); groups moved out of the
                optimizer's own keep their weight decay.

        Returns:
            The Freezer.
        """
        self.close()
        self.last = None
        groups_before = len(optimizer.param_groups) if optimizer is not None else 0
        held = optimizer_param_ids(optimizer) if optimizer is not None else set()
        self.freezer = Freezer(
            model, optimizer, self.schedule,
            lr_scheduler=lr_schedulers if optimizer is not None and lr_schedulers else None,
            **self.freezer_kwargs,
        )
        if optimizer is not None and weight_decay is not None:
            for group in optimizer.param_groups[groups_before:]:
                if not any(id(p) in held for p in group["params"]):
                    group["weight_decay"] = weight_decay
        if self._restored is not None:
            self.freezer.load_state_dict(self._restored)
            self._restored = None
        return self.freezer

    def attach(self, wrapper: Any, *, ranks_only: bool = False) -> None:
        """Follow the framework's DDP wrapper (see :meth:`layerfreeze.Freezer.attach_distributed`);
        with ``ranks_only``, only check that ranks agree when a process group of
        several ranks is up and the wrapper is out of reach."""
        if self.freezer is None:
            return
        if ranks_only:
            import torch.distributed as dist

            if self.freezer.distributed is None and dist.is_available() and dist.is_initialized() \
                    and dist.get_world_size() > 1:
                self.freezer.attach_distributed(wrapper, ranks_only=True)
            return
        self.freezer.attach_distributed(wrapper)

    def advance(self, *, epoch: int | None = None, step: int | None = None) -> list[Transition]:
        """Apply the schedule at ``step`` then at ``epoch`` (either may be
        None); returns the transitions made, also kept in :attr:`transitions`."""
        made: list[Transition] = []
        if self.freezer is None:
            return made
        if step is not None:
            made += self.freezer.set_step(step)
        if epoch is not None:
            made += self.freezer.set_epoch(epoch)
        self.transitions += made
        return made

    def report(self, metrics: dict[str, Any] | None) -> list[Transition]:
        """Hand evaluation metrics to the schedule's metric-driven rules (see
        :meth:`layerfreeze.Freezer.report`); returns the transitions made."""
        if self.freezer is None or not metrics:
            return []
        made = self.freezer.report(**{str(k): v for k, v in metrics.items()})
        self.transitions += made
        return made

    def stop(self) -> None:
        """Keep the Freezer's state (for a checkpoint saved after training) and close it."""
        if self.freezer is not None:
            self._restored = self.freezer.state_dict()
        self.last = self.freezer
        self.close()

    def close(self) -> None:
        """Close the Freezer, if any (its hooks go)."""
        if self.freezer is not None:
            self.freezer.close()
            self.freezer = None

    def state_dict(self) -> dict[str, Any]:
        """The Freezer's state, or the state kept for it."""
        if self.freezer is not None:
            return {"freezer": self.freezer.state_dict()}
        return {"freezer": self._restored} if self._restored is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state now if the Freezer exists, else when :meth:`start` makes it."""
        saved = state.get("freezer")
        if saved is not None and self.freezer is not None:
            self.freezer.load_state_dict(saved)
        else:
            self._restored = saved


def wrap_after(obj: Any, name: str, then: Callable[..., None], *, with_args: bool = False) -> None:
    """Replace the bound method ``obj.name`` by one that calls ``then`` with
    its result (and, ``with_args``, the call's arguments after it)."""
    original = getattr(obj, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if with_args:
            then(out, *args, **kwargs)
        else:
            then(out)
        return out

    setattr(obj, name, call)


def wrap_before(obj: Any, name: str, first: Callable[..., None]) -> None:
    """Replace the bound method ``obj.name`` by one that calls ``first`` with
    the call's arguments, then the method."""
    original = getattr(obj, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        first(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(obj, name, call)
