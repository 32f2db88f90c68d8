"""Optional dependencies: one place that turns a missing one into an error
naming the extra to install.

Example:
    >>> from layerfreeze._optional import require
    >>> require("json", "report", "reading JSON")
    >>> require("no_such_module_here", "report", "the plan picture")
    Traceback (most recent call last):
    ...
    layerfreeze._optional.MissingDependency: the plan picture needs no_such_module_here, which is not installed: pip install 'layerfreeze[report]'
"""

from __future__ import annotations

import importlib.util

__all__ = ["MissingDependency", "require"]


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingDependency` unless ``module`` can be imported.

    Args:
        module: the top-level module to look for (``"matplotlib"``).
        extra: the layerfreeze extra that installs it (``"report"``).
        what: what needs it, to start the message (``"lf.plot_timeline"``).

    Raises:
        MissingDependency: the module is missing (a ``ModuleNotFoundError``,
            so ``except ImportError`` keeps working).
    """
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(
            f"{what} needs {module}, which is not installed: pip install 'layerfreeze[{extra}]'",
            name=module,
        )
