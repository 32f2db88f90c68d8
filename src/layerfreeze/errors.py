"""The layerfreeze error family.

Every error the library raises on purpose derives from :class:`LayerFreezeError`,
and also from the built-in exception a Python user would expect for that kind of
problem (``ValueError`` for a bad selector, ``RuntimeError`` for a weight that
moved), so ``except ValueError`` keeps working in code that predates layerfreeze.
"""

from __future__ import annotations

from collections.abc import Sequence


class LayerFreezeError(Exception):
    """Base class of every error layerfreeze raises on purpose."""


class SelectorError(LayerFreezeError, ValueError):
    """A selector that cannot be parsed, or that matches nothing.

    Attributes:
        selector: the selector as the user wrote it.
        origin: where it came from, e.g. ``"argument 1"`` or ``"rule 2 (freeze)"``.
        suggestions: the closest existing names, best first.
    """

    def __init__(
        self,
        message: str,
        *,
        selector: object = None,
        origin: str | None = None,
        suggestions: Sequence[str] = (),
    ) -> None:
        self.selector = selector
        self.origin = origin
        self.suggestions = list(suggestions)
        parts = [message]
        if origin:
            parts[0] = f"{origin}: {message}"
        if self.suggestions:
            parts.append("closest names: " + ", ".join(repr(s) for s in self.suggestions))
        super().__init__("\n".join(parts))


class SelectorTypeError(SelectorError, TypeError):
    """A selector of a form layerfreeze does not know (an int, a tensor, ...)."""


class FrozenParameterChanged(LayerFreezeError, RuntimeError):
    """A parameter that is frozen changed value.

    Attributes:
        names: qualified names of the parameters that changed.
        step: the optimizer step after which the change was first seen, if known.
    """

    def __init__(self, message: str, names: Sequence[str], *, step: int | None = None) -> None:
        self.names = list(names)
        self.step = step
        super().__init__(message)


class OptimizerSyncError(LayerFreezeError, ValueError):
    """A freeze change that the optimizer cannot follow as configured."""


class StateDictError(LayerFreezeError, ValueError):
    """A layerfreeze state dict that does not fit the model it is loaded into."""


class ScheduleError(LayerFreezeError, ValueError):
    """A schedule rule or config that is malformed."""


class ScheduleTypeError(ScheduleError, TypeError):
    """A rule argument or config value of the wrong type (also a ``TypeError``)."""


class ArgumentError(LayerFreezeError, ValueError):
    """An argument outside the values a function accepts (a mode, an interval,
    a count); the message names the argument, the value and what is accepted."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (a model that is not an ``nn.Module``, an
    optimizer or scheduler of another kind); also a ``TypeError``."""


class RankMismatchError(LayerFreezeError, RuntimeError):
    """Ranks of one process group disagree about the frozen set.

    Attributes:
        frozen_by_rank: rank -> number of frozen parameter tensors it wanted.
    """

    def __init__(self, message: str, frozen_by_rank: dict[int, int]) -> None:
        self.frozen_by_rank = frozen_by_rank
        super().__init__(message)


class CacheError(LayerFreezeError, ValueError):
    """A feature cache asked for something it cannot do (bad arguments, a model
    ``precompute`` cannot call)."""


class CacheTypeError(CacheError, TypeError):
    """A feature cache given an object of the wrong kind (not an ``nn.Module``)."""
