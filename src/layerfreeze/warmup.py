"""lr warm-up after unfreeze: a newly trainable group ramps up instead of jumping.

:class:`Warmup` says how: the unfrozen group's lr starts at ``start`` times
its lr and reaches its full lr after ``steps`` optimizer steps (or ``epochs``
epochs), linearly. :class:`WarmupParty` does it as a listener on the freeze
road and on the optimizer's step hooks: just before ``optimizer.step()`` it
multiplies the lr of each warming group by its factor, and right after the
step it puts the lr back. LR schedulers therefore never see the factor (a
chainable scheduler would otherwise carry it on), the warm-up composes with
any of them, and a checkpoint taken between steps holds the schedulers' lrs.

The factor belongs to a param group: a group starts warming up when a
parameter of it is unfrozen. The Freezer gives parameters a schedule unfreezes
groups of their own when a warm-up is asked for; layers that share a group
(``gradual_unfreeze`` without ``lr_decay``) restart the group's warm-up at
each unfreeze.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .core import Change
from .errors import ArgumentError, StateDictError
from .rules import as_int, as_number

__all__ = ["Warmup", "WarmupParty"]


@dataclass(frozen=True)
class Warmup:
    """How a newly unfrozen param group ramps up to its lr.

    Args:
        steps: optimizer steps to reach the full lr (exclusive with ``epochs``).
        epochs: epochs to reach the full lr, counted by ``Freezer.set_epoch``.
        start: the factor at the first step after the unfreeze, in ``[0, 1)``.

    Raises:
        ArgumentError: neither or both of ``steps``/``epochs``, a count below
            1, or ``start`` outside ``[0, 1)``.

    Example:
        >>> w = Warmup(steps=4, start=0.2)
        >>> [round(w.factor(k), 2) for k in range(6)]
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    """

    steps: int | None = None
    epochs: int | None = None
    start: float = 0.1

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ArgumentError(
                f"Warmup needs steps= or epochs= (one of them), got steps={self.steps!r}, epochs={self.epochs!r}"
            )
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and (as_int(value) is None or int(value) < 1):
                raise ArgumentError(f"Warmup {name}= must be an int >= 1, got {value!r}")
        start = as_number(self.start)
        if start is None or not 0.0 <= start < 1.0:
            raise ArgumentError(f"Warmup start= must be a number in [0, 1), got {self.start!r}")

    @property
    def length(self) -> int:
        return int(self.steps if self.steps is not None else self.epochs)  # type: ignore[arg-type]

    def factor(self, elapsed: int) -> float:
        """The lr factor ``elapsed`` steps (or epochs) after the unfreeze."""
        if elapsed >= self.length:
            return 1.0
        return float(self.start) + (1.0 - float(self.start)) * max(elapsed, 0) / self.length

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "start": self.start}


class WarmupParty:
    """Ramps the lr of param groups unfrozen by a change (see :class:`Warmup`).

    Args:
        warmup: the ramp.
        optimizer: the torch optimizer.
        clock: the time now: a callable returning the optimizer steps taken
            (``steps``) or the current epoch (``epochs``).

    Its part of a checkpoint is when each warming group started.
    """

    def __init__(self, warmup: Warmup, optimizer: torch.optim.Optimizer, clock: Callable[[], int | None]) -> None:
        self.warmup = warmup
        self.optimizer = optimizer
        self.clock = clock
        #: param group index -> time its warm-up started
        self.started: dict[int, int] = {}
        self._saved: dict[int, float] = {}
        ref = weakref.ref(self)

        def before(opt: Any, args: Any, kwargs: Any) -> None:
            party = ref()
            if party is not None:
                party._scale()

        def after(opt: Any, args: Any, kwargs: Any) -> None:
            party = ref()
            if party is not None:
                party._restore()

        self._handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]
        for h in self._handles:
            weakref.finalize(self, h.remove)

    def close(self) -> None:
        """Detach from the optimizer."""
        self._restore()
        for h in self._handles:
            h.remove()

    def validate(self, change: Change) -> None:
        pass

    def apply(self, change: Change) -> None:
        now = self.clock()
        if now is None or not change.unfreeze:
            return
        unfrozen = {id(p) for p in change.params(change.unfreeze)}
        for i, group in enumerate(self.optimizer.param_groups):
            if any(id(p) in unfrozen for p in group["params"]):
                self.started[i] = int(now)

    def factor(self, group: int) -> float:
        """The factor group ``group`` trains at now."""
        begun = self.started.get(group)
        now = self.clock()
        if begun is None or now is None:
            return 1.0
        return self.warmup.factor(int(now) - begun)

    def _scale(self) -> None:
        self._restore()
        for i in list(self.started):
            f = self.factor(i)
            if f >= 1.0:
                del self.started[i]
                continue
            group = self.optimizer.param_groups[i]
            self._saved[i] = group["lr"]
            group["lr"] = group["lr"] * f

    def _restore(self) -> None:
        groups = self.optimizer.param_groups
        for i, lr in self._saved.items():
            groups[i]["lr"] = lr
        self._saved.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"started": {str(k): v for k, v in self.started.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        started = state.get("started", {})
        if not isinstance(started, dict):
            raise StateDictError(f"warm-up state must map group indices to start times, got {started!r:.80}")
        self.started = {int(k): int(v) for k, v in started.items()}
