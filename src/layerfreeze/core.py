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

Mode = Literal["norm", "eval", "keep"]
_MODES = ("norm", "eval", "keep")


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


_listeners: weakref.WeakKeyDictionary[nn.Module, list[Listener]] = weakref.WeakKeyDictionary()


class _Subscription:
    def __init__(self, model: nn.Module, listener: Listener) -> None:
        self._model = weakref.ref(model)
        self._listener = listener

    def remove(self) -> None:
        model = self._model()
        if model is not None and model in _listeners:
            with contextlib.suppress(ValueError):
                _listeners[model].remove(self._listener)


def subscribe(model: nn.Module, listener: Listener) -> _Subscription:
    """Have ``listener`` validate and follow every freeze change of ``model``.

    Returns a handle whose ``remove()`` unsubscribes.
    """
    root = unwrap(model)
    _listeners.setdefault(root, []).append(listener)
    return _Subscription(root, listener)


# --------------------------------------------------------------------------- modes


def _is_stat_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and bool(module.track_running_stats)


class _KeepEval:
    """Replaces a module's ``train`` so that ``model.train()`` cannot undo a freeze.

    Installed as an instance attribute (the class's ``train`` is untouched), so
    the module's own class, parameters and state dict are unchanged. It keeps
    the module in eval mode and passes the requested mode on to its children,
    each of which decides for itself.
    """

    __slots__ = ("module", "mode", "requested")

    def __init__(self, module: nn.Module, mode: str) -> None:
        self.module = module
        self.mode = mode
        self.requested = module.training

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.requested = mode
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


def _keeper(module: nn.Module) -> _KeepEval | None:
    k = module.__dict__.get("train")
    return k if isinstance(k, _KeepEval) else None


def _hold_eval(module: nn.Module, mode: str) -> None:
    current = _keeper(module)
    if current is not None:
        if mode == "eval":
            current.mode = "eval"
        return
    module.__dict__["train"] = _KeepEval(module, mode)
    module.training = False


def _release(module: nn.Module) -> None:
    keeper = _keeper(module)
    if keeper is not None:
        del module.__dict__["train"]
        module.training = keeper.requested


def kept_in_eval(model: nn.Module) -> dict[str, str]:
    """Modules held in eval mode by a freeze: name -> mode (``"norm"``/``"eval"``)."""
    out = {}
    for name, module in unwrap(model).named_modules():
        keeper = _keeper(module)
        if keeper is not None:
            out[name] = keeper.mode
    return out


# --------------------------------------------------------------------------- the road


def _check_mode(mode: object) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(map(repr, _MODES))}")
    return str(mode)


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
    to_freeze = [n for n in dict.fromkeys(freeze) if index.by_canonical[n].requires_grad]
    to_unfreeze = [n for n in dict.fromkeys(unfreeze) if not index.by_canonical[n].requires_grad]
    overlap = set(to_freeze) & set(to_unfreeze)
    if overlap:
        raise ValueError(f"cannot freeze and unfreeze the same parameters at once: {sorted(overlap)}")
    change = Change(root, index, to_freeze, to_unfreeze, dict(options or {}))
    listeners = list(_listeners.get(root, ()))
    if to_freeze or to_unfreeze:
        for listener in listeners:
            listener.validate(change)

    for p in change.params(to_freeze):
        p.requires_grad_(False)
        p.grad = None
    for p in change.params(to_unfreeze):
        p.requires_grad_(True)
    for name in release:
        _release(index.modules[name])
    for name, mode in (hold or {}).items():
        _hold_eval(index.modules[name], mode)

    if not (to_freeze or to_unfreeze):
        return []
    for listener in listeners:
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


def _holds_for(index: ModelIndex, modules: Sequence[str], mode: str) -> dict[str, str]:
    if mode == "keep":
        return {}
    if mode == "eval":
        return {name: "eval" for name in modules}
    return {name: "norm" for name in modules if _is_stat_norm(index.modules[name])}


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
            the whole model.
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
    mode = _check_mode(mode)  # type: ignore[assignment]
    index = ModelIndex(model)
    res = resolve(index, selectors, exclude)
    _tie_note(index, res.params, res.modules)
    apply_change(index.model, freeze=res.params, hold=_holds_for(index, res.modules, mode), index=index)
    return res.params


def unfreeze(model: nn.Module, *selectors: object, exclude: object = ()) -> list[str]:
    """Make the selected parameters trainable again; their modules follow
    ``model.train()``/``eval()`` again.

    Args:
        model: the model.
        *selectors: what to unfreeze; none means the whole model.
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
    apply_change(index.model, unfreeze=res.params, release=_releases_for(index, res), index=index)
    return res.params


def _releases_for(index: ModelIndex, res: Any, unfreezing: Sequence[str] | None = None) -> list[str]:
    """Modules to hand back once ``unfreezing`` (default: the selection) is trainable.

    Those are the modules wholly in the selection; held modules left with no
    frozen parameter of their own; and held modules with no parameter of their
    own (containers, dropout) once the nearest enclosing module that has
    parameters has none frozen left and this change unfroze some of them.
    """
    names = set(res.params if unfreezing is None else unfreezing)
    changing = {n for n in names if not index.by_canonical[n].requires_grad}
    out = list(res.modules)
    chosen = set(out)
    subtree_cache: dict[str, set[str]] = {}

    def subtree(name: str) -> set[str]:
        if name not in subtree_cache:
            subtree_cache[name] = {index.canonical[id(p)] for p in index.modules[name].parameters()}
        return subtree_cache[name]

    for name, module in index.modules.items():
        if name in chosen or _keeper(module) is None:
            continue
        own = [p for p in module._parameters.values() if p is not None]
        if own:
            if all(p.requires_grad or index.canonical[id(p)] in names for p in own):
                out.append(name)
            continue
        anchor = name
        while not subtree(anchor) and anchor:
            anchor = anchor.rpartition(".")[0]
        params = subtree(anchor)
        still_frozen = any(not index.by_canonical[n].requires_grad and n not in names for n in params)
        if params & changing and not still_frozen:
            out.append(name)
    return out


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
    keepers: dict[str, tuple[_KeepEval, str, bool] | None] = {}
    for n, m in index.modules.items():
        k = _keeper(m)
        keepers[n] = (k, k.mode, k.requested) if k is not None else None
    names = freeze(index.model, *selectors, exclude=exclude, mode=mode)
    try:
        yield names
    finally:
        now_frozen = [n for n, p in index.by_canonical.items() if not p.requires_grad and flags[n]]
        now_trainable = [n for n, p in index.by_canonical.items() if p.requires_grad and not flags[n]]
        apply_change(index.model, freeze=now_trainable, unfreeze=now_frozen, index=index)
        for n, p in index.by_canonical.items():
            if n in now_frozen and p.grad is None:
                p.grad = grads[n]
        for n, m in index.modules.items():
            saved = keepers[n]
            if saved is None:
                if _keeper(m) is not None:
                    del m.__dict__["train"]
            else:
                keeper, keeper_mode, requested = saved
                keeper.mode, keeper.requested = keeper_mode, requested
                m.__dict__["train"] = keeper
            m.training = training[n]
