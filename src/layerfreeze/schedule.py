"""Freeze schedules: which selection is frozen at which epoch or step.

A :class:`Schedule` is an ordered list of rules. At a point in training
(epoch, step) each rule decides, for the parameters it governs, frozen or
trainable; a later rule overrides an earlier one where they overlap.
Parameters no rule governs keep whatever state they have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .core import _check_mode, _is_stat_norm
from .selectors import ModelIndex, Resolution, resolve

__all__ = ["Decision", "FreezeRule", "Plan", "Rule", "Schedule"]


@dataclass(frozen=True)
class Decision:
    """One rule's verdict on one selection at one point in training.

    Attributes:
        res: the selection.
        frozen: frozen (True) or trainable (False).
        mode: the mode for a freeze (see :func:`layerfreeze.freeze`).
        lr_scale: for an unfreeze, multiply the Freezer's base lr by this for
            any param group the Freezer adds (discriminative learning rates).
    """

    res: Resolution
    frozen: bool
    mode: str = "norm"
    lr_scale: float | None = None


@dataclass
class Plan:
    """The schedule's combined verdict: what the model should look like."""

    state: dict[str, bool]  # canonical name -> frozen
    modes: dict[str, str]  # module name -> eval hold mode, for held modules
    released: list[str]  # module names whose holds should go
    lr_scale: dict[str, float]  # canonical name -> lr multiplier

    def frozen(self) -> list[str]:
        return [n for n, f in self.state.items() if f]


class Rule:
    """Base class of schedule rules.

    Subclasses set ``kind`` (the key naming the rule in a config dict) and
    implement :meth:`decide` and :meth:`to_dict`.
    """

    kind: ClassVar[str] = "rule"
    mode: str = "norm"

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, index: ModelIndex, *, origin: str) -> None:
        """Raise if the rule's selectors do not fit ``index``'s model."""

    # rules with internal state (e.g. adaptive ones) override these
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def _check_bound(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    return value


class FreezeRule(Rule):
    """Frozen while ``from <= t < until`` (a missing bound is open), trainable otherwise.

    With both epoch and step bounds, frozen only while both hold. Before the
    Freezer knows the epoch (or step) a bound needs, the rule decides nothing.
    """

    kind = "freeze"

    def __init__(
        self,
        selector: object,
        *,
        exclude: object = (),
        from_epoch: int | None = None,
        until_epoch: int | None = None,
        from_step: int | None = None,
        until_step: int | None = None,
        mode: str = "norm",
    ) -> None:
        self.selector = selector
        self.exclude = exclude
        self.from_epoch = _check_bound("from_epoch", from_epoch)
        self.until_epoch = _check_bound("until_epoch", until_epoch)
        self.from_step = _check_bound("from_step", from_step)
        self.until_step = _check_bound("until_step", until_step)
        self.mode = _check_mode(mode)

    def _selectors(self) -> list[object]:
        return list(self.selector) if isinstance(self.selector, (list, tuple)) else [self.selector]

    def validate(self, index: ModelIndex, *, origin: str) -> None:
        resolve(index, self._selectors(), self.exclude, origin=origin, default_all=False)

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        checks = []
        if self.from_epoch is not None or self.until_epoch is not None:
            if epoch is None:
                return []
            checks.append(_within(epoch, self.from_epoch, self.until_epoch))
        if self.from_step is not None or self.until_step is not None:
            if step is None:
                return []
            checks.append(_within(step, self.from_step, self.until_step))
        res = resolve(index, self._selectors(), self.exclude, origin=origin, default_all=False)
        return [Decision(res, all(checks), self.mode)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind: self.selector}
        for key in ("from_epoch", "until_epoch", "from_step", "until_step"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.exclude not in ((), [], None):
            out["exclude"] = self.exclude
        if self.mode != "norm":
            out["mode"] = self.mode
        return out


def _within(t: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or t >= lo) and (hi is None or t < hi)


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

    def add(self, rule: Rule) -> Schedule:
        """Append a rule; returns the schedule for chaining."""
        if not isinstance(rule, Rule):
            raise TypeError(f"expected a layerfreeze Rule, got {type(rule).__name__}")
        self.rules.append(rule)
        return self

    def freeze(
        self,
        selector: object,
        *,
        exclude: object = (),
        from_epoch: int | None = None,
        until_epoch: int | None = None,
        from_step: int | None = None,
        until_step: int | None = None,
        mode: str = "norm",
    ) -> Schedule:
        """Freeze ``selector`` while ``from <= t < until``; trainable outside that window."""
        return self.add(
            FreezeRule(
                selector,
                exclude=exclude,
                from_epoch=from_epoch,
                until_epoch=until_epoch,
                from_step=from_step,
                until_step=until_step,
                mode=mode,
            )
        )

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
        modes = {}
        for name, mode in holds.items():
            module = index.modules[name]
            own = [p for p in module._parameters.values() if p is not None]
            if any(not state.get(index.canonical[id(p)], not p.requires_grad) for p in own):
                released[name] = None
                continue
            if mode == "eval" or (mode == "norm" and _is_stat_norm(module)):
                modes[name] = mode
        return Plan(state, modes, list(released), scale)

    def frozen_at(
        self, model: nn.Module, epoch: int | None = None, step: int | None = None
    ) -> list[str]:
        """Canonical names frozen at (epoch, step): the rules' verdicts, and
        the current state of parameters no rule governs."""
        index = ModelIndex(model)
        plan = self.plan(index, epoch, step)
        return [n for n, p in index.by_canonical.items() if plan.state.get(n, not p.requires_grad)]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` turns back into this schedule."""
        return {"rules": [rule.to_dict() for rule in self.rules]}

    def state_dict(self) -> dict[str, Any]:
        return {"rules": [rule.state_dict() for rule in self.rules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rules = state.get("rules", [])
        if len(rules) != len(self.rules):
            raise ValueError(
                f"schedule state has {len(rules)} rules, this schedule has {len(self.rules)}"
            )
        for rule, rs in zip(self.rules, rules):
            rule.load_state_dict(rs)

