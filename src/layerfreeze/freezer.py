"""The Freezer: freeze changes during training, with the optimizer, the guard
and a schedule kept in step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .core import Change, Mode, Transition, _check_mode, _holds_for, _releases_for, apply_change, subscribe
from .errors import StateDictError
from .guard import Guard
from .lrsched import check_scheduler, extend_schedulers, unwrap_optimizer, unwrap_scheduler
from .optim import OptimizerSync
from .rules import AdaptiveFreezeRule, GradNormCollector
from .schedule import Schedule
from .selectors import ModelIndex, resolve, unwrap

__all__ = ["Freezer"]

_STATE_VERSION = 1


class Freezer:
    """Freeze and unfreeze mid-training without the silent traps.

    Args:
        model: the model to manage (a DDP or compiled wrapper is looked
            through; selectors use the inner model's names).
        optimizer: kept in sync: a parameter unfrozen while no param group
            holds it is added as a new group; frozen parameters reach
            ``step()`` with ``.grad`` None so no optimizer moves them.
        schedule: applied by :meth:`set_epoch` / :meth:`set_step`.
        guard: after every ``optimizer.step()``, verify that frozen parameters
            did not change (an int ``n``: every ``n`` steps; ``False``: no
            check after steps). Fingerprints are taken whenever parameters
            are frozen, whatever ``guard`` says, so :meth:`check` can always
            tell whether a frozen parameter moved since.
        release_state: drop the optimizer state of frozen parameters (frees
            memory; unfreezing then starts momentum afresh).
        unfreeze_lr: lr of groups added for unfrozen parameters (default: the
            lr of group 0).
        on_missing: ``"add"`` (default) or ``"raise"`` when an unfrozen
            parameter belongs to no param group.
        lr_scheduler: a torch LR scheduler of ``optimizer`` made *before*
            the Freezer, or a list of them: their per-group bookkeeping is
            extended whenever the Freezer adds a param group. A scheduler made
            after the Freezer needs nothing.

    ``optimizer`` may be a wrapper that exposes the wrapped optimizer's own
    ``param_groups`` as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``),
    and a scheduler may be built on such a wrapper or be one itself
    (``AcceleratedScheduler``): the Freezer works on the torch objects inside.

    With a schedule and an optimizer, every parameter the schedule may ever
    make trainable that no param group holds is added to the optimizer when
    the Freezer is made, at its final lr (``lr_decay`` included): frozen ones
    reach ``step()`` with ``.grad`` None and every torch optimizer skips them,
    so LR schedulers and checkpoints see the same param groups from the start
    (see :mod:`layerfreeze.lrsched` for why). A parameter that a rule trains
    at a scaled lr (``lr_decay``) and that a param group already holds at
    another lr is moved, then, into a new group at its lr that keeps the other
    options of the group it came from; make the Freezer before
    ``optimizer.load_state_dict`` so that a resumed optimizer has the same
    groups.

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
        >>> opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        >>> fz = lf.Freezer(net, opt, lf.Schedule().freeze("[0]", until_epoch=2))
        >>> [str(t) for t in fz.set_epoch(0)]
        ['epoch 0: froze 12 params (0.weight, 0.bias); trainable now 4']
        >>> [t.action for t in fz.set_epoch(2)]
        ['unfreeze']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: Schedule | None = None,
        *,
        guard: bool | int = True,
        release_state: bool = False,
        unfreeze_lr: float | None = None,
        on_missing: str = "add",
        lr_scheduler: Any = None,
    ) -> None:
        self._wrapper = model
        self.module = unwrap(model)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a layerfreeze Schedule, got {type(schedule).__name__}")
        if isinstance(guard, bool) or guard is None:
            self._guard_every = 1 if guard else 0
        elif isinstance(guard, int) and guard > 0:
            self._guard_every = guard
        else:
            raise ValueError(f"guard must be True, False or a positive step interval, got {guard!r}")
        self.schedule = schedule
        if schedule is not None:
            schedule.validate(self.module)
        self.optimizer = optimizer
        # hooks and param groups live on the torch optimizer inside a wrapper
        # such as accelerate's AcceleratedOptimizer
        inner = unwrap_optimizer(optimizer) if optimizer is not None else None
        schedulers = lr_scheduler if isinstance(lr_scheduler, (list, tuple)) else [lr_scheduler]
        #: LR schedulers made before the Freezer, repaired when groups are added
        self.lr_schedulers: list[Any] = [unwrap_scheduler(s) for s in schedulers if s is not None]
        for s in self.lr_schedulers:
            check_scheduler(s, inner)
        self.sync = (
            OptimizerSync(inner, release_state=release_state, unfreeze_lr=unfreeze_lr, on_missing=on_missing)
            if inner is not None
            else None
        )
        if self.sync is not None and schedule is not None:
            self._register_upfront(add_missing=on_missing == "add")
        #: transitions made outside set_epoch/set_step (adaptive freezes after
        #: an optimizer step); the next set_epoch/set_step returns them too
        self._pending: list[Transition] = []
        self._collectors: list[tuple[int, GradNormCollector]] = []
        if schedule is not None:
            index = ModelIndex(self.module)
            for i, rule in enumerate(schedule.rules):
                if isinstance(rule, AdaptiveFreezeRule):
                    groups = rule.groups(index, origin=schedule.origin(i))
                    params = [[index.by_canonical[n] for n in res.params] for _, res in groups]
                    self._collectors.append((i, GradNormCollector(rule, params)))
        self.epoch: int | None = None
        self.step: int | None = None
        #: optimizer steps seen since the Freezer was made
        self.optimizer_steps = 0
        #: fingerprints of the frozen parameters, taken when they were frozen;
        #: verified after optimizer steps only when ``guard`` asks for it
        self.guard = Guard(self.module)
        self._handles: list[Any] = []
        if inner is not None:
            self._handles.append(inner.register_step_post_hook(self._after_step))
            if self._collectors:
                # runs after OptimizerSync's pre-hook, so frozen grads are gone
                self._handles.append(inner.register_step_pre_hook(self._collect_norms))
        elif self._collectors:
            raise ValueError("an adaptive_freeze rule needs the optimizer: its gradient norms are read at each step")
        self._subscription = subscribe(self.module, self)
        # DDP must learn each new trainable set and ranks must agree on it;
        # nothing is attached for a model that is not distributed.
        from .distributed import attach

        self._distributed = attach(model, root=self.module)

    # ------------------------------------------------------------------ the road

    @property
    def model(self) -> nn.Module:
        """The object to train with (the wrapper passed in, if any)."""
        return self._wrapper

    def validate(self, change: Change) -> None:
        if self.sync is not None:
            self.sync.validate(change)

    def apply(self, change: Change) -> None:
        if self.sync is not None:
            before = len(self.sync.optimizer.param_groups)
            self.sync.apply(change)
            extend_schedulers(self.lr_schedulers, before)
        self.guard.track()

    def close(self) -> None:
        """Detach from the model and optimizer (hooks removed)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.sync is not None:
            self.sync.remove()
        self._subscription.remove()
        if self._distributed is not None:
            self._distributed.remove()

    # ------------------------------------------------------------------ direct calls

    def freeze(self, *selectors: object, exclude: object = (), mode: Mode = "norm") -> list[str]:
        """Freeze like :func:`layerfreeze.freeze`, keeping the optimizer in step.

        Returns:
            Canonical names of the selected parameters.
        """
        _check_mode(mode)
        index = ModelIndex(self.module)
        res = resolve(index, selectors, exclude)
        apply_change(self.module, freeze=res.params, hold=_holds_for(index, res.modules, mode), index=index)
        return res.params

    def unfreeze(
        self, *selectors: object, exclude: object = (), lr: float | None = None
    ) -> list[str]:
        """Unfreeze like :func:`layerfreeze.unfreeze`; a parameter no param group
        holds is added to the optimizer in a new group at ``lr`` (else
        ``unfreeze_lr``, else group 0's lr).

        Returns:
            Canonical names of the selected parameters.
        """
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0):
            raise ValueError(f"lr must be a non-negative number, got {lr!r}")
        index = ModelIndex(self.module)
        res = resolve(index, selectors, exclude)
        apply_change(
            self.module,
            unfreeze=res.params,
            release=_releases_for(index, res),
            index=index,
            options={"lr": lr},
        )
        return res.params

    # ------------------------------------------------------------------ schedule

    def set_epoch(self, epoch: int) -> list[Transition]:
        """Apply the schedule at ``epoch``; returns the transitions made (and
        any adaptive freezes made after optimizer steps since the last call)."""
        self.epoch = _check_time("epoch", epoch)
        return self._take_pending() + self._apply_schedule()

    def set_step(self, step: int) -> list[Transition]:
        """Apply the schedule at ``step``; returns the transitions made (and
        any adaptive freezes made after optimizer steps since the last call)."""
        self.step = _check_time("step", step)
        return self._take_pending() + self._apply_schedule()

    def _take_pending(self) -> list[Transition]:
        pending, self._pending = self._pending, []
        return pending

    def _register_upfront(self, *, add_missing: bool) -> None:
        assert self.sync is not None and self.schedule is not None
        index = ModelIndex(self.module)
        scales = self.schedule.trainable_scales(index)
        base = self.sync.base_lr()
        before = len(self.sync.optimizer.param_groups)
        self._regroup_scaled(index, scales, base)
        names = self.sync.missing(list(scales), [index.by_canonical[n] for n in scales]) if add_missing else []
        by_lr: dict[float, list[str]] = {}
        for n in names:
            scale = scales[n]
            by_lr.setdefault(base if scale is None else base * scale, []).append(n)
        for lr, group in by_lr.items():
            self.sync.add_group(group, [index.by_canonical[n] for n in group], lr)
        extend_schedulers(self.lr_schedulers, before)

    def _regroup_scaled(self, index: ModelIndex, scales: dict[str, float | None], base: float) -> None:
        """Give parameters that a rule trains at a scaled lr (``lr_decay``) and
        that the optimizer already holds at another lr a group of their own.

        Without this, an optimizer built from ``model.parameters()`` would
        train every group at group 0's lr and ``lr_decay`` would do nothing.
        A parameter whose group already has the lr it needs stays, so making
        a second Freezer on the same optimizer moves nothing.
        """
        assert self.sync is not None
        groups = self.sync.optimizer.param_groups
        where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        moves: dict[tuple[int, float], list[str]] = {}
        for name, scale in scales.items():
            source = where.get(id(index.by_canonical[name]))
            if scale is None or source is None:
                continue
            lr = base * scale
            group = groups[source]
            if math.isclose(float(group.get("initial_lr", group["lr"])), lr, rel_tol=1e-12, abs_tol=0.0):
                continue
            moves.setdefault((source, lr), []).append(name)
        for (source, lr), names in moves.items():
            self.sync.move_to_group(names, [index.by_canonical[n] for n in names], source, lr)

    def _apply_schedule(self) -> list[Transition]:
        if self.schedule is None:
            return []
        index = ModelIndex(self.module)
        plan = self.schedule.plan(index, self.epoch, self.step)
        to_freeze = [n for n, f in plan.state.items() if f]
        to_unfreeze = [n for n, f in plan.state.items() if not f]
        lrs: dict[str, float] | None = None
        if plan.lr_scale and self.sync is not None:
            base = self.sync.base_lr()
            lrs = {n: base * s for n, s in plan.lr_scale.items()}
        return apply_change(
            self.module,
            freeze=to_freeze,
            unfreeze=to_unfreeze,
            hold=plan.modes,
            release=plan.released,
            index=index,
            options={"epoch": self.epoch, "step": self.step, "lr": lrs},
        )

    # ------------------------------------------------------------------ guard

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1
        if self._guard_every and self.optimizer_steps % self._guard_every == 0:
            self.guard.observe(step=self.optimizer_steps)
        grew = False
        for _, collector in self._collectors:
            if self.optimizer_steps % collector.rule.check_every == 0:
                grew = collector.finish() or grew
        if grew:
            self._pending.extend(self._apply_schedule())

    def _collect_norms(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for _, collector in self._collectors:
            collector.collect()

    def check(self) -> None:
        """Verify now that no frozen parameter changed since it was frozen (or
        since the last check), also when the Freezer was made with
        ``guard=False``.

        Raises:
            FrozenParameterChanged: naming the parameters that moved.
        """
        self.guard.check()

    def refresh(self) -> None:
        """Accept the current values of frozen parameters (after a deliberate edit)."""
        self.guard.refresh()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Freeze state by parameter name: the frozen set, eval holds, the
        position in the schedule and the param groups this Freezer added."""
        from .core import kept_in_eval

        index = ModelIndex(self.module)
        return {
            "version": _STATE_VERSION,
            "frozen": [n for n, p in index.by_canonical.items() if not p.requires_grad],
            "holds": kept_in_eval(self.module),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "added_groups": [{"params": names, "lr": lr} for names, lr in (self.sync.added if self.sync else [])],
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "grad_norms": {i: c.state_dict() for i, c in self._collectors},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Load the Freezer *before* ``optimizer.load_state_dict``: it re-adds the
        param groups it had added, so that the optimizer's saved groups match.

        Raises:
            StateDictError: the state names parameters or modules this model
                does not have, or is not a layerfreeze Freezer state. Nothing is
                changed then.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise StateDictError("not a layerfreeze Freezer state dict (missing or unknown 'version')")
        index = ModelIndex(self.module)
        names = set(state.get("frozen", []))
        for g in state.get("added_groups", []):
            names.update(g["params"])
        unknown = sorted(n for n in names if n not in index.by_canonical)
        unknown += sorted(m for m in state.get("holds", {}) if m not in index.modules)
        if unknown:
            raise StateDictError(
                f"the state names {len(unknown)} parameter(s) or module(s) this model does not have "
                f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); was it saved from "
                "a different model? Nothing was changed"
            )
        if self.schedule is not None and state.get("schedule") is not None:
            try:
                self.schedule.check_state_dict(state["schedule"])
            except ValueError as exc:
                raise StateDictError(f"{exc}. Nothing was changed") from None
        frozen = set(state.get("frozen", []))
        holds = state.get("holds", {})
        release = [m for m in index.modules if m not in holds]
        if self.sync is not None:
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}  # type: ignore[union-attr]
            for g in state.get("added_groups", []):
                params = [index.by_canonical[n] for n in g["params"]]
                if not any(id(p) in held for p in params):
                    before = len(self.sync.optimizer.param_groups)
                    self.sync.add_group(list(g["params"]), params, float(g["lr"]))
                    extend_schedulers(self.lr_schedulers, before)
        apply_change(
            self.module,
            freeze=[n for n in index.by_canonical if n in frozen],
            unfreeze=[n for n in index.by_canonical if n not in frozen],
            hold=holds,
            release=release,
            index=index,
        )
        self.epoch = state.get("epoch")
        self.step = state.get("step")
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        norms = state.get("grad_norms") or {}
        for i, collector in self._collectors:
            if i in norms:
                collector.load_state_dict(norms[i])
        self.guard.refresh()


def _check_time(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value
