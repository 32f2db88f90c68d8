"""The Freezer: an assembler of the parties that follow freeze changes.

Each party is a listener on the freeze road (:func:`layerfreeze.subscribe`)
or on the optimizer's step hooks, owns its policy and its part of the
checkpoint, is held weakly by what it listens to and can be detached:

* :class:`~layerfreeze.optim.OptimizerSync`: param groups, stale grads,
  optimizer state, LR schedulers made before the Freezer;
* :class:`~layerfreeze.guard.GuardListener`: fingerprints of the frozen
  parameters, checked after optimizer steps;
* :class:`~layerfreeze.distributed.DistributedSync`: DDP's reducer and the
  cross-rank agreement, for a DDP or FSDP2 model;
* :class:`~layerfreeze.rules.AdaptiveStats`: the adaptive rules' gradient norms;
* :class:`~layerfreeze.skip.SkipParty`: with ``cache=``, skips the forward of
  the frozen prefix (see :mod:`layerfreeze.skip`).

The Freezer builds them, maps :meth:`Freezer.set_epoch` / :meth:`Freezer.set_step`
to the schedule's plan and the plan to :func:`layerfreeze.apply_change`, and
assembles :meth:`Freezer.state_dict` from the parts. Dropping the Freezer (or
:meth:`Freezer.close`) detaches every party.
"""

from __future__ import annotations

import weakref
from typing import Any, cast

import torch
from torch import nn

from .core import Change, Mode, Transition, apply_change, subscribe
from .errors import ArgumentError, ArgumentTypeError, StateDictError
from .guard import Guard, GuardListener
from .holds import check_mode, holds_for, kept_in_eval, releases_for
from .hooks import ModelHook
from .lrsched import check_lr, check_scheduler, scheduled_by_unknown, unwrap_optimizer, unwrap_scheduler
from .optim import OptimizerSync
from .rules import AdaptiveFreezeRule, AdaptiveStats, PlateauUnfreezeRule, as_int, as_number
from .schedule import Schedule
from .selectors import ModelIndex, resolve, unwrap
from .skip import SkipParty, SkipStats, skip_config
from .warmup import Warmup, WarmupParty

__all__ = ["Freezer"]

_STATE_VERSION = 1


class _Clock:
    """Optimizer steps taken since the Freezer was made; shared by its parties."""

    __slots__ = ("count", "__weakref__")

    def __init__(self) -> None:
        self.count = 0

    def tick(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.count += 1


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
            tell whether a frozen parameter moved since. The comparison stays
            on the parameters' device; on a GPU its verdict is read every 50
            checks, at every freeze change, :meth:`set_epoch`, :meth:`check`
            and checkpoint, and as soon as it reaches the host without a wait
            (see :mod:`layerfreeze.guard`), naming the step after which the
            change was first seen.
        release_state: drop the optimizer state of frozen parameters (frees
            memory; unfreezing then starts momentum afresh).
        unfreeze_lr: the base lr of unfrozen parameters (default: group 0's):
            parameters that a param group holds at another lr are moved into
            a group of their own at this lr (keeping their optimizer state and
            the other options of their group), those no group holds are
            added at it. A finite number >= 0.
        on_missing: ``"add"`` (default) or ``"raise"`` when an unfrozen
            parameter belongs to no param group.
        lr_scheduler: a torch LR scheduler of ``optimizer`` made *before*
            the Freezer, or a list of them: their per-group bookkeeping is
            extended whenever the Freezer adds a param group. A scheduler made
            after the Freezer needs nothing.
        cache: skip the forward of the frozen prefix: while the bottom groups
            of the schedule's rules are frozen in eval mode (embeddings, stems
            and everything else the forward runs before the first trainable
            group frozen too), the model starts from each sample's stored
            output of the highest frozen group, or of the outermost module
            around it that is frozen through and through (a ``BertModel`` once
            every layer is; see :mod:`layerfreeze.skip` and :meth:`skip_stats`).
            Under ``torch.compile`` the skipping runs eagerly, outside the
            compiled graphs. The store choices of
            :func:`layerfreeze.cache`: ``True`` or ``"memory"``, or a dict of
            its keyword arguments (``{"store": "disk", "path": ...}``,
            ``max_bytes``, ``padding``, ``pad_value``, ``key``, ``dtype``).
            With ``key="name"`` the ids are taken out of the model's call.
            In a padded batch the boundary's output is zero at padded
            positions (as with :func:`layerfreeze.cache`): outputs at real
            positions are the full forward's. Default None: off.

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
        warmup: Warmup | None = None,
        cache: Any = None,
    ) -> None:
        self._wrapper = model
        self.module = unwrap(model)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ArgumentTypeError(
                f"schedule must be a layerfreeze Schedule, got {type(schedule).__name__}; build one with "
                "lf.Schedule() or lf.Schedule.from_dict(config)"
            )
        every = 0 if guard is False or guard is None else 1 if guard is True else as_int(guard)
        if every is None or every < 0 or (every == 0 and guard not in (False, None)):
            raise ArgumentError(
                f"guard must be True, False or a positive step interval, got {guard!r}; "
                "guard=N checks after every N-th optimizer step"
            )
        if unfreeze_lr is not None:
            unfreeze_lr = check_lr("unfreeze_lr", unfreeze_lr)
        skip = skip_config(cache)
        if skip is not None and (schedule is None or not schedule.rules):
            raise ArgumentError(
                "cache= skips the frozen bottom groups of the schedule's rules, and there is no schedule; "
                "pass schedule=lf.Schedule().progressive_freeze(...) (or another rule with groups)"
            )
        self._guard_every = every
        self.schedule = schedule
        index = ModelIndex(self.module)
        if schedule is not None:
            schedule.validate(index)
        self.optimizer = optimizer
        # hooks and param groups live on the torch optimizer inside a wrapper
        # such as accelerate's AcceleratedOptimizer
        inner = unwrap_optimizer(optimizer) if optimizer is not None else None
        schedulers = lr_scheduler if isinstance(lr_scheduler, (list, tuple)) else [lr_scheduler]
        found = [unwrap_scheduler(s) for s in schedulers if s is not None]
        for s in found:
            check_scheduler(s, inner)
        if inner is None and schedule is not None and any(isinstance(r, AdaptiveFreezeRule) for r in schedule.rules):
            raise ArgumentError(
                "an adaptive_freeze rule needs the optimizer: its gradient norms are read at each step; "
                "pass optimizer= to the Freezer"
            )
        if warmup is not None and not isinstance(warmup, Warmup):
            raise ArgumentTypeError(f"warmup must be a layerfreeze Warmup, got {type(warmup).__name__}")
        if warmup is not None and inner is None:
            raise ArgumentError("warmup= ramps an optimizer's lr: pass optimizer= too")
        self._clock = _Clock()
        self.sync = (
            OptimizerSync(
                inner, release_state=release_state, unfreeze_lr=unfreeze_lr, on_missing=on_missing,
                lr_schedulers=found,
            )
            if inner is not None
            else None
        )
        if self.sync is not None:
            self.sync.own_groups = warmup is not None
        if self.sync is not None and schedule is not None:
            if scheduled_by_unknown(self.sync.optimizer, found) and self.sync.would_regroup(
                index, schedule.trainable_scales(index), add_missing=on_missing == "add"
            ):
                raise ArgumentError(
                    "the optimizer is scheduled by an LR scheduler made before the Freezer and not "
                    "passed to it; the param groups this schedule needs would break that scheduler. "
                    "Pass it as Freezer(..., lr_scheduler=scheduler), or build the scheduler after the Freezer"
                )
            self.sync.register(index, schedule.trainable_scales(index), add_missing=on_missing == "add")
        #: transitions made outside set_epoch/set_step (adaptive freezes after
        #: an optimizer step); the next set_epoch/set_step returns them too
        self._pending: list[Transition] = []
        #: the best weights of each ``restore_best`` metric rule, by rule id
        self._best: dict[int, dict[str, torch.Tensor]] = {}
        self.epoch: int | None = None
        self.step: int | None = None
        if inner is not None:
            # the clock ticks first, so that every party sees this step's number
            tick = inner.register_step_post_hook(self._clock.tick)
            weakref.finalize(self, tick.remove)
            self._tick = tick
        #: fingerprints of the frozen parameters, taken when they were frozen;
        #: verified after optimizer steps only when ``guard`` asks for it
        self.guard = Guard(self.module)
        self._guard_party = GuardListener(self.guard, inner, every=every, clock=self._clock)
        # made after the guard's party: its post-hook runs after the guard's check
        adaptive = (
            AdaptiveStats(schedule, index, inner, clock=self._clock, on_grow=weakref.WeakMethod(self._adaptive_grew))
            if schedule is not None
            else None
        )
        #: the adaptive rules' statistics party (None without adaptive rules)
        self.adaptive = adaptive if adaptive else None
        #: the DDP / FSDP2 party, when the model is distributed
        self.distributed: Any = None
        #: the lr warm-up party (None without ``warmup=``)
        self.warmup: WarmupParty | None = None
        if warmup is not None:
            me = weakref.ref(self)
            clock = self._clock

            def now() -> int | None:
                if warmup.steps is not None:
                    return clock.count
                freezer = me()
                return freezer.epoch if freezer is not None else None

            self.warmup = WarmupParty(warmup, cast(torch.optim.Optimizer, inner), now)
        #: the party that skips the frozen prefix's forward (None without ``cache=``)
        self.skip: SkipParty | None = SkipParty(self.module, schedule, skip) if skip is not None else None
        self._subscriptions = [
            subscribe(self.module, party, weak=True)
            for party in (self.sync, self._guard_party, self.warmup, self.skip)
            if party is not None
        ]
        # a model.load_state_dict() is a deliberate change: its values become
        # the frozen reference
        guard_ref = weakref.ref(self.guard)

        def loaded(module: nn.Module, incompatible: Any) -> None:
            guard = guard_ref()
            if guard is not None:
                guard.refresh()

        self._load_hook = self.module.register_load_state_dict_post_hook(ModelHook(loaded))
        weakref.finalize(self, self._load_hook.remove)
        # DDP must learn each new trainable set and ranks must agree on it;
        # nothing is attached for a model that is not distributed.
        self.attach_distributed(model)

    # ------------------------------------------------------------------ parties

    @property
    def model(self) -> nn.Module:
        """The object to train with (the wrapper passed in, if any)."""
        return self._wrapper

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps seen since the Freezer was made (or restored)."""
        return self._clock.count

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        self._clock.count = int(value)

    @property
    def lr_schedulers(self) -> list[Any]:
        """LR schedulers made before the Freezer, repaired when groups are added."""
        return self.sync.lr_schedulers if self.sync is not None else []

    def add_lr_scheduler(self, scheduler: Any) -> None:
        """Repair ``scheduler`` too whenever a param group is added, like one
        passed as ``lr_scheduler=`` (for a scheduler made after the Freezer,
        before a transition that adds a group no rule foresaw).

        Raises:
            ArgumentTypeError: not a torch LR scheduler.
            ArgumentError: it schedules another optimizer, or the Freezer has none.
        """
        found = unwrap_scheduler(scheduler)
        sync = self.sync
        if sync is None:
            raise ArgumentError("add_lr_scheduler needs the optimizer it schedules: make the Freezer with optimizer=")
        check_scheduler(found, sync.optimizer)
        if found not in sync.lr_schedulers:
            sync.lr_schedulers.append(found)

    @property
    def _distributed(self) -> Any:
        return self.distributed

    def attach_distributed(self, model: nn.Module, *, group: Any = None, ranks_only: bool = False) -> Any:
        """Keep DDP / FSDP2 in step with freeze changes of this Freezer's model.

        The Freezer calls this itself for the model it is given; a trainer
        that wraps the model in DDP later (Lightning's strategy, the HF
        Trainer) calls it with the wrapper. A party attached before is
        replaced.

        Args:
            model: the DDP wrapper (also under ``torch.compile``) or an
                FSDP2-sharded model; anything else attaches nothing.
            group: the process group to check across (default: DDP's, else the world).
            ranks_only: attach also when ``model`` is not distributed, to
                check that ranks agree on every change (for a trainer whose
                DDP wrapper is out of reach).

        Returns:
            The :class:`~layerfreeze.distributed.DistributedSync`, or None.
        """
        from .distributed import DistributedSync, find_ddp, is_fsdp2

        ddp = find_ddp(model)
        if ddp is None and not is_fsdp2(model) and not ranks_only:
            return None
        if self.distributed is not None:
            self._detach(self.distributed)
        sync = DistributedSync(ddp if ddp is not None else model, root=self.module, group=group)
        self.distributed = sync
        self._subscriptions.append(subscribe(self.module, sync, weak=True))
        return sync

    def _detach(self, party: Any) -> None:
        for sub in list(self._subscriptions):
            if sub._ref() is party:
                sub.remove()
                self._subscriptions.remove(sub)

    def validate(self, change: Change) -> None:
        """Run every party's validation of ``change`` (the road does this itself)."""
        for party in (self.sync, self._guard_party, self.warmup, self.distributed, self.skip):
            if party is not None:
                party.validate(change)

    def apply(self, change: Change) -> None:
        """Have every party follow ``change`` (the road does this itself)."""
        for party in (self.sync, self._guard_party, self.warmup, self.distributed, self.skip):
            if party is not None:
                party.apply(change)

    def close(self) -> None:
        """Detach every party from the model and the optimizer (hooks removed).

        Dropping the Freezer does the same once it is garbage collected.
        """
        try:
            if self._subscriptions:
                self.guard.verdict()  # a change recorded on a GPU and not read yet
        finally:
            for sub in self._subscriptions:
                sub.remove()
            self._subscriptions.clear()
            for party in (self.sync, self._guard_party, self.adaptive, self.warmup, self.skip):
                if party is not None:
                    party.close()
            for name in ("_tick", "_load_hook"):
                handle = getattr(self, name, None)
                if handle is not None:
                    handle.remove()

    # ------------------------------------------------------------------ direct calls

    def freeze(self, *selectors: object, exclude: object = (), mode: Mode = "norm") -> list[str]:
        """Freeze like :func:`layerfreeze.freeze`, keeping the optimizer in step.

        Returns:
            Canonical names of the selected parameters.
        """
        check_mode(mode)
        index = ModelIndex(self.module)
        res = resolve(index, selectors, exclude)
        apply_change(self.module, freeze=res.params, hold=holds_for(index, res.modules, mode), index=index)
        return res.params

    def unfreeze(
        self, *selectors: object, exclude: object = (), lr: float | None = None
    ) -> list[str]:
        """Unfreeze like :func:`layerfreeze.unfreeze`; a parameter no param group
        holds is added to the optimizer in a new group at ``lr`` (else
        ``unfreeze_lr``, else group 0's lr). With ``lr`` (or ``unfreeze_lr``)
        a parameter that a group holds at another base lr moves into a group
        of its own at it, keeping its optimizer state and its group's other
        options; LR schedulers then scale that base like the original groups.

        Returns:
            Canonical names of the selected parameters.

        Raises:
            ArgumentError: ``lr`` is negative, infinite or NaN, or the change
                would add a group to an optimizer that an LR scheduler unknown
                to the Freezer schedules (pass it as ``lr_scheduler=`` or to
                :meth:`add_lr_scheduler`). Nothing is changed then.
        """
        if lr is not None:
            lr = check_lr("lr", lr)
        index = ModelIndex(self.module)
        res = resolve(index, selectors, exclude)
        apply_change(
            self.module,
            unfreeze=res.params,
            release=releases_for(index, res),
            index=index,
            options={"lr": lr},
        )
        return res.params

    # ------------------------------------------------------------------ schedule

    def set_epoch(self, epoch: int) -> list[Transition]:
        """Apply the schedule at ``epoch`` (an int, numpy integers too); returns
        the transitions made (and any adaptive freezes made after optimizer
        steps since the last call). Reads the guard's verdict."""
        self.epoch = _check_time("epoch", epoch)
        self.guard.verdict()
        return self._take_pending() + self._apply_schedule()

    def set_step(self, step: int) -> list[Transition]:
        """Apply the schedule at ``step``; returns the transitions made (and
        any adaptive freezes made after optimizer steps since the last call)."""
        self.step = _check_time("step", step)
        return self._take_pending() + self._apply_schedule()

    def _take_pending(self) -> list[Transition]:
        pending, self._pending = self._pending, []
        return pending

    def _adaptive_grew(self) -> None:
        self._pending.extend(self._apply_schedule())

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

    # ------------------------------------------------------------------ metrics

    def report(self, **metrics: Any) -> list[Transition]:
        """Hand evaluation metrics to the schedule's metric-driven rules
        (:class:`~layerfreeze.rules.PlateauUnfreezeRule`); a rule whose
        ``monitor`` is among them counts one evaluation, and the transitions
        it triggers are made now (after loading the best weights, with
        ``restore_best``).

        Args:
            **metrics: name -> value (a number or a one-element tensor).

        Returns:
            The transitions made.

        Raises:
            ArgumentError: a monitored value is not a number.
        """
        rules = [r for r in (self.schedule.rules if self.schedule is not None else [])
                 if isinstance(r, PlateauUnfreezeRule) and r.monitor in metrics]
        values = {}
        for rule in rules:
            raw = metrics[rule.monitor]
            value = as_number(raw.item() if isinstance(raw, torch.Tensor) and raw.numel() == 1 else raw)
            if value is None:
                raise ArgumentError(f"report({rule.monitor}=...) must be a number, got {raw!r}")
            values[id(rule)] = value
        grew = False
        for rule in rules:
            if rule.update(values[id(rule)]):
                grew = True
                best = self._best.get(id(rule)) if rule.restore_best else None
                if best is not None:
                    self.module.load_state_dict(best)
            elif rule.improved and rule.restore_best:
                self._best[id(rule)] = {k: v.detach().to("cpu", copy=True)
                                        for k, v in self.module.state_dict().items()}
        return self._take_pending() + (self._apply_schedule() if grew else [])

    # ------------------------------------------------------------------ skipping

    def skip_stats(self) -> SkipStats:
        """What ``cache=`` does now: the boundary, whether forwards skip the
        frozen prefix and why not, hits, misses and bytes held.

        Returns:
            A :class:`~layerfreeze.SkipStats`.

        Raises:
            ArgumentError: the Freezer was made without ``cache=``.

        Example:
            >>> import torch, torch.nn as nn, layerfreeze as lf
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
            >>> fz = lf.Freezer(net, schedule=lf.Schedule().freeze("[0]", mode="eval"), cache=True)
            >>> fz.skip_stats().reason
            'the order of the modules is learnt on the first forward'
        """
        if self.skip is None:
            raise ArgumentError("skip_stats() needs a Freezer made with cache=True (or another store)")
        return self.skip.stats()

    # ------------------------------------------------------------------ guard

    def check(self) -> None:
        """Verify now that no frozen parameter changed since it was frozen (or
        since the last check), also when the Freezer was made with
        ``guard=False``.

        Raises:
            FrozenParameterChanged: naming the parameters that moved.
        """
        self.guard.check(step=self.optimizer_steps if self.optimizer is not None else None)

    def refresh(self) -> None:
        """Accept the current values of frozen parameters (after a deliberate edit).

        Feature caches inside the model (:func:`layerfreeze.cache`) are told
        too: each compares its weights with what its features were computed
        from and drops them if they differ, so a hit never serves features of
        the values before the edit.
        """
        self.guard.refresh()
        if self.skip is not None:
            self.skip.verify()
        from .feature_cache.api import is_cached

        for m in self.module.modules():
            if is_cached(m):
                m.verify_cache()  # type: ignore[operator]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Freeze state by parameter name: the frozen set, eval holds, the
        position in the schedule and each party's part (the param groups the
        optimizer party added, the adaptive rules' statistics)."""
        self.guard.verdict()
        index = ModelIndex(self.module)
        return {
            "version": _STATE_VERSION,
            "frozen": [n for n, p in index.by_canonical.items() if not p.requires_grad],
            "holds": kept_in_eval(self.module),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "added_groups": self.sync.state_dict()["added_groups"] if self.sync is not None else [],
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "grad_norms": self.adaptive.state_dict() if self.adaptive is not None else {},
            "warmup": self.warmup.state_dict() if self.warmup is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Load the Freezer *before* ``optimizer.load_state_dict``: it re-adds the
        param groups it had added, so that the optimizer's saved groups match.

        Raises:
            StateDictError: the state names parameters or modules this model
                does not have, was saved from another schedule, or is not a
                layerfreeze Freezer state. Nothing is changed then.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise StateDictError(
                "not a layerfreeze Freezer state dict (missing or unknown 'version'); pass what "
                "Freezer.state_dict() returned"
            )
        index = ModelIndex(self.module)
        names = set(state.get("frozen", []))
        if self.sync is not None:
            names.update(self.sync.check_state_dict(state, index))
        else:
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
        for key in ("epoch", "step"):
            if state.get(key) is not None and as_int(state[key]) is None:
                raise StateDictError(f"{key!r} must be an int or None, got {state[key]!r}. Nothing was changed")
        if self.schedule is not None and state.get("schedule") is not None:
            try:
                self.schedule.check_state_dict(state["schedule"])
            except StateDictError as exc:
                raise StateDictError(f"{exc}. Nothing was changed") from None
        frozen = set(state.get("frozen", []))
        holds = state.get("holds", {})
        release = [m for m in index.modules if m not in holds]
        if self.sync is not None:
            self.sync.load_state_dict(state, index)
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
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state.get("grad_norms") or {})
        if self.warmup is not None:
            self.warmup.load_state_dict(state.get("warmup") or {})
        self.guard.refresh()


def _check_time(name: str, value: object) -> int:
    out = as_int(value)
    if out is None:
        raise ArgumentTypeError(
            f"{name} must be an int (numpy integers too), got {value!r} ({type(value).__name__})"
        )
    return out
