"""Freezing and unfreezing: the one road every change of freeze state travels.

A change is computed as a diff (which parameters become frozen, which become
trainable, which modules must stay in eval mode), validated by every party
that listens on the model (an optimizer kept in sync, the guard, a feature
cache, a DDP reducer), and only then applied, in :func:`apply_change`. A failed
validation leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from torch import nn

from .errors import ArgumentError, ArgumentTypeError, SelectorError
from .holds import (
    KeepEval,
    check_mode,
    hold_eval,
    holds_for,
    keeper,
    kept_in_eval,
    release,
    releases_for,
)
from .selectors import ModelIndex, resolve, unwrap

__all__ = [
    "Change",
    "Listener",
    "Mode",
    "Transition",
    "apply_change",
    "freeze",
    "frozen",
    "subscribe",
    "unfreeze",
]

log = logging.getLogger("layerfreeze")

# the names these helpers had when they lived here
_KeepEval, _keeper, _hold_eval, _release = KeepEval, keeper, hold_eval, release
_check_mode, _holds_for, _releases_for = check_mode, holds_for, releases_for
__all__ += ["kept_in_eval"]

Mode = Literal["norm", "eval", "keep"]


@dataclass(frozen=True)
class Transition:
    """One change of freeze state that actually happened.

    Attributes:
        action: ``"freeze"`` or ``"unfreeze"``.
        names: canonical names of the parameters whose state changed.
        count: number of scalar parameters those tensors hold.
        trainable: trainable scalar parameters in the model afterwards.
        epoch, step: when, if a schedule made the change.
    """

    action: Literal["freeze", "unfreeze"]
    names: tuple[str, ...]
    count: int
    trainable: int
    epoch: int | None = None
    step: int | None = None

    def __str__(self) -> str:
        verb = "froze" if self.action == "freeze" else "unfroze"
        when = ""
        if self.epoch is not None:
            when = f"epoch {self.epoch}: "
        elif self.step is not None:
            when = f"step {self.step}: "
        shown = ", ".join(self.names[:4]) + (f", ... ({len(self.names)} tensors)" if len(self.names) > 4 else "")
        return f"{when}{verb} {self.count:,} params ({shown}); trainable now {self.trainable:,}"


@dataclass
class Change:
    """A validated-but-not-yet-applied change, as listeners see it.

    Attributes:
        model: the (unwrapped) root module.
        index: names of the model's modules and parameters.
        freeze: canonical names becoming frozen (currently trainable).
        unfreeze: canonical names becoming trainable (currently frozen).
        options: extra instructions from the caller (e.g. ``lr`` for new
            optimizer groups, ``epoch``/``step``).
    """

    model: nn.Module
    index: ModelIndex
    freeze: list[str]
    unfreeze: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def params(self, names: Sequence[str]) -> list[nn.Parameter]:
        return [self.index.by_canonical[n] for n in names]


class Listener(Protocol):
    """A party that follows freeze changes of one model."""

    def validate(self, change: Change) -> None:
        """Raise to veto the change; must not modify anything."""

    def apply(self, change: Change) -> None:
        """Follow the change, after parameters and modes were updated."""


class _Strong:
    """A strong reference with the call shape of ``weakref.ref``."""

    __slots__ = ("obj",)

    def __init__(self, obj: Listener) -> None:
        self.obj = obj

    def __call__(self) -> Listener:
        return self.obj


_Ref = Any  # weakref.ref[Listener] | _Strong
_listeners: weakref.WeakKeyDictionary[nn.Module, list[_Ref]] = weakref.WeakKeyDictionary()


class _Subscription:
    """The handle :func:`subscribe` returns; ``remove()`` unsubscribes."""

    def __init__(self, model: nn.Module, ref: _Ref) -> None:
        self._model = weakref.ref(model)
        self._ref = ref

    def remove(self) -> None:
        model = self._model()
        if model is not None and model in _listeners:
            with contextlib.suppress(ValueError):
                _listeners[model].remove(self._ref)


def subscribe(model: nn.Module, listener: Listener, *, weak: bool = False) -> _Subscription:
    """Have ``listener`` validate and follow every freeze change of ``model``.

    Args:
        model: the model (wrappers are looked through).
        listener: an object with ``validate(change)`` and ``apply(change)``.
        weak: hold the listener weakly: once nothing else refers to it, it
            stops following the model (and can no longer veto a change),
            without a ``remove()``. :class:`~layerfreeze.Freezer` subscribes
            this way, so a dropped Freezer frees its optimizer and state.

    Returns:
        A handle whose ``remove()`` unsubscribes.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> class Log:
        ...     def validate(self, change): pass
        ...     def apply(self, change): print("froze", change.freeze)
        >>> net = nn.Linear(2, 1)
        >>> handle = lf.subscribe(net, Log())
        >>> _ = lf.freeze(net, "bias")
        froze ['bias']
        >>> handle.remove()
    """
    root = unwrap(model)
    ref: _Ref = weakref.ref(listener) if weak else _Strong(listener)
    _listeners.setdefault(root, []).append(ref)
    return _Subscription(root, ref)


def listeners(model: nn.Module) -> list[Listener]:
    """The live listeners of ``model``, in subscription order (dead weak ones are dropped)."""
    refs = _listeners.get(unwrap(model))
    if not refs:
        return []
    live = [(r, r()) for r in refs]
    refs[:] = [r for r, obj in live if obj is not None]
    return [obj for _, obj in live if obj is not None]


# --------------------------------------------------------------------------- the road


def trainable_count(index: ModelIndex) -> int:
    return sum(p.numel() for p in index.by_canonical.values() if p.requires_grad)


def apply_change(
    model: nn.Module,
    *,
    freeze: Sequence[str] = (),
    unfreeze: Sequence[str] = (),
    hold: dict[str, str] | None = None,
    release: Sequence[str] = (),
    index: ModelIndex | None = None,
    options: dict[str, Any] | None = None,
) -> list[Transition]:
    """Apply one change of freeze state to ``model``: the only place that does.

    Args:
        model: the model (wrappers are looked through).
        freeze: canonical parameter names to freeze.
        unfreeze: canonical parameter names to make trainable.
        hold: module name -> mode (``"norm"``/``"eval"``) to keep in eval mode.
        release: module names to hand back to ``model.train()``/``eval()``.
        index: a prebuilt index of ``model``.
        options: passed to listeners (``lr``, ``epoch``, ``step``, ...).

    Returns:
        The transitions made: at most one freeze and one unfreeze.
    """
    root = unwrap(model)
    index = index or ModelIndex(root)
    _check_names(index, freeze, "freeze", index.by_canonical, "parameter")
    _check_names(index, unfreeze, "unfreeze", index.by_canonical, "parameter")
    _check_names(index, list(hold or {}), "hold", index.modules, "module")
    _check_names(index, release, "release", index.modules, "module")
    for name, mode in (hold or {}).items():
        if mode not in ("norm", "eval"):
            raise ArgumentError(f"hold[{name!r}]={mode!r}: a hold is 'norm' or 'eval'")
    to_freeze = [n for n in dict.fromkeys(freeze) if index.by_canonical[n].requires_grad]
    to_unfreeze = [n for n in dict.fromkeys(unfreeze) if not index.by_canonical[n].requires_grad]
    overlap = set(freeze) & set(unfreeze)
    if overlap:
        raise ArgumentError(
            f"cannot freeze and unfreeze the same parameters at once: {sorted(overlap)}; "
            "make two calls, or take them out of one of the lists"
        )
    change = Change(root, index, to_freeze, to_unfreeze, dict(options or {}))
    parties = listeners(root)
    if to_freeze or to_unfreeze:
        for listener in parties:
            listener.validate(change)

    for p in change.params(to_freeze):
        p.requires_grad_(False)
        p.grad = None
    for p in change.params(to_unfreeze):
        p.requires_grad_(True)
    for name in release:
        _release(index.modules[name])
    for name, mode in (hold or {}).items():
        hold_eval(index.modules[name], mode)

    if not (to_freeze or to_unfreeze):
        return []
    for listener in parties:
        listener.apply(change)
    trainable = trainable_count(index)
    epoch, step = change.options.get("epoch"), change.options.get("step")
    made = []
    for action, names in (("freeze", to_freeze), ("unfreeze", to_unfreeze)):
        if names:
            count = sum(index.by_canonical[n].numel() for n in names)
            t = Transition(action, tuple(names), count, trainable, epoch, step)  # type: ignore[arg-type]
            log.info("%s", t)
            made.append(t)
    return made


def _check_names(index: ModelIndex, names: object, what: str, known: dict[str, Any], kind: str) -> None:
    if isinstance(names, str):
        raise ArgumentTypeError(f"{what}= takes a list of canonical {kind} names, got the string {names!r}; "
                                f"write {what}=[{names!r}]")
    unknown = [n for n in names if n not in known]  # type: ignore[attr-defined]
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), list(known), n=3, cutoff=0.5)
        raise SelectorError(
            f"{what}= names {kind}(s) this model does not have: {unknown[:5]}; apply_change takes "
            f"canonical {kind} names (lf.select(model, ...) gives them for a selector)",
            selector=unknown[0],
            origin=f"apply_change {what}=",
            suggestions=close,
        )


def _tie_note(index: ModelIndex, names: Sequence[str], modules: Sequence[str]) -> None:
    chosen = set(names)
    for alias, p in index.params.items():
        canonical = index.canonical[id(p)]
        if alias != canonical and canonical in chosen:
            owner = alias.rpartition(".")[0]
            if owner not in modules:
                log.info("%s is shared with %s: both change together", canonical, alias)


def freeze(
    model: nn.Module, *selectors: object, exclude: object = (), mode: Mode = "norm"
) -> list[str]:
    """Freeze the selected parameters: ``requires_grad=False`` and ``.grad=None``.

    Args:
        model: the model (DDP and ``torch.compile`` wrappers are looked through).
        *selectors: what to freeze (see :func:`layerfreeze.select`); none means
            the whole model, an explicit empty list nothing.
        exclude: selectors to leave trainable.
        mode: ``"norm"`` keeps normalization layers with running statistics in
            the selection in eval mode, even across later ``model.train()``;
            ``"eval"`` keeps the whole selected subtree in eval mode (dropout
            off: deterministic features); ``"keep"`` touches no modes.

    Returns:
        Canonical names of the selected parameters, in model order.

    Raises:
        SelectorError: a selector is malformed or matches nothing.
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> lf.freeze(net, "[0:2]")
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> net.train()[1].training  # the frozen BatchNorm keeps its statistics
        False
    """
    mode = check_mode(mode)  # type: ignore[assignment]
    index = ModelIndex(model)
    res = resolve(index, selectors, exclude)
    _tie_note(index, res.params, res.modules)
    apply_change(index.model, freeze=res.params, hold=holds_for(index, res.modules, mode), index=index)
    return res.params


def unfreeze(model: nn.Module, *selectors: object, exclude: object = ()) -> list[str]:
    """Make the selected parameters trainable again; their modules follow
    ``model.train()``/``eval()`` again.

    Args:
        model: the model.
        *selectors: what to unfreeze; none means the whole model, an explicit
            empty list nothing.
        exclude: selectors to leave as they are.

    Returns:
        Canonical names of the selected parameters, in model order.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> _ = lf.freeze(net)
        >>> lf.unfreeze(net, "[1]")
        ['1.weight', '1.bias']
    """
    index = ModelIndex(model)
    res = resolve(index, selectors, exclude)
    apply_change(index.model, unfreeze=res.params, release=releases_for(index, res), index=index)
    return res.params


@contextlib.contextmanager
def frozen(
    model: nn.Module, *selectors: object, exclude: object = (), mode: Mode = "norm"
) -> Iterator[list[str]]:
    """Freeze for the duration of a ``with`` block.

    On exit, exception included, every ``requires_grad`` flag, every module's
    training mode and every eval hold is restored exactly as it was, and
    gradients the freeze dropped are put back.

    Yields:
        The canonical names frozen by the block.

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> with lf.frozen(net, "[0]"):
        ...     net(torch.ones(1, 2)).sum().backward()
        >>> net[0].weight.grad is None, net[0].weight.requires_grad
        (True, True)
    """
    index = ModelIndex(model)
    flags = {n: p.requires_grad for n, p in index.by_canonical.items()}
    grads = {n: p.grad for n, p in index.by_canonical.items()}
    training = {n: m.training for n, m in index.modules.items()}
    # a hold is restored with the mode it had and the train/eval request it
    # remembered: the block may upgrade "norm" to "eval" or call model.eval()
    keepers: dict[str, tuple[KeepEval, str, bool] | None] = {}
    for n, m in index.modules.items():
        k = keeper(m)
        keepers[n] = (k, k.mode, k.requested) if k is not None else None
    names = freeze(index.model, *selectors, exclude=exclude, mode=mode)
    chosen = set(names)
    try:
        yield names
    finally:
        now_frozen = [n for n, p in index.by_canonical.items() if not p.requires_grad and flags[n]]
        now_trainable = [n for n, p in index.by_canonical.items() if p.requires_grad and not flags[n]]
        apply_change(index.model, freeze=now_trainable, unfreeze=now_frozen, index=index)
        for n, p in index.by_canonical.items():
            # the grads the block's freeze dropped come back, also when the
            # block unfroze the parameters itself
            if flags[n] and p.requires_grad and p.grad is None and grads[n] is not None and n in chosen:
                p.grad = grads[n]
        for n, m in index.modules.items():
            saved = keepers[n]
            if saved is None:
                if keeper(m) is not None:
                    del m.__dict__["train"]
            else:
                held, held_mode, requested = saved
                held.mode, held.requested = held_mode, requested
                m.__dict__["train"] = held
            m.training = training[n]
