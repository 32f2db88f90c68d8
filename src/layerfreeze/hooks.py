"""What layerfreeze installs on a user's model, made safe to copy and pickle.

A :class:`~layerfreeze.Freezer` puts hooks on the model (a ``load_state_dict``
post-hook; with ``cache=``, forward hooks and instance forwards of the skipped
modules). Closures would make ``torch.save(model)`` and ``pickle`` fail, and a
``copy.deepcopy`` of the model would keep calling into the original's Freezer.
Wrapped in :class:`ModelHook`, a hook pickles and copies as an inert one: the
copy is a plain model, unmanaged until a Freezer of its own takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ModelHook", "call_eagerly", "inert"]


def inert(*args: Any, **kwargs: Any) -> None:
    """A hook that does nothing: what a :class:`ModelHook` becomes in a copy."""
    return None


class ModelHook:
    """A hook of layerfreeze on a user's module; a copy or an unpickled model gets :func:`inert`.

    Args:
        fn: the hook (any callable; it usually holds its owner weakly).

    Example:
        >>> import copy, torch, torch.nn as nn
        >>> calls = []
        >>> m = nn.Linear(2, 2)
        >>> _ = m.register_forward_pre_hook(ModelHook(lambda mod, args: calls.append(1)))
        >>> twin = copy.deepcopy(m)
        >>> _ = m(torch.zeros(1, 2)); _ = twin(torch.zeros(1, 2))
        >>> len(calls)
        1
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_eagerly(self.fn, args, kwargs)

    def __reduce__(self) -> Any:
        return (_inert_hook, ())


def _inert_hook() -> Callable[..., None]:
    return inert


def _run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


_EAGER: list[Callable[..., Any]] = []


def call_eagerly(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)``; while ``torch.compile`` traces, outside the trace.

    layerfreeze's hooks keep state (locks, thread-local plans, stores) that dynamo
    would guard on, recompiling at almost every call, so under tracing they run
    eagerly, through ``torch.compiler.disable``. That wrapper is made at the first
    trace: making it loads dynamo, which ``import layerfreeze`` does not.
    """
    if not torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_run))
    return _EAGER[0](fn, args, kwargs)
