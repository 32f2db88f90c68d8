"""Keeping torch LR schedulers right when the Freezer adds param groups.

A scheduler keeps one entry per param group, sized when it is built
(``base_lrs``, ``LambdaLR.lr_lambdas``, ``ReduceLROnPlateau.min_lrs``,
``CyclicLR.max_lrs``, OneCycleLR's per-group ``max_lr``/``min_lr``). A group
added later breaks it: on torch 2.13 ``LambdaLR.step()`` raises
``ValueError: zip() argument 2 is shorter than argument 1``, and the chainable
schedulers (StepLR, ExponentialLR, ...) silently start the new group from its
raw lr.

layerfreeze takes two steps, in this order:

1. **Register up front.** When a :class:`~layerfreeze.Freezer` is made with a
   schedule, every parameter the schedule may ever make trainable and that no
   param group holds is added to the optimizer right away, at its final lr
   (base lr times its ``lr_decay`` scale). Frozen parameters reach ``step()``
   with ``.grad`` None, and every torch optimizer skips those, so registering
   early changes no value; an optimizer's state for them starts at their first
   real step, exactly as if they had been added then. A parameter that a
   rule trains at a scaled lr and that a group already holds at another lr
   (an optimizer built from ``model.parameters()``) is moved into a group of
   its own at that lr, keeping its old group's other options. A scheduler built
   *after* the Freezer therefore sees every group from the start and needs
   nothing more, and a checkpoint holds the same groups at every epoch, so
   resuming needs no group juggling.
2. **Repair what was built before.** A scheduler built *before* the Freezer
   (passed as ``Freezer(..., lr_scheduler=s)``), and any scheduler when a
   group is added later (e.g. ``Freezer.unfreeze`` of something no rule
   foresaw), is extended by :func:`extend_scheduler`: each new group gets its
   own entries, scaled from group 0's, and its lr is set to its base lr times
   the factor the scheduler applies to group 0 at that moment, as if it had
   been in the optimizer from the start.

Registering alone cannot fix a scheduler that already exists, and repairing
alone cannot reach a scheduler the Freezer never sees; together they cover
both orders. A scheduler the Freezer is not given cannot be repaired, but it
can be seen: every ``LRScheduler`` marks the ``step`` it wraps
(:func:`scheduled_by_unknown`), and a Freezer or a transition that would add
a group then raises :class:`~layerfreeze.ArgumentError` naming
``lr_scheduler=``, before anything changes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.optim import lr_scheduler as sched

from .errors import ArgumentError, ArgumentTypeError

__all__ = [
    "check_lr",
    "check_scheduler",
    "scheduled_by_unknown",
    "extend_scheduler",
    "extend_schedulers",
    "same_optimizer",
    "unwrap_optimizer",
    "unwrap_scheduler",
]

_MOMENTUM_KEYS = ("max_momentum", "base_momentum", "betas", "momentum")
_SCHEDULERS = (sched.LRScheduler, sched.ReduceLROnPlateau)


def _children(scheduler: Any) -> list[Any]:
    return list(getattr(scheduler, "_schedulers", []) or [])


def _reference_base(scheduler: Any, optimizer: torch.optim.Optimizer) -> float:
    group0 = optimizer.param_groups[0]
    if isinstance(scheduler, sched.OneCycleLR):
        # a group's base lr is its peak: OneCycleLR's max_lr
        return float(group0["max_lr"])
    bases = getattr(scheduler, "base_lrs", None)
    if not bases:
        return float(group0.get("initial_lr", group0["lr"]))
    return float(bases[0])


def _extend(values: list[Any], n: int, make: Any) -> None:
    while len(values) < n:
        values.append(make())


def extend_scheduler(scheduler: Any, first_new: int, reference: float | None = None) -> None:
    """Give the param groups from index ``first_new`` on their entries in
    ``scheduler``'s bookkeeping, and their lr.

    A new group's base lr is its ``initial_lr`` (set by the Freezer when it
    added the group); its scale ``s`` is that base over group 0's base. For
    ``OneCycleLR`` the base is the peak: group 0's ``max_lr``, and the new
    group's ``max_lr`` is its base. Lists
    sized per group get group 0's entry times ``s`` (lr lambdas: group 0's
    lambda); the group's lr becomes ``s`` times group 0's current lr.
    Schedulers that hold others (SequentialLR, ChainedScheduler) are repaired
    through. Entries already present are left alone, so a repeated call is
    harmless.

    Args:
        scheduler: a torch LR scheduler (any ``LRScheduler`` or
            ``ReduceLROnPlateau``).
        first_new: index of the first param group the scheduler does not know.
        reference: group 0's base lr, for a scheduler that does not record it
            (``ReduceLROnPlateau``); default: group 0's ``initial_lr``, else its lr.

    Example:
        >>> import torch
        >>> w, v = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> s = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5)
        >>> opt.add_param_group({"params": [v], "lr": 0.01, "initial_lr": 0.01})
        >>> extend_scheduler(s, 1)
        >>> opt.step(); s.step(); [round(g["lr"], 6) for g in opt.param_groups]
        [0.05, 0.005]
    """
    optimizer: torch.optim.Optimizer = scheduler.optimizer
    groups = optimizer.param_groups
    n = len(groups)
    if first_new >= n or first_new < 1:
        return
    group0 = groups[0]
    base0 = _reference_base(scheduler, optimizer)
    if reference is not None and isinstance(scheduler, sched.ReduceLROnPlateau):
        base0 = reference
    for g in range(first_new, n):
        new = groups[g]
        base = float(new.get("initial_lr", new["lr"]))
        s = base / base0 if base0 else 1.0
        if isinstance(scheduler, sched.OneCycleLR):
            for key in ("initial_lr", "min_lr"):
                new[key] = group0[key] * s
            new["max_lr"] = base
        elif isinstance(scheduler, sched.CyclicLR):
            new.setdefault("initial_lr", base)
        if isinstance(scheduler, (sched.OneCycleLR, sched.CyclicLR)):
            for key in _MOMENTUM_KEYS:
                if key in group0:
                    new[key] = group0[key]
        new["lr"] = group0["lr"] * s
    for child in _children(scheduler):
        extend_scheduler(child, first_new, reference)

    scales = [float(groups[g].get("initial_lr", groups[g]["lr"])) / base0 if base0 else 1.0 for g in range(n)]
    bases = getattr(scheduler, "base_lrs", None)
    if isinstance(bases, list) and bases:
        if isinstance(scheduler, sched.CyclicLR):
            _extend(bases, n, lambda: bases[0] * scales[len(bases)])
        else:
            _extend(bases, n, lambda: float(groups[len(bases)].get("initial_lr", groups[len(bases)]["lr"])))
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if isinstance(lambdas, list) and lambdas:
        _extend(lambdas, n, lambda: lambdas[0])
    for name in ("max_lrs",):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and values:
            _extend(values, n, lambda v=values: v[0] * scales[len(v)])  # type: ignore[misc]
    if isinstance(scheduler, sched.CyclicLR):
        for name in ("base_momentums", "max_momentums"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and values:
                _extend(values, n, lambda v=values: v[0])  # type: ignore[misc]
    if isinstance(scheduler, sched.ReduceLROnPlateau):
        mins = scheduler.min_lrs
        if scheduler.default_min_lr is not None:
            _extend(mins, n, lambda: scheduler.default_min_lr)
        else:
            _extend(mins, n, lambda: mins[0] * scales[len(mins)])
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, list):
        scheduler._last_lr = [group["lr"] for group in groups]


def extend_schedulers(schedulers: list[Any], first_new: int, reference: float | None = None) -> None:
    """:func:`extend_scheduler` for each scheduler in turn."""
    for scheduler in schedulers:
        extend_scheduler(scheduler, first_new, reference)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside optimizer wrappers.

    A wrapper (accelerate's ``AcceleratedOptimizer``, which the Hugging Face
    Trainer uses) holds the real optimizer as ``.optimizer`` and exposes the
    very same ``param_groups`` list. Such wrappers are looked through, as
    deep as they nest; anything else is returned as is.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> class Wrapper:
        ...     def __init__(self, optimizer):
        ...         self.optimizer = optimizer
        ...     @property
        ...     def param_groups(self):
        ...         return self.optimizer.param_groups
        >>> unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
        True
    """
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        groups = getattr(inner, "param_groups", None)
        if inner is None or groups is None or groups is not getattr(optimizer, "param_groups", None):
            break
        optimizer = inner
    return optimizer


def same_optimizer(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one optimizer, wrappers looked through."""
    return a is not None and b is not None and unwrap_optimizer(a) is unwrap_optimizer(b)


def unwrap_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler inside scheduler wrappers (accelerate's
    ``AcceleratedScheduler`` holds it as ``.scheduler``); anything else as is."""
    found = scheduler
    seen: set[int] = set()
    while not isinstance(found, _SCHEDULERS) and found is not None and id(found) not in seen:
        seen.add(id(found))
        found = getattr(found, "scheduler", None)
    return found if isinstance(found, _SCHEDULERS) else scheduler


def check_lr(name: str, value: object) -> float:
    """``value`` as a float if it is a finite, non-negative real number.

    Args:
        name: the argument's name, for the message.
        value: what was passed.

    Returns:
        The lr as a float.

    Raises:
        ArgumentError: a negative, infinite or NaN number, a bool or anything
            that is not a real number.

    Example:
        >>> check_lr("lr", 1e-3)
        0.001
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a finite non-negative number, got {value!r}")
    lr = float(value)
    if not math.isfinite(lr) or lr < 0:
        raise ArgumentError(
            f"{name} must be a finite non-negative number, got {value!r}; a learning rate is a real "
            "number >= 0 (e.g. 1e-4). Nothing was changed"
        )
    return lr


def scheduled_by_unknown(optimizer: torch.optim.Optimizer, known: list[Any]) -> bool:
    """Whether a torch LR scheduler not in ``known`` schedules ``optimizer``.

    Every ``LRScheduler`` wraps its optimizer's ``step`` once, marking the
    wrapper with ``_wrapped_by_lr_sched``, and stamps ``initial_lr`` on each
    group; ``ReduceLROnPlateau`` does neither and cannot be seen. With no
    known scheduler, the mark alone says one exists.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> scheduled_by_unknown(opt, [])
        False
        >>> s = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        >>> scheduled_by_unknown(opt, []), scheduled_by_unknown(opt, [s])
        (True, False)
    """
    if not hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return False
    return not any(isinstance(s, sched.LRScheduler) and not isinstance(s, sched.ReduceLROnPlateau) for s in known)


def check_scheduler(scheduler: object, optimizer: torch.optim.Optimizer | None) -> None:
    """Raise :class:`~layerfreeze.ArgumentTypeError` / :class:`~layerfreeze.ArgumentError`
    unless ``scheduler`` is a torch LR scheduler of ``optimizer``.

    Either side may be an optimizer wrapper that exposes the wrapped
    optimizer's own ``param_groups`` (see :func:`unwrap_optimizer`): a
    scheduler built on accelerate's wrapper schedules the optimizer inside it.
    """
    if not isinstance(scheduler, _SCHEDULERS):
        raise ArgumentTypeError(
            f"lr_scheduler must be a torch LR scheduler (torch.optim.lr_scheduler), got {type(scheduler).__name__}"
        )
    if optimizer is None:
        raise ArgumentError("lr_scheduler= needs the optimizer it schedules: pass optimizer= too")
    if not same_optimizer(scheduler.optimizer, optimizer):
        raise ArgumentError(
            "lr_scheduler= schedules a different optimizer than the one given to the Freezer; pass the "
            "scheduler built on that optimizer (or the Freezer the scheduler's optimizer)"
        )
