"""Keeping a torch optimizer in step with freeze changes.

Three traps live here: an optimizer built from the trainable parameters only
never sees a parameter unfrozen later; a frozen parameter with a stale
(zero) ``.grad`` is still moved by weight decay and momentum; the state of a
frozen parameter holds memory for nothing. :class:`OptimizerSync` listens on
the freeze road and handles all three.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .core import Change
from .errors import OptimizerSyncError

__all__ = ["OptimizerSync", "optimizer_param_ids"]


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class OptimizerSync:
    """Follows freeze changes on behalf of one optimizer.

    Args:
        optimizer: the optimizer to keep in sync.
        release_state: drop a parameter's optimizer state when it is frozen.
        unfreeze_lr: learning rate of groups added for newly trainable
            parameters (default: the lr of group 0).
        on_missing: ``"add"`` a newly trainable parameter that no group holds
            as a new group, or ``"raise"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        release_state: bool = False,
        unfreeze_lr: float | None = None,
        on_missing: str = "add",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if on_missing not in ("add", "raise"):
            raise ValueError(f"on_missing={on_missing!r} must be 'add' or 'raise'")
        self.optimizer = optimizer
        self.release_state = release_state
        self.unfreeze_lr = unfreeze_lr
        self.on_missing = on_missing
        #: groups this object added: (canonical names, lr) in order, for checkpoints
        self.added: list[tuple[list[str], float]] = []
        self._pre_hook = optimizer.register_step_pre_hook(self._drop_stale_grads)

    def remove(self) -> None:
        self._pre_hook.remove()

    @staticmethod
    def _drop_stale_grads(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A frozen parameter must reach step() with .grad None: every torch
        # optimizer skips it then, while a zero tensor still gets weight decay
        # and momentum (AdamW moves it).
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.requires_grad:
                    p.grad = None

    def base_lr(self, lr: float | None = None) -> float:
        if lr is not None:
            return float(lr)
        if self.unfreeze_lr is not None:
            return float(self.unfreeze_lr)
        group0 = self.optimizer.param_groups[0]
        return float(group0.get("initial_lr", group0["lr"]))

    def missing(self, names: Sequence[str], params: Sequence[nn.Parameter]) -> list[str]:
        held = optimizer_param_ids(self.optimizer)
        return [n for n, p in zip(names, params, strict=True) if id(p) not in held]

    def validate(self, change: Change) -> None:
        if self.on_missing == "raise":
            absent = self.missing(change.unfreeze, change.params(change.unfreeze))
            if absent:
                raise OptimizerSyncError(
                    f"unfreezing {', '.join(absent[:6])}{' ...' if len(absent) > 6 else ''}: "
                    f"{len(absent)} parameter(s) belong to no param group of the optimizer, so they "
                    "would never train. Build the optimizer from model.parameters(), or create the "
                    "Freezer with on_missing='add' to add them as a new group"
                )
        lr = change.options.get("lr")
        if lr is not None and not isinstance(lr, dict):
            float(lr)

    def apply(self, change: Change) -> None:
        if self.release_state:
            for p in change.params(change.freeze):
                self.optimizer.state.pop(p, None)
        absent = self.missing(change.unfreeze, change.params(change.unfreeze))
        if absent:
            self.add_groups(change, absent)

    def add_groups(self, change: Change, names: Iterable[str]) -> None:
        """Add ``names`` as new param group(s), one per distinct lr."""
        lr_opt = change.options.get("lr")
        by_lr: dict[float, list[str]] = {}
        for name in names:
            lr = lr_opt.get(name) if isinstance(lr_opt, dict) else lr_opt
            by_lr.setdefault(self.base_lr(lr), []).append(name)
        for lr, group_names in by_lr.items():
            self.add_group(group_names, [change.index.by_canonical[n] for n in group_names], lr)

    def move_to_group(self, names: list[str], params: list[nn.Parameter], source: int, lr: float) -> None:
        """Move ``params`` out of param group ``source`` into a new group at ``lr``.

        The new group keeps every other option of ``source`` (weight decay,
        betas, ...); the optimizer state of the parameters is keyed by the
        parameters themselves and stays. ``source`` keeps its place, even if
        it ends up empty, so that LR schedulers' per-group entries still fit.
        """
        groups = self.optimizer.param_groups
        moving = {id(p) for p in params}
        src = groups[source]
        src["params"] = [p for p in src["params"] if id(p) not in moving]
        group: dict[str, Any] = {k: v for k, v in src.items() if k not in ("params", "lr", "initial_lr")}
        group.update(params=list(params), lr=lr, initial_lr=lr)
        self.optimizer.add_param_group(group)
        self.added.append((list(names), lr))

    def add_group(self, names: list[str], params: list[nn.Parameter], lr: float) -> None:
        # LR schedulers read initial_lr when they are built (or resumed) on an
        # optimizer; a group without it makes them refuse the optimizer.
        group: dict[str, Any] = {"params": params, "lr": lr, "initial_lr": lr}
        self.optimizer.add_param_group(group)
        self.added.append((list(names), lr))
