"""Schedule rules: the decisions a :class:`~layerfreeze.Schedule` combines.

A rule governs some parameters and, at a point in training (epoch, step),
decides for each of its selections frozen or trainable. Four kinds exist, each
named by the key that introduces it in a config dict:

- ``freeze``: frozen inside an epoch/step window (:class:`FreezeRule`);
- ``gradual_unfreeze``: ULMFiT-style, the top group first, one more group
  below every few epochs, with optional discriminative learning rates
  (:class:`GradualUnfreezeRule`);
- ``progressive_freeze``: FreezeOut-style, the bottom group first, as the
  training fraction grows (:class:`ProgressiveFreezeRule`);
- ``adaptive_freeze``: AutoFreeze-style, the bottom groups whose gradient norm
  stopped changing (:class:`AdaptiveFreezeRule`).

Groups are given either as one selector of a container whose children are the
groups (``"encoder.layer"``) or as a list of selectors, bottom first.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .errors import ScheduleError, ScheduleTypeError, SelectorError, StateDictError
from .holds import check_mode as _check_mode
from .selectors import ModelIndex, Resolution, resolve

__all__ = [
    "AdaptiveFreezeRule",
    "AdaptiveStats",
    "Decision",
    "FreezeRule",
    "GradualUnfreezeRule",
    "Param",
    "PlateauUnfreezeRule",
    "ProgressiveFreezeRule",
    "RULES",
    "Rule",
    "ScheduleTypeError",
    "register_rule",
]


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


_REQUIRED: Any = inspect.Parameter.empty

_DESCRIBE = {
    "int": "an int",
    "bound": "an int",
    "number": "a number",
    "mode": "'norm', 'eval' or 'keep'",
    "selector": "a selector (a string, or a list of strings)",
    "bool": "true or false",
    "name": "a non-empty string",
}


@dataclass(frozen=True)
class Param:
    """One keyword argument of a rule: the single place it is described.

    The rule's constructor validates with it, :class:`~layerfreeze.Schedule`'s
    builder method and the config reader take their keys, types and required
    keys from it, and :meth:`Rule.to_dict` writes every value that is not the
    default.

    Attributes:
        name: the keyword (and config key, and attribute of the rule).
        kind: ``"int"`` (``>= low``), ``"bound"`` (an int or None),
            ``"number"`` (in ``[low, high]``, ``(low, high]`` with
            ``low_open``), ``"mode"`` or ``"selector"``.
        default: the default; none given: required.
    """

    name: str
    kind: str
    default: Any = _REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def describe(self) -> str:
        """What the value must be, for error messages."""
        return _DESCRIBE[self.kind]

    def accepts(self, value: object) -> bool:
        """Whether ``value`` has the right type (ranges are checked by :meth:`check`)."""
        if self.kind in ("int", "bound"):
            return as_int(value) is not None
        if self.kind == "number":
            return as_number(value) is not None
        if self.kind == "mode":
            return value in ("norm", "eval", "keep")
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "name":
            return isinstance(value, str) and bool(value.strip())
        return _selector_ok(value)

    def check(self, value: object) -> Any:
        """``value`` validated and converted (numpy scalars to Python numbers).

        Raises:
            ScheduleTypeError: a value of the wrong type.
            ScheduleError: a value out of range.
        """
        if self.kind == "bound" or (value is None and not self.required and self.default is None):
            return _check_bound(self.name, value)
        if self.kind == "int":
            return _check_int(self.name, value, int(self.low or 0))
        if self.kind == "number":
            out = _check_float(self.name, value, -math.inf if self.low is None else self.low,
                               math.inf if self.high is None else self.high)
            if self.low_open and out == self.low:
                raise ScheduleError(f"{self.name} must be in ({self.low}, {self.high}], got {value!r}")
            return out
        if self.kind == "mode":
            return _check_mode(value)
        if self.kind in ("bool", "name") and not self.accepts(value):
            raise ScheduleTypeError(f"{self.name} must be {self.describe()}, got {value!r}")
        return value

    def is_default(self, value: object) -> bool:
        if self.kind == "selector":
            return value in ((), [], None)
        return not self.required and value == self.default


def _selector_ok(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_selector_ok(v) and not isinstance(v, (list, tuple)) for v in value)
    if isinstance(value, str):
        return bool(value.strip())
    # from Python (not from a file) a class or a callable selector is fine too
    return (isinstance(value, type) and issubclass(value, nn.Module)) or (
        callable(value) and not isinstance(value, type)
    )


_MODE_PARAM = Param("mode", "mode", "norm")


class Rule:
    """Base class of schedule rules.

    A subclass sets ``kind`` (the key naming the rule in a config dict, and
    the name of its :class:`~layerfreeze.Schedule` builder method), ``target``
    (the attribute holding what that key gives: a selector or the groups) and
    ``params`` (its keyword arguments, one :class:`Param` each), and
    implements :meth:`decide` and :meth:`groups`. Construction, validation,
    the builder method, config keys and :meth:`to_dict` all follow from
    ``params``; :meth:`_check` adds checks across arguments. Adding a rule is
    one class, registered in :data:`RULES`.
    """

    kind: ClassVar[str] = "rule"
    target: ClassVar[str] = "selector"
    params: ClassVar[tuple[Param, ...]] = ()
    mode: str = "norm"

    def __init__(self, target: object, /, **kwargs: Any) -> None:
        spec = {p.name: p for p in self.params}
        unknown = [k for k in kwargs if k not in spec]
        if unknown:
            raise ScheduleTypeError(
                f"{self.kind} got an unexpected keyword argument {unknown[0]!r}; it takes "
                f"{', '.join(map(repr, spec))}"
            )
        missing = [p.name for p in self.params if p.required and p.name not in kwargs]
        if missing:
            raise ScheduleTypeError(f"{self.kind} is missing the required keyword argument {missing[0]!r}")
        self._set_target(target)
        for p in self.params:
            setattr(self, p.name, p.check(kwargs.get(p.name, p.default)))
        self._check()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        keyword = inspect.Parameter.KEYWORD_ONLY
        cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(cls.target, inspect.Parameter.POSITIONAL_ONLY)]
            + [inspect.Parameter(p.name, keyword, default=p.default) for p in cls.params]
        )

    def _set_target(self, target: object) -> None:
        setattr(self, self.target, target)

    def _check(self) -> None:
        """Checks across arguments; raise :class:`~layerfreeze.ScheduleError`."""

    def to_dict(self) -> dict[str, Any]:
        """The rule as a config dict: its kind's key, then every argument that
        is not the default, in the order of ``params``."""
        out: dict[str, Any] = {self.kind: _serial(getattr(self, self.target))}
        for p in self.params:
            value = getattr(self, p.name)
            if p.required or not p.is_default(value):
                out[p.name] = _serial(value) if p.kind == "selector" else value
        return out

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        raise NotImplementedError

    def groups(self, index: ModelIndex, *, origin: str) -> list[tuple[str, Resolution]]:
        """The rule's groups as (label, selection), bottom first."""
        raise NotImplementedError

    def validate(self, index: ModelIndex, *, origin: str) -> None:
        """Raise if the rule's selectors do not fit ``index``'s model."""
        self.groups(index, origin=origin)

    def trainable_scales(self, index: ModelIndex, *, origin: str) -> dict[str, float | None]:
        """Parameters this rule may ever make trainable, with their lr scale.

        The Freezer registers these in the optimizer up front, so that LR
        schedulers see every param group from the start.
        """
        return {n: None for _, res in self.groups(index, origin=origin) for n in res.params}

    # rules with internal state (the adaptive one) override these
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise :class:`~layerfreeze.StateDictError` if :meth:`load_state_dict` would refuse ``state``."""


def as_int(value: object) -> int | None:
    """``value`` as a Python int if it is an integer (numpy integers included,
    through ``operator.index``), else None; a bool is not an integer here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def as_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (numpy scalars included), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_bound(name: str, value: object) -> int | None:
    if value is None:
        return None
    out = as_int(value)
    if out is None:
        raise ScheduleTypeError(f"{name} must be an int or None, got {value!r} ({type(value).__name__})")
    return out


def _check_int(name: str, value: object, minimum: int) -> int:
    out = as_int(value)
    if out is None:
        raise ScheduleTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if out < minimum:
        raise ScheduleError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def _check_float(name: str, value: object, lo: float, hi: float) -> float:
    out = as_number(value)
    if out is None:
        raise ScheduleTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not lo <= out <= hi:
        raise ScheduleError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return out


def _selector_list(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve_key(
    index: ModelIndex, selectors: Sequence[object], exclude: object, *, origin: str, key: str
) -> Resolution:
    """Resolve with errors that name the rule and the config key."""
    excl = _selector_list(exclude) if exclude not in ((), [], None) else []
    if excl:
        # resolve() names an exclusion only as "exclude": check it on its own
        # first so that a miss names the rule too
        resolve(index, excl, origin=f"{origin}, key 'exclude'", default_all=False)
    return resolve(index, selectors, excl, origin=f"{origin}, key {key!r}", default_all=False)


def _roots(names: Sequence[str]) -> list[str]:
    chosen = set(names)
    out = []
    for name in names:
        parts = name.split(".")
        if not any(".".join(parts[:k]) in chosen for k in range(1, len(parts))) and name:
            out.append(name)
    return out


class _GroupedRule(Rule):
    """A rule over an ordered list of groups (bottom first)."""

    target = "group_spec"
    group_spec: object

    def _set_target(self, groups: object) -> None:
        if isinstance(groups, (list, tuple)):
            if not groups:
                raise ScheduleError(f"{self.kind}: groups is an empty list; give at least one selector")
            self.group_spec = list(groups)
        else:
            self.group_spec = groups

    def groups(self, index: ModelIndex, *, origin: str) -> list[tuple[str, Resolution]]:
        key = self.kind
        if isinstance(self.group_spec, list):
            out = []
            for i, sel in enumerate(self.group_spec):
                res = resolve(index, [sel], origin=f"{origin}, key {key!r}[{i}]", default_all=False)
                label = (sel if isinstance(sel, str) else ", ".join(map(str, sel)) if isinstance(sel, (list, tuple))
                         else getattr(sel, "__name__", repr(sel)))
                out.append((str(label), res))
            return out
        res = resolve(index, [self.group_spec], origin=f"{origin}, key {key!r}", default_all=False)
        roots = _roots(res.modules)
        if len(roots) == 1:
            # one container: its children, in registration order, are the groups
            container = index.modules[roots[0]]
            names = [f"{roots[0]}.{c}" for c, m in container._modules.items() if m is not None]
            names = [n for n in names if any(True for _ in index.subtree_params(n))]
            if not names:
                raise SelectorError(
                    f"{self.group_spec!r} matches {roots[0]} ({type(container).__name__}), which has no "
                    "child modules with parameters to use as groups; pass a list of selectors, bottom first",
                    selector=self.group_spec,
                    origin=f"{origin}, key {key!r}",
                )
        elif roots:
            names = roots  # a glob or slice matching several modules: those are the groups
        else:
            raise SelectorError(
                f"{self.group_spec!r} matches parameters, not a container of groups; name a module "
                "whose children are the groups, or pass a list of selectors, bottom first",
                selector=self.group_spec,
                origin=f"{origin}, key {key!r}",
            )
        return [(n, resolve(index, [n], origin=origin, default_all=False)) for n in names]


def _serial(spec: object) -> Any:
    """Selectors as a config file would hold them (classes as ``type:``)."""
    if isinstance(spec, list):
        return [_serial(s) for s in spec]
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return f"type:{spec.__module__}.{spec.__qualname__}"
    return spec


class FreezeRule(Rule):
    """Frozen while ``from <= t < until`` (a missing bound is open), trainable otherwise.

    With both epoch and step bounds, frozen only while both hold. Before the
    Freezer knows the epoch (or step) a bound needs, the rule decides nothing.

    Example:
        >>> import torch.nn as nn
        >>> from layerfreeze.selectors import ModelIndex
        >>> rule = FreezeRule("[0]", until_epoch=2)
        >>> [d.frozen for d in rule.decide(ModelIndex(nn.Sequential(nn.Linear(1, 1))), 1, None, origin="r")]
        [True]
    """

    kind = "freeze"
    params = (
        Param("from_epoch", "bound", None),
        Param("until_epoch", "bound", None),
        Param("from_step", "bound", None),
        Param("until_step", "bound", None),
        Param("exclude", "selector", ()),
        _MODE_PARAM,
    )
    selector: object
    exclude: object
    from_epoch: int | None
    until_epoch: int | None
    from_step: int | None
    until_step: int | None

    def _check(self) -> None:
        for unit in ("epoch", "step"):
            lo, hi = getattr(self, f"from_{unit}"), getattr(self, f"until_{unit}")
            if lo is not None and hi is not None and lo >= hi:
                raise ScheduleError(
                    f"freeze {self.selector!r}: from_{unit}={lo} is not below until_{unit}={hi}, so the window "
                    f"[{lo}, {hi}) is empty and the rule would never freeze; give from_{unit} < until_{unit} "
                    "(until is exclusive), or drop one bound"
                )

    def _selectors(self) -> list[object]:
        return _selector_list(self.selector)

    def _resolve(self, index: ModelIndex, origin: str) -> Resolution:
        return _resolve_key(index, self._selectors(), self.exclude, origin=origin, key=self.kind)

    def groups(self, index: ModelIndex, *, origin: str) -> list[tuple[str, Resolution]]:
        sel = self.selector
        label = ", ".join(str(s) for s in sel) if isinstance(sel, (list, tuple)) else str(sel)
        return [(label, self._resolve(index, origin))]

    def trainable_scales(self, index: ModelIndex, *, origin: str) -> dict[str, float | None]:
        bounded = any(
            getattr(self, k) is not None for k in ("from_epoch", "until_epoch", "from_step", "until_step")
        )
        if not bounded:  # frozen always: this rule never trains it
            return {}
        return super().trainable_scales(index, origin=origin)

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
        return [Decision(self._resolve(index, origin), all(checks), self.mode)]



def _within(t: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or t >= lo) and (hi is None or t < hi)


class GradualUnfreezeRule(_GroupedRule):
    """ULMFiT-style gradual unfreezing, top group first.

    Every group is frozen before ``start_epoch``; at ``start_epoch`` the top
    group becomes trainable, then one more group below it every ``every``
    epochs. With ``lr_decay=d`` the group ``k`` places below the top trains at
    ``lr * d**k`` (``lr``: the Freezer's ``unfreeze_lr``, else group 0's).
    Decides nothing until the Freezer knows the epoch.

    Args:
        groups: a selector of a container whose children are the groups
            (``"encoder.layer"``), or a list of selectors, bottom first.
        start_epoch: the epoch the top group unfreezes.
        every: epochs between two unfreezes.
        lr_decay: the per-group lr factor going down, in (0, 1].
        mode: how frozen groups hold their modes (see :func:`layerfreeze.freeze`).

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
        >>> s = lf.Schedule().gradual_unfreeze(["[0]", "[1]"], start_epoch=1)
        >>> [len(s.frozen_at(net, epoch=e)) for e in (0, 1, 2)]
        [4, 2, 0]
    """

    kind = "gradual_unfreeze"
    params = (
        Param("start_epoch", "int", low=0),
        Param("every", "int", 1, low=1),
        Param("lr_decay", "number", None, low=0.0, high=1.0, low_open=True),
        _MODE_PARAM,
    )
    start_epoch: int
    every: int
    lr_decay: float | None

    def unfrozen_count(self, epoch: int, n: int) -> int:
        """How many groups (from the top) are trainable at ``epoch``."""
        if epoch < self.start_epoch:
            return 0
        return min(n, 1 + (epoch - self.start_epoch) // self.every)

    def _scale(self, i: int, n: int) -> float | None:
        return None if self.lr_decay is None else self.lr_decay ** (n - 1 - i)

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        if epoch is None:
            return []
        groups = self.groups(index, origin=origin)
        n = len(groups)
        first_trainable = n - self.unfrozen_count(epoch, n)
        return [
            Decision(res, i < first_trainable, self.mode, None if i < first_trainable else self._scale(i, n))
            for i, (_, res) in enumerate(groups)
        ]

    def trainable_scales(self, index: ModelIndex, *, origin: str) -> dict[str, float | None]:
        groups = self.groups(index, origin=origin)
        return {name: self._scale(i, len(groups)) for i, (_, res) in enumerate(groups) for name in res.params}



class ProgressiveFreezeRule(_GroupedRule):
    """FreezeOut-style progressive freezing, bottom group first.

    Group ``i`` (0-based, of ``n``) is frozen once the training fraction
    (``epoch / total_epochs`` or ``step / total_steps``) reaches
    ``start + (end - start) * i / (n - 1)`` and stays frozen; before that it is
    trainable. With ``end=1.0`` the top group trains to the end.

    Args:
        groups: a container selector or a list of selectors, bottom first.
        start: the fraction at which the bottom group freezes, in [0, 1].
        end: the fraction at which the top group freezes, in [start, 1].
        total_epochs: the length of training in epochs, or
        total_steps: in optimizer steps (exactly one of the two).
        mode: how frozen groups hold their modes.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
        >>> s = lf.Schedule().progressive_freeze(["[0]", "[1]"], start=0.5, end=1.0, total_epochs=4)
        >>> [s.frozen_at(net, epoch=e) for e in (1, 2)]
        [[], ['0.weight', '0.bias']]
    """

    kind = "progressive_freeze"
    params = (
        Param("start", "number", low=0.0, high=1.0),
        Param("end", "number", low=0.0, high=1.0),
        Param("total_epochs", "int", None, low=1),
        Param("total_steps", "int", None, low=1),
        _MODE_PARAM,
    )
    start: float
    end: float
    total_epochs: int | None
    total_steps: int | None

    def _check(self) -> None:
        if self.end < self.start:
            raise ScheduleError(f"end must be in [{self.start}, 1.0], got {self.end!r}")
        if (self.total_epochs is None) == (self.total_steps is None):
            raise ScheduleError(
                "progressive_freeze needs exactly one of total_epochs and total_steps "
                f"(got total_epochs={self.total_epochs!r}, total_steps={self.total_steps!r})"
            )

    def threshold(self, i: int, n: int) -> float:
        """The training fraction at which group ``i`` of ``n`` freezes."""
        return self.start if n == 1 else self.start + (self.end - self.start) * i / (n - 1)

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        t, total = (epoch, self.total_epochs) if self.total_epochs is not None else (step, self.total_steps)
        if t is None or total is None:
            return []
        frac = t / total
        groups = self.groups(index, origin=origin)
        # a small tolerance: 0.5 + (0.9 - 0.5) / 2 is 0.7000000000000001 in floats,
        # and epoch 7 of 10 should count as having reached it
        return [
            Decision(res, frac >= self.threshold(i, len(groups)) - 1e-9, self.mode)
            for i, (_, res) in enumerate(groups)
        ]



class AdaptiveFreezeRule(_GroupedRule):
    """AutoFreeze-style: freeze the bottom groups whose gradients settled.

    Every ``check_every`` optimizer steps the Freezer hands this rule each
    group's gradient norm, accumulated over those steps (collected in the
    optimizer's step pre-hook, where the gradients already exist: no second
    backward). Each group measured now and at the previous check gets a
    relative change ``|now - before| / before``; the longest prefix of groups,
    from the bottom, whose change is below the ``percentile``-th percentile of
    all measured groups' changes is frozen, always leaving ``min_trainable``
    groups of the rule trainable. A frozen prefix only grows. The rule decides
    from the state recorded so far, whatever the epoch or step.

    Args:
        groups: a container selector or a list of selectors, bottom first.
        check_every: optimizer steps between two checks.
        percentile: in [0, 100].
        min_trainable: groups that always stay trainable (counted from the top).
        mode: how frozen groups hold their modes.

    Example:
        >>> rule = AdaptiveFreezeRule(["a", "b", "c"], check_every=10)
        >>> rule.update([1.0, 1.0, 1.0]), rule.update([1.01, 1.5, 2.0]), rule.frozen_groups
        (False, True, 1)
    """

    kind = "adaptive_freeze"
    params = (
        Param("check_every", "int", low=1),
        Param("percentile", "number", 50, low=0.0, high=100.0),
        Param("min_trainable", "int", 1, low=0),
        _MODE_PARAM,
    )
    check_every: int
    percentile: float
    min_trainable: int

    def __init__(self, groups: object, /, **kwargs: Any) -> None:
        super().__init__(groups, **kwargs)
        #: how many groups, from the bottom, are frozen
        self.frozen_groups = 0
        #: each group's norm at the previous check (None: not measured)
        self.previous: list[float | None] | None = None
        #: checks made so far
        self.checks = 0

    def update(self, norms: Sequence[float | None]) -> bool:
        """Record one check's norms (None: the group was not trainable).

        Returns:
            Whether the frozen prefix grew.
        """
        norms = [None if v is None else float(v) for v in norms]
        before = self.previous
        self.previous = list(norms)
        self.checks += 1
        if before is None or len(before) != len(norms):
            return False
        changes: dict[int, float] = {}
        for i, (now, old) in enumerate(zip(norms, before, strict=True)):
            if now is not None and old is not None and i >= self.frozen_groups:
                changes[i] = abs(now - old) / old if old > 0 else (0.0 if now == 0 else math.inf)
        if not changes:
            return False
        cut = _percentile(sorted(changes.values()), self.percentile)
        limit = max(0, len(norms) - self.min_trainable)
        prefix = self.frozen_groups
        while prefix < limit and prefix in changes and changes[prefix] < cut:
            prefix += 1
        grew = prefix > self.frozen_groups
        self.frozen_groups = prefix
        return grew

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        if not self.frozen_groups:
            return []
        groups = self.groups(index, origin=origin)
        return [Decision(res, True, self.mode) for _, res in groups[: self.frozen_groups]]


    def state_dict(self) -> dict[str, Any]:
        return {"frozen_groups": self.frozen_groups, "previous": self.previous, "checks": self.checks}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        frozen = as_int(state.get("frozen_groups", 0))
        if frozen is None or frozen < 0:
            raise StateDictError(
                f"adaptive_freeze state: frozen_groups must be an int >= 0, got {state.get('frozen_groups')!r}; "
                "the checkpoint is damaged or from another schedule"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.frozen_groups = int(state.get("frozen_groups", 0))
        prev = state.get("previous")
        self.previous = None if prev is None else [None if v is None else float(v) for v in prev]
        self.checks = int(state.get("checks", 0))


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(values) == 1:
        return values[0]
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    if math.isinf(values[hi]) or math.isinf(values[lo]):
        return values[lo] if pos == lo else values[hi]
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class PlateauUnfreezeRule(_GroupedRule):
    """Metric-driven gradual unfreezing: the next group (from the top) unfreezes
    when a reported metric has not improved for ``patience`` reports.

    Every group is frozen at first. Each :meth:`layerfreeze.Freezer.report`
    that carries ``monitor`` is one evaluation: a value better than the best
    so far by more than ``min_delta`` resets the count, any other adds one,
    and at ``patience`` the next group below the trainable ones unfreezes and
    the count starts again. With ``restore_best`` the Freezer first loads
    the weights of the best report so far (kept in host memory; after a
    resume, the best since the resume). Decides from the reports, whatever
    the epoch or step; its state (groups unfrozen, best, count) resumes.

    Args:
        groups: a container selector or a list of selectors, bottom first.
        monitor: the metric's name in the reports (``"val_loss"``, ``"eval_loss"``).
        patience: reports without improvement before the next group unfreezes.
        min_delta: the least change that counts as an improvement.
        maximize: higher is better (an accuracy) instead of lower (a loss).
        restore_best: load the best weights before each unfreeze.
        lr_decay: the per-group lr factor going down, as in ``gradual_unfreeze``.
        mode: how frozen groups hold their modes.

    Example:
        >>> rule = PlateauUnfreezeRule(["a", "b"], monitor="loss", patience=2)
        >>> [rule.update(v) for v in (1.0, 0.9, 0.95, 0.91)], rule.unfrozen
        ([False, False, False, True], 1)
    """

    kind = "unfreeze_on_plateau"
    params = (
        Param("monitor", "name"),
        Param("patience", "int", 1, low=1),
        Param("min_delta", "number", 0.0, low=0.0),
        Param("maximize", "bool", False),
        Param("restore_best", "bool", False),
        Param("lr_decay", "number", None, low=0.0, high=1.0, low_open=True),
        _MODE_PARAM,
    )
    monitor: str
    patience: int
    min_delta: float
    maximize: bool
    restore_best: bool
    lr_decay: float | None

    def __init__(self, groups: object, /, **kwargs: Any) -> None:
        super().__init__(groups, **kwargs)
        #: groups trainable, counted from the top
        self.unfrozen = 0
        #: the best value reported, and reports since it without improvement
        self.best: float | None = None
        self.bad = 0
        #: whether the last :meth:`update` was a new best
        self.improved = False

    def update(self, value: float) -> bool:
        """Record one evaluation; returns whether one more group unfreezes."""
        value = float(value)
        better = self.best is None or (
            value > self.best + self.min_delta if self.maximize else value < self.best - self.min_delta
        )
        self.improved = better and not math.isnan(value)
        if self.improved:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        self.bad = 0
        self.unfrozen += 1
        return True

    def _scale(self, i: int, n: int) -> float | None:
        return None if self.lr_decay is None else self.lr_decay ** (n - 1 - i)

    def decide(
        self, index: ModelIndex, epoch: int | None, step: int | None, *, origin: str
    ) -> list[Decision]:
        groups = self.groups(index, origin=origin)
        n = len(groups)
        first = n - min(self.unfrozen, n)
        return [
            Decision(res, i < first, self.mode, None if i < first else self._scale(i, n))
            for i, (_, res) in enumerate(groups)
        ]

    def trainable_scales(self, index: ModelIndex, *, origin: str) -> dict[str, float | None]:
        groups = self.groups(index, origin=origin)
        return {name: self._scale(i, len(groups)) for i, (_, res) in enumerate(groups) for name in res.params}

    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen, "best": self.best, "bad": self.bad}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        unfrozen = as_int(state.get("unfrozen", 0))
        if unfrozen is None or unfrozen < 0:
            raise StateDictError(
                f"unfreeze_on_plateau state: unfrozen must be an int >= 0, got {state.get('unfrozen')!r}; "
                "the checkpoint is damaged or from another schedule"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.unfrozen = int(state.get("unfrozen", 0))
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.bad = int(state.get("bad", 0))


#: rule classes by the config key that names them
RULES: dict[str, type[Rule]] = {
    cls.kind: cls
    for cls in (FreezeRule, GradualUnfreezeRule, ProgressiveFreezeRule, AdaptiveFreezeRule, PlateauUnfreezeRule)
}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Make a rule class known to :class:`~layerfreeze.Schedule` (a builder
    method named ``cls.kind``) and to config files (the key ``cls.kind``).

    Usable as a class decorator.

    Raises:
        ArgumentTypeError: ``cls`` is not a :class:`Rule` subclass.
        ArgumentError: its ``kind`` is taken by another class.
    """
    from .errors import ArgumentError, ArgumentTypeError

    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise ArgumentTypeError(f"register_rule takes a Rule subclass, got {cls!r}")
    if RULES.get(cls.kind, cls) is not cls:
        raise ArgumentError(f"rule kind {cls.kind!r} is taken by {RULES[cls.kind].__name__}; choose another kind")
    RULES[cls.kind] = cls
    return cls


class GradNormCollector:
    """Gathers one adaptive rule's per-group gradient norms between checks.

    The Freezer calls :meth:`collect` from the optimizer's step pre-hook,
    where the gradients of this step exist (no second backward), and
    :meth:`finish` after the step that completes a check. Norms stay on the
    gradients' device between checks (no host sync per step). Under
    ``torch.distributed`` the per-group means are all-reduced at each check,
    so every rank hands the rule the same numbers and decides the same.

    Args:
        rule: the adaptive rule.
        params: each group's parameters, bottom first.
    """

    def __init__(self, rule: AdaptiveFreezeRule, params: list[list[nn.Parameter]]) -> None:
        self.rule = rule
        self.params = params
        self.sums: list[Any] = [None] * len(params)
        self.counts = [0] * len(params)

    def collect(self) -> None:
        import torch

        for i, group in enumerate(self.params):
            grads = [p.grad for p in group if p.requires_grad and p.grad is not None]
            if not grads:
                continue  # frozen (or unused) this step: no measurement
            device = grads[0].device
            norms = [
                torch.linalg.vector_norm((g.coalesce().values() if g.is_sparse else g).detach().float())
                for g in grads
            ]
            norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
            self.sums[i] = norm if self.sums[i] is None else self.sums[i] + norm
            self.counts[i] += 1

    def finish(self) -> bool:
        """Hand the rule this window's mean norms; returns whether it froze more."""
        import torch
        import torch.distributed as dist

        n = len(self.params)
        device = next((s.device for s in self.sums if s is not None), torch.device("cpu"))
        values = torch.zeros(2 * n, dtype=torch.float64, device=device)
        for i, (s, c) in enumerate(zip(self.sums, self.counts, strict=True)):
            if s is not None and c:
                values[i] = s.double() / c
                values[n + i] = 1.0
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            comm = values if dist.get_backend() != "gloo" else values.cpu()
            dist.all_reduce(comm)
            values = comm
        flat = values.tolist()
        # a group counts only if every rank measured it: the same on all ranks
        norms = [flat[i] / world if flat[n + i] == world else None for i in range(n)]
        self.sums = [None] * n
        self.counts = [0] * n
        return self.rule.update(norms)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [None if s is None else float(s) for s in self.sums], "counts": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        sums = state.get("sums", [])
        if len(sums) != len(self.params):
            return
        device = next((p.device for g in self.params for p in g), torch.device("cpu"))
        self.sums = [None if s is None else torch.tensor(s, dtype=torch.float32, device=device) for s in sums]
        self.counts = [int(c) for c in state.get("counts", [0] * len(sums))]


class AdaptiveStats:
    """The gradient statistics of a schedule's adaptive rules, as a party on an optimizer.

    Collects each adaptive rule's per-group gradient norms in the optimizer's
    step pre-hook and, after the step that completes a rule's check, hands
    them to the rule; when a rule's frozen prefix grows it calls ``on_grow``
    (the Freezer applies the schedule then). Its part of a checkpoint is the
    collectors' partial sums.

    Args:
        schedule: the schedule (its adaptive rules are used).
        index: the model.
        optimizer: the torch optimizer.
        clock: an object whose ``count`` is the number of optimizer steps.
        on_grow: called with no argument when a frozen prefix grew; held as
            given (pass a ``weakref.WeakMethod`` to avoid keeping its owner alive).

    Raises:
        ArgumentError: there are adaptive rules but no optimizer.
    """

    def __init__(self, schedule: Any, index: ModelIndex, optimizer: Any, *, clock: Any, on_grow: Any) -> None:
        import weakref

        from .errors import ArgumentError

        self.clock = clock
        self.on_grow = on_grow
        #: (rule index, collector) for each adaptive rule
        self.collectors: list[tuple[int, GradNormCollector]] = []
        for i, rule in enumerate(schedule.rules):
            if isinstance(rule, AdaptiveFreezeRule):
                groups = rule.groups(index, origin=schedule.origin(i))
                params = [[index.by_canonical[n] for n in res.params] for _, res in groups]
                self.collectors.append((i, GradNormCollector(rule, params)))
        self._handles: list[Any] = []
        if not self.collectors:
            return
        if optimizer is None:
            raise ArgumentError(
                "an adaptive_freeze rule needs the optimizer: its gradient norms are read at each step; "
                "pass optimizer= to the Freezer"
            )
        ref = weakref.ref(self)

        def before(optimizer: Any, args: Any, kwargs: Any) -> None:
            party = ref()
            if party is not None:
                party.collect()

        def after(optimizer: Any, args: Any, kwargs: Any) -> None:
            party = ref()
            if party is not None:
                party.finish()

        self._handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]
        for h in self._handles:
            weakref.finalize(self, h.remove)

    def __bool__(self) -> bool:
        return bool(self.collectors)

    def collect(self) -> None:
        for _, collector in self.collectors:
            collector.collect()

    def finish(self) -> None:
        grew = False
        for _, collector in self.collectors:
            if self.clock.count % collector.rule.check_every == 0:
                grew = collector.finish() or grew
        if grew:
            import weakref

            callback = self.on_grow() if isinstance(self.on_grow, weakref.WeakMethod) else self.on_grow
            if callback is not None:
                callback()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {i: c.state_dict() for i, c in self.collectors}

    def load_state_dict(self, state: dict[Any, Any]) -> None:
        for i, collector in self.collectors:
            part = state.get(i, state.get(str(i)))
            if part is not None:
                collector.load_state_dict(part)
