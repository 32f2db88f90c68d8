"""Freeze schedules: which selection is frozen at which epoch or step.

A :class:`Schedule` is an ordered list of rules. At a point in training
(epoch, step) each rule decides, for the parameters it governs, frozen or
trainable; a later rule overrides an earlier one where they overlap.
Parameters no rule governs keep whatever state they have.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import load_config, rules_from_dict
from .core import apply_change
from .errors import ArgumentError, ArgumentTypeError, StateDictError
from .holds import plan_holds
from .rules import RULES, Decision, FreezeRule, Rule, as_int
from .selectors import ModelIndex, Resolution

__all__ = ["Decision", "FreezeRule", "Plan", "Rule", "Schedule", "TimelineRow"]


@dataclass
class Plan:
    """The schedule's combined verdict: what the model should look like."""

    state: dict[str, bool]  # canonical name -> frozen
    modes: dict[str, str]  # module name -> eval hold mode, for held modules
    released: list[str]  # module names whose holds should go
    lr_scale: dict[str, float]  # canonical name -> lr multiplier

    def frozen(self) -> list[str]:
        return [n for n, f in self.state.items() if f]


def _signature(rule: Rule) -> str:
    def name(obj: object) -> str:
        return getattr(obj, "__qualname__", None) or type(obj).__name__

    return json.dumps(rule.to_dict(), sort_keys=True, default=name)


@dataclass(frozen=True)
class TimelineRow:
    """The plan at one epoch.

    Attributes:
        epoch: the epoch.
        frozen: labels of the schedule's groups that are wholly frozen.
        trainable: trainable scalar parameters in the whole model.
        lr: for each trainable group, ``base_lr`` times the group's lr
            scale; frozen groups are absent. With the default ``base_lr`` of
            1.0 these are relative factors (1.0, 0.7, 0.49 ...), not
            learning rates: pass ``lr=`` to :meth:`Schedule.timeline` for
            learning rates, or read :attr:`lr_scale`.
        base_lr: the base learning rate the ``lr`` values are relative to.
    """

    epoch: int
    frozen: list[str]
    trainable: int
    lr: dict[str, float] = field(default_factory=dict)
    base_lr: float = 1.0

    @property
    def lr_scale(self) -> dict[str, float]:
        """For each trainable group, its lr as a factor of the base lr."""
        return {k: v / self.base_lr for k, v in self.lr.items()}


class Schedule:
    """An ordered, chainable list of freeze rules.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> s = lf.Schedule().freeze("[0]", until_epoch=4)
        >>> s.frozen_at(net, epoch=3), s.frozen_at(net, epoch=4)
        (['0.weight', '0.bias'], [])
    """

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules: list[Rule] = list(rules)

    def __repr__(self) -> str:
        return f"Schedule({self.to_dict()['rules']!r})"

    def __getattr__(self, kind: str) -> Callable[..., Schedule]:
        # one builder method per rule kind (freeze, gradual_unfreeze,
        # progressive_freeze, adaptive_freeze, ...), made from each rule's
        # spec: those known at import are set below, a rule registered later
        # (layerfreeze.rules.register_rule) is found here
        cls = RULES.get(kind)
        if cls is None or kind.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {kind!r}")
        return _builder(cls).__get__(self, type(self))

    def add(self, rule: Rule) -> Schedule:
        """Append a rule; returns the schedule for chaining."""
        if not isinstance(rule, Rule):
            raise ArgumentTypeError(
                f"expected a layerfreeze Rule, got {type(rule).__name__}; build one with "
                "Schedule().freeze(...) and friends or a class from layerfreeze.rules"
            )
        self.rules.append(rule)
        return self

    # ------------------------------------------------------------------ config

    @classmethod
    def from_dict(cls, config: object) -> Schedule:
        """Build a schedule from a dict shaped like the method calls.

        ``{"rules": [{"gradual_unfreeze": "encoder.layer", "start_epoch": 2}]}``:
        in each rule, the key naming the kind holds the selector or groups, the
        other keys are its keyword arguments.

        Raises:
            ScheduleError: an unknown key or kind, a wrong type or value; the
                message names the rule (index and kind) and the key.

        Example:
            >>> import layerfreeze as lf
            >>> lf.Schedule.from_dict({"rules": [{"freeze": "bert", "until_epoch": 4}]})
            Schedule([{'freeze': 'bert', 'until_epoch': 4}])
        """
        return cls(rules_from_dict(config))

    @classmethod
    def from_file(cls, path: str | Path) -> Schedule:
        """Read a schedule from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file.

        Raises:
            ScheduleError: the file cannot be parsed (duplicate YAML keys
                included) or does not describe a valid schedule.
        """
        return cls.from_dict(load_config(path))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into this schedule."""
        return {"rules": [rule.to_dict() for rule in self.rules]}

    # ------------------------------------------------------------------ inspection

    def groups(self, model: nn.Module | ModelIndex) -> list[tuple[str, Resolution]]:
        """Every rule's groups as (label, selection), in rule order, each label once."""
        index = model if isinstance(model, ModelIndex) else ModelIndex(model)
        seen: dict[str, Resolution] = {}
        for i, rule in enumerate(self.rules):
            for label, res in rule.groups(index, origin=self.origin(i)):
                seen.setdefault(label, res)
        return list(seen.items())

    def trainable_scales(self, model: nn.Module | ModelIndex) -> dict[str, float | None]:
        """Parameters some rule may make trainable, with the lr scale the last
        such rule gives them (None: the base lr), in model order."""
        index = model if isinstance(model, ModelIndex) else ModelIndex(model)
        out: dict[str, float | None] = {}
        for i, rule in enumerate(self.rules):
            out.update(rule.trainable_scales(index, origin=self.origin(i)))
        return {n: out[n] for n in index.order if n in out}

    def unfreeze_ahead(self, model: nn.Module) -> list[str]:
        """Make trainable now every parameter some rule may train at the base lr.

        For trainers that build their optimizer from the parameters that
        require grad: called before the optimizer exists, it puts those
        parameters in its usual groups (and its LR scheduler and checkpoints
        cover them from the start); the Freezer then freezes what the schedule
        says. Parameters with an lr scale are left to the Freezer, which gives
        them groups of their own. Returns the names made trainable.
        """
        index = ModelIndex(model)
        self.validate(index)
        plain = [n for n, s in self.trainable_scales(index).items() if s is None]
        apply_change(index.model, unfreeze=plain, index=index)
        return plain

    def timeline(
        self,
        model: nn.Module,
        epochs: int,
        *,
        start: int = 0,
        steps_per_epoch: int | None = None,
        lr: float = 1.0,
    ) -> list[TimelineRow]:
        """The plan, one row per epoch, without touching the model.

        Args:
            model: the model the schedule is for.
            epochs: how many epochs to show.
            start: the first epoch.
            steps_per_epoch: for step-based rules: row ``e`` is taken at step
                ``e * steps_per_epoch``.
            lr: the base learning rate; the rows' lrs are ``lr`` times each
                group's scale (1.0: show the scales).

        Returns:
            list[TimelineRow]: epoch, frozen group labels, trainable
            parameter count, lr per trainable group (``lr`` times its scale: factors when ``lr`` is 1.0).

        Example:
            >>> import torch.nn as nn, layerfreeze as lf
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
            >>> [r.trainable for r in lf.Schedule().freeze("[0]", until_epoch=1).timeline(net, 2)]
            [3, 9]
        """
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
            raise ArgumentError(f"lr (the base learning rate) must be a positive finite number, got {lr!r}")
        count = as_int(epochs)
        if count is None or count < 1:
            raise ArgumentError(f"epochs must be a positive int, got {epochs!r}")
        epochs = count
        if steps_per_epoch is not None:
            k = as_int(steps_per_epoch)
            if k is None or k < 1:
                raise ArgumentError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")
            steps_per_epoch = k
        first = as_int(start)
        if first is None:
            raise ArgumentError(f"start must be an int, got {start!r}")
        start = first
        index = ModelIndex(model)
        groups = self.groups(index)
        rows = []
        for epoch in range(start, start + epochs):
            step = None if steps_per_epoch is None else epoch * steps_per_epoch
            plan = self.plan(index, epoch, step)
            frozen = {n: plan.state.get(n, not p.requires_grad) for n, p in index.by_canonical.items()}
            trainable = sum(p.numel() for n, p in index.by_canonical.items() if not frozen[n])
            row_frozen = []
            lrs = {}
            for label, res in groups:
                if res.params and all(frozen[n] for n in res.params):
                    row_frozen.append(label)
                else:
                    scales = [plan.lr_scale.get(n, 1.0) for n in res.params if not frozen[n]]
                    lrs[label] = lr * (max(scales) if scales else 1.0)
            rows.append(TimelineRow(epoch, row_frozen, trainable, lrs, float(lr)))
        return rows

    def origin(self, i: int) -> str:
        return f"rule {i} ({self.rules[i].kind})"

    def validate(self, model: nn.Module | ModelIndex) -> None:
        """Check every rule against ``model``; raise on the first that does not fit."""
        index = model if isinstance(model, ModelIndex) else ModelIndex(model)
        for i, rule in enumerate(self.rules):
            rule.validate(index, origin=self.origin(i))

    def plan(self, model: nn.Module | ModelIndex, epoch: int | None = None, step: int | None = None) -> Plan:
        """Combine every rule's decision at (epoch, step); later rules win."""
        index = model if isinstance(model, ModelIndex) else ModelIndex(model)
        state: dict[str, bool] = {}
        scale: dict[str, float] = {}
        holds: dict[str, str] = {}
        released: dict[str, None] = {}
        for i, rule in enumerate(self.rules):
            for d in rule.decide(index, epoch, step, origin=self.origin(i)):
                for name in d.res.params:
                    state[name] = d.frozen
                    if d.frozen:
                        scale.pop(name, None)
                    elif d.lr_scale is not None:
                        scale[name] = d.lr_scale
                for m in d.res.modules:
                    if d.frozen and d.mode != "keep":
                        holds[m] = d.mode
                        released.pop(m, None)
                    elif not d.frozen:
                        holds.pop(m, None)
                        released[m] = None
        modes = plan_holds(index, state, holds, released)
        return Plan(state, modes, list(released), scale)

    def frozen_at(self, model: nn.Module, epoch: int | None = None, step: int | None = None) -> list[str]:
        """Canonical names frozen at (epoch, step): the rules' verdicts, and
        the current state of parameters no rule governs."""
        index = ModelIndex(model)
        plan = self.plan(index, epoch, step)
        return [n for n, p in index.by_canonical.items() if plan.state.get(n, not p.requires_grad)]

    def signature(self) -> list[str]:
        """One line per rule that identifies it (its config, as JSON): stored
        with the state so that a checkpoint is only loaded into the schedule
        it was saved from."""
        return [_signature(rule) for rule in self.rules]

    def state_dict(self) -> dict[str, Any]:
        """The rules' recorded state, and the schedule's :meth:`signature`."""
        return {"rules": [rule.state_dict() for rule in self.rules], "signature": self.signature()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise :class:`~layerfreeze.StateDictError` if :meth:`load_state_dict` would refuse ``state``.

        A state saved from another schedule is refused, naming the first rule
        that differs; a state saved before signatures existed is checked by
        its rule count only.
        """
        rules = state.get("rules", []) if isinstance(state, dict) else None
        if not isinstance(rules, list):
            raise StateDictError(f"a schedule state must be a dict with a 'rules' list, got {state!r:.80}")
        if len(rules) != len(self.rules):
            raise StateDictError(
                f"schedule state has {len(rules)} rules, this schedule has {len(self.rules)}; "
                "build the Freezer with the schedule the checkpoint was saved with"
            )
        signature = state.get("signature")
        if signature is not None and list(signature) != self.signature():
            mine = self.signature()
            for i in range(max(len(mine), len(signature))):
                saved = signature[i] if i < len(signature) else "(no rule)"
                here = mine[i] if i < len(mine) else "(no rule)"
                if saved != here:
                    break
            raise StateDictError(
                f"the checkpoint was saved from another schedule: rule {i} there is {saved}, "
                f"here it is {here}. Build the Freezer with the schedule the checkpoint was saved "
                "with (Schedule.from_dict of its config), or load only the model and optimizer"
            )
        for i, (rule, rs) in enumerate(zip(self.rules, rules, strict=True)):
            try:
                rule.check_state_dict(rs)
            except StateDictError as exc:
                raise StateDictError(f"{self.origin(i)}: {exc}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rules' recorded state (the adaptive rule's statistics)."""
        self.check_state_dict(state)
        for rule, rs in zip(self.rules, state["rules"], strict=True):
            rule.load_state_dict(rs)


def _builder(cls: type[Rule]) -> Callable[..., Schedule]:
    """The :class:`Schedule` method that appends a ``cls`` rule, made from its spec."""

    def build(self: Schedule, target: object, /, **kwargs: Any) -> Schedule:
        return self.add(cls(target, **kwargs))

    summary = (cls.__doc__ or "").strip().split("\n\n")[0]
    build.__name__ = build.__qualname__ = cls.kind
    build.__doc__ = (
        f"{summary}\n\nAppends a :class:`~layerfreeze.rules.{cls.__name__}` (see there for the "
        "arguments) and returns the schedule, for chaining."
    )
    sig = inspect.signature(cls)
    build.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *sig.parameters.values()],
        return_annotation="Schedule",
    )
    return build


for _kind, _cls in RULES.items():
    setattr(Schedule, _kind, _builder(_cls))
