"""Keeping a torch optimizer in step with freeze changes.

Three traps live here: an optimizer built from the trainable parameters only
never sees a parameter unfrozen later; a frozen parameter with a stale
(zero) ``.grad`` is still moved by weight decay and momentum; the state of a
frozen parameter holds memory for nothing. :class:`OptimizerSync` listens on
the freeze road and handles all three.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .core import Change
from .errors import ArgumentError, ArgumentTypeError, OptimizerSyncError, StateDictError
from .lrsched import check_lr, extend_schedulers, scheduled_by_unknown
from .selectors import ModelIndex

__all__ = ["OptimizerSync", "optimizer_param_ids"]


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def group_base(group: dict[str, Any]) -> float:
    """A param group's base lr: OneCycleLR's peak, else ``initial_lr``, else ``lr``."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


class OptimizerSync:
    """Follows freeze changes on behalf of one optimizer, its LR schedulers and
    its param-group policy; a listener on the freeze road.

    Args:
        optimizer: the optimizer to keep in sync.
        release_state: drop a parameter's optimizer state when it is frozen.
        unfreeze_lr: learning rate of groups added for newly trainable
            parameters (default: the lr of group 0).
        on_missing: ``"add"`` a newly trainable parameter that no group holds
            as a new group, or ``"raise"``.
        lr_schedulers: torch LR schedulers of ``optimizer`` whose per-group
            bookkeeping is extended whenever a group is added.

    Its part of a checkpoint is the groups it added (:meth:`state_dict`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        release_state: bool = False,
        unfreeze_lr: float | None = None,
        on_missing: str = "add",
        lr_schedulers: Sequence[Any] = (),
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; pass the "
                "optimizer itself (or a wrapper exposing it as .optimizer)"
            )
        if on_missing not in ("add", "raise"):
            raise ArgumentError(f"on_missing={on_missing!r} must be 'add' or 'raise'")
        if unfreeze_lr is not None:
            unfreeze_lr = check_lr("unfreeze_lr", unfreeze_lr)
        self.optimizer = optimizer
        self.release_state = release_state
        self.unfreeze_lr = unfreeze_lr
        self.on_missing = on_missing
        self.lr_schedulers: list[Any] = list(lr_schedulers)
        #: give parameters a schedule unfreezes groups without other
        #: parameters (an lr warm-up ramps whole groups)
        self.own_groups = False
        self._lrs0 = [float(g["lr"]) for g in optimizer.param_groups]
        #: groups this object added: (canonical names, lr) in order, for checkpoints
        self.added: list[tuple[list[str], float]] = []
        self._pre_hook = optimizer.register_step_pre_hook(self._drop_stale_grads)
        weakref.finalize(self, self._pre_hook.remove)  # dropped: detached too

    def remove(self) -> None:
        """Detach from the optimizer (the stale-grad pre-hook goes)."""
        self._pre_hook.remove()

    close = remove

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
        return self.group_base(0)

    def group_base(self, i: int) -> float:
        """Param group ``i``'s base lr (see :func:`group_base`); a group with
        no ``initial_lr`` (ReduceLROnPlateau, no scheduler) has the lr it had
        when this party was made as its base."""
        group = self.optimizer.param_groups[i]
        if "max_lr" in group or "initial_lr" in group or i >= len(self._lrs0):
            return group_base(group)
        return self._lrs0[i]

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
            check_lr("lr", lr)
        elif isinstance(lr, dict):
            for name, value in lr.items():
                check_lr(f"lr[{name!r}]", value)
        if (self.missing(change.unfreeze, change.params(change.unfreeze)) or self._moves(change)) and \
                scheduled_by_unknown(self.optimizer, self.lr_schedulers):
            raise ArgumentError(
                "this change adds a param group to an optimizer that an LR scheduler unknown to the "
                "Freezer schedules; the scheduler would break (or ignore the group). Pass it as "
                "Freezer(..., lr_scheduler=scheduler) or to freezer.add_lr_scheduler(scheduler)"
            )

    def _asked_lr(self, change: Change, name: str) -> float | None:
        lr = change.options.get("lr")
        if isinstance(lr, dict):
            lr = lr.get(name)
        if lr is None:
            lr = self.unfreeze_lr
        return None if lr is None else float(lr)

    def _moves(self, change: Change) -> dict[tuple[int, float], list[str]]:
        """Unfrozen parameters a group holds at another lr than the one asked for."""
        groups = self.optimizer.param_groups
        where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        moves: dict[tuple[int, float], list[str]] = {}
        for name in change.unfreeze:
            lr = self._asked_lr(change, name)
            source = where.get(id(change.index.by_canonical[name]))
            if lr is None or source is None or math.isclose(self.group_base(source), lr, rel_tol=1e-12):
                continue
            moves.setdefault((source, lr), []).append(name)
        return moves

    def apply(self, change: Change) -> None:
        if self.release_state:
            for p in change.params(change.freeze):
                self.optimizer.state.pop(p, None)
        # an lr asked for is the group's base lr, also for parameters a group holds
        for (source, lr), names in self._moves(change).items():
            self.move_to_group(names, change.params(names), source, lr)
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
        for g in groups:
            if any(id(p) in moving for p in g["params"]):
                g["params"] = [p for p in g["params"] if id(p) not in moving]
        group: dict[str, Any] = {k: v for k, v in src.items() if k not in ("params", "lr", "initial_lr")}
        group.update(params=list(params), lr=lr, initial_lr=lr)
        before = len(groups)
        self.optimizer.add_param_group(group)
        self.added.append((list(names), lr))
        extend_schedulers(self.lr_schedulers, before, self.group_base(0))

    def add_group(self, names: list[str], params: list[nn.Parameter], lr: float) -> None:
        # LR schedulers read initial_lr when they are built (or resumed) on an
        # optimizer; a group without it makes them refuse the optimizer.
        before = len(self.optimizer.param_groups)
        group: dict[str, Any] = {"params": params, "lr": lr, "initial_lr": lr}
        self.optimizer.add_param_group(group)
        self.added.append((list(names), lr))
        extend_schedulers(self.lr_schedulers, before, self.group_base(0))

    # ------------------------------------------------------------------ the schedule's groups

    def register(self, index: ModelIndex, scales: dict[str, float | None], *, add_missing: bool) -> None:
        """Give every parameter a schedule may train its param group up front.

        Args:
            index: the model.
            scales: what :meth:`Schedule.trainable_scales` gives: name -> lr
                scale (None: the base lr).
            add_missing: add parameters no group holds, as groups per lr.
        """
        base = self.base_lr()
        self._regroup_scaled(index, scales, base)
        names = self.missing(list(scales), [index.by_canonical[n] for n in scales]) if add_missing else []
        by_lr: dict[float, list[str]] = {}
        for n in names:
            scale = scales[n]
            by_lr.setdefault(base if scale is None else base * scale, []).append(n)
        for lr, group in by_lr.items():
            self.add_group(group, [index.by_canonical[n] for n in group], lr)

    def would_regroup(self, index: ModelIndex, scales: dict[str, float | None], *, add_missing: bool) -> bool:
        """Whether :meth:`register` would add or move a param group."""
        if add_missing and self.missing(list(scales), [index.by_canonical[n] for n in scales]):
            return True
        return bool(self._scaled_moves(index, scales, self.base_lr()))

    def _regroup_scaled(self, index: ModelIndex, scales: dict[str, float | None], base: float) -> None:
        """Give parameters that a rule trains at a scaled lr (``lr_decay``) and
        that the optimizer already holds at another lr a group of their own.

        Without this, an optimizer built from ``model.parameters()`` would
        train every group at group 0's lr and ``lr_decay`` would do nothing.
        A parameter whose group already has the lr it needs stays, so making
        a second Freezer on the same optimizer moves nothing.
        """
        for (source, lr), names in self._scaled_moves(index, scales, base).items():
            self.move_to_group(names, [index.by_canonical[n] for n in names], source, lr)

    def _scaled_moves(
        self, index: ModelIndex, scales: dict[str, float | None], base: float
    ) -> dict[tuple[int, float], list[str]]:
        groups = self.optimizer.param_groups
        where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        scheduled = {id(index.by_canonical[n]) for n in scales}
        moves: dict[tuple[int, float], list[str]] = {}
        for name, scale in scales.items():
            source = where.get(id(index.by_canonical[name]))
            if source is None or (scale is None and self.unfreeze_lr is None and not self.own_groups):
                continue
            mixed = self.own_groups and any(id(q) not in scheduled for q in groups[source]["params"])
            lr = self.group_base(source) if scale is None and self.unfreeze_lr is None else \
                base * (1.0 if scale is None else scale)
            if math.isclose(self.group_base(source), lr, rel_tol=1e-12, abs_tol=0.0) and not mixed:
                continue
            moves.setdefault((source, lr), []).append(name)
        return moves

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This party's part of a checkpoint: the groups it added."""
        return {"added_groups": [{"params": names, "lr": lr} for names, lr in self.added]}

    def check_state_dict(self, state: dict[str, Any], index: ModelIndex) -> list[str]:
        """Names in ``state`` that ``index``'s model lacks.

        Raises:
            StateDictError: ``state`` is malformed.
        """
        groups = state.get("added_groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g and "lr" in g
                                                   for g in groups):
            raise StateDictError(f"'added_groups' must be a list of {{'params', 'lr'}} dicts, got {groups!r:.80}")
        return [n for g in groups for n in g["params"] if n not in index.by_canonical]

    def load_state_dict(self, state: dict[str, Any], index: ModelIndex) -> None:
        """Re-add the groups a checkpoint's optimizer had (before ``optimizer.load_state_dict``)."""
        for g in state.get("added_groups", []):
            params = [index.by_canonical[n] for n in g["params"]]
            groups = self.optimizer.param_groups
            where = {id(p): i for i, grp in enumerate(groups) for p in grp["params"]}
            sources = {where[id(p)] for p in params if id(p) in where}
            if not sources:
                self.add_group(list(g["params"]), params, float(g["lr"]))
                continue
            source = min(sources)
            same = {id(p) for p in groups[source]["params"]} == {id(p) for p in params}
            if len(sources) == 1 and same and math.isclose(self.group_base(source), float(g["lr"]), rel_tol=1e-12):
                continue  # the group exists already (made up front)
            self.move_to_group(list(g["params"]), params, source, float(g["lr"]))
