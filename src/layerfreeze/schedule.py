"""Freeze schedules: which selection is frozen at which epoch or step.

A :class:`Schedule` is an ordered list of rules. At a point in training
(epoch, step) each rule decides, for the parameters it governs, frozen or
trainable; a later rule overrides an earlier one where they overlap.
Parameters no rule governs keep whatever state they have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .core import _is_stat_norm, _keeper, apply_change
from .rules import (
    AdaptiveFreezeRule,
    Decision,
    FreezeRule,
    GradualUnfreezeRule,
    ProgressiveFreezeRule,
    Rule,
)
from .selectors import ModelIndex, Resolution

if TYPE_CHECKING:
    from .timeline import TimelineRow

__all__ = ["Decision", "FreezeRule", "Plan", "Rule", "Schedule"]


@dataclass
class Plan:
    """The schedule's combined verdict: what the model should look like."""

    state: dict[str, bool]  # canonical name -> frozen
    modes: dict[str, str]  # module name -> eval hold mode, for held modules
    released: list[str]  # module names whose holds should go
    lr_scale: dict[str, float]  # canonical name -> lr multiplier

    def frozen(self) -> list[str]:
        return [n for n, f in self.state.items() if f]


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

    def gradual_unfreeze(
        self,
        groups: object,
        *,
        start_epoch: int,
        every: int = 1,
        lr_decay: float | None = None,
        mode: str = "norm",
    ) -> Schedule:
        """ULMFiT-style: all groups frozen before ``start_epoch``; then the top
        group trains, and one more group below it every ``every`` epochs.

        Args:
            groups: a selector of a container whose children are the groups
                (``"encoder.layer"``), or a list of selectors, bottom first.
            start_epoch: the epoch the top group unfreezes.
            every: epochs between two unfreezes.
            lr_decay: ``d``: the group ``k`` places below the top trains at
                ``lr * d**k`` (``lr``: the Freezer's ``unfreeze_lr``, else the
                optimizer's group 0 lr).
            mode: see :func:`layerfreeze.freeze`.

        Returns:
            The schedule, for chaining.

        Example:
            >>> import torch.nn as nn, layerfreeze as lf
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
            >>> s = lf.Schedule().gradual_unfreeze(["[0]", "[1]"], start_epoch=1, lr_decay=0.5)
            >>> [r.frozen for r in s.timeline(net, epochs=3)]
            [['[0]', '[1]'], ['[0]'], []]
        """
        return self.add(
            GradualUnfreezeRule(groups, start_epoch=start_epoch, every=every, lr_decay=lr_decay, mode=mode)
        )

    def progressive_freeze(
        self,
        groups: object,
        *,
        start: float,
        end: float,
        total_epochs: int | None = None,
        total_steps: int | None = None,
        mode: str = "norm",
    ) -> Schedule:
        """FreezeOut-style: group ``i`` of ``n`` (bottom first) freezes for good once
        the training fraction reaches ``start + (end - start) * i / (n - 1)``.

        Args:
            groups: a container selector or a list of selectors, bottom first.
            start: the training fraction at which the bottom group freezes; ``end``: at which the top one does (``0 <= start <= end <= 1``).
            total_epochs: training length in epochs, or
            total_steps: in steps (give exactly one).
            mode: see :func:`layerfreeze.freeze`.

        Returns:
            The schedule, for chaining.

        Example:
            >>> import torch.nn as nn, layerfreeze as lf
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
            >>> s = lf.Schedule().progressive_freeze(["[0]", "[1]"], start=0.5, end=1.0, total_epochs=2)
            >>> s.frozen_at(net, epoch=1)
            ['0.weight', '0.bias']
        """
        return self.add(
            ProgressiveFreezeRule(
                groups, start=start, end=end, total_epochs=total_epochs, total_steps=total_steps, mode=mode
            )
        )

    def adaptive_freeze(
        self,
        groups: object,
        *,
        check_every: int,
        percentile: float = 50,
        min_trainable: int = 1,
        mode: str = "norm",
    ) -> Schedule:
        """AutoFreeze-style: every ``check_every`` optimizer steps, freeze the
        longest bottom prefix of groups whose gradient-norm change is below the
        ``percentile``-th percentile, leaving ``min_trainable`` groups trainable.

        The Freezer measures the gradient norms in the optimizer's step
        pre-hook (no second backward) and applies the freeze right after that
        step. See :class:`~layerfreeze.rules.AdaptiveFreezeRule`.

        Returns:
            The schedule, for chaining.

        Example:
            >>> import layerfreeze as lf
            >>> s = lf.Schedule().adaptive_freeze("encoder.layer", check_every=50)
            >>> s.to_dict()
            {'rules': [{'adaptive_freeze': 'encoder.layer', 'check_every': 50}]}
        """
        return self.add(
            AdaptiveFreezeRule(
                groups, check_every=check_every, percentile=percentile, min_trainable=min_trainable, mode=mode
            )
        )

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
        from .config import schedule_from_dict

        return schedule_from_dict(config, cls)

    @classmethod
    def from_file(cls, path: str | Path) -> Schedule:
        """Read a schedule from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file.

        Raises:
            ScheduleError: the file cannot be parsed (duplicate YAML keys
                included) or does not describe a valid schedule.
        """
        from .config import load_config

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
        from .timeline import timeline

        return timeline(self, model, epochs, start=start, steps_per_epoch=steps_per_epoch, lr=lr)

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
                keeper = _keeper(module)
                if keeper is not None and keeper.mode != mode:
                    released[name] = None  # re-held below with the mode the winning rule gives
            else:
                # a "norm" freeze leaves dropout, containers and other layers to
                # model.train()/eval(): drop an "eval" hold an earlier rule left
                released[name] = None
        return Plan(state, modes, list(released), scale)

    def frozen_at(self, model: nn.Module, epoch: int | None = None, step: int | None = None) -> list[str]:
        """Canonical names frozen at (epoch, step): the rules' verdicts, and
        the current state of parameters no rule governs."""
        index = ModelIndex(model)
        plan = self.plan(index, epoch, step)
        return [n for n, p in index.by_canonical.items() if plan.state.get(n, not p.requires_grad)]

    def state_dict(self) -> dict[str, Any]:
        return {"rules": [rule.state_dict() for rule in self.rules]}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would refuse ``state``."""
        rules = state.get("rules", []) if isinstance(state, dict) else None
        if not isinstance(rules, list):
            raise ValueError("a schedule state must be a dict with a 'rules' list")
        if len(rules) != len(self.rules):
            raise ValueError(
                f"schedule state has {len(rules)} rules, this schedule has {len(self.rules)}; "
                "build the Freezer with the schedule the checkpoint was saved with"
            )
        for i, (rule, rs) in enumerate(zip(self.rules, rules, strict=True)):
            try:
                rule.check_state_dict(rs)
            except ValueError as exc:
                raise ValueError(f"{self.origin(i)}: {exc}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rules' recorded state (the adaptive rule's statistics)."""
        self.check_state_dict(state)
        for rule, rs in zip(self.rules, state["rules"], strict=True):
            rule.load_state_dict(rs)
