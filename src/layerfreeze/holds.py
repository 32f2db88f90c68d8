"""Eval holds: which frozen modules stay in eval mode across ``model.train()``.

A freeze with ``mode="norm"`` keeps the frozen normalization layers that track
running statistics in eval mode, ``mode="eval"`` the whole frozen subtree,
``mode="keep"`` no module. A held module gets an instance-level ``train``
(:class:`KeepEval`) that keeps it in eval mode and passes the requested mode
on to its children. Every decision about holds lives here: which modules a
freeze holds (:func:`holds_for`), which an unfreeze releases
(:func:`releases_for`) and how a schedule's combined verdict turns into holds
(:func:`plan_holds`); :func:`layerfreeze.apply_change` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import ArgumentError, ArgumentTypeError
from .selectors import ModelIndex, unwrap

__all__ = [
    "KeepEval",
    "MODES",
    "check_mode",
    "hold_eval",
    "holds_for",
    "is_stat_norm",
    "keeper",
    "kept_in_eval",
    "plan_holds",
    "release",
    "releases_for",
]

MODES = ("norm", "eval", "keep")


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`MODES`.

    Raises:
        ArgumentError: another value, named with the accepted ones.
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ArgumentError(
            f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}; 'norm' (the default) keeps "
            "frozen normalization layers in eval mode, 'eval' the whole frozen subtree, 'keep' no module"
        )
    return mode


def is_stat_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and bool(module.track_running_stats)


class KeepEval:
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
            raise ArgumentTypeError(f"training mode is expected to be boolean, got {mode!r}")
        self.requested = mode
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


def keeper(module: nn.Module) -> KeepEval | None:
    k = module.__dict__.get("train")
    return k if isinstance(k, KeepEval) else None


def hold_eval(module: nn.Module, mode: str) -> None:
    current = keeper(module)
    if current is not None:
        if mode == "eval":
            current.mode = "eval"
        return
    module.__dict__["train"] = KeepEval(module, mode)
    module.training = False


def release(module: nn.Module) -> None:
    k = keeper(module)
    if k is not None:
        del module.__dict__["train"]
        module.training = k.requested


def kept_in_eval(model: nn.Module) -> dict[str, str]:
    """Modules held in eval mode by a freeze: name -> mode (``"norm"``/``"eval"``)."""
    out = {}
    for name, module in unwrap(model).named_modules():
        k = keeper(module)
        if k is not None:
            out[name] = k.mode
    return out




def holds_for(index: ModelIndex, modules: Sequence[str], mode: str) -> dict[str, str]:
    if mode == "keep":
        return {}
    if mode == "eval":
        return {name: "eval" for name in modules}
    return {name: "norm" for name in modules if is_stat_norm(index.modules[name])}




def releases_for(index: ModelIndex, res: Any, unfreezing: Sequence[str] | None = None) -> list[str]:
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
        if name in chosen or keeper(module) is None:
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


def plan_holds(
    index: ModelIndex, state: dict[str, bool], holds: dict[str, str], released: dict[str, None]
) -> dict[str, str]:
    """Turn a schedule's wanted holds into the holds to apply.

    Args:
        index: the model.
        state: canonical name -> frozen, as the schedule decided.
        holds: module name -> mode the winning rules ask for.
        released: module names to release; extended in place with held
            modules that keep a trainable parameter of their own, and with
            holds that must be re-made with another mode.

    Returns:
        module name -> mode (``"norm"``/``"eval"``) to hold.
    """
    modes = {}
    for name, mode in holds.items():
        module = index.modules[name]
        own = [p for p in module._parameters.values() if p is not None]
        if any(not state.get(index.canonical[id(p)], not p.requires_grad) for p in own):
            released[name] = None
            continue
        if mode == "eval" or (mode == "norm" and is_stat_norm(module)):
            modes[name] = mode
            k = keeper(module)
            if k is not None and k.mode != mode:
                released[name] = None  # re-held below with the mode the winning rule gives
        else:
            # a "norm" freeze leaves dropout, containers and other layers to
            # model.train()/eval(): drop an "eval" hold an earlier rule left
            released[name] = None
    return modes
